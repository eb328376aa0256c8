"""The kernels of `linear_pallas`: two walks along the blocks that only carry states, and two kernels parallel over
blocks that do each block's quadratic part (flash-linear-attention's chunk_fwd_h / chunk_fwd_o and their backward).

Forward, per block with ``S [f, v]`` and ``z [f]`` the sums entering it and `chunk_tiles.block_step`'s factors
(``pair``: decay of each visible pair; ``read``: factor on the entering sums where a row reads them; ``add``,
``keep``: factors of the keys and of the entering sums in the sums leaving the block)::

    S' = keep S + (add K)^T V      z' = keep z + sum_j add_j k_j                                 (`states_kernel`)
    num = (Q K^T * pair) V + read Q S      den = rowsum(Q K^T * pair) + read Q z                 (`output_kernel`)

Backward, with ``P_ij = d_num_i . v_j + d_den_i`` (d_den counted by value tile 0 only) and ``G [f, v]``, ``Gz [f]``
the cotangent sums of the later blocks' queries, ``G' = keep G + (add Q)^T d_num`` walking the blocks from the last
(`backward_states_kernel`, the factors of a backward walk)::

    dq = (P * pair) K + read (d_num S^T + d_den z)                     (the forward walk's factors)
    dk = (P * pair)^T Q + read (V G^T + Gz)                              (the backward walk's: pair transposed,
    dv = (Q K^T * pair)^T d_num + read K G                               read and add swapped)

(`backward_blocks_kernel`, one program per block).

Shape key: l the padded length, f features, bv value tile, c block length.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ..pallas import dot
from .chunk_tiles import block_step, carried_run, scale, scale_rows


def _gate_refs(refs: list, decayed: bool, segmented: bool, neighbours: int) -> tuple:
    """Pop ``log_decay``, the run ids and ``neighbours`` more run-id refs (None where absent) off ``refs``."""
    decay_ref = refs.pop(0) if decayed else None
    run_refs = [refs.pop(0) if segmented else None for _ in range(1 + neighbours)]
    return (decay_ref, *run_refs)


def _first_tile():
    """1.0 in value tile 0, else 0.0: d_den is counted once across the value tiles."""
    return (pl.program_id(3) == 0).astype(jnp.float32)


def states_kernel(k_ref, v_ref, *refs, c: int, decayed: bool, segmented: bool):
    """One (batch row, kv head, value tile), the blocks in order: ``k [l, f]``, ``v [l, bv]``, ``log_decay [l]``,
    ``runs [l]`` (where present) -> the sums entering each block, ``S [blocks, f, bv]`` and ``z [blocks, f]``."""
    refs = list(refs)
    decay_ref, run_ref = _gate_refs(refs, decayed, segmented, 0)
    states_ref, sums_ref = refs

    def body(i, carry):
        s, z, run = carry  # s [f, bv], z [f] float32; run: the carried sums' (segmented only)
        states_ref[i], sums_ref[i] = s, z
        rows = pl.ds(pl.multiple_of(i * c, c), c)
        k = k_ref[rows, :]
        step = block_step(rows, c, decay_ref, run_ref, run)
        kw = scale_rows(k, step.add)
        s = scale(s, step.keep) + dot(kw.astype(k.dtype), v_ref[rows, :], trans_a=True)
        return s, scale(z, step.keep) + jnp.sum(kw, axis=0), step.run

    fp, bv = k_ref.shape[-1], v_ref.shape[-1]
    lax.fori_loop(0, k_ref.shape[0] // c, body, (jnp.zeros((fp, bv), jnp.float32), jnp.zeros((fp,), jnp.float32),
                                                jnp.int32(-1)))


def output_kernel(q_ref, k_ref, v_ref, s_ref, z_ref, *refs, c: int, decayed: bool, segmented: bool):
    """One (block, batch row, query head, value tile): ``q [c, f]``, ``k [c, f]``, ``v [c, bv]``, the sums entering
    the block ``S [f, bv]``, ``z [f]``, then ``log_decay [c]`` and the run ids of the block and of the one before
    (where present) -> ``num [c, bv]``, ``den [c]``."""
    refs = list(refs)
    decay_ref, run_ref, previous_ref = _gate_refs(refs, decayed, segmented, 1)
    num_ref, den_ref = refs
    carried = carried_run(previous_ref) if segmented else jnp.int32(-1)
    step = block_step(pl.ds(0, c), c, decay_ref, run_ref, carried)
    q, v = q_ref[...], v_ref[...]
    weights = dot(q, k_ref[...], trans_b=True) * step.pair  # [c, c] float32
    num_ref[...] = dot(weights.astype(v.dtype), v) + scale_rows(dot(q, s_ref[...].astype(q.dtype)), step.read)
    den_ref[...] = jnp.sum(weights, axis=1) + jnp.sum(scale_rows(q, step.read) * z_ref[...][None, :], axis=1)


def backward_states_kernel(q_ref, dnum_ref, dden_ref, *refs, c: int, decayed: bool, segmented: bool):
    """One (batch row, query head, value tile), the blocks from the last: ``q [l, f]``, ``d_num [l, bv]``,
    ``d_den [l]``, ``log_decay [l]``, ``runs [l]`` (where present) -> the cotangent sums of the blocks after each
    block, ``G [blocks, f, bv]`` and ``Gz [blocks, f]``."""
    refs = list(refs)
    decay_ref, run_ref = _gate_refs(refs, decayed, segmented, 0)
    states_ref, sums_ref = refs
    blocks, first_tile = q_ref.shape[0] // c, _first_tile()

    def body(t, carry):
        gs, gz, run = carry  # gs [f, bv], gz [f] float32; run: the carried sums' (segmented only)
        i = blocks - 1 - t
        states_ref[i], sums_ref[i] = gs, gz
        rows = pl.ds(pl.multiple_of(i * c, c), c)
        q, dn = q_ref[rows, :], dnum_ref[rows, :]
        step = block_step(rows, c, decay_ref, run_ref, run, backward=True)
        qw = scale_rows(q, step.add)
        gs = scale(gs, step.keep) + dot(qw.astype(q.dtype), dn.astype(q.dtype), trans_a=True)
        gz = scale(gz, step.keep) + jnp.sum(qw * (dden_ref[rows] * first_tile)[:, None], axis=0)
        return gs, gz, step.run

    fp, bv = q_ref.shape[-1], dnum_ref.shape[-1]
    lax.fori_loop(0, blocks, body, (jnp.zeros((fp, bv), jnp.float32), jnp.zeros((fp,), jnp.float32),
                                    jnp.int32(-1)))


def backward_blocks_kernel(q_ref, k_ref, v_ref, dnum_ref, dden_ref, s_ref, z_ref, g_ref, gz_ref, *refs, c: int,
                     decayed: bool, segmented: bool):
    """One (block, batch row, query head, value tile): `output_kernel`'s rows, ``d_num [c, bv]``, ``d_den [c]``,
    the forward's sums entering the block ``S [f, bv]``, ``z [f]``, the cotangent sums of the later blocks ``G [f,
    bv]``, ``Gz [f]``, then ``log_decay [c]`` and the run ids of the block, the one before and the one after (where
    present) -> ``dq [c, f]``, ``dk [c, f]`` (this value tile's and query head's shares), ``dv [c, bv]`` (this
    query head's)."""
    refs = list(refs)
    decay_ref, run_ref, previous_ref, next_ref = _gate_refs(refs, decayed, segmented, 2)
    dq_ref, dk_ref, dv_ref = refs
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    dn, dd = dnum_ref[...].astype(v.dtype), dden_ref[...] * _first_tile()
    rows = pl.ds(0, c)
    step = block_step(rows, c, decay_ref, run_ref, carried_run(previous_ref) if segmented else jnp.int32(-1))
    p = (dot(dn, v, trans_b=True) + dd[:, None]) * step.pair  # [c(q), c(k)]
    inter = dot(dn, s_ref[...].astype(dn.dtype), trans_b=True) + dd[:, None] * z_ref[...][None, :]
    dq_ref[...] = dot(p.astype(k.dtype), k) + scale_rows(inter, step.read)
    carried = carried_run(next_ref, backward=True) if segmented else jnp.int32(-1)
    step = block_step(rows, c, decay_ref, run_ref, carried, backward=True)  # pair [c(k), c(q)]
    g = g_ref[...]
    scores = dot(k, q, trans_b=True) * step.pair
    p = (dot(v, dn, trans_b=True) + dd[None, :]) * step.pair
    dv_ref[...] = dot(scores.astype(dn.dtype), dn) + scale_rows(dot(k, g.astype(k.dtype)), step.read)
    dk_ref[...] = dot(p.astype(q.dtype), q) + scale_rows(dot(v, g.astype(v.dtype), trans_b=True)
                                                         + gz_ref[...][None, :], step.read)
