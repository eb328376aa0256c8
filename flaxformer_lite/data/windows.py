"""Lazy packing: examples as windows of a token store's flat token stream (documents back to back, each followed
by the end id), read from the memmap only when a batch asks for them. A pool of any size costs O(1) memory.

Segment ids come from the end ids inside a window: an end id opens the next document's segment (it is that
document's beginning-of-sequence token), so every target is scored from its own document's context, the first
token of each document (predicted from the end id alone) and each document's end (predicted from the document)
included.

Shape key: b batch, l window length.
"""
from __future__ import annotations

import numpy as np


class WindowPool:
    """Windows ``tokens[start + r * stride : start + r * stride + length]`` for ``r < len(self)``, all inside the
    token range ``[start, stop)``.

    Args:
      tokens: the flat token stream (a memmap or array).
      start, stop: the token range to draw from (e.g. the training part of a store).
      length: tokens per window; stride: tokens between window starts (``length - 1`` for language modelling, so
        that each token is a target once).
    """

    def __init__(self, tokens, start: int, stop: int, length: int, stride: int):
        if length < 2 or stride < 1:
            raise ValueError(f"windows need length >= 2 and stride >= 1, got {length} and {stride}")
        self.tokens, self.start, self.length, self.stride = tokens, int(start), int(length), int(stride)
        self.size = max(0, (int(stop) - self.start - self.length) // self.stride + 1)

    def __len__(self) -> int:
        return self.size

    def rows(self, indices) -> np.ndarray:
        """int32 ``[b, length]``: the windows ``indices`` (each read from the memmap as one slice)."""
        starts = self.start + np.asarray(indices, np.int64) * self.stride
        if hasattr(self.tokens, "windows"):  # a token store's checked tokens (checksums.CheckedTokens)
            return self.tokens.windows(starts, self.length).astype(np.int32)
        return np.stack([np.asarray(self.tokens[s:s + self.length]) for s in starts]).astype(np.int32)


def stream_segments(rows: np.ndarray, eos_id: int) -> np.ndarray:
    """int32 ``[b, l]`` segment ids of stream windows: 1 from the row's start, one more at each end id (which opens
    the next document)."""
    return (1 + np.cumsum(rows == eos_id, axis=1)).astype(np.int32)


def causal_lm_windows(rows: np.ndarray, eos_id: int) -> dict:
    """Windows ``[b, l + 1]`` -> tokens/targets/segment_ids/loss_mask ``[b, l]``, every target scored."""
    tokens = rows[:, :-1]
    return {"tokens": tokens, "targets": rows[:, 1:], "segment_ids": stream_segments(tokens, eos_id),
            "loss_mask": np.ones(tokens.shape, np.float32)}


class DocumentChunks:
    """A `WindowPool` seen as a list of token lists: item ``r`` is the longest end-id-free run of window ``r``
    (one document's text), read when asked for. For objectives that must stay inside one document (MLM + NSP)."""

    def __init__(self, pool: WindowPool, eos_id: int):
        self.pool, self.eos_id = pool, eos_id

    def __len__(self) -> int:
        return len(self.pool)

    def __getitem__(self, r) -> list[int]:
        row = self.pool.rows([int(r)])[0]
        pieces = np.split(row, np.flatnonzero(row == self.eos_id))
        pieces = [p[1:] if len(p) and p[0] == self.eos_id else p for p in pieces]  # drop the end id itself
        return max(pieces, key=len).tolist()
