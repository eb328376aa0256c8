"""`pallas_delta`: the (gated) delta rule's chunk form as fused Pallas kernels, the state carried on chip.

The GPU counterpart of `delta._blocks`. One program per (batch row, query head, value tile) walks the sequence in
blocks of c positions with a `lax.fori_loop`, carrying the state ``S [d, bv]`` in float32 (the rule acts on each
value column alone, so value tiles are independent). Per block, with ``D_ri = exp(G_r - G_i)`` for keys i <= r of
row r's run (`pallas_tiles.block_step`), ``g_r = exp(G_r)`` where row r reads the entering state (0 elsewhere) and
``S0`` that state (see `delta` for the derivation)::

    T = (I + strict_tril(beta K K^T * D))^-1                  by forward substitution, one row at a time
    U = T (beta V) - T (beta g K) S0                            the pseudo-values
    O = g Q S0 + (tril(Q K^T) * D) U
    S_end = g_c S0 (0 if the block starts a new run) + (K * D_c.)^T U   (keys of the block's last run)

Inputs are unit q and k and float32 values, as `delta._blocks` takes them; everything is float32 (the system's
inverse is less forgiving than linear attention's sums).

The backward (a `custom_vjp`) is a second kernel on the same grid (`_backward_kernel`). The forward keeps the state
entering each block, ``[l / c, d, v]`` per head (as flash-linear-attention keeps its chunk states); the backward walks
the blocks from the last, recomputes each block's ``T``, ``W`` and ``U`` from its entering state, and carries the
cotangent of the state to the block before.

Shape key: b batch, l length (padded to a block multiple inside), n kv heads, g = h // n query heads per kv head,
d head dim, v value dim (both padded to powers of two >= 16), c block length.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .linear_causal import run_ids
from .pallas_tiles import (Step, block_length, block_step, dot, launch, layout, padded_dim, scale, scale_rows,
                           tile_size, triangle, value_tile)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static description of one call (hashable: a `custom_vjp` non-diff argument)."""

    block: int  # c
    block_v: int  # value tile of one program
    interpret: bool


