"""Data: corpora through datasets, the built-in corpus, tokenizers (incl. a byte-exact Chinese round trip), packing
never crossing documents, MLM/NSP statistics, span corruption, and the deterministic, host-sharded loader."""
import json
import re
from pathlib import Path

import datasets
import numpy as np
import pytest

from flaxformer_lite.data import (Loader, Tokenizer, load_corpus, pack_documents, special_ids, stdlib_docstrings,
                                  train_tokenizer)
from flaxformer_lite.data.objectives import bert_mlm_nsp, causal_lm, span_corruption, span_lengths

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


@pytest.fixture(scope="module")
def corpus():
    return list(load_corpus()["text"])


@pytest.fixture(scope="module")
def tok(corpus):
    return train_tokenizer(corpus, vocab_size=1024)


def test_builtin_corpus_is_real_text(corpus):
    size = stdlib_docstrings().stat().st_size
    assert 1_000_000 < size < 4_000_000 and len(corpus) > 3000
    assert any("Return" in t for t in corpus[:200])


def test_local_formats_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\nsecond paragraph\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "x y"}) + "\n" + json.dumps({"body": "z"}) + "\n")
    (tmp_path / "c.csv").write_text("text,label\nhello,1\nworld,0\n")
    assert len(load_corpus(str(tmp_path / "a.txt"))) == 2
    assert list(load_corpus(str(tmp_path / "b.jsonl"), text_field="body")["text"]) == ["x y", "z"]
    assert list(load_corpus(str(tmp_path / "*.csv"))["text"]) == ["hello", "world"]
    datasets.Dataset.from_dict({"text": ["saved one", "saved two"]}).save_to_disk(str(tmp_path / "saved"))
    assert len(load_corpus(str(tmp_path / "saved"))) == 2
    datasets.Dataset.from_dict({"text": ["p"]}).to_parquet(str(tmp_path / "d.parquet"))
    assert list(load_corpus(str(tmp_path / "d.parquet"))["text"]) == ["p"]
    with pytest.raises(ValueError, match="no such file"):
        load_corpus(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="text_field 'nope'"):
        load_corpus(str(tmp_path / "b.jsonl"), text_field="nope")


def test_tokenizer_specials_save_load(tok, tmp_path, corpus):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert len({tok.mask_id, tok.cls_id, tok.sep_id, *tok.sentinel_ids}) == 35
    text = corpus[10]
    again = Tokenizer.load(tok.save(tmp_path / "t.model"))
    assert again.encode(text) == tok.encode(text) and again.vocab_size == tok.vocab_size
    assert tok.decode(tok.encode("Return the value.")) == "Return the value."
    with pytest.raises(ValueError, match="vocab_size must exceed"):
        train_tokenizer(corpus[:50], vocab_size=20)
    with pytest.raises(ValueError, match="no such file"):
        Tokenizer.load(tmp_path / "nope.model")
    (tmp_path / "junk.model").write_text("not a model")
    with pytest.raises(ValueError, match="junk.model is not a SentencePiece model"):
        Tokenizer.load(tmp_path / "junk.model")
    with pytest.raises(ValueError, match=rf"id {tok.vocab_size} is outside the vocabulary \[0, {tok.vocab_size}\)"):
        tok.decode([5, tok.vocab_size])


def _build_mlm(seq_len):
    from flaxformer_lite.experiment import DataConfig
    from flaxformer_lite.data import build_data
    build_data(DataConfig(path="unread.txt", objective="mlm"), seq_len=seq_len, batch_size=8, seed=0)


