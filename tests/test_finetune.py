"""Fine-tuning: classification rows ([CLS] A [SEP] B [SEP], longest-first truncation), label vocabularies, grafting
pretrained weights, and train.py with ``train.init_from`` from our own pre-training run (accuracy on a learnable
task) and from a Hugging Face BERT folder (the backbone starts exactly at the imported weights)."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from flaxformer_lite.data.objectives import SpecialIds, classification
from flaxformer_lite.data.pipeline import label_vocabulary
from flaxformer_lite.pretrained import graft, load_pretrained
from flaxformer_lite.training import Checkpoints, read_metrics
from reference import assert_same_tree

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("train_cli_ft", ROOT / "train.py")
train_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_cli)

IDS = SpecialIds(pad=0, bos=2, eos=3, cls=5, sep=6)
WORDS = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "paper", "light", "green", "table", "music"]
LOOP = ["train.log_every=5", "train.checkpoint_every=1000", "train.progress=false", "train.samples=0",
        "train.seq_len=24", "train.batch_size=16", "data.eval_fraction=0.2", "train.eval_batches=3"]


def test_classification_rows():
    batch = classification([([10, 11, 12], [20, 21], 1), ([10, 11, 12, 13, 14, 15], [20, 21, 22, 23], 0),
                            ([7], None, 2)], 10, IDS)
    np.testing.assert_array_equal(batch["tokens"], [[5, 10, 11, 12, 6, 20, 21, 6, 0, 0],
                                                    [5, 10, 11, 12, 13, 6, 20, 21, 22, 6],  # longer side trimmed first
                                                    [5, 7, 6, 0, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["token_type_ids"][0], [0, 0, 0, 0, 0, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(batch["padding_mask"].sum(1), [8, 10, 3])
    np.testing.assert_array_equal(batch["labels"], [1, 0, 2])


def _longest_first(a, b, budget):
    """Hugging Face's rule, one token at a time: drop from the longer side, from the pair on ties."""
    a, b = list(a), list(b)
    while len(a) + len(b) > budget:
        (a if len(a) > len(b) else b).pop()
    return a, b


def test_truncation_equals_one_at_a_time_rule():
    rng = np.random.default_rng(1)
    for _ in range(200):
        a, b = list(range(rng.integers(0, 30))), list(range(100, 100 + rng.integers(0, 30)))
        length = int(rng.integers(4, 40))
        row = classification([(a, b, 0)], length, IDS)
        want_a, want_b = _longest_first(a, b, length - 3)
        want = [5, *want_a, 6, *want_b, 6]
        np.testing.assert_array_equal(row["tokens"][0, :len(want)], want)
        assert row["padding_mask"][0].sum() == len(want)
    with pytest.raises(ValueError, match="seq_len >= 4"):
        classification([([1], None, 0)], 3, IDS)


def test_label_vocabulary():
    assert label_vocabulary([10, 2, 2, 1]) == ["1", "2", "10"]
    assert label_vocabulary(["neg", "pos", "neg"]) == ["neg", "pos"]
    with pytest.raises(ValueError, match="no labels"):
        label_vocabulary([])


