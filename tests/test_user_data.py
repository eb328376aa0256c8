"""Nothing a user owns is lost: user files, symbolic links and hostile files planted around the folders the library
writes, and a write that fails half way. (The token store's folder: tests/test_store.py.)"""
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxformer_lite as ffl


@pytest.fixture(scope="module")
def tiny():
    """A one-layer GPT and two different sets of its variables."""
    model = ffl.models.GPT(ffl.models.ModelConfig(vocab_size=10, num_layers=1, num_heads=2, embed_dim=8, mlp_dim=16,
                                                  max_len=8))
    init = lambda seed: model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))
    return model, init(0), init(1)


def _contents(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_save_hf_replaces_only_its_own_weight_files(tiny, tmp_path):
    """Over an earlier sharded export with the user's files beside it, a hostile index naming them (and a file
    outside), and config.json a symbolic link out of the folder: the new export replaces its own files only."""
    model, first, second = tiny
    folder = tmp_path / "export"
    ffl.interop.save_hf(model, first, folder, max_shard_size=1000)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    assert len(set(index["weight_map"].values())) > 1
    index["weight_map"].update({"a": "README.md", "b": "tokenizer.json", "c": "../outside.txt"})
    index_path.write_text(json.dumps(index))
    (folder / "README.md").write_text("mine")
    (folder / "tokenizer.json").write_text("{}")
    (tmp_path / "outside.txt").write_text("outside")
    (tmp_path / "victim.json").write_text("not a config")
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to(tmp_path / "victim.json")
    ffl.interop.save_hf(model, second, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                        "tokenizer.json"]
    assert (folder / "README.md").read_text() == "mine" and (folder / "tokenizer.json").read_text() == "{}"
    assert (tmp_path / "outside.txt").read_text() == "outside"
    assert (tmp_path / "victim.json").read_text() == "not a config" and not (folder / "config.json").is_symlink()
    _, loaded = ffl.interop.load_hf(folder)
    for a, b in zip(jax.tree.leaves(second["params"]), jax.tree.leaves(loaded["params"])):
        np.testing.assert_array_equal(a, b)


def test_a_failed_save_hf_keeps_the_earlier_export(tiny, tmp_path, monkeypatch):
    """A disk that fills while the weights are written: one line, and the folder byte for byte as it was (the
    earlier export loadable, no temporary files)."""
    model, first, second = tiny
    folder = tmp_path / "export"
    ffl.interop.save_hf(model, first, folder)
    (folder / "README.md").write_text("mine")
    before = _contents(folder)
    import safetensors.numpy

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", full_disk)
    with pytest.raises(ValueError, match=r"^save_hf: could not write .*No space left on device.*nothing there "
                                         r"was changed$"):
        ffl.interop.save_hf(model, second, folder)
    assert _contents(folder) == before


@pytest.mark.parametrize("shard,shown", [("../outside.safetensors", "'../outside.safetensors'"),
                                         ("/etc/passwd", "'/etc/passwd'"), (["a"], "['a']"), (7, "7")])
def test_an_index_cannot_name_a_file_outside_the_folder(tiny, tmp_path, shard, shown):
    """A sharded index naming a file outside the model folder (a valid safetensors file planted there), or a name
    that is no string: refused in one line, nothing read."""
    model, first, _ = tiny
    ffl.interop.save_hf(model, first, tmp_path / "outside-copy")
    (tmp_path / "outside-copy" / "model.safetensors").rename(tmp_path / "outside.safetensors")
    folder = tmp_path / "export"
    ffl.interop.save_hf(model, first, folder, max_shard_size=1000)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["embedder/token/embedding"] = shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"weight_map names {re.escape(shown)} for .*not a file name in .*refused"):
        ffl.interop.load_hf(folder)


