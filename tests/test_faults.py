"""Faults a user can hit, each handled without losing what is already saved: damaged checkpoints, two runs on one
folder, a full disk, a torn metrics line, a failed start, changed tokenizer settings, bad ``train.init_from``
weights and a binary config file. (SIGTERM and non-finite losses: test_training.py.)"""
import gc
import glob
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from runs import losses, overrides, train_cli, write_corpus

from flaxformer_lite.training import Checkpoints, MetricsLog, read_metrics
from flaxformer_lite.training.run_lock import RunLock


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


# -- damaged checkpoints ---------------------------------------------------------------------------------------------
def _state(i: float):
    """A train-state-like tree (optax state with empty nodes, ints, a key) whose values identify ``i``."""
    params = {"w": jnp.full((8, 16), i), "b": jnp.full((3,), i)}
    tx = optax.adamw(1e-3)
    return {"params": params, "opt_state": tx.init(params), "step": jnp.int32(i), "rng": jax.random.PRNGKey(0),
            "finite": jnp.ones((), bool)}


def _data_files(step_dir):
    """The array data files of a checkpoint's state (TensorStore OCDBT data and b-tree nodes)."""
    return glob.glob(str(step_dir / "state" / "**" / "d" / "*"), recursive=True)


def _truncate(step_dir):
    for f in _data_files(step_dir):
        os.truncate(f, 10)


def _delete(step_dir):
    for f in _data_files(step_dir):
        os.remove(f)


DAMAGE = {
    "truncated data": _truncate,
    "deleted data": _delete,
    "empty meta": lambda d: open(d / "meta" / "metadata", "w").close(),
    "deleted _METADATA and data": lambda d: (os.remove(d / "state" / "_METADATA"), _delete(d)),
}


