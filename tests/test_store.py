"""The token store: what it holds equals the tokenizer's own encoding, one or several workers write the same bytes,
writing is atomic (a failed prepare leaves nothing that looks complete and keeps an older store), and damaged or
foreign folders are one-line errors."""
import json
import os
import re
import shutil
import subprocess
import sys

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


def test_blocks_encoded_ahead_keep_their_order(store, tokenizer, tmp_path, monkeypatch):
    """Blocks of 7 documents: each encoded in a thread while the one before is written, in order."""
    from flaxformer_lite.data import store as store_module
    monkeypatch.setattr(store_module, "BLOCK_DOCS", 7)
    other = write_store(iter(TEXTS), tokenizer[0], tmp_path / "blocks", source={"test": 1}, progress=False)
    for name in ("tokens.bin", "offsets.npy", "counts.npy"):
        assert (other.folder / name).read_bytes() == (store.folder / name).read_bytes()


def test_encode_arrays_equals_encode_batch_with_any_sentencepiece(tokenizer, monkeypatch):
    tok = tokenizer[1]
    want = tok.encode_batch(TEXTS)
    got = tok.encode_arrays(TEXTS)
    assert [a.tolist() for a in got] == want
    plain = tok.sp.encode

    def without_numpy(texts, out_type=int):  # a SentencePiece before 0.2.1: no out_type="numpy"
        if out_type == "numpy":
            raise ValueError("unknown return_type=numpy")
        return plain(texts, out_type=out_type)

    monkeypatch.setattr(tok.sp, "encode", without_numpy)
    assert [a.tolist() for a in tok.encode_arrays(TEXTS)] == want


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
    for name in ("manifest.json", "offsets.npy", "counts.npy", "checksums.npy"):
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


# -- lazy packing: windows of the flat stream ------------------------------------------------------------------------
def test_window_pool_reads_the_windows_it_promises():
    from flaxformer_lite.data.windows import WindowPool
    tokens = np.arange(100, dtype=np.uint16)
    pool = WindowPool(tokens, 10, 60, length=9, stride=8)  # windows inside [10, 60): starts 10, 18, ..., 50
    assert len(pool) == 6
    got = pool.rows([0, 5, 2])
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, [list(range(s, s + 9)) for s in (10, 50, 26)])
    assert len(WindowPool(tokens, 0, 5, length=9, stride=8)) == 0


def test_stream_windows_score_every_target_within_its_document():
    from flaxformer_lite.data.windows import DocumentChunks, WindowPool, causal_lm_windows
    eos = 0
    row = np.array([[7, 8, eos, 3, 4, 5, eos, 9, 6]])  # a document's tail, a whole one, the head of a third
    batch = causal_lm_windows(row, eos)
    np.testing.assert_array_equal(batch["tokens"], [[7, 8, eos, 3, 4, 5, eos, 9]])
    np.testing.assert_array_equal(batch["targets"], [[8, eos, 3, 4, 5, eos, 9, 6]])
    # the end id opens the next document: it predicts that document's first token, from nothing before it
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 2, 2, 2, 2, 3, 3]])
    assert batch["loss_mask"].all()
    chunks = DocumentChunks(WindowPool(row[0], 0, 9, length=9, stride=9), eos)
    assert len(chunks) == 1 and chunks[0] == [3, 4, 5]  # the longest piece without an end id


@pytest.mark.parametrize("name", ["causal_lm", "prefix_lm", "mlm", "span_corruption"])
def test_stream_pools_make_the_batches_of_their_objective(store, tokenizer, name):
    from flaxformer_lite.data import OBJECTIVES, special_ids
    from flaxformer_lite.experiment import DataConfig
    tok, data, objective = tokenizer[1], DataConfig(objective=name), OBJECTIVES[name]
    ids = special_ids(tok)
    size, make = objective.stream_pool(data, store.tokens, 0, store.manifest.tokens, 32, ids)
    assert 0 < size <= store.manifest.tokens // 29
    rngs = lambda: [np.random.default_rng(i) for i in range(4)]
    got = make(np.array([0, 3, size - 1, 3]), rngs())
    docs = [store.document(i).tolist() for i in range(store.num_documents)]
    old = objective.make_pool(data, {"text": docs}, 32, ids)[1](np.arange(4), rngs())
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in old.items()}
    from flaxformer_lite.data.registry import BATCH_KINDS
    assert set(got) - {"prefix_lengths"} == set(BATCH_KINDS[objective.batch_kind])  # the keys its kind declares
    for key in got:
        assert got[key].dtype == old[key].dtype, key
    np.testing.assert_array_equal(got["tokens" if "tokens" in got else "src"][1],
                                  make(np.array([3]), rngs()[1:2])["tokens" if "tokens" in got else "src"][0])


