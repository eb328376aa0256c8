"""`pallas_delta`: the (gated) delta rule's chunk form as Pallas kernels, parallel across blocks but for the state.

The GPU counterpart of `delta._blocks`. Per block of c positions, with ``D_ri = exp(G_r - G_i)`` for keys i <= r of
row r's run (`chunk_tiles.block_step`), ``g_r = exp(G_r)`` where row r reads the entering state (0 elsewhere) and
``S0`` that state (see `delta` for the derivation)::

    T = (I + strict_tril(beta K K^T * D))^-1                  by forward substitution, one row at a time
    U = T (beta V) - T (beta g K) S0                            the pseudo-values
    O = g Q S0 + (tril(Q K^T) * D) U
    S_end = g_c S0 (0 if the block starts a new run) + (K * D_c.)^T U   (keys of the block's last run)

As flash-linear-attention's chunk kernels do, only the state pass walks the blocks in order; the rest runs in
parallel over blocks (`delta_pallas_kernels`):

1. ``delta_rule_blocks``, one program per (block, batch row, kv head): ``T``, ``W = T (beta g K)`` and ``U0 = T
   (beta V)`` (the run carried into the block, which ``g`` depends on, is the largest run id of the block before);
2. ``delta_rule_states``, one program per (batch row, kv head, value tile): a `lax.fori_loop` over the blocks
   carrying ``S [d, bv]`` in float32, ``U = U0 - W S0`` and ``S_end``, storing each block's ``S0`` and ``U``;
3. ``delta_rule_output``, one program per (block, batch row, query head, value tile): ``O``.

The state depends on the kv head only, so a GQA group's query heads share one walk; the rule acts on each value
column alone, so value tiles are independent. Inputs are unit q and k and float32 values, as `delta._blocks` takes
them; everything is float32 (the system's inverse is less forgiving than linear attention's sums).

The backward (a `custom_vjp`, `delta_pallas_backward`) keeps the forward's ``T``, ``W``, ``U`` and entering states
(``[l / c, d, v]`` per kv head, as flash-linear-attention keeps its chunk states) and splits the same way:
``delta_rule_backward_queries`` (parallel per block and query head: ``dq`` and the sums over queries that the
state's cotangent needs), ``delta_rule_backward_states`` (per kv head and value tile, the blocks from the last,
carrying the cotangent of the state) and ``delta_rule_backward_blocks`` (parallel per block and kv head: ``dk``,
``dv``, ``dbeta`` through each block's system).

Shape key: b batch, l length (padded to a block multiple inside), n kv heads, g = h // n query heads per kv head,
d head dim, v value dim (both padded to powers of two >= 16), c block length.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ..pallas import block_length, padded_dim, tile_size
from .chunk_tiles import Specs, f32, grid, launch, operands
from .common import run_ids
from .delta_pallas_backward import backward_blocks_kernel, backward_queries_kernel, backward_states_kernel
from .delta_pallas_kernels import blocks_kernel, output_kernel, states_kernel


# Warps per program where the width rule (4 up to 64 columns, else 8) spills more. Compiled offline for sm_90
# (benchmarks/triton_resources.py, RESULTS.md), every delta kernel spills some in float32; the backward kernels spill
# least at 8 warps at head dim 64 too (delta_rule_backward_blocks 4.7 KB against 6.6 KB), the output kernel at 4 at
# head dim 128 (264 B against 1,032 B).
_BACKWARD_WARPS = 8
_OUTPUT_WARPS = 4


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
    if l == 0:  # no block to launch a kernel over
        return jnp.zeros((b, 0, n, g, v.shape[-1]), jnp.float32), jnp.zeros((b, n, d, v.shape[-1]), jnp.float32)
    runs = run_ids(seg)
    as_f32 = lambda x: None if x is None else x.astype(jnp.float32)
    return _delta(plan, as_f32(q), as_f32(k), as_f32(v), as_f32(beta), runs, as_f32(log_decay))


# -- custom_vjp: three forward kernels, three backward kernels ------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _delta(plan: _Plan, q, k, v, beta, runs, log_decay):
    out, state, _ = _forward(plan, q, k, v, beta, runs, log_decay)
    return out, state


def _delta_fwd(plan: _Plan, q, k, v, beta, runs, log_decay):
    out, state, saved = _forward(plan, q, k, v, beta, runs, log_decay, keep=True)
    return (out, state), (q, k, v, beta, runs, log_decay, saved)


def _delta_bwd(plan: _Plan, res, cotangents):
    q, k, v, beta, runs, log_decay, saved = res
    dq, dk, dv, dbeta, dlog = _backward(plan, q, k, v, beta, runs, log_decay, saved, *cotangents)
    return dq, dk, dv, dbeta, None, dlog


_delta.defvjp(_delta_fwd, _delta_bwd)


class _Laid(NamedTuple):
    """The padded operands of `chunk_tiles.operands` (None where absent)."""

    q: jax.Array  # [b, lp, h, dp]
    k: jax.Array  # [b, lp, n, dp]
    v: jax.Array  # [b, lp, n, vp]
    beta: jax.Array  # [b, n, lp]
    decay: jax.Array | None  # [b, n, lp]
    runs: jax.Array | None  # [b, lp]


class _Saved(NamedTuple):
    """What the forward kernels give the backward, per kv head."""

    inverse: jax.Array | None  # T [b, lp, n, c] (None unless kept)
    w: jax.Array  # W [b, lp, n, dp]
    added: jax.Array  # a K [b, lp, n, dp] (K itself without gates)
    keep: jax.Array | None  # keep [b, n, lp], each block's factor repeated (None without gates)
    u: jax.Array  # U [b, lp, n, vp]
    entering: jax.Array  # the state entering each block [b, blocks, n, dp, vp]


def _lay_out(plan: _Plan, q, k, v, beta, runs, log_decay) -> _Laid:
    ops = operands(q, k, v, [beta, log_decay], runs, plan.block, jnp.float32)
    return _Laid(*ops[:4], ops[4] if log_decay is not None else None, ops[-1] if runs is not None else None)


def _gates(x: _Laid, specs: Specs, per: int) -> tuple[list, list]:
    """The log decay and run ids that a kernel on a grid over blocks takes after its other inputs (the run ids of
    the block before too), and their specs."""
    ops, in_specs = [], []
    if x.decay is not None:
        ops, in_specs = [x.decay], [specs.positions(per)]
    if x.runs is not None:
        ops += [x.runs] * 2
        in_specs += [specs.runs(), specs.runs(-1)]
    return ops, in_specs


def _forward(plan: _Plan, q, k, v, beta, runs, log_decay, keep: bool = False):
    """Lay out, run the three forward kernels, and cut back: ``(out [b, l, n, g, v], state [b, n, d, v], saved)``,
    ``saved`` the `_Saved` with the blocks' inverses if ``keep`` (for the backward)."""
    b, l, n, g, d = q.shape
    x = _lay_out(plan, q, k, v, beta, runs, log_decay)
    lp, h, dp, vp, blocks, tiles, flags, par, seq = grid(x.q, x.v, plan.block, plan.block_v, log_decay, runs)
    c, bv = plan.block, plan.block_v
    gated = flags["decayed"] or flags["segmented"]
    ops, in_specs = _gates(x, par, 1)
    made = launch(  # per block and kv head: W, U0 (and a K, keep; T)
        functools.partial(blocks_kernel, keep_inverse=keep, **flags), [x.k, x.v, x.beta] + ops,
        [par.rows(dp), par.rows(vp), par.positions()] + in_specs,
        [par.rows(dp), par.rows(vp)] + [par.rows(dp), par.positions()] * gated + [par.rows(c)] * keep,
        [f32(b, lp, n, dp), f32(b, lp, n, vp)] + [f32(b, lp, n, dp), f32(b, n, lp)] * gated
        + [f32(b, lp, n, c)] * keep, (blocks, b, n, 1), max(dp, vp), plan.interpret, "delta_rule_blocks")
    w, u0, added, keep_factor = made[0], made[1], made[2] if gated else x.k, made[3] if gated else None
    entering, u, final = launch(  # per kv head and value tile, the blocks in order
        functools.partial(states_kernel, c=c, gated=gated), [w, u0, added] + [keep_factor] * gated,
        [seq.rows(dp), seq.rows(vp, tile=True), seq.rows(dp)] + [seq.positions()] * gated,
        [seq.states(blocks, dp), seq.rows(vp, tile=True), seq.last(dp)],
        [f32(b, blocks, n, dp, vp), f32(b, lp, n, vp), f32(b, n, dp, vp)],
        (1, b, n, tiles), max(dp, bv), plan.interpret, "delta_rule_states")
    ops, in_specs = _gates(x, par, g)
    out = launch(  # per block, query head and value tile
        functools.partial(output_kernel, **flags), [x.q, x.k, u, entering] + ops,
        [par.rows(dp), par.rows(dp, g), par.rows(vp, g, tile=True), par.state(dp, g)] + in_specs,
        [par.rows(vp, tile=True)], [f32(b, lp, h, vp)], (blocks, b, h, tiles), max(dp, bv), plan.interpret,
        "delta_rule_output", num_warps=_OUTPUT_WARPS)[0]
    out = out[:, :l, :, :v.shape[-1]].reshape(b, l, n, g, v.shape[-1])
    saved = _Saved(made[-1] if keep else None, w, added, keep_factor, u, entering)
    return out, final[:, :, :d, :v.shape[-1]], saved


