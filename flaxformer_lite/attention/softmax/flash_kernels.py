"""The Pallas kernels behind `flash_attention` (FlashAttention-2): forward, backward dq, backward dk/dv.

Written for the Pallas Triton GPU backend (and run by Pallas interpret mode on CPU): the grid runs over (blocks,
batch, heads); one program loads one block of rows and loops (`lax.fori_loop`) over the blocks of the other side;
every loaded tile is ``[power of two >= 16, ...]``; matmuls take operands of one dtype and accumulate in float32.

Shape key: b batch, q query length, k key length (both padded to block multiples), h query heads, n kv heads,
g = h // n, d head dim, v value dim (both padded to powers of two >= 16); ``bq``/``bk`` the query/key block sizes.

The mask arrives as int32 rows (built by flash.py): query ``i`` may attend key ``j`` when
``q_seg[i] == kv_seg[j]`` (if `FlashPlan.segmented`), ``kv_pos[j] <= q_pos[i]`` (if `FlashPlan.causal`),
``kv_pos[j] > q_pos[i] - window`` (if `FlashPlan.window`: a sliding window) and ``j < FlashPlan.lk`` (block
padding). Loop bounds come precomputed per (batch row, block) by `attention.bounds`: key blocks ``kv_start:kv_stop``
(``[b, q / bq]`` each) to visit for each query block, query blocks ``q_start:q_stop`` (``[b, k / bk]``) that can see
each key block.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ..pallas import pallas_call
from ..pallas import dot as _dot

_NEG_INF = float("-inf")
_LOG2E = 1.4426950408889634  # logits are kept in base 2 inside the kernels: exp2 is one instruction, exp is two


@dataclasses.dataclass(frozen=True)
class FlashPlan:
    """Static description of one flash call (hashable: a `custom_vjp` non-diff argument).

    Attributes:
      scale: logit scale.
      lk: true key length; keys at or past it are block padding (masked when ``kv_padded``).
      kv_padded: the key length was padded up to a block multiple.
      groups: query heads per kv head (g).
      causal: compare positions (``kv_pos <= q_pos``).
      window: with ``causal``, also ``kv_pos > q_pos - window`` (sliding-window attention); None for no window.
      segmented: compare segment ids (segments, and padding folded into them).
      block_q, block_kv: forward block sizes; block_q_bwd, block_kv_bwd: backward ones (dividing the forward ones).
      interpret: run with Pallas interpret mode (CPU) instead of compiling for Triton.
    """

    scale: float
    lk: int
    kv_padded: bool
    groups: int
    causal: bool
    window: int | None
    segmented: bool
    block_q: int
    block_kv: int
    block_q_bwd: int
    block_kv_bwd: int
    interpret: bool


class FlashMasks(NamedTuple):
    """The mask as the kernels read it: int32 rows and loop bounds (a pytree of integer arrays, no gradient)."""

    q_pos: jax.Array  # [b, q] key position of each query row (compared only when causal)
    kv_pos: jax.Array  # [b, k] position of each key; INT32_MIN for prefix keys, which every query sees
    q_seg: jax.Array  # [b, q] segment id of each query row (compared only when segmented)
    kv_seg: jax.Array  # [b, k] segment id of each key; INT32_MIN where padding hides it
    kv_start: jax.Array  # [b, q / block_q] first key block each forward query block visits (0 without a window)
    kv_stop: jax.Array  # [b, q / block_q] one past the last key block each forward query block visits
    kv_start_bwd: jax.Array  # [b, q / block_q_bwd] the same two for the backward dq kernel's blocks
    kv_stop_bwd: jax.Array
    q_start_bwd: jax.Array  # [b, k / block_kv_bwd] first query block that can see each key block (q / bq: none)
    q_stop_bwd: jax.Array  # [b, k / block_kv_bwd] one past the last one (q / bq without a window)

    @property
    def rows(self) -> tuple[jax.Array, ...]:
        """(q_pos, kv_pos, q_seg, kv_seg), in the kernels' argument order."""
        return self.q_pos, self.kv_pos, self.q_seg, self.kv_seg


