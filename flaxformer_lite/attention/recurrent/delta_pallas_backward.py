"""The backward kernels of `delta_pallas`: the queries' share in parallel, a walk carrying the state's cotangent, the
blocks' systems' share in parallel.

Per block, with the forward's ``T``, ``W``, ``U``, the state ``S0`` entering the block, ``dS1`` the cotangent of
the one leaving it, ``M_g = Q_g K^T * D`` for each query head g of the kv head and the factors of
`chunk_tiles.block_step` (``g`` read, ``a`` add, ``keep``)::

    dU  = sum_g M_g^T dO_g + (a K) dS1
    dS0 = sum_g (g Q_g)^T dO_g + keep dS1 - W^T dU                          (carried to the block before)

Only these two lines are sequential (`backward_states_kernel`); their sums over query heads are computed before,
per query head and block (`backward_queries_kernel`, which also gives ``dq`` and the queries' share of ``dk``).
Through ``U = T (beta V) - T (beta g K) S0`` and ``T = (I + A)^-1``, ``dA = -T^T (dU (beta V)^T - dU S0^T
(beta g K)^T) T^T`` on the strict lower triangle, which gives the rest of ``dk`` and ``dv``, ``dbeta``
(`backward_blocks_kernel`). The decay's gradient collects ``d log`` of every decay factor (pairs, g, a, keep) and
sums it back over the positions each factor spans; the kernels each add their share.

Shape key: l the padded length, d head dim, bv value tile, c block length.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .delta_pallas_kernels import gate_refs
from ..pallas import dot
from .chunk_tiles import block_step, carried_run, scale, scale_rows, triangle


def _step(refs: list, c: int, decayed: bool, segmented: bool):
    """The `Step` of a program's block on a grid over blocks, its gate refs popped off ``refs``."""
    decay_ref, run_ref, previous_ref = gate_refs(refs, decayed, segmented, previous=True)
    carried = carried_run(previous_ref) if segmented else jnp.int32(-1)
    return block_step(pl.ds(0, c), c, decay_ref, run_ref, carried)


def _decay_grad(dpair, pair, d_cum, d_total, c: int) -> jax.Array:
    """``[c]``: the log decay's gradient from that of each pair's decay ``dpair [c(r), c(i)]`` (``exp(A_r - A_i)``),
    more of each ``A_r`` (``d_cum [c]``) and of ``A_last`` (``d_total``), ``A_r`` being the log decay summed from
    the block's start to r."""
    d_cum = jnp.sum(dpair * pair, axis=1) - jnp.sum(dpair * pair, axis=0) + d_cum
    lower = triangle(c)  # position j's log decay is in every A_r with r >= j
    grad = jnp.sum(jnp.where(lower, jnp.broadcast_to(d_cum[:, None], (c, c)), 0.0), axis=0)
    return grad if d_total is None else grad + d_total


def backward_queries_kernel(q_ref, k_ref, u_ref, s_ref, dout_ref, *refs, c: int, decayed: bool, segmented: bool):
    """One (block, batch row, query head, value tile): ``q [c, d]``, ``k [c, d]``, ``U [c, bv]``, the state entering
    the block ``[d, bv]``, ``dO [c, bv]``, then the gates as in `output_kernel` -> ``dq [c, d]`` and the queries'
    share of ``dk [c, d]`` (this value tile's), ``M^T dO [c, bv]``, ``(g Q)^T dO [d, bv]`` (summed over the
    group outside), and with a decay this query head's share of its gradient ``[c]``."""
    refs = list(refs)
    step = _step(refs, c, decayed, segmented)
    dq_ref, dk_ref, p_ref, r_ref = refs[:4]
    q, k, do, s0 = q_ref[...], k_ref[...], dout_ref[...], s_ref[...]
    qk = dot(q, k, trans_b=True)
    dm = dot(do, u_ref[...], trans_b=True)  # [c(r), c(i)]: dO U^T
    dscores = dm * step.pair
    d_in = dot(do, s0, trans_b=True)  # [c, d]: dO S0^T
    dq_ref[...] = dot(dscores, k) + scale_rows(d_in, step.read)
    dk_ref[...] = dot(dscores, q, trans_a=True)
    p_ref[...] = dot(qk * step.pair, do, trans_a=True)
    r_ref[...] = dot(scale_rows(q, step.read), do, trans_a=True)
    if decayed:
        d_read = jnp.sum(q * d_in, axis=1) * step.read
        refs[4][...] = _decay_grad(dm * qk, step.pair, d_read, None, c)