# -- what the streamed batches hold, rebuilt here from the tokenizer's own encoding ----------------------------------
def _stream_batch(tokenizer, name, seq_len=32):
    """Every example of ``name``'s stream pool over the whole store (one generator per row), and the token stream
    rebuilt from the tokenizer: each text's ids, then the end id."""
    from flaxformer_lite.data import OBJECTIVES, special_ids
    from flaxformer_lite.experiment import DataConfig
    tok = tokenizer[1]
    flat = np.concatenate([np.asarray(tok.encode(t) + [tok.eos_id], np.int64) for t in TEXTS])
    return flat, OBJECTIVES[name], special_ids(tok), seq_len, DataConfig(objective=name)


def test_streamed_prefix_lm_rows_are_the_stream_and_score_no_target_in_their_prefix(store, tokenizer):
    flat, objective, ids, l, data = _stream_batch(tokenizer, "prefix_lm")
    size, make = objective.stream_pool(data, store.tokens, 0, len(flat), l, ids)
    assert size == (len(flat) - 1) // l  # windows of l + 1 tokens, l apart: every token a target once
    b = make(np.arange(size), [np.random.default_rng(i) for i in range(size)])
    windows = np.stack([flat[r * l:r * l + l + 1] for r in range(size)])
    np.testing.assert_array_equal(b["tokens"], windows[:, :-1])
    np.testing.assert_array_equal(b["targets"], windows[:, 1:])
    for row, segs in zip(windows[:, :-1], b["segment_ids"]):  # a new segment at each end id (it opens a document)
        assert segs[0] == 1 + (row[0] == ids.eos)
        np.testing.assert_array_equal(np.diff(segs), row[1:] == ids.eos)
    prefix = b["prefix_lengths"]
    assert prefix.shape == (size,) and 1 <= prefix.min() and prefix.max() <= l - 1  # within the row, never all of it
    assert prefix.min() == 1 and prefix.max() == l - 1 and abs(prefix.mean() - l / 2) < 1  # uniform over [1, l)
    for p, mask in zip(prefix, b["loss_mask"]):  # target j is token j + 1: scored once it lies after the prefix
        np.testing.assert_array_equal(mask, [float(j + 1 >= p) for j in range(l)])