# -- tiles ------------------------------------------------------------------------------------------------------------
def _load_side(plan: FlashPlan, pos_ref, seg_ref, start, size: int):
    """The positions and segment ids ``[size]`` of rows ``start:start+size`` (None where the plan compares none)."""
    rows = pl.ds(start, size)
    return (pos_ref[rows] if plan.causal else None), (seg_ref[rows] if plan.segmented else None)


def _logits(plan: FlashPlan, q, k, q_side, kv_side, first_key):
    """Masked logits of one tile in base 2, float32 ``[bq, bk]``: ``log2(e) * scale * q . k``, -inf where the mask
    hides the pair (``exp2`` of them minus a base-2 log-sum-exp gives the attention weights)."""
    s = _dot(q, k, trans_b=True) * (plan.scale * _LOG2E)
    (q_pos, q_seg), (kv_pos, kv_seg) = q_side, kv_side
    shape = s.shape
    visible = None
    if plan.segmented:
        visible = jnp.broadcast_to(q_seg[:, None], shape) == jnp.broadcast_to(kv_seg[None, :], shape)
    if plan.causal:
        kv_b, q_b = jnp.broadcast_to(kv_pos[None, :], shape), jnp.broadcast_to(q_pos[:, None], shape)
        seen = kv_b <= q_b
        if plan.window is not None:  # no prefix with a window: kv_pos holds plain positions, nothing overflows
            seen = seen & (kv_b > q_b - plan.window)
        visible = seen if visible is None else visible & seen
    if plan.kv_padded:
        real = jnp.broadcast_to((first_key + jnp.arange(shape[1]))[None, :], shape) < plan.lk
        visible = real if visible is None else visible & real
    return s if visible is None else jnp.where(visible, s, _NEG_INF)


