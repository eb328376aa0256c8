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
Segment ids become run indices (0, 1, 2, ... up the sequence, a new one at each change) before the kernel, so a run
is a contiguous range and a block's last run is its largest index. Matmul operands keep the input dtype (bf16 stays
bf16) and accumulate in float32. The backward is a `custom_vjp` that differentiates the XLA form
(`causal_sums`) on the same inputs; only the forward is a kernel.

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
from jax.experimental.pallas import triton as plgpu

from .checks import check_block_size
from .linear_causal import causal_sums

MIN_BLOCK = 16  # Triton's smallest matmul tile
MAX_BLOCK = 128  # [c, c] float32 score and decay tiles live in registers
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
    groups: int  # g
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
    c = _tile("block", block, MAX_BLOCK)
    c = min(c, max(MIN_BLOCK, pl.next_power_of_2(max(l, 1))))
    bv = min(_tile("block_v", block_v, None), _padded(v.shape[-1]))
    if l == 0:
        return jnp.zeros((b, 0, n, g, v.shape[-1]), jnp.float32), jnp.zeros((b, 0, n, g), jnp.float32)
    plan = _Plan(block=c, block_v=bv, groups=g, dtype=dtype.name,
                 interpret=jax.default_backend() == "cpu" if interpret is None else bool(interpret))
    runs = None if seg is None else _runs(jnp.asarray(seg))
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


def _tile(name: str, size, largest: int | None) -> int:
    """A tile size checked to be a power of two >= 16, clipped to ``largest``."""
    size = check_block_size(name, size)
    if size < MIN_BLOCK or size & (size - 1):
        raise ValueError(f"{name} must be a power of two >= {MIN_BLOCK} for the linear attention kernel, got {size}")
    return size if largest is None else min(size, largest)


def _padded(size: int) -> int:
    """Feature and value dims padded to a power of two >= 16 (zeros change no sum)."""
    return max(MIN_BLOCK, pl.next_power_of_2(size))


def _runs(seg: jax.Array) -> jax.Array:
    """int32 ``[b, l]`` run indices: 0 at the start, +1 wherever ``seg [b, l]`` changes."""
    change = jnp.concatenate([jnp.zeros_like(seg[:, :1], jnp.int32), (seg[:, 1:] != seg[:, :-1]).astype(jnp.int32)],
                             1)
    return jnp.cumsum(change, 1, dtype=jnp.int32)


# -- custom_vjp: the kernel forward, the XLA form's backward ---------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sums(plan: _Plan, qf, kf, v, runs, log_decay):
    return _forward(plan, qf, kf, v, runs, log_decay)


def _sums_fwd(plan: _Plan, qf, kf, v, runs, log_decay):
    return _forward(plan, qf, kf, v, runs, log_decay), (qf, kf, v, runs, log_decay)


def _sums_bwd(plan: _Plan, res, cotangents):
    qf, kf, v, runs, log_decay = res

    def xla(qf, kf, v, log_decay):
        return causal_sums(qf, kf, None, v, runs, runs, log_decay, plan.block, dtype=jnp.dtype(plan.dtype),
                           decay_grad_by_identity=True)[:2]

    dqf, dkf, dv, dlog = jax.vjp(xla, qf, kf, v, log_decay)[1](cotangents)
    return dqf, dkf, dv, None, dlog


_sums.defvjp(_sums_fwd, _sums_bwd)


def _forward(plan: _Plan, qf, kf, v, runs, log_decay):
    """Pad, lay out for the kernel, run it, and cut back: ``(num [b, l, n, g, v], den [b, l, n, g])``."""
    b, l, n, g, f = qf.shape
    dv, c = v.shape[-1], plan.block
    lp, fp, vp = -(-l // c) * c, _padded(f), _padded(dv)
    op = jnp.dtype(plan.dtype)
    pad = lambda x, dim: jnp.pad(x.astype(op), [(0, 0), (0, lp - l), (0, 0), (0, dim - x.shape[-1])])
    q = pad(qf.reshape(b, l, n * g, f), fp)
    k, vals = pad(kf, fp), pad(v, vp)
    extra = []
    if log_decay is not None:  # [b, n, l]: one row per kv head; padded positions do not decay
        extra.append(jnp.pad(jnp.moveaxis(log_decay, 1, 2), [(0, 0), (0, 0), (0, lp - l)]))
    if runs is not None:  # padded positions form a run of their own
        extra.append(jnp.concatenate([runs, jnp.broadcast_to(runs[:, -1:] + 1, (b, lp - l))], 1))
    num, den = _call(plan, q, k, vals, *extra, decayed=log_decay is not None, segmented=runs is not None)
    num = num[:, :l, :, :dv].reshape(b, l, n, g, dv)
    den = jnp.moveaxis(den[:, :, 0, :l], 1, 2).reshape(b, l, n, g)
    return num, den


def _call(plan: _Plan, q, k, v, *extra, decayed: bool, segmented: bool):
    """``q [b, l, h, f]``, ``k [b, l, n, f]``, ``v [b, l, n, v]``, then ``log_decay [b, n, l]`` float32 and
    ``runs [b, l]`` int32 where present -> ``num [b, l, h, v]``, ``den [b, h, v / block_v, l]`` float32 (each value
    tile writes its own copy of den)."""
    b, lp, h, fp = q.shape
    vp, bv, g = v.shape[-1], plan.block_v, plan.groups
    tiles = vp // bv
    in_specs = [pl.BlockSpec((None, lp, None, fp), lambda bi, hi, vi: (bi, 0, hi, 0)),
                pl.BlockSpec((None, lp, None, fp), lambda bi, hi, vi: (bi, 0, lax.div(hi, g), 0)),
                pl.BlockSpec((None, lp, None, bv), lambda bi, hi, vi: (bi, 0, lax.div(hi, g), vi))]
    if decayed:
        in_specs.append(pl.BlockSpec((None, None, lp), lambda bi, hi, vi: (bi, lax.div(hi, g), 0)))
    if segmented:
        in_specs.append(pl.BlockSpec((None, lp), lambda bi, hi, vi: (bi, 0)))
    return pl.pallas_call(
        functools.partial(_kernel, plan=plan, decayed=decayed, segmented=segmented),
        grid=(b, h, tiles),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, lp, None, bv), lambda bi, hi, vi: (bi, 0, hi, vi)),
                   pl.BlockSpec((None, None, None, lp), lambda bi, hi, vi: (bi, hi, vi, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, lp, h, vp), jnp.float32),
                   jax.ShapeDtypeStruct((b, h, tiles, lp), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=4 if max(fp, bv) <= 64 else 8, num_stages=2),
        interpret=plan.interpret, name="linear_causal_forward",
    )(q, k, v, *extra)