def test_graft_takes_matching_weights_and_checks_the_rest():
    params = {"backbone": {"a": {"kernel": np.zeros((2, 3), np.float32)}}, "classifier": {"bias": np.zeros(2)}}
    pretrained = {"a": {"kernel": np.ones((2, 3))}, "mlm_head": {"bias": np.ones(5)}}
    out = graft(params, pretrained)
    np.testing.assert_array_equal(out["backbone"]["a"]["kernel"], np.ones((2, 3)))
    assert out["backbone"]["a"]["kernel"].dtype == np.float32 and "mlm_head" not in out["backbone"]
    np.testing.assert_array_equal(out["classifier"]["bias"], np.zeros(2))
    with pytest.raises(ValueError, match="lack 1 parameters.*a/kernel"):
        graft(params, {"b": {"kernel": np.ones((2, 3))}})
    with pytest.raises(ValueError, match="shape"):
        graft(params, {"a": {"kernel": np.ones((3, 2))}})
    with pytest.raises(ValueError, match="neither a Hugging Face"):
        load_pretrained(ROOT / "configs")


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """A learnable task: the label is the text's first word (good/bad); the pair is noise."""
    folder = tmp_path_factory.mktemp("classify")
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(240):
        first = str(rng.choice(["good", "bad"]))
        rows.append({"text": f"{first} " + " ".join(rng.choice(WORDS, 6)), "pair": " ".join(rng.choice(WORDS, 4)),
                     "label": "positive" if first == "good" else "negative"})
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _run_metrics(run_dir):
    return read_metrics(Path(run_dir) / "metrics.jsonl")


def test_finetune_from_our_pretraining_run(texts, tmp_path):
    pre, fine = tmp_path / "pre", tmp_path / "fine"
    common = [f"data.path={texts / 'train.jsonl'}", *LOOP]
    assert train_cli.main(["model.preset=bert-tiny", "model.num_layers=2", "model.embed_dim=64", "model.num_heads=4",
                           "model.mlp_dim=128", "model.max_len=32", "data.objective=mlm", "data.vocab_size=320",
                           "train.steps=3", "train.eval_every=0", f"train.run_dir={pre}", *common]) == 0
    assert train_cli.main(["data.objective=classify", "data.text_pair_field=pair", f"train.init_from={pre}",
                           "train.steps=40", "train.eval_every=40", "optim.lr=2e-3", "optim.warmup_steps=5",
                           "model.dropout_rate=0.0", "model.num_layers=5",  # the second changes the architecture
                           f"train.run_dir={fine}", *common]) == 0
    assert json.loads((fine / "labels.json").read_text()) == ["negative", "positive"]
    model_cfg = yaml.safe_load((fine / "config.yaml").read_text())["model"]
    assert model_cfg["num_layers"] == 2 and model_cfg["dropout_rate"] == 0.0
    again = load_pretrained(fine)  # a fine-tuned folder is itself a starting point: its backbone, its tokenizer
    assert "classifier" not in again.params and "embedder" in again.params
    assert again.tokenizer.vocab_size == load_pretrained(pre).tokenizer.vocab_size
    records = _run_metrics(fine)
    assert "accuracy" in records[0]
    assert [r["eval_accuracy"] for r in records if "eval_accuracy" in r][-1] >= 0.9


def test_finetune_from_hugging_face_folder_starts_at_its_weights(texts, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = tmp_path / "hf"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", *WORDS]
    hf.mkdir()
    (hf / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(str(hf / "vocab.txt")).save_pretrained(hf)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    transformers.BertForPreTraining(config).save_pretrained(hf)
    run = tmp_path / "run"
    # lr 0: after one step the saved backbone must still be exactly the imported weights
    assert train_cli.main([f"data.path={texts / 'train.jsonl'}", "data.objective=classify", f"train.init_from={hf}",
                           "train.steps=1", "optim.lr=0.0", "optim.weight_decay=0.0", "train.eval_every=1",
                           f"train.run_dir={run}", *LOOP]) == 0
    ckpt = Checkpoints(run / "checkpoints")
    params, _ = ckpt.restore_params()
    ckpt.close()
    want = load_pretrained(hf).params
    heads = {"mlm_transform", "mlm_norm", "nsp"}  # the pre-training heads a classifier never calls (mlm_bias, a
    # bare param of BERT.setup, is made all the same)
    assert set(want) - set(params["backbone"]) == heads
    assert_same_tree(params["backbone"], {name: tree for name, tree in want.items() if name not in heads})
    assert any("eval_accuracy" in r for r in _run_metrics(run))
    assert (run / "tokenizer" / "tokenizer.json").is_file()  # the HF tokenizer travels with the run
