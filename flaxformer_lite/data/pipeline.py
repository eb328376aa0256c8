"""From a corpus to train/eval loaders for one objective. Knows no model; takes the data settings by field name
(a `config.DataConfig` or anything with the same fields).

Shape key: b batch, l ``seq_len``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from . import objectives
from .corpus import load_corpus
from .loader import Loader
from .packing import pack_documents
from .tokenizer import Tokenizer, train_tokenizer

OBJECTIVES = ("causal_lm", "prefix_lm", "mlm", "span_corruption", "seq2seq")


def special_ids(tok: Tokenizer) -> objectives.SpecialIds:
    """The ids objectives use, read off a tokenizer."""
    return objectives.SpecialIds(pad=tok.pad_id, bos=tok.bos_id, eos=tok.eos_id, mask=tok.mask_id, cls=tok.cls_id,
                                 sep=tok.sep_id, sentinels=tuple(tok.sentinel_ids), vocab_size=tok.vocab_size,
                                 special=frozenset(tok.special_ids))


def prepare_tokenizer(texts: list[str], data, run_dir: str | Path) -> Tokenizer:
    """``data.tokenizer`` if given; else the run folder's ``tokenizer.model`` (a resumed run); else train one on
    ``texts`` and save it there."""
    if data.tokenizer:
        return Tokenizer.load(data.tokenizer)
    path = Path(run_dir) / "tokenizer.model"
    if path.exists():
        return Tokenizer.load(path)
    tok = train_tokenizer(texts, vocab_size=data.vocab_size, model_type=data.tokenizer_type,
                          character_coverage=data.character_coverage, byte_fallback=data.byte_fallback,
                          normalization=data.normalization)
    tok.save(path)
    return tok


@dataclasses.dataclass
class Data:
    """What training needs from the data side."""

    tokenizer: Tokenizer
    train: Loader
    eval: Loader
    objective: str
    num_train_examples: int
    unigram_entropy: float  # nats per token of the training documents: the loss a model without context reaches


def split_documents(n: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/eval split of ``n`` documents: (train indices, eval indices), eval at least 1."""
    order = np.random.default_rng([seed, 7]).permutation(n)
    n_eval = max(1, int(round(n * eval_fraction))) if n > 1 else 0
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


def build_data(data, *, seq_len: int, batch_size: int, seed: int, run_dir: str | Path, process_index: int = 0,
               process_count: int = 1) -> Data:
    """Read the corpus, prepare the tokenizer, and make the train and eval loaders of ``data.objective``."""
    if data.objective not in OBJECTIVES:
        raise ValueError(f"data.objective must be one of {OBJECTIVES}, got {data.objective!r}")
    ds = load_corpus(data.path, data.format, data.text_field if data.objective != "seq2seq" else data.source_field)
    texts = list(ds["text"])
    tok = prepare_tokenizer(texts, data, run_dir)
    ids = special_ids(tok)
    train_idx, eval_idx = split_documents(len(texts), data.eval_fraction, seed)
    encoded = tok.encode_batch(texts)
    if data.objective == "seq2seq":
        if data.target_field not in ds.column_names:
            raise ValueError(f"data.target_field {data.target_field!r} is not a column; columns: {ds.column_names}")
        targets = tok.encode_batch(list(ds[data.target_field]))
        make = lambda idx: _seq2seq_pool([(encoded[i], targets[i]) for i in idx], seq_len, ids)
    else:
        make = lambda idx: _pool(data, [encoded[i] for i in idx], seq_len, ids)
    entropy = unigram_entropy([encoded[i] for i in train_idx], tok.vocab_size)
    loaders = []
    for idx, is_train in ((train_idx, True), (eval_idx, False)):
        size, make_batch = make(idx)
        loaders.append(Loader(size, batch_size, make_batch, seed=seed if is_train else seed + 1,
                              process_index=process_index, process_count=process_count, shuffle=is_train))
    return Data(tok, loaders[0], loaders[1], data.objective, loaders[0].num_examples, entropy)


def unigram_entropy(docs: list[list[int]], vocab_size: int) -> float:
    """Entropy (nats) of the token frequencies in ``docs``."""
    counts = np.bincount(np.concatenate([np.asarray(d, np.int64) for d in docs if len(d)]), minlength=vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _pool(data, docs: list[list[int]], seq_len: int, ids) -> tuple[int, callable]:
    """(number of examples, make_batch) for the text objectives."""
    if data.objective in ("causal_lm", "prefix_lm"):
        rows, segs = pack_documents(docs, seq_len + 1, ids.eos)
        if data.objective == "causal_lm":
            return len(rows), lambda idx, rngs: objectives.causal_lm(rows[idx], segs[idx])
        return len(rows), lambda idx, rngs: objectives.prefix_lm(rows[idx], segs[idx], rngs, data.prefix_fraction)
    if data.objective == "mlm":
        step = seq_len - 3
        chunks = [d[i:i + step] for d in docs for i in range(0, len(d), step) if len(d[i:i + step]) >= 8]
        return len(chunks), lambda idx, rngs: objectives.bert_mlm_nsp(chunks, idx, rngs, seq_len, ids,
                                                                        data.mlm_probability)
    rows, _ = pack_documents(docs, seq_len, ids.eos)
    return len(rows), lambda idx, rngs: objectives.span_corruption(rows[idx], rngs, ids, data.noise_density,
                                                                   data.mean_span_length)


def _seq2seq_pool(pairs, seq_len: int, ids) -> tuple[int, callable]:
    return len(pairs), lambda idx, rngs: objectives.seq2seq([pairs[i] for i in idx], seq_len, seq_len, ids)
