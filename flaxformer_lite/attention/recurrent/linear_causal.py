"""Causal linear attention in block-parallel form (the "chunk" form of flash-linear-attention), with decay gates.

For a row i and the keys j <= i of its segment::

    num_i = sum_j D_ij w_j phi(q_i).phi(k_j) v_j        den_i = sum_j D_ij w_j phi(q_i).phi(k_j)

with ``w_j = exp(ka_j)`` the key's log-scale (FAVOR+, -inf for padding) and ``D_ij = exp(sum_{t=j+1..i} a_t)`` the
decay between j and i (``a = log_decay <= 0``; D = 1 without gates). The sequence is cut into blocks of c
positions. Everything but one cheap pass runs for all blocks at once as batched matmuls:

1. inside each block, the quadratic form ``(Q K^T * mask * decay) V``;
2. each block's own state ``K^T V`` (keys of the block's last segment, decayed to the block's end);
3. the states entering each block, by a `lax.scan` over blocks of one multiply-add on ``[b, n, f, v]``;
4. the inter-block term ``Q S_in`` for all blocks.

Cumulative decays are summed inside a block only (at most c terms), so long sequences stay finite and exact. With
key log-scales (FAVOR+), every sum is kept relative to a log-scale: a row's is the largest log-weight among the keys
it sees, as online softmax does, so no key it cannot see changes its output. Without them (elu, relu) weights are at
most 1 (0/1 masks times decays <= 1), and the sums are plain: no running maximum is taken. (A row whose every visible
key has decayed below float32's range, e^-87, then reads 0; a row always sees its own key unless padding hides it.)
Matmul operands are in the input dtype (bf16 stays bf16), and every product accumulates in float32.

Shape key: b batch, l length, n kv heads, g = h // n, f features, v value dim, m blocks, c block length.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .common import from_spans, plan_spans, scan_spans, to_spans

FLOOR = -1e30  # finite floor for running log-scales: exp(floor - floor) = 1, exp(-inf - floor) = 0


def causal_sums(qf, kf, ka, v, q_seg, kv_seg, log_decay, block: int, *, strict: bool = False, dtype=jnp.float32,
                span: int | None = None, decay_grad_by_identity: bool = False):
    """Sums over keys ``j <= i`` (``j < i`` if ``strict``) in the same segment, decayed by ``log_decay``.

    Args:
      qf: query features ``[b, l, n, g, f]``; kf: key features ``[b, l, n, f]``; v: values ``[b, l, n, v]``.
      ka: key log-scales ``[b, l, n]`` (-inf: the key is hidden) or None (all 0).
      q_seg, kv_seg: segment ids ``[b, l]`` (contiguous runs; the state restarts where they change) or None.
      log_decay: ``[b, l, n]`` log of the decay applied to the state at each position, or None.
      block: block length c.
      strict: exclude the diagonal (the reverse pass of non-causal segments).
      dtype: matmul operand dtype (products accumulate in float32).
      span: blocks computed together; spans follow one another in a `lax.scan` carrying the state. Default
        `blocks_per_span`: all blocks at once on accelerators; on CPU as many as keep the span's block states in
        cache (at 16k tokens, 8 blocks at a time take 0.65x the time of all 256).
      decay_grad_by_identity: differentiate ``log_decay`` by `_decayed`'s identity instead of through every
        block's decay matrix: for data-dependent decays (1.29x the ungated fwd+bwd time at 16k on CPU, against
        1.36x); a fixed decay, which needs no gradient, runs faster without it (1.03x).

    Returns:
      ``num [b, l, n, g, v]``, ``den [b, l, n, g]`` float32, relative to ``scale [b, l, n]`` (None: 0).
    """
    if log_decay is None or not decay_grad_by_identity:
        return _sums(qf, kf, ka, v, q_seg, kv_seg, log_decay, block, strict, dtype, span)
    return _decayed((block, strict, jnp.dtype(dtype), span), qf, kf, ka, v, q_seg, kv_seg, log_decay)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _decayed(static, qf, kf, ka, v, q_seg, kv_seg, log_decay):
    """`_sums` with a decay, whose gradient is read off the others' (flash-linear-attention's identity): with
    ``A`` the cumulative log decay, ``dL/dA_t = qf_t . dL/dqf_t - kf_t . dL/dkf_t`` (row t's sums minus key t's
    contributions), and ``dL/dlog_decay_s = sum_{t >= s} dL/dA_t``. This spares the backward pass the gradient of
    every block's ``[c, c]`` decay matrix."""
    return _sums(qf, kf, ka, v, q_seg, kv_seg, log_decay, *static)


