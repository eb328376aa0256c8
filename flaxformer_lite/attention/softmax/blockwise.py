"""Blockwise (flash-style) softmax attention in pure JAX: O(l) memory forward *and* backward.

Forward: for each query block, an online softmax over key blocks (running max ``m``, normaliser ``l``, accumulator),
visiting only key blocks the mask can reach (`attention.bounds`: causal attention does about half the work; a sliding
``window`` only the blocks its band crosses). Backward: a `custom_vjp` that keeps only ``out`` and the log-sum-exp
``lse`` and recomputes each tile's probabilities (FlashAttention-2's algorithm: outer loop over key blocks, inner loop
over the query blocks that can see them).

Two ways to visit the tiles (``static``):
  - on the CPU (default there): loop bounds computed from the mask's data (lengths, prefixes, offsets, the window)
    and tiles with no visible pair skipped by `lax.cond`. The CPU pays nothing for that and gains the skipped work.
  - elsewhere (``static=True``): one `lax.scan` over the list of tiles the mask's *static* structure can reach (all
    of them, or those on and below the diagonal for a plain causal mask, and of those only the ones the band crosses
    for a windowed one without ``q_offset``), everything else masked inside the tile. On XLA:GPU a loop with a
    data-dependent trip count, or a conditional, copies its predicate to the host and synchronises the stream at
    every iteration; a scan of static length does not.

Shape key: b batch, q query length, k key length, n kv heads, g query heads per kv head, d head dim, v value dim;
``i``/``j`` index query/key blocks of sizes ``bq``/``bk``. Tiles of scores are ``[b, n, g, bq, bk]`` float32.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import bounds
from ..checks import Dims, check_block_size
from ..dropout import grouped_keep_mask
from ..masks import Mask


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static description of one call (hashable, so it can be a `custom_vjp` non-diff argument)."""

    scale: float
    bq: int
    bk: int
    nq: int
    nk: int
    lk: int  # true key length; padded keys past it are never attended
    groups: int
    dropout_rate: float
    skip_empty: bool  # test each tile for any visible pair (segment ids / kv_valid make the structure irregular)
    static: bool = False  # visit a static list of tiles: no data-dependent loop bounds or conditionals
    lower_triangle: bool = False  # (static) the mask is plain causal: tiles above the diagonal are never visible
    window: int | None = None  # (static, with lower_triangle) tiles left of the sliding-window band are never visible


