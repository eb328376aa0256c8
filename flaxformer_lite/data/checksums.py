"""Checksums of a token store: a CRC-32 of every block of `BLOCK_TOKENS` tokens of ``tokens.bin`` (in
``checksums.npy``, uint32 ``[blocks]``), and of the whole ``offsets.npy`` and ``counts.npy`` (in the manifest).

Blocks are checked the first time a run reads them (`CheckedTokens`), so opening a store stays O(1) whatever its
size and a run pays once per block it touches (one 4 KB page of uint16 ids: about 1 µs of CRC-32); `verify_store`
(``python -m flaxformer_lite.data.verify FOLDER``) checks every file at once. A flipped id in ``tokens.bin`` is
then a one-line error naming the store and the damaged tokens, never silent training on wrong data.
Shape key: n tokens, k blocks (``ceil(n / BLOCK_TOKENS)``).
"""
from __future__ import annotations

import hashlib
import zlib
from pathlib import Path

import numpy as np

BLOCK_TOKENS = 2048  # tokens per checksum block: one 4 KB page of uint16 ids
SUMS = "checksums.npy"
WHOLE_FILES = ("offsets.npy", "counts.npy")  # checked whole (by `verify_store`), their CRC-32 in the manifest


class BlockSums:
    """The CRC-32 of each `BLOCK_TOKENS`-token block of a token file, computed as its bytes are written (`add`)."""

    def __init__(self, itemsize: int, block: int = BLOCK_TOKENS):
        self.block_bytes, self.sums, self.tail = block * itemsize, [], b""

    def add(self, data: bytes) -> None:
        """The next bytes written to the token file."""
        data = memoryview(self.tail + data) if self.tail else memoryview(data)
        full = len(data) // self.block_bytes * self.block_bytes
        self.sums += [zlib.crc32(data[i:i + self.block_bytes]) for i in range(0, full, self.block_bytes)]
        self.tail = bytes(data[full:])

    def finish(self) -> np.ndarray:
        """uint32 ``[k]``: every block's CRC-32, the last (shorter) one included."""
        return np.array(self.sums + ([zlib.crc32(self.tail)] if self.tail else []), np.uint32)


def file_crc32(path: Path) -> int:
    """The CRC-32 of a whole file, read in 16 MB pieces."""
    crc = 0
    with open(path, "rb") as f:
        while piece := f.read(1 << 24):
            crc = zlib.crc32(piece, crc)
    return crc


def _damage(folder: Path, start: int, stop: int) -> str:
    return (f"{folder / 'tokens.bin'}: tokens {start:,} to {stop:,} do not match their checksum (the file was changed "
            f"or damaged after the store was written); `python -m flaxformer_lite.data.verify {folder}` lists every "
            f"damaged block; remove {folder} to prepare the store again")


