"""Preparing a corpus once: a tokenizer trained on a seeded random sample of its documents, and the token store of
the whole corpus (store.py), in one folder. `train.py` does it on its first run (by process 0; the others wait);
users with a big corpus can do it ahead, on a big machine, with ``python -m flaxformer_lite.run.prepare``.

A store is reused while its manifest matches the corpus (files, sizes, modification times, a sample of the content)
and the tokenizer.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import numpy as np

from .corpus import column, load_corpus, same_source, source_fingerprint
from .store import TOKENIZER, Manifest, TokenStore, check_store_folder, sweep_leftovers, working_name, write_store
from .tokenizer import Tokenizer, train_tokenizer

TOKENIZER_SAMPLE_DOCS = 50_000  # at most this many documents (a seeded random sample) train the tokenizer,
TOKENIZER_SAMPLE_CHARS = 10_000_000  # and at most about this many characters of them (training time grows with it)
STORE_TOKENIZER = TOKENIZER  # a store carries the tokenizer it was written with
# the data settings a store's tokenizer was made from (a store made with others is not this corpus's store)
TOKENIZER_SETTINGS = ("tokenizer", "vocab_size", "tokenizer_type", "character_coverage", "byte_fallback",
                      "normalization")


def prepare_tokenizer(texts: list[str], data) -> Tokenizer:
    """``data.tokenizer`` if given, else a new one trained on ``texts`` with the ``data.*`` tokenizer settings."""
    if data.tokenizer:
        return Tokenizer.load(data.tokenizer)
    return train_tokenizer(texts, vocab_size=data.vocab_size, model_type=data.tokenizer_type,
                           character_coverage=data.character_coverage, byte_fallback=data.byte_fallback,
                           normalization=data.normalization)


def tokenizer_sample(ds, seed: int) -> list[str]:
    """The texts a tokenizer is trained on: documents in a seeded random order (the same on every host), up to
    ``TOKENIZER_SAMPLE_DOCS`` documents and about ``TOKENIZER_SAMPLE_CHARS`` characters. Only about as many
    documents as that takes are read (their mean length is estimated from a thousand first)."""
    n = len(ds)
    order = np.random.default_rng([seed, 11]).permutation(n)
    probe = column(ds, "text", np.sort(order[:1000]).tolist())
    mean = max(1.0, float(np.mean([len(t) for t in probe])))
    wanted = min(n, TOKENIZER_SAMPLE_DOCS, int(1.2 * TOKENIZER_SAMPLE_CHARS / mean) + 1)
    texts = column(ds, "text", np.sort(order[:wanted]).tolist() if wanted < n else None)
    shuffle = np.random.default_rng([seed, 12]).permutation(len(texts))
    keep = np.cumsum([len(texts[i]) for i in shuffle]) <= TOKENIZER_SAMPLE_CHARS
    keep[:1] = True  # one document at least, however long (its first TOKENIZER_SAMPLE_CHARS characters)
    return [texts[i][:TOKENIZER_SAMPLE_CHARS] for i in shuffle[keep]]


def _texts(ds, batch: int = 1024):
    for rows in ds.iter(batch_size=batch):
        yield from rows["text"]


def _usable(folder: Path, source: dict, tokenizer: Tokenizer | None) -> TokenStore | None:
    """The store at ``folder`` if it holds this corpus (and this tokenizer, when one is given), else None."""
    try:
        store = TokenStore(folder)
    except ValueError:
        return None
    if not same_source(store.manifest.source, source):
        return None
    if tokenizer is not None and store.manifest.tokenizer_sha256 != tokenizer.sha256:
        return None
    return store


def _damaged_copy(folder: Path, source: dict, tokenizer: Tokenizer | None) -> Tokenizer | None:
    """The tokenizer of the store at ``folder`` when its manifest names this corpus (and ``tokenizer``, if given)
    but the store does not open (damaged token files): written again with that tokenizer, it holds the same tokens.
    None when the manifest or the tokenizer file cannot be read, or they name another corpus or tokenizer."""
    try:
        manifest, kept = Manifest.read(folder), Tokenizer.load(folder / STORE_TOKENIZER)
    except Exception:  # noqa: BLE001  an unreadable manifest or tokenizer: not provably the same store
        return None
    same = same_source(manifest.source, source) and manifest.tokenizer_sha256 == kept.sha256
    return kept if same and (tokenizer is None or tokenizer.sha256 == kept.sha256) else None


def _hub_stream(data):
    """A Hub corpus in `datasets`' streaming mode (nothing materialised as Arrow): its text column as ``text``."""
    import datasets
    try:
        ds = datasets.load_dataset(data.path, split="train", streaming=True)
    except Exception as err:  # noqa: BLE001  offline, no such repo...: the user's to fix
        raise ValueError(f"data.path={data.path}: not a loadable Hub dataset ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:160] if str(err) else ''})") from None
    if data.text_field != "text":
        ds = ds.rename_column(data.text_field, "text")
    return ds


