"""Softmax attention computed whole: the dense reference (``impl="reference"``, the readable definition),
`attend_scores` / `attention_weights` for logits made elsewhere, and `jax.nn.dot_product_attention` (``"xla"``,
``"cudnn"``) with the `Mask` mapped onto its arguments, with what each of those cannot take.

The dense forms materialise ``[b, h, q, k]`` float32 logits; a query row that may attend no key gets zero weights.

Shape key: b batch, q query length, k key length, h query heads, n kv heads, g = h // n, d head dim, v value dim.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ..checks import Dims, check_dropout, check_mask
from ..dropout import dropout_seed, grouped_keep_mask
from ..masks import Mask

_MASKED = -1e30  # masked logits; exp(-1e30 - max) == 0 in float32


def reference_attention(q, k, v, *, dims: Dims, mask: Mask, bias, scale: float, dropout_rate: float = 0.0,
                        dropout_seed=None) -> jax.Array:
    """Dense softmax attention, computed in float32: the readable definition (inputs validated by the caller)."""
    b, lq, h, d = q.shape
    n, g = dims.kv_heads, dims.groups
    q = q * jnp.asarray(scale, q.dtype)  # scale the [b, q, h, d] queries, not the [b, h, q, k] logits
    if g == 1:  # plain multi-head attention stays 4-D: a unit group axis makes XLA:CPU's fusions ~25% slower
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    else:
        s = jnp.einsum("bqngd,bknd->bngqk", q.reshape(b, lq, n, g, d), k, preferred_element_type=jnp.float32)
    if bias is not None:
        s = s + bias.reshape(_logits_shape(bias.shape, g)).astype(jnp.float32)
    return _softmax_values(s, v, dims, mask, dropout_rate, dropout_seed).astype(q.dtype)


def attend_scores(scores: jax.Array, v: jax.Array, *, mask: Mask | None = None, head_mix: jax.Array | None = None,
                  dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None) -> jax.Array:
    """Softmax attention from logits made elsewhere: ``out[b, i, h] = sum_j P[b, h, i, j] v[b, j, h // g]``.

    For attention whose logits are not ``q . k`` (additive, Synthesizer) or that mixes heads (talking-heads):
    ``P = softmax_j(scores)`` over the keys the `Mask` allows, in float32, a row with no visible key giving zeros;
    then, if ``head_mix`` is given, ``P[h'] = sum_h P[h] head_mix[h, h']`` (talking-heads' mixing after the softmax).

    Args:
      scores: logits ``[b, h, q, k]`` (any float dtype; computed in float32).
      v: values ``[b, k, n, v]`` with ``h % n == 0``.
      mask: a `Mask` (True = attend); None attends everywhere.
      head_mix: ``[h, h]`` mixing of the attention weights across heads, or None.
      dropout_rate, dropout_rng: dropout on the attention weights, as in `softmax_attention`.

    Returns:
      ``[b, q, h, v]`` in v's dtype.
    """
    if getattr(scores, "ndim", None) != 4 or getattr(v, "ndim", None) != 4:
        raise ValueError(f"scores must be [batch, heads, lq, lk] and v [batch, lk, kv_heads, value_dim]; got "
                         f"{getattr(scores, 'shape', type(scores))} and {getattr(v, 'shape', type(v))}")
    b, h, lq, lk = scores.shape
    if v.shape[:2] != (b, lk) or h % v.shape[2]:
        raise ValueError(f"v {v.shape} does not fit scores {scores.shape}: need batch {b}, length {lk}, and kv heads "
                         f"dividing {h}")
    if head_mix is not None and tuple(head_mix.shape) != (h, h):
        raise ValueError(f"head_mix must be [heads, heads] = {[h, h]}, got {list(head_mix.shape)}")
    dims = Dims(b, lq, lk, h, v.shape[2], v.shape[3], v.shape[3])
    mask = check_mask(mask, dims)
    dropout_rate = check_dropout(dropout_rate, dropout_rng)
    seed = dropout_seed(dropout_rng) if dropout_rate > 0 else None
    (v,) = mask.zero_invalid_keys(v)  # padded logits are masked below; a NaN in a padded value must not leak
    s = scores.astype(jnp.float32).reshape(_logits_shape(scores.shape, dims.groups))
    return _softmax_values(s, v, dims, mask, dropout_rate, seed, head_mix).astype(v.dtype)


def attention_weights(scores: jax.Array, *, mask: Mask | None = None,
                      head_mix: jax.Array | None = None) -> jax.Array:
    """The attention weights ``P [b, h, q, k]`` (float32) that `attend_scores` applies to the values, for inspection
    (attention maps): softmax of ``scores [b, h, q, k]`` over the visible keys, zero rows where none is visible,
    mixed across heads by ``head_mix [h, h]`` if given."""
    if getattr(scores, "ndim", None) != 4:
        raise ValueError(f"scores must be [batch, heads, lq, lk], got {getattr(scores, 'shape', type(scores))}")
    b, h, lq, lk = scores.shape
    if head_mix is not None and tuple(head_mix.shape) != (h, h):
        raise ValueError(f"head_mix must be [heads, heads] = {[h, h]}, got {list(head_mix.shape)}")
    mask = check_mask(mask, Dims(b, lq, lk, h, h, 1, 1))
    return _masked_weights(scores.astype(jnp.float32), mask, head_mix)


def _logits_shape(shape, groups: int) -> tuple:
    """``[b, h, q, k]`` (``h`` may be 1 for a broadcast bias) -> the logits layout: itself for one query head per kv
    head, else ``[b, n, g, q, k]``."""
    b, h, lq, lk = shape
    return (b, h, lq, lk) if groups == 1 else (b, h // groups if h > 1 else 1, groups if h > 1 else 1, lq, lk)


def _masked_weights(s, mask: Mask, head_mix=None) -> jax.Array:
    """float32 logits ``[b, h, q, k]`` or ``[b, n, g, q, k]`` -> softmax over the visible keys (rows with none
    zeroed), then mixed across the ``h = n * g`` heads by ``head_mix``."""
    b, lq, lk = s.shape[0], s.shape[-2], s.shape[-1]
    visible = None if mask.is_trivial else mask.block(0, lq, 0, lk)  # [b|1, 1, q, k]
    if visible is not None:  # a finite floor, not -inf: a row with no visible key turns uniform, never NaN
        visible = visible.reshape(visible.shape[:2] + (1,) * (s.ndim - 4) + visible.shape[2:])
        s = jnp.where(visible, s, _MASKED)
    weights = jax.nn.softmax(s, axis=-1)
    if visible is not None and not (mask.every_row_sees_a_key and lq == lk):
        weights = jnp.where(visible.any(-1, keepdims=True), weights, 0.0)  # ...and is zeroed here
    if head_mix is not None:
        weights = jnp.einsum("bhqk,hj->bjqk", weights.reshape(b, -1, lq, lk),
                             head_mix.astype(jnp.float32)).reshape(s.shape)
    return weights


def _softmax_values(s, v, dims: Dims, mask: Mask, dropout_rate: float, dropout_seed, head_mix=None) -> jax.Array:
    """float32 logits ``[b, h, q, k]`` (one query head per kv head) or ``[b, n, g, q, k]`` -> masked softmax
    (-> head mixing) (-> dropout) -> ``[b, q, h, v]`` float32."""
    b, lq, lk = s.shape[0], s.shape[-2], s.shape[-1]
    weights = _masked_weights(s, mask, head_mix)
    if dropout_rate > 0:
        keep = grouped_keep_mask(dropout_seed, dropout_rate, b, dims.kv_heads, dims.groups, jnp.arange(lq),
                                 jnp.arange(lk))
        weights = weights * keep.reshape(weights.shape) / (1.0 - dropout_rate)
    if weights.ndim == 4:
        out = jnp.einsum("bhqk,bkhv->bqhv", weights, v.astype(jnp.float32))
    else:
        out = jnp.einsum("bngqk,bknv->bqngv", weights, v.astype(jnp.float32))
    return out.reshape(b, lq, dims.heads, dims.value_dim)


# -- jax.nn.dot_product_attention (xla, cudnn) ---------------------------------------------------------------------
def jax_nn_attention(q, k, v, mask: Mask, bias, scale: float, implementation: str) -> jax.Array:
    """`jax.nn.dot_product_attention` with our mask as ``is_causal`` + ``key_value_seq_lengths`` (+
    ``local_window_size``) when that is all it holds, else as one dense ``mask``; rows with no visible key are zeroed
    (jax would average them)."""
    lq, lk = q.shape[1], k.shape[1]
    native = (mask.prefix_lengths is None and mask.q_offset is None and mask.kv_valid is None
              and not mask.has_segments and (not mask.causal or lq == lk))
    if native:
        kv_lengths = None if mask.kv_lengths is None else mask.kv_lengths.astype(jnp.int32)
        out = jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, is_causal=mask.causal,
                                           key_value_seq_lengths=kv_lengths, local_window_size=_local_window(mask),
                                           implementation=implementation)
        row_visible = None if kv_lengths is None else _native_rows_visible(mask, kv_lengths, lq)
    else:
        dense = mask.block(0, lq, 0, lk)
        out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=dense, scale=scale,
                                           implementation=implementation)
        row_visible = dense[:, 0].any(-1)
    if row_visible is None:
        return out
    return jnp.where(row_visible[:, :, None, None], out, jnp.zeros((), out.dtype))


def _native_rows_visible(mask: Mask, kv_lengths, lq: int) -> jax.Array:
    """bool ``[b, 1 or q]``: which rows see a key under causal (+ window) + ``kv_lengths``. Row ``i`` sees key 0
    unless all keys are padding; with a window it sees keys from ``i - window + 1`` on, so it needs
    ``i - window + 1 < kv_lengths``."""
    if mask.window is None:
        return (kv_lengths > 0)[:, None]
    return jnp.arange(lq)[None, :] - (mask.window - 1) < kv_lengths[:, None]


def _local_window(mask: Mask) -> tuple[int, int] | None:
    """Our ``window`` as jax's ``local_window_size = (left, right)``: query ``i`` sees key ``j`` iff
    ``j >= i - left`` and ``j <= i + right``, so ``i - j < window`` is ``left = window - 1``; ``right = 0`` (causal).
    cuDNN turns it into its ``sliding_window_length = left + 1``: keys in ``(i - window, i]``, the same band."""
    return None if mask.window is None else (mask.window - 1, 0)


def xla_unsupported(dims: Dims, dtype, dropout_rate: float, backend: str) -> str | None:
    """Why `jax.nn.dot_product_attention` cannot compute this call (then ``"xla"`` uses the reference), or None."""
    if jnp.dtype(dtype) == jnp.dtype(jnp.float16) and backend == "cpu":
        return "float16 on CPU (its F16_F16_F32 dot algorithm does not exist there)"
    if dims.value_dim != dims.head_dim:
        return f"value head dim {dims.value_dim} != query/key head dim {dims.head_dim}"
    if dropout_rate > 0:
        return "dropout_rate > 0"
    return None


def cudnn_unsupported(dims: Dims, dtype, mask: Mask, dropout_rate: float, backend: str) -> str | None:
    """Why the cuDNN fused kernel cannot compute this call, or None if it can."""
    if backend != "gpu":
        return f"cuDNN attention needs a GPU backend, this is {backend!r}"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"cuDNN attention needs bfloat16 or float16 inputs, got {jnp.dtype(dtype).name}"
    if dims.head_dim % 8 or dims.head_dim > 128 or dims.value_dim != dims.head_dim:
        return f"cuDNN attention needs equal q/k/v head dims, a multiple of 8 and <= 128 (got {dims.head_dim})"
    for field in ("prefix_lengths", "kv_valid", "q_segment_ids", "q_offset"):
        if getattr(mask, field) is not None:
            return f"the mask field {field} (cuDNN supports causal and kv_lengths)"
    if mask.causal and dims.lq != dims.lk:
        return "a causal mask with lq != lk (set q_offset-free causal only for self-attention)"
    # A sliding window (mask.window) fits: it maps onto local_window_size (`_local_window`), which cuDNN takes with
    # its causal and padding-causal masks.
    if dropout_rate > 0:
        return "dropout_rate > 0"
    return None