def _decayed_fwd(static, qf, kf, ka, v, q_seg, kv_seg, log_decay):
    out, pullback = jax.vjp(lambda qf, kf, ka, v: _sums(qf, kf, ka, v, q_seg, kv_seg, log_decay, *static),
                            qf, kf, ka, v)
    return out, (pullback, qf, kf)


def _decayed_bwd(static, residuals, cotangents):
    pullback, qf, kf = residuals
    dqf, dkf, dka, dv = pullback(cotangents)
    return dqf, dkf, dka, dv, None, None, decay_grad(qf, kf, dqf, dkf)


_decayed.defvjp(_decayed_fwd, _decayed_bwd)


def decay_grad(qf: jax.Array, kf: jax.Array, dqf: jax.Array, dkf: jax.Array) -> jax.Array:
    """The gradient of the log decay ``[b, l, n]`` float32 read off those of the features (flash-linear-attention's
    identity, see `_decayed`): ``qf [b, l, n, g, f]``, ``kf [b, l, n, f]`` and their gradients ``dqf``, ``dkf``."""
    da = (jnp.einsum("blngf,blngf->bln", qf, dqf.astype(qf.dtype), preferred_element_type=jnp.float32)
          - jnp.einsum("blnf,blnf->bln", kf, dkf.astype(kf.dtype), preferred_element_type=jnp.float32))
    return lax.cumsum(da, 1, reverse=True)


def _sums(qf, kf, ka, v, q_seg, kv_seg, log_decay, block: int, strict: bool, dtype, span: int | None):
    """`causal_sums` without the custom gradient of ``log_decay``."""
    b, l, n, g, f = qf.shape
    plan = plan_spans(l, min(block, l), 4 * b * n * f * v.shape[-1], span)
    scaled = ka is not None
    xs = dict(q=to_spans(qf.astype(dtype), plan, heads=True), k=to_spans(kf.astype(dtype), plan, heads=True),
              v=to_spans(v.astype(dtype), plan, heads=True))
    if q_seg is not None:  # padded rows and keys get ids of their own
        xs.update(qs=to_spans(q_seg.astype(jnp.int32), plan, -1), ks=to_spans(kv_seg.astype(jnp.int32), plan, -2))
    if scaled:
        xs["ka"] = to_spans(ka, plan, -jnp.inf, heads=True)
    if log_decay is not None:
        xs["decay"] = to_spans(log_decay.astype(jnp.float32), plan, heads=True)
    init = _State(jnp.zeros((b, n, f, v.shape[-1]), jnp.float32), jnp.zeros((b, n, f), jnp.float32),
                  jnp.full((b, n), FLOOR, jnp.float32), jnp.full((b,), -3, jnp.int32))
    outs = scan_spans(lambda state, x: _span(state, x, strict=strict, scaled=scaled), init, xs)[1]
    return tuple(None if x is None else from_spans(x, plan) for x in outs)


class _State(NamedTuple):
    """The running sums entering a span of blocks: ``state [b, n, f, v]``, ``norm [b, n, f]``, both relative to
    ``scale [b, n]``, and ``segment [b]``, the segment they belong to (-3: none)."""

    state: jax.Array
    norm: jax.Array
    scale: jax.Array
    segment: jax.Array


