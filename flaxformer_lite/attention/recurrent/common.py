"""What linear attention (linear.py) and the delta rule (delta.py) share, both carrying a state along the sequence:

- the impl they run (`LINEAR_IMPLS`, `kernel_impl`): the chunk form in XLA ops, or the Pallas kernels on a GPU;
- segment runs (`run_ids`, `segment_runs`): each contiguous run of one segment id is one segment, where the state
  restarts; the kernels compare run ids, not segment ids;
- decay gates (`gate_log_decay`): a fixed decay per kv head or a log decay per position, as one ``[b, l, n]`` array;
- block spans (`Spans`, `plan_spans`, `to_spans`, `from_spans`, `scan_spans`, `blocks_per_span`): how a chunk
  form cuts the sequence into blocks, computed a span of blocks at a time under a `lax.scan` carrying the state.

Shape key: b batch, l length, n kv heads.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ...ranges import check_range
from ..masks import Mask

LINEAR_IMPLS = ("auto", "xla", "pallas")


def kernel_impl(fn: str, impl: str, backend: str | None, why_not) -> str:
    """The impl ``fn`` (`linear_attention`, `delta_attention`) runs, ``"xla"`` or ``"pallas"``: ``"auto"`` takes
    ``"pallas"`` on a GPU unless ``why_not(backend)`` gives a reason (why the kernels cannot take this call; None if
    they can). ``backend``: None for JAX's default. Raises `ValueError` for an unknown impl, or ``"pallas"`` asked
    for a call the kernels cannot take."""
    if impl not in LINEAR_IMPLS:
        raise ValueError(f"impl must be one of {LINEAR_IMPLS} for {fn}, got {impl!r}")
    backend = jax.default_backend() if backend is None else backend
    if impl == "xla" or (impl == "auto" and backend != "gpu"):
        return "xla"
    reason = why_not(backend)
    if reason and impl == "pallas":
        raise ValueError(f"{fn} impl='pallas' cannot compute this call: {reason}; use impl='xla'")
    return "xla" if reason else "pallas"


# -- segment runs and decay gates -----------------------------------------------------------------------------------
def run_ids(seg: jax.Array | None) -> jax.Array | None:
    """int32 ``[b, l]`` run indices of segment ids ``seg [b, l]``: 0 at the start, +1 wherever the id changes (None
    stays None). The kernels that carry a state along the sequence take these: each contiguous run is one segment, so
    an id that comes back later (``[0, 0, 1, 1, 0, 0]``) starts a new one, whatever the block size."""
    if seg is None:
        return None
    seg = jnp.asarray(seg)
    change = jnp.concatenate([jnp.zeros_like(seg[:, :1], jnp.int32), (seg[:, 1:] != seg[:, :-1]).astype(jnp.int32)],
                             1)
    return jnp.cumsum(change, 1, dtype=jnp.int32)


def segment_runs(mask: Mask, fn: str) -> jax.Array | None:
    """`run_ids` of ``mask``'s segment ids ``[b, l]``, or None without segments, for the kernels that carry a state
    along the sequence: they see one segment id per position, so ``kv_segment_ids`` must equal ``q_segment_ids``
    (`ValueError` naming ``fn`` when both are concrete and differ; traced ids cannot be compared)."""
    if not mask.has_segments:
        return None
    if not mask.shares_segments:
        try:
            same = np.array_equal(np.asarray(mask.q_segment_ids), np.asarray(mask.kv_segment_ids))
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            same = True
        if not same:
            raise ValueError(f"{fn} needs kv_segment_ids equal to q_segment_ids (the state it carries along the "
                             "sequence restarts at one set of boundaries); pass one array for both")
    return run_ids(mask.q_segment_ids)


LOG_DECAY_FLOOR = -80.0  # exp(-80) ~ 2e-35: a state decayed this much is gone; -inf would make exp(-inf + inf) NaN


def gate_log_decay(decay, log_decay, shape: tuple, valid=None) -> jax.Array | None:
    """The log decay ``[b, l, n]`` float32 from ``decay [n]`` or ``log_decay [b, l, n]`` (``shape``), or None;
    0 (no decay) where ``valid [b, l]`` is False, and at least `LOG_DECAY_FLOOR`. Concrete values are checked: a
    decay in (0, 1], a log decay <= 0."""
    b, l, n = shape
    if decay is not None and log_decay is not None:
        raise ValueError("give decay (fixed per head) or log_decay (per position), not both")
    if decay is not None:
        decay = jnp.asarray(decay)
        if decay.shape != (n,):
            raise ValueError(f"decay must have shape [kv_heads] = [{n}] (one per key/value head: the state is kept "
                             f"per kv head), got {list(decay.shape)}")
        check_range("decay", decay, lambda x: (x > 0) & (x <= 1), "in (0, 1]")
        log_decay = jnp.broadcast_to(jnp.log(decay.astype(jnp.float32)), shape)
    elif log_decay is not None:
        log_decay = jnp.asarray(log_decay)
        if log_decay.shape != tuple(shape):
            raise ValueError(f"log_decay must have shape [batch, length, kv_heads] = {list(shape)}, got "
                             f"{list(log_decay.shape)}")
        check_range("log_decay", log_decay, lambda x: x <= 0, "<= 0 (a decay in (0, 1])")
        log_decay = jnp.maximum(log_decay.astype(jnp.float32), LOG_DECAY_FLOOR)
    else:
        return None
    return log_decay if valid is None else jnp.where(along(valid, log_decay), log_decay, 0.0)


def along(mask, x):
    """A bool ``mask [b(, l)]`` with trailing axes of size 1 added to broadcast against ``x [b(, l), ...]``."""
    return jnp.reshape(mask, mask.shape + (1,) * (x.ndim - mask.ndim))


# -- block spans ---------------------------------------------------------------------------------------------------
class Spans(NamedTuple):
    """How a chunk form cuts ``length`` positions: blocks of ``block`` positions, ``size`` blocks to a span,
    ``count`` spans (the last padded)."""

    length: int
    block: int
    size: int
    count: int


def plan_spans(length: int, block: int, state_bytes: int, size: int | None = None) -> Spans:
    """The `Spans` for ``length`` positions in blocks of ``block``: ``size`` blocks to a span, default
    `blocks_per_span` for one block's states of ``state_bytes``."""
    blocks = -(-length // block)
    size = min(blocks, size or blocks_per_span(blocks, state_bytes))
    return Spans(length, block, size, -(-blocks // size))


def to_spans(x: jax.Array, plan: Spans, fill=0, heads: bool = False) -> jax.Array:
    """``[b, l, ...] -> [count, b, size, block, ...]``, padded with ``fill`` (``"edge"``: the last position
    repeated); with ``heads``, axis 2 of ``x`` (the heads) goes before the blocks: ``[count, b, n, size, block,
    ...]``."""
    pad = plan.count * plan.size * plan.block - plan.length
    if pad:
        widths = [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
        x = jnp.pad(x, widths, mode="edge") if fill == "edge" else jnp.pad(x, widths, constant_values=fill)
    x = jnp.moveaxis(x.reshape((x.shape[0], plan.count, plan.size, plan.block) + x.shape[2:]), 1, 0)
    return jnp.moveaxis(x, 4, 2) if heads else x


def from_spans(x: jax.Array, plan: Spans) -> jax.Array:
    """``[count, b, n, size, block, ...] -> [b, l, n, ...]``: `to_spans` with ``heads`` undone."""
    x = jnp.moveaxis(jnp.moveaxis(x, 0, 1), 2, 4)  # [b, count, size, block, n, ...]
    return x.reshape((x.shape[0], plan.count * plan.size * plan.block) + x.shape[4:])[:, :plan.length]


def scan_spans(body, init, xs: dict):
    """``lax.scan(body, init, xs)`` over the spans (leading axis of ``xs``); a single span runs without a loop."""
    if jax.tree.leaves(xs)[0].shape[0] > 1:
        return lax.scan(body, init, xs)
    carry, ys = body(init, jax.tree.map(lambda x: x[0], xs))
    return carry, jax.tree.map(lambda y: y[None], ys)


SPAN_BYTES = {"cpu": 1 << 20}  # per backend: the block states a span may hold; absent: all blocks at once


def blocks_per_span(blocks: int, state_bytes: int, backend: str | None = None) -> int:
    """How many of ``blocks`` blocks the chunk forms (linear_causal.py, delta.py) compute at once, given one block's
    states over all batch rows and heads (``state_bytes``): all of them on accelerators; on CPU as many as fit in
    `SPAN_BYTES` (about a core's L2 cache), at least one, unless that makes only two spans, where the scan costs
    more than the cache saves. Measured on 2 cores, fwd+bwd: at 16k tokens, h=8, d=64, elu+1 (64 x 64 states) runs
    best with 8 blocks at a time at b=1 and 1-2 at b=8, FAVOR+ (266 x 64) with 1; at b=16, two blocks of 128 tokens
    run 1.3x faster together than one at a time, four blocks of 256 tokens 1.15x faster one at a time."""
    budget = SPAN_BYTES.get(jax.default_backend() if backend is None else backend)
    if budget is None:
        return blocks
    span = max(1, min(blocks, budget // max(state_bytes, 1)))
    return blocks if -(-blocks // span) <= 2 else span
