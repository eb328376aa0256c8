"""The token store: a corpus tokenized once into a folder, then read through `np.memmap`, so that starting or
resuming a run costs the same whatever the corpus size (nanoGPT's flat token file, levanter's document offsets).

A store folder holds:
- ``tokens.bin``: every document's ids followed by the end-of-sequence id, back to back (uint16 when the vocabulary
  fits, else uint32);
- ``offsets.npy``: int64 ``[documents + 1]``, where document i starts (``offsets[-1]`` = the token count);
- ``counts.npy``: int64 ``[vocab]``, how often each id occurs (the unigram statistics);
- ``checksums.npy``: uint32, the CRC-32 of every block of ``tokens.bin`` (checksums.py: checked as a run first
  reads each block, and whole by ``python -m flaxformer_lite.data.verify``);
- ``manifest.json``: format version, tokenizer hash, vocabulary size, dtype, end id, counts, the checksum block and
  the CRC-32 of the offsets and counts, and the source's fingerprint (paths, sizes, modification times and a sample
  of the content, or a hub name and revision). Written last.

Writing is streaming (memory bounded by a few blocks of documents, never by the corpus), parallel (SentencePiece's
threads over every core, or worker processes), shown with a progress bar (MB/s, ETA), and atomic: the folder
is built under a temporary name and renamed into place, so a killed prepare never leaves a store that looks
complete. Shape key: n tokens, m documents, v vocab.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..safe_io import refuse_link
from .checksums import BLOCK_TOKENS, SUMS, WHOLE_FILES, BlockSums, CheckedTokens, file_crc32

FORMAT_VERSION = 2  # 2: checksums
READS = (1, 2)  # the formats this version opens (1: without checksums)
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"  # the tokenizer a store was written with (prepare.py copies it in)
STORE_FILES = frozenset({"tokens.bin", "offsets.npy", "counts.npy", SUMS, MANIFEST, TOKENIZER})  # all a store holds
BLOCK_DOCS = 512  # documents per unit of work sent to an encoding process
ENCODE_THREADS = 2  # blocks encoded at once in this process (128 MB on 2 cores: 4.0-4.9 s against 5.0-5.8 with one)


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What a store holds and where it came from (see the module docstring)."""

    format_version: int
    tokenizer_sha256: str
    vocab_size: int
    eos_id: int
    dtype: str
    documents: int
    tokens: int
    text_bytes: int
    source: dict
    checksum_block: int = 0  # tokens per block of checksums.npy (0: a format-1 store, without checksums)
    file_crc32: dict = dataclasses.field(default_factory=dict)  # {file name: CRC-32} of checksums.WHOLE_FILES

    @classmethod
    def read(cls, folder: str | Path) -> "Manifest":
        """The manifest of the store in ``folder``; `ValueError` if there is none or it is not one."""
        path = Path(folder) / MANIFEST
        try:
            values = json.loads(path.read_text())
            manifest = cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)
                              if f.name in values or f.default is dataclasses.MISSING and f.default_factory is None})
        except FileNotFoundError:
            raise ValueError(f"{folder} is not a token store (no {MANIFEST}); prepare it again") from None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a token store manifest ({type(err).__name__}); prepare it again") from None
        fault = manifest.fault()
        if fault:
            raise ValueError(f"{path}: not a token store manifest ({fault}); prepare it again")
        return manifest

    def fault(self) -> str | None:
        """The first field whose value has the wrong type (a count that is not a non-negative int, a dtype other
        than uint16/uint32...), as ``"name=value: ..."``, or None."""
        for field in dataclasses.fields(self):
            value, kind = getattr(self, field.name), _FIELD_TYPES.get(field.type, field.type)
            if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                return f"{field.name}={value!r}: not a count (an int >= 0)"
            if kind in (str, dict) and not isinstance(value, kind):
                return f"{field.name}={value!r}: not a {kind.__name__}"
        if self.dtype not in DTYPES:
            return f"dtype={self.dtype!r}: not one of {', '.join(DTYPES)}"
        return None


