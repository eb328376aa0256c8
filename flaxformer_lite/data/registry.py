"""The objective registry: every training objective declared once, with what the rest of the project derives from
it (the config's choices, the data pools, the training task's loss terms and weights, the logged metrics, and the
samples written at the end of a run).

Knows no model: model kinds are the names `ModelConfig.model` takes, and training/tasks.py maps each objective to
the model call it makes.

Shape key: b batch, l ``seq_len``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from . import objectives
from .packing import pack_documents
from .windows import DocumentChunks, WindowPool, causal_lm_windows

MLM_SPECIAL_TOKENS = 3  # [CLS] A [SEP] B [SEP]
MLM_MIN_CHUNK = 8  # MLM makes examples only of document chunks this long (shorter tails are dropped)


@dataclasses.dataclass(frozen=True)
class Term:
    """One loss term. ``weight_key`` is the batch key that weighs it: a float mask summed over positions, or, with
    ``per_example``, an array with one row per example (counted). Token-level terms also report perplexity."""

    name: str
    weight_key: str
    per_example: bool = False


@dataclasses.dataclass(frozen=True)
class Objective:
    """One objective.

    Attributes:
      name: the ``data.objective`` value.
      models: the model kinds (``model.model``) that can learn it.
      terms: its loss terms; the training loss is the sum of each term's sum over its weight. An objective of
        one term logs it unprefixed (``accuracy``, ``eval_loss``); several terms log ``<term>_...``.
      columns: ``(role, data config field)`` of each dataset column read, the first the text to tokenize; a
        ``label`` role is kept as is; an optional column's field may be empty in the config.
      make_pool: ``(data config, {role: encoded column}, seq_len, special ids) -> (examples, make_batch)``,
        ``make_batch(example indices, NumPy generators) -> batch dict``.
      stream_pool: the same from a token store's flat stream, read lazily: ``(data config, tokens, start, stop,
        seq_len, special ids) -> (examples, make_batch)`` over the token range ``[start, stop)``; None for the
        objectives of small labelled data (seq2seq, classify), which keep ``make_pool``.
      prompt_key: the batch key whose first tokens prompt the samples written at the end, or None (no samples).
      min_seq_len: the shortest ``train.seq_len`` it can make examples of.
      batch_kind: which `BATCH_KINDS` its batches are (their keys), so that training/tasks.py knows the model
        call they feed without a table of objectives of its own.
    """

    name: str
    models: tuple[str, ...]
    terms: tuple[Term, ...]
    columns: tuple[tuple[str, str], ...]
    make_pool: Callable
    stream_pool: Callable | None = None
    prompt_key: str | None = None
    min_seq_len: int = 2
    batch_kind: str = "decoder"

    def check(self, model_kind: str | None = None, seq_len: int | None = None) -> None:
        """Raise `ValueError` if ``model_kind`` cannot learn this objective or ``seq_len`` is too short for it."""
        if model_kind is not None and model_kind not in self.models:
            raise ValueError(f"data.objective={self.name!r} trains a model.model in {list(self.models)}, but the "
                             f"config builds {model_kind!r}; pick a {self.models[0]} preset (model.preset=...)")
        if seq_len is not None and seq_len < self.min_seq_len:
            raise ValueError(f"train.seq_len must be at least {self.min_seq_len} for data.objective={self.name!r}, "
                             f"got {seq_len}")


def _lm_pool(prefix: bool):
    def make(data, columns, seq_len, ids):
        rows, segs = pack_documents(columns["text"], seq_len + 1, ids.eos)
        if not prefix:
            return len(rows), lambda idx, rngs: objectives.causal_lm(rows[idx], segs[idx])
        return len(rows), lambda idx, rngs: objectives.prefix_lm(rows[idx], segs[idx], rngs, data.prefix_fraction)
    return make


def _mlm_pool(data, columns, seq_len, ids):
    stride = seq_len - MLM_SPECIAL_TOKENS
    chunks = [d[i:i + stride] for d in columns["text"] for i in range(0, len(d), stride)
              if len(d[i:i + stride]) >= MLM_MIN_CHUNK]
    return len(chunks), lambda idx, rngs: objectives.bert_mlm_nsp(chunks, idx, rngs, seq_len, ids,
                                                                    data.mlm_probability)


def _span_pool(data, columns, seq_len, ids):
    rows, _ = pack_documents(columns["text"], seq_len, ids.eos)
    return len(rows), lambda idx, rngs: objectives.span_corruption(rows[idx], rngs, ids, data.noise_density,
                                                                   data.mean_span_length)


def _seq2seq_pool(data, columns, seq_len, ids):
    pairs = list(zip(columns["text"], columns["target"]))
    return len(pairs), lambda idx, rngs: objectives.seq2seq([pairs[i] for i in idx], seq_len, seq_len, ids)


def _classify_pool(data, columns, seq_len, ids):
    pairs = columns.get("pair") or [None] * len(columns["text"])
    examples = list(zip(columns["text"], pairs, columns["label"]))
    return len(examples), lambda idx, rngs: objectives.classification([examples[i] for i in idx], seq_len, ids)


def _lm_stream(prefix: bool):
    def make(data, tokens, start, stop, seq_len, ids):
        pool = WindowPool(tokens, start, stop, seq_len + 1, seq_len)  # each token a target once
        if not prefix:
            return len(pool), lambda idx, rngs: causal_lm_windows(pool.rows(idx), ids.eos)
        return len(pool), lambda idx, rngs: objectives.with_prefix(causal_lm_windows(pool.rows(idx), ids.eos), rngs,
                                                                   data.prefix_fraction)
    return make


def _mlm_stream(data, tokens, start, stop, seq_len, ids):
    stride = seq_len - MLM_SPECIAL_TOKENS
    chunks = DocumentChunks(WindowPool(tokens, start, stop, stride, stride), ids.eos)
    return len(chunks), lambda idx, rngs: objectives.bert_mlm_nsp(chunks, idx, rngs, seq_len, ids,
                                                                    data.mlm_probability)


def _span_stream(data, tokens, start, stop, seq_len, ids):
    pool = WindowPool(tokens, start, stop, seq_len, seq_len)
    return len(pool), lambda idx, rngs: objectives.span_corruption(pool.rows(idx), rngs, ids, data.noise_density,
                                                                   data.mean_span_length)


# the batches objectives make, by their keys (data/objectives.py builds them)
BATCH_KINDS = {
    "decoder": ("tokens", "targets", "segment_ids", "loss_mask"),  # + prefix_lengths for prefix LM
    "mlm_nsp": ("tokens", "token_type_ids", "padding_mask", "mlm_targets", "mlm_mask", "nsp_labels"),
    "classify": ("tokens", "token_type_ids", "padding_mask", "labels"),
    "seq2seq": ("src", "src_padding_mask", "tgt_in", "tgt", "tgt_mask"),
}
_LM = (Term("lm", "loss_mask"),)
_SEQ2SEQ = (Term("lm", "tgt_mask"),)
_TEXT = (("text", "text_field"),)

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("causal_lm", ("gpt",), _LM, _TEXT, _lm_pool(prefix=False), _lm_stream(prefix=False),
              prompt_key="tokens"),
    Objective("prefix_lm", ("gpt",), _LM, _TEXT, _lm_pool(prefix=True), _lm_stream(prefix=True), prompt_key="tokens"),
    Objective("mlm", ("bert",), (Term("mlm", "mlm_mask"), Term("nsp", "nsp_labels", per_example=True)), _TEXT,
              _mlm_pool, _mlm_stream, min_seq_len=MLM_MIN_CHUNK + MLM_SPECIAL_TOKENS, batch_kind="mlm_nsp"),
    Objective("span_corruption", ("encoder_decoder",), _SEQ2SEQ, _TEXT, _span_pool, _span_stream, prompt_key="src",
              batch_kind="seq2seq"),
    Objective("seq2seq", ("encoder_decoder",), _SEQ2SEQ, (("text", "source_field"), ("target", "target_field")),
              _seq2seq_pool, batch_kind="seq2seq"),
    # fine-tuning: a SequenceClassifier over this backbone
    Objective("classify", ("bert", "gpt"), (Term("classify", "labels", per_example=True),),
              (("text", "text_field"), ("pair", "text_pair_field"), ("label", "label_field")), _classify_pool,
              min_seq_len=4, batch_kind="classify"),
)}


def get_objective(name: str) -> Objective:
    """The registered objective ``name``; `ValueError` listing the choices otherwise."""
    if name not in OBJECTIVES:
        raise ValueError(f"data.objective must be one of {list(OBJECTIVES)}, got {name!r}")
    return OBJECTIVES[name]


def term_weights(objective: Objective, batch: dict) -> dict:
    """``{term: weight}`` of one batch (a dict of ``[b, ...]`` arrays): scored positions (the sum of a ``[b, l]``
    mask) or examples (``b``), from the batch alone; scalars. Works on NumPy and JAX arrays alike."""
    return {t.name: (np.float32(batch[t.weight_key].shape[0]) if t.per_example else batch[t.weight_key].sum())
            for t in objective.terms}
