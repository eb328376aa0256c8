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

from .delta_pallas_kernels import _blocks_kernel, _output_kernel, _states_kernel, unit_lower_inverse
from .linear_causal import run_ids
from .pallas_tiles import (Specs, Step, block_length, block_step, dot, launch, operands, padded_dim, scale,
                           scale_rows, tile_size, triangle)


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


class _Laid(NamedTuple):
    """The padded operands of `pallas_tiles.operands` (None where absent)."""

    q: jax.Array  # [b, lp, h, dp]
    k: jax.Array  # [b, lp, n, dp]
    v: jax.Array  # [b, lp, n, vp]
    beta: jax.Array  # [b, n, lp]
    decay: jax.Array | None  # [b, n, lp]
    runs: jax.Array | None  # [b, lp]


def _lay_out(plan: _Plan, q, k, v, beta, runs, log_decay) -> _Laid:
    ops = operands(q, k, v, [beta, log_decay], runs, plan.block, jnp.float32)
    return _Laid(*ops[:4], ops[4] if log_decay is not None else None, ops[-1] if runs is not None else None)


def _gates(x: _Laid, specs: Specs, per: int, previous: bool) -> tuple[list, list]:
    """The log decay and run ids that a kernel takes after its other inputs, and their specs (``previous``: the
    run ids of the block before too, for a grid over blocks)."""
    ops, in_specs = [], []
    if x.decay is not None:
        ops, in_specs = [x.decay], [specs.positions(per)]
    if x.runs is not None:
        ops += [x.runs] * (1 + previous)
        in_specs += [specs.runs()] + [specs.runs(-1)] * previous
    return ops, in_specs


def _f32(*shape) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _forward(plan: _Plan, q, k, v, beta, runs, log_decay, keep_states: bool = False):
    """Lay out, run the three forward kernels, and cut back: ``(out [b, l, n, g, v], state [b, n, d, v], entering)``
    with ``entering [b, blocks, n, dp, vp]`` the state entering each block (for the backward) if ``keep_states``,
    else None."""
    b, l, n, g, d = q.shape
    x = _lay_out(plan, q, k, v, beta, runs, log_decay)
    _, lp, h, dp = x.q.shape
    c, bv, vp = plan.block, plan.block_v, x.v.shape[-1]
    blocks, tiles = lp // c, vp // bv
    flags = dict(c=c, decayed=log_decay is not None, segmented=runs is not None)
    gated = flags["decayed"] or flags["segmented"]
    par, seq = Specs(c, bv), Specs(lp, bv)  # a grid over blocks; a grid walking them
    ops, in_specs = _gates(x, par, 1, previous=True)
    made = launch(  # per block and kv head: W, U0 (and a K, keep)
        functools.partial(_blocks_kernel, keep_inverse=False, **flags), [x.k, x.v, x.beta] + ops,
        [par.rows(dp), par.rows(vp), par.positions()] + in_specs,
        [par.rows(dp), par.rows(vp)] + [par.rows(dp), par.positions()] * gated,
        [_f32(b, lp, n, dp), _f32(b, lp, n, vp)] + [_f32(b, lp, n, dp), _f32(b, n, lp)] * gated,
        (blocks, b, n, 1), max(dp, vp), plan.interpret, "delta_rule_blocks")
    entering, u, final = launch(  # per kv head and value tile, the blocks in order
        functools.partial(_states_kernel, c=c, gated=gated), [made[0], made[1], made[2] if gated else x.k]
        + list(made[3:4]), [seq.rows(dp), seq.rows(vp, tile=True), seq.rows(dp)] + [seq.positions()] * gated,
        [seq.states(blocks, dp), seq.rows(vp, tile=True), seq.last(dp)],
        [_f32(b, blocks, n, dp, vp), _f32(b, lp, n, vp), _f32(b, n, dp, vp)],
        (1, b, n, tiles), max(dp, bv), plan.interpret, "delta_rule_states")
    ops, in_specs = _gates(x, par, g, previous=True)
    out = launch(  # per block, query head and value tile
        functools.partial(_output_kernel, **flags), [x.q, x.k, u, entering] + ops,
        [par.rows(dp), par.rows(dp, g), par.rows(vp, g, tile=True), par.state(dp, g)] + in_specs,
        [par.rows(vp, tile=True)], [_f32(b, lp, h, vp)], (blocks, b, h, tiles), max(dp, bv), plan.interpret,
        "delta_rule_output")[0]
    out = out[:, :l, :, :v.shape[-1]].reshape(b, l, n, g, v.shape[-1])
    return out, final[:, :, :d, :v.shape[-1]], (entering if keep_states else None)