DTYPES = ("uint16", "uint32")  # the token dtypes a store is written with (`token_dtype`)
_FIELD_TYPES = {"int": int, "str": str, "dict": dict}  # dataclass field annotations are strings here (__future__)


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id of a vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class TokenStore:
    """A prepared store, memory-mapped: ``tokens [n]``, ``offsets [m + 1]``, ``counts [v]`` and the manifest.
    Opening costs the same for any corpus size; nothing is read until it is indexed."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        for name in STORE_FILES:  # a store reads only its own files, never one a link names
            refuse_link(self.folder / name)
        self.manifest = Manifest.read(self.folder)
        m = self.manifest
        if m.format_version not in READS:
            raise ValueError(f"{self.folder}: token store format {m.format_version}, this version reads "
                             f"{', '.join(map(str, READS))}; prepare it again")
        try:
            raw = np.memmap(self.folder / "tokens.bin", dtype=m.dtype, mode="r")
            self.offsets = np.load(self.folder / "offsets.npy", mmap_mode="r")
            self.counts = np.load(self.folder / "counts.npy")
            sums = np.load(self.folder / SUMS, mmap_mode="r") if m.checksum_block else None
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(f"{self.folder}: a store file is missing or damaged ({err}); prepare it again") from None
        if (len(raw) != m.tokens or len(self.offsets) != m.documents + 1
                or sums is not None and (sums.dtype != np.uint32 or len(sums) != -(-m.tokens // m.checksum_block))):
            raise ValueError(f"{self.folder}: the token files do not match the manifest (a damaged or half-copied "
                             "store); prepare it again")
        self.tokens = CheckedTokens(raw, sums, m.vocab_size, self.folder, m.checksum_block or BLOCK_TOKENS)

    @property
    def num_documents(self) -> int:
        return self.manifest.documents

    def document(self, i: int) -> np.ndarray:
        """Document ``i``'s ids, without its end id (a view into the memmap)."""
        return self.tokens[int(self.offsets[i]):int(self.offsets[i + 1]) - 1]

    def unigram_entropy(self) -> float:
        """Entropy (nats) of the token frequencies, end ids included."""
        p = self.counts[self.counts > 0] / max(int(self.counts.sum()), 1)
        return float(-(p * np.log(p)).sum())


# -- writing -----------------------------------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(model_proto: bytes) -> None:
    from .tokenizer import tokenizer_from_proto
    _WORKER["tok"] = tokenizer_from_proto(model_proto)


