"""`pallas_causal_sums`: causal (optionally gated) linear attention's sums as one fused Pallas kernel.

The GPU counterpart of `linear_causal.causal_sums` with no key log-scales (elu+1, relu: features computed outside,
keys that padding hides arriving with zero features). For row i and the keys j <= i of its segment::

    num_i = sum_j D_ij (qf_i . kf_j) v_j        den_i = sum_j D_ij (qf_i . kf_j)

with ``D_ij = exp(a_{j+1} + ... + a_i)`` for the log decay ``a <= 0`` (D = 1 without one): the recurrence
``S_t = exp(a_t) S_{t-1} + kf_t v_t^T``, ``z_t`` likewise, both zeroed where the segment changes.

One program per (batch row, query head, value tile) walks the sequence in blocks of c positions with a
`lax.fori_loop`, carrying ``S [f, v]`` and ``z [f]`` in float32 (flash-linear-attention's chunk forward). Per block,
with ``A_i`` the log decay summed from the block's start to row i (a masked row sum over at most c terms):

1. intra: ``(Q K^T * exp(A_i - A_j) * [j <= i, same segment]) V`` and its row sums;
2. inter: ``exp(A_i) (Q S, Q z)`` for the rows whose segment is the carried state's;
3. state: ``S <- exp(A_last) S`` (0 if the block starts a new segment) ``+ sum_j exp(A_last - A_j) k_j v_j^T`` over
   the keys of the block's last segment.

Decays are <= 1 and there are no key log-scales, so every exponent is <= 0 and no running maximum is needed.
`pallas_tiles.block_step` gives each block's decays and segment masks. Matmul operands keep the input dtype (bf16
stays bf16) and accumulate in float32.

The backward (a `custom_vjp`) is a second kernel on the same grid, flash-linear-attention's chunk backward: one walk
forward over the blocks for the query gradients, one walk backward for the key and value gradients, each carrying its
own ``[f, v]`` state (`_backward_kernel`). The log decay's gradient follows from those by
`linear_causal.decay_grad`'s identity; nothing of size ``[l, f, v]`` is stored.

Shape key: b batch, l length (padded to a block multiple inside), n kv heads, g = h // n query heads per kv head,
f features, v value dim (both padded to powers of two >= 16), c block length.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .linear_causal import decay_grad, run_ids
from .pallas_tiles import (Specs, block_length, block_step, dot, launch, operands, padded_dim, scale, scale_rows,
                           tile_size)

_DTYPES = ("float32", "bfloat16", "float16")


def pallas_unsupported(feature_has_scale: bool, dtype, backend: str | None = None) -> str | None:
    """Why `pallas_causal_sums` cannot compute a call, or None if it can.

    Args:
      feature_has_scale: the feature map gives keys log-scales (FAVOR+), which the kernel does not take.
      dtype: the matmul operand dtype.
      backend: ``jax.default_backend()`` when None.
    """
    backend = jax.default_backend() if backend is None else backend
    if backend not in ("gpu", "cpu"):
        return f"the linear attention kernel targets Triton on GPU (and interpret mode on CPU), not {backend!r}"
    if feature_has_scale:
        return "a feature map with key log-scales (FAVOR+): the kernel takes plain features (elu, relu)"
    if jnp.dtype(dtype).name not in _DTYPES:
        return f"dtype {jnp.dtype(dtype).name} (the linear attention kernel takes {', '.join(_DTYPES)})"
    return None


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static description of one call (hashable: a `custom_vjp` non-diff argument)."""

    block: int  # c
    block_v: int  # value tile of one program
    dtype: str  # matmul operand dtype
    interpret: bool