def test_run_folder_files_are_never_written_through_a_link(tmp_path):
    """Links planted in a run folder at the lock, at config.yaml and at its temporary name, at metrics.jsonl: the
    lock and the metrics refuse in one line, the atomic writes replace the link; no linked file changes."""
    import os

    from flaxformer_lite.safe_io import write_atomic
    from flaxformer_lite.training.metrics import MetricsLog
    from flaxformer_lite.training.run_lock import RunLock
    victims = {name: tmp_path / f"victim-{name}" for name in ("lock", "config", "tmp", "metrics")}
    for path in victims.values():
        path.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").symlink_to(victims["lock"])
    (run / "config.yaml").symlink_to(victims["config"])
    (run / f".config.yaml.tmp-{os.getpid()}").symlink_to(victims["tmp"])
    (run / "metrics.jsonl").symlink_to(victims["metrics"])
    with pytest.raises(ValueError, match=r"\.lock is a symbolic link: .*never through a link"):
        RunLock(run).acquire()
    with pytest.raises(ValueError, match=r"metrics.jsonl is a symbolic link"):
        MetricsLog(run / "metrics.jsonl", resume_from=3)
    write_atomic(run / "config.yaml", "model: {}\n")
    assert (run / "config.yaml").read_text() == "model: {}\n" and not (run / "config.yaml").is_symlink()
    assert all(path.read_text() == "precious" for path in victims.values())
    assert sorted(p.name for p in run.iterdir()) == [".lock", "config.yaml", "metrics.jsonl"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from runs import write_corpus
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def _snapshot(folder) -> dict:
    """Every path under ``folder`` (links not followed) with its bytes, or its link target, and its mtime."""
    out = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            out[key] = ("link", str(path.readlink()))
        elif path.is_file():
            out[key] = (path.read_bytes(), path.stat().st_mtime_ns)
        else:
            out[key] = ("dir", sorted(p.name for p in path.iterdir()))
    return out


# a name in a run folder (or its store) planted as a link to the user's file or folder: the run stops in one line
# (config.yaml, only ever written whole in a new run, has its link replaced by the file)
_PLANTED = ["config.yaml", "tokenizer.model", "metrics.jsonl", ".lock", "store", "store/tokens.bin", "tensorboard",
            "checkpoints", "checkpoints/2"]


def test_links_planted_in_a_run_folder_are_never_followed(corpus, tmp_path, capsys):
    """Each file or folder a run reads or writes, planted as a link to the user's files: train.py stops with one
    line naming the link (exit 2), and nothing outside the run folder changes. A user's own file in the run folder
    is left as it is by a run that completes."""
    from runs import overrides, train_cli
    outside = tmp_path / "outside"
    (outside / "folder").mkdir(parents=True)
    (outside / "file").write_text("precious")
    (outside / "folder" / "notes.txt").write_text("precious too")
    done = tmp_path / "done"  # a finished run to copy real store and checkpoint folders from
    assert train_cli.main(overrides(corpus, done, steps=2, extra=["train.checkpoint_every=2"])) == 0
    (done / "notes.txt").write_text("mine")
    assert train_cli.main(overrides(corpus, done, steps=3, extra=["train.checkpoint_every=2"])) == 0
    assert (done / "notes.txt").read_text() == "mine"
    before = _snapshot(outside)
    for name in _PLANTED:
        run = tmp_path / f"run-{name.replace('/', '-')}"
        if "/" in name:  # the finished run copied (a resume), one entry of a folder in it a link
            shutil.copytree(done, run, ignore=shutil.ignore_patterns(".lock"))
        run.mkdir(exist_ok=True)
        link = run / name
        shutil.rmtree(link, ignore_errors=True) if link.is_dir() else link.unlink(missing_ok=True)
        link.symlink_to(outside / ("folder" if name in ("store", "tensorboard", "checkpoints", "checkpoints/2")
                                   else "file"))
        capsys.readouterr()
        code = train_cli.main(overrides(corpus, run, steps=3, extra=["train.checkpoint_every=2"]))
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train.py")]
        if name == "config.yaml":
            assert code == 0 and not link.is_symlink() and link.is_file()
        else:
            assert code == 2 and len(err) == 1 and "symbolic link" in err[0] and name.split("/")[-1] in err[0], \
                (name, err)
        assert _snapshot(outside) == before, name
    source = tmp_path / "source"  # a finished run read as train.init_from, its tokenizer or a checkpoint a link
    for name in ("tokenizer.model", "checkpoints/2"):
        shutil.rmtree(source, ignore_errors=True)
        shutil.copytree(done, source, ignore=shutil.ignore_patterns(".lock"))
        shutil.rmtree(source / name) if (source / name).is_dir() else (source / name).unlink()
        (source / name).symlink_to(outside / ("folder" if "/" in name else "file"))
        code = train_cli.main(overrides(corpus, tmp_path / "fine", steps=1, extra=[f"train.init_from={source}"]))
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train.py")]
        assert code == 2 and len(err) == 1 and "symbolic link" in err[0], (name, err)
        assert _snapshot(outside) == before, name