@pytest.mark.parametrize("call,match", [
    (lambda: train_tokenizer(["a b c"], vocab_size="100"), "vocab_size must exceed 41 .* got '100'"),
    (lambda: train_tokenizer(["a b c"], character_coverage=0.9), r"character_coverage .* \[0.98, 1\]"),
    (lambda: train_tokenizer(["", " \n"]), "corpus is empty"),
    (lambda: _build_mlm(3), "train.seq_len must be at least 11"),
    (lambda: _build_mlm(10), "train.seq_len must be at least 11"),
], ids=["vocab_str", "coverage", "empty_corpus", "mlm_seq_len_3", "mlm_seq_len_10"])
def test_bad_arguments_raise_before_any_work(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.skipif(not (SHARED / "zh_classics.txt").exists(), reason="needs ../shared/data")
def test_chinese_round_trip_is_byte_exact():
    text = (SHARED / "zh_classics.txt").read_text(encoding="utf-8")
    tz = train_tokenizer([text], vocab_size=4000, character_coverage=0.98, byte_fallback=True,
                         normalization="identity")
    lines = [line for line in text.splitlines() if line]
    assert all(tz.decode(tz.encode(line)) == line for line in lines)
    with pytest.raises(ValueError, match="too small for character_coverage"):
        train_tokenizer([text], vocab_size=4000, character_coverage=1.0, normalization="identity")


def test_packing_never_crosses_documents():
    docs = [list(range(10, 10 + n)) for n in (3, 9, 1, 14, 5, 6)]
    rows, segs = pack_documents(docs, 8, eos_id=3)
    stream = [t for d in docs for t in d + [3]]
    np.testing.assert_array_equal(rows.reshape(-1), stream[:rows.size])
    batch = causal_lm(rows, segs)
    # a target is scored only if it continues the same document as its input token
    doc_of = np.repeat(np.arange(len(docs)), [len(d) + 1 for d in docs])[:rows.size].reshape(rows.shape)
    same_doc = doc_of[:, 1:] == doc_of[:, :-1]
    np.testing.assert_array_equal(batch["loss_mask"] > 0, same_doc)
    assert (segs[:, 0] == 1).all()


def test_mlm_masking_statistics(tok, corpus):
    ids = special_ids(tok)
    chunks = [c[:120] for c in tok.encode_batch(corpus[:400]) if len(c) >= 8]
    rngs = [np.random.default_rng(i) for i in range(len(chunks))]
    b = bert_mlm_nsp(chunks, np.arange(len(chunks)), rngs, 128, ids, 0.15)
    eligible = b["padding_mask"] & ~np.isin(b["mlm_targets"], list(ids.special))
    masked = b["mlm_mask"] > 0
    assert not (masked & ~eligible).any()  # never a special token or padding
    assert abs(masked.sum() / eligible.sum() - 0.15) < 0.01
    as_mask = (b["tokens"] == ids.mask) & masked
    kept = (b["tokens"] == b["mlm_targets"]) & masked
    assert abs(as_mask.sum() / masked.sum() - 0.8) < 0.02
    assert abs(kept.sum() / masked.sum() - 0.1) < 0.02  # (a random token equal to the original counts as kept)
    assert abs(b["nsp_labels"].mean() - 0.5) < 4 * 0.5 / np.sqrt(len(chunks))  # 4 sigma of a fair coin
    first_sep = np.argmax(b["tokens"] == ids.sep, 1)
    assert (b["token_type_ids"][np.arange(len(first_sep)), first_sep] == 0).all()
    assert (b["tokens"][:, 0] == ids.cls).all()


def test_span_corruption_is_invertible(tok):
    ids = special_ids(tok)
    rows = np.random.default_rng(0).integers(40, 1000, (16, 64)).astype(np.int32)
    b = span_corruption(rows, [np.random.default_rng(i) for i in range(16)], ids, 0.15, 3.0)
    noise, spans = span_lengths(64, 0.15, 3.0)
    assert b["tgt"].shape == (16, noise + spans + 1) and (b["tgt_in"][:, 0] == ids.bos).all()
    sentinel = {s: k for k, s in enumerate(ids.sentinels)}
    for r in range(16):
        pieces, current = {}, None
        for t in b["tgt"][r][b["tgt_mask"][r] > 0]:
            if t in sentinel:
                current = sentinel[t]
                pieces[current] = []
            elif t != ids.eos:
                pieces[current].append(t)
        rebuilt = []
        for t in b["src"][r][b["src_padding_mask"][r]]:
            rebuilt += pieces[sentinel[t]] if t in sentinel else [t]
        np.testing.assert_array_equal(rebuilt, rows[r])


def _pool_batch(idx, rngs):
    return {"idx": np.asarray(idx), "noise": np.array([g.integers(1 << 30) for g in rngs])}


def test_loader_is_deterministic_global_and_covers_epochs():
    one = Loader(10, 4, _pool_batch, seed=3)
    again = Loader(10, 4, _pool_batch, seed=3)
    for step in (0, 7):
        for key in ("idx", "noise"):
            np.testing.assert_array_equal(one.batch(step)[key], again.batch(step)[key])
    halves = [Loader(10, 4, _pool_batch, seed=3, process_index=p, process_count=2) for p in (0, 1)]
    for step in (0, 5):  # two processes, each building its rows, make the one-process batch
        for key in ("idx", "noise"):
            np.testing.assert_array_equal(np.concatenate([h.batch(step)[key] for h in halves]), one.batch(step)[key])
    seen = np.concatenate([Loader(12, 4, _pool_batch, seed=1).batch(s)["idx"] for s in range(3)])
    assert sorted(seen) == list(range(12))  # one epoch = every example once
    assert not np.array_equal(one.batch(1)["idx"], one.batch(2)["idx"])
    with pytest.raises(ValueError, match="no examples"):
        Loader(0, 4, _pool_batch)
    with pytest.raises(ValueError, match="multiple of the process count"):
        Loader(10, 5, _pool_batch, process_count=2)


def test_sharded_loader_slices_make_the_single_process_batch(tmp_path, corpus):
    from flaxformer_lite.experiment import DataConfig
    from flaxformer_lite.data import build_data
    texts = corpus[:120]  # real prose: a synthetic text of digits supports at most 314 pieces, not 400
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = DataConfig(path=str(tmp_path / "docs.jsonl"), vocab_size=400, shards=4)
    build = lambda p, n: build_data(cfg, seq_len=16, batch_size=8, seed=0, process_index=p,
                                    process_count=n)
    single = build(0, 1)
    halves = [build(p, 2) for p in (0, 1)]
    assert sum(h.num_train_examples for h in halves) == single.num_train_examples
    assert all(h.num_train_examples < single.num_train_examples for h in halves)  # each reads only its shards
    for step in (0, 3):
        for key, value in single.train.batch(step).items():
            np.testing.assert_array_equal(np.concatenate([h.train.batch(step)[key] for h in halves]), value)
    with pytest.raises(ValueError, match="data.shards"):
        build_data(DataConfig(path=str(tmp_path / "docs.jsonl"), vocab_size=400, shards=3), seq_len=16,
                   batch_size=8, seed=0, process_index=0, process_count=2)


# ----------------------------------------------------------------------------------------------------------------------
# Data faults: a one-line ValueError naming data.path (or data.vocab_size) and the fault, never a traceback or a silent
# change (train.py prints it as `train.py: error: ...`). Covers corpus.py, tokenizer.py and hf_tokenizer.py.
# ----------------------------------------------------------------------------------------------------------------------

_PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89"
_ROWS = "".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(6))
BAD_FILES = {  # name: (content, what the message must say)
    "empty.txt": (b"", "the file is empty"),
    "empty.csv": (b"", "the file is empty"),
    "empty.jsonl": (b"", "the file is empty"),
    "blank.txt": (b"\n  \n\n", r"no text \(field 'text' is blank in every row\)"),
    "random.txt": (np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes(), "a binary file"),
    "latin1.txt": ("fine\ncaf\u00e9\n".encode("latin-1"), r"line 2 is not UTF-8 text \(byte 0xe9"),
    "image.txt": (_PNG, "a binary file, not UTF-8 text"),
    "torn.jsonl": ((_ROWS + '{"text": "cut sho').encode(), r"line 7 is not valid JSON \(torn last line\?\)"),
    "bad_line.jsonl": (("{\"text\": \"ok\"}\n{oops}\n" + _ROWS).encode(), r"line 2 is not valid JSON \(Expecting"),
    "nulls.jsonl": (b'{"text": "a"}\n{"text": null}\n{"other": 1}\n{"text": "b"}\n',
                    r"2 of 4 rows have no text in field 'text' \(first: row 2\)"),
    "numbers.jsonl": (b'{"text": 5}\n{"text": 7}\n', "field 'text' holds .*int64.*, not strings"),
    "header.csv": (b"text,label\n", "no rows"),
    "gaps.csv": (b"text,label\nhello,1\n,0\n", r"1 of 2 rows have no text in field 'text' \(first: row 2\)"),
    "fake.parquet": (b"hello", "not a Parquet file"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_data_file_is_a_one_line_error_naming_it(tmp_path, name):
    content, match = BAD_FILES[name]
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=match) as err:
        load_corpus(str(tmp_path / name))
    assert str(err.value).startswith(f"data.path={tmp_path / name}: ") and "\n" not in str(err.value)


def test_bad_file_in_a_glob_is_named(tmp_path):
    (tmp_path / "a.jsonl").write_text(_ROWS)
    (tmp_path / "b.jsonl").write_text(_ROWS + '{"text": "cu')
    with pytest.raises(ValueError, match=r"\*\.jsonl \(file .*b\.jsonl\): line 7 is not valid JSON \(torn"):
        load_corpus(str(tmp_path / "*.jsonl"))


def test_missing_path_is_not_sent_to_the_hub_unless_named_owner_slash_name(tmp_path, monkeypatch):
    asked = []

    def offline_hub(name, *args, **kwargs):
        asked.append(name)
        raise ConnectionError(f"Couldn't reach {name!r} on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline_hub)
    monkeypatch.chdir(tmp_path)
    for path, match in [(str(tmp_path / "missing"), "no such file or directory"),
                        ("corpus", r"data.path=corpus: no such file or directory \(a Hub dataset name has the form "
                                   "owner/name"),
                        (str(tmp_path / "*.jsonl"), "no file matches this pattern"),
                        ("shards/part-*", "no file matches this pattern")]:
        with pytest.raises(ValueError, match=match):
            load_corpus(path)
    assert asked == []  # a bare word or a pattern is a path, never a Hub name
    with pytest.raises(ValueError, match=r"data.path=owner/name: no such file or directory, and not a loadable Hub "
                                         r"dataset \(ConnectionError: Couldn't reach"):
        load_corpus("owner/name")
    assert asked == ["owner/name"]


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_oversized_vocab_size_is_refused_not_clamped(corpus, model_type):
    texts = corpus[:20]
    with pytest.raises(ValueError, match=rf"data.vocab_size=1000000 is more than this text supports: SentencePiece "
                                         rf"\({model_type}\) finds at most (\d+) pieces") as err:
        train_tokenizer(texts, vocab_size=1_000_000, model_type=model_type)
    most = int(str(err.value).split("at most ")[1].split()[0])
    assert train_tokenizer(texts, vocab_size=most, model_type=model_type).vocab_size == most  # the quoted size works


def test_char_tokenizer_has_one_piece_per_character(corpus):
    text = "First Citizen:\nBefore we proceed any further, hear me speak."
    tok = train_tokenizer([text], vocab_size=300, model_type="char", byte_fallback=False, normalization="identity",
                          character_coverage=1.0)  # vocab_size is an upper bound for characters
    chars = set(text) - {" ", "\n"}
    assert all(tok.sp.piece_to_id(c) != tok.unk_id for c in chars)
    ids = tok.encode("hear me")
    assert [tok.sp.id_to_piece(i) for i in ids] == ["▁", "h", "e", "a", "r", "▁", "m", "e"]
    assert tok.decode(tok.encode(text)) == text
    with pytest.raises(ValueError, match=r"tokenizer_type must be one of \('unigram', 'bpe', 'char'\), got 'word'"):
        train_tokenizer([text], model_type="word")


def test_tokenizer_refuses_a_text_that_is_not_a_string():
    for texts, index in ((["a b c", None], 1), ([None, "a"], 0)):
        with pytest.raises(ValueError, match=rf"text {index} is NoneType, not str \(a row with no text\?\)"):
            train_tokenizer(texts, vocab_size=300)


def test_hf_tokenizer_folder_errors_are_one_line(tmp_path):
    from flaxformer_lite.data.hf_tokenizer import HFTokenizer
    with pytest.raises(ValueError, match="no such folder"):
        HFTokenizer.from_folder(tmp_path / "nowhere")  # not taken for a Hub repository id
    pytest.importorskip("transformers")
    with pytest.raises(ValueError, match="no usable tokenizer files") as err:
        HFTokenizer.from_folder(tmp_path)
    assert "\n" not in str(err.value)


def test_line_breaks_survive_every_normalization():
    text = ["First line of a play.\nSecond line:\n\n  indented after a blank line.", "Code: x = 1\ny = 2"] * 20
    for normalization in ("nmt_nfkc", "identity"):
        tok = train_tokenizer(text, vocab_size=70, byte_fallback=False, normalization=normalization)
        for t in ("a\nb", "Second line:\n\nFirst", "x = 1\r\ny = 2"):
            ids = tok.encode(t)
            assert tok.newline_id in ids
            assert tok.decode(ids) == t.replace("\r\n", "\n")


def test_a_vocab_size_too_small_for_byte_fallback_names_it():
    with pytest.raises(ValueError, match=r"vocab_size 96 is too small for byte_fallback: its 256 byte pieces"):
        train_tokenizer(["some text"] * 10, vocab_size=96)


def test_plain_text_is_read_by_paragraph_document_or_line(tmp_path):
    path = tmp_path / "play.txt"
    path.write_text("ACT I\nScene one.\n\nEnter a king.\nHe speaks.\n\nExit.\n")
    rows = {unit: list(load_corpus(str(path), text_unit=unit)["text"]) for unit in ("paragraph", "document", "line")}
    assert [t.strip() for t in rows["paragraph"]] == ["ACT I\nScene one.", "Enter a king.\nHe speaks.", "Exit."]
    assert len(rows["document"]) == 1 and "Scene one.\n\nEnter a king." in rows["document"][0]
    assert [t for t in rows["line"] if t.strip()] == ["ACT I", "Scene one.", "Enter a king.", "He speaks.", "Exit."]
    with pytest.raises(ValueError, match="data.text_unit must be one of"):
        load_corpus(str(path), text_unit="sentence")


def test_a_looping_or_dangling_link_in_a_glob_is_named(tmp_path):
    """A glob that matches a symbolic link to itself or to nothing: one line naming the matched file, both when the
    corpus is fingerprinted (prepare, resume) and when it is read."""
    from flaxformer_lite.data.corpus import source_fingerprint
    for name, target, match in [("loop", "loop.txt", "a symbolic link that loops"),
                                ("dangling", "gone.txt", "a symbolic link to '.*gone.txt', which does not exist")]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "a.txt").write_text("some text\n")
        (folder / "loop.txt").symlink_to(folder / target)
        pattern = str(folder / "*.txt")
        for read in (source_fingerprint, load_corpus):
            with pytest.raises(ValueError, match=rf"^data.path={re.escape(pattern)} \(file {re.escape(str(folder))}"
                                                 rf"/loop.txt\): {match}") as err:
                read(pattern)
            assert "\n" not in str(err.value)