def pallas_causal_sums(qf: jax.Array, kf: jax.Array, v: jax.Array, seg: jax.Array | None,
                       log_decay: jax.Array | None, *, block: int = 64, block_v: int = 64, dtype=None,
                       interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """Causal linear attention sums, ``(num [b, l, n, g, v], den [b, l, n, g])`` float32 (`causal_sums` with
    ``ka=None``).

    Args:
      qf: query features ``[b, l, n, g, f]``; kf: key features ``[b, l, n, f]`` (zero where padding hides a key);
        v: values ``[b, l, n, v]``.
      seg: int segment ids ``[b, l]`` for queries and keys alike (the state restarts where they change), or None.
      log_decay: float ``[b, l, n]`` (<= 0; 0 where padding hides a key), or None for no decay.
      block: block length c, a power of two >= 16, clipped to 128 and to l rounded up to a power of two.
      block_v: value tile per program, a power of two >= 16 (clipped to the padded value dim).
      dtype: matmul operand dtype; None takes v's. Products accumulate in float32.
      interpret: Pallas interpret mode; None uses it exactly when JAX runs on the CPU.
    """
    b, l, n, g, f = _check(qf, kf, v, seg, log_decay)
    dtype = jnp.dtype(v.dtype if dtype is None else dtype)
    reason = pallas_unsupported(False, dtype)
    if reason:
        raise ValueError(f"pallas_causal_sums cannot run this call: {reason}")
    c = block_length(block, l)
    bv = min(tile_size("block_v", block_v, None), padded_dim(v.shape[-1]))
    if l == 0:
        return jnp.zeros((b, 0, n, g, v.shape[-1]), jnp.float32), jnp.zeros((b, 0, n, g), jnp.float32)
    plan = _Plan(block=c, block_v=bv, dtype=dtype.name,
                 interpret=jax.default_backend() == "cpu" if interpret is None else bool(interpret))
    runs = run_ids(seg)
    return _sums(plan, qf, kf, v, runs, None if log_decay is None else log_decay.astype(jnp.float32))


def _check(qf, kf, v, seg, log_decay) -> tuple[int, int, int, int, int]:
    """Check the shapes against each other; return ``(b, l, n, g, f)``."""
    if getattr(qf, "ndim", None) != 5:
        raise ValueError(f"qf must have shape [b, l, n, g, f] (rank 5), got {getattr(qf, 'shape', type(qf))}")
    b, l, n, g, f = qf.shape
    if getattr(kf, "shape", None) != (b, l, n, f):
        raise ValueError(f"kf must have shape [b, l, n, f] = {[b, l, n, f]}, got {getattr(kf, 'shape', None)}")
    if getattr(v, "ndim", None) != 4 or v.shape[:3] != (b, l, n):
        raise ValueError(f"v must have shape [b, l, n, v] with [b, l, n] = {[b, l, n]}, got {getattr(v, 'shape', v)}")
    if seg is not None and (jnp.shape(seg) != (b, l) or not jnp.issubdtype(jnp.result_type(seg), jnp.integer)):
        raise ValueError(f"seg must be int [b, l] = {[b, l]}, got {jnp.result_type(seg)} {list(jnp.shape(seg))}")
    if log_decay is not None and jnp.shape(log_decay) != (b, l, n):
        raise ValueError(f"log_decay must have shape [b, l, n] = {[b, l, n]}, got {list(jnp.shape(log_decay))}")
    return b, l, n, g, f


# -- custom_vjp: a forward kernel and a backward kernel -------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sums(plan: _Plan, qf, kf, v, runs, log_decay):
    return _forward(plan, qf, kf, v, runs, log_decay)


def _sums_fwd(plan: _Plan, qf, kf, v, runs, log_decay):
    return _forward(plan, qf, kf, v, runs, log_decay), (qf, kf, v, runs, log_decay)


def _sums_bwd(plan: _Plan, res, cotangents):
    qf, kf, v, runs, log_decay = res
    dqf, dkf, dv = _backward(plan, qf, kf, v, runs, log_decay, *cotangents)
    dlog = None if log_decay is None else decay_grad(qf, kf, dqf, dkf)
    return dqf.astype(qf.dtype), dkf.astype(kf.dtype), dv.astype(v.dtype), None, dlog


_sums.defvjp(_sums_fwd, _sums_bwd)


def _lay_out(plan: _Plan, qf, kf, v, runs, log_decay, specs: Specs, per: int) -> tuple[list, list]:
    """`pallas_tiles.operands` and their specs: ``qf``, ``kf``, ``v`` (its value tile), then ``log_decay`` and the
    run ids where present."""
    ops = operands(qf, kf, v, [log_decay], runs, plan.block, plan.dtype)
    fp = ops[0].shape[-1]
    in_specs = [specs.rows(fp), specs.rows(fp, per), specs.rows(ops[2].shape[-1], per, tile=True)]
    in_specs += [specs.positions(per)] * (log_decay is not None) + [specs.runs()] * (runs is not None)
    return ops, in_specs


def _forward(plan: _Plan, qf, kf, v, runs, log_decay):
    """Lay out, run the forward kernel, and cut back: ``(num [b, l, n, g, v], den [b, l, n, g])`` float32."""
    b, l, n, g, _ = qf.shape
    lp, bv = -(-l // plan.block) * plan.block, plan.block_v
    seq = Specs(lp, bv)
    operands, specs = _lay_out(plan, qf, kf, v, runs, log_decay, seq, g)
    _, lp, h, fp = operands[0].shape
    vp = operands[2].shape[-1]
    tiles = vp // bv
    num, den = launch(  # den [b, h, tiles, lp]: each value tile writes its own copy
        functools.partial(_forward_kernel, plan=plan, decayed=log_decay is not None, segmented=runs is not None),
        operands, specs, [seq.rows(vp, tile=True), seq.tile_copies()],
        [jax.ShapeDtypeStruct((b, lp, h, vp), jnp.float32), jax.ShapeDtypeStruct((b, h, tiles, lp), jnp.float32)],
        (1, b, h, tiles), max(fp, bv), plan.interpret, "linear_causal_forward")
    num = num[:, :l, :, :v.shape[-1]].reshape(b, l, n, g, v.shape[-1])
    den = jnp.moveaxis(den[:, :, 0, :l], 1, 2).reshape(b, l, n, g)
    return num, den


def _backward(plan: _Plan, qf, kf, v, runs, log_decay, d_num, d_den):
    """Lay out, run the backward kernel, and sum its partial gradients: ``(dqf, dkf, dv)`` float32 in the shapes of
    ``qf``, ``kf``, ``v``. ``d_num [b, l, n, g, v]``, ``d_den [b, l, n, g]``: the cotangents of the sums."""
    b, l, n, g, f = qf.shape
    lp, bv = -(-l // plan.block) * plan.block, plan.block_v
    seq = Specs(lp, bv)
    operands, specs = _lay_out(plan, qf, kf, v, runs, log_decay, seq, g)
    _, lp, h, fp = operands[0].shape
    vp = operands[2].shape[-1]
    tiles = vp // bv
    operands.append(jnp.pad(d_num.astype(jnp.float32).reshape(b, l, h, -1),
                            [(0, 0), (0, lp - l), (0, 0), (0, vp - v.shape[-1])]))
    operands.append(jnp.pad(jnp.moveaxis(d_den.astype(jnp.float32).reshape(b, l, h), 1, 2),
                            [(0, 0), (0, 0), (0, lp - l)]))
    dq, dk, dv = launch(  # dq, dk [b, tiles, lp, h, fp]: each value tile's share; dv [b, lp, h, vp]: per query head
        functools.partial(_backward_kernel, plan=plan, decayed=log_decay is not None, segmented=runs is not None),
        operands, specs + [seq.rows(vp, tile=True), seq.positions()],
        [seq.tile_shares(fp), seq.tile_shares(fp), seq.rows(vp, tile=True)],
        [jax.ShapeDtypeStruct((b, tiles, lp, h, fp), jnp.float32)] * 2
        + [jax.ShapeDtypeStruct((b, lp, h, vp), jnp.float32)],
        (1, b, h, tiles), max(fp, bv), plan.interpret, "linear_causal_backward")
    dq = jnp.sum(dq[:, :, :l, :, :f], 1).reshape(b, l, n, g, f)
    dk = jnp.sum(dk[:, :, :l, :, :f], 1).reshape(b, l, n, g, f).sum(3)
    dv = dv[:, :l, :, :v.shape[-1]].reshape(b, l, n, g, -1).sum(3)
    return dq, dk, dv


# -- the kernels ------------------------------------------------------------------------------------------------------
def _forward_kernel(q_ref, k_ref, v_ref, *refs, plan: _Plan, decayed: bool, segmented: bool):
    """One (batch row, query head, value tile): ``q [l, f]``, ``k [l, f]``, ``v [l, bv]``, ``log_decay [l]``,
    ``runs [l]`` (where present) -> ``num [l, bv]``, ``den [l]``, block by block with the state carried."""
    refs = list(refs)
    decay_ref = refs.pop(0) if decayed else None
    run_ref = refs.pop(0) if segmented else None
    num_ref, den_ref = refs
    c = plan.block
    fp, bv = q_ref.shape[-1], v_ref.shape[-1]

    def body(i, carry):
        s, z, run = carry  # s [f, bv], z [f] float32; run: the carried state's (segmented only)
        rows = pl.ds(pl.multiple_of(i * c, c), c)
        q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
        step = block_step(rows, c, decay_ref, run_ref, run)
        weights = dot(q, k, trans_b=True) * step.pair  # [c, c] float32
        num_ref[rows, :] = dot(weights.astype(v.dtype), v) + scale_rows(dot(q, s.astype(q.dtype)), step.read)
        den_ref[rows] = jnp.sum(weights, axis=1) + jnp.sum(scale_rows(q, step.read) * z[None, :], axis=1)
        kw = scale_rows(k, step.add)
        s = scale(s, step.keep) + dot(kw.astype(k.dtype), v, trans_a=True)
        z = scale(z, step.keep) + jnp.sum(kw, axis=0)
        return s, z, step.run

    init = (jnp.zeros((fp, bv), jnp.float32), jnp.zeros((fp,), jnp.float32), jnp.int32(-1))
    lax.fori_loop(0, q_ref.shape[0] // c, body, init)


def _backward_kernel(q_ref, k_ref, v_ref, *refs, plan: _Plan, decayed: bool, segmented: bool):
    """One (batch row, query head, value tile): `_forward_kernel`'s inputs, ``d_num [l, bv]`` and ``d_den [l]`` ->
    ``dq [l, f]`` and ``dk [l, f]`` (this value tile's share), ``dv [l, bv]``.

    With ``P_ij = d_num_i . v_j + d_den_i`` (d_den counted by value tile 0 only) and ``D_ij`` the decay of key j at
    row i (0 where j is hidden from i)::

        dq_i = sum_{j <= i} D_ij P_ij k_j        dk_j = sum_{i >= j} D_ij P_ij q_i
        dv_j = sum_{i >= j} D_ij (q_i . k_j) d_num_i

    dq walks the blocks forward carrying ``H = sum_j D v_j k_j^T [bv, f]`` and ``sum_j D k_j [f]``; dk and dv walk
    them backward carrying ``G = sum_i D q_i d_num_i^T [f, bv]`` and ``sum_i D q_i d_den_i [f]``."""
    refs = list(refs)
    decay_ref = refs.pop(0) if decayed else None
    run_ref = refs.pop(0) if segmented else None
    dnum_ref, dden_ref, dq_ref, dk_ref, dv_ref = refs
    c, blocks = plan.block, q_ref.shape[0] // plan.block
    fp, bv = q_ref.shape[-1], v_ref.shape[-1]
    first_tile = (pl.program_id(3) == 0).astype(jnp.float32)

    def load(i):
        rows = pl.ds(pl.multiple_of(i * c, c), c)
        v = v_ref[rows, :]
        return rows, q_ref[rows, :], k_ref[rows, :], v, dnum_ref[rows, :].astype(v.dtype), dden_ref[rows] * first_tile

    def forward(i, carry):  # dq
        h, hz, run = carry  # h [bv, f], hz [f] float32; run: the carried state's
        rows, q, k, v, dn, dd = load(i)
        step = block_step(rows, c, decay_ref, run_ref, run)
        p = (dot(dn, v, trans_b=True) + dd[:, None]) * step.pair  # [c, c]
        inter = dot(dn, h.astype(dn.dtype)) + dd[:, None] * hz[None, :]
        dq_ref[rows, :] = dot(p.astype(k.dtype), k) + scale_rows(inter, step.read)
        kw = scale_rows(k, step.add)
        h = scale(h, step.keep) + dot(v, kw.astype(k.dtype), trans_a=True)
        hz = scale(hz, step.keep) + jnp.sum(kw, axis=0)
        return h, hz, step.run

    def backward(t, carry):  # dk, dv
        gs, gz, run = carry  # gs [f, bv], gz [f] float32; run: the carried state's
        rows, q, k, v, dn, dd = load(blocks - 1 - t)
        step = block_step(rows, c, decay_ref, run_ref, run, backward=True)  # pair [c(k), c(q)]
        scores = dot(k, q, trans_b=True) * step.pair
        p = (dot(v, dn, trans_b=True) + dd[None, :]) * step.pair
        dv_ref[rows, :] = dot(scores.astype(dn.dtype), dn) + scale_rows(dot(k, gs.astype(k.dtype)), step.read)
        dk_ref[rows, :] = dot(p.astype(q.dtype), q) + scale_rows(dot(v, gs.astype(v.dtype), trans_b=True)
                                                                + gz[None, :], step.read)
        qw = scale_rows(q, step.add)
        gs = scale(gs, step.keep) + dot(qw.astype(q.dtype), dn, trans_a=True)
        gz = scale(gz, step.keep) + jnp.sum(qw * dd[:, None], axis=0)
        return gs, gz, step.run

    lax.fori_loop(0, blocks, forward, (jnp.zeros((bv, fp), jnp.float32), jnp.zeros((fp,), jnp.float32),
                                       jnp.int32(-1)))
    lax.fori_loop(0, blocks, backward, (jnp.zeros((fp, bv), jnp.float32), jnp.zeros((fp,), jnp.float32),
                                        jnp.int32(-1)))
