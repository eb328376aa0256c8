"""`splash_attention`: the TPU's fused softmax attention, `jax.experimental.pallas.ops.tpu.splash_attention`, for the
masks it can take. ``impl="flash"`` runs it on a TPU; on other backends it runs in Pallas interpret mode (tests).

Splash attention takes a static mask (causal, local or full, per head) and-ed with segment ids, and needs every
query row to see at least one key. So it serves self-attention that is causal (with or without a sliding ``window``:
its ``LocalMask``, whose block tables skip the tiles outside the band) and/or packed (the GPT, BERT-without-padding
and prefix-free training cases); ``splash_unsupported`` names what it cannot take (prefix-LM, key padding, ``q_offset``,
separate query/key segments, a bias, dropout), and the caller falls back. Lengths are padded to a block multiple;
padded rows and keys get a segment id of their own, so a real row never sees a padded key and a padded row is never
empty. Query heads share a kv head through the MQA kernel, one call per (batch row, kv head).

Shape key: b batch, l length, h query heads, n kv heads, g = h // n, d head dim.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..checks import Dims
from ..masks import Mask

_LANE = 128  # splash blocks are multiples of the TPU's 128 lanes
_PAD_SEGMENT = int(np.iinfo(np.int32).min)  # segment id of padded rows and keys: seen only by each other


def splash_unsupported(dims: Dims, dtype, mask: Mask, bias, dropout_rate: float) -> str | None:
    """Why `splash_attention` cannot compute this call, or None if it can."""
    if bias is not None:
        return "an additive bias (bias=...): splash attention takes none"
    if dropout_rate > 0:
        return "dropout_rate > 0: splash attention does not drop attention weights"
    if jnp.dtype(dtype).name not in ("float32", "bfloat16"):
        return f"dtype {jnp.dtype(dtype).name} (splash attention takes float32 and bfloat16)"
    if dims.value_dim != dims.head_dim:
        return f"value head dim {dims.value_dim} != head dim {dims.head_dim}"
    for field, why in (("prefix_lengths", "per-example prefixes are not a static splash mask"),
                       ("q_offset", "decoding against a cache"),
                       ("kv_lengths", "key padding leaves rows that see no key, which splash cannot take"),
                       ("kv_valid", "key padding leaves rows that see no key, which splash cannot take")):
        if getattr(mask, field) is not None:
            return f"the mask field {field} ({why})"
    if mask.has_segments and not mask.shares_segments:
        return "separate query and key segment ids (splash needs self-attention's one array, pass it twice)"
    if dims.lq != dims.lk:
        return f"lq != lk ({dims.lq} vs {dims.lk}): splash serves self-attention here"
    return None


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, dims: Dims, mask: Mask, scale: float,
                     block_size: int = 512, interpret: bool | None = None) -> jax.Array:
    """Splash attention: ``q [b, l, h, d]``, ``k, v [b, l, n, d]`` -> ``[b, l, h, d]`` (in q's dtype).

    Inputs are validated by `softmax_attention` (call that instead) and must pass `splash_unsupported`.
    ``block_size`` (rounded to a multiple of 128, at most the padded length) tiles queries and keys alike;
    ``interpret``: Pallas interpret mode, by default exactly when the backend is not a TPU."""
    reason = splash_unsupported(dims, q.dtype, mask, None, 0.0)
    if reason:
        raise ValueError(f"splash_attention cannot run this call: {reason}")
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib

    interpret = jax.default_backend() != "tpu" if interpret is None else bool(interpret)
    padded = -(-dims.lq // _LANE) * _LANE
    block = min(max(_LANE, block_size // _LANE * _LANE), padded)
    padded = -(-padded // block) * block
    kernel = _kernel(mask.causal, mask.window, dims.groups, padded, block, interpret)
    seg = mask.q_segment_ids if mask.has_segments else jnp.zeros((dims.batch, dims.lq), jnp.int32)
    seg = jnp.pad(seg.astype(jnp.int32), ((0, 0), (0, padded - dims.lq)), constant_values=_PAD_SEGMENT)
    b, n, g, d = dims.batch, dims.kv_heads, dims.groups, dims.head_dim
    pad = lambda x: jnp.pad(x, ((0, 0), (0, padded - dims.lq), (0, 0), (0, 0)))
    qg = pad(q * jnp.asarray(scale, q.dtype)).reshape(b, padded, n, g, d).transpose(0, 2, 3, 1, 4)  # [b, n, g, l, d]
    kn, vn = (pad(x).transpose(0, 2, 1, 3) for x in (k, v))  # [b, n, l, d]
    one = lambda q1, k1, v1, s: kernel(q1, k1, v1, segment_ids=kernel_lib.SegmentIds(s, s))
    per_head = jax.vmap(one, in_axes=(0, 0, 0, None))  # over kv heads
    out = jax.vmap(per_head)(qg, kn, vn, seg)  # [b, n, g, l, d]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, padded, n * g, d)[:, :dims.lq]


def _kernel(causal: bool, window: int | None, groups: int, length: int, block: int, interpret: bool):
    """The MQA splash kernel for ``groups`` query heads over one kv head, ``length`` tokens. Built anew per trace,
    not cached: its mask tables become arrays of the trace that builds it. A ``window`` is splash's
    ``LocalMask(window_size=(window - 1, 0))``: key ``j`` visible to query ``i`` iff ``i - (window - 1) <= j <= i``,
    our ``0 <= i - j < window``."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

    if window is not None:
        head = mask_lib.LocalMask((length, length), window_size=(window - 1, 0), offset=0)
    else:
        head = mask_lib.CausalMask((length, length)) if causal else mask_lib.FullMask((length, length))
    sizes = kernel_lib.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                  block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                                  block_kv_dq=block)
    return kernel_lib.make_splash_mqa(mask_lib.MultiHeadMask([head] * groups), block_sizes=sizes, head_shards=1,
                                      q_seq_shards=1, interpret=interpret)
