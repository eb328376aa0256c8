"""`softmax_attention`: one signature, several implementations of the same function.

``out[b, i, h] = sum_j P[b, h, i, j] v[b, j, h // g]`` with
``P = softmax_j(scale * q_i . k_j + bias)`` over the keys the `Mask` allows; a query row that may attend no key
returns zeros. Softmax statistics are float32 whatever the input dtype. Keys and values that padding hides
(``kv_lengths``/``kv_valid``) are zeroed first, so a NaN or inf there reaches no output and no gradient.

Implementations (``impl=``):
  - ``"reference"``: einsum + softmax over the dense ``[b, h, q, k]`` logits; the readable definition (dense.py).
  - ``"xla"``: `jax.nn.dot_product_attention` (XLA) with the mask mapped onto its arguments (dense.py).
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

from ...choices import IMPLS
from ..checks import Dims, check_bias, check_dropout, check_mask, check_qkv, check_scale
from ..dropout import dropout_seed
from ..masks import Mask
from .blockwise import blockwise_attention
from .dense import cudnn_unsupported, jax_nn_attention, reference_attention, xla_unsupported
from .flash import flash_attention, flash_unsupported
from .splash import splash_attention, splash_unsupported

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
        return jax_nn_attention(q, k, v, mask, bias, scale, "cudnn")
    if impl == "xla" and xla_unsupported(dims, q.dtype, dropout_rate, jax.default_backend()) is None:
        return jax_nn_attention(q, k, v, mask, bias, scale, "xla")
    return reference_attention(q, k, v, dims=dims, mask=mask, bias=bias, scale=scale,
                               dropout_rate=dropout_rate, dropout_seed=seed)


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
