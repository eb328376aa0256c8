"""Linear (kernelised) attention, "Transformers are RNNs" (Katharopoulos et al. 2020), in O(l) time and memory.

``out_i = sum_j m_ij phi(q_i).phi(k_j) v_j / sum_j m_ij phi(q_i).phi(k_j)`` for the `Mask` ``m`` (0 where a row
sees no key). phi is applied to raw q, k (no 1/sqrt(d); FAVOR+ has its own normaliser). Accumulation is float32.

- non-causal: ``phi(Q) (phi(K)^T V)``, one pass;
- causal: blocks of ``block_size`` -- quadratic inside a block, a ``[f, v]`` state carried across blocks by
  `lax.scan`; never an ``[l, l]`` matrix or an ``[l, f, v]`` tensor;
- prefix-LM: rows inside the prefix use the non-causal sums over the prefix, later rows the causal sums;
- packed segments: each contiguous run of equal id is one segment (an id that comes back starts a new one), and
  ``kv_segment_ids`` must equal ``q_segment_ids``; the carried state restarts at each boundary; non-causal segments
  add a reverse causal pass;
- padding: padded keys leave numerator and normaliser alike (and are zeroed first, so a NaN there leaks nowhere);
- decoding: `linear_init_state` / `linear_step` (this module's `init_state` / `step`) give the causal outputs one
  position at a time in O(1) per token.

Stability: keys carry a log-scale (feature_maps.py). Each query's sums are kept relative to the largest log-scale
among the keys *it* sees, as online softmax does, so no future key ever changes a past output.

Shape key: b batch, l length (q query, k key), h query heads, n kv heads, g = h // n, d head dim, f features,
v value dim, c block length.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ..checks import check_block_size, check_mask, check_qkv, check_rank4, check_step_qkv, check_valid
from ..masks import Mask
from ..pallas import block_unsupported
from .common import along, gate_log_decay, kernel_impl, segment_runs
from .feature_maps import FeatureMap, get_feature_map
from .linear_causal import FLOOR, causal_sums
from .linear_pallas import pallas_causal_sums, pallas_unsupported


def linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Mask | None = None,
                     feature_map: "str | FeatureMap" = "elu", block_size: int = 64, decay=None, log_decay=None,
                     impl: str = "auto", bias=None, scale=None, dropout_rate: float = 0.0,
                     dropout_rng=None) -> jax.Array:
    """Linear attention ``[b, q, h, d] x [b, k, n, d] x [b, k, n, v] -> [b, q, h, v]``.

    Args:
      q, k, v: as for `softmax_attention` (GQA/MQA when ``n < h``). bf16 inputs stay bf16 inside the matmuls,
        which accumulate in float32; fp16 ones are computed in float32 (the carried sums outgrow fp16's range).
      mask: a `Mask`. Causal, prefix-LM and segment masks need ``q`` and ``k`` of equal length; ``q_offset`` is
        not supported (decode with `linear_step`), nor is a sliding ``window`` (the running sums cannot forget).
        Segments: each contiguous run of an id is one segment, and ``kv_segment_ids`` must hold the same ids as
        ``q_segment_ids`` (`ValueError` when both are concrete and differ; pass one array for both).
      feature_map: ``"elu"``, ``"relu"``, ``"favor"`` or a `FeatureMap`.
      block_size: block length of the causal algorithm (a performance knob; results do not depend on it).
      decay: a fixed decay per kv head, ``[n]`` in (0, 1] (RetNet): key j reaches row i with weight
        ``decay ** (i - j)``. Needs a causal mask without ``prefix_lengths``.
      log_decay: a data-dependent decay per position and kv head, ``[b, l, n]``, in log space (<= 0; GLA, Mamba-2):
        key j reaches row i with weight ``exp(log_decay[j+1] + ... + log_decay[i])``. Positions that padding hides
        do not decay the state; values below `LOG_DECAY_FLOOR` (-inf too: a decay of 0) count as the floor. Same
        masks as ``decay``; give one of the two at most.
      impl: ``"xla"``: the block-parallel form in XLA ops (linear_causal.py), any mask and backend; ``"pallas"``:
        fused Pallas kernels, forward and backward (linear_pallas.py; causal masks without a prefix, feature maps
        without key log-scales, power-of-two ``block_size`` >= 16; Triton on GPU, interpret mode on CPU);
        ``"auto"``: ``"pallas"`` on a GPU where it applies, else ``"xla"`` (`linear_impl`).
      bias, scale, dropout_rate, dropout_rng: part of the shared kernel signature; linear attention cannot honour a
        bias, a logit scale or dropout on attention weights, and raises `ValueError` if one is given.

    Returns:
      ``[b, q, h, v]`` in q's dtype.
    """
    dims = check_qkv(q, k, v)
    mask = check_mask(mask, dims)
    _check_unsupported(mask, dims, block_size, bias, scale, dropout_rate)
    runs = segment_runs(mask, "linear_attention")
    fmap = get_feature_map(feature_map)
    valid = mask.kv_valid_mask(dims.lk)
    data_gate = log_decay is not None
    log_decay = gate_log_decay(decay, log_decay, (dims.batch, dims.lk, dims.kv_heads), valid)
    if log_decay is not None and (not mask.causal or mask.prefix_lengths is not None):
        raise ValueError("decay gates (decay=, log_decay=) need a causal mask without prefix_lengths: a decay runs "
                         "forward in time")
    b, lq, h, d = q.shape
    n, g = dims.kv_heads, dims.groups
    dtype = matmul_dtype(q.dtype)
    qf = fmap(q.reshape(b, lq, n, g, d), is_query=True)[0]
    kf, ka, v = _key_features(fmap, k, v, valid)
    if linear_impl(impl, mask, ka is not None, dtype, block_size) == "pallas":
        segments = None if runs is None else mask.q_segment_ids  # the kernel entry takes segment ids (run_ids inside)
        num, den = pallas_causal_sums(qf, kf, v, segments, log_decay, block=block_size, dtype=dtype)
    elif not mask.causal:
        num, den = _bidirectional(qf, kf, ka, v, runs, block_size, dtype)
    else:
        num, den, _ = causal_sums(qf, kf, ka, v, runs, runs, log_decay, block_size, dtype=dtype,
                                  decay_grad_by_identity=data_gate)
        if mask.prefix_lengths is not None:
            num, den = _with_prefix(qf, kf, ka, v, runs, mask.prefix_lengths, (num, den), block_size, dtype)
    return normalize(num, den).reshape(b, lq, h, dims.value_dim).astype(q.dtype)


@jax.custom_vjp
def normalize(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num [..., v] / den [...]``, 0 where ``den`` is 0 (a row that sees no key). Its gradient is written out:
    JAX's own sums ``d den`` over v from a broadcast, which XLA:CPU ran at a third of this one's speed (65 against
    21 ms at 16k tokens x 8 heads x 64)."""
    return num / jnp.where(den > 0, den, 1.0)[..., None]


def _normalize_fwd(num, den):
    safe = jnp.where(den > 0, den, 1.0)
    out = num / safe[..., None]
    return out, (out, safe, den > 0)


def _normalize_bwd(residuals, d_out):
    out, safe, seen = residuals
    d_num = d_out / safe[..., None]
    return d_num, jnp.where(seen, -jnp.einsum("...v,...v->...", d_num, out), 0.0)


normalize.defvjp(_normalize_fwd, _normalize_bwd)


def linear_impl(impl: str, mask: Mask, key_scales: bool, dtype, block_size: int, backend: str | None = None) -> str:
    """The impl `linear_attention` runs: ``"xla"`` or ``"pallas"`` (see its ``impl``). ``key_scales``: the feature
    map gives keys log-scales (FAVOR+); ``dtype``: the matmul operand dtype; ``backend``: None for JAX's default.
    Raises `ValueError` for an unknown impl, or ``"pallas"`` asked for a call it cannot compute."""
    def why_not(backend):
        if not mask.causal or mask.prefix_lengths is not None:
            return "a mask that is not causal, or has prefix_lengths (the kernel computes causal sums)"
        return block_unsupported(block_size) or pallas_unsupported(key_scales, dtype, backend)
    return kernel_impl("linear_attention", impl, backend, why_not)


def matmul_dtype(dtype) -> jnp.dtype:
    """The operand dtype of linear attention's matmuls: bf16 inputs keep theirs, anything else float32. (fp16 would
    overflow: the carried ``[f, v]`` sums pass 65504 within a few thousand positions of values about 5.)"""
    return jnp.dtype(dtype) if jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(jnp.float32)


def _key_features(fmap: FeatureMap, k, v, valid):
    """``(phi(k) features [..., f] float32, log-scales [...] or None, v)`` for keys ``k [b, (l,) n, d]``, values
    ``v [b, (l,) n, v]``. Where ``valid [b(, l)]`` is False the key and value are zeroed first (``0 * nan`` is nan: a
    NaN there must reach no output or gradient), then the key's features (and its log-scale goes to -inf)."""
    if valid is None:
        kf, ka = fmap(k, is_query=False)
        return kf, ka, v
    k, v = (jnp.where(along(valid, x), x, jnp.zeros((), x.dtype)) for x in (k, v))
    kf, ka = fmap(k, is_query=False)
    return _hide(kf, ka, valid) + (v,)


def _hide(kf, ka, visible):
    """Keys where ``visible [b(, l)]`` is False get zero features and log-scale -inf (weight 0)."""
    kf = jnp.where(along(visible, kf), kf, 0.0)
    return kf, None if ka is None else jnp.where(along(visible, ka), ka, -jnp.inf)


def _check_unsupported(mask: Mask, dims, block_size, bias, scale, dropout_rate):
    if bias is not None:
        raise ValueError("linear_attention cannot honour bias (there is no logits matrix); use softmax_attention")
    if scale is not None:
        raise ValueError("linear_attention cannot honour scale: the feature map is applied to raw q and k")
    if dropout_rate:
        raise ValueError("linear_attention cannot honour dropout_rate (there are no attention weights)")
    check_block_size("block_size", block_size)
    if mask.window is not None:  # the state sums every past key: a window would have to subtract the ones leaving it
        raise ValueError(f"sliding-window masks are not supported by linear attention (Mask.window={mask.window}); "
                         "use softmax_attention")
    if (mask.causal or mask.has_segments) and dims.lq != dims.lk:
        raise ValueError(f"linear_attention with a causal, prefix or segment mask needs lq == lk "
                         f"(got {dims.lq} vs {dims.lk}); decode one token at a time with linear_step()")
    if mask.q_offset is not None:
        raise ValueError("linear_attention does not support mask.q_offset; decode with "
                         "linear_init_state()/linear_step()")


def _bidirectional(qf, kf, ka, v, runs, block_size: int, dtype):
    """Sums over every visible key (no causal structure), within the segments of ``runs [b, l]`` (`run_ids`) if
    given: ``num [b, q, n, g, v]``, ``den [b, q, n, g]``."""
    if runs is not None:  # within a segment: keys up to i (forward pass) plus keys after i (reverse pass)
        flip = lambda x: None if x is None else jnp.flip(x, 1)
        fn, fd, fc = causal_sums(qf, kf, ka, v, runs, runs, None, block_size, dtype=dtype)
        rn, rd, rc = (flip(x) for x in causal_sums(flip(qf), flip(kf), flip(ka), flip(v), flip(runs), flip(runs),
                                                   None, block_size, strict=True, dtype=dtype))
        if fc is None:
            return fn + rn, fd + rd
        c = lax.stop_gradient(jnp.maximum(fc, rc))
        wf, wr = jnp.exp(fc - c)[..., None], jnp.exp(rc - c)[..., None]  # [b, q, n, 1]
        return fn * wf[..., None] + rn * wr[..., None], fd * wf + rd * wr
    state, norm, _ = _sum_state(kf, ka, v)
    return jnp.einsum("bqngf,bnfv->bqngv", qf, state), jnp.einsum("bqngf,bnf->bqng", qf, norm)


def _with_prefix(qf, kf, ka, v, runs, prefix_lengths, causal: tuple, block_size: int, dtype):
    """Prefix-LM: the rows inside the prefix take the sums over every prefix key, later rows the ``causal`` sums
    ``(num [b, q, n, g, v], den [b, q, n, g])``; returns the blend in the same shapes."""
    num, den = causal
    in_prefix = jnp.arange(kf.shape[1])[None, :] < prefix_lengths[:, None]
    pnum, pden = _bidirectional(qf, *_hide(kf, ka, in_prefix), v, runs, block_size, dtype)
    row_in_prefix = (jnp.arange(qf.shape[1])[None, :] < prefix_lengths[:, None])[:, :, None, None]
    return jnp.where(row_in_prefix[..., None], pnum, num), jnp.where(row_in_prefix, pden, den)


def _sum_state(kf, ka, v):
    """Sum over all keys: ``state [b, n, f, v]``, ``norm [b, n, f]`` float32 relative to ``scale [b, n]`` (their
    largest log-scale, floored; 0 without log-scales). Stabilisers cancel in the output, so they carry no gradient."""
    v = v.astype(jnp.float32)
    if ka is None:
        return (jnp.einsum("bknf,bknv->bnfv", kf, v), kf.sum(1),
                jnp.zeros(kf.shape[:1] + kf.shape[2:3], jnp.float32))
    c = lax.stop_gradient(jnp.maximum(ka.max(1), FLOOR))
    w = jnp.exp(ka - c[:, None])  # [b, k, n]
    return jnp.einsum("bknf,bkn,bknv->bnfv", kf, w, v), jnp.einsum("bknf,bkn->bnf", kf, w), c


# -- recurrent form (decoding) ---------------------------------------------------------------------------------------
class LinearState(NamedTuple):
    """Recurrent state of causal linear attention, relative to the running key log-scale ``scale``.

    Attributes: ``state [b, n, f, v]`` = sum_j phi(k_j) v_j^T, ``norm [b, n, f]`` = sum_j phi(k_j), both times
    ``exp(-scale)``; ``scale [b, n]``.
    """

    state: jax.Array
    norm: jax.Array
    scale: jax.Array


def _state_shapes(batch: int, kv_heads: int, features: int, value_dim: int) -> LinearState:
    """The shape of each `LinearState` field."""
    return LinearState((batch, kv_heads, features, value_dim), (batch, kv_heads, features), (batch, kv_heads))


def init_state(batch: int, kv_heads: int, head_dim: int, value_dim: int,
               feature_map: "str | FeatureMap" = "elu") -> LinearState:
    """The empty state (no keys seen yet) for `linear_step` (exported as `linear_init_state`)."""
    shapes = _state_shapes(batch, kv_heads, get_feature_map(feature_map).num_features(head_dim), value_dim)
    return LinearState(jnp.zeros(shapes.state, jnp.float32), jnp.zeros(shapes.norm, jnp.float32),
                       jnp.full(shapes.scale, FLOOR, jnp.float32))


def prefill_state(k: jax.Array, v: jax.Array, *, feature_map: "str | FeatureMap" = "elu",
                  kv_valid: jax.Array | None = None, decay=None, log_decay=None) -> LinearState:
    """The state after keys/values ``k [b, l, n, d]``, ``v [b, l, n, v]`` (``kv_valid [b, l]`` marks real ones):
    what `linear_step` would have accumulated over them, in one pass, decayed by ``decay [n]`` or
    ``log_decay [b, l, n]`` as in `linear_attention`. Used to prefill a prompt before decoding (exported as
    `linear_prefill_state`)."""
    for name, x in (("k", k), ("v", v)):
        check_rank4(name, x, "[batch, length, kv_heads, dim]")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must match k in batch, length and kv heads: k {k.shape}, v {v.shape}")
    kv_valid = check_valid("kv_valid", kv_valid, k.shape[:2])
    log_decay = gate_log_decay(decay, log_decay, k.shape[:3], kv_valid)
    kf, ka, v = _key_features(get_feature_map(feature_map), k, v, kv_valid)
    if log_decay is not None:  # key j is decayed by every later position: sum_{t > j} log_decay_t
        later = jnp.flip(jnp.cumsum(jnp.flip(log_decay, 1), 1), 1) - log_decay
        ka = later if ka is None else ka + later
    return LinearState(*_sum_state(kf, ka, v))


def step(state: LinearState, q_t: jax.Array, k_t: jax.Array, v_t: jax.Array, *,
         feature_map: "str | FeatureMap" = "elu", valid: jax.Array | None = None, decay=None,
         log_decay=None) -> tuple[jax.Array, LinearState]:
    """One causal position: decay the state, add key/value ``t`` to it, then attend with query ``t`` (exported as
    `linear_step`).

    Args:
      state: from `linear_init_state`, `linear_prefill_state` or a previous `linear_step`.
      q_t: ``[b, h, d]``; k_t: ``[b, n, d]``; v_t: ``[b, n, v]``.
      feature_map: the same map as the causal pass.
      valid: optional bool ``[b]``; False leaves the state unchanged (a padding position: no key, no decay).
      decay: ``[n]`` in (0, 1], or log_decay: ``[b, n]`` (<= 0): this position's decay, as in `linear_attention`.

    Returns:
      ``(out_t [b, h, v], new_state)``; out_t equals `linear_attention` with ``Mask(causal=True)`` (and the same
      decay) at position t.
    """
    fmap = get_feature_map(feature_map)
    b, h, d, n = _check_step(state, q_t, k_t, v_t, fmap)
    valid = check_valid("valid", valid, (b,))
    if log_decay is not None:
        log_decay = jnp.asarray(log_decay)
        if log_decay.shape != (b, n):
            raise ValueError(f"log_decay of one position must have shape [batch, kv_heads] = [{b}, {n}], got "
                             f"{list(log_decay.shape)}")
        log_decay = log_decay[:, None]
    log_decay = gate_log_decay(decay, log_decay, (b, 1, n), None if valid is None else valid[:, None])
    qf = fmap(q_t.reshape(b, n, h // n, d), is_query=True)[0]
    kf, ka, v_t = _key_features(fmap, k_t, v_t, valid)
    ka = jnp.zeros((b, n), jnp.float32) if ka is None else ka
    if valid is not None:
        ka = jnp.where(valid[:, None], ka, -jnp.inf)
    scale = state.scale if log_decay is None else state.scale + log_decay[:, 0]
    c_new = lax.stop_gradient(jnp.maximum(jnp.maximum(scale, ka), FLOOR))
    old, w = jnp.exp(scale - c_new), jnp.exp(ka - c_new)
    s = old[..., None, None] * state.state + jnp.einsum("bnf,bn,bnv->bnfv", kf, w, v_t.astype(jnp.float32))
    z = old[..., None] * state.norm + kf * w[..., None]
    num, den = jnp.einsum("bngf,bnfv->bngv", qf, s), jnp.einsum("bngf,bnf->bng", qf, z)
    return normalize(num, den).reshape(b, h, -1).astype(q_t.dtype), LinearState(s, z, c_new)


def _check_step(state, q_t, k_t, v_t, fmap: FeatureMap) -> tuple[int, int, int, int]:
    """Check `linear_step`'s inputs against each other and the state's shapes; return ``(b, h, d, n)``."""
    b, h, d, n, dv = check_step_qkv("linear_step", q_t, k_t, v_t)
    want = _state_shapes(b, n, fmap.num_features(d), dv)
    got = LinearState(*(tuple(getattr(x, "shape", ())) for x in state)) if isinstance(state, LinearState) else None
    if got != want:
        raise ValueError(f"state is for other shapes: expected state/norm/scale {tuple(want)} for these inputs and "
                         f"feature map, got {tuple(got) if got else type(state).__name__}; build it with "
                         f"linear_init_state({b}, {n}, {d}, {dv}, feature_map) or linear_prefill_state with the same "
                         "feature map")
    return b, h, d, n