def _span(entering: _State, x: dict, *, strict: bool, scaled: bool):
    """One span of blocks ``x`` (``q [b, n, m, c, g, f]``, ``k [b, n, m, c, f]``, ``v [b, n, m, c, v]``, optional
    ``qs``/``ks [b, m, c]``, ``ka``/``decay [b, n, m, c]``) from the running sums ``entering``: the sums leaving
    it, and its rows' ``(num, den, scale or None)``."""
    qc, kc, vc = x["q"], x["k"], x["v"]
    b, n, m, c = kc.shape[:4]
    visible, keep, segment, carried, in_last = _segments(entering, x, (b, m, c), strict)
    scores = jnp.einsum("xnmqgf,xnmkf->xnmqgk", qc, kc, preferred_element_type=jnp.float32)
    # Per-key weights (decay to the block's end, log-scales, the last segment) go on the values and per-row factors
    # (the entering sums' decay and scale) on the outputs: both are narrower than FAVOR+'s features.
    if not scaled:  # weights are 0/1 times decays <= 1: plain sums, no log-scale needed
        key_w = None if in_last is None else jnp.broadcast_to(in_last, (b, n, m, c)).astype(jnp.float32)
        if "decay" in x:
            cum = jnp.cumsum(x["decay"], -1)  # [b, n, m, c]: log decay since the block's start
            pair = jnp.exp(jnp.where(visible[:, :, :, :, 0], cum[..., :, None] - cum[..., None, :], -jnp.inf))
            weights = scores * pair[:, :, :, :, None, :]
            to_end = jnp.exp(cum[..., -1:] - cum)
            key_w = to_end if key_w is None else key_w * to_end
            row_w, block_decay = jnp.exp(cum), cum[..., -1]
        else:
            weights = jnp.where(visible, scores, 0.0)
            row_w, block_decay = None, None
        own = _own_sums(kc, vc, key_w, None, block_decay)
        leaving, (s_in, z_in, _) = _chain(entering, own, keep, segment)
        if in_last is not None:
            row_w = jnp.where(carried, 1.0 if row_w is None else row_w, 0.0)
        row_scale = None
    else:
        ka = x["ka"]  # [b, n, m, c]
        cum = jnp.cumsum(x["decay"], -1) if "decay" in x else jnp.zeros_like(ka)  # log decay since block start
        logw = jnp.where(visible[:, :, :, :, 0], cum[..., :, None] + (ka - cum)[..., None, :], -jnp.inf)
        to_end = ka + cum[..., -1:] - cum  # a key's log-weight at its block's end
        if in_last is not None:
            to_end = jnp.where(in_last, to_end, -jnp.inf)
        own_scale = lax.stop_gradient(jnp.maximum(to_end.max(-1), FLOOR))  # [b, n, m]
        own = _own_sums(kc, vc, jnp.exp(to_end - own_scale[..., None]), own_scale, cum[..., -1])
        leaving, (s_in, z_in, c_in) = _chain(entering, own, keep, segment)
        from_state = jnp.where(carried, c_in[..., None] + cum, -jnp.inf)  # [b, n, m, c]
        row_scale = lax.stop_gradient(jnp.maximum(jnp.maximum(logw.max(-1), from_state), FLOOR))
        weights = scores * jnp.exp(logw - row_scale[..., None])[:, :, :, :, None, :]
        row_w = jnp.exp(from_state - row_scale)

    num = jnp.einsum("xnmqgf,xnmfv->xnmqgv", qc, s_in.astype(qc.dtype), preferred_element_type=jnp.float32)
    den = jnp.einsum("xnmqgf,xnmf->xnmqg", qc, z_in.astype(qc.dtype), preferred_element_type=jnp.float32)
    if row_w is not None:
        num, den = num * row_w[..., None, None], den * row_w[..., None]
    num = num + jnp.einsum("xnmqgk,xnmkv->xnmqgv", weights.astype(vc.dtype), vc, preferred_element_type=jnp.float32)
    return leaving, (num, den + weights.sum(-1), row_scale)


def _segments(entering: _State, x: dict, shape: tuple, strict: bool):
    """The segment structure of a span of ``shape`` ``(b, m, c)``: ``visible [b, 1, m, c(q), 1, c(k)]`` (the pairs of
    a block that interact), ``keep [b, m]`` (the sums leaving each block keep the entering ones; None: always),
    the ``segment [b]`` of the sums leaving the span, ``carried [b, 1, m, c]`` (rows that read the entering sums)
    and ``in_last [b, 1, m, c]`` (keys in the sums leaving their block; None: all)."""
    b, m, c = shape
    visible = jnp.tril(jnp.ones((c, c), bool), -1 if strict else 0)
    # The sums leaving block i belong to the segment of its last key; a row reads the sums entering its block iff it
    # is in their segment, and the sums leaving block i keep the entering ones iff both have one segment.
    if "qs" in x:
        qs, ks = x["qs"], x["ks"]
        visible = visible & (qs[..., :, None] == ks[..., None, :])  # [b, m, c(q), c(k)]
        last = ks[..., -1]  # [b, m]
        before = jnp.concatenate([entering.segment[:, None], last[:, :-1]], 1)
        keep, segment = last == before, last[:, -1]
        carried = (qs == before[..., None])[:, None]  # [b, 1, m, c]
        in_last = (ks == last[..., None])[:, None]  # [b, 1, m, c]
    else:  # one segment: the first block's entering sums are zero, so keeping them is harmless
        keep, segment = None, entering.segment
        carried = jnp.ones((b, 1, m, c), bool)
        in_last = None
    visible = jnp.broadcast_to(visible, (b, m, c, c))[:, None, :, :, None, :]  # [b, 1, m, q, 1, k]
    return visible, keep, segment, carried, in_last


