"""How each objective feeds a model and scores it. A `Task` is generic over the model: it only calls
``model.apply`` with the batch keys its objective produces (data/objectives.py).

Losses are sums over tokens divided by the global number of scored tokens (``weights``, computed from the batch
alone), so micro-batches and devices add up to the same gradient as one big batch.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from .losses import cross_entropy_sums, lm_head_xent_sums

MODEL_FOR_OBJECTIVE = {"causal_lm": ("gpt",), "prefix_lm": ("gpt",), "mlm": ("bert",),
                       "span_corruption": ("encoder_decoder",), "seq2seq": ("encoder_decoder",),
                       "classify": ("bert", "gpt")}  # classify: a SequenceClassifier over this backbone


@dataclasses.dataclass(frozen=True)
class Task:
    """One objective's loss. Attributes: objective, model (a Linen module), label_smoothing, z_loss."""

    objective: str
    model: Any
    label_smoothing: float = 0.0
    z_loss: float = 0.0

    def weights(self, batch) -> dict[str, jax.Array]:
        """Scored positions per loss term (from masks only; no parameters)."""
        if self.objective in ("causal_lm", "prefix_lm"):
            return {"lm": jnp.sum(batch["loss_mask"])}
        if self.objective == "mlm":
            return {"mlm": jnp.sum(batch["mlm_mask"]), "nsp": jnp.asarray(batch["nsp_labels"].shape[0], jnp.float32)}
        if self.objective == "classify":
            return {"classify": jnp.asarray(batch["labels"].shape[0], jnp.float32)}
        return {"lm": jnp.sum(batch["tgt_mask"])}

    def sums(self, params, batch, rng, train: bool) -> dict[str, dict[str, jax.Array]]:
        """Per term: ``{"loss", "nll", "correct"}`` sums."""
        apply = lambda *args, **kw: self.model.apply({"params": params}, *args, deterministic=not train,
                                                     rngs={"dropout": rng}, **kw)
        xent = lambda logits, targets, w: cross_entropy_sums(logits, targets, w, label_smoothing=self.label_smoothing,
                                                             z_loss=self.z_loss)
        if self.objective in ("causal_lm", "prefix_lm"):
            # The loss over the vocabulary is fused with the output projection (no [tokens, vocab] logits).
            hidden, emb = apply(batch["tokens"], segment_ids=batch["segment_ids"],
                                prefix_lengths=batch.get("prefix_lengths"),
                                method=lambda m, *a, **k: (m.hidden(*a, **k), m.output_embedding()))
            e = hidden.shape[-1]
            return {"lm": lm_head_xent_sums(hidden.reshape(-1, e), emb, batch["targets"].reshape(-1),
                                            batch["loss_mask"].reshape(-1), self.label_smoothing, self.z_loss)}
        if self.objective == "mlm":
            out = apply(batch["tokens"], token_type_ids=batch["token_type_ids"], padding_mask=batch["padding_mask"])
            return {"mlm": xent(out.mlm_logits, batch["mlm_targets"], batch["mlm_mask"]),
                    "nsp": xent(out.nsp_logits, batch["nsp_labels"], jnp.ones_like(batch["nsp_labels"], jnp.float32))}
        if self.objective == "classify":
            logits = apply(batch["tokens"], token_type_ids=batch["token_type_ids"], padding_mask=batch["padding_mask"])
            return {"classify": xent(logits, batch["labels"], jnp.ones_like(batch["labels"], jnp.float32))}
        logits = apply(batch["src"], batch["tgt_in"], src_padding_mask=batch["src_padding_mask"],
                       tgt_padding_mask=batch["tgt_mask"] > 0)
        return {"lm": xent(logits, batch["tgt"], batch["tgt_mask"])}

    def init_params(self, rng, batch):
        """The model's (boxed, logically named) params, shaped by one batch."""
        if self.objective in ("causal_lm", "prefix_lm"):
            variables = self.model.init(rng, batch["tokens"], segment_ids=batch["segment_ids"],
                                        prefix_lengths=batch.get("prefix_lengths"))
        elif self.objective in ("mlm", "classify"):
            variables = self.model.init(rng, batch["tokens"], token_type_ids=batch["token_type_ids"],
                                        padding_mask=batch["padding_mask"])
        else:
            variables = self.model.init(rng, batch["src"], batch["tgt_in"], src_padding_mask=batch["src_padding_mask"])
        return variables["params"]

    def loss(self, params, batch, rng, train: bool, weights: dict[str, jax.Array]):
        """``(sum over terms of loss_sum / weight, per-term sums)`` for `jax.value_and_grad(..., has_aux=True)`."""
        sums = self.sums(params, batch, rng, train)
        total = sum(s["loss"] / jnp.maximum(weights[name], 1.0) for name, s in sums.items())
        return total, sums


def make_task(objective: str, model, model_kind: str, *, label_smoothing: float = 0.0, z_loss: float = 0.0) -> Task:
    """The task for ``objective``; raises `ValueError` if the model kind cannot learn it."""
    want = MODEL_FOR_OBJECTIVE.get(objective)
    if want is None:
        raise ValueError(f"data.objective must be one of {sorted(MODEL_FOR_OBJECTIVE)}, got {objective!r}")
    if model_kind not in want:
        raise ValueError(f"data.objective={objective!r} trains a model.model in {list(want)}, but the config builds "
                         f"{model_kind!r}; pick a {want[0]} preset (model.preset=...)")
    return Task(objective, model, label_smoothing, z_loss)
