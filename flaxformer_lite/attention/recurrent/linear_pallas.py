"""`pallas_causal_sums`: causal (optionally gated) linear attention's sums as Pallas kernels.

The GPU counterpart of `linear_causal.causal_sums` with no key log-scales (elu+1, relu: features computed outside,
keys that padding hides arriving with zero features). For row i and the keys j <= i of its segment::

    num_i = sum_j D_ij (qf_i . kf_j) v_j        den_i = sum_j D_ij (qf_i . kf_j)

with ``D_ij = exp(a_{j+1} + ... + a_i)`` for the log decay ``a <= 0`` (D = 1 without one): the recurrence
``S_t = exp(a_t) S_{t-1} + kf_t v_t^T``, ``z_t`` likewise, both zeroed where the segment changes.

The work is split as flash-linear-attention's chunk kernels split it (`linear_pallas_kernels`), so that only a
walk carrying the sums is sequential and each block's quadratic part runs in parallel across blocks:

1. ``linear_causal_states``, one program per (batch row, kv head, value tile): a `lax.fori_loop` over the blocks
   carries ``S [f, v]`` and ``z [f]`` in float32 and stores the sums entering each block; per block ``S <-
   exp(A_last) S`` (0 if the block starts a new segment) ``+ sum_j exp(A_last - A_j) k_j v_j^T`` over the keys of
   the block's last segment (``A_i``: the log decay summed from the block's start to row i);
2. ``linear_causal_output``, one program per (block, batch row, query head, value tile): the block's quadratic part
   ``(Q K^T * exp(A_i - A_j) * [j <= i, same segment]) V`` and its row sums, plus ``exp(A_i) (Q S, Q z)`` from the
   sums entering the block, for the rows whose segment is the carried one.

The sums depend on the kv head only, so a GQA group's query heads share one walk. Decays are <= 1 and there are no
key log-scales, so every exponent is <= 0 and no running maximum is needed. `chunk_tiles.block_step` gives each
block's decays and segment masks; the run carried into a block is the largest run id of the block before
(`chunk_tiles.carried_run`), so the parallel kernels know it without the walk. Matmul operands keep the input dtype
(bf16 stays bf16) and accumulate in float32.

The backward (a `custom_vjp`) mirrors it: ``linear_causal_backward_states`` walks the blocks from the last per
(batch row, query head, value tile), storing the cotangent sums ``G [f, v]``, ``Gz [f]`` of the later blocks'
queries; ``linear_causal_backward_blocks``, parallel over (block, batch row, query head, value tile), gives each
block's query gradients from the forward's stored sums and its key and value gradients from ``G``. The log decay's
gradient follows from those by `linear_causal.decay_grad`'s identity. Stored between the passes: one ``[f, v]``
state per block and head, as flash-linear-attention stores them; nothing of size ``[l, f, v]``.

Shape key: b batch, l length (padded to a block multiple inside), n kv heads, g = h // n query heads per kv head,
f features, v value dim (both padded to powers of two >= 16), c block length.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ..pallas import block_length, padded_dim, tile_size, unsupported
from .chunk_tiles import Specs, f32, grid, launch, operands
from .common import run_ids
from .linear_causal import decay_grad
from .linear_pallas_kernels import backward_blocks_kernel, backward_states_kernel, output_kernel, states_kernel

def pallas_unsupported(feature_has_scale: bool, dtype, backend: str | None = None) -> str | None:
    """Why `pallas_causal_sums` cannot compute a call, or None if it can.

    Args:
      feature_has_scale: the feature map gives keys log-scales (FAVOR+), which the kernel does not take.
      dtype: the matmul operand dtype.
      backend: ``jax.default_backend()`` when None.
    """
    backend = jax.default_backend() if backend is None else backend
    if feature_has_scale:
        return "a feature map with key log-scales (FAVOR+): the kernel takes plain features (elu, relu)"
    return unsupported("the linear attention kernels", backend, dtype)


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


# -- custom_vjp: two forward kernels, two backward kernels ----------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sums(plan: _Plan, qf, kf, v, runs, log_decay):
    return _forward(plan, qf, kf, v, runs, log_decay)[:2]


def _sums_fwd(plan: _Plan, qf, kf, v, runs, log_decay):
    num, den, entering = _forward(plan, qf, kf, v, runs, log_decay)
    return (num, den), (qf, kf, v, runs, log_decay, entering)


def _sums_bwd(plan: _Plan, res, cotangents):
    qf, kf, v, runs, log_decay, entering = res
    dqf, dkf, dv = _backward(plan, qf, kf, v, runs, log_decay, entering, *cotangents)
    dlog = None if log_decay is None else decay_grad(qf, kf, dqf, dkf)
    return dqf.astype(qf.dtype), dkf.astype(kf.dtype), dv.astype(v.dtype), None, dlog


_sums.defvjp(_sums_fwd, _sums_bwd)


def _lay_out(plan: _Plan, qf, kf, v, runs, log_decay) -> tuple[list, list]:
    """`chunk_tiles.operands`, split: ``([qf, kf, v], [log_decay, runs] where present)``."""
    ops = operands(qf, kf, v, [log_decay], runs, plan.block, plan.dtype)
    return ops[:3], ops[3:]


def _gate_specs(specs: Specs, per: int, decayed: bool, segmented: bool, neighbours=()) -> list:
    """Specs of the log decay and the run ids (and those of the blocks at ``neighbours``: -1 before, +1 after)."""
    runs = [specs.runs()] + [specs.runs(i, blocks) for i, blocks in neighbours]
    return [specs.positions(per)] * decayed + runs * segmented


def _forward(plan: _Plan, qf, kf, v, runs, log_decay):
    """Lay out, run the two forward kernels, and cut back: ``(num [b, l, n, g, v], den [b, l, n, g], entering)``
    float32, with ``entering = (S [b, blocks, n, fp, vp], z [b, blocks, n, tiles, fp])`` the sums entering each
    block (a copy of z per value tile)."""
    b, l, n, g, _ = qf.shape
    (q, k, vals), gates = _lay_out(plan, qf, kf, v, runs, log_decay)
    lp, h, fp, vp, blocks, tiles, flags, par, seq = grid(q, vals, plan.block, plan.block_v, log_decay, runs)
    bv = plan.block_v
    entering = launch(  # per kv head and value tile, the blocks in order
        functools.partial(states_kernel, **flags), [k, vals] + gates,
        [seq.rows(fp), seq.rows(vp, tile=True)] + _gate_specs(seq, 1, flags["decayed"], flags["segmented"]),
        [seq.states(blocks, fp), seq.sums(blocks, fp)],
        [f32(b, blocks, n, fp, vp), f32(b, blocks, n, tiles, fp)], (1, b, n, tiles), max(fp, bv),
        plan.interpret, "linear_causal_states")
    num, den = launch(  # per block, query head and value tile; den [b, h, tiles, lp]: each tile writes a copy
        functools.partial(output_kernel, **flags), [q, k, vals, *entering] + gates + gates[-1:] * flags["segmented"],
        [par.rows(fp), par.rows(fp, g), par.rows(vp, g, tile=True), par.state(fp, g), par.sum(fp, g)]
        + _gate_specs(par, g, flags["decayed"], flags["segmented"], [(-1, blocks)]),
        [par.rows(vp, tile=True), par.tile_copies()], [f32(b, lp, h, vp), f32(b, h, tiles, lp)],
        (blocks, b, h, tiles), max(fp, bv), plan.interpret, "linear_causal_output")
    num = num[:, :l, :, :v.shape[-1]].reshape(b, l, n, g, v.shape[-1])
    den = jnp.moveaxis(den[:, :, 0, :l], 1, 2).reshape(b, l, n, g)
    return num, den, entering


def _backward(plan: _Plan, qf, kf, v, runs, log_decay, entering, d_num, d_den):
    """Lay out, run the two backward kernels, and sum their partial gradients: ``(dqf, dkf, dv)`` float32 in the
    shapes of ``qf``, ``kf``, ``v``. ``entering``: `_forward`'s; ``d_num [b, l, n, g, v]``, ``d_den [b, l, n, g]``:
    the cotangents of the sums."""
    b, l, n, g, f = qf.shape
    (q, k, vals), gates = _lay_out(plan, qf, kf, v, runs, log_decay)
    lp, h, fp, vp, blocks, tiles, flags, par, seq = grid(q, vals, plan.block, plan.block_v, log_decay, runs)
    bv = plan.block_v
    dn = jnp.pad(d_num.astype(jnp.float32).reshape(b, l, h, -1), [(0, 0), (0, lp - l), (0, 0), (0, vp - v.shape[-1])])
    dd = jnp.pad(jnp.moveaxis(d_den.astype(jnp.float32).reshape(b, l, h), 1, 2), [(0, 0), (0, 0), (0, lp - l)])
    later = launch(  # per query head and value tile, the blocks from the last
        functools.partial(backward_states_kernel, **flags), [q, dn, dd] + gates,
        [seq.rows(fp), seq.rows(vp, tile=True), seq.positions()]
        + _gate_specs(seq, g, flags["decayed"], flags["segmented"]),
        [seq.states(blocks, fp), seq.sums(blocks, fp)],
        [f32(b, blocks, h, fp, vp), f32(b, blocks, h, tiles, fp)], (1, b, h, tiles), max(fp, bv),
        plan.interpret, "linear_causal_backward_states")
    segs = [gates[-1]] * 2 if runs is not None else []
    dq, dk, dv = launch(  # dq, dk [b, tiles, lp, h, fp]: each value tile's share; dv [b, lp, h, vp]: per query head
        functools.partial(backward_blocks_kernel, **flags), [q, k, vals, dn, dd, *entering, *later] + gates + segs,
        [par.rows(fp), par.rows(fp, g), par.rows(vp, g, tile=True), par.rows(vp, tile=True), par.positions(),
         par.state(fp, g), par.sum(fp, g), par.state(fp), par.sum(fp)]
        + _gate_specs(par, g, flags["decayed"], flags["segmented"], [(-1, blocks), (1, blocks)]),
        [par.tile_shares(fp), par.tile_shares(fp), par.rows(vp, tile=True)],
        [f32(b, tiles, lp, h, fp)] * 2 + [f32(b, lp, h, vp)], (blocks, b, h, tiles), max(fp, bv),
        plan.interpret, "linear_causal_backward_blocks")
    dq = jnp.sum(dq[:, :, :l, :, :f], 1).reshape(b, l, n, g, f)
    dk = jnp.sum(dk[:, :, :l, :, :f], 1).reshape(b, l, n, g, f).sum(3)
    dv = dv[:, :l, :, :v.shape[-1]].reshape(b, l, n, g, -1).sum(3)
    return dq, dk, dv