@pytest.fixture()
def three_checkpoints(tmp_path):
    ckpt = Checkpoints(tmp_path / "checkpoints", keep=5)
    for step in (1, 2, 3):
        ckpt.save(step, _state(step), {"step": step})
    ckpt.close()
    return tmp_path


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_newest_checkpoint_falls_back_to_an_intact_one(three_checkpoints, damage, capfd, caplog, monkeypatch):
    run = three_checkpoints
    DAMAGE[damage](run / "checkpoints" / "3")
    # what a command line shows: "Exception ignored" reports printed, not turned into pytest warnings
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    ckpt = Checkpoints(run / "checkpoints")
    params, meta = ckpt.restore_params()  # train.init_from's path: skips it, leaves it in place
    assert meta["step"] == 2 and float(params["w"][0, 0]) == 2.0
    gc.collect()  # the failed read's abandoned readers, were they left for later
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and f"checkpoint step 3 cannot be read ({run / 'checkpoints' / '3'}: " in err, err
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        state, meta = ckpt.restore_latest(_state(0))  # a resume: skips it and moves it aside
        ckpt.close()
        gc.collect()
    assert meta["step"] == 2 and float(state["params"]["b"][0]) == 2.0 and int(state["step"]) == 2
    err = capfd.readouterr().err  # one line, no Orbax traceback (issue 26: 91 of them for one deleted file)
    assert err.count("\n") == 1 and err.startswith("warning: checkpoint step 3 cannot be read (") and \
        f"moved {run / 'checkpoints' / '3'} to {run / 'damaged_checkpoints' / '3-'}" in err, err
    assert [r.getMessage()[:200] for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert [str(w.message) for w in warned if "never awaited" in str(w.message)] == []
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1", "2"]
    assert [p.name.split("-")[0] for p in (run / "damaged_checkpoints").iterdir()] == ["3"]  # kept, not deleted


def test_a_healthy_restore_keeps_its_log_records_and_a_failed_one_drops_them(three_checkpoints, caplog, monkeypatch):
    from absl import logging as absl_logging
    real = Checkpoints.restore

    def logging_restore(self, step, *args, **kwargs):
        absl_logging.error("reading step %d", step)  # as Orbax logs (through absl), from inside the attempt
        return real(self, step, *args, **kwargs)

    monkeypatch.setattr(Checkpoints, "restore", logging_restore)
    DAMAGE["truncated data"](three_checkpoints / "checkpoints" / "3")
    ckpt = Checkpoints(three_checkpoints / "checkpoints")
    caplog.clear()
    assert ckpt.restore_latest(_state(0))[1]["step"] == 2
    ckpt.close()
    assert [r.getMessage() for r in caplog.records if r.name == "absl"] == ["reading step 2"]


def test_no_intact_checkpoint_is_a_clear_error(three_checkpoints):
    for step in (1, 2, 3):
        DAMAGE["truncated data"](three_checkpoints / "checkpoints" / str(step))
    ckpt = Checkpoints(three_checkpoints / "checkpoints")
    with pytest.raises(ValueError, match=r"no checkpoint in .* can be read \(steps \[3, 2, 1\] are damaged"):
        ckpt.restore_latest(_state(0))
    ckpt.close()
    ckpt = Checkpoints(three_checkpoints / "checkpoints")  # run again: every checkpoint is aside now
    with pytest.raises(ValueError, match=r"every checkpoint of this run was set aside as damaged .*1-.*starting "
                                         r"again at step 0 would rewrite its metrics"):
        ckpt.restore_latest(_state(0))
    ckpt.close()


# -- a full disk -----------------------------------------------------------------------------------------------------
@pytest.fixture()
def small_disk(tmp_path):
    """A 400 KiB tmpfs (skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_full_disk_costs_one_line_per_failed_save_and_keeps_earlier_checkpoints(small_disk):
    script = f"""
import jax.numpy as jnp, numpy as np
from flaxformer_lite.training import Checkpoints
ckpt = Checkpoints({str(small_disk / "checkpoints")!r}, keep=5)
for step in range(1, 6):  # random values: they do not compress, so steps 3-5 cannot fit
    w = np.random.default_rng(step).standard_normal(100 if step < 3 else 200_000)
    ckpt.save(step, {{"w": jnp.asarray(w, jnp.float32)}}, {{"step": step}})
ckpt.close()
print("unsaved", [s for s, _ in ckpt.unsaved])
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "unsaved [3, 4, 5]" in out.stdout, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 3 and all("not saved (No space left on device); kept: steps [1, 2]" in x for x in lines), \
        out.stderr[-3000:]
    assert {"1", "2"} <= set(os.listdir(small_disk / "checkpoints"))


def test_a_failed_final_save_is_reported_and_exits_1(corpus, tmp_path, capsys, monkeypatch):
    import orbax.checkpoint as ocp
    real = ocp.CheckpointManager.save

    def failing(self, step, *args, **kwargs):
        if step == 4:
            raise OSError(28, "No space left on device")
        return real(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", failing)
    assert train_cli.main(overrides(corpus, tmp_path, steps=4, extra=["train.checkpoint_every=2"])) == 1
    err = capsys.readouterr().err
    assert "checkpoint step 4 not saved (No space left on device); kept: steps [2]" in err
    assert "the final checkpoint (step 4) was not saved" in err and "Traceback" not in err
    monkeypatch.undo()
    assert Checkpoints(tmp_path / "checkpoints").latest_step() == 2


# -- one run per folder ----------------------------------------------------------------------------------------------
def test_a_second_run_on_a_live_run_folder_is_refused(corpus, tmp_path, capsys):
    with RunLock(tmp_path):
        assert train_cli.main(overrides(corpus, tmp_path, steps=2)) == 2
        err = capsys.readouterr().err
        assert f"is in use by process {os.getpid()} on {socket.gethostname()}" in err and err.count("\n") == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]  # nothing written by the refused run
    assert not (tmp_path / ".lock").exists()


def test_a_dead_owners_lock_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from flaxformer_lite.training.run_lock import RunLock
RunLock({str(tmp_path)!r}).acquire()
print("locked", flush=True)
time.sleep(120)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=f"in use by process {holder.pid} on "):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()  # dies holding the lock, its file left behind
        holder.wait()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == holder.pid
    with RunLock(tmp_path):  # the kernel released the dead owner's lock
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