def blockwise_attention(q, k, v, *, dims: Dims, mask: Mask, bias, scale: float, dropout_rate: float = 0.0,
                        dropout_seed=None, block_q: int = 512, block_kv: int = 512,
                        static: bool | None = None) -> jax.Array:
    """Flash-style softmax attention: ``q [b, q, h, d]``, ``k [b, k, n, d]``, ``v [b, k, n, v]`` -> ``[b, q, h, v]``.

    Inputs are validated by `softmax_attention`; call that instead. Any lengths work: the sequence is padded to a
    multiple of the block size and padded keys are excluded. ``static`` (default: True off the CPU) visits a
    static list of tiles, with no data-dependent loop or conditional (see the module docstring).
    """
    bq, bk = min(check_block_size("block_q", block_q), dims.lq), min(check_block_size("block_kv", block_kv), dims.lk)
    nq, nk = -(-dims.lq // bq), -(-dims.lk // bk)
    lq_pad, lk_pad = nq * bq, nk * bk
    q = _pad_axis(q, 1, lq_pad)
    k, v = _pad_axis(k, 1, lk_pad), _pad_axis(v, 1, lk_pad)
    mask = mask.pad_to(lq_pad, lk_pad)
    if bias is not None:
        bias = _pad_axis(_pad_axis(bias, 2, lq_pad if bias.shape[2] > 1 else 1), 3, lk_pad if bias.shape[3] > 1 else 1)
    static = jax.default_backend() != "cpu" if static is None else bool(static)
    lower_triangle = mask.causal and mask.q_offset is None and mask.prefix_lengths is None
    plan = _Plan(scale, bq, bk, nq, nk, dims.lk, dims.groups, dropout_rate,
                 skip_empty=(mask.has_segments or mask.kv_valid is not None) and not static, static=static,
                 lower_triangle=lower_triangle, window=mask.window if lower_triangle else None)
    out = _online(plan, q, k, v, mask, bias, dropout_seed)
    return out[:, :dims.lq]


def _pad_axis(x, axis, size):
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


# -- tiles -----------------------------------------------------------------------------------------------------------
def _tile_visible(plan: _Plan, mask: Mask, i, j):
    """bool [b|1, 1, 1, bq, bk]: which pairs of query block i and key block j may attend."""
    allowed = mask.block(i * plan.bq, plan.bq, j * plan.bk, plan.bk)
    if plan.nk * plan.bk != plan.lk:
        allowed = allowed & (j * plan.bk + jnp.arange(plan.bk) < plan.lk)
    return allowed[:, :, None]


def _bias_tile(plan: _Plan, bias, i, j):
    """The bias for tile (i, j), shaped to broadcast against [b, n, g, bq, bk]."""
    if bias.shape[2] > 1:
        bias = lax.dynamic_slice_in_dim(bias, i * plan.bq, plan.bq, 2)
    if bias.shape[3] > 1:
        bias = lax.dynamic_slice_in_dim(bias, j * plan.bk, plan.bk, 3)
    bb, hb, tq, tk = bias.shape
    n, g = (hb // plan.groups, plan.groups) if hb > 1 else (1, 1)
    return bias.reshape(bb, n, g, tq, tk).astype(jnp.float32)


def _keep_tile(plan: _Plan, seed, shape, i, j):
    """Dropout keep mask (scaled by 1/(1-rate)) for tile (i, j); identical to the dense reference's entries."""
    b, n, g = shape[:3]
    keep = grouped_keep_mask(seed, plan.dropout_rate, b, n, g, i * plan.bq + jnp.arange(plan.bq),
                             j * plan.bk + jnp.arange(plan.bk))
    return keep.astype(jnp.float32) / (1.0 - plan.dropout_rate)


def _scores(plan: _Plan, qi, kj, bias, visible, i, j):
    """Masked logits of tile (i, j): float32 [b, n, g, bq, bk], -inf where not visible."""
    s = jnp.einsum("bqngd,bknd->bngqk", qi, kj, preferred_element_type=jnp.float32) * plan.scale
    if bias is not None:
        s = s + _bias_tile(plan, bias, i, j)
    return jnp.where(visible, s, -jnp.inf)


def _static_tiles(plan: _Plan, by_key: bool) -> tuple[np.ndarray, np.ndarray]:
    """The (query block, key block) indices a static visit goes through, as two int32 arrays: every tile, or for a
    plain causal mask those `bounds.kv_blocks` leaves by the static structure alone (pairs ``key <= query``, and
    ``query - key < window`` for a windowed one); ordered by query block (``by_key`` False: the forward) or by key
    block (the backward)."""
    i, j = np.meshgrid(np.arange(plan.nq), np.arange(plan.nk), indexing="ij")
    keep = np.ones_like(i, bool)
    if plan.lower_triangle:
        with jax.ensure_compile_time_eval():  # numbers at trace time, not traced ops
            start, stop = bounds.kv_blocks(Mask(causal=True, window=plan.window), i[:, :1], plan.bq, plan.bk,
                                           plan.nk * plan.bk)
        keep = (j >= np.asarray(start)) & (j < np.asarray(stop))
    i, j = i[keep], j[keep]
    order = np.lexsort((i, j)) if by_key else np.lexsort((j, i))
    return i[order].astype(np.int32), j[order].astype(np.int32)


def _maybe_skip(plan: _Plan, visible, compute, carry):
    """Run ``compute(carry)`` unless the tile is entirely masked (only checked when the structure is irregular)."""
    if not plan.skip_empty:
        return compute(carry)
    return lax.cond(jnp.any(visible), compute, lambda c: c, carry)


# -- forward ---------------------------------------------------------------------------------------------------------
def _online_update(plan: _Plan, carry, s, vj, seed, i, j):
    """Fold the masked logits ``s [b, n, g, bq, bk]`` of tile (i, j) into the running max ``m``, normaliser ``l``
    and accumulator ``acc [b, n, g, bq, v]`` of query block i."""
    m, l, acc = carry
    m_new = jnp.maximum(m, s.max(-1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # fully masked so far: avoid inf - inf
    p = jnp.exp(s - m_safe[..., None])
    alpha = jnp.exp(m - m_safe)
    l = alpha * l + p.sum(-1)
    if plan.dropout_rate > 0:
        p = p * _keep_tile(plan, seed, p.shape, i, j)
    pv = jnp.einsum("bngqk,bknv->bngqv", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
    return m_new, l, alpha[..., None] * acc + pv


def _finish(m, l, acc, dtype):
    """Running statistics -> the output ``[..., bq, n, g, v]`` (``dtype``) and the log-sum-exp; a fully masked row
    has ``acc == 0`` and gives 0, with ``lse = -inf``."""
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
    return jnp.moveaxis(out, -2, -4).astype(dtype), lse


def _forward(plan: _Plan, q, k, v, mask, bias, seed):
    b, lq, h, d = q.shape
    n, g, dv = k.shape[2], plan.groups, v.shape[3]
    qb = q.reshape(b, plan.nq, plan.bq, n, g, d).swapaxes(0, 1)
    kb = k.reshape(b, plan.nk, plan.bk, n, d).swapaxes(0, 1)
    vb = v.reshape(b, plan.nk, plan.bk, n, dv).swapaxes(0, 1)
    stats = ((b, n, g, plan.bq), (b, n, g, plan.bq), (b, n, g, plan.bq, dv))
    if plan.static:
        return _forward_static(plan, qb, kb, vb, mask, bias, seed, stats, q.dtype)

    def q_block(args):
        i, qi = args
        lo, hi = bounds.kv_blocks(mask, i, plan.bq, plan.bk, plan.lk)

        def kv_step(j, carry):
            visible = _tile_visible(plan, mask, i, j)
            compute = lambda c: _online_update(plan, c, _scores(plan, qi, kb[j], bias, visible, i, j), vb[j], seed,
                                               i, j)
            return _maybe_skip(plan, visible, compute, carry)

        init = tuple(jnp.full(shape, -jnp.inf if k == 0 else 0.0, jnp.float32) for k, shape in enumerate(stats))
        m, l, acc = lax.fori_loop(lo, hi, kv_step, init)
        return _finish(m, l, acc, q.dtype)

    out, lse = lax.map(q_block, (jnp.arange(plan.nq), qb))
    return out.swapaxes(0, 1).reshape(b, lq, h, dv), lse


def _forward_static(plan: _Plan, qb, kb, vb, mask, bias, seed, stats, dtype):
    """The forward as one scan of static length over `_static_tiles`; the statistics of every query block ride in
    the carry (``[nq, ...]``, O(l) memory)."""
    def tile(carry, ij):
        i, j = ij
        visible = _tile_visible(plan, mask, i, j)
        s = _scores(plan, qb[i], kb[j], bias, visible, i, j)
        new = _online_update(plan, tuple(x[i] for x in carry), s, vb[j], seed, i, j)
        return tuple(x.at[i].set(y) for x, y in zip(carry, new)), None

    init = tuple(jnp.full((plan.nq,) + shape, -jnp.inf if k == 0 else 0.0, jnp.float32)
                 for k, shape in enumerate(stats))
    (m, l, acc), _ = lax.scan(tile, init, _static_tiles(plan, by_key=False))
    out, lse = _finish(m, l, acc, dtype)  # [nq, b, bq, n, g, v]
    b, n, g, dv = kb.shape[1], kb.shape[3], plan.groups, vb.shape[-1]
    return out.swapaxes(0, 1).reshape(b, plan.nq * plan.bq, n * g, dv), lse


# -- backward --------------------------------------------------------------------------------------------------------
def _reduce_to_bias(ds, bias):
    """Sum a tile gradient [b, n, g, bq, bk] over the dims where the bias broadcasts: -> bias tile shape."""
    b, n, g, tq, tk = ds.shape
    ds = ds.reshape(b, n * g, tq, tk)
    axes = tuple(ax for ax, size in enumerate(bias.shape) if size == 1 and ds.shape[ax] != 1)
    return ds.sum(axes, keepdims=True)


def _tile_grads(plan: _Plan, qi, kj, vj, doi, bias, visible, lse_i, delta_i, seed, i, j):
    """Tile (i, j) of the backward pass from recomputed weights: ``ds`` (the logits' gradient, [b, n, g, bq, bk])
    and the contributions ``dq [b, bq, n, g, d]``, ``dk [b, bk, n, d]``, ``dv [b, bk, n, v]``, all float32."""
    s = _scores(plan, qi, kj, bias, visible, i, j)
    p = jnp.exp(s - lse_i[..., None])
    keep = _keep_tile(plan, seed, p.shape, i, j) if plan.dropout_rate > 0 else None
    pd = p if keep is None else p * keep
    dv = jnp.einsum("bngqk,bqngv->bknv", pd.astype(doi.dtype), doi, preferred_element_type=jnp.float32)
    dp = jnp.einsum("bqngv,bknv->bngqk", doi, vj, preferred_element_type=jnp.float32)
    if keep is not None:
        dp = dp * keep
    ds = p * (dp - delta_i[..., None])
    dq = jnp.einsum("bngqk,bknd->bqngd", ds, kj.astype(jnp.float32)) * plan.scale
    dk = jnp.einsum("bngqk,bqngd->bknd", ds, qi.astype(jnp.float32)) * plan.scale
    return ds, dq, dk, dv


def _backward(plan: _Plan, res, dout):
    q, k, v, mask, bias, seed, out, lse = res
    b, lq, h, d = q.shape
    n, g, dv = k.shape[2], plan.groups, v.shape[3]
    qb = q.reshape(b, plan.nq, plan.bq, n, g, d).swapaxes(0, 1)
    kb = k.reshape(b, plan.nk, plan.bk, n, d).swapaxes(0, 1)
    vb = v.reshape(b, plan.nk, plan.bk, n, dv).swapaxes(0, 1)
    dob = dout.reshape(b, plan.nq, plan.bq, n, g, dv).swapaxes(0, 1)
    # D_i = rowsum(dO * O) (also right with dropout: rowsum(P * dP) = dO . O).
    delta = jnp.einsum("ibqngv,ibqngv->ibngq", dob.astype(jnp.float32),
                       out.reshape(b, plan.nq, plan.bq, n, g, dv).swapaxes(0, 1).astype(jnp.float32))
    lse_safe = jnp.where(lse == -jnp.inf, 0.0, lse)
    dbias0 = None if bias is None else jnp.zeros(bias.shape, jnp.float32)
    tiles = (qb, kb, vb, dob, lse_safe, delta)
    if plan.static:
        dq, dk, dv, dbias = _backward_static(plan, tiles, mask, bias, seed, dbias0)
    else:
        dq, dk, dv, dbias = _backward_dynamic(plan, tiles, mask, bias, seed, dbias0)
    dq = dq.swapaxes(0, 1).reshape(q.shape).astype(q.dtype)
    dk = dk.swapaxes(0, 1).reshape(k.shape).astype(k.dtype)
    dv = dv.swapaxes(0, 1).reshape(v.shape).astype(v.dtype)
    dbias = None if bias is None else dbias.astype(bias.dtype)
    return dq, dk, dv, None, dbias, None


def _tile_backward(plan: _Plan, tiles, kj, vj, bias, seed, visible, i, j, dbias):
    """Tile (i, j)'s contributions ``dq_i``, ``dk_j``, ``dv_j``, and ``dbias`` with the tile's share added."""
    qb, _, _, dob, lse_safe, delta = tiles
    ds, dq_i, dk_j, dv_j = _tile_grads(plan, qb[i], kj, vj, dob[i], bias, visible, lse_safe[i], delta[i], seed, i, j)
    if bias is not None:
        dbias = _add_bias_grad(plan, dbias, _reduce_to_bias(ds, bias), i, j)
    return dq_i, dk_j, dv_j, dbias


def _backward_dynamic(plan: _Plan, tiles, mask, bias, seed, dbias):
    """Outer scan over key blocks, inner loop over the query blocks the mask's data lets see them (the CPU)."""
    qb, kb, vb = tiles[:3]

    def kv_block(carry, args):
        dq, dbias = carry
        j, kj, vj = args
        lo, hi = bounds.q_blocks(mask, j, plan.bq, plan.bk, plan.nq, plan.lk)

        def q_step(i, inner):
            visible = _tile_visible(plan, mask, i, j)

            def compute(inner):
                dk_j, dv_j, dq, dbias = inner
                dq_i, dk_ij, dv_ij, dbias = _tile_backward(plan, tiles, kj, vj, bias, seed, visible, i, j, dbias)
                return dk_j + dk_ij, dv_j + dv_ij, dq.at[i].add(dq_i), dbias

            return _maybe_skip(plan, visible, compute, inner)

        init = (jnp.zeros(kj.shape, jnp.float32), jnp.zeros(vj.shape, jnp.float32), dq, dbias)
        dk_j, dv_j, dq, dbias = lax.fori_loop(lo, hi, q_step, init)
        return (dq, dbias), (dk_j, dv_j)

    (dq, dbias), (dk, dv) = lax.scan(kv_block, (jnp.zeros(qb.shape, jnp.float32), dbias),
                                     (jnp.arange(plan.nk), kb, vb))
    return dq, dk, dv, dbias


def _backward_static(plan: _Plan, tiles, mask, bias, seed, dbias):
    """One scan of static length over `_static_tiles`, ordered by key block; every gradient rides in the carry."""
    qb, kb, vb = tiles[:3]

    def tile(carry, ij):
        dq, dk, dv, dbias = carry
        i, j = ij
        visible = _tile_visible(plan, mask, i, j)
        dq_i, dk_j, dv_j, dbias = _tile_backward(plan, tiles, kb[j], vb[j], bias, seed, visible, i, j, dbias)
        return (dq.at[i].add(dq_i), dk.at[j].add(dk_j), dv.at[j].add(dv_j), dbias), None

    init = tuple(jnp.zeros(x.shape, jnp.float32) for x in (qb, kb, vb)) + (dbias,)
    (dq, dk, dv, dbias), _ = lax.scan(tile, init, _static_tiles(plan, by_key=True))
    return dq, dk, dv, dbias


def _add_bias_grad(plan: _Plan, dbias, tile, i, j):
    starts = [0, 0, i * plan.bq if dbias.shape[2] > 1 else 0, j * plan.bk if dbias.shape[3] > 1 else 0]
    current = lax.dynamic_slice(dbias, starts, tile.shape)
    return lax.dynamic_update_slice(dbias, current + tile, starts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _online(plan: _Plan, q, k, v, mask, bias, seed):
    return _forward(plan, q, k, v, mask, bias, seed)[0]


def _online_fwd(plan, q, k, v, mask, bias, seed):
    out, lse = _forward(plan, q, k, v, mask, bias, seed)
    return out, (q, k, v, mask, bias, seed, out, lse)


_online.defvjp(_online_fwd, _backward)
