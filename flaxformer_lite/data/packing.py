"""Packing documents into fixed-length rows with segment ids, and padding ragged sequences.

Shape key: n rows, l row length.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def pack_documents(docs: Sequence[Sequence[int]], row_len: int, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate documents, each followed by ``eos_id``, and cut the stream into rows of ``row_len`` tokens.

    Returns int32 ``tokens [n, l]`` and ``segment_ids [n, l]``: 1, 2, ... numbering the documents within each row
    (a document cut by a row boundary continues as segment 1 of the next row). The incomplete tail is dropped.
    """
    if row_len < 2:
        raise ValueError(f"row length must be at least 2, got {row_len}")
    lengths = np.fromiter((len(d) + 1 for d in docs), np.int64, len(docs))
    flat = np.empty(int(lengths.sum()), np.int32)
    ends = np.cumsum(lengths)
    for doc, end, n in zip(docs, ends, lengths):
        flat[end - n:end - 1] = doc
        flat[end - 1] = eos_id
    doc_of = np.repeat(np.arange(len(docs), dtype=np.int64), lengths)
    rows = len(flat) // row_len
    tokens = flat[:rows * row_len].reshape(rows, row_len)
    docs_in_row = doc_of[:rows * row_len].reshape(rows, row_len)
    return tokens, (docs_in_row - docs_in_row[:, :1] + 1).astype(np.int32)


def pad_rows(seqs: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad (or truncate) sequences to ``length``: int32 ``[n, l]`` and the bool valid mask ``[n, l]``."""
    out = np.full((len(seqs), length), pad_id, np.int32)
    valid = np.zeros((len(seqs), length), bool)
    for i, s in enumerate(seqs):
        s = list(s)[:length]
        out[i, :len(s)] = s
        valid[i, :len(s)] = True
    return out, valid
