"""Token losses as sums (so that they add up across micro-batches and devices): cross-entropy with label smoothing
and an optional z-loss (PaLM), computed in float32.

Shape key: b batch, l length, v vocab.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array, *, label_smoothing: float = 0.0,
                       z_loss: float = 0.0) -> dict[str, jax.Array]:
    """``logits [..., v]``, int ``targets [...]``, ``weights [...]`` -> sums over weighted positions:
    ``loss`` (the training objective), ``nll`` (plain negative log-likelihood, for perplexity) and ``correct``."""
    logits = logits.astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    top = jax.lax.stop_gradient(logits.max(-1))
    lse = top + jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1))
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    logp_target = target_logit - lse
    nll = -logp_target
    loss = nll
    if label_smoothing:
        loss = (1.0 - label_smoothing) * nll + label_smoothing * (lse - logits.mean(-1))
    if z_loss:
        loss = loss + z_loss * lse ** 2
    correct = (target_logit >= top).astype(jnp.float32)  # reuses the max: no extra pass over the vocabulary
    return {"loss": jnp.sum(loss * weights), "nll": jnp.sum(nll * weights), "correct": jnp.sum(correct * weights)}