# -- metrics.jsonl ---------------------------------------------------------------------------------------------------
def test_torn_last_metrics_line_is_dropped_and_other_bad_lines_named(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    log = MetricsLog(path, resume_from=2)
    log.write({"step": 3, "loss": 1.0})
    log.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    assert "the last line (line 3) is incomplete" in capsys.readouterr().err
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not a JSON record"):
        read_metrics(path)


# -- a run's start ---------------------------------------------------------------------------------------------------
def test_checks_run_before_the_tokenizer_and_leave_nothing_behind(corpus, tmp_path, capsys, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("the tokenizer was trained before the check")

    monkeypatch.setattr("flaxformer_lite.data.prepare.train_tokenizer", no_training)
    for extra, said in ((["train.seq_len=100"], "train.seq_len (100) > model.max_len (64)"),
                        (["model.preset=bert-tiny"], "trains a model.model in ['gpt']"),
                        (["parallel.mesh=data=3"], "must divide over the 3 batch shards"),
                        (["data.objective=seq2seq", "model.preset=transformer-tiny", "data.shards=3"],
                         "data.shards (3) must be a multiple of the process count")):
        assert train_cli.main(overrides(corpus, tmp_path, extra=extra)) == 2
        assert said in capsys.readouterr().err
        assert list(tmp_path.iterdir()) == []  # no tokenizer, no config, no lock


def test_changed_tokenizer_settings_retrain_or_are_refused(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    first = overrides(corpus, run, steps=2, extra=["train.checkpoint_every=2", "model.vocab_size=99"])
    assert train_cli.main(first) == 0
    err = capsys.readouterr().err
    assert "note: the vocabulary and special ids come from the tokenizer" in err and "ignoring model.vocab_size" in err
    assert train_cli.main(overrides(corpus, run, steps=4, extra=["data.vocab_size=600"])) == 2
    assert "holds checkpoints trained with a tokenizer of other data settings (data.vocab_size: 512 -> 600)" in \
        capsys.readouterr().err
    shutil.rmtree(run / "checkpoints")  # a run that never saved: its tokenizer is replaced, with a note
    assert train_cli.main(overrides(corpus, run, steps=2, extra=["data.vocab_size=600"])) == 0
    assert "training a new tokenizer (data.vocab_size: 512 -> 600)" in capsys.readouterr().err
    from flaxformer_lite.data import Tokenizer
    assert Tokenizer.load(run / "tokenizer.model").vocab_size == 600
    assert len(losses(run)) == 2


def test_resume_skips_a_damaged_newest_checkpoint(corpus, tmp_path, capfd, monkeypatch):
    args = overrides(corpus, tmp_path, steps=4, extra=["train.checkpoint_every=2"])
    assert train_cli.main(args) == 0
    first = losses(tmp_path)
    # another optimizer is another train state: refused, and the intact checkpoints stay where they are
    config = (tmp_path / "config.yaml").read_text()
    assert train_cli.main(overrides(corpus, tmp_path, steps=6, extra=["optim.name=adam"])) == 2
    err = capfd.readouterr().err
    assert "checkpoint step 4" in err and "holds another train state than this run builds" in err, err
    assert (tmp_path / "config.yaml").read_text() == config  # the refused resume rewrote nothing
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "4"]
    assert not (tmp_path / "damaged_checkpoints").exists()
    # one deleted file (issue 26: 91 Orbax tracebacks from the reads it abandoned, printed as they were collected)
    os.remove(max(_data_files(tmp_path / "checkpoints" / "4"), key=os.path.getsize))
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)  # as on a command line, not pytest warnings
    capfd.readouterr()
    assert train_cli.main(overrides(corpus, tmp_path, steps=4, extra=["train.checkpoint_every=2"])) == 0
    gc.collect()
    out = capfd.readouterr()
    assert out.err.count("\n") == 1 and out.err.startswith("warning: checkpoint step 4 cannot be read (") and \
        f"moved {tmp_path / 'checkpoints' / '4'} to {tmp_path / 'damaged_checkpoints' / '4-'}" in out.err, \
        out.err[:3000]
    assert "resuming from step 2" in out.out
    assert losses(tmp_path) == first  # steps 3 and 4 again, from step 2's state: the same numbers
    assert Checkpoints(tmp_path / "checkpoints").latest_step() == 4


# -- bad files -------------------------------------------------------------------------------------------------------
def test_garbage_init_from_weights_and_binary_config_are_one_line_errors(corpus, tmp_path, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                                                "vocab_size": 100, "n_embd": 32, "n_layer": 1, "n_head": 2,
                                                "n_positions": 64}))
    (hf / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    assert train_cli.main(overrides(corpus, tmp_path / "run", extra=[f"train.init_from={hf}"])) == 2
    err = capsys.readouterr().err
    assert f"{hf / 'model.safetensors'}: not a readable safetensors file" in err and err.count("\n") == 1, err
    binary = tmp_path / "config.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    assert train_cli.main(["--config", str(binary)]) == 2
    err = capsys.readouterr().err
    assert f"--config {binary}: not a text file" in err and err.count("\n") == 1, err


def test_a_pickle_that_holds_more_than_tensors_is_refused_in_one_line(tmp_path):
    torch = pytest.importorskip("torch")
    import datetime

    import flaxformer_lite as ffl
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                                                      "vocab_size": 100, "n_embd": 32, "n_layer": 1, "n_head": 2,
                                                      "n_positions": 64}))
    torch.save({"wte.weight": torch.zeros(100, 32), "when": datetime.datetime(2026, 1, 1)},
               tmp_path / "pytorch_model.bin")  # a global weights-only loading refuses
    with pytest.raises(ValueError) as info:
        ffl.interop.load_hf(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'pytorch_model.bin'}: not loaded") and "\n" not in message
    assert "weights_only=False" not in message and "only weights-only pickles are read" in message
