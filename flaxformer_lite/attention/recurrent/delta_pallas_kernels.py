"""The forward kernels of `delta_pallas`: each block's system in parallel, the state pass, the outputs in parallel.

Per block, with ``D_ri = exp(G_r - G_i)`` for keys i <= r of row r's run, ``g_r = exp(G_r)`` where row r reads the
state entering the block (0 elsewhere), ``a_i`` the factor of key i on the state leaving it and ``keep`` that of the
entering state (`chunk_tiles.block_step`)::

    T = (I + strict_tril(beta K K^T * D))^-1      W = T (beta g K)      U0 = T (beta V)      (`blocks_kernel`)
    U = U0 - W S,   S' = keep S + (a K)^T U                                                   (`states_kernel`)
    O = g Q S + (tril(Q K^T) * D) U                                                          (`output_kernel`)

Only the middle line depends on the state ``S`` entering the block, and it is all the sequential walk does: two
``[c, d] x [d, bv]`` products per block. The run carried into a block (what ``g``, ``a`` and ``keep`` depend on) is
known before the walk: the largest run id of the block before (`chunk_tiles.carried_run`).

Shape key: l the padded length, d head dim, v value dim (padded), bv value tile, c block length.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ..pallas import dot
from .chunk_tiles import block_step, carried_run, scale, scale_rows, triangle


def inverse_by_substitution(a: jax.Array) -> jax.Array:
    """``(I + a)^-1`` for strictly lower-triangular ``a [c, c]`` by forward substitution, one row at a time: row r
    is ``e_r - sum_{j < r} a_rj T_j`` once rows j < r are final."""
    c = a.shape[0]
    row = jnp.broadcast_to(jnp.arange(c)[:, None], (c, c))

    def body(r, t):
        a_r = jnp.sum(jnp.where(row == r, a, 0.0), axis=0)  # [c]: row r of a, zero from column r on
        return jnp.where(row == r, t - jnp.sum(a_r[:, None] * t, axis=0)[None, :], t)

    col = jnp.broadcast_to(jnp.arange(c)[None, :], (c, c))
    return lax.fori_loop(1, c, body, jnp.where(row == col, 1.0, 0.0))


def gate_refs(refs: list, decayed: bool, segmented: bool, previous: bool) -> tuple:
    """Pop ``(decay_ref, run_ref, previous_run_ref)`` (None where absent) off the front of a kernel's ``refs``."""
    decay_ref = refs.pop(0) if decayed else None
    run_ref = refs.pop(0) if segmented else None
    previous_ref = refs.pop(0) if segmented and previous else None
    return decay_ref, run_ref, previous_ref


def block_system(k, beta, step, c: int) -> jax.Array:
    """``T = (I + strict_tril(beta K K^T * D))^-1 [c, c]`` of one block: keys ``k [c, d]``, ``beta [c]``."""
    strict = ~triangle(c, upper=True)  # [c(r), c(i)]: i < r
    return inverse_by_substitution(beta[:, None] * dot(k, k, trans_b=True) * jnp.where(strict, step.pair, 0.0))


def blocks_kernel(k_ref, v_ref, beta_ref, *refs, c: int, decayed: bool, segmented: bool, keep_inverse: bool):
    """One (block, batch row, kv head): ``k [c, d]``, ``v [c, v]``, ``beta [c]``, then ``log_decay [c]``, the run ids
    of the block and of the one before ``[c]`` (where present) -> ``W [c, d]``, ``U0 [c, v]``; with gates (decay
    or segments) ``a K [c, d]`` and ``keep [c]`` (the block's factor, repeated); with ``keep_inverse`` ``T [c, c]``."""
    refs = list(refs)
    decay_ref, run_ref, previous_ref = gate_refs(refs, decayed, segmented, previous=True)
    carried = carried_run(previous_ref) if segmented else jnp.int32(-1)
    step = block_step(pl.ds(0, c), c, decay_ref, run_ref, carried)
    k, beta = k_ref[...], beta_ref[...]
    t = block_system(k, beta, step, c)
    w_ref, u0_ref = refs[:2]
    w_ref[...] = dot(t, scale_rows(k, beta if step.read is None else beta * step.read))
    u0_ref[...] = dot(t, scale_rows(v_ref[...], beta))
    if decayed or segmented:
        refs[2][...] = scale_rows(k, step.add)
        refs[3][...] = jnp.full((c,), step.keep, jnp.float32)
    if keep_inverse:
        refs[-1][...] = t


def states_kernel(w_ref, u0_ref, ka_ref, *refs, c: int, gated: bool):
    """One (batch row, kv head, value tile), the blocks in order: ``W [l, d]``, ``U0 [l, bv]``, ``a K [l, d]`` (K
    without gates) and with gates ``keep [l]`` -> the states entering the blocks ``[blocks, d, bv]``, the
    pseudo-values ``U [l, bv]`` and the final state ``[d, bv]``."""
    refs = list(refs)
    keep_ref = refs.pop(0) if gated else None
    states_ref, u_ref, final_ref = refs

    def body(i, s):  # s [d, bv] float32: the state entering block i
        rows = pl.ds(pl.multiple_of(i * c, c), c)
        states_ref[i] = s
        u = u0_ref[rows, :] - dot(w_ref[rows, :], s)
        u_ref[rows, :] = u
        keep = jnp.max(keep_ref[rows]) if gated else None  # one value repeated over the block
        return scale(s, keep) + dot(ka_ref[rows, :], u, trans_a=True)

    d, bv = w_ref.shape[-1], u0_ref.shape[-1]
    final_ref[...] = lax.fori_loop(0, w_ref.shape[0] // c, body, jnp.zeros((d, bv), jnp.float32))


def output_kernel(q_ref, k_ref, u_ref, s_ref, *refs, c: int, decayed: bool, segmented: bool):
    """One (block, batch row, query head, value tile): ``q [c, d]``, ``k [c, d]``, ``U [c, bv]``, the state entering
    the block ``[d, bv]``, then ``log_decay [c]``, the run ids of the block and of the one before (where present)
    -> ``out [c, bv]``."""
    refs = list(refs)
    decay_ref, run_ref, previous_ref = gate_refs(refs, decayed, segmented, previous=True)
    carried = carried_run(previous_ref) if segmented else jnp.int32(-1)
    step = block_step(pl.ds(0, c), c, decay_ref, run_ref, carried)
    q = q_ref[...]
    refs[0][...] = (scale_rows(dot(q, s_ref[...]), step.read)
                    + dot(dot(q, k_ref[...], trans_b=True) * step.pair, u_ref[...]))
