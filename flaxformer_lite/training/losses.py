"""Token losses as sums (so that they add up across micro-batches and devices): cross-entropy with label smoothing
and an optional z-loss (PaLM), computed in float32.

Shape key: b batch, l length, v vocab.
"""
from __future__ import annotations

import functools

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


def _xent_chunk(h, emb, targets, weights, label_smoothing, z_loss, with_grad: bool):
    """One token chunk: sums and, if asked, d(loss)/d(logits) folded into d(hidden) and d(embedding). The matmuls
    run in the hidden states' dtype (bf16 compute: bf16 operands) and accumulate in float32."""
    emb = emb.astype(h.dtype)  # float32 params under bf16 compute would promote the largest matmul to float32
    logits = jnp.einsum("ne,ve->nv", h, emb, preferred_element_type=jnp.float32)
    top = jax.lax.stop_gradient(logits.max(-1))
    exp = jnp.exp(logits - top[:, None])
    total = exp.sum(-1)
    lse = top + jnp.log(total)
    target_logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    nll = lse - target_logit
    loss = (1.0 - label_smoothing) * nll + label_smoothing * (lse - logits.mean(-1)) if label_smoothing else nll
    if z_loss:
        loss = loss + z_loss * lse ** 2
    sums = {"loss": jnp.sum(loss * weights), "nll": jnp.sum(nll * weights),
            "correct": jnp.sum((target_logit >= top).astype(jnp.float32) * weights)}
    if not with_grad:
        return sums, None
    probs = exp / total[:, None]
    dlogits = probs * (1.0 + 2.0 * z_loss * lse[:, None]) if z_loss else probs
    dlogits = dlogits - label_smoothing / logits.shape[-1] if label_smoothing else dlogits
    onehot = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32) * (1.0 - label_smoothing)
    dlogits = ((dlogits - onehot) * weights[:, None]).astype(h.dtype)
    dh = jnp.einsum("nv,ve->ne", dlogits, emb, preferred_element_type=jnp.float32)
    demb = jnp.einsum("nv,ne->ve", dlogits, h, preferred_element_type=jnp.float32)
    return sums, (dh, demb)


def _chunked(h, emb, targets, weights, label_smoothing, z_loss, chunk, with_grad):
    n = h.shape[0]
    chunk = min(chunk, n)
    pad = -n % chunk
    if pad:
        h = jnp.pad(h, ((0, pad), (0, 0)))
        targets = jnp.pad(targets, (0, pad))
        weights = jnp.pad(weights, (0, pad))
    parts = lambda x: x.reshape((-1, chunk) + x.shape[1:])

    def body(demb, xs):
        sums, grads = _xent_chunk(*xs[:1], emb, *xs[1:], label_smoothing, z_loss, with_grad)
        if not with_grad:
            return demb, (sums, None)
        return demb + grads[1], (sums, grads[0])

    demb0 = jnp.zeros(emb.shape, jnp.float32) if with_grad else None
    demb, (sums, dh) = jax.lax.scan(body, demb0, (parts(h), parts(targets), parts(weights.astype(jnp.float32))))
    sums = jax.tree_util.tree_map(lambda x: x.sum(), sums)
    if with_grad:
        dh = dh.reshape(-1, h.shape[-1])[:n]
    return sums, dh, demb


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def lm_head_xent_sums(hidden, embedding, targets, weights, label_smoothing=0.0, z_loss=0.0, chunk=512):
    """Cross-entropy of ``logits = hidden @ embedding.T`` without materialising the logits: ``hidden [n, e]``,
    ``embedding [v, e]`` (the tied embedding, or the output kernel transposed), int ``targets [n]``,
    ``weights [n]`` -> the sums of `cross_entropy_sums`.

    Tokens go through in chunks of ``chunk``. Under differentiation the forward pass also forms each chunk's
    ``dlogits`` and folds it into the gradients of ``hidden`` and ``embedding``, so the backward pass only scales
    them: no ``[n, v]`` logits or their transposed gradient are ever stored. Only ``loss`` carries a gradient
    (``nll`` and ``correct`` are metrics)."""
    return _chunked(hidden, embedding, targets, weights, label_smoothing, z_loss, chunk, False)[0]


def _xent_fwd(hidden, embedding, targets, weights, label_smoothing, z_loss, chunk):
    sums, dh, demb = _chunked(hidden, embedding, targets, weights, label_smoothing, z_loss, chunk, True)
    return sums, (dh.astype(hidden.dtype), demb.astype(embedding.dtype))


def _xent_bwd(label_smoothing, z_loss, chunk, res, g):
    dh, demb = res
    scale = g["loss"]
    return (dh * scale.astype(dh.dtype)), (demb * scale.astype(demb.dtype)), None, None


lm_head_xent_sums.defvjp(_xent_fwd, _xent_bwd)
