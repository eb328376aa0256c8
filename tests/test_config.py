"""Experiment config: YAML + dotted overrides, type checks, unknown keys listing the valid ones, --help, and the CLI
failing before any work on a bad key or value."""
import subprocess
import sys
from pathlib import Path

import pytest

from flaxformer_lite.experiment import describe_keys, load_config, parse_overrides

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_and_every_shipped_config_load():
    cfg = load_config()
    assert cfg.model.model == "gpt" and cfg.data.path == "" and cfg.parallel.mode == "jit"
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  preset: bert-tiny\n  num_layers: 3\ntrain:\n  steps: 7\n")
    cfg = load_config(path, ["train.steps=9", "optim.lr=1e-4", "model.attention=linear", "train.progress=false"])
    assert (cfg.model.model, cfg.model.num_layers, cfg.model.embed_dim) == ("bert", 3, 128)  # preset + override
    assert cfg.train.steps == 9 and cfg.optim.lr == 1e-4 and cfg.model.attention == "linear"
    assert cfg.train.progress is False
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": "1", "c": "x"}}  # read by each field's type


def test_path_keys_expand_the_home_folder():
    import os
    cfg = load_config(None, ["train.run_dir=~/runs/x", "data.path=~/corpus.txt", "data.text_field=~x"])
    assert (cfg.train.run_dir, cfg.data.path) == (os.path.expanduser("~/runs/x"), os.path.expanduser("~/corpus.txt"))
    assert cfg.data.text_field == "~x"  # not a path


def test_string_overrides_are_taken_as_typed():
    """A str field takes the text after ``=`` as it is: YAML would cut ``exp #3`` at its comment and read ``2024``
    and ``on`` as an int and a bool. Other fields still read YAML (numbers, booleans, null)."""
    cfg = load_config(None, ["train.run_dir=runs/exp #3", "data.path=2024", "data.eval_path=on",
                             "train.steps=12", "optim.lr=3e-4", "train.progress=false"])
    assert (cfg.train.run_dir, cfg.data.path, cfg.data.eval_path) == ("runs/exp #3", "2024", "on")
    assert cfg.train.steps == 12 and cfg.optim.lr == 3e-4 and cfg.train.progress is False


@pytest.mark.parametrize("override,match", [
    ("train.stepz=3", r"unknown config key train.stepz; valid keys under train.: \[.*'steps'"),
    ("nope.x=1", "unknown config key nope"),
    ("train.steps=ten", "train.steps must be int"),
    ("train.steps=1.5", "train.steps must be int"),
    ("optim.schedule=linear", r"optim.schedule must be one of \['cosine', 'noam', 'constant'\]"),
    ("parallel.mode=pmapp", "parallel.mode must be one of"),
    ("model.activation=tanhh", "activation must be one of"),
    ("model.preset=gpt5", "unknown preset"),
    ("train.steps", "must look like key.sub=value"),
    ("data.objective=clm", "data.objective must be one of"),
    ("train.keep_checkpoints=0", r"train.keep_checkpoints must be in \[1, inf\), got 0"),
    ("optim.lr=-1", r"optim.lr must be in \[0, inf\), got -1.0"),
    ("data.eval_fraction=1.5", r"data.eval_fraction must be in \[0, 1\)"),
    ("optim.b2=nan", r"optim.b2 must be in \[0, 1\), got nan"),
    ("train.steps=[x", r"override train.steps=\[x: the value is not valid YAML"),
])
def test_bad_values_fail_listing_choices(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


def test_describe_keys_covers_the_documented_contract():
    keys = {k for k, _, _ in describe_keys()}
    assert {"train.steps", "train.batch_size", "train.seq_len", "train.log_every", "train.checkpoint_every",
            "train.run_dir", "train.seed", "data.path", "parallel.mode", "parallel.mesh", "distributed.coordinator",
            "distributed.num_processes", "distributed.process_id", "model.preset", "model.attention"} <= keys


def test_cli_help_and_errors(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "train.py"), *a], capture_output=True, text=True,
                                    timeout=120, cwd=tmp_path)
    out = run("--help")
    assert out.returncode == 0 and "train.steps" in out.stdout and "parallel.mesh" in out.stdout
    bad = run("train.stepz=3", f"train.run_dir={tmp_path / 'r'}")
    assert bad.returncode == 2 and "valid keys under train." in bad.stderr
    assert not (tmp_path / "r").exists()  # failed before any work


def test_choices_name_every_implementation():
    """The JAX-free names configs validate against (`choices`) are exactly the tables that implement them."""
    from flaxformer_lite import choices
    from flaxformer_lite.attention import FEATURE_MAPS
    from flaxformer_lite.layers.mlp import ACTIVATIONS
    assert choices.FEATURE_MAP_NAMES == tuple(sorted(FEATURE_MAPS))
    assert choices.ACTIVATION_NAMES == tuple(sorted(ACTIVATIONS))