def test_streamed_mlm_rows_hold_their_chunk_and_mask_15_percent_80_10_10(store, tokenizer):
    flat, objective, ids, l, data = _stream_batch(tokenizer, "mlm")
    size, make = objective.stream_pool(data, store.tokens, 0, len(flat), l, ids)
    stride = l - 3  # [CLS] A [SEP] B [SEP]
    assert size == len(flat) // stride
    b = make(np.arange(size), [np.random.default_rng(i) for i in range(size)])

    def runs(window):  # the end-id-free runs of a window, longest first
        pieces, current = [], []
        for t in window:
            if t == ids.eos:
                pieces.append(current)
                current = []
            else:
                current.append(int(t))
        return sorted(pieces + [current], key=len, reverse=True)
    chunks = [runs(flat[r * stride:(r + 1) * stride]) for r in range(size)]
    halves = {tuple(c[0][len(c[0]) // 2:][:k]) for c in chunks for k in range(len(c[0]) + 1)}  # NSP's other B
    for r in range(size):
        n = int(b["padding_mask"][r].sum())
        np.testing.assert_array_equal(b["padding_mask"][r], np.arange(l) < n)
        original = b["mlm_targets"][r]
        seps = np.flatnonzero(original[:n] == ids.sep)
        assert original[0] == ids.cls and len(seps) == 2 and seps[1] == n - 1, original
        assert (original[n:] == ids.pad).all() and (b["tokens"][r, n:] == ids.pad).all()
        a, second = original[1:seps[0]].tolist(), original[seps[0] + 1:n - 1].tolist()
        longest = [c for c in chunks[r] if len(c) == len(chunks[r][0])]
        assert len(a) >= 1 and any(c[:len(a)] == a for c in longest)  # A: the head of its window's longest run
        if b["nsp_labels"][r] == 1:  # B continues A in its chunk
            assert any(c[:len(a) + len(second)] == a + second for c in longest)
        else:  # B: the head of the second half of some chunk
            assert tuple(second) in halves
        np.testing.assert_array_equal(b["token_type_ids"][r], [0] * (seps[0] + 1) + [1] * (n - 1 - seps[0])
                                      + [0] * (l - n))
    tokens, targets, masked = b["tokens"], b["mlm_targets"], b["mlm_mask"] > 0
    text = b["padding_mask"] & ~np.isin(targets, list(ids.special))
    assert not (masked & ~text).any() and (tokens[~masked] == targets[~masked]).all()  # only text is masked
    assert (tokens[:, 0] == ids.cls).all()
    assert abs(masked.sum() / text.sum() - 0.15) < 0.01, masked.sum() / text.sum()
    as_mask = tokens[masked] == ids.mask
    random = ~as_mask & (tokens[masked] != targets[masked])
    assert abs(as_mask.mean() - 0.8) < 0.02 and abs(random.mean() - 0.1) < 0.015, (as_mask.mean(), random.mean())
    assert abs((~as_mask & ~random).mean() - 0.1) < 0.015  # kept (a random draw of the same id counts here)
    assert not np.isin(tokens[masked][random], list(ids.special)).any()  # a random text token, never a special one
    assert abs(b["nsp_labels"].mean() - 0.5) < 4 * 0.5 / np.sqrt(size)


def test_streamed_span_corruption_rebuilds_its_windows_from_source_and_target(store, tokenizer):
    flat, objective, ids, l, data = _stream_batch(tokenizer, "span_corruption")
    size, make = objective.stream_pool(data, store.tokens, 0, len(flat), l, ids)
    assert size == len(flat) // l
    b = make(np.arange(size), [np.random.default_rng(i) for i in range(size)])
    noise = round(l * data.noise_density)  # 5 of 32 tokens, in round(5 / 3) = 2 spans
    spans = round(noise / data.mean_span_length)
    sentinels = list(ids.sentinels[:spans])
    assert b["tgt"].shape == (size, noise + spans + 1) and b["tgt_mask"].all()
    np.testing.assert_array_equal(b["tgt_in"], np.concatenate([np.full((size, 1), ids.bos), b["tgt"][:, :-1]], 1))
    for r in range(size):
        window = flat[r * l:(r + 1) * l].tolist()
        src = b["src"][r].tolist()
        n = l - noise + spans
        np.testing.assert_array_equal(b["src_padding_mask"][r], np.arange(l) < n)
        assert src[n:] == [ids.pad] * (l - n)
        assert [t for t in src[:n] if t in ids.sentinels] == sentinels  # sentinel k for span k, in order
        assert src[0] not in ids.sentinels  # the row starts with kept text
        tgt = b["tgt"][r].tolist()
        assert tgt[-1] == ids.eos and tgt[0] == sentinels[0]
        where = [tgt.index(s) for s in sentinels] + [len(tgt) - 1]
        pieces = [tgt[where[k] + 1:where[k + 1]] for k in range(spans)]  # an end id inside is the stream's own
        assert all(pieces) and sum(map(len, pieces)) == noise
        rebuilt = []
        for t in src[:n]:
            rebuilt += pieces[sentinels.index(t)] if t in sentinels else [t]
        assert rebuilt == window, r


# -- the store in train.py -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from runs import write_corpus
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def test_resume_refuses_a_changed_corpus_unless_allowed(corpus, tmp_path, capsys):
    from runs import losses, overrides, train_cli
    data = tmp_path / "docs.jsonl"
    data.write_text((corpus / "docs.jsonl").read_text())
    args = lambda steps, *extra: overrides(corpus, tmp_path / "run", steps=steps,
                                           extra=[f"data.path={data}", "train.checkpoint_every=2", *extra])
    assert train_cli.main(args(2)) == 0
    with data.open("a") as f:
        f.write(json.dumps({"text": "one more document, written after the checkpoints"}) + "\n")
    capsys.readouterr()
    assert train_cli.main(args(4)) == 2
    assert "the corpus changed since this run's checkpoints were written" in capsys.readouterr().err
    assert train_cli.main(args(4, "data.allow_corpus_change=true")) == 0
    assert "resuming from step 2" in capsys.readouterr().out and len(losses(tmp_path / "run")) == 4


def test_resume_rewrites_a_damaged_store_of_the_same_corpus(corpus, tmp_path, capsys):
    """A truncated token file under an intact manifest is not "the corpus changed": the store is written again with
    its own tokenizer, byte for byte the same, and the run resumes."""
    from runs import losses, overrides, train_cli
    args = lambda steps: overrides(corpus, tmp_path / "run", steps=steps, extra=["train.checkpoint_every=2"])
    assert train_cli.main(args(2)) == 0
    tokens = tmp_path / "run" / "store" / "tokens.bin"
    before = tokens.read_bytes()
    with tokens.open("r+b") as f:
        f.truncate(len(before) // 2)
    capsys.readouterr()
    assert train_cli.main(args(4)) == 0
    captured = capsys.readouterr()
    assert "is damaged; writing it again from the same corpus and tokenizer" in captured.err
    assert "resuming from step 2" in captured.out and len(losses(tmp_path / "run")) == 4
    assert tokens.read_bytes() == before


def test_a_prepared_store_is_reused_and_a_foreign_one_refused(corpus, tmp_path, capsys):
    from runs import overrides, train_cli

    from flaxformer_lite.run.prepare import main as prepare
    store = tmp_path / "store"
    assert prepare(["--out", str(store), f"data.path={corpus / 'docs.jsonl'}", "data.vocab_size=512"]) == 0
    written = (store / "tokens.bin").stat().st_mtime_ns
    assert train_cli.main(overrides(corpus, tmp_path / "run", steps=2, extra=[f"data.store={store}"])) == 0
    assert (store / "tokens.bin").stat().st_mtime_ns == written and not (tmp_path / "run" / "store").exists()
    assert (tmp_path / "run" / "tokenizer.model").read_bytes() == (store / "tokenizer.model").read_bytes()
    other = tmp_path / "other.jsonl"
    other.write_text((corpus / "docs.jsonl").read_text()[:20000])
    capsys.readouterr()
    assert train_cli.main(overrides(corpus, tmp_path / "run2", steps=2,
                                    extra=[f"data.store={store}", f"data.path={other}"])) == 2
    assert f"data.store '{store}' holds another corpus or tokenizer" in capsys.readouterr().err


def test_a_held_out_file_is_the_eval_set_and_its_size_is_honoured(corpus, tmp_path, capsys):
    from runs import overrides, train_cli
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:8]))
    run = tmp_path / "run"
    assert train_cli.main(overrides(corpus, run, steps=2, extra=[f"data.eval_path={held_out}", "train.eval_every=2",
                                                                 "train.eval_batches=50"])) == 0
    manifest = json.loads((tmp_path / "run" / "store-eval" / "manifest.json").read_text())
    assert manifest["source"]["files"][0][0] == str(held_out)
    assert manifest["tokenizer_sha256"] == json.loads((run / "store" / "manifest.json").read_text())["tokenizer_sha256"]
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "note: the eval set holds" in out and "not train.eval_batches=50" in out
    from flaxformer_lite.training import read_metrics
    assert any("eval_loss" in r for r in read_metrics(run / "metrics.jsonl"))
    missing, config = tmp_path / "nope.jsonl", tmp_path / "c.yaml"  # a bad held-out path is named by its own key
    config.write_text("train:\n  steps: 2\n")
    assert train_cli.main(["train.samples=0", "--config", str(config),  # an option between overrides
                           *overrides(corpus, tmp_path / "run3", steps=2, extra=[f"data.eval_path={missing}"])]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"train.py: error: data.eval_path={missing}: no such file" in err, err


def test_a_hub_corpus_is_prepared_streaming_without_arrow(tokenizer, tmp_path, monkeypatch):
    import datasets

    from flaxformer_lite.data.prepare import prepare_store
    from flaxformer_lite.experiment import DataConfig
    calls = []

    def fake_hub(name, split=None, streaming=False, **kwargs):  # an offline stand-in for the Hub
        calls.append((name, streaming))
        if not streaming:
            raise AssertionError("the corpus was materialised")
        return datasets.IterableDataset.from_generator(lambda: ({"content": t} for t in TEXTS))

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    data = DataConfig(path="someone/corpus", text_field="content", vocab_size=400)
    store = prepare_store(data, tmp_path / "store", progress=False)
    assert calls and all(streaming for _, streaming in calls)
    assert store.num_documents == len(TEXTS) and store.manifest.source["hub"] == "someone/corpus"
    from flaxformer_lite.data.prepare import store_tokenizer
    tok = store_tokenizer(store)
    np.testing.assert_array_equal(store.document(3), tok.encode(TEXTS[3]))


def test_a_folder_that_is_not_a_store_is_refused_untouched(store, tokenizer, tmp_path):
    """A user's folder (files, the corpus itself), a file, a symbolic link, or a store holding a user's file: the
    write is refused in one line before any work, and every byte there stays; new and empty folders are written."""
    user = tmp_path / "mine"
    (user / "notes").mkdir(parents=True)
    (user / "thesis.tex").write_text("years of work")
    (user / "notes" / "a.txt").write_text("more")
    target = tmp_path / "link"
    target.symlink_to(user, target_is_directory=True)
    kept = tmp_path / "kept"
    shutil.copytree(store.folder, kept)
    (kept / "my-notes.txt").write_text("mine")
    (tmp_path / "file").write_text("a file")
    for folder, match in [(user, "not a token store .2 entries that no token store holds"), (target, "symbolic link"),
                          (kept, "'my-notes.txt'"), (tmp_path / "file", "is a file")]:
        with pytest.raises(ValueError, match=match + ".*refused, nothing changed"):
            write_store(iter(TEXTS), tokenizer[0], folder, source={}, workers=1, progress=False)
    assert (user / "thesis.tex").read_text() == "years of work" and (user / "notes" / "a.txt").read_text() == "more"
    assert sorted(p.name for p in user.iterdir()) == ["notes", "thesis.tex"] and (kept / "my-notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "kept", "link", "mine"]  # no temporary left
    (tmp_path / "empty").mkdir()
    assert write_store(iter(TEXTS[:20]), tokenizer[0], tmp_path / "empty", source={}, workers=1,
                       progress=False).manifest.documents == 20


def test_prepare_into_a_users_folder_is_one_line_and_exit_2(tmp_path):
    """``python -m flaxformer_lite.run.prepare --out`` a folder of user files: one line on stderr (no runpy warning,
    no traceback), exit 2, the files untouched, before any corpus is read or tokenizer trained."""
    (tmp_path / "x.txt").write_text("mine")
    done = subprocess.run([sys.executable, "-m", "flaxformer_lite.run.prepare", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.splitlines() == [
        f"prepare: error: {tmp_path} is not a token store (1 entry that no token store holds, e.g. 'x.txt'): writing "
        "one there would delete them; refused, nothing changed. Name a new or empty folder"]
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"] and (tmp_path / "x.txt").read_text() == "mine"
    old_name = subprocess.run([sys.executable, "-m", "flaxformer_lite.data.prepare", "--out", str(tmp_path)],
                              capture_output=True, text=True, timeout=120)  # the command's name before it moved
    assert old_name.returncode == 2 and old_name.stderr.splitlines() == [
        "note: `python -m flaxformer_lite.data.prepare` is now `python -m flaxformer_lite.run.prepare`; this name goes "
        "in the next release", done.stderr.strip()]


def test_a_killed_writers_leftovers_are_swept_and_no_one_elses(store, tokenizer, tmp_path):
    """What a prepare killed on this host left beside the store (its temporary store, the replaced one, its
    tokenizer file) goes at the next write; a live process's, another host's, and a user's look-alike stay."""
    import socket
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    host = socket.gethostname()
    try:
        dead = [tmp_path / f"s.tmp-{host}-{gone}", tmp_path / f"s.old-{host}-{gone}"]
        dead_file = tmp_path / f"s.tokenizer-{host}-{gone}.model"
        kept = [tmp_path / f"s.tmp-{host}-{live.pid}", tmp_path / f"s.tmp-otherhost-{gone}", tmp_path / "s.tmp-mine"]
        for folder in dead + kept:
            folder.mkdir()
            (folder / "tokens.bin").write_bytes(b"x")
        dead_file.write_bytes(b"x")
        write_store(iter(TEXTS[:20]), tokenizer[0], tmp_path / "s", source={}, workers=1, progress=False)
        assert not any(p.exists() for p in dead + [dead_file]) and all(p.exists() for p in kept)
    finally:
        live.kill()
        live.wait()


def test_a_swapped_store_tokenizer_is_refused(tokenizer, tmp_path):
    """The store's tokenizer.model is checked against the manifest's hash before a run uses it."""
    from flaxformer_lite.data.prepare import store_tokenizer
    folder = tmp_path / "store"
    store = write_store(iter(TEXTS[:30]), tokenizer[0], folder, source={}, workers=1, progress=False,
                        extra_files={"tokenizer.model": tokenizer[0]})
    assert store_tokenizer(store).sha256 == tokenizer[1].sha256
    train_tokenizer(TEXTS, vocab_size=450).save(folder / "tokenizer.model")
    with pytest.raises(ValueError, match=r"tokenizer.model is not the tokenizer the store was written with"):
        store_tokenizer(TokenStore(folder))


def _flip(folder, positions, value=None):
    """Change the ids at ``positions`` of ``folder``'s tokens.bin in place (xor 1, or set to ``value``)."""
    ids = np.memmap(folder / "tokens.bin", np.uint16, "r+")
    ids[positions] = ids[positions] ^ 1 if value is None else value
    ids.flush()


def test_checksums_are_the_crc32_of_each_4kb_block_and_catch_a_flipped_id(store, tmp_path, capsys):
    """Each 2048-token block's CRC-32 (zlib over the file's own bytes) is kept; a flipped id is a one-line error
    when a read first touches its block, other blocks still read, and `verify` names the block (exit 1)."""
    import zlib

    from flaxformer_lite.data.verify import main as verify
    raw = (store.folder / "tokens.bin").read_bytes()
    assert len(raw) > 4 * 4096
    assert np.load(store.folder / "checksums.npy").tolist() == [zlib.crc32(raw[i:i + 4096])
                                                                 for i in range(0, len(raw), 4096)]
    assert verify([str(store.folder), "--quiet"]) == 0 and "intact" in capsys.readouterr().out
    copy = tmp_path / "copy"
    shutil.copytree(store.folder, copy)
    _flip(copy, [5000])
    damaged = TokenStore(copy)  # opening reads no token: O(1)
    np.testing.assert_array_equal(damaged.tokens[:4096], np.asarray(store.tokens)[:4096])
    with pytest.raises(ValueError, match=r"tokens.bin: tokens 4,096 to 6,144 do not match their checksum"):
        damaged.tokens[4000:4200]
    assert verify([str(copy), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "tokens 4,096 to 6,144" in err and len(err.strip().splitlines()) == 1
    (copy / "counts.npy").write_bytes((copy / "counts.npy").read_bytes()[:-8] + bytes(8))
    assert verify([str(copy), "--quiet"]) == 1 and "counts.npy does not match its checksum" in capsys.readouterr().err
    assert verify([str(tmp_path / "nothing"), "--quiet"]) == 2


def test_an_id_outside_the_vocabulary_is_named_by_verify_and_by_a_store_without_checksums(store, tmp_path,
                                                                                          capsys):
    """With a matching checksum an id is the tokenizer's; `verify` checks the range anyway, and a store written
    before checksums is checked for it as it is read."""
    import zlib

    from flaxformer_lite.data.verify import main as verify
    copy = tmp_path / "copy"
    shutil.copytree(store.folder, copy)
    _flip(copy, [100], value=store.manifest.vocab_size)
    sums = np.load(copy / "checksums.npy")
    sums[0] = zlib.crc32((copy / "tokens.bin").read_bytes()[:4096])
    np.save(copy / "checksums.npy", sums)
    want = rf"token 100 is id {store.manifest.vocab_size}, outside the store's vocabulary"
    assert verify([str(copy), "--quiet"]) == 1
    assert re.search(want, capsys.readouterr().err)
    _drop_checksums(copy)
    with pytest.raises(ValueError, match=want):
        TokenStore(copy).tokens[0:10]


def _drop_checksums(folder):
    """Make ``folder`` the store a version without checksums wrote (format 1)."""
    (folder / "checksums.npy").unlink()
    manifest = json.loads((folder / "manifest.json").read_text())
    for key in ("checksum_block", "file_crc32"):
        del manifest[key]
    (folder / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))


def test_a_store_written_before_checksums_still_reads(store, tmp_path, capsys):
    from flaxformer_lite.data.verify import main as verify
    copy = tmp_path / "copy"
    shutil.copytree(store.folder, copy)
    _drop_checksums(copy)
    np.testing.assert_array_equal(np.asarray(TokenStore(copy).tokens), np.asarray(store.tokens))
    assert verify([str(copy), "--quiet"]) == 1 and "written before stores kept checksums" in capsys.readouterr().err


def test_training_on_a_damaged_store_stops_in_one_line(corpus, tmp_path, capsys):
    from runs import overrides, train_cli

    from flaxformer_lite.run.prepare import main as prepare
    store = tmp_path / "store"
    assert prepare(["--out", str(store), f"data.path={corpus / 'docs.jsonl'}", "data.vocab_size=512"]) == 0
    _flip(store, slice(None))
    capsys.readouterr()
    assert train_cli.main(overrides(corpus, tmp_path / "run", steps=2, extra=[f"data.store={store}"])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "do not match their checksum" in err[0] and err[0].startswith("train.py: error:")


# -- what a user owns is never lost (issue 26): the corpus fingerprint, the manifest, a full disk -------------------
def _prepare(path, folder, **kwargs):
    from flaxformer_lite.data.prepare import prepare_store
    from flaxformer_lite.experiment import DataConfig
    return prepare_store(DataConfig(path=str(path), vocab_size=400), folder, progress=False, **kwargs)


def _text_file(folder, one_line=False):
    """TEXTS as a plain-text corpus: a paragraph each, or (``one_line``) all on one line, with no line break."""
    texts = [t for t in TEXTS if t.strip()]
    path = folder / "corpus.txt"
    path.write_text(" ".join(" ".join(t.split()) for t in texts) if one_line else "\n\n".join(texts) + "\n")
    return path


def test_a_corpus_edited_with_its_size_and_mtime_kept_is_noticed(tmp_path, monkeypatch):
    """The fingerprint holds a sample of each file's content: an edit that keeps the size and the modification time
    is a changed corpus (refused on resume, written again otherwise). A store whose manifest predates the sample
    (``[path, size, mtime]`` per file) is still reused while those agree."""
    from flaxformer_lite.data import corpus as corpus_module
    path, folder = _text_file(tmp_path), tmp_path / "store"
    store = _prepare(path, folder)
    written, before, raw = (folder / "tokens.bin").stat().st_mtime_ns, path.stat(), path.read_bytes()
    manifest = json.loads((folder / "manifest.json").read_text())
    old = {**manifest, "source": {**manifest["source"], "files": [f[:3] for f in manifest["source"]["files"]]}}
    (folder / "manifest.json").write_text(json.dumps(old))  # as a version without content samples wrote it
    assert _prepare(path, folder, refuse="the corpus changed").manifest.source == old["source"]
    assert (folder / "tokens.bin").stat().st_mtime_ns == written
    edited = raw.replace(b"Return", b"Eat me", 1)
    path.write_bytes(edited)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns) and edited != raw
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="^the corpus changed$"):
        _prepare(path, folder, refuse="the corpus changed")
    again = _prepare(path, folder)
    assert again.manifest.source["files"][0][3] != store.manifest.source["files"][0][3]
    monkeypatch.setattr(corpus_module, "_SAMPLE_WHOLE", 1000)  # a big file: 64 pieces and the tail are hashed
    sample = corpus_module.content_sample(str(path), len(edited))
    for at in (0, len(edited) - 1):
        path.write_bytes(edited[:at] + b"#" + edited[at + 1:])
        assert corpus_module.content_sample(str(path), len(edited)) != sample


def test_a_manifest_with_a_wrong_field_type_is_one_line(store, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(store.folder, copy)
    good = json.loads((copy / "manifest.json").read_text())
    for key, value, match in [("dtype", "float77", "dtype='float77': not one of uint16, uint32"),
                              ("tokens", "12", "tokens='12': not a count"), ("documents", True, "documents=True"),
                              ("vocab_size", 4.5, "vocab_size=4.5"), ("tokens", -1, "tokens=-1"),
                              ("source", "x", "source='x': not a dict"), ("tokenizer_sha256", 7, "not a str")]:
        (copy / "manifest.json").write_text(json.dumps({**good, key: value}))
        with pytest.raises(ValueError, match=re.escape(match)) as err:
            TokenStore(copy)
        assert "not a token store manifest" in str(err.value) and str(err.value).endswith("; prepare it again")
        assert "\n" not in str(err.value)
    (copy / "manifest.json").write_text(json.dumps(good))
    assert TokenStore(copy).manifest.tokens == store.manifest.tokens


def _full_disk(*args, **kwargs):
    import errno
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_while_the_tokenizer_is_written_keeps_the_old_file(tokenizer, tmp_path, monkeypatch):
    path = tmp_path / "t.model"
    path.write_bytes(b"the old tokenizer")
    monkeypatch.setattr(os, "fsync", _full_disk)  # inside safe_io.write_atomic, after the bytes went out
    with pytest.raises(ValueError, match=rf"^could not write the tokenizer {re.escape(str(path))} \(No space left on "
                                         r"device\); free some space"):
        tokenizer[1].save(path)
    assert path.read_bytes() == b"the old tokenizer" and [p.name for p in tmp_path.iterdir()] == ["t.model"]


def test_a_full_disk_while_prepare_writes_its_tokenizer_is_one_line(tmp_path, monkeypatch):
    from pathlib import Path
    path, folder = _text_file(tmp_path), tmp_path / "store"
    written = _prepare(path, folder).manifest
    path.write_text(path.read_text() + "\nOne more paragraph.\n")
    plain = Path.write_bytes
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: _full_disk() if ".tokenizer-" in self.name
                        else plain(self, data))
    with pytest.raises(ValueError, match=r"^could not write the tokenizer file .*store\.tokenizer-.*\.model \(No "
                                         r"space left on device\); .*nothing else was changed$"):
        _prepare(path, folder)
    assert TokenStore(folder).manifest == written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "store"]


def test_a_one_line_text_file_is_prepared(tmp_path, monkeypatch):
    """A plain-text corpus with no line break (one document, longer than the lines SentencePiece trains on) makes
    a tokenizer and a store; a killed writer's leftovers are swept once per prepare."""
    from flaxformer_lite.data import prepare as prepare_module
    from flaxformer_lite.data import store as store_module
    from flaxformer_lite.data.prepare import store_tokenizer
    path = _text_file(tmp_path, one_line=True)
    assert "\n" not in path.read_text() and path.stat().st_size > 10 * 4192
    sweeps = []
    for module in (prepare_module, store_module):
        monkeypatch.setattr(module, "sweep_leftovers", lambda folder: sweeps.append(folder) or [])
    store = _prepare(path, tmp_path / "store")
    assert store.num_documents == 1 and sweeps == [tmp_path / "store"]
    tok = store_tokenizer(store)
    assert tok.decode(store.document(0)) == path.read_text()