def _backward(plan: _Plan, q, k, v, beta, runs, log_decay, saved: _Saved, d_out, d_state):
    """Lay out, run the three backward kernels, and sum their shares: the gradients of ``q``, ``k``, ``v``,
    ``beta`` and ``log_decay`` (None without one) from the cotangents ``d_out [b, l, n, g, v]`` and ``d_state
    [b, n, d, v]``."""
    b, l, n, g, d = q.shape
    dv = v.shape[-1]
    x = _lay_out(plan, q, k, v, beta, runs, log_decay)
    lp, h, dp, vp, blocks, tiles, flags, par, seq = grid(x.q, x.v, plan.block, plan.block_v, log_decay, runs)
    c, bv = plan.block, plan.block_v
    decayed, gated = flags["decayed"], saved.keep is not None
    ops, in_specs = _gates(x, par, g)
    d_out = jnp.pad(d_out.reshape(b, l, h, dv), [(0, 0), (0, lp - l), (0, 0), (0, vp - dv)])
    queries = launch(  # per block, query head and value tile
        functools.partial(backward_queries_kernel, **flags), [x.q, x.k, saved.u, saved.entering, d_out] + ops,
        [par.rows(dp), par.rows(dp, g), par.rows(vp, g, tile=True), par.state(dp, g), par.rows(vp, tile=True)]
        + in_specs, [par.tile_shares(dp)] * 2 + [par.rows(vp, tile=True), par.state(dp)]
        + [par.tile_copies()] * decayed,
        [f32(b, tiles, lp, h, dp)] * 2 + [f32(b, lp, h, vp), f32(b, blocks, h, dp, vp)]
        + [f32(b, h, tiles, lp)] * decayed, (blocks, b, h, tiles), max(dp, bv), plan.interpret,
        "delta_rule_backward_queries", num_warps=_BACKWARD_WARPS)
    # the walk runs once per kv head: its inputs from the queries are summed over the group first
    group_sum = lambda y, axis: y.reshape(y.shape[:axis] + (n, g) + y.shape[axis + 1:]).sum(axis + 1)
    d_final = jnp.zeros((b, n, dp, vp), jnp.float32).at[:, :, :d, :dv].set(d_state)
    leaving, du = launch(  # per kv head and value tile, the blocks from the last
        functools.partial(backward_states_kernel, c=c, gated=gated),
        [group_sum(queries[2], 2), group_sum(queries[3], 2), saved.added, saved.w] + [saved.keep] * gated
        + [d_final], [seq.rows(vp, tile=True), seq.states(blocks, dp), seq.rows(dp), seq.rows(dp)]
        + [seq.positions()] * gated + [seq.last(dp)], [seq.states(blocks, dp), seq.rows(vp, tile=True)],
        [f32(b, blocks, n, dp, vp), f32(b, lp, n, vp)], (1, b, n, tiles), max(dp, bv), plan.interpret,
        "delta_rule_backward_states", num_warps=_BACKWARD_WARPS)
    ops, in_specs = _gates(x, par, 1)
    systems = launch(  # per block, kv head and value tile
        functools.partial(backward_blocks_kernel, **flags),
        [x.k, x.v, x.beta, saved.inverse, saved.u, saved.entering, leaving, du] + ops,
        [par.rows(dp), par.rows(vp, tile=True), par.positions(), par.rows(c), par.rows(vp, tile=True),
         par.state(dp), par.state(dp), par.rows(vp, tile=True)] + in_specs,
        [par.tile_shares(dp), par.rows(vp, tile=True)] + [par.tile_copies()] * (1 + decayed),
        [f32(b, tiles, lp, n, dp), f32(b, lp, n, vp)] + [f32(b, n, tiles, lp)] * (1 + decayed),
        (blocks, b, n, tiles), max(dp, bv), plan.interpret, "delta_rule_backward_blocks",
        num_warps=_BACKWARD_WARPS)
    per_position = lambda y: jnp.moveaxis(y.sum(2)[..., :l], 1, 2)  # [b, heads, tiles, lp] -> [b, l, heads]
    dq = queries[0].sum(1)[:, :l, :, :d].reshape(b, l, n, g, d)
    dk = group_sum(queries[1].sum(1), 2)[:, :l, :, :d] + systems[0].sum(1)[:, :l, :, :d]
    dlog = group_sum(per_position(queries[4]), 2) + per_position(systems[3]) if decayed else None
    return dq, dk, systems[1][:, :l, :, :dv], per_position(systems[2]), dlog