# -- the kernel -------------------------------------------------------------------------------------------------------
def _dot(a, b, *, trans_a=False, trans_b=False):
    """``a @ b`` (either transposed) accumulated in float32; float32 operands in full precision (no TF32)."""
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=lax.Precision.HIGHEST)


def _kernel(q_ref, k_ref, v_ref, *refs, plan: _Plan, decayed: bool, segmented: bool):
    """One (batch row, query head, value tile): ``q [l, f]``, ``k [l, f]``, ``v [l, bv]``, ``log_decay [l]``,
    ``runs [l]`` (where present) -> ``num [l, bv]``, ``den [l]``, block by block with the state carried."""
    refs = list(refs)
    decay_ref = refs.pop(0) if decayed else None
    run_ref = refs.pop(0) if segmented else None
    num_ref, den_ref = refs
    c = plan.block
    fp, bv = q_ref.shape[-1], v_ref.shape[-1]
    row = jnp.broadcast_to(jnp.arange(c)[:, None], (c, c))
    col = jnp.broadcast_to(jnp.arange(c)[None, :], (c, c))
    lower = col <= row  # [c(q), c(k)]

    def body(i, carry):
        s, z, prev = carry  # s [f, bv], z [f] float32; prev: the run of the carried state (segmented only)
        rows = pl.ds(pl.multiple_of(i * c, c), c)
        q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
        visible = lower
        reads = keeps = owns = None  # rows reading the state, keeping it, keys adding to it (None: all)
        if segmented:
            run = run_ref[rows]
            last = jnp.max(run)  # runs increase along the sequence
            visible = visible & (jnp.broadcast_to(run[:, None], (c, c)) == jnp.broadcast_to(run[None, :], (c, c)))
            reads, keeps, owns = run == prev, last == prev, run == last
            prev = last
        scores = _dot(q, k, trans_b=True)  # [c, c] float32
        if decayed:
            a = decay_ref[rows]
            cum = jnp.sum(jnp.where(lower, jnp.broadcast_to(a[None, :], (c, c)), 0.0), axis=1)  # [c]: A_i
            total = jnp.sum(a)  # A_last
            gap = jnp.broadcast_to(cum[:, None], (c, c)) - jnp.broadcast_to(cum[None, :], (c, c))
            weights = jnp.where(visible, scores * jnp.exp(jnp.where(visible, gap, 0.0)), 0.0)
            into = jnp.exp(cum)  # the entering state's decay at each row
            to_end = jnp.exp(total - cum)  # each key's decay to the block's end
            kept = jnp.exp(total)
        else:
            weights = jnp.where(visible, scores, 0.0)
            into = to_end = None
            kept = jnp.float32(1.0)
        num = _dot(weights.astype(v.dtype), v)
        den = jnp.sum(weights, axis=1)
        if reads is not None:
            into = jnp.where(reads, 1.0 if into is None else into, 0.0)
        state_num = _dot(q, s.astype(q.dtype))  # [c, bv]
        state_den = jnp.sum(q.astype(jnp.float32) * z[None, :], axis=1)
        if into is None:
            num, den = num + state_num, den + state_den
        else:
            num, den = num + into[:, None] * state_num, den + into * state_den
        num_ref[rows, :] = num
        den_ref[rows] = den
        if owns is not None:
            to_end = jnp.where(owns, 1.0 if to_end is None else to_end, 0.0)
        kw = k.astype(jnp.float32) if to_end is None else k.astype(jnp.float32) * to_end[:, None]
        if keeps is not None:
            kept = jnp.where(keeps, kept, 0.0)
        s = kept * s + _dot(kw.astype(k.dtype), v, trans_a=True)
        z = kept * z + jnp.sum(kw, axis=0)
        return s, z, prev

    init = (jnp.zeros((fp, bv), jnp.float32), jnp.zeros((fp,), jnp.float32), jnp.int32(-1))
    lax.fori_loop(0, q_ref.shape[0] // c, body, init)