# -- kernels ----------------------------------------------------------------------------------------------------------
def _forward_kernel(q_ref, k_ref, v_ref, q_pos_ref, kv_pos_ref, q_seg_ref, kv_seg_ref, kv_start_ref, kv_stop_ref,
                    o_ref, lse_ref, *, plan: FlashPlan):
    """One query block of one (batch row, head): online softmax over its key blocks -> ``o [bq, v]``, ``lse [bq]``."""
    bq, bk = plan.block_q, plan.block_kv
    q = q_ref[...]
    q_side = _load_side(plan, q_pos_ref, q_seg_ref, 0, bq)

    def body(j, carry):
        acc, m, l = carry
        start = j * bk
        s = _logits(plan, q, k_ref[pl.ds(start, bk), :], q_side, _load_side(plan, kv_pos_ref, kv_seg_ref, start, bk),
                    start)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(m_new == _NEG_INF, 0.0, m_new)  # no visible key yet: keep exp2() away from -inf - -inf
        p = jnp.exp2(s - m_safe[:, None])
        alpha = jnp.exp2(m - m_safe)
        v = v_ref[pl.ds(start, bk), :]
        acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v)
        return acc, m_new, alpha * l + jnp.sum(p, axis=-1)

    init = (jnp.zeros((bq, v_ref.shape[-1]), jnp.float32), jnp.zeros((bq,), jnp.float32) + _NEG_INF,
            jnp.zeros((bq,), jnp.float32))
    acc, m, l = lax.fori_loop(kv_start_ref[...], kv_stop_ref[...], body, init)
    seen = l > 0.0  # a row that may attend no key has acc == 0: it returns zeros
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    # In base 2, as the logits. Any finite lse serves an empty row: the backward recomputes exp2(-inf - lse) == 0.
    lse_ref[...] = jnp.where(seen, m + jnp.log2(l_safe), 0.0)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_pos_ref, kv_pos_ref, q_seg_ref, kv_seg_ref,
               kv_start_ref, kv_stop_ref, dq_ref, *, plan: FlashPlan):
    """One query block of one (batch row, head): ``dq [bq, d]`` from its key blocks' recomputed weights."""
    bq, bk = plan.block_q_bwd, plan.block_kv_bwd
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_side = _load_side(plan, q_pos_ref, q_seg_ref, 0, bq)

    def body(j, dq):
        start = j * bk
        k, v = k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]
        s = _logits(plan, q, k, q_side, _load_side(plan, kv_pos_ref, kv_seg_ref, start, bk), start)
        p = jnp.exp2(s - lse[:, None])
        ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(kv_start_ref[...], kv_stop_ref[...], body, jnp.zeros((bq, q_ref.shape[-1]), jnp.float32))
    dq_ref[...] = (dq * plan.scale).astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_pos_ref, kv_pos_ref, q_seg_ref, kv_seg_ref,
                 q_start_ref, q_stop_ref, dk_ref, dv_ref, *, plan: FlashPlan):
    """One key block of one (batch row, kv head): ``dk [bk, d]``, ``dv [bk, v]`` summed over the g query heads that
    share it (GQA/MQA) and over the query blocks that can see it."""
    bq, bk = plan.block_q_bwd, plan.block_kv_bwd
    k, v = k_ref[...], v_ref[...]
    first_key = pl.program_id(0) * bk
    kv_side = _load_side(plan, kv_pos_ref, kv_seg_ref, 0, bk)

    def q_block(head, i, carry):
        dk, dv = carry
        rows = pl.ds(i * bq, bq)
        q, do = q_ref[rows, head, :], do_ref[rows, head, :]
        s = _logits(plan, q, k, _load_side(plan, q_pos_ref, q_seg_ref, i * bq, bq), kv_side, first_key)
        p = jnp.exp2(s - lse_ref[head, rows][:, None])
        dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
        ds = p * (_dot(do, v, trans_b=True) - delta_ref[head, rows][:, None])
        return dk + _dot(ds.astype(q.dtype), q, trans_a=True), dv

    def head(h, carry):
        return lax.fori_loop(q_start_ref[...], q_stop_ref[...], functools.partial(q_block, h), carry)

    init = (jnp.zeros((bk, k_ref.shape[-1]), jnp.float32), jnp.zeros((bk, v_ref.shape[-1]), jnp.float32))
    dk, dv = head(0, init) if plan.groups == 1 else lax.fori_loop(0, plan.groups, head, init)
    dk_ref[...] = (dk * plan.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# -- calls ------------------------------------------------------------------------------------------------------------
def _num_warps(*arrays, forward: bool = False) -> int:
    """Triton warps per program. Compiled offline for sm_90 (benchmarks/triton_resources.py, RESULTS.md), the forward
    at 4 warps fills 255 registers, spills and serializes its wgmma even at head dim 64 (bf16: 88 B; 193 registers
    and no spill at 8); the backward kernels are clean at 4 for bf16 head dims <= 64 and need 8 above, or in
    float32."""
    wide = max(x.shape[-1] for x in arrays) > 64 or any(x.dtype == jnp.float32 for x in arrays)
    return 8 if forward or wide else 4


def _mask_specs(lq: int, lk: int, q_block: int | None, kv_block: int | None) -> list[pl.BlockSpec]:
    """BlockSpecs of (q_pos, kv_pos, q_seg, kv_seg) ``[b, q]``/``[b, k]`` at the grid's batch row: the block of rows
    the grid's first index names (``*_block``), or the whole row (None) for the side a kernel loops over."""
    def spec(length, block):
        if block is None:
            return pl.BlockSpec((None, length), lambda x, bi, hi: (bi, 0))
        return pl.BlockSpec((None, block), lambda x, bi, hi: (bi, x))
    q_spec, kv_spec = spec(lq, q_block), spec(lk, kv_block)
    return [q_spec, kv_spec, q_spec, kv_spec]


def _query_grid_specs(q, k, v, bq: int, g: int):
    """For a grid over (query blocks, batch rows, query heads): ``rows(width)``, the spec of the program's block of
    ``[b, q, h, width]`` rows; the specs of k and v (every key of the query head's kv head); those of the mask rows
    and of the two loop bounds."""
    lq, lk, d, dv = q.shape[1], k.shape[1], k.shape[3], v.shape[3]
    rows = lambda width: pl.BlockSpec((None, bq, None, width), lambda i, bi, hi: (bi, i, hi, 0))
    per_kv = lambda i, bi, hi: (bi, 0, lax.div(hi, g), 0)
    bound = pl.BlockSpec((None, None), lambda i, bi, hi: (bi, i))
    kv_specs = [pl.BlockSpec((None, lk, None, d), per_kv), pl.BlockSpec((None, lk, None, dv), per_kv)]
    return rows, kv_specs, _mask_specs(lq, lk, bq, None) + [bound] * 2


def forward(plan: FlashPlan, q, k, v, masks):
    """``q [b, q, h, d]``, ``k [b, k, n, d]``, ``v [b, k, n, v]``, ``masks`` (q_pos, kv_pos, q_seg, kv_seg,
    kv_start, kv_stop, ...) -> ``out [b, q, h, v]`` (q's dtype), ``lse [b, h, q]`` float32."""
    b, lq, h, d = q.shape
    dv, bq = v.shape[3], plan.block_q
    rows, kv_specs, mask_specs = _query_grid_specs(q, k, v, bq, plan.groups)
    return pallas_call(
        functools.partial(_forward_kernel, plan=plan), [q, k, v, *masks.rows, masks.kv_start, masks.kv_stop],
        grid=(lq // bq, b, h), in_specs=[rows(d), *kv_specs, *mask_specs],
        out_specs=[rows(dv), pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))],
        out_shape=[jax.ShapeDtypeStruct((b, lq, h, dv), q.dtype), jax.ShapeDtypeStruct((b, h, lq), jnp.float32)],
        num_warps=_num_warps(q, v, forward=True), interpret=plan.interpret, name="flash_forward")