def _stream_sample(ds, seed: int) -> list[str]:
    """A tokenizer sample of a streamed corpus: a seeded shuffle buffer's first documents, up to the same limits."""
    texts, chars = [], 0
    for row in ds.shuffle(seed=seed, buffer_size=10_000).take(TOKENIZER_SAMPLE_DOCS):
        text = row["text"]
        texts.append(text[:TOKENIZER_SAMPLE_CHARS] if isinstance(text, str) else text)  # None: train_tokenizer says
        chars += len(texts[-1] or "")
        if chars >= TOKENIZER_SAMPLE_CHARS:
            break
    return texts


def _write(data, folder: Path, source: dict, tokenizer: Tokenizer | None, seed: int, progress: bool) -> TokenStore:
    if "hub" in source:
        ds = _hub_stream(data)
        texts, sample = (row["text"] for row in ds), (lambda: _stream_sample(ds, seed))
    else:
        ds = load_corpus(data.path, data.format, data.text_field, data.text_unit)
        texts, sample = _texts(ds), (lambda: tokenizer_sample(ds, seed))
    tok = tokenizer or prepare_tokenizer(sample(), data)
    tok_path = working_name(folder, "tokenizer", ".model")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        sweep_leftovers(folder)  # a killed writer's files go first: they may be what filled the disk
        tok_path.write_bytes(tok.proto)  # SentencePiece's model file, or a Hugging Face tokenizer's (HFTokenizer.proto)
    except OSError as err:
        tok_path.unlink(missing_ok=True)
        raise ValueError(f"could not write the tokenizer file {tok_path} ({err.strerror or err}); free some space or "
                         "choose another folder: nothing else was changed") from None
    try:
        total = sum(f[1] for f in source.get("files", [])) or None
        write_store(texts, tok_path, folder, source=source, workers=data.workers, total_bytes=total,
                    progress=progress, extra_files={STORE_TOKENIZER: tok_path}, sweep=False)
    finally:
        tok_path.unlink(missing_ok=True)
    return TokenStore(folder)


def prepare_store(data, folder: str | Path, *, seed: int = 0, tokenizer: Tokenizer | None = None,
                  primary: bool = True, sync: Callable[[], None] = lambda: None, refuse: str | None = None,
                  progress: bool = True) -> TokenStore:
    """The token store of ``data.path`` at ``folder``: reused when its manifest matches the corpus (and
    ``tokenizer``, if given), else written (the tokenizer trained first when none is given).

    In a run of several processes, the ``primary`` one writes while the others wait in ``sync()`` (a barrier every
    process calls once), then open it; a process that cannot see it (no shared filesystem) writes its own. With
    ``refuse`` (a message), a store there that no longer matches is not replaced: `ValueError(refuse)` instead
    (checkpoints were trained on it, or the user prepared it)."""
    folder = Path(folder)
    source = {**source_fingerprint(data.path, data.format, data.text_field, data.text_unit),
              "tokenizer": {key: getattr(data, key) for key in TOKENIZER_SETTINGS}}
    store = _usable(folder, source, tokenizer)
    if store is None and refuse and (folder / "manifest.json").exists():
        tokenizer = _damaged_copy(folder, source, tokenizer)
        if tokenizer is None:
            raise ValueError(refuse)
        print(f"note: the token store {folder} is damaged; writing it again from the same corpus and tokenizer",
              file=sys.stderr)
    if store is None and primary:
        check_store_folder(folder)  # before training a tokenizer: a user's folder is refused at once
        store = _write(data, folder, source, tokenizer, seed, progress)
    sync()
    if store is None:
        store = _usable(folder, source, tokenizer) or _write(data, folder, source, tokenizer, seed, progress)
    return store


def store_tokenizer(store: TokenStore) -> Tokenizer:
    """The tokenizer a store was written with: its file, checked against the manifest's SHA-256 (`ValueError` in one
    line if it was swapped or damaged: every token would decode wrongly)."""
    path = store.folder / STORE_TOKENIZER
    tok = Tokenizer.load(path)
    if tok.sha256 != store.manifest.tokenizer_sha256:
        raise ValueError(f"{path} is not the tokenizer the store was written with (its SHA-256 differs from "
                         f"{store.folder / 'manifest.json'}'s): its tokens would decode wrongly; put the file back, "
                         f"or remove {store.folder} to prepare the store again")
    return tok


if __name__ == "__main__":  # the command moved up to the run package (it reads train.py's config): forwarded
    import runpy
    print("note: `python -m flaxformer_lite.data.prepare` is now `python -m flaxformer_lite.run.prepare`; this name "
          "goes in the next release", file=sys.stderr)
    runpy.run_module("flaxformer_lite.run.prepare", run_name="__main__", alter_sys=True)
