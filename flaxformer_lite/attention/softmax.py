"""`softmax_attention`: one signature, several implementations of the same function.

``out[b, i, h] = sum_j P[b, h, i, j] v[b, j, h // g]`` with
``P = softmax_j(scale * q_i . k_j + bias)`` over the keys the `Mask` allows; a query row that may attend no key
returns zeros. Softmax statistics are float32 whatever the input dtype. Keys and values that padding hides
(``kv_lengths``/``kv_valid``) are zeroed first, so a NaN or inf there reaches no output and no gradient.

Implementations (``impl=``):
  - ``"reference"``: einsum + softmax over the dense ``[b, h, q, k]`` logits; the readable definition.
  - ``"xla"``: `jax.nn.dot_product_attention` (XLA) with the mask mapped onto its arguments.
  - ``"blockwise"``: flash-style online softmax in pure JAX, O(l) memory forward and backward (see blockwise.py).
  - ``"cudnn"``: `jax.nn.dot_product_attention(implementation="cudnn")`; GPU, bf16/fp16, causal/kv_lengths masks
    (and a sliding ``window``, as its ``local_window_size``).
  - ``"flash"``: the accelerator's fused kernel: on GPU cuDNN where the call fits it, else the Pallas kernels of
    flash.py (every `Mask`: packed segments, prefix-LM, ``kv_valid``, ``q_offset``, ``window``); on TPU splash
    attention (splash.py: causal, sliding-window and/or packed self-attention); on CPU the flash.py kernels in Pallas
    interpret mode (slow: for tests). A call the kernel at hand cannot take (a bias, dropout, a mask splash lacks)
    runs ``"blockwise"`` instead, with one warning.
  - ``"pallas"``: our Pallas FlashAttention-2 kernels of flash.py, always (Triton on GPU, interpret mode on CPU),
    even where ``"flash"`` would pick cuDNN: to compare the two side by side. `ValueError` where they cannot run.
  - ``"auto"``: the fastest correct choice for the backend, dtype, length and mask (`choose_impl`).

Shape key: b batch, q query length, k key length, h query heads, n kv heads, g = h // n, d head dim, v value dim.
"""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from ..choices import IMPLS
from .blockwise import blockwise_attention
from .checks import Dims, check_bias, check_dropout, check_mask, check_qkv, check_scale
from .dropout import dropout_seed, grouped_keep_mask
from .flash import flash_attention, flash_unsupported
from .splash import splash_attention, splash_unsupported
from .masks import Mask

_MASKED = -1e30  # masked logits; exp(-1e30 - max) == 0 in float32
# From this many logits per call (b * h * q * k), `auto` streams with `blockwise` instead of a dense impl. On CPU
# blockwise is already faster from 8M logits (1024 tokens x 8 heads; 512 tokens is still faster dense), see
# benchmarks/RESULTS.md. Elsewhere (no measurement yet) switch when the dense float32 logits reach 256 MiB.
AUTO_BLOCKWISE_MIN_LOGITS = {"cpu": 2**22}
AUTO_BLOCKWISE_MIN_LOGITS_DEFAULT = 2**26


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Mask | None = None,
                      bias: jax.Array | None = None, scale: float | None = None, impl: str = "auto",
                      dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None,
                      block_q: int = 512, block_kv: int = 512) -> jax.Array:
    """Softmax attention ``[b, q, h, d] x [b, k, n, d] x [b, k, n, v] -> [b, q, h, v]``.

    Args:
      q: queries ``[b, q, h, d]``.
      k: keys ``[b, k, n, d]``; ``h % n == 0`` (query head ``i`` uses kv head ``i // (h // n)``: GQA/MQA).
      v: values ``[b, k, n, v]``.
      mask: a `Mask` (True = attend); None attends everywhere.
      bias: additive logits bias broadcastable to ``[b, h, q, k]`` (e.g. relative positions), or None.
      scale: logit scale; default ``1 / sqrt(d)``.
      impl: one of ``IMPLS``.
      dropout_rate: dropout on the attention weights; needs ``dropout_rng``. Not supported by ``"cudnn"``.
      dropout_rng: PRNG key for dropout.
      block_q, block_kv: tile sizes of ``"blockwise"`` and ``"flash"`` (performance hints; flash clips them to
        its limits; other impls ignore them).

    Returns:
      ``[b, q, h, v]`` in q's dtype.
    """
    dims = check_qkv(q, k, v)
    mask = check_mask(mask, dims)
    bias = check_bias(bias, dims)
    scale = check_scale(scale, dims)
    dropout_rate = check_dropout(dropout_rate, dropout_rng)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    backend = jax.default_backend()
    if impl == "auto":
        impl = choose_impl(dims, q.dtype, mask, dropout_rate, backend, bias=bias)
    seed = dropout_seed(dropout_rng) if dropout_rate > 0 else None
    k, v = mask.zero_invalid_keys(k, v)  # once for every impl: a NaN in a padded key/value must not leak
    if impl == "flash":
        impl = _flash_route(dims, q.dtype, mask, bias, dropout_rate, backend)
        if impl == "flash":
            return flash_attention(q, k, v, dims=dims, mask=mask, scale=scale, block_q=block_q, block_kv=block_kv)
        if impl == "splash":
            return splash_attention(q, k, v, dims=dims, mask=mask, scale=scale, block_size=max(block_q, block_kv))
    if impl == "pallas":
        reason = flash_unsupported(dims, q.dtype, mask, bias, dropout_rate, backend)
        if reason:
            raise ValueError(f"impl='pallas' cannot run this call: {reason}. Use impl='flash' or 'auto'.")
        return flash_attention(q, k, v, dims=dims, mask=mask, scale=scale, block_q=block_q, block_kv=block_kv)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, dims=dims, mask=mask, bias=bias, scale=scale, dropout_rate=dropout_rate,
                                   dropout_seed=seed, block_q=block_q, block_kv=block_kv)
    if impl == "cudnn":
        reason = cudnn_unsupported(dims, q.dtype, mask, dropout_rate, jax.default_backend())
        if reason:
            raise ValueError(f"impl='cudnn' cannot run this call: {reason}. Use impl='auto' or 'blockwise'.")
        return _dot_product_attention(q, k, v, mask, bias, scale, "cudnn")
    if impl == "xla" and xla_unsupported(dims, q.dtype, dropout_rate, jax.default_backend()) is None:
        return _dot_product_attention(q, k, v, mask, bias, scale, "xla")
    return reference_attention(q, k, v, dims=dims, mask=mask, bias=bias, scale=scale,
                               dropout_rate=dropout_rate, dropout_seed=seed)


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


