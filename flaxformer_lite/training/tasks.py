"""How each kind of batch feeds a model and scores it. A `Task` is generic over the model: it calls ``model.apply``
with the keys of its objective's batch kind (data/registry.py `BATCH_KINDS`) and returns per-term sums; which terms
there are and what weighs them is the objective's declaration in data/registry.py, the one place an objective is
declared.

Losses are sums over tokens divided by the global number of scored tokens (``weights``, computed from the batch
alone), so micro-batches and devices add up to the same gradient as one big batch.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ..data.registry import Objective, get_objective, term_weights
from .losses import cross_entropy_sums, lm_head_xent_sums


def _decoder_inputs(batch):
    return (batch["tokens"],), {"segment_ids": batch["segment_ids"], "prefix_lengths": batch.get("prefix_lengths")}


def _bert_inputs(batch):
    return (batch["tokens"],), {"token_type_ids": batch["token_type_ids"], "padding_mask": batch["padding_mask"]}


def _seq2seq_inputs(batch):
    return (batch["src"], batch["tgt_in"]), {"src_padding_mask": batch["src_padding_mask"],
                                             "tgt_padding_mask": batch["tgt_mask"] > 0}


def _lm_sums(task, apply, batch):
    """Decoder LM: the loss over the vocabulary fused with the output projection (no [tokens, vocab] logits)."""
    args, kwargs = _decoder_inputs(batch)
    hidden, emb = apply(*args, **kwargs, method=lambda m, *a, **k: (m.hidden(*a, **k), m.output_embedding()))
    e = hidden.shape[-1]
    return {"lm": lm_head_xent_sums(hidden.reshape(-1, e), emb, batch["targets"].reshape(-1),
                                    batch["loss_mask"].reshape(-1), task.label_smoothing, task.z_loss)}


def _mlm_sums(task, apply, batch):
    args, kwargs = _bert_inputs(batch)
    out = apply(*args, **kwargs)
    ones = jnp.ones_like(batch["nsp_labels"], jnp.float32)
    return {"mlm": task.xent(out.mlm_logits, batch["mlm_targets"], batch["mlm_mask"]),
            "nsp": task.xent(out.nsp_logits, batch["nsp_labels"], ones)}


def _classify_sums(task, apply, batch):
    args, kwargs = _bert_inputs(batch)
    logits = apply(*args, **kwargs)
    return {"classify": task.xent(logits, batch["labels"], jnp.ones_like(batch["labels"], jnp.float32))}


def _seq2seq_sums(task, apply, batch):
    args, kwargs = _seq2seq_inputs(batch)
    return {"lm": task.xent(apply(*args, **kwargs), batch["tgt"], batch["tgt_mask"])}


# batch kind (`data.registry.BATCH_KINDS`, declared by each objective) -> (the model inputs, the per-term sums)
FORWARD: dict[str, tuple[Callable, Callable]] = {
    "decoder": (_decoder_inputs, _lm_sums), "mlm_nsp": (_bert_inputs, _mlm_sums),
    "classify": (_bert_inputs, _classify_sums), "seq2seq": (_seq2seq_inputs, _seq2seq_sums),
}


@dataclasses.dataclass(frozen=True)
class Task:
    """One objective's loss. Attributes: objective (its registry entry), model (a Linen module), label_smoothing,
    z_loss."""

    objective: Objective
    model: Any
    label_smoothing: float = 0.0
    z_loss: float = 0.0

    def weights(self, batch) -> dict[str, jax.Array]:
        """Scored positions (or examples) per loss term, float32 scalars, from the batch's masks alone."""
        return {k: jnp.asarray(v, jnp.float32) for k, v in term_weights(self.objective, batch).items()}

    def sums(self, params, batch, rng, train: bool) -> dict[str, dict[str, jax.Array]]:
        """Per term: ``{"loss", "nll", "correct"}`` sums over the batch."""
        apply = lambda *args, **kw: self.model.apply({"params": params}, *args, deterministic=not train,
                                                     rngs={"dropout": rng}, **kw)
        return FORWARD[self.objective.batch_kind][1](self, apply, batch)

    def xent(self, logits, targets, weights) -> dict[str, jax.Array]:
        """`cross_entropy_sums` with this task's label smoothing and z-loss."""
        return cross_entropy_sums(logits, targets, weights, label_smoothing=self.label_smoothing, z_loss=self.z_loss)

    def init_params(self, rng, batch):
        """The model's (boxed, logically named) params, shaped by one batch."""
        args, kwargs = FORWARD[self.objective.batch_kind][0](batch)
        return self.model.init(rng, *args, **kwargs)["params"]


def make_task(objective: str, model, model_kind: str, *, label_smoothing: float = 0.0, z_loss: float = 0.0) -> Task:
    """The task for ``objective``; raises `ValueError` if the objective is unknown or the model kind cannot learn
    it."""
    spec = get_objective(objective)
    spec.check(model_kind=model_kind)
    return Task(spec, model, label_smoothing, z_loss)