class CheckedTokens:
    """A store's ``tokens [n]`` memmap that checks each block against ``sums`` the first time a read touches it
    (`ValueError` naming the damaged tokens). ``sums=None`` (a store written before checksums) checks instead that
    the block's ids are below ``vocab_size`` (with checksums they are the ids the tokenizer wrote).

    Reads: ``tokens[a:b]`` (an array), ``tokens[i]``, ``len(tokens)``, ``np.asarray(tokens)`` (checks all). A read
    whose blocks are all checked costs one Python loop over them (about 1 µs); a first read adds one CRC-32 each."""

    def __init__(self, raw: np.ndarray, sums: np.ndarray | None, vocab_size: int, folder: Path,
                 block: int = BLOCK_TOKENS):
        self.raw = np.asarray(raw)  # a plain view of the memmap: slicing it is ten times cheaper
        self.sums, self.vocab_size, self.folder, self.block = sums, vocab_size, folder, block
        self.dtype, self.shape = self.raw.dtype, self.raw.shape
        self.checked = bytearray(-(-len(raw) // block))  # 1 once a block is checked
        # the hot path (`check`) indexes memoryviews: a Python int per index, no NumPy scalar
        self._bytes = memoryview(self.raw).cast("B") if len(self.raw) else None
        self._sums = memoryview(np.ascontiguousarray(sums, np.uint32)).cast("B").cast("I") if sums is not None else None

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop = key.start, key.stop
            if start is None or stop is None or start < 0 or stop < 0 or key.step is not None:
                start, stop, _ = key.indices(len(self.raw))
            self.check(start, min(stop, len(self.raw)))
        else:
            i = int(key) % len(self.raw)
            self.check(i, i + 1)
        return self.raw[key]

    def __array__(self, dtype=None, copy=None):
        self.check(0, len(self.raw))
        return np.asarray(self.raw, dtype)

    def check(self, start: int, stop: int) -> None:
        """Check the blocks holding tokens ``[start, stop)`` that no earlier read checked."""
        checked, block, sums = self.checked, self.block, self._sums
        step = block * self.raw.itemsize
        for b in range(start // block, (stop - 1) // block + 1 if stop > start else 0):
            if not checked[b]:
                if sums is None or zlib.crc32(self._bytes[b * step:(b + 1) * step]) != sums[b]:
                    if fault := self.fault(b):  # the slow path names what is wrong
                        raise ValueError(fault)
                checked[b] = 1

    def windows(self, starts, length: int) -> np.ndarray:
        """``[b, length]``: ``tokens[s:s + length]`` for each of ``starts`` (in range), their blocks checked first in
        one tight loop (a batch's windows cost about 0.3 µs each once their blocks are checked)."""
        checked, block, raw, sums, data = self.checked, self.block, self.raw, self._sums, self._bytes
        step, starts = block * raw.itemsize, starts.tolist() if hasattr(starts, "tolist") else list(starts)
        for s in starts:
            for b in range(s // block, (s + length - 1) // block + 1):
                if not checked[b]:
                    if sums is None or zlib.crc32(data[b * step:(b + 1) * step]) != sums[b]:
                        self.check(b * block, b * block + 1)  # the vocabulary, or the error
                    checked[b] = 1
        return np.stack([raw[s:s + length] for s in starts])

    def fault(self, b: int, *, vocabulary: bool = False) -> str | None:
        """What is wrong with block ``b`` (a one-line message), or None. ``vocabulary``: check the ids' range even
        when the checksum matches."""
        lo, hi = b * self.block, min((b + 1) * self.block, len(self.raw))
        ids = self.raw[lo:hi]
        if self.sums is not None and zlib.crc32(ids) != self.sums[b]:
            return _damage(self.folder, lo, hi)
        if (vocabulary or self.sums is None) and ids.max() >= self.vocab_size:
            return (f"{self.folder / 'tokens.bin'}: token {lo + int(np.argmax(ids >= self.vocab_size)):,} is id "
                    f"{int(ids.max())}, outside the store's vocabulary of {self.vocab_size}; remove {self.folder} to "
                    "prepare the store again")
        return None


def verify_store(folder: str | Path, *, progress: bool = True) -> list[str]:
    """Check every file of the store at ``folder`` against its manifest: each token block's CRC-32, ids inside the
    vocabulary, ``offsets.npy`` and ``counts.npy`` whole, the tokenizer's SHA-256. Returns one line per problem
    (empty: the store is intact). `ValueError` when ``folder`` is not a store at all."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
    from .store import TOKENIZER, TokenStore
    store = TokenStore(folder)
    folder, m = store.folder, store.manifest
    if store.tokens.sums is None:
        return [f"{folder}: written before stores kept checksums (format {m.format_version}); remove it and prepare "
                "it again to have them"]
    problems, tokens, shown = [], store.tokens, 20  # at most 20 lines about blocks
    bar = Progress(TextColumn("verifying"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                   disable=not progress, transient=True)
    with bar:
        task = bar.add_task("verify", total=len(tokens) * tokens.dtype.itemsize)
        faults = 0
        for b in range(len(tokens.checked)):
            if fault := tokens.fault(b, vocabulary=True):
                faults += 1
                problems += [fault] if faults <= shown else []
            if b % 256 == 255:
                bar.update(task, completed=(b + 1) * tokens.block * tokens.dtype.itemsize)
    if faults > shown:
        problems.append(f"... and {faults - shown} more damaged blocks of {tokens.block} tokens")
    for name in WHOLE_FILES:
        if file_crc32(folder / name) != m.file_crc32.get(name):
            problems.append(f"{folder / name} does not match its checksum in {folder / 'manifest.json'}")
    tok = folder / TOKENIZER
    if tok.is_file() and hashlib.sha256(tok.read_bytes()).hexdigest() != m.tokenizer_sha256:
        problems.append(f"{tok} is not the tokenizer the store was written with (its SHA-256 differs)")
    return problems