def _backward(plan: _Plan, q, k, v, beta, runs, log_decay, entering, d_out, d_state):
    """Lay out, run the backward kernel, and sum its shares: the gradients of ``q``, ``k``, ``v``, ``beta`` and
    ``log_decay`` (None without one) from the cotangents ``d_out [b, l, n, g, v]`` and ``d_state [b, n, d, v]``."""
    b, l, n, g, d = q.shape
    dv, bv = v.shape[-1], plan.block_v
    x = _lay_out(plan, q, k, v, beta, runs, log_decay)
    _, lp, h, dp = x.q.shape
    vp, blocks = x.v.shape[-1], lp // plan.block
    tiles = vp // bv
    seq = Specs(lp, bv)
    ops, in_specs = _gates(x, seq, g, previous=False)
    final = jnp.zeros((b, n, g, dp, vp), jnp.float32).at[:, :, 0, :d, :dv].set(d_state)  # one query head per kv head
    ops = [x.q, x.k, x.v, x.beta] + ops + [
        entering, jnp.pad(d_out.reshape(b, l, h, dv), [(0, 0), (0, lp - l), (0, 0), (0, vp - dv)]),
        final.reshape(b, h, dp, vp)]
    in_specs = [seq.rows(dp), seq.rows(dp, g), seq.rows(vp, g, tile=True), seq.positions(g)] + in_specs + [
        seq.states(blocks, dp, g), seq.rows(vp, tile=True), seq.last(dp)]
    decayed = log_decay is not None
    outs = launch(functools.partial(_backward_kernel, plan=plan, decayed=decayed, segmented=runs is not None),
                  ops, in_specs, [seq.tile_shares(dp)] * 2 + [seq.rows(vp, tile=True)]
                  + [seq.tile_copies()] * (1 + decayed),
                  [_f32(b, tiles, lp, h, dp)] * 2 + [_f32(b, lp, h, vp)] + [_f32(b, h, tiles, lp)] * (1 + decayed),
                  (1, b, h, tiles), max(dp, bv), plan.interpret, "delta_rule_backward")
    kv_sum = lambda x: x.reshape(b, l, n, g, *x.shape[3:]).sum(3)  # [b, l, h, ...] -> [b, l, n, ...]
    per_position = lambda x: kv_sum(jnp.moveaxis(x.sum(2)[..., :l], 1, 2))  # [b, h, tiles, lp] -> [b, l, n]
    dq = outs[0].sum(1)[:, :l, :, :d].reshape(b, l, n, g, d)
    dk = kv_sum(outs[1].sum(1)[:, :l, :, :d])
    dvals = kv_sum(outs[2][:, :l, :, :dv])
    return dq, dk, dvals, per_position(outs[3]), (per_position(outs[4]) if decayed else None)


# -- the kernels ------------------------------------------------------------------------------------------------------
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
    inverse = unit_lower_inverse(beta[:, None] * kk * jnp.where(strict, step.pair, 0.0))
    return _Block(rows, q, k, v, beta, step, kk, inverse)


def _pseudo_values(blk: _Block, s):
    """``(U, T beta V, W)``: the pseudo-values ``U = T beta V - W S0 [c, bv]`` from the entering state ``s``, with
    ``W = T (beta g K) [c, d]``."""
    u0 = dot(blk.inverse, scale_rows(blk.v, blk.beta))
    w = dot(blk.inverse, scale_rows(blk.k, blk.beta if blk.step.read is None else blk.beta * blk.step.read))
    return u0 - dot(w, s), u0, w


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