def _own_sums(kc, vc, key_w, scale, decay) -> "_Own":
    """Each block's own sums from its keys ``kc [b, n, m, c, f]``, values ``vc [b, n, m, c, v]`` and per-key weights
    ``key_w [b, n, m, c]`` (None: 1), with their ``scale`` and the block's total log ``decay`` (None: 0)."""
    vw = vc if key_w is None else vc * key_w[..., None].astype(vc.dtype)
    norm = (kc.astype(jnp.float32).sum(3) if key_w is None
            else jnp.einsum("xnmkf,xnmk->xnmf", kc, key_w.astype(kc.dtype), preferred_element_type=jnp.float32))
    return _Own(jnp.einsum("xnmkf,xnmkv->xnmfv", kc, vw, preferred_element_type=jnp.float32), norm, scale, decay)


class _Own(NamedTuple):
    """Each block's own contribution to the running sums: ``state [b, n, m, f, v]``, ``norm [b, n, m, f]``, their
    ``scale [b, n, m]`` and the block's total log ``decay [b, n, m]`` (None: 0)."""

    state: jax.Array
    norm: jax.Array
    scale: jax.Array | None
    decay: jax.Array | None


def _chain(entering: _State, own: _Own, keep, segment):
    """Running sums along the blocks of a span, by `lax.scan` over blocks: returns the sums leaving the span and
    those entering each block, ``(state [b, n, m, f, v], norm [b, n, m, f], scale [b, n, m])``. ``keep [b, m]``:
    False restarts the sums after the block's own keys; None keeps them all. Plain sums (no log-scales, decay or
    restarts) are an exclusive cumulative sum instead: 0.93x the fwd+bwd time of causal elu+1 at 16k on CPU."""
    b, n = own.state.shape[:2]
    m = own.state.shape[2]
    if keep is None and own.scale is None and own.decay is None:
        s_each = entering.state[:, :, None] + jnp.cumsum(own.state, 2) - own.state
        z_each = entering.norm[:, :, None] + jnp.cumsum(own.norm, 2) - own.norm
        leaving = _State(s_each[:, :, -1] + own.state[:, :, -1], z_each[:, :, -1] + own.norm[:, :, -1],
                         entering.scale, segment)
        return leaving, (s_each, z_each, jnp.broadcast_to(entering.scale[:, :, None], (b, n, m)))
    keep = jnp.ones((b, m), bool) if keep is None else keep
    scales = jnp.zeros((b, n, m), jnp.float32) if own.scale is None else own.scale
    decay = jnp.zeros((b, n, m), jnp.float32) if own.decay is None else own.decay

    def body(carry, xs):
        state, norm, scale = carry
        st, zt, own_scale, kp, dec = xs
        if own.scale is None:  # no log-scales: plain sums, decayed
            a = jnp.where(kp[:, None], 1.0 if own.decay is None else jnp.exp(dec), 0.0)
            new = (a[..., None, None] * state + st, a[..., None] * norm + zt, scale)
        else:
            old = jnp.where(kp[:, None], scale + dec, -jnp.inf)
            c = lax.stop_gradient(jnp.maximum(jnp.maximum(old, own_scale), FLOOR))
            a, w = jnp.exp(old - c), jnp.exp(own_scale - c)
            new = (a[..., None, None] * state + w[..., None, None] * st, a[..., None] * norm + w[..., None] * zt, c)
        return new, carry

    xs = (jnp.moveaxis(own.state, 2, 0), jnp.moveaxis(own.norm, 2, 0), jnp.moveaxis(scales, 2, 0), keep.T,
          jnp.moveaxis(decay, 2, 0))
    (state, norm, scale), entering_each = lax.scan(body, entering[:3], xs)
    return _State(state, norm, scale, segment), tuple(jnp.moveaxis(x, 0, 2) for x in entering_each)