def pallas_delta(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array, seg: jax.Array | None,
                 log_decay: jax.Array | None, *, block: int = 64, block_v: int = 64,
                 interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """The delta rule's outputs ``[b, l, n, g, v]`` and final state ``[b, n, d, v]`` (that of the last segment),
    float32: `delta._blocks` as a kernel.

    Args:
      q: unit queries ``[b, l, n, g, d]``; k: unit keys ``[b, l, n, d]`` (zero where padding hides a key);
        v: values ``[b, l, n, v]``.
      beta: ``[b, l, n]`` writing strengths (0 where padding hides a key).
      seg: int segment ids ``[b, l]`` (the state restarts where they change), or None.
      log_decay: float ``[b, l, n]`` (<= 0; 0 where padding hides a key), or None for no decay.
      block: block length c, a power of two >= 16, clipped to 128 and to l rounded up to a power of two.
      block_v: value tile per program, a power of two >= 16 (clipped to the padded value dim).
      interpret: Pallas interpret mode; None uses it exactly when JAX runs on the CPU.
    """
    b, l, n, g, d = q.shape
    plan = _Plan(block=block_length(block, l), block_v=min(tile_size("block_v", block_v, None),
                                                           padded_dim(v.shape[-1])),
                 interpret=jax.default_backend() == "cpu" if interpret is None else bool(interpret))
    runs = run_ids(seg)
    f32 = lambda x: None if x is None else x.astype(jnp.float32)
    return _delta(plan, f32(q), f32(k), f32(v), f32(beta), runs, f32(log_decay))


# -- custom_vjp: a forward kernel and a backward kernel --------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _delta(plan: _Plan, q, k, v, beta, runs, log_decay):
    return _forward(plan, q, k, v, beta, runs, log_decay)[:2]


def _delta_fwd(plan: _Plan, q, k, v, beta, runs, log_decay):
    out, state, entering = _forward(plan, q, k, v, beta, runs, log_decay, keep_states=True)
    return (out, state), (q, k, v, beta, runs, log_decay, entering)


def _delta_bwd(plan: _Plan, res, cotangents):
    q, k, v, beta, runs, log_decay, entering = res
    dq, dk, dv, dbeta, dlog = _backward(plan, q, k, v, beta, runs, log_decay, entering, *cotangents)
    return dq, dk, dv, dbeta, None, dlog


_delta.defvjp(_delta_fwd, _delta_bwd)


def _call(plan: _Plan, kernel, operands, specs, out_specs, out_shape, decayed: bool, segmented: bool, name: str,
          **static):
    """`pallas_tiles.launch` of one of this module's kernels."""
    return launch(functools.partial(kernel, plan=plan, decayed=decayed, segmented=segmented, **static), operands,
                  specs, out_specs, out_shape, plan.block_v, plan.interpret, name)


def _forward(plan: _Plan, q, k, v, beta, runs, log_decay, keep_states: bool = False):
    """Lay out, run the forward kernel, and cut back: ``(out [b, l, n, g, v], state [b, n, d, v], entering)`` with
    ``entering [b, h, blocks, dp, vp]`` the state entering each block (for the backward) if ``keep_states``, else
    None."""
    b, l, n, g, d = q.shape
    dv, bv = v.shape[-1], plan.block_v
    operands, specs = layout(q, k, v, [beta, log_decay], runs, plan.block, bv, jnp.float32)
    _, lp, h, dp = operands[0].shape
    vp, blocks = operands[2].shape[-1], lp // plan.block
    out_specs = [value_tile(lp, bv), pl.BlockSpec((None, None, dp, bv), lambda bi, hi, vi: (bi, hi, 0, vi))]
    out_shape = [jax.ShapeDtypeStruct((b, lp, h, vp), jnp.float32), jax.ShapeDtypeStruct((b, h, dp, vp), jnp.float32)]
    if keep_states:
        out_specs.append(pl.BlockSpec((None, None, blocks, dp, bv), lambda bi, hi, vi: (bi, hi, 0, 0, vi)))
        out_shape.append(jax.ShapeDtypeStruct((b, h, blocks, dp, vp), jnp.float32))
    outs = _call(plan, _kernel, operands, specs, out_specs, out_shape, log_decay is not None, runs is not None,
                 "delta_rule_forward", keep_states=keep_states)
    out = outs[0][:, :l, :, :dv].reshape(b, l, n, g, dv)
    state = outs[1][:, ::g, :d, :dv]  # every query head of a kv head carries the same state
    return out, state, (outs[2] if keep_states else None)


def _backward(plan: _Plan, q, k, v, beta, runs, log_decay, entering, d_out, d_state):
    """Lay out, run the backward kernel, and sum its shares: the gradients of ``q``, ``k``, ``v``, ``beta`` and
    ``log_decay`` (None without one) from the cotangents ``d_out [b, l, n, g, v]`` and ``d_state [b, n, d, v]``."""
    b, l, n, g, d = q.shape
    dv, bv = v.shape[-1], plan.block_v
    operands, specs = layout(q, k, v, [beta, log_decay], runs, plan.block, bv, jnp.float32)
    _, lp, h, dp = operands[0].shape
    vp, blocks = operands[2].shape[-1], lp // plan.block
    tiles = vp // bv
    rows = value_tile(lp, bv)
    state_tile = pl.BlockSpec((None, None, dp, bv), lambda bi, hi, vi: (bi, hi, 0, vi))
    final = jnp.zeros((b, n, g, dp, vp), jnp.float32).at[:, :, 0, :d, :dv].set(d_state)  # one query head per kv head
    operands += [entering, jnp.pad(d_out.reshape(b, l, h, dv), [(0, 0), (0, lp - l), (0, 0), (0, vp - dv)]),
                 final.reshape(b, h, dp, vp)]
    specs += [pl.BlockSpec((None, None, blocks, dp, bv), lambda bi, hi, vi: (bi, hi, 0, 0, vi)), rows, state_tile]
    per_tile = pl.BlockSpec((None, None, lp, None, dp), lambda bi, hi, vi: (bi, vi, 0, hi, 0))
    per_row = pl.BlockSpec((None, None, None, lp), lambda bi, hi, vi: (bi, hi, vi, 0))
    decayed = log_decay is not None
    outs = _call(plan, _backward_kernel, operands, specs,
                 [per_tile, per_tile, rows, per_row] + [per_row] * decayed,
                 [jax.ShapeDtypeStruct((b, tiles, lp, h, dp), jnp.float32)] * 2
                 + [jax.ShapeDtypeStruct((b, lp, h, vp), jnp.float32)]
                 + [jax.ShapeDtypeStruct((b, h, tiles, lp), jnp.float32)] * (1 + decayed),
                 decayed, runs is not None, "delta_rule_backward")
    kv_sum = lambda x: x.reshape(b, l, n, g, *x.shape[3:]).sum(3)  # [b, l, h, ...] -> [b, l, n, ...]
    per_position = lambda x: kv_sum(jnp.moveaxis(x.sum(2)[..., :l], 1, 2))  # [b, h, tiles, lp] -> [b, l, n]
    dq = outs[0].sum(1)[:, :l, :, :d].reshape(b, l, n, g, d)
    dk = kv_sum(outs[1].sum(1)[:, :l, :, :d])
    dvals = kv_sum(outs[2][:, :l, :, :dv])
    return dq, dk, dvals, per_position(outs[3]), (per_position(outs[4]) if decayed else None)


# -- the kernels ------------------------------------------------------------------------------------------------------
def _unit_lower_inverse(a: jax.Array) -> jax.Array:
    """``(I + a)^-1`` for strictly lower-triangular ``a [c, c]`` by forward substitution, one row at a time: row r
    is ``e_r - sum_{j < r} a_rj T_j`` once rows j < r are final."""
    c = a.shape[0]
    row = jnp.broadcast_to(jnp.arange(c)[:, None], (c, c))

    def body(r, t):
        a_r = jnp.sum(jnp.where(row == r, a, 0.0), axis=0)  # [c]: row r of a, zero from column r on
        return jnp.where(row == r, t - jnp.sum(a_r[:, None] * t, axis=0)[None, :], t)

    col = jnp.broadcast_to(jnp.arange(c)[None, :], (c, c))
    return lax.fori_loop(1, c, body, jnp.where(row == col, 1.0, 0.0))


class _Block(NamedTuple):
    """One block's inputs and the pieces of its forward pass the backward needs again."""

    rows: Any
    q: jax.Array  # [c, d]
    k: jax.Array  # [c, d]
    v: jax.Array  # [c, bv]
    beta: jax.Array  # [c]
    step: Step
    kk: jax.Array  # K K^T [c, c]
    inverse: jax.Array  # T = (I + beta K K^T * strict D)^-1 [c, c]


def _block(i, refs, c: int, carried, strict) -> _Block:
    """Block ``i`` of the sequence: load it, take its `Step` given the ``carried`` run, and invert its system."""
    q_ref, k_ref, v_ref, beta_ref, decay_ref, run_ref = refs
    rows = pl.ds(pl.multiple_of(i * c, c), c)
    q, k, v, beta = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], beta_ref[rows]
    step = block_step(rows, c, decay_ref, run_ref, carried)
    kk = dot(k, k, trans_b=True)
    inverse = _unit_lower_inverse(beta[:, None] * kk * jnp.where(strict, step.pair, 0.0))
    return _Block(rows, q, k, v, beta, step, kk, inverse)


