"""Entry-point checks shared by the attention kernels: ranks, shapes, dtypes, and the arguments every kernel takes.

Shape key: b batch, q query length, k key length, h query heads, n kv heads, d head dim, v value head dim.
"""
from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from .masks import Mask


@dataclasses.dataclass(frozen=True)
class Dims:
    """Static sizes of one attention call."""

    batch: int
    lq: int
    lk: int
    heads: int
    kv_heads: int
    head_dim: int
    value_dim: int

    @property
    def groups(self) -> int:
        """Query heads per kv head (1 for MHA, ``heads`` for MQA)."""
        return self.heads // self.kv_heads


def check_rank4(name: str, x, layout: str) -> None:
    """Raise `ValueError` unless ``x`` is an array of rank 4 (``layout`` names its axes in the message)."""
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"{name} must have shape {layout} (rank 4), got shape {getattr(x, 'shape', type(x))}")


def check_qkv(q: jax.Array, k: jax.Array, v: jax.Array) -> Dims:
    """Validate ``q [b, q, h, d]``, ``k [b, k, n, d]``, ``v [b, k, n, v]`` of one floating dtype, with ``h``, ``n``,
    ``d``, ``v`` at least 1 and ``h % n == 0``; return the sizes."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_rank4(name, x, "[batch, length, heads, head_dim]")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    dtypes = [jax.dtypes.canonicalize_dtype(x.dtype) for x in (q, k, v)]  # NumPy float64 is float32 without x64
    if len(set(dtypes)) > 1:  # impls disagree on mixed dtypes (xla rejects them): one rule for all
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them first, "
                         "e.g. k.astype(q.dtype)")
    b, lq, h, d = q.shape
    _, lk, n, _ = k.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"q, k, v batch sizes differ: {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    if k.shape[3] != d:
        raise ValueError(f"q and k head_dim differ: {d} vs {k.shape[3]}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must match k in batch, length and heads: k {k.shape}, v {v.shape}")
    sizes = {"heads": h, "kv heads": n, "head_dim": d, "value head_dim": v.shape[3]}
    if min(sizes.values()) < 1:
        raise ValueError(f"q, k, v need at least 1 head and head_dim >= 1, got {sizes}")
    if h % n != 0:
        raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({n}) for GQA/MQA")
    return Dims(b, lq, lk, h, n, d, v.shape[3])


def check_step_qkv(fn: str, q_t, k_t, v_t) -> tuple[int, int, int, int, int]:
    """Check one decoding position's ``q_t [b, h, d]``, ``k_t [b, n, d]``, ``v_t [b, n, v]`` for the step function
    ``fn``; return ``(b, h, d, n, v)``."""
    if any(getattr(x, "ndim", None) != 3 for x in (q_t, k_t, v_t)):
        raise ValueError(f"{fn} takes one position: q_t [b, h, d], k_t [b, n, d], v_t [b, n, v]; got shapes "
                         f"{[getattr(x, 'shape', type(x)) for x in (q_t, k_t, v_t)]}")
    b, h, d = q_t.shape
    n, dv = k_t.shape[1], v_t.shape[2]
    if k_t.shape != (b, n, d) or v_t.shape[:2] != (b, n) or not 0 < n <= h or h % n:
        raise ValueError(f"q_t [b, h, d], k_t [b, n, d], v_t [b, n, v] disagree (h must be a multiple of n >= 1): "
                         f"got {q_t.shape}, {k_t.shape}, {v_t.shape}")
    return b, h, d, n, dv


def check_mask(mask: Mask | None, dims: Dims) -> Mask:
    """Default a missing mask to 'attend everywhere' and check it fits the call: shapes always, and the lengths
    ``kv_lengths``/``prefix_lengths [b]`` in ``[0, lk]`` when their values are concrete (under `jax.jit` they are
    tracers and cannot be read)."""
    if mask is None:
        return Mask()
    if not isinstance(mask, Mask):
        raise ValueError(f"mask must be a flaxformer_lite Mask (True = attend), got {type(mask).__name__}; "
                         "build one with Mask(causal=..., kv_lengths=..., ...)")
    mask.check_shapes(dims.batch, dims.lq, dims.lk)
    for name in ("kv_lengths", "prefix_lengths"):
        _check_lengths_in_range(name, getattr(mask, name), dims.lk)
    return mask


def _check_lengths_in_range(name: str, lengths, lk: int) -> None:
    """Raise `ValueError` if concrete ``lengths [b]`` leave ``[0, lk]``: the kernels would clamp them silently."""
    concrete = isinstance(lengths, (jax.Array, np.ndarray)) and not isinstance(lengths, jax.core.Tracer)
    if not concrete or not getattr(lengths, "is_fully_addressable", True):  # traced, or other hosts hold some rows
        return
    values = np.asarray(lengths)
    bad = np.flatnonzero((values < 0) | (values > lk))
    if bad.size:
        raise ValueError(f"Mask.{name} must be in [0, {lk}] (the key length), got {values[bad[0]]} "
                         f"(batch row {bad[0]})")


def check_bias(bias: jax.Array | None, dims: Dims) -> jax.Array | None:
    """Return ``bias`` as rank 4, each dim 1 or full: broadcastable to ``[b, h, q, k]``."""
    if bias is None:
        return None
    bias = jnp.asarray(bias)
    if bias.ndim > 4:
        raise ValueError(f"bias must be broadcastable to [batch, heads, lq, lk], got rank {bias.ndim}")
    bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
    full = (dims.batch, dims.heads, dims.lq, dims.lk)
    if any(s not in (1, f) for s, f in zip(bias.shape, full)):
        raise ValueError(f"bias shape {bias.shape} is not broadcastable to [batch, heads, lq, lk] = {list(full)}")
    return bias


def check_scale(scale: float | None, dims: Dims) -> float:
    """Default the logit scale to ``1/sqrt(head_dim)``."""
    if scale is None:
        return 1.0 / math.sqrt(dims.head_dim)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise ValueError(f"scale must be a Python number (static), got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    return float(scale)


def check_dropout(rate: float, rng: jax.Array | None) -> float:
    """Validate dropout on the attention weights: ``0 <= rate < 1`` and an rng whenever ``rate > 0``."""
    if not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout_rate must be a number in [0, 1), got {rate!r}")
    if rate > 0 and rng is None:
        raise ValueError("dropout_rate > 0 needs dropout_rng (a PRNG key); pass dropout_rate=0.0 for inference")
    return float(rate)


def check_block_size(name: str, size) -> int:
    """Validate a block length, a tile along the sequence (a static Python int >= 1: ``block_q``, ``block_kv``,
    ``block_size``); return it."""
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"{name} must be a positive int, got {size!r}")
    return int(size)


def check_valid(name: str, valid, shape: tuple) -> jax.Array | None:
    """``valid`` as a bool array of ``shape``, or None."""
    if valid is None:
        return None
    valid = jnp.asarray(valid)
    if valid.shape != tuple(shape) or valid.dtype != jnp.bool_:
        raise ValueError(f"{name} must be bool {list(shape)} (True = a real position), got {valid.dtype} "
                         f"{list(valid.shape)}")
    return valid