def test_configs_and_the_data_pipeline_load_without_jax():
    """`python -m flaxformer_lite.run.prepare` starts without JAX (about 1.3 s of imports); the package's public
    names still resolve on first use."""
    code = ("import sys, flaxformer_lite as ffl, flaxformer_lite.data.prepare, flaxformer_lite.run.prepare\n"
            "from flaxformer_lite.experiment import load_config\n"
            "load_config(None, ['model.attention=linear'])\n"
            "assert 'jax' not in sys.modules and 'flax' not in sys.modules, 'jax imported'\n"
            "assert ffl.models.build(ffl.models.preset('gpt-tiny')).__class__ is ffl.models.GPT\n"
            "assert ffl.Mask is ffl.attention.Mask and callable(ffl.generate) and 'GPT' in dir(ffl.models)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_yaml_aliases_are_refused_in_one_line(tmp_path):
    """A 300-byte alias bomb in a config file (or an override) is refused before it expands, in one short line."""
    rows = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]'] + [
        f"{x}: &{x} [{', '.join([f'*{p}'] * 9)}]" for p, x in zip("abcde", "bcdef")]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(rows + ["train: {steps: *f}"]) + "\n")
    with pytest.raises(ValueError, match=r"^--config .*bomb.yaml: not valid YAML: found the alias \*a") as err:
        load_config(path)
    assert len(str(err.value)) < 400
    with pytest.raises(ValueError, match=r"override train.steps=\*x: .*found the alias \*x"):
        load_config(None, ["train.steps=*x"])


@pytest.mark.parametrize("value", ["-1", "4294967296"])
def test_a_seed_out_of_range_names_the_key(value):
    with pytest.raises(ValueError, match=rf"^train.seed must be in \[0, .*\], got {value}$"):
        load_config(None, [f"train.seed={value}"])


def test_a_run_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("mine")
    done = subprocess.run([sys.executable, str(Path(__file__).resolve().parent.parent / "train.py"),
                           f"train.run_dir={tmp_path / 'afile'}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.splitlines() == [
        f"train.py: error: train.run_dir={tmp_path / 'afile'} is a file, not a folder; name a new or existing run "
        "folder"]
    assert (tmp_path / "afile").read_text() == "mine"


@pytest.mark.parametrize("override,named", [
    ("model.num_layers=" + "x" * 10**6, "model.num_layers"),
    ("model.attention=" + "y" * 10**6, "ModelConfig.attention"),
    ("train.steps=[" + ",".join(["1"] * 100_000) + "]", "train.steps"),
    ("z" * 10**6, "override 'zzz"),
    ("model." + "k" * 10**6 + "=1", "unknown config key model.kkk"),
    ("optim.lr=-" + "9" * 100_000, "override optim.lr="),
    ("data.vocab_size=1000000000000", "data.vocab_size must be in [4, 16777216]"),
])
def test_a_huge_value_makes_a_short_error(override, named):
    """A megabyte value (or a 100,000-digit number) is cut in the error, which names the key."""
    with pytest.raises(ValueError) as err:
        load_config(None, [override])
    assert named in str(err.value) and len(str(err.value)) < 1000 and "\n" not in str(err.value)


def test_a_renamed_key_loads_with_a_note_and_an_old_run_folder_resumes(tmp_path, capsys):
    """model.linear_gate is now model.recurrent_gate: the old name still loads from a file or an override (one
    note naming the new key), both names at once are refused, and a run folder whose config.yaml has the old name
    is compared under the new one when it resumes."""
    import yaml

    from flaxformer_lite.experiment import to_dict
    from flaxformer_lite.run.folder import check_resume
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  attention: linear\n  linear_gate: data\n")
    for cfg in (load_config(old), load_config(None, ["model.attention=linear", "model.linear_gate=data"])):
        assert cfg.model.recurrent_gate == "data"
    assert capsys.readouterr().err.splitlines() == [
        "note: model.linear_gate is now model.recurrent_gate; the old name goes in the next release"] * 2
    with pytest.raises(ValueError, match="model.linear_gate and model.recurrent_gate are one key"):
        load_config(None, ["model.linear_gate=data", "model.recurrent_gate=fixed"])
    assert load_config(old, ["model.recurrent_gate=fixed"]).model.recurrent_gate == "fixed"  # an override wins
    run = tmp_path / "run"
    (run / "checkpoints" / "2").mkdir(parents=True)
    saved = to_dict(load_config(old))
    saved["model"]["linear_gate"] = saved["model"].pop("recurrent_gate")
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    check_resume(run, load_config(old))  # the same model under its new key name: resumes
    with pytest.raises(ValueError, match=r"model.recurrent_gate: 'data' -> 'fixed'"):
        check_resume(run, load_config(old, ["model.linear_gate=fixed"]))
