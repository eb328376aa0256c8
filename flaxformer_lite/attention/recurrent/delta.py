"""The delta rule (DeltaNet, Yang et al. 2024) and its gated form (Gated DeltaNet, Yang et al. 2025), in chunk form.

With q and k scaled to unit L2 norm, a state ``S [d, v]`` per kv head, ``beta_t`` the writing strength and ``a_t``
the decay (1 without a gate)::

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T        out_t = q_t^T S_t

Unlike linear attention's sum, a key overwrites what the state held along it (``S^T k_t`` moves towards ``v_t``), so
the state is not a sum of independent terms; the chunk form (the WY representation of the paper) still puts most of
the work into batched matmuls. Inside a block of c positions, with ``G`` the log decay summed from the block's start
(``g = exp(G)``), ``D_ri = exp(G_r - G_i)`` for keys i <= r of row r's segment (0 otherwise) and ``S0`` the state
entering the block, the pseudo-values ``u_r = beta_r (v_r - a_r S_{r-1}^T k_r)`` solve a unit lower-triangular system::

    (I + strict_tril(beta K K^T * D)) U = beta V - (beta g K) S0      =>  U = U~ - W S0
    O = g Q S0 + (tril(Q K^T) * D) U                                     S_end = g_c S0 + (K * D_c.)^T U

Substituting ``U``, the state leaving a block is an affine map of the entering one, ``S_end = M S0 + K~^T U~`` with
``M = g_c I - K~^T W`` (``K~ = K * D_c.``), and ``O = (g Q - A W) S0 + A U~`` (``A = tril(Q K^T) * D``). Everything
but the chain of entering states is computed for a span of blocks at once (the system's inverse by recursive
doubling, batched matmuls); a `lax.scan` over the span's blocks then does one ``[d, d] x [d, v]`` product each.
Decays are summed inside a block only, so every exponent is <= 0. Computed in float32 whatever the input dtype (the
system's inverse and the repeated erasing are less forgiving than linear attention's sums).

Shape key: b batch, l length, h query heads, n kv heads, g = h // n, d head dim, v value dim, m blocks, c block
length.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ...ranges import check_range
from ..checks import Dims, check_block_size, check_mask, check_qkv, check_step_qkv, check_valid
from ..masks import Mask
from ..pallas import block_unsupported, unsupported
from .common import from_spans, gate_log_decay, kernel_impl, plan_spans, scan_spans, segment_runs, to_spans
from .delta_pallas import pallas_delta

NORM_EPS = 1e-6  # q and k are divided by sqrt(|x|^2 + eps): a zero (padded) key stays zero


def delta_attention(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array, *, mask: Mask | None = None,
                    decay=None, log_decay=None, block_size: int = 64, return_state: bool = False,
                    impl: str = "auto"):
    """Causal delta-rule attention ``[b, l, h, d] x [b, l, n, d] x [b, l, n, v] -> [b, l, h, v]``.

    Args:
      q, k, v: as for `linear_attention` (GQA/MQA when ``n < h``); q and k are scaled to unit L2 norm here.
      beta: ``[b, l, n]``: how strongly each position writes its value, in [0, 2] (DeltaNet's sigmoid gives (0, 1);
        up to 2 lets the erasing step reflect, as in the "negative eigenvalues" variants).
      mask: causal (None means causal), with optional padding (a padded position leaves the state unchanged) and
        packed segments (the state restarts where the id changes: each contiguous run is one segment, even if its id
        came before; ``kv_segment_ids`` must equal ``q_segment_ids``, as in `linear_attention`).
        Prefix-LM, sliding windows, ``q_offset`` and non-causal masks raise `ValueError`: the rule runs forward in
        time.
      decay: a fixed decay per kv head ``[n]`` in (0, 1]; log_decay: ``[b, l, n]`` <= 0 per position (Gated
        DeltaNet). One of the two at most, as in `linear_attention`.
      block_size: positions per block (a performance knob; results do not depend on it).
      return_state: also return the state after the last position, ``[b, n, d, v]`` float32 (that of the last
        segment), to go on decoding with `delta_step`.
      impl: ``"xla"`` (the chunk form above, any backend), ``"pallas"`` (`delta_pallas`: fused kernels for the
        forward and the backward, the state carried on chip; Triton on GPU, interpret mode on CPU for tests), or
        ``"auto"`` (``pallas`` on a GPU where ``block_size`` suits it, else
        ``xla``). ``"pallas"`` with a block size that is not a power of two >= 16 raises `ValueError`.

    Returns:
      ``[b, l, h, v]`` in q's dtype; with ``return_state``, ``(out, state)``.
    """
    dims = check_qkv(q, k, v)
    mask = check_mask(Mask(causal=True) if mask is None else mask, dims)
    _check_mask(mask, dims)
    runs = segment_runs(mask, "delta_attention")
    block = check_block_size("block_size", block_size)
    shape = (dims.batch, dims.lk, dims.kv_heads)
    valid = mask.kv_valid_mask(dims.lk)
    beta = _check_beta(beta, shape, valid)
    log_decay = gate_log_decay(decay, log_decay, shape, valid)
    k, v = mask.zero_invalid_keys(k, v)
    b, l, h, d = q.shape
    qg = _unit(q.reshape(b, l, dims.kv_heads, dims.groups, d))
    if delta_impl(impl, block) == "pallas":
        segments = None if runs is None else mask.q_segment_ids  # the kernel entry takes segment ids (run_ids inside)
        out, state = pallas_delta(qg, _unit(k), v, beta, segments, log_decay, block=block)
    else:
        out, state = _blocks(qg, _unit(k), v.astype(jnp.float32), beta, log_decay, runs, min(block, l))
    out = out.reshape(b, l, h, dims.value_dim).astype(q.dtype)
    return (out, state) if return_state else out


def delta_impl(impl: str, block_size: int, backend: str | None = None) -> str:
    """The impl `delta_attention` runs, ``"xla"`` or ``"pallas"`` (see its ``impl``); ``backend``: None for JAX's
    default. Raises `ValueError` for an unknown impl, or ``"pallas"`` asked for a call it cannot compute."""
    return kernel_impl("delta_attention", impl, backend,
                       lambda backend: block_unsupported(block_size) or unsupported("the delta rule kernels", backend))


def delta_init_state(batch: int, kv_heads: int, head_dim: int, value_dim: int) -> jax.Array:
    """The empty state ``[b, n, d, v]`` (float32 zeros) for `delta_step`."""
    return jnp.zeros((batch, kv_heads, head_dim, value_dim), jnp.float32)


def delta_step(state: jax.Array, q_t: jax.Array, k_t: jax.Array, v_t: jax.Array, beta_t: jax.Array, *,
               decay=None, log_decay=None, valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """One position of the delta rule: ``S = a (I - beta k k^T) S + beta k v^T``, then ``out = q^T S``.

    Args:
      state: ``[b, n, d, v]`` from `delta_init_state`, `delta_attention(..., return_state=True)` or a previous step.
      q_t: ``[b, h, d]``; k_t: ``[b, n, d]``; v_t: ``[b, n, v]``; beta_t: ``[b, n]`` in [0, 2].
      decay: ``[n]`` in (0, 1], or log_decay: ``[b, n]`` (<= 0): this position's decay, as in `delta_attention`.
      valid: optional bool ``[b]``; False leaves the state unchanged (a padding position).

    Returns:
      ``(out_t [b, h, v] in q_t's dtype, new_state)``: `delta_attention` at this position.
    """
    b, h, d, n, dv = check_step_qkv("delta_step", q_t, k_t, v_t)
    if getattr(state, "shape", None) != (b, n, d, dv):
        raise ValueError(f"state must have shape [batch, kv_heads, head_dim, value_dim] = {[b, n, d, dv]}, got "
                         f"{getattr(state, 'shape', type(state))}; build it with delta_init_state({b}, {n}, {d}, {dv})")
    valid = check_valid("valid", valid, (b,))
    seq_valid = None if valid is None else valid[:, None]
    beta = _check_beta(jnp.reshape(beta_t, (b, 1, n)) if jnp.shape(beta_t) == (b, n) else beta_t, (b, 1, n),
                       seq_valid)[:, 0]
    if log_decay is not None:
        if jnp.shape(log_decay) != (b, n):
            raise ValueError(f"log_decay of one position must have shape [batch, kv_heads] = [{b}, {n}], got "
                             f"{list(jnp.shape(log_decay))}")
        log_decay = jnp.reshape(log_decay, (b, 1, n))
    log_decay = gate_log_decay(decay, log_decay, (b, 1, n), seq_valid)
    k = _unit(k_t if valid is None else jnp.where(valid[:, None, None], k_t, 0))
    v = v_t.astype(jnp.float32) if valid is None else jnp.where(valid[:, None, None], v_t, 0).astype(jnp.float32)
    kept = state if log_decay is None else jnp.exp(log_decay[:, 0])[..., None, None] * state
    u = beta[..., None] * (v - jnp.einsum("bnd,bndv->bnv", k, kept))  # the value written, less what was there
    new = kept + jnp.einsum("bnd,bnv->bndv", k, u)
    out = jnp.einsum("bngd,bndv->bngv", _unit(q_t.reshape(b, n, h // n, d)), new)
    return out.reshape(b, h, dv).astype(q_t.dtype), new


def _unit(x: jax.Array) -> jax.Array:
    """``x`` in float32, scaled to unit L2 norm over its last axis (a zero vector stays zero)."""
    x = x.astype(jnp.float32)
    return x * lax.rsqrt(jnp.sum(x * x, -1, keepdims=True) + NORM_EPS)


def _check_mask(mask: Mask, dims: Dims) -> None:
    if not mask.causal or mask.prefix_lengths is not None or mask.window is not None or mask.q_offset is not None:
        raise ValueError("delta_attention needs a causal mask without prefix_lengths, window or q_offset (the rule "
                         "runs forward in time; decode with delta_step)")
    if dims.lq != dims.lk:
        raise ValueError(f"delta_attention needs lq == lk, got {dims.lq} vs {dims.lk}")


def _check_beta(beta, shape: tuple, valid) -> jax.Array:
    """``beta`` as float32 ``shape``, 0 where ``valid`` is False; a concrete value outside [0, 2] is refused."""
    beta = jnp.asarray(beta)
    if beta.shape != tuple(shape):
        raise ValueError(f"beta must have shape [batch, length, kv_heads] = {list(shape)}, got {list(beta.shape)}")
    check_range("beta", beta, lambda x: (x >= 0) & (x <= 2), "in [0, 2]")
    beta = beta.astype(jnp.float32)
    return beta if valid is None else jnp.where(valid[..., None], beta, 0.0)


def _blocks(q, k, v, beta, log_decay, segments, c: int):
    """The chunk form: unit ``q [b, l, n, g, d]``, ``k [b, l, n, d]``, ``v [b, l, n, v]``, ``beta [b, l, n]`` (0 at
    padding), ``log_decay [b, l, n]`` or None, ``segments [b, l]`` or None, block length ``c`` ->
    ``(out [b, l, n, g, v], state [b, n, d, v])``, float32. Blocks go in spans (`blocks_per_span`: all at once on
    accelerators) under a `lax.scan` carrying the state, as in linear_causal.py: on CPU a span's intermediates stay
    in cache."""
    b, l, n, g, d = q.shape
    plan = plan_spans(l, c, 4 * b * n * d * v.shape[-1])
    heads = lambda x: to_spans(x, plan, heads=True)  # [b, l, n, ...] -> [spans, b, n, span, c, ...]
    xs = {"q": heads(q), "k": heads(k), "v": heads(v), "beta": heads(beta)}
    if log_decay is not None:
        xs["cum"] = jnp.cumsum(heads(log_decay), -1)  # log decay since the block's start
    if segments is not None:  # padded positions join the last segment (with zero keys and beta they change nothing,
        # and the state returned stays that segment's); -2 precedes the first block
        xs["seg"] = to_spans(segments.astype(jnp.int32), plan, "edge")  # [spans, b, span, c]
        last = jnp.moveaxis(xs["seg"][..., -1], 0, 1).reshape(b, plan.count * plan.size)
        before = jnp.concatenate([jnp.full((b, 1), -2, jnp.int32), last[:, :-1]], 1)
        xs["before"] = jnp.moveaxis(before.reshape(b, plan.count, plan.size), 1, 0)  # [spans, b, span]
    state, out = scan_spans(_span, jnp.zeros((b, n, d, v.shape[-1]), jnp.float32), xs)
    return from_spans(out, plan), state


def _span(entering, x: dict):
    """One span of blocks from the state ``entering [b, n, d, v]``: ``x`` holds ``q [b, n, m, c, g, d]``,
    ``k [b, n, m, c, d]``, ``v [b, n, m, c, v]``, ``beta [b, n, m, c]``, optionally ``cum [b, n, m, c]`` and
    ``seg [b, m, c]`` with ``before [b, m]`` (the segment of the position before each block). Returns the state
    leaving the span and its outputs ``[b, n, m, c, g, v]``."""
    qb, kb, vb, bb = x["q"], x["k"], x["v"], x["beta"]
    d, c = kb.shape[-1], kb.shape[-2]
    cum = x.get("cum", jnp.zeros_like(bb))  # [b, n, m, c]
    lower = jnp.tril(jnp.ones((c, c), bool))
    if "seg" not in x:
        same, carried, in_last = lower, jnp.ones((1, 1, 1, c), bool), True
    else:  # a block's entering state is that of the position before it
        sb, before = x["seg"], x["before"]
        same = (lower & (sb[..., :, None] == sb[..., None, :]))[:, None]  # [b, 1, m, c, c]
        carried = (sb == before[..., None])[:, None]  # [b, 1, m, c]: rows that read the entering state
        in_last = (sb == sb[..., -1:])[:, None]  # [b, 1, m, c]: keys in the state leaving the block
    # D[r, i] = exp(cum_r - cum_i) for keys i <= r of row r's segment (exponent masked first: exp(-inf) = 0)
    pair = jnp.exp(jnp.where(same, cum[..., :, None] - cum[..., None, :], -jnp.inf))  # [b, n, m, c, c]
    strict = pair * ~jnp.eye(c, dtype=bool)
    kk = jnp.einsum("bnmrd,bnmid->bnmri", kb, kb)
    g_row = jnp.where(carried, jnp.exp(cum), 0.0)  # [b, n, m, c]: the entering state's decay at each row
    rhs = jnp.concatenate([bb[..., None] * vb, (bb * g_row)[..., None] * kb], -1)
    solved = jnp.einsum("bnmri,bnmie->bnmre", unit_lower_inverse(bb[..., None] * kk * strict), rhs)
    u0, w = solved[..., :vb.shape[-1]], solved[..., vb.shape[-1]:]  # U = u0 - w S0
    scores = jnp.einsum("bnmrgd,bnmid->bnmrgi", qb, kb) * pair[..., :, None, :]  # [b, n, m, c, g, c]
    q_in = qb * g_row[..., None, None] - jnp.einsum("bnmrgi,bnmid->bnmrgd", scores, w)  # reads S0
    k_out = kb * jnp.where(in_last, jnp.exp(cum[..., -1:] - cum), 0.0)[..., None]  # keys decayed to the block end
    s_keep = jnp.where(carried[..., -1], jnp.exp(cum[..., -1]), 0.0)  # [b, n, m]: what of S0 is kept
    # S_end = M S0 + k_out^T u0, M = s_keep I - k_out^T w: chained by one scan over blocks
    step_map = s_keep[..., None, None] * jnp.eye(d, dtype=jnp.float32) - jnp.einsum("bnmid,bnmie->bnmde", k_out, w)
    step_add = jnp.einsum("bnmid,bnmiv->bnmdv", k_out, u0)

    def chain(s, x):
        return jnp.einsum("bnde,bnev->bndv", x[0], s) + x[1], s

    leaving, each = lax.scan(chain, entering, (jnp.moveaxis(step_map, 2, 0), jnp.moveaxis(step_add, 2, 0)))
    each = jnp.moveaxis(each, 0, 2)  # [b, n, m, d, v]: the state entering each block
    out = (jnp.einsum("bnmrgd,bnmdv->bnmrgv", q_in, each)
           + jnp.einsum("bnmrgi,bnmiv->bnmrgv", scores, u0))  # [b, n, m, c, g, v]
    return leaving, out


def unit_lower_inverse(a: jax.Array) -> jax.Array:
    """``(I + a)^-1`` for strictly lower-triangular ``a [..., c, c]``, by recursive doubling: the inverse of each
    diagonal block of size 2s is ``[[T1, 0], [-T2 A21 T1, T2]]`` from those of its halves, starting from s = 1
    (where it is 1). Batched matmuls only, no sequential loop: about log2(c) steps.

    (`lax.linalg.triangular_solve` does the same on CPU through LAPACK's trsm, but two such calls running at once on
    XLA:CPU's thread pool can deadlock in jaxlib 0.10, and on accelerators small solves are slower than matmuls.)
    """
    c = a.shape[-1]
    size = 1 << max(c - 1, 0).bit_length()  # the next power of two: padded rows invert to identity
    if size != c:
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, size - c), (0, size - c)])
    lead = a.shape[:-2]
    inv = jnp.ones(lead + (size, 1, 1), a.dtype)  # the inverses of the diagonal blocks of size s, [..., size/s, s, s]
    s = 1
    while s < size:
        pairs = size // (2 * s)
        tiles = a.reshape(lead + (pairs, 2, s, pairs, 2, s))
        a21 = jnp.diagonal(tiles[..., :, 1, :, :, 0, :], axis1=-4, axis2=-2)  # [..., s, s, pairs]
        a21 = jnp.moveaxis(a21, -1, -3)  # [..., pairs, s, s]
        inv = inv.reshape(lead + (pairs, 2, s, s))
        t1, t2 = inv[..., 0, :, :], inv[..., 1, :, :]
        low = -jnp.einsum("...ij,...jk,...kl->...il", t2, a21, t1)
        top = jnp.concatenate([t1, jnp.zeros_like(t1)], -1)
        inv = jnp.concatenate([top, jnp.concatenate([low, t2], -1)], -2)  # [..., pairs, 2s, 2s]
        s *= 2
    return inv.reshape(lead + (size, size))[..., :c, :c]