def backward_dq(plan: FlashPlan, q, k, v, do, lse, delta, masks):
    """``dq [b, q, h, d]`` (q's dtype) from the inputs, ``do [b, q, h, v]``, ``lse``/``delta [b, h, q]``."""
    b, lq, h, d = q.shape
    dv, bq = v.shape[3], plan.block_q_bwd
    rows, kv_specs, mask_specs = _query_grid_specs(q, k, v, bq, plan.groups)
    per_row = pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))
    operands = [q, k, v, do, lse, delta, *masks.rows, masks.kv_start_bwd, masks.kv_stop_bwd]
    return pallas_call(
        functools.partial(_dq_kernel, plan=plan), operands, grid=(lq // bq, b, h),
        in_specs=[rows(d), *kv_specs, rows(dv), per_row, per_row, *mask_specs], out_specs=rows(d),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), num_warps=_num_warps(q, v), interpret=plan.interpret,
        name="flash_backward_dq")


def backward_dkdv(plan: FlashPlan, q, k, v, do, lse, delta, masks):
    """``dk [b, k, n, d]``, ``dv [b, k, n, v]`` (k's dtype), each kv head's gradient summed over its query heads."""
    b, lq, h, d = q.shape
    lk, n, dv, bk, g = k.shape[1], k.shape[2], v.shape[3], plan.block_kv_bwd, plan.groups
    per_kv = lambda j, bi, ni: (bi, j, ni, 0)
    group = lambda j, bi, ni: (bi, 0, ni, 0)  # the g query heads of kv head ni, all rows
    group_rows = pl.BlockSpec((None, g, lq), lambda j, bi, ni: (bi, ni, 0))
    mask_specs = _mask_specs(lq, lk, None, bk)
    bound = pl.BlockSpec((None, None), lambda j, bi, ni: (bi, j))
    return pallas_call(
        functools.partial(_dkdv_kernel, plan=plan), [q, k, v, do, lse, delta, *masks.rows, masks.q_start_bwd,
                                                      masks.q_stop_bwd],
        grid=(lk // bk, b, n),
        in_specs=[pl.BlockSpec((None, lq, g, d), group), pl.BlockSpec((None, bk, None, d), per_kv),
                  pl.BlockSpec((None, bk, None, dv), per_kv), pl.BlockSpec((None, lq, g, dv), group), group_rows,
                  group_rows, *mask_specs, *[bound] * 2],
        out_specs=[pl.BlockSpec((None, bk, None, d), per_kv), pl.BlockSpec((None, bk, None, dv), per_kv)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        num_warps=_num_warps(q, v), interpret=plan.interpret, name="flash_backward_dkdv")
