"""Block-skipping bounds: from a `Mask`, the keys a range of query rows may attend and the query rows a range of keys
may be seen by, so that block kernels visit only the blocks that can hold a visible pair. The one implementation:
`Mask`'s bound methods, `blockwise` and the flash kernels all read them from here.

Four position bounds, named for what they bound (``kv_*`` key positions, ``q_*`` query rows; ``*_start`` the first
one that can matter, ``*_stop`` one past the last):

- `kv_stop` ``(q_stop, lk)``: every key at or past it is hidden from every query row ``< q_stop`` (causality, the
  prefix, the key length, padding);
- `kv_start` ``(q_start)``: every key before it is hidden from every query row ``>= q_start`` (a ``window``);
- `q_start` ``(kv_start)``: query rows before it see no key ``>= kv_start`` (causality, the prefix);
- `q_stop` ``(kv_stop, lq)``: query rows at or past it see no key ``< kv_stop`` (a ``window``).

Each is one int32 scalar that holds for every batch row (the default: the loosest bound over the batch, for a loop
the whole batch shares), or with ``per_row`` one per batch row, ``[b or 1, 1]``, broadcasting against a position
argument of shape ``[n]`` (a kernel whose grid runs over batch rows). `kv_blocks` and `q_blocks` turn them into the
block ranges ``[start, stop)`` a loop visits, with the same names.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from .masks import Mask


def _per_example(x, per_row: bool, over_batch) -> jax.Array:
    """A per-example int field (``[b]`` or a scalar) as int32: ``[b or 1, 1]`` with ``per_row``, else reduced over
    the batch by ``over_batch`` (`jnp.max` for the loosest stop, `jnp.min` for the loosest start)."""
    x = jnp.asarray(x).astype(jnp.int32)
    return jnp.reshape(x, (-1, 1)) if per_row else over_batch(x)


def _offset(mask: Mask, per_row: bool, over_batch) -> jax.Array:
    """``q_offset`` (0 when absent) as `_per_example`."""
    if mask.q_offset is None:
        return jnp.zeros((), jnp.int32)
    return _per_example(mask.q_offset, per_row, over_batch)


def _key_end(mask: Mask, per_row: bool) -> jax.Array | None:
    """One past the last key that padding leaves (None without padding), as `_per_example`; with only
    ``kv_lengths`` the lengths themselves (callers clip to the key length)."""
    if mask.kv_valid is None:
        return None if mask.kv_lengths is None else _per_example(mask.kv_lengths, per_row, jnp.max)
    valid = mask.kv_valid_mask(mask.kv_valid.shape[1])
    end = jnp.max(jnp.where(valid, jnp.arange(1, valid.shape[1] + 1, dtype=jnp.int32), 0), axis=1)
    return _per_example(end, per_row, jnp.max)


def kv_stop(mask: Mask, q_stop, lk: int, *, per_row: bool = False) -> jax.Array:
    """Exclusive bound on the key positions any query row ``< q_stop`` may attend (at most ``lk``, at least 0)."""
    stop = jnp.asarray(lk, jnp.int32)
    if mask.causal:  # row i reaches key i + q_offset, or the end of the prefix
        reach = jnp.asarray(q_stop, jnp.int32) + _offset(mask, per_row, jnp.max)
        if mask.prefix_lengths is not None:
            reach = jnp.maximum(reach, _per_example(mask.prefix_lengths, per_row, jnp.max))
        stop = jnp.minimum(stop, reach)
    end = _key_end(mask, per_row)
    if end is not None:
        stop = jnp.minimum(stop, end)
    return jnp.maximum(stop, 0)


def kv_start(mask: Mask, q_start, *, per_row: bool = False) -> jax.Array:
    """The first key position any query row ``>= q_start`` may attend (>= 0): with a ``window``, row ``i`` sees keys
    from ``i + q_offset - window + 1`` on; 0 without one."""
    if mask.window is None:
        return jnp.zeros((), jnp.int32)
    first = jnp.asarray(q_start, jnp.int32) + _offset(mask, per_row, jnp.min) - (mask.window - 1)
    return jnp.maximum(first, 0)


def q_start(mask: Mask, kv_start, *, per_row: bool = False) -> jax.Array:
    """The first query row that may attend key ``kv_start`` (>= 0): causally key ``j`` is first seen by row
    ``j - q_offset``, or by row 0 inside the prefix; 0 without causality."""
    if not mask.causal:
        return jnp.zeros((), jnp.int32)
    kv_start = jnp.asarray(kv_start, jnp.int32)
    first = jnp.maximum(kv_start - _offset(mask, per_row, jnp.max), 0)
    if mask.prefix_lengths is not None:
        first = jnp.where(kv_start < _per_example(mask.prefix_lengths, per_row, jnp.max), 0, first)
    return first


def q_stop(mask: Mask, kv_stop, lq: int, *, per_row: bool = False) -> jax.Array:
    """Exclusive bound on the query rows that may attend any key ``< kv_stop`` (in ``[0, lq]``): with a ``window``,
    row ``i`` sees key ``j`` only if ``i < j + window - q_offset``; ``lq`` without one."""
    if mask.window is None:
        return jnp.asarray(lq, jnp.int32)
    reach = jnp.asarray(kv_stop, jnp.int32) - 1 + mask.window - _offset(mask, per_row, jnp.min)
    return jnp.clip(reach, 0, lq)


def kv_blocks(mask: Mask, i, bq: int, bk: int, lk: int, *, per_row: bool = False) -> tuple[jax.Array, jax.Array]:
    """The key blocks ``[kv_start, kv_stop)`` that query block ``i`` (an int32 scalar or ``[nq]``) visits: every key
    outside them is hidden from all of its rows. ``bq``/``bk``: the block sizes; ``lk``: the true key length."""
    start = kv_start(mask, i * bq, per_row=per_row) // bk
    stop = (kv_stop(mask, (i + 1) * bq, lk, per_row=per_row) + bk - 1) // bk
    return start, stop


def q_blocks(mask: Mask, j, bq: int, bk: int, nq: int, lk: int, *,
             per_row: bool = False) -> tuple[jax.Array, jax.Array]:
    """The query blocks ``[q_start, q_stop)`` that may see key block ``j`` (an int32 scalar or ``[nk]``) among
    ``nq``; ``q_start`` is ``nq`` where none may (every query row's reach ends before the block, or it holds no key
    that padding leaves). ``lk``: the true key length."""
    first_key = j * bk
    live = first_key < kv_stop(mask, nq * bq, lk, per_row=per_row)
    if mask.kv_valid is not None:  # a padding pattern may leave whole blocks empty before its last key
        live = live & _holds_a_key(mask, j, bk, per_row)
    start = jnp.where(live, jnp.minimum(q_start(mask, first_key, per_row=per_row) // bq, nq), nq)
    stop = (q_stop(mask, first_key + bk, nq * bq, per_row=per_row) + bq - 1) // bq
    return start, stop


def _holds_a_key(mask: Mask, j, bk: int, per_row: bool) -> jax.Array:
    """Whether key block ``j`` holds a key that padding leaves: per row ``[b, ...]``, or in any batch row."""
    valid = mask.kv_valid_mask(mask.kv_valid.shape[1])
    b, lk = valid.shape
    valid = jnp.pad(valid, ((0, 0), (0, -(-lk // bk) * bk - lk)))
    holds = valid.reshape(b, -1, bk).any(-1)  # [b, blocks]
    return holds[:, j] if per_row else holds.any(0)[j]
