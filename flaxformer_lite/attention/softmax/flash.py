"""`flash_attention`: softmax attention as fused Pallas kernels (FlashAttention-2), honouring every `Mask` field.

On a GPU the kernels compile with the Pallas Triton backend; on CPU they run in Pallas interpret mode (for tests).
Unlike `jax.experimental.pallas.ops.gpu.attention.mha` (causal and one shared segment-id array), this covers
prefix-LM, key padding (``kv_lengths``/``kv_valid``), ``q_offset``, a sliding ``window``, separate query/key
segment ids, GQA/MQA, ``lq != lk`` and a value head dim that differs from the query/key one. Softmax statistics are
float32; a query row that may attend no key returns zeros and passes back zero gradients. No bias, no dropout: ask
`flash_unsupported` first. The backward is a `custom_vjp` that recomputes each tile's attention weights from the
saved log-sum-exp.

How the mask reaches the kernels (flash_kernels.py does the rest): four int32 rows padded to block multiples,
``q_pos [b, q] = i + q_offset``, ``kv_pos [b, k] = j`` (INT32_MIN for prefix keys, which every query sees),
``q_seg [b, q]``, ``kv_seg [b, k]`` (segment ids, zeros without segments; INT32_MIN for keys that padding hides,
INT32_MIN + 1 for padded query rows). Query ``i`` sees key ``j`` iff ``q_seg[i] == kv_seg[j]`` and, when causal,
``kv_pos[j] <= q_pos[i]``, and with a ``window`` also ``kv_pos[j] > q_pos[i] - window``. Loop bounds per (batch
row, block) from causal/prefix/offset/padding/window (`block_bounds`, from `attention.bounds`) skip key blocks no
query of a block can see (causal attention does about half the work; a window of w keys visits about w / bk + 1 key
blocks per query block).

Shape key: b batch, q query length, k key length, h query heads, n kv heads, g = h // n, d head dim, v value dim.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .. import bounds
from ..checks import Dims
from ..masks import Mask
from ..pallas import MIN_BLOCK, NUM_STAGES, block_length, padded_dim, unsupported
from .flash_kernels import FlashMasks, FlashPlan, backward_dkdv, backward_dq, forward

MAX_HEAD_DIM = 256  # a padded [block, head_dim] tile per operand must stay on chip
# Blocks are powers of two from 16 to 128 (`pallas.block_length`): a [bq, bk] float32 logits tile lives in registers,
# and 128 x 128 is 64 per thread at 8 warps.
_BWD_BLOCK_MAX = 64  # the backward holds more [bq, bk] float32 tiles live than the forward: smaller blocks
# Float32 operands compiled for a GPU: blocks of at most 32. Compiled offline for sm_90 (benchmarks/
# triton_resources.py), 3xTF32 tiles of 64-128 rows spill 0.3-6.6 KB per thread at any num_warps; at 32 the forward
# and dq kernels spill nothing. (Interpret mode has no registers to spare: it keeps the requested blocks.)
_F32_BLOCK_MAX = 32
# Shared memory one Triton program may use (an A100 has 163 KiB per block, an H100 227 KiB). Checked by compiling
# this module's kernels with Triton 3.9 for sm_80 and sm_90: at these block sizes each stays under 163 KiB.
_SHARED_BYTES = 160 * 1024
_INT32_MIN = int(np.iinfo(np.int32).min)
_ALWAYS = _INT32_MIN  # kv_pos of a prefix key: <= every query position
_HIDDEN = _INT32_MIN  # kv_seg of a key that padding hides: no query has this id
_PAD_QUERY = _INT32_MIN + 1  # q_seg of a padded query row: sees no key


def flash_unsupported(dims: Dims, dtype, mask: Mask | None, bias, dropout_rate: float,
                      backend: str | None = None) -> str | None:
    """Why `flash_attention` cannot compute this call, or None if it can (every `Mask` field is supported).

    Args:
      dims: the call's sizes (`checks.check_qkv`).
      dtype: q/k/v dtype.
      mask: the call's `Mask` (unused: all fields are honoured; kept so every ``*_unsupported`` reads alike).
      bias: the additive logits bias or None.
      dropout_rate: dropout on the attention weights.
      backend: ``jax.default_backend()`` when None.
    """
    del mask
    backend = jax.default_backend() if backend is None else backend
    reason = unsupported("the flash kernels", backend, dtype)
    if reason:
        return reason
    if bias is not None:
        return "an additive bias (bias=...): the flash kernels take none"
    if dropout_rate > 0:
        return "dropout_rate > 0: the flash kernels do not drop attention weights"
    if max(dims.head_dim, dims.value_dim) > MAX_HEAD_DIM:
        return f"head dims above {MAX_HEAD_DIM} (head_dim {dims.head_dim}, value head_dim {dims.value_dim})"
    return None


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, dims: Dims, mask: Mask, scale: float,
                    block_q: int = 128, block_kv: int = 128, interpret: bool | None = None) -> jax.Array:
    """Fused softmax attention: ``q [b, q, h, d]``, ``k [b, k, n, d]``, ``v [b, k, n, v]`` -> ``[b, q, h, v]``.

    Inputs are validated by `softmax_attention` (call that instead), which also zeroes the keys and values padding
    hides. Any lengths work: each is padded to a multiple of its block, and padded keys are excluded.

    Args:
      dims: sizes from `checks.check_qkv`; mask: a `Mask`; scale: the logit scale.
      block_q, block_kv: block sizes (powers of two >= 16), clipped to 128 and to the lengths rounded up to powers
        of two, and halved while one program's tiles would overflow GPU shared memory (`fit_blocks`); the
        backward uses at most 64, and float32 compiled for a GPU at most 32 (register spills, see `_F32_BLOCK_MAX`).
      interpret: Pallas interpret mode; None uses it exactly when JAX runs on the CPU.

    Returns:
      ``[b, q, h, v]`` in q's dtype.
    """
    reason = flash_unsupported(dims, q.dtype, mask, None, 0.0)
    if reason:
        raise ValueError(f"flash_attention cannot run this call: {reason}")
    if dims.lq == 0 or dims.lk == 0:
        return jnp.zeros((dims.batch, dims.lq, dims.heads, dims.value_dim), q.dtype)
    d_pad, v_pad = padded_dim(dims.head_dim), padded_dim(dims.value_dim)
    interpret = jax.default_backend() == "cpu" if interpret is None else bool(interpret)
    bq, bk = block_length(block_q, dims.lq, "block_q"), block_length(block_kv, dims.lk, "block_kv")
    if q.dtype == jnp.float32 and not interpret:
        bq, bk = min(bq, _F32_BLOCK_MAX), min(bk, _F32_BLOCK_MAX)
    bq, bk = fit_blocks(bq, bk, d_pad, d_pad + v_pad, q.dtype.itemsize)  # holds q; loops over k, v
    bq_bwd, bk_bwd = fit_blocks(min(bq, _BWD_BLOCK_MAX), min(bk, _BWD_BLOCK_MAX), d_pad + v_pad, d_pad + v_pad,
                                q.dtype.itemsize, swapped_too=True)  # q and dO against k and v
    lq_pad, lk_pad = -(-dims.lq // bq) * bq, -(-dims.lk // bk) * bk
    plan = FlashPlan(scale=float(scale), lk=dims.lk, kv_padded=lk_pad != dims.lk, groups=dims.groups,
                     causal=mask.causal, window=mask.window, segmented=mask.has_segments or mask.has_padding,
                     block_q=bq, block_kv=bk, block_q_bwd=bq_bwd, block_kv_bwd=bk_bwd,
                     interpret=interpret)
    out = _flash(plan, _pad(q, lq_pad, d_pad), _pad(k, lk_pad, d_pad), _pad(v, lk_pad, v_pad),
                 _encode_mask(plan, mask, dims, lq_pad, lk_pad))
    return out[:, :dims.lq, :, :dims.value_dim]


def fit_blocks(bq: int, bk: int, held_width: int, loop_width: int, itemsize: int, *,
               swapped_too: bool = False) -> tuple[int, int]:
    """``(bq, bk)`` halved (the larger first, keys on a tie) until one program's tiles fit `_SHARED_BYTES`: the
    ``bq`` rows of ``held_width`` elements it holds plus `NUM_STAGES` copies of the ``bk`` rows of ``loop_width`` it
    loops over. ``swapped_too``: also with the roles swapped (the backward's dk/dv kernel holds keys, loops over
    queries)."""
    def fits(held, loop):
        return itemsize * (NUM_STAGES * loop * loop_width + held * held_width) <= _SHARED_BYTES
    while not (fits(bq, bk) and (not swapped_too or fits(bk, bq))) and max(bq, bk) > MIN_BLOCK:
        bq, bk = (bq, bk // 2) if bk >= bq else (bq // 2, bk)
    return bq, bk


def _pad(x: jax.Array, length: int, dim: int) -> jax.Array:
    """``[b, l, heads, e]`` zero-padded to ``[b, length, heads, dim]``."""
    if x.shape[1] == length and x.shape[3] == dim:
        return x
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, dim - x.shape[3])))


# -- the mask as int32 rows and loop bounds -------------------------------------------------------------------------
def _pad_rows(x: jax.Array, length: int, value) -> jax.Array:
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1])), constant_values=value)


def _offsets(mask: Mask, batch: int) -> jax.Array:
    """``q_offset`` as int32 ``[b]`` (zeros when absent)."""
    if mask.q_offset is None:
        return jnp.zeros((batch,), jnp.int32)
    return jnp.broadcast_to(jnp.reshape(mask.q_offset, (-1,)), (batch,)).astype(jnp.int32)


def _encode_mask(plan: FlashPlan, mask: Mask, dims: Dims, lq: int, lk: int) -> FlashMasks:
    """`FlashMasks` for queries/keys padded to ``lq``/``lk`` (see the module docstring)."""
    b = dims.batch
    q_pos, kv_pos = jnp.zeros((b, lq), jnp.int32), jnp.zeros((b, lk), jnp.int32)
    if mask.causal:
        q_pos = jnp.arange(lq, dtype=jnp.int32)[None, :] + _offsets(mask, b)[:, None]
        kv_pos = jnp.broadcast_to(jnp.arange(lk, dtype=jnp.int32), (b, lk))
        if mask.prefix_lengths is not None:
            kv_pos = jnp.where(kv_pos < mask.prefix_lengths[:, None], _ALWAYS, kv_pos)
    q_seg, kv_seg = jnp.zeros((b, lq), jnp.int32), jnp.zeros((b, lk), jnp.int32)
    if mask.has_segments:
        q_seg = _pad_rows(mask.q_segment_ids.astype(jnp.int32), lq, _PAD_QUERY)
        kv_seg = _pad_rows(mask.kv_segment_ids.astype(jnp.int32), lk, _HIDDEN)
    valid = mask.kv_valid_mask(dims.lk)
    if valid is not None:
        valid = _pad_rows(valid, lk, False)
        kv_seg = jnp.where(valid, kv_seg, _HIDDEN)
    kv_start, kv_stop, _, _ = block_bounds(mask, dims, lq, lk, plan.block_q, plan.block_kv)
    bwd = block_bounds(mask, dims, lq, lk, plan.block_q_bwd, plan.block_kv_bwd)
    return FlashMasks(q_pos, kv_pos, q_seg, kv_seg, kv_start, kv_stop, *bwd)


def block_bounds(mask: Mask, dims: Dims, lq: int, lk: int, bq: int, bk: int) -> tuple[jax.Array, ...]:
    """The kernels' loop bounds per batch row (`attention.bounds`), for queries/keys padded to ``lq``/``lk``: key
    blocks ``[kv_start, kv_stop)`` of each query block, int32 ``[b, q / bq]`` each, then query blocks
    ``[q_start, q_stop)`` of each key block, int32 ``[b, k / bk]`` each."""
    b, nq, nk = dims.batch, lq // bq, lk // bk
    kv = bounds.kv_blocks(mask, jnp.arange(nq, dtype=jnp.int32), bq, bk, dims.lk, per_row=True)
    q = bounds.q_blocks(mask, jnp.arange(nk, dtype=jnp.int32), bq, bk, nq, dims.lk, per_row=True)
    return (*(jnp.broadcast_to(x, (b, nq)).astype(jnp.int32) for x in kv),
            *(jnp.broadcast_to(x, (b, nk)).astype(jnp.int32) for x in q))


# -- custom_vjp -------------------------------------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(plan: FlashPlan, q, k, v, masks: FlashMasks):
    return forward(plan, q, k, v, masks)[0]


def _flash_fwd(plan: FlashPlan, q, k, v, masks: FlashMasks):
    out, lse = forward(plan, q, k, v, masks)
    return out, (q, k, v, masks, out, lse)


def _flash_bwd(plan: FlashPlan, res, dout):
    q, k, v, masks, out, lse = res
    # delta_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij (FlashAttention-2), float32 [b, h, q].
    delta = jnp.einsum("bqhv,bqhv->bhq", dout.astype(jnp.float32), out.astype(jnp.float32))
    dq = backward_dq(plan, q, k, v, dout, lse, delta, masks)
    dk, dv = backward_dkdv(plan, q, k, v, dout, lse, delta, masks)
    return dq, dk, dv, jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), masks)


_flash.defvjp(_flash_fwd, _flash_bwd)