def _pseudo_values(blk: _Block, s):
    """``(U, T beta V, W)``: the pseudo-values ``U = T beta V - W S0 [c, bv]`` from the entering state ``s``, with
    ``W = T (beta g K) [c, d]``."""
    u0 = dot(blk.inverse, scale_rows(blk.v, blk.beta))
    w = dot(blk.inverse, scale_rows(blk.k, blk.beta if blk.step.read is None else blk.beta * blk.step.read))
    return u0 - dot(w, s), u0, w


def _kernel(q_ref, k_ref, v_ref, beta_ref, *refs, plan: _Plan, decayed: bool, segmented: bool, keep_states: bool):
    """One (batch row, query head, value tile): ``q [l, d]``, ``k [l, d]``, ``v [l, bv]``, ``beta [l]``,
    ``log_decay [l]``, ``runs [l]`` (where present) -> ``out [l, bv]``, ``state [d, bv]``, and with
    ``keep_states`` the state entering each block ``[blocks, d, bv]``, block by block."""
    refs = list(refs)
    decay_ref = refs.pop(0) if decayed else None
    run_ref = refs.pop(0) if segmented else None
    out_ref, state_ref = refs[:2]
    c = plan.block
    strict = ~triangle(c, upper=True)  # [c(r), c(i)]: i < r
    inputs = (q_ref, k_ref, v_ref, beta_ref, decay_ref, run_ref)

    def body(i, carry):
        s, run = carry  # s [d, bv] float32; run: the carried state's (segmented only)
        if keep_states:
            refs[2][i] = s
        blk = _block(i, inputs, c, run, strict)
        u = _pseudo_values(blk, s)[0]  # [c, bv]
        out_ref[blk.rows, :] = (scale_rows(dot(blk.q, s), blk.step.read)
                                + dot(dot(blk.q, blk.k, trans_b=True) * blk.step.pair, u))
        s = scale(s, blk.step.keep) + dot(scale_rows(blk.k, blk.step.add), u, trans_a=True)
        return s, blk.step.run

    d, bv = q_ref.shape[-1], v_ref.shape[-1]
    state, _ = lax.fori_loop(0, q_ref.shape[0] // c, body, (jnp.zeros((d, bv), jnp.float32), jnp.int32(-1)))
    state_ref[...] = state


def _backward_kernel(q_ref, k_ref, v_ref, beta_ref, *refs, plan: _Plan, decayed: bool, segmented: bool):
    """One (batch row, query head, value tile), the blocks walked backward: `_kernel`'s inputs, the states entering
    each block ``[blocks, d, bv]``, ``d_out [l, bv]`` and the final state's cotangent ``[d, bv]`` (zero but for one
    query head per kv head) -> ``dq [l, d]``, ``dk [l, d]``, ``dv [l, bv]``, ``dbeta [l]`` and ``dlog_decay [l]``
    (this program's share: they sum over value tiles, and all but dq over the query heads of a kv head).

    Per block, with ``dS1`` the cotangent of the state leaving it, ``M = Q K^T * D`` and the forward's ``T``, ``W``,
    ``U``: ``dU = M^T dO + (a K) dS1``, ``dS0 = (g Q)^T dO + keep dS1 - W^T dU`` (carried to the block before);
    through ``U = T (beta V) - T (beta g K) S0`` and ``T = (I + A)^-1``: ``dA = -T^T (dU (beta V)^T - dU S0^T
    (beta g K)^T) T^T`` on the strict lower triangle. The decay's gradient collects ``d log D`` of every decay factor
    (pairs, g, a, keep) and sums it back over the positions each factor spans."""
    refs = list(refs)
    decay_ref = refs.pop(0) if decayed else None
    run_ref = refs.pop(0) if segmented else None
    states_ref, dout_ref, dfinal_ref, dq_ref, dk_ref, dv_ref, dbeta_ref = refs[:7]
    dlog_ref = refs[7] if decayed else None
    c, blocks = plan.block, q_ref.shape[0] // plan.block
    strict, lower = ~triangle(c, upper=True), triangle(c)
    inputs = (q_ref, k_ref, v_ref, beta_ref, decay_ref, run_ref)

    def body(t, ds):  # ds [d, bv]: the cotangent of the state leaving block i
        i = blocks - 1 - t
        carried = jnp.int32(-1)
        if segmented:  # the run of the state entering block i: the largest of block i - 1's
            before = run_ref[pl.ds(pl.multiple_of(jnp.maximum(i - 1, 0) * c, c), c)]
            carried = jnp.where(i > 0, jnp.max(before), -1)
        blk = _block(i, inputs, c, carried, strict)
        step, s0 = blk.step, states_ref[i]
        u, u0, w = _pseudo_values(blk, s0)
        do = dout_ref[blk.rows, :]
        qk = dot(blk.q, blk.k, trans_b=True)
        k_add = scale_rows(blk.k, step.add)
        du = dot(qk * step.pair, do, trans_a=True) + dot(k_add, ds)  # [c, bv]
        d_in = dot(do, s0, trans_b=True)  # [c, d]: dO S0^T
        d_out_k = dot(u, ds, trans_b=True)  # [c, d]: U dS1^T
        dm = dot(do, u, trans_b=True)  # [c(r), c(i)]
        dpair = dm * qk
        dscores = dm * step.pair
        du_s0 = dot(du, s0, trans_b=True)  # [c, d]: -dW
        dx = dot(blk.inverse, du, trans_a=True)  # [c, bv]: T^T dU
        dy = -dot(blk.inverse, du_s0, trans_a=True)  # [c, d]: T^T dW
        read = jnp.ones((c,), jnp.float32) if step.read is None else step.read
        x, y = scale_rows(blk.v, blk.beta), scale_rows(blk.k, blk.beta * read)
        d_t = dot(du, x, trans_b=True) - dot(du_s0, y, trans_b=True)  # dT
        d_a = -jnp.where(strict, dot(dot(blk.inverse, d_t, trans_a=True), blk.inverse, trans_b=True), 0.0)
        d_kk = d_a * blk.beta[:, None] * jnp.where(strict, step.pair, 0.0)
        dpair += jnp.where(strict, d_a * blk.beta[:, None] * blk.kk, 0.0)
        dq_ref[blk.rows, :] = dot(dscores, blk.k) + scale_rows(d_in, step.read)
        dk_ref[blk.rows, :] = (dot(dscores, blk.q, trans_a=True) + scale_rows(d_out_k, step.add)
                               + dot(d_kk + jnp.transpose(d_kk), blk.k) + scale_rows(dy, blk.beta * read))
        dv_ref[blk.rows, :] = scale_rows(dx, blk.beta)
        k_dy = jnp.sum(blk.k.astype(jnp.float32) * dy, axis=1)
        dbeta_ref[blk.rows] = (jnp.sum(jnp.where(strict, d_a * blk.kk * step.pair, 0.0), axis=1)
                               + jnp.sum(blk.v.astype(jnp.float32) * dx, axis=1) + read * k_dy)
        if decayed:  # d log of each factor, summed back over the positions whose log decays it adds up
            d_read = (jnp.sum(blk.q.astype(jnp.float32) * d_in, axis=1) + blk.beta * k_dy) * step.read
            d_add = jnp.sum(blk.k.astype(jnp.float32) * d_out_k, axis=1) * step.add
            d_cum = jnp.sum(dpair * step.pair, axis=1) - jnp.sum(dpair * step.pair, axis=0) + d_read - d_add
            d_total = jnp.sum(d_add) + jnp.sum(s0 * ds) * step.keep
            dlog_ref[blk.rows] = jnp.sum(jnp.where(lower, jnp.broadcast_to(d_cum[:, None], (c, c)), 0.0),
                                         axis=0) + d_total
        return dot(scale_rows(blk.q, step.read), do, trans_a=True) + scale(ds, step.keep) - dot(w, du, trans_a=True)

    lax.fori_loop(0, blocks, body, dfinal_ref[...])
