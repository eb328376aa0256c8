"""Every shipped ``configs/*.yaml`` trains two steps through train.py's command, shrunk to a tiny model, batch and
sequence (one of them, gpt-tiny-deltanet, once hung in its first steps). Only sizes change: the objective,
model family, attention, optimizer, schedule, dtype and mesh are the config's own (the run's config.yaml is checked
for some)."""
import math

import pytest
import yaml
from runs import ROOT, losses, train_cli, write_corpus

from flaxformer_lite.training import read_metrics

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
TINY = ["model.num_layers=1", "model.embed_dim=32", "model.num_heads=4", "model.mlp_dim=64", "model.max_len=32",
        "data.vocab_size=384", "train.steps=2", "train.batch_size=8", "train.seq_len=16", "train.log_every=1",
        "train.eval_every=0", "train.samples=0", "train.progress=false"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus")) / "docs.jsonl"


def test_configs_are_found():
    assert len(CONFIGS) >= 10, CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_trains_two_steps(path, corpus, tmp_path):
    args = ["--config", str(path), *TINY, f"data.path={corpus}", f"train.run_dir={tmp_path}"]
    assert train_cli.main(args) == 0
    got = losses(tmp_path)
    assert len(got) == 2 and all(math.isfinite(x) for x in got), got
    shipped, ran = (yaml.safe_load(p.read_text()) for p in (path, tmp_path / "config.yaml"))
    for section, key in (("data", "objective"), ("model", "attention"), ("model", "dtype"), ("optim", "schedule")):
        if key in shipped.get(section, {}):  # what the config chose is what ran
            assert ran[section][key] == shipped[section][key], (section, key)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r] == [1, 2]
