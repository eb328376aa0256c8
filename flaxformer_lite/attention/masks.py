"""`Mask`: the one attention-mask structure, describing *which* keys a query may see, not a dense matrix.

Shape key: b batch, q query length (lq), k key/value length (lk). True = attend.

A query at row ``i`` sits at key position ``i + q_offset`` (``q_offset`` is 0 unless decoding against a cache).
Query ``i`` may attend key ``j`` when every present field allows it:

- ``causal``: ``j <= i + q_offset``;
- ``window`` (with ``causal``): also ``i + q_offset - j < window``, sliding-window attention: each query sees
  its own position and the ``window - 1`` before it (Mistral; Hugging Face's ``sliding_window`` convention:
  ``kv_idx > q_idx - sliding_window`` in transformers' ``sliding_window_overlay``). It needs ``causal=True`` and
  cannot be combined with ``prefix_lengths``;
- ``prefix_lengths [b]``: as causal, but also ``j < prefix_lengths`` (UniLM / prefix-LM: bidirectional over the
  prefix, causal after it). Giving it implies ``causal=True``;
- ``kv_lengths [b]``: ``j < kv_lengths`` (right padding);
- ``kv_valid [b, k]``: ``kv_valid[j]`` (any padding pattern);
- ``q_segment_ids [b, q]`` and ``kv_segment_ids [b, k]``: equal ids (packed sequences). Kernels that carry a state
  along the sequence (linear attention with segments, the delta rule) need the two equal, and take each contiguous
  run as one segment: an id that comes back later starts a new one (packing numbers its documents 1, 2, ...).

Kernels read the structure to stay O(l) in memory and to skip blocks no query can see; `materialize` and `block`
give the dense boolean form for the reference and for one tile of a block kernel.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import bounds

_ARRAY_FIELDS = ("prefix_lengths", "kv_lengths", "kv_valid", "q_segment_ids", "kv_segment_ids", "q_offset")
# Segment ids given to padding rows/keys by `Mask.pad_to`: distinct from each other and from any real id in practice.
_PAD_Q_SEGMENT = np.iinfo(np.int32).min
_PAD_KV_SEGMENT = np.iinfo(np.int32).min + 1


def _check_array(name: str, x: Any, rank: int, kind: str) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim != rank:
        want = "[b]" if rank == 1 else "[b, l]"
        raise ValueError(f"Mask.{name} must have shape {want} (rank {rank}), got shape {x.shape}")
    if kind == "int" and not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"Mask.{name} must hold integers, got dtype {x.dtype}")
    if kind == "bool" and x.dtype != jnp.bool_:
        raise ValueError(f"Mask.{name} must be a bool array (True = attend), got dtype {x.dtype}")
    return x


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class Mask:
    """Structured attention mask (True = attend); a pytree, so it passes through `jax.jit`.

    Attributes:
      causal: static Python bool; key ``j`` visible to query ``i`` only if ``j <= i + q_offset``.
      window: static Python int >= 1, or None; sliding-window attention: key ``j`` visible to query ``i`` only if
        ``i + q_offset - j < window`` (itself and the ``window - 1`` keys before it, as Hugging Face's Mistral
        ``sliding_window``). Needs ``causal=True`` (a window without causality would be a two-sided band no kernel
        here needs) and no ``prefix_lengths``; else `ValueError`.
      prefix_lengths: int ``[b]`` in ``[0, k]``; prefix-LM mask (implies ``causal``).
      kv_lengths: int ``[b]`` in ``[0, k]``; keys at positions ``>= kv_lengths`` are padding. Kernels reject concrete
        lengths outside ``[0, k]`` (traced ones, under `jax.jit`, cannot be checked).
      kv_valid: bool ``[b, k]``; False marks a padding key.
      q_segment_ids: int ``[b, q]``; with ``kv_segment_ids [b, k]``, attend only within equal ids.
      kv_segment_ids: int ``[b, k]``. Passing one array for both (self-attention) is remembered as static structure
        (`shares_segments`, kept through `jax.jit`): then every query row sees at least its own position.
      q_offset: int scalar or ``[b]``; key position of query row 0 (decoding with a cache). None means 0.

    Combine with ``&`` (the intersection of what both allow). Invalid shapes or dtypes raise `ValueError`
    naming the field.
    """

    causal: bool = False
    window: int | None = None
    prefix_lengths: Any = None
    kv_lengths: Any = None
    kv_valid: Any = None
    q_segment_ids: Any = None
    kv_segment_ids: Any = None
    q_offset: Any = None

    def __post_init__(self):
        shared = self.q_segment_ids is not None and self.q_segment_ids is self.kv_segment_ids
        if not isinstance(self.causal, (bool, np.bool_)):
            raise ValueError(f"Mask.causal must be a Python bool (it is static structure), got {type(self.causal)}")
        specs = {"prefix_lengths": (1, "int"), "kv_lengths": (1, "int"), "kv_valid": (2, "bool"),
                 "q_segment_ids": (2, "int"), "kv_segment_ids": (2, "int")}
        for name, (rank, kind) in specs.items():
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _check_array(name, getattr(self, name), rank, kind))
        if (self.q_segment_ids is None) != (self.kv_segment_ids is None):
            raise ValueError("Mask needs both q_segment_ids and kv_segment_ids, or neither "
                             "(for self-attention pass the same array twice)")
        if shared:  # one converted array on both sides (conversion may have copied a NumPy input twice)
            object.__setattr__(self, "kv_segment_ids", self.q_segment_ids)
        object.__setattr__(self, "_shared_segments", shared)
        if self.q_offset is not None:
            off = jnp.asarray(self.q_offset)
            if off.ndim > 1 or not jnp.issubdtype(off.dtype, jnp.integer):
                raise ValueError(f"Mask.q_offset must be an integer scalar or [b], got shape {off.shape} "
                                 f"dtype {off.dtype}")
            object.__setattr__(self, "q_offset", off)
        if self.prefix_lengths is not None:
            object.__setattr__(self, "causal", True)
        object.__setattr__(self, "causal", bool(self.causal))
        self._check_window()
        self._check_consistent()

    def _check_window(self):
        if self.window is None:
            return
        if isinstance(self.window, (bool, np.bool_)) or not isinstance(self.window, (int, np.integer)):
            raise ValueError(f"Mask.window must be a Python int >= 1 (it is static structure) or None, got "
                             f"{type(self.window).__name__}")
        if self.window < 1:
            raise ValueError(f"Mask.window must be >= 1 (each query sees itself), got {self.window}")
        if self.prefix_lengths is not None:
            raise ValueError("Mask.window cannot be combined with Mask.prefix_lengths (a windowed prefix-LM is "
                             "not a mask any model here uses)")
        if not self.causal:
            raise ValueError("Mask.window needs causal=True (sliding-window attention looks back only)")
        object.__setattr__(self, "window", int(self.window))

    def _check_consistent(self):
        batch = {n: getattr(self, n).shape[0] for n in _ARRAY_FIELDS[:5] if getattr(self, n) is not None}
        if self.q_offset is not None and self.q_offset.ndim == 1:
            batch["q_offset"] = self.q_offset.shape[0]
        if len(set(batch.values())) > 1:
            raise ValueError(f"Mask fields disagree on the batch size: {batch}")
        kv = {n: getattr(self, n).shape[1] for n in ("kv_valid", "kv_segment_ids") if getattr(self, n) is not None}
        if len(set(kv.values())) > 1:
            raise ValueError(f"Mask fields disagree on the key length: {kv}")

    # -- pytree ------------------------------------------------------------------------------------------------
    def tree_flatten(self):
        return tuple(getattr(self, n) for n in _ARRAY_FIELDS), (self.causal, self.window, self.shares_segments)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)  # leaves may be tracers, sentinels or shardings: skip validation
        object.__setattr__(obj, "causal", aux[0])
        object.__setattr__(obj, "window", aux[1])
        object.__setattr__(obj, "_shared_segments", aux[2])
        for name, child in zip(_ARRAY_FIELDS, children):
            object.__setattr__(obj, name, child)
        return obj

    # -- structure queries -------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int | None:
        """The batch size the per-example fields carry, or None when no field is per-example."""
        for name in _ARRAY_FIELDS:
            x = getattr(self, name)
            if x is not None and x.ndim >= 1:
                return x.shape[0]
        return None

    @property
    def q_length(self) -> int | None:
        """Query length fixed by ``q_segment_ids``, else None."""
        return None if self.q_segment_ids is None else self.q_segment_ids.shape[1]

    @property
    def kv_length(self) -> int | None:
        """Key length fixed by ``kv_valid`` or ``kv_segment_ids``, else None."""
        for x in (self.kv_valid, self.kv_segment_ids):
            if x is not None:
                return x.shape[1]
        return None

    @property
    def has_padding(self) -> bool:
        """True if some keys are padding (``kv_lengths`` or ``kv_valid``)."""
        return self.kv_lengths is not None or self.kv_valid is not None

    @property
    def has_segments(self) -> bool:
        """True for packed sequences (segment ids present)."""
        return self.q_segment_ids is not None

    @property
    def every_row_sees_a_key(self) -> bool:
        """True when the structure guarantees each query row may attend at least one key, so no row needs zeroing:
        no padding, no query offset, and either no segments or the same segment array on both sides (self-attention:
        a query always shares its own position's segment). Conservative: False means "not known"."""
        segments_ok = not self.has_segments or self.shares_segments
        return not self.has_padding and self.q_offset is None and segments_ok

    @property
    def shares_segments(self) -> bool:
        """True when one segment-id array was given for queries and keys (self-attention over packed sequences):
        static structure, so it survives `jax.jit` (where the two fields arrive as separate leaves)."""
        return self.has_segments and bool(getattr(self, "_shared_segments", False))

    @property
    def is_trivial(self) -> bool:
        """True if the mask allows every (query, key) pair."""
        return not (self.causal or self.has_padding or self.has_segments)

    def check_shapes(self, batch: int, lq: int, lk: int) -> None:
        """Raise `ValueError` if the mask cannot describe attention of shape ``[batch, lq] x [batch, lk]``."""
        if self.batch_size not in (None, batch):
            raise ValueError(f"mask batch size {self.batch_size} != batch size {batch} of q/k/v")
        if self.q_length not in (None, lq):
            raise ValueError(f"mask q_segment_ids length {self.q_length} != query length {lq}")
        if self.kv_length not in (None, lk):
            raise ValueError(f"mask key length {self.kv_length} (kv_valid/kv_segment_ids) != key length {lk}")

    def kv_valid_mask(self, lk: int) -> jax.Array | None:
        """Key validity from the padding fields: bool ``[b, k]``, or None when there is no padding."""
        valid = None
        if self.kv_lengths is not None:
            valid = jnp.arange(lk)[None, :] < self.kv_lengths[:, None]
        if self.kv_valid is not None:
            valid = self.kv_valid if valid is None else valid & self.kv_valid
        return valid

    def zero_invalid_keys(self, *xs: jax.Array) -> tuple[jax.Array, ...]:
        """``xs`` (each ``[b, k, ...]``: keys, values) with the positions that ``kv_lengths``/``kv_valid`` hide set to
        0; unchanged without padding. Masked logits exclude those keys, but ``0 * nan`` is nan: a NaN or inf left in a
        padded key or value would still reach every output row and the gradients of the visible inputs."""
        valid = self.kv_valid_mask(xs[0].shape[1]) if xs else None
        if valid is None:
            return xs
        return tuple(jnp.where(valid.reshape(valid.shape + (1,) * (x.ndim - 2)), x, jnp.zeros((), x.dtype))
                     for x in xs)

    # -- dense forms -------------------------------------------------------------------------------------------
    def block(self, q_start, q_size: int, kv_start, kv_size: int) -> jax.Array:
        """One tile of the mask: bool ``[b or 1, 1, q_size, kv_size]`` for query rows ``q_start:q_start+q_size``
        and keys ``kv_start:kv_start+kv_size``. Starts may be traced (inside `lax.scan`); the tile must lie
        inside the per-position arrays (pad them with `pad_to` first)."""
        qpos = (q_start + jnp.arange(q_size))[None, :, None]
        kpos = (kv_start + jnp.arange(kv_size))[None, None, :]
        allowed = jnp.ones((1, q_size, kv_size), bool)
        if self.causal:
            off = 0 if self.q_offset is None else jnp.reshape(self.q_offset, (-1, 1, 1))
            visible = kpos <= qpos + off
            if self.prefix_lengths is not None:
                visible = visible | (kpos < self.prefix_lengths[:, None, None])
            if self.window is not None:
                visible = visible & (kpos > qpos + off - self.window)
            allowed = allowed & visible
        if self.kv_lengths is not None:
            allowed = allowed & (kpos < self.kv_lengths[:, None, None])
        if self.kv_valid is not None:
            allowed = allowed & jax.lax.dynamic_slice_in_dim(self.kv_valid, kv_start, kv_size, 1)[:, None, :]
        if self.has_segments:
            qs = jax.lax.dynamic_slice_in_dim(self.q_segment_ids, q_start, q_size, 1)
            ks = jax.lax.dynamic_slice_in_dim(self.kv_segment_ids, kv_start, kv_size, 1)
            allowed = allowed & (qs[:, :, None] == ks[:, None, :])
        return allowed[:, None]

    def materialize(self, lq: int | None = None, lk: int | None = None) -> jax.Array:
        """The dense mask: bool ``[b or 1, 1, lq, lk]`` (True = attend).

        ``lq``/``lk`` default to the lengths the segment-id / padding fields carry; pass them when no field fixes
        them (e.g. ``Mask(causal=True).materialize(8, 8)``)."""
        lq = self.q_length if lq is None else lq
        lk = self.kv_length if lk is None else lk
        if lq is None or lk is None:
            raise ValueError("Mask.materialize needs lq and lk: no field of this mask fixes the "
                             f"{'query' if lq is None else 'key'} length")
        self.check_shapes(self.batch_size or 1, lq, lk)
        return self.block(0, lq, 0, lk)

    def pad_to(self, lq: int, lk: int) -> "Mask":
        """The same mask on queries/keys padded at the end to ``lq``/``lk``; padded keys are never attended."""
        def pad(x, n, value):
            return None if x is None else jnp.pad(x, ((0, 0), (0, n - x.shape[1])), constant_values=value)
        return dataclasses.replace(
            self, kv_valid=pad(self.kv_valid, lk, False),
            q_segment_ids=pad(self.q_segment_ids, lq, _PAD_Q_SEGMENT),
            kv_segment_ids=pad(self.kv_segment_ids, lk, _PAD_KV_SEGMENT))

    # -- bounds for block skipping (bounds.py: one int32 scalar that holds for every batch row) ------------------
    def kv_stop(self, q_stop, lk: int) -> jax.Array:
        """Exclusive bound on the key positions any query row ``< q_stop`` may attend, for any batch row
        (int32 scalar, at most ``lk``). Keys at or past it can be skipped."""
        return bounds.kv_stop(self, q_stop, lk)

    def q_start_for(self, kv_start) -> jax.Array:
        """The first query row that may attend key ``kv_start`` in any batch row (int32 scalar, >= 0).
        Query rows before it can be skipped for keys at or after ``kv_start``."""
        return bounds.q_start(self, kv_start)

    def kv_start_for(self, q_start) -> jax.Array:
        """The first key position any query row ``>= q_start`` may attend in any batch row (int32 scalar, >= 0):
        with a ``window``, keys before it lie left of the band and can be skipped; 0 without one."""
        return bounds.kv_start(self, q_start)

    def q_stop_for(self, kv_stop, lq: int) -> jax.Array:
        """Exclusive bound on the query rows that may attend any key ``< kv_stop`` in any batch row (int32 scalar,
        at most ``lq``): with a ``window``, rows at or past it see only later keys; ``lq`` without one."""
        return bounds.q_stop(self, kv_stop, lq)

    # -- combination -------------------------------------------------------------------------------------------
    def __and__(self, other: "Mask") -> "Mask":
        """The mask allowing what both allow (two windows keep the smaller). Two masks with segment ids, or two
        different ``q_offset``s, cannot be intersected into one structure and raise `ValueError`."""
        if not isinstance(other, Mask):
            return NotImplemented
        if self.has_segments and other.has_segments:
            raise ValueError("cannot combine two masks that both carry segment ids")
        segments = self if self.has_segments else other  # (one array on both sides stays one array)
        if self.q_offset is not None and other.q_offset is not None and self.q_offset is not other.q_offset:
            raise ValueError("cannot combine two masks that both set q_offset")

        def both(a, b, op):
            return b if a is None else a if b is None else op(a, b)

        windows = [w for w in (self.window, other.window) if w is not None]  # the narrower band is the intersection
        prefix = None
        if self.causal and other.causal:  # causal & prefix-LM is causal (windowed too); two prefixes keep the shorter
            if self.prefix_lengths is not None and other.prefix_lengths is not None:
                prefix = jnp.minimum(self.prefix_lengths, other.prefix_lengths)
        else:
            prefix = both(self.prefix_lengths, other.prefix_lengths, jnp.minimum)
        return Mask(causal=self.causal or other.causal, window=min(windows, default=None), prefix_lengths=prefix,
                    kv_lengths=both(self.kv_lengths, other.kv_lengths, jnp.minimum),
                    kv_valid=both(self.kv_valid, other.kv_valid, jnp.logical_and),
                    q_segment_ids=segments.q_segment_ids,
                    kv_segment_ids=segments.q_segment_ids if segments.shares_segments else segments.kv_segment_ids,
                    q_offset=both(self.q_offset, other.q_offset, None))

    def __repr__(self) -> str:
        parts = [f"causal={self.causal}"] if self.causal else []
        if self.window is not None:
            parts.append(f"window={self.window}")
        for name in _ARRAY_FIELDS:
            x = getattr(self, name)
            if x is not None:
                parts.append(f"{name}=<{getattr(x, 'dtype', type(x).__name__)}{list(getattr(x, 'shape', ()))}>")
        return f"Mask({', '.join(parts)})"
