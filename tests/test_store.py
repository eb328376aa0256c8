"""The token store: what it holds equals the tokenizer's own encoding, one or several workers write the same bytes,
writing is atomic (a failed prepare leaves nothing that looks complete and keeps an older store), and damaged or
foreign folders are one-line errors."""
import json
import os
import subprocess

import numpy as np
import pytest

from flaxformer_lite.data import load_corpus, train_tokenizer
from flaxformer_lite.data.store import Manifest, TokenStore, write_store

TEXTS = [t for t in load_corpus()["text"][:300]] + ["", "ünïcödé ✓ text"]  # an empty document too


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_tokenizer(TEXTS, vocab_size=400).save(path)
    from flaxformer_lite.data import Tokenizer
    return path, Tokenizer.load(path)


@pytest.fixture(scope="module")
def store(tokenizer, tmp_path_factory):
    return write_store(iter(TEXTS), tokenizer[0], tmp_path_factory.mktemp("s") / "store", source={"test": 1},
                       workers=1, progress=False)


def test_store_holds_the_tokenizers_encoding(store, tokenizer):
    tok = tokenizer[1]
    want = [tok.encode(t) for t in TEXTS]
    assert store.num_documents == len(TEXTS) and store.tokens.dtype == np.uint16
    for i in (0, 5, len(TEXTS) - 2, len(TEXTS) - 1):
        np.testing.assert_array_equal(store.document(i), want[i])
    flat = np.concatenate([np.asarray(d + [tok.eos_id], np.int64) for d in want])
    np.testing.assert_array_equal(np.asarray(store.tokens), flat)
    np.testing.assert_array_equal(store.counts, np.bincount(flat, minlength=tok.vocab_size))
    m = store.manifest
    assert (m.vocab_size, m.eos_id, m.tokens, m.source) == (tok.vocab_size, tok.eos_id, len(flat), {"test": 1})
    assert m.text_bytes == sum(len(t.encode()) for t in TEXTS)


def test_worker_processes_write_the_same_bytes(store, tokenizer, tmp_path):
    other = write_store(iter(TEXTS), tokenizer[0], tmp_path / "two", source={"test": 1}, workers=2, progress=False)
    for name in ("tokens.bin", "offsets.npy", "counts.npy"):
        assert (other.folder / name).read_bytes() == (store.folder / name).read_bytes()


def _failing(texts, after):
    for i, t in enumerate(texts):
        if i == after:
            raise KeyboardInterrupt  # a prepare killed half way
        yield t


def test_a_failed_prepare_leaves_no_store_and_keeps_the_old_one(store, tokenizer, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        write_store(_failing(TEXTS, 200), tokenizer[0], tmp_path / "new", source={}, workers=1, progress=False)
    assert list(tmp_path.iterdir()) == []
    target = tmp_path / "kept"
    write_store(iter(TEXTS[:50]), tokenizer[0], target, source={"v": 1}, workers=1, progress=False)
    with pytest.raises(KeyboardInterrupt):
        write_store(_failing(TEXTS, 200), tokenizer[0], target, source={"v": 2}, workers=1, progress=False)
    assert TokenStore(target).manifest.source == {"v": 1} and [p.name for p in tmp_path.iterdir()] == ["kept"]


def test_empty_corpus_and_damaged_or_foreign_folders_are_one_line_errors(store, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="has no text to tokenize"):
        write_store(iter(["", ""]), tokenizer[0], tmp_path / "empty", source={}, workers=1, progress=False)
    with pytest.raises(ValueError, match=r"is not a token store \(no manifest.json\)"):
        TokenStore(tmp_path)
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("manifest.json", "offsets.npy", "counts.npy"):
        (copy / name).write_bytes((store.folder / name).read_bytes())
    (copy / "tokens.bin").write_bytes((store.folder / "tokens.bin").read_bytes()[:100])  # half copied
    with pytest.raises(ValueError, match="do not match the manifest"):
        TokenStore(copy)
    (copy / "manifest.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(ValueError, match="not a token store manifest"):
        Manifest.read(copy)


def test_a_full_disk_is_a_clear_error_and_keeps_nothing_half_written(tokenizer, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        with pytest.raises(ValueError, match=r"could not write the token store .*No space left on device"):
            write_store(iter(TEXTS * 20), tokenizer[0], disk / "store", source={}, workers=1, progress=False)
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