def _encode_block(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """One block of documents (never empty: `_blocks`) -> (flat ids, each document followed by the end id; document
    lengths with it)."""
    tok = _WORKER["tok"]
    docs = tok.encode_arrays(texts)
    eos = np.full(1, tok.eos_id, docs[0].dtype)
    lengths = np.fromiter((len(d) + 1 for d in docs), np.int64, len(docs))
    return np.concatenate([part for doc in docs for part in (doc, eos)]), lengths


def _blocks(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    block = []
    for text in texts:
        block.append(text)
        if len(block) == size:
            yield block
            block = []
    if block:
        yield block


def _encoded(blocks: Iterator[list[str]], model_proto: bytes, workers: int):
    """(texts, (flat, lengths)) per block, in order; at most ``2 * workers`` blocks in flight (bounded memory). With
    ``workers`` < 2, `ENCODE_THREADS` threads encode the next blocks (SentencePiece's threads, without the GIL) while
    the caller writes this one. A worker that dies (e.g. killed for memory) fails the prepare instead of hanging it."""
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
    if workers <= 1:
        _init_worker(model_proto)
        # two blocks in two threads keep both cores busy while either one waits on its slowest document
        pool, depth = ThreadPoolExecutor(ENCODE_THREADS), ENCODE_THREADS
    else:
        ctx = multiprocessing.get_context("spawn")  # no fork: the parent may hold JAX's threads
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(model_proto,))
        depth = 2 * workers
    with pool:
        pending: collections.deque = collections.deque()
        for block in blocks:
            pending.append((block, pool.submit(_encode_block, block)))
            if len(pending) > depth:
                texts, result = pending.popleft()
                yield texts, result.result()
        while pending:
            texts, result = pending.popleft()
            yield texts, result.result()


def write_store(texts: Iterable[str], tokenizer_path: str | Path, folder: str | Path, *, source: dict,
                workers: int = 0, total_bytes: int | None = None, progress: bool = True,
                extra_files: dict | None = None, sweep: bool = True) -> TokenStore:
    """Tokenize ``texts`` (one document each, streamed) with the SentencePiece model at ``tokenizer_path`` (or a
    Hugging Face tokenizer's `HFTokenizer.proto`) into a store at ``folder``, atomically. ``workers`` < 2 encodes in
    this process, SentencePiece spreading each block over every core with its own threads (the fastest on the
    2-core machine measured: 22-25 MB/s against 11-14 with two processes, which pay for pickling); more starts that
    many encoding processes. ``source`` (JSON-able) is recorded
    as the corpus fingerprint; ``total_bytes`` (the corpus size, if known) gives the progress bar its ETA. An
    existing store at ``folder`` is replaced only once the new one is complete; ``extra_files`` (``{name: path}``)
    are copied in with it; ``sweep=False`` when the caller has already swept a killed writer's leftovers
    (`sweep_leftovers`). `ValueError` for a corpus with no text or a full disk."""
    from .tokenizer import tokenizer_from_proto
    folder = Path(folder)
    check_store_folder(folder)
    proto = Path(tokenizer_path).read_bytes()
    tok = tokenizer_from_proto(proto)
    dtype = token_dtype(tok.vocab_size)
    if sweep:
        sweep_leftovers(folder)
    tmp = working_name(folder, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        stats = _write_tokens(texts, proto, tmp, dtype, tok.vocab_size, workers,
                              total_bytes, progress)
        if stats["tokens"] == stats["documents"]:
            raise ValueError(f"the corpus for {folder} has no text to tokenize (every document is empty)")
        manifest = Manifest(FORMAT_VERSION, hashlib.sha256(proto).hexdigest(), tok.vocab_size, tok.eos_id,
                            dtype.name, stats["documents"], stats["tokens"], stats["text_bytes"], source,
                            BLOCK_TOKENS, {name: file_crc32(tmp / name) for name in WHOLE_FILES})
        for name, path in (extra_files or {}).items():
            shutil.copyfile(path, tmp / name)
        (tmp / MANIFEST).write_text(json.dumps(dataclasses.asdict(manifest), indent=1) + "\n")
        _replace(tmp, folder)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"could not write the token store {folder} ({err.strerror or err}); free some space or "
                         "choose another folder: nothing else was changed") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TokenStore(folder)


def _write_tokens(texts, proto, tmp: Path, dtype, vocab_size: int, workers: int, total_bytes, progress) -> dict:
    """Stream the encoded blocks into ``tmp``'s token file; write offsets and counts. Returns the totals."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
    counts, sums = np.zeros(vocab_size, np.int64), BlockSums(dtype.itemsize)
    lengths_parts, stats = [], {"documents": 0, "tokens": 0, "text_bytes": 0}
    bar = Progress(TextColumn("tokenizing"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn(), disable=not progress, transient=True)
    with open(tmp / "tokens.bin", "wb") as out, bar:
        task = bar.add_task("tokenize", total=total_bytes)
        for block, (flat, lengths) in _encoded(_blocks(texts, BLOCK_DOCS), proto, workers):
            data = flat.astype(dtype).tobytes()
            out.write(data)
            sums.add(data)
            counts += np.bincount(flat, minlength=vocab_size)[:vocab_size]
            lengths_parts.append(lengths)
            size = sum(len(t.encode("utf-8", "replace")) for t in block)
            stats["documents"] += len(lengths)
            stats["tokens"] += len(flat)
            stats["text_bytes"] += size
            bar.update(task, advance=size)
        out.flush()
        os.fsync(out.fileno())
    lengths = np.concatenate(lengths_parts) if lengths_parts else np.zeros(0, np.int64)
    np.save(tmp / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    np.save(tmp / "counts.npy", counts)
    np.save(tmp / SUMS, sums.finish())
    return stats


def working_name(folder: Path, kind: str, suffix: str = "") -> Path:
    """A sibling of ``folder`` this process works in: ``<name>.<kind>-<host>-<pid><suffix>`` (``kind``: ``tmp``, the
    store being written; ``old``, the one it replaces; ``tokenizer``, prepare's tokenizer file), so that
    `sweep_leftovers` can tell whose it is."""
    return folder.with_name(f"{folder.name}.{kind}-{socket.gethostname()}-{os.getpid()}{suffix}")


def sweep_leftovers(folder: Path) -> list[Path]:
    """Remove what a killed writer of the store at ``folder`` left beside it (`working_name` siblings of a process
    of this host that is gone; another host's may still be working, and are left); return what was removed."""
    pattern = re.compile(rf"{re.escape(folder.name)}\.(tmp|old|tokenizer)-{re.escape(socket.gethostname())}-(\d+)"
                         r"(\.model)?")
    removed = []
    for path in folder.parent.glob(f"{glob.escape(folder.name)}.*-*") if folder.parent.is_dir() else []:
        match = pattern.fullmatch(path.name)
        if match and not _alive(int(match.group(2))) and not path.is_symlink():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def check_store_folder(folder: str | Path) -> None:
    """Refuse to write a token store at ``folder`` unless it is new, an empty folder, or a store (only `STORE_FILES`,
    a manifest among them): replacing it would delete what is there, so a folder holding anything else (a user's
    files, the corpus, a home folder), a file or a symbolic link is the user's. One-line `ValueError` naming the
    folder and what is in the way; nothing is changed."""
    folder = Path(folder)
    if folder.is_symlink():
        raise ValueError(f"{folder} is a symbolic link: a token store is written only into a real folder; refused, "
                         "nothing changed")
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ValueError(f"{folder} is a file, not a token store folder; refused, nothing changed")
    entries = list(folder.iterdir())
    links = sorted(p.name for p in entries if p.is_symlink())
    if links:
        raise ValueError(f"{folder / links[0]} is a symbolic link: a token store holds only its own plain files; "
                         "refused, nothing changed. Remove the link")
    foreign = sorted(p.name for p in entries if p.name not in STORE_FILES or p.is_symlink() or not p.is_file())
    if foreign or (entries and not (folder / MANIFEST).is_file()):
        what = (f"{len(foreign)} {'entry' if len(foreign) == 1 else 'entries'} that no token store holds, e.g. "
                f"{foreign[0]!r}" if foreign else f"no {MANIFEST}")
        raise ValueError(f"{folder} is not a token store ({what}): writing one there would delete them; refused, "
                         "nothing changed. Name a new or empty folder")


def _replace(tmp: Path, folder: Path) -> None:
    """Rename the finished ``tmp`` into ``folder`` (checked again: it may have changed while tokenizing); an old
    store there is moved away first, then removed."""
    check_store_folder(folder)
    old = None
    if folder.exists():
        old = working_name(folder, "old")
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
