"""Linear (kernelised) attention, "Transformers are RNNs" (Katharopoulos et al. 2020), in O(l) time and memory.

``out_i = sum_j m_ij phi(q_i).phi(k_j) v_j / sum_j m_ij phi(q_i).phi(k_j)`` for the `Mask` ``m`` (0 where a row
sees no key). phi is applied to raw q, k (no 1/sqrt(d); FAVOR+ has its own normaliser). Accumulation is float32.

- non-causal: ``phi(Q) (phi(K)^T V)``, one pass;
- causal: blocks of ``block_size`` -- quadratic inside a block, a ``[f, v]`` state carried across blocks by
  `lax.scan`; never an ``[l, l]`` matrix or an ``[l, f, v]`` tensor;
- prefix-LM: rows inside the prefix use the non-causal sums over the prefix, later rows the causal sums;
- packed segments (contiguous runs of equal id): the carried state restarts at each boundary; non-causal segments
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

from .checks import check_block_size, check_mask, check_qkv, check_rank4
from .feature_maps import FeatureMap, get_feature_map
from .masks import Mask

_FLOOR = -1e30  # finite floor for running log-scales: exp(floor - floor) = 1, exp(-inf - floor) = 0


def linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Mask | None = None,
                     feature_map: "str | FeatureMap" = "elu", block_size: int = 64, bias=None, scale=None,
                     dropout_rate: float = 0.0, dropout_rng=None) -> jax.Array:
    """Linear attention ``[b, q, h, d] x [b, k, n, d] x [b, k, n, v] -> [b, q, h, v]``.

    Args:
      q, k, v: as for `softmax_attention` (GQA/MQA when ``n < h``).
      mask: a `Mask`. Causal, prefix-LM and segment masks need ``q`` and ``k`` of equal length; ``q_offset`` is
        not supported (decode with `linear_step`), nor is a sliding ``window`` (the running sums cannot forget).
      feature_map: ``"elu"``, ``"relu"``, ``"favor"`` or a `FeatureMap`.
      block_size: block length of the causal algorithm (a performance knob; results do not depend on it).
      bias, scale, dropout_rate, dropout_rng: part of the shared kernel signature; linear attention cannot honour a
        bias, a logit scale or dropout on attention weights, and raises `ValueError` if one is given.

    Returns:
      ``[b, q, h, v]`` in q's dtype.
    """
    dims = check_qkv(q, k, v)
    mask = check_mask(mask, dims)
    _check_unsupported(mask, dims, block_size, bias, scale, dropout_rate)
    fmap = get_feature_map(feature_map)
    b, lq, h, d = q.shape
    n, g = dims.kv_heads, dims.groups
    qf = fmap(q.reshape(b, lq, n, g, d), is_query=True)[0]
    kf, ka, v32 = _key_features(fmap, k, v, mask.kv_valid_mask(dims.lk))
    if not mask.causal:
        num, den = _bidirectional(qf, kf, ka, v32, mask, block_size)
    else:
        num, den, _ = _causal_sums(qf, kf, ka, v32, mask.q_segment_ids, mask.kv_segment_ids, block_size)
        if mask.prefix_lengths is not None:
            in_prefix = jnp.arange(dims.lk)[None, :] < mask.prefix_lengths[:, None]
            pnum, pden = _bidirectional(qf, kf, jnp.where(in_prefix[:, :, None], ka, -jnp.inf), v32, mask,
                                        block_size)
            row_in_prefix = (jnp.arange(lq)[None, :] < mask.prefix_lengths[:, None])[:, :, None, None]
            num = jnp.where(row_in_prefix[..., None], pnum, num)
            den = jnp.where(row_in_prefix, pden, den)
    out = num / jnp.where(den > 0, den, 1.0)[..., None]
    return out.reshape(b, lq, h, dims.value_dim).astype(q.dtype)


def _key_features(fmap: FeatureMap, k, v, valid):
    """``(phi(k) features [..., f], log-scales [...], v in float32)`` for keys ``k [b, (l,) n, d]``, values
    ``v [b, (l,) n, v]``. Where ``valid [b(, l)]`` is False the key and value are zeroed first (``0 * nan`` is nan: a
    NaN there must reach no output or gradient) and the key gets log-scale -inf, weight 0."""
    if valid is not None:
        expand = lambda x: jnp.reshape(valid, valid.shape + (1,) * (x.ndim - valid.ndim))
        k, v = (jnp.where(expand(x), x, jnp.zeros((), x.dtype)) for x in (k, v))
    kf, ka = fmap(k, is_query=False)
    ka = jnp.zeros(kf.shape[:-1], jnp.float32) if ka is None else ka
    if valid is not None:
        ka = jnp.where(expand(ka), ka, -jnp.inf)
    return kf, ka, v.astype(jnp.float32)


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


def _bidirectional(qf, kf, ka, v, mask: Mask, block_size: int):
    """Sums over every visible key (no causal structure): ``num [b, q, n, g, v]``, ``den [b, q, n, g]``."""
    if mask.has_segments:  # within a segment: keys up to i (forward pass) plus keys after i (reverse pass)
        fwd = _causal_sums(qf, kf, ka, v, mask.q_segment_ids, mask.kv_segment_ids, block_size)
        flip = lambda x: None if x is None else jnp.flip(x, 1)
        rev = _causal_sums(flip(qf), flip(kf), flip(ka), flip(v), flip(mask.q_segment_ids),
                           flip(mask.kv_segment_ids), block_size, strict=True)
        (fn, fd, fc), (rn, rd, rc) = fwd, tuple(flip(x) for x in rev)
        c = lax.stop_gradient(jnp.maximum(fc, rc))
        wf, wr = jnp.exp(fc - c)[..., None], jnp.exp(rc - c)[..., None]  # [b, q, n, 1]
        return fn * wf[..., None] + rn * wr[..., None], fd * wf + rd * wr
    state, norm, _ = _sum_state(kf, ka, v)
    return jnp.einsum("bqngf,bnfv->bqngv", qf, state), jnp.einsum("bqngf,bnf->bqng", qf, norm)


def _sum_state(kf, ka, v):
    """Sum over all keys: ``state [b, n, f, v]``, ``norm [b, n, f]`` relative to ``scale [b, n]`` (their largest
    log-scale, floored). Stabilisers cancel in the output, so they carry no gradient."""
    c = lax.stop_gradient(jnp.maximum(ka.max(1), _FLOOR))
    w = jnp.exp(ka - c[:, None])  # [b, k, n]
    return jnp.einsum("bknf,bkn,bknv->bnfv", kf, w, v), jnp.einsum("bknf,bkn->bnf", kf, w), c


def _pad_to_blocks(pad: int, qf, kf, ka, v, q_seg, kv_seg):
    """Pad the length axis by ``pad``: padded keys get log-scale -inf (weight 0), padded rows and keys segment ids
    of their own; no segment ids become one segment for all."""
    if pad:
        widths = lambda x, value: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)
        qf, kf, v, ka = widths(qf, 0), widths(kf, 0), widths(v, 0), widths(ka, -jnp.inf)
        if q_seg is not None:
            q_seg, kv_seg = widths(q_seg, -1), widths(kv_seg, -2)
    if q_seg is None:
        q_seg = kv_seg = jnp.zeros(qf.shape[:2], jnp.int32)
    return qf, kf, ka, v, q_seg, kv_seg


def _causal_sums(qf, kf, ka, v, q_seg, kv_seg, block: int, strict: bool = False):
    """Sums over keys ``j <= i`` (``j < i`` if strict) in the same segment, block by block.

    Returns ``num [b, l, n, g, v]`` and ``den [b, l, n, g]``, both relative to ``c [b, l, n]``, the largest
    log-scale among the keys row i sees (floored at -1e30).
    """
    b, l, n, g, f = qf.shape
    dv = v.shape[-1]
    block = min(block, l)
    nc = -(-l // block)
    qf, kf, ka, v, q_seg, kv_seg = _pad_to_blocks(nc * block - l, qf, kf, ka, v, q_seg, kv_seg)
    blocks = lambda x: x.reshape((b, nc, block) + x.shape[2:]).swapaxes(0, 1)
    tri = jnp.tril(jnp.ones((block, block), bool), -1 if strict else 0)

    def body(carry, xs):
        state, norm, c_prev, seg_prev = carry  # [b,n,f,v], [b,n,f], [b,n], [b]
        qc, kc, ac, vc, qs, ks = xs
        visible = tri & (qs[:, :, None] == ks[:, None, :])  # [b, c, c]
        logw = jnp.where(visible[:, None], ac.swapaxes(1, 2)[:, :, None, :], -jnp.inf)  # [b, n, c(q), c(k)]
        carried = (qs == seg_prev[:, None])[:, None, :]  # [b, 1, c]: row continues the carried segment
        cq = jnp.maximum(jnp.maximum(logw.max(-1), jnp.where(carried, c_prev[:, :, None], -jnp.inf)), _FLOOR)
        cq = lax.stop_gradient(cq)
        weights = jnp.einsum("bqngf,bknf->bngqk", qc, kc) * jnp.exp(logw - cq[..., None])[:, :, None]
        from_state = jnp.where(carried, jnp.exp(c_prev[:, :, None] - cq), 0.0)  # [b, n, c]
        num = jnp.einsum("bngqk,bknv->bqngv", weights, vc)
        num = num + jnp.einsum("bqngf,bnfv->bqngv", qc, state) * from_state.swapaxes(1, 2)[:, :, :, None, None]
        den = weights.sum(-1).transpose(0, 3, 1, 2)
        den = den + jnp.einsum("bqngf,bnf->bqng", qc, norm) * from_state.swapaxes(1, 2)[:, :, :, None]
        # The state after this block belongs to the segment of its last key.
        seg_new = ks[:, -1]
        keep_old = seg_prev == seg_new
        in_seg = (ks == seg_new[:, None])[:, :, None]  # [b, c, 1]
        a_new = jnp.where(in_seg, ac, -jnp.inf)  # [b, c, n]
        c_new = lax.stop_gradient(
            jnp.maximum(jnp.maximum(a_new.max(1), jnp.where(keep_old[:, None], c_prev, -jnp.inf)), _FLOOR))
        old = jnp.where(keep_old[:, None], jnp.exp(c_prev - c_new), 0.0)  # [b, n]
        w = jnp.exp(a_new - c_new[:, None])  # [b, c, n]
        state = old[:, :, None, None] * state + jnp.einsum("bknf,bkn,bknv->bnfv", kc, w, vc)
        norm = old[:, :, None] * norm + jnp.einsum("bknf,bkn->bnf", kc, w)
        return (state, norm, c_new, seg_new), (num, den, cq.swapaxes(1, 2))

    init = (jnp.zeros((b, n, f, dv), jnp.float32), jnp.zeros((b, n, f), jnp.float32),
            jnp.full((b, n), _FLOOR, jnp.float32), q_seg[:, 0])
    _, (num, den, c) = lax.scan(body, init, tuple(map(blocks, (qf, kf, ka, v, q_seg, kv_seg))))
    unblock = lambda x: x.swapaxes(0, 1).reshape((b, nc * block) + x.shape[3:])[:, :l]
    return unblock(num), unblock(den), unblock(c)


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
                       jnp.full(shapes.scale, _FLOOR, jnp.float32))


def prefill_state(k: jax.Array, v: jax.Array, *, feature_map: "str | FeatureMap" = "elu",
                  kv_valid: jax.Array | None = None) -> LinearState:
    """The state after keys/values ``k [b, l, n, d]``, ``v [b, l, n, v]`` (``kv_valid [b, l]`` marks real ones):
    what `linear_step` would have accumulated over them, in one pass. Used to prefill a prompt before decoding
    (exported as `linear_prefill_state`)."""
    for name, x in (("k", k), ("v", v)):
        check_rank4(name, x, "[batch, length, kv_heads, dim]")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must match k in batch, length and kv heads: k {k.shape}, v {v.shape}")
    kv_valid = _check_valid("kv_valid", kv_valid, k.shape[:2])
    return LinearState(*_sum_state(*_key_features(get_feature_map(feature_map), k, v, kv_valid)))


def step(state: LinearState, q_t: jax.Array, k_t: jax.Array, v_t: jax.Array, *,
         feature_map: "str | FeatureMap" = "elu", valid: jax.Array | None = None) -> tuple[jax.Array, LinearState]:
    """One causal position: add key/value ``t`` to the state, then attend with query ``t`` (exported as
    `linear_step`).

    Args:
      state: from `linear_init_state`, `linear_prefill_state` or a previous `linear_step`.
      q_t: ``[b, h, d]``; k_t: ``[b, n, d]``; v_t: ``[b, n, v]``.
      feature_map: the same map as the causal pass.
      valid: optional bool ``[b]``; False leaves the state unchanged (a padding position).

    Returns:
      ``(out_t [b, h, v], new_state)``; out_t equals `linear_attention` with ``Mask(causal=True)`` at position t.
    """
    fmap = get_feature_map(feature_map)
    b, h, d, n = _check_step(state, q_t, k_t, v_t, fmap)
    valid = _check_valid("valid", valid, (b,))
    qf = fmap(q_t.reshape(b, n, h // n, d), is_query=True)[0]
    kf, ka, v32 = _key_features(fmap, k_t, v_t, valid)
    c_new = lax.stop_gradient(jnp.maximum(jnp.maximum(state.scale, ka), _FLOOR))
    old, w = jnp.exp(state.scale - c_new), jnp.exp(ka - c_new)
    s = old[..., None, None] * state.state + jnp.einsum("bnf,bn,bnv->bnfv", kf, w, v32)
    z = old[..., None] * state.norm + kf * w[..., None]
    num, den = jnp.einsum("bngf,bnfv->bngv", qf, s), jnp.einsum("bngf,bnf->bng", qf, z)
    out = num / jnp.where(den > 0, den, 1.0)[..., None]
    return out.reshape(b, h, -1).astype(q_t.dtype), LinearState(s, z, c_new)


def _check_step(state, q_t, k_t, v_t, fmap: FeatureMap) -> tuple[int, int, int, int]:
    """Check `linear_step`'s inputs against each other and the state's shapes; return ``(b, h, d, n)``."""
    if any(getattr(x, "ndim", None) != 3 for x in (q_t, k_t, v_t)):
        raise ValueError("linear_step takes one position: q_t [b, h, d], k_t [b, n, d], v_t [b, n, v]; got shapes "
                         f"{[getattr(x, 'shape', type(x)) for x in (q_t, k_t, v_t)]}")
    b, h, d = q_t.shape
    n, dv = k_t.shape[1], v_t.shape[2]
    if k_t.shape != (b, n, d) or v_t.shape[:2] != (b, n) or not 0 < n <= h or h % n:
        raise ValueError(f"q_t [b, h, d], k_t [b, n, d], v_t [b, n, v] disagree (h must be a multiple of n >= 1): "
                         f"got {q_t.shape}, {k_t.shape}, {v_t.shape}")
    want = _state_shapes(b, n, fmap.num_features(d), dv)
    got = LinearState(*(tuple(getattr(x, "shape", ())) for x in state)) if isinstance(state, LinearState) else None
    if got != want:
        raise ValueError(f"state is for other shapes: expected state/norm/scale {tuple(want)} for these inputs and "
                         f"feature map, got {tuple(got) if got else type(state).__name__}; build it with "
                         f"linear_init_state({b}, {n}, {d}, {dv}, feature_map) or linear_prefill_state with the same "
                         "feature map")
    return b, h, d, n


def _check_valid(name: str, valid, shape: tuple) -> jax.Array | None:
    """``valid`` as a bool array of ``shape``, or None."""
    if valid is None:
        return None
    valid = jnp.asarray(valid)
    if valid.shape != tuple(shape) or valid.dtype != jnp.bool_:
        raise ValueError(f"{name} must be bool {list(shape)} (True = a real position), got {valid.dtype} "
                         f"{list(valid.shape)}")
    return valid