def backward_states_kernel(p_ref, r_ref, ka_ref, w_ref, *refs, c: int, gated: bool):
    """One (batch row, kv head, value tile), the blocks from the last: ``sum_g M_g^T dO_g [l, bv]``, ``sum_g (g
    Q_g)^T dO_g [blocks, d, bv]``, ``a K [l, d]`` (K without gates), ``W [l, d]``, with gates ``keep [l]``, and the
    final state's cotangent ``[d, bv]`` -> the cotangents of the state leaving each block ``[blocks, d, bv]`` and
    ``dU [l, bv]``."""
    refs = list(refs)
    keep_ref = refs.pop(0) if gated else None
    dfinal_ref, leaving_ref, du_ref = refs
    blocks = w_ref.shape[0] // c

    def body(t, ds):  # ds [d, bv] float32: the cotangent of the state leaving block i
        i = blocks - 1 - t
        rows = pl.ds(pl.multiple_of(i * c, c), c)
        leaving_ref[i] = ds
        du = p_ref[rows, :] + dot(ka_ref[rows, :], ds)
        du_ref[rows, :] = du
        keep = jnp.max(keep_ref[rows]) if gated else None  # one value repeated over the block
        return r_ref[i] + scale(ds, keep) - dot(w_ref[rows, :], du, trans_a=True)

    lax.fori_loop(0, blocks, body, dfinal_ref[...])


def backward_blocks_kernel(k_ref, v_ref, beta_ref, t_ref, u_ref, s_ref, ds_ref, du_ref, *refs, c: int,
                            decayed: bool, segmented: bool):
    """One (block, batch row, kv head, value tile): ``k [c, d]``, ``v [c, bv]``, ``beta [c]``, ``T [c, c]``,
    ``U [c, bv]``, the state entering the block and the cotangent of the one leaving it ``[d, bv]``, ``dU [c, bv]``,
    then the gates as in `output_kernel` -> the blocks' share of ``dk [c, d]``, ``dv [c, bv]``, and shares of
    ``dbeta [c]`` and (with a decay) the decay's gradient ``[c]`` (this value tile's)."""
    refs = list(refs)
    step = _step(refs, c, decayed, segmented)
    dk_ref, dv_ref, dbeta_ref = refs[:3]
    k, v, beta, t, s0, ds, du = (ref[...] for ref in (k_ref, v_ref, beta_ref, t_ref, s_ref, ds_ref, du_ref))
    strict = ~triangle(c, upper=True)
    read = jnp.ones((c,), jnp.float32) if step.read is None else step.read
    d_out_k = dot(u_ref[...], ds, trans_b=True)  # [c, d]: U dS1^T
    du_s0 = dot(du, s0, trans_b=True)  # [c, d]: -dW
    dx = dot(t, du, trans_a=True)  # [c, bv]: T^T dU
    dy = -dot(t, du_s0, trans_a=True)  # [c, d]: T^T dW
    d_t = dot(du, scale_rows(v, beta), trans_b=True) - dot(du_s0, scale_rows(k, beta * read), trans_b=True)
    d_a = -jnp.where(strict, dot(dot(t, d_t, trans_a=True), t, trans_b=True), 0.0)
    kk = dot(k, k, trans_b=True)
    strict_pair = jnp.where(strict, step.pair, 0.0)
    d_kk = d_a * beta[:, None] * strict_pair
    dk_ref[...] = scale_rows(d_out_k, step.add) + dot(d_kk + jnp.transpose(d_kk), k) + scale_rows(dy, beta * read)
    dv_ref[...] = scale_rows(dx, beta)
    k_dy = jnp.sum(k * dy, axis=1)
    dbeta_ref[...] = jnp.sum(d_a * kk * strict_pair, axis=1) + jnp.sum(v * dx, axis=1) + read * k_dy
    if decayed:
        d_add = jnp.sum(k * d_out_k, axis=1) * step.add
        d_total = jnp.sum(d_add) + jnp.sum(s0 * ds) * step.keep
        refs[3][...] = _decay_grad(jnp.where(strict, d_a * beta[:, None] * kk, 0.0), step.pair,
                                   beta * k_dy * step.read - d_add, d_total, c)
