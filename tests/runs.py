"""Shared by the tests that run train.py: its command (`flaxformer_lite.run`), a tiny model's overrides, a small
real corpus written once per test module, and reading the losses back."""
from __future__ import annotations

import json
from pathlib import Path

import flaxformer_lite.run
from flaxformer_lite.data import load_corpus
from flaxformer_lite.training import read_metrics

ROOT = Path(__file__).resolve().parent.parent
train_cli = flaxformer_lite.run  # train.py's command: ``train_cli.main(args)`` -> exit status

TINY_MODEL = ["model.num_layers=2", "model.embed_dim=64", "model.num_heads=4", "model.mlp_dim=128",
              "model.max_len=64", "model.dropout_rate=0.0", "model.attention_dropout_rate=0.0"]
PRESET = {"causal_lm": "gpt-tiny", "prefix_lm": "gpt-tiny", "mlm": "bert-tiny", "span_corruption": "transformer-tiny",
          "seq2seq": "transformer-tiny"}


def write_corpus(folder: Path) -> Path:
    """A small real corpus (400 stdlib docstrings) and a source/target JSONL (reverse the words) in ``folder``."""
    texts = list(load_corpus()["text"])[:400]
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    pairs = [" ".join(t.split()[:12]) for t in texts]
    (folder / "pairs.jsonl").write_text("".join(json.dumps({"source": p, "target": " ".join(p.split()[::-1])}) + "\n"
                                                for p in pairs))
    return folder


def overrides(corpus, run_dir, objective="causal_lm", steps=30, extra=()):
    """train.py arguments for a tiny model on ``corpus`` writing ``run_dir``."""
    path = corpus / ("pairs.jsonl" if objective == "seq2seq" else "docs.jsonl")
    return [f"model.preset={PRESET[objective]}", *TINY_MODEL, f"data.path={path}", f"data.objective={objective}",
            "data.vocab_size=512", "train.seq_len=32", "train.batch_size=8", f"train.steps={steps}",
            "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=1000", "train.progress=false",
            "train.samples=0", f"train.run_dir={run_dir}", "optim.lr=3e-3", "optim.warmup_steps=5", *extra]


def losses(run_dir):
    """The logged training losses of a run, step by step."""
    return [r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r]