# -- jax.nn.dot_product_attention (xla, cudnn) --------------------------------------------------------------------
def _dot_product_attention(q, k, v, mask: Mask, bias, scale: float, implementation: str) -> jax.Array:
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


def _flash_target(dims: Dims, dtype, mask: Mask, bias, dropout_rate: float, backend: str) -> tuple[str, str | None]:
    """The kernel ``impl="flash"`` aims at on ``backend`` (``"cudnn"`` on a GPU where the call fits it,
    ``"splash"`` on a TPU, else ``"flash"``: the Pallas kernels) and why it cannot take this call (None if it can)."""
    if cudnn_unsupported(dims, dtype, mask, dropout_rate, backend) is None:
        return "cudnn", None
    if backend == "tpu":
        return "splash", splash_unsupported(dims, dtype, mask, bias, dropout_rate)
    return "flash", flash_unsupported(dims, dtype, mask, bias, dropout_rate, backend)


def _flash_route(dims: Dims, dtype, mask: Mask, bias, dropout_rate: float, backend: str) -> str:
    """What ``impl="flash"`` runs: its `_flash_target`, else ``"blockwise"`` with one warning saying why."""
    route, reason = _flash_target(dims, dtype, mask, bias, dropout_rate, backend)
    if reason is None:
        return route
    warnings.warn(f"impl='flash' cannot run this call ({reason}); using the portable impl='blockwise'",
                  stacklevel=4)
    return "blockwise"


def choose_impl(dims: Dims, dtype, mask: Mask, dropout_rate: float, backend: str, *, bias=None) -> str:
    """The impl ``"auto"`` runs: ``"flash"`` for bf16/fp16 on GPU where cuDNN or the Pallas kernels take the call
    (any mask; not a bias or dropout for the Pallas ones) and on TPU where splash attention takes it, blockwise once
    the dense logits get large, else the dense reference on CPU (fastest there in a whole training step,
    benchmarks/RESULTS.md) and XLA elsewhere (the reference where XLA cannot take the call). Never a fused kernel
    on the CPU."""
    low_precision = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if low_precision and backend in ("gpu", "tpu") and \
            _flash_target(dims, dtype, mask, bias, dropout_rate, backend)[1] is None:
        return "flash"
    threshold = AUTO_BLOCKWISE_MIN_LOGITS.get(backend, AUTO_BLOCKWISE_MIN_LOGITS_DEFAULT)
    if dims.batch * dims.heads * dims.lq * dims.lk >= threshold and dims.lq > 1:
        return "blockwise"
    if backend == "cpu":  # measured: the dense reference (jax.nn.softmax's custom derivative) trains faster here
        return "reference"
    return "xla" if xla_unsupported(dims, dtype, dropout_rate, backend) is None else "reference"
