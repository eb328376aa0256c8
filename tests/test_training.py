"""Training: the loss falls for every objective; 1 device == 8 devices (data, fsdp, tensor meshes) == pmap; a run
killed with SIGKILL and restarted is bit-identical to an uninterrupted one; SIGTERM leaves a usable checkpoint; a
checkpoint restores onto another mesh; a non-finite loss never reaches a checkpoint; optimizer schedules."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from runs import PRESET, ROOT, losses, overrides, train_cli, write_corpus

from flaxformer_lite.experiment import OptimConfig
from flaxformer_lite.training import Checkpoints, make_mesh, make_schedule, read_metrics
from flaxformer_lite.training.optimizer import decay_mask


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize("objective", sorted(PRESET))
def test_loss_falls_for_every_objective(corpus, tmp_path, objective):
    extra = ["train.eval_every=40"] + (["model.dtype=bfloat16"] if objective == "prefix_lm" else [])  # bf16 compute
    assert train_cli.main(overrides(corpus, tmp_path, objective, steps=40, extra=extra)) == 0
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert {"step", "loss", "lr", "tokens_per_s", "mfu", "step_time_s"} <= set(records[0])
    got = losses(tmp_path)
    assert np.mean(got[-5:]) < np.mean(got[:5]) - 1.0, (got[:5], got[-5:])
    assert any(k.startswith("eval_") and k.endswith("_loss") for r in records for k in r)
    assert {"config.yaml", "tokenizer.model", "metrics.jsonl", "checkpoints"} <= {p.name for p in tmp_path.iterdir()}


PARALLEL = {"one_device": ["parallel.mesh=data=1"], "data8": ["parallel.mesh=data=8"],
            "mixed": ["parallel.mesh=data=2,fsdp=2,tensor=2"], "pmap8": ["parallel.mode=pmap"]}


@pytest.fixture(scope="module")
def parallel_runs(corpus, tmp_path_factory):
    out = {}
    for name, extra in PARALLEL.items():
        run = tmp_path_factory.mktemp(name)
        assert train_cli.main(overrides(corpus, run, steps=4, extra=extra)) == 0
        out[name] = (losses(run), run)
    return out


def test_pmap_run_resumes_as_if_uninterrupted(parallel_runs, corpus, tmp_path, capsys):
    extra = [*PARALLEL["pmap8"], "train.checkpoint_every=2"]
    args = lambda steps: overrides(corpus, tmp_path, steps=steps, extra=extra)
    assert train_cli.main(args(2)) == 0
    assert train_cli.main(args(4)) == 0 and "resuming from step 2" in capsys.readouterr().out
    np.testing.assert_allclose(losses(tmp_path), parallel_runs["pmap8"][0], rtol=1e-6)


def test_every_objective_has_a_model_call_and_its_terms():
    from flaxformer_lite.data import OBJECTIVES
    from flaxformer_lite.data.registry import BATCH_KINDS
    from flaxformer_lite.training.tasks import FORWARD
    assert set(FORWARD) == set(BATCH_KINDS) == {o.batch_kind for o in OBJECTIVES.values()}
    for objective in OBJECTIVES.values():
        assert objective.models and objective.terms and len({t.name for t in objective.terms}) == len(objective.terms)


@pytest.mark.parametrize("name", [n for n in PARALLEL if n != "data8"])
def test_parallel_layouts_agree(parallel_runs, name):
    base, _ = parallel_runs["data8"]
    got, _ = parallel_runs[name]
    np.testing.assert_allclose(got, base, rtol=2e-5, atol=2e-5)
    for a, b in zip(jax.tree_util.tree_leaves(_params_of(parallel_runs[name][1], 4)),
                    jax.tree_util.tree_leaves(_params_of(parallel_runs["data8"][1], 4))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _params_of(run_dir, step):
    """Final params of a run as NumPy, restored onto one device."""
    ckpt = Checkpoints(Path(run_dir) / "checkpoints")
    params, _ = ckpt.restore_params(step)
    ckpt.close()
    return jax.tree_util.tree_map(np.asarray, params)


def _devices(n: int) -> str:
    """XLA_FLAGS for a train.py subprocess with ``n`` CPU devices, keeping conftest's compile flags."""
    return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()


def _spawn(args, cwd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XLA_FLAGS": _devices(2)}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for(path: Path, proc, timeout=240):
    start = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.stdout.read()[-2000:]}")
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.1)


def test_sigkill_then_resume_is_bit_identical(corpus, tmp_path):
    steps, extra = 12, ["train.checkpoint_every=4", "parallel.mesh=data=2"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    proc = _spawn(overrides(corpus, whole, steps=steps, extra=extra), tmp_path)
    assert proc.wait(timeout=400) == 0, proc.stdout.read()[-2000:]
    proc = _spawn(overrides(corpus, broken, steps=steps, extra=extra), tmp_path)
    _wait_for(broken / "checkpoints" / "8", proc)
    os.killpg(proc.pid, signal.SIGKILL)  # only the process group we started
    proc.wait(timeout=60)
    resumed = _spawn(overrides(corpus, broken, steps=steps, extra=extra), tmp_path)
    out = resumed.communicate(timeout=400)[0]
    assert resumed.returncode == 0 and "resuming from step" in out, out[-2000:]
    assert losses(broken) == losses(whole)  # bit-identical, step by step
    for a, b in zip(jax.tree_util.tree_leaves(_params_of(broken, steps)),
                    jax.tree_util.tree_leaves(_params_of(whole, steps))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_or_ctrl_c_saves_a_usable_checkpoint(corpus, tmp_path, sig, code):
    """SIGTERM, or Ctrl-C (SIGINT to the process group, as a terminal sends it): the step finishes, a checkpoint is
    saved at it, one closing line, no traceback."""
    proc = _spawn(overrides(corpus, tmp_path, steps=400, extra=["train.checkpoint_every=200",
                                                                "train.eval_every=300"]), tmp_path)
    _wait_for(tmp_path / "metrics.jsonl", proc)
    time.sleep(1.0)
    os.killpg(proc.pid, sig)
    out = proc.communicate(timeout=120)[0]
    said = f"train.py: stopped by {signal.Signals(sig).name} at step "
    assert proc.returncode == code and said in out and "(checkpoint saved)" in out, out[-2000:]
    assert "Traceback" not in out, out[-2000:]
    step = int(out.split(said)[1].split()[0])
    assert Checkpoints(tmp_path / "checkpoints").latest_step() == step < 300
    assert not any("eval_loss" in r for r in read_metrics(tmp_path / "metrics.jsonl"))  # stopping is no finish
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(_params_of(tmp_path, step)))


def test_restore_onto_another_mesh(parallel_runs):
    _, run = parallel_runs["data8"]
    ckpt = Checkpoints(run / "checkpoints")
    meta = ckpt.manager.item_metadata(4)["state"]
    target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta)
    mesh = make_mesh("fsdp=4,tensor=2")
    from jax.sharding import NamedSharding, PartitionSpec as P
    onto = jax.tree_util.tree_map(lambda m: NamedSharding(mesh, P("fsdp") if len(m.shape) and m.shape[0] % 4 == 0
                                                          else P()), target)
    state, meta_json = ckpt.restore(4, target, onto)
    ckpt.close()
    assert meta_json["step"] == 4
    for a, b in zip(jax.tree_util.tree_leaves(state["params"]), jax.tree_util.tree_leaves(_params_of(run, 4))):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert any(len(x.sharding.device_set) == 8 for x in jax.tree_util.tree_leaves(state["params"]))


def test_non_finite_loss_never_reaches_a_checkpoint(corpus, tmp_path, capsys):
    code = train_cli.main(overrides(corpus, tmp_path, steps=30, extra=["optim.lr=1e6", "optim.clip_norm=0.0",
                                                                       "train.checkpoint_every=1"]))
    err = capsys.readouterr().err
    assert code == 3 and ("not finite" in err or "became nan" in err), err
    latest = Checkpoints(tmp_path / "checkpoints").latest_step()
    assert latest is not None and latest < 30  # the steps before the blow-up were saved, and are finite
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(_params_of(tmp_path, latest)))
    # the checkpoint the message names was finished before the exit (an async save is not abandoned)
    named = re.search(r"last good (?:checkpoint|one) is step (\d+)", " ".join(err.split()))
    assert named is not None and int(named.group(1)) == latest, err
    assert not [p.name for p in (tmp_path / "checkpoints").iterdir() if "tmp" in p.name]


def test_resume_with_other_data_order_or_optimizer_settings_is_noted(corpus, tmp_path, capsys):
    assert train_cli.main(overrides(corpus, tmp_path, steps=2, extra=["train.checkpoint_every=2"])) == 0
    capsys.readouterr()
    assert train_cli.main(overrides(corpus, tmp_path, steps=3, extra=["train.seed=5", "optim.lr=1e-3"])) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "note: resuming with settings other than the checkpoints'" in err, err
    assert "train.seed: 0 -> 5" in err and "train.steps: 2 -> 3" in err and "optim.lr: 0.003 -> 0.001" in err


def test_samples_continue_prompts_shorter_than_16_tokens(corpus, tmp_path):
    """With train.seq_len=8 the sample prompts hold 8 tokens: the continuation starts right after them (it was cut
    at 16, which dropped the first 8 generated tokens)."""
    assert train_cli.main(overrides(corpus, tmp_path, steps=2, extra=["train.seq_len=8", "train.samples=2",
                                                                      "train.sample_tokens=6"])) == 0
    samples = (tmp_path / "samples.txt").read_text().split("--- sample ")[1:]
    assert len(samples) == 2 and any(s.split("|||", 1)[1].strip() for s in samples), samples


def test_a_non_finite_gradient_marks_the_state_not_finite():
    """A finite loss with an overflowing backward still writes NaN into the params: the state is not finite, so
    `_save` will not write it."""
    from flaxformer_lite.training.step import apply_update
    tx = optax.adamw(1e-3)
    params = {"w": jax.numpy.ones(3)}
    state = {"params": params, "opt_state": tx.init(params), "step": 0, "rng": jax.random.key(0),
             "finite": jax.numpy.bool_(True)}
    sums, weights = {"lm": {"loss": jax.numpy.float32(5.0)}}, {"lm": jax.numpy.float32(1.0)}
    new, metrics = apply_update(tx, state, {"w": jax.numpy.array([np.inf, 0.0, 0.0])}, sums, weights)
    assert np.isfinite(metrics["loss"]) and not bool(new["finite"])
    new, _ = apply_update(tx, state, {"w": jax.numpy.array([1.0, 0.0, 0.0])}, sums, weights)
    assert bool(new["finite"])


def test_schedules_and_decay_mask():
    noam = make_schedule(OptimConfig(schedule="noam", lr=1.0, warmup_steps=100), 1000, 512)
    for step in (0, 50, 99, 100, 400):
        s = step + 1
        assert np.isclose(noam(step), 512 ** -0.5 * min(s ** -0.5, s * 100 ** -1.5), rtol=1e-6)
    cosine = make_schedule(OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1), 110, 64)
    assert cosine(0) == 0.0 and np.isclose(cosine(10), 1.0) and np.isclose(cosine(110), 0.1)
    mask = decay_mask({"dense": {"kernel": np.zeros((2, 3)), "bias": np.zeros(3)}, "norm": {"scale": np.zeros(3)}})
    assert mask == {"dense": {"kernel": True, "bias": False}, "norm": {"scale": False}}
    params = {"dense": {"kernel": np.ones((2, 3)), "bias": np.ones(3)}, "norm": {"scale": np.ones(3)}}
    tx = optax.adamw(0.1, weight_decay=0.5, mask=decay_mask)
    updates, _ = tx.update(jax.tree_util.tree_map(np.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * 0.5)  # decayed: -lr * wd * w
    assert not np.any(updates["dense"]["bias"]) and not np.any(updates["norm"]["scale"])  # exempt


def test_constant_schedule_warms_up_then_holds():
    constant = make_schedule(OptimConfig(schedule="constant", lr=0.5, warmup_steps=10), 1000, 64)
    np.testing.assert_allclose([float(constant(s)) for s in (0, 5, 10, 11, 500, 1000)],
                               [0.0, 0.25, 0.5, 0.5, 0.5, 0.5], rtol=1e-6)


def test_gradient_clipping_scales_the_gradient_to_clip_norm_before_the_optimizer():
    """optim.clip_norm=1: the updates equal those of the unclipped optimizer fed gradients scaled to global norm 1 by
    hand (float64 NumPy), and differ from those it makes of the raw gradients (norms 28, 0.6 and 8)."""
    from flaxformer_lite.training.optimizer import make_optimizer
    params = {"dense": {"kernel": jax.numpy.ones((3, 2)), "bias": jax.numpy.zeros(2)}}
    rng = np.random.default_rng(0)
    grads = [{"dense": {"kernel": rng.standard_normal((3, 2)) * s, "bias": rng.standard_normal(2) * s}}
             for s in (10.0, 0.2, 3.0)]

    def by_hand(g, clip):
        norm = np.sqrt(sum((np.asarray(x, np.float64) ** 2).sum() for x in jax.tree_util.tree_leaves(g)))
        return jax.tree_util.tree_map(lambda x: x * min(1.0, clip / norm), g)

    def updates(clip_norm, gs):
        tx, _ = make_optimizer(OptimConfig(schedule="constant", lr=0.1, warmup_steps=1, clip_norm=clip_norm), 10, 64)
        state, out = tx.init(params), []
        for g in gs:
            u, state = tx.update(jax.tree_util.tree_map(lambda x: jax.numpy.asarray(x, jax.numpy.float32), g),
                                 state, params)
            out.append(jax.tree_util.tree_map(np.asarray, u))
        return out
    clipped, reference, raw = updates(1.0, grads), updates(0.0, [by_hand(g, 1.0) for g in grads]), updates(0.0, grads)
    for got, want in zip(clipped, reference):
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    gap = np.abs(clipped[-1]["dense"]["kernel"] - raw[-1]["dense"]["kernel"]).max()
    assert gap > 0.1 * np.abs(raw[-1]["dense"]["kernel"]).max(), gap  # clipping changed the update


def test_geglu_constant_schedule_clipping_and_keeping_the_last_2_checkpoints(corpus, tmp_path):
    """Options no other run takes: a gated GELU MLP, the constant schedule (warmup 2), clip_norm 0.05 (below the
    gradients' norms) and train.keep_checkpoints=2 with a checkpoint every step."""
    extra = ["model.activation=geglu", "optim.schedule=constant", "optim.lr=2e-3", "optim.warmup_steps=2",
             "optim.clip_norm=0.05", "train.keep_checkpoints=2", "train.checkpoint_every=1"]
    assert train_cli.main(overrides(corpus, tmp_path, steps=4, extra=extra)) == 0
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["lr"] for r in records], [0.0, 1e-3, 2e-3, 2e-3], rtol=1e-6)
    # grad_norm is the norm before clipping (the update was clipped to 0.05): what a user watches for spikes
    assert all(np.isfinite(r["grad_norm"]) and r["grad_norm"] > 0.05 for r in records), records
    kept = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == [3, 4], sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    paths = [[str(getattr(k, "key", k)) for k in path]
             for path, _ in jax.tree_util.tree_flatten_with_path(_params_of(tmp_path, 4))[0]]
    mlp = {keys[-2] for keys in paths if keys[-3:-2] == ["mlp"]}
    assert mlp == {"wi_0", "wi_1", "wo"}, mlp  # gated: wo(gelu(wi_0 x) * wi_1 x)


def test_init_from_a_run_folder_without_a_checkpoint_is_one_line_and_exit_2(corpus, tmp_path, capsys):
    """A run stopped before its first checkpoint (config.yaml and an empty checkpoints/), or a folder without
    checkpoints/, cannot start another run: one line, exit 2, before any data is read."""
    source = tmp_path / "source"
    (source / "checkpoints").mkdir(parents=True)
    (source / "config.yaml").write_text((ROOT / "configs" / "gpt-tiny.yaml").read_text())
    run = tmp_path / "run"
    assert train_cli.main(overrides(corpus, run, extra=[f"train.init_from={source}"])) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: ") and err.count("\n") == 1, err
    assert f"{source / 'checkpoints'} holds no checkpoint" in err, err
    (source / "checkpoints").rmdir()
    assert train_cli.main(overrides(corpus, run, extra=[f"train.init_from={source}"])) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: ") and err.count("\n") == 1, err
    assert "neither a Hugging Face model folder (config.json) nor a train.py run folder" in err, err
    assert not (run / "store").exists() and not (run / "metrics.jsonl").exists()


def test_a_non_finite_gradient_ends_the_run_with_exit_3_and_no_checkpoint(corpus, tmp_path, capsys, monkeypatch):
    """A finite loss with a non-finite gradient (an overflowing backward, injected here) writes NaN into the
    params: the run stops at its first checkpoint with exit 3 and one line, and writes no checkpoint."""
    from flaxformer_lite.training import step
    real = step.grads_and_sums

    def overflowing(*args):
        grads, sums = real(*args)
        return jax.tree_util.tree_map(lambda g: g * np.inf, grads), sums
    monkeypatch.setattr(step, "grads_and_sums", overflowing)
    code = train_cli.main(overrides(corpus, tmp_path, steps=3, extra=["train.checkpoint_every=1"]))
    err = capsys.readouterr().err
    stops = [line for line in err.splitlines() if line.startswith("train.py:")]
    assert code == 3 and len(stops) == 1, err
    assert stops[0].startswith("train.py: stopped: ") and \
        "a loss or gradient before step 1 was not finite; checkpoint 1 not written" in stops[0], err
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1] and np.isfinite(records[0]["loss"])
    assert not np.isfinite(records[0]["grad_norm"])
    assert Checkpoints(tmp_path / "checkpoints").latest_step() is None


def test_objective_model_mismatch_and_seq_len_errors(corpus, tmp_path, capsys):
    args = overrides(corpus, tmp_path, "causal_lm", extra=["model.preset=bert-tiny"])
    assert train_cli.main(args) == 2 and "trains a model.model in ['gpt']" in capsys.readouterr().err
    assert train_cli.main(overrides(corpus, tmp_path, extra=["train.seq_len=100"])) == 2
    assert "train.seq_len (100) > model.max_len (64)" in capsys.readouterr().err


def test_resume_of_another_model_and_late_setting_errors(parallel_runs, corpus, tmp_path, capsys):
    run = parallel_runs["one_device"][1]
    saved = (run / "config.yaml").read_text()
    assert train_cli.main(overrides(corpus, run, steps=4, extra=["parallel.mesh=data=1", "model.num_layers=3"])) == 2
    assert "holds checkpoints of another model (model.num_layers: 2 -> 3)" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == saved  # nothing rewritten
    assert train_cli.main(overrides(corpus, tmp_path, extra=["parallel.mesh=dat=2"])) == 2
    assert "parallel.mesh 'dat=2': each part must be axis=size" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # found before any data was read


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(corpus, tmp_path):
    """2 processes x 2 CPU devices through jax.distributed on 127.0.0.1 == 4 devices in one process: each process
    builds its rows of every batch from one token store (process 0 writes it, the other waits)."""
    base = overrides(corpus, tmp_path / "multi", steps=5, extra=["parallel.mesh=data=4", "train.eval_every=5"])
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XLA_FLAGS": _devices(2)}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "train.py"), *base,
                               f"distributed.coordinator=127.0.0.1:{port}", "distributed.num_processes=2",
                               f"distributed.process_id={i}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:  # only the processes this test started
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert all(p.returncode == 0 for p in procs), [o[-1500:] for o in outs]
    single_env = {**os.environ, "XLA_FLAGS": _devices(4)}
    single = subprocess.run([sys.executable, str(ROOT / "train.py"),
                             *overrides(corpus, tmp_path / "single", steps=5,
                                        extra=["parallel.mesh=data=4", "train.eval_every=5"])],
                            cwd=tmp_path, env=single_env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stdout[-1500:] + single.stderr[-1500:]
    np.testing.assert_allclose(losses(tmp_path / "multi"), losses(tmp_path / "single"), rtol=1e-5, atol=1e-5)
    evals = [[r["eval_loss"] for r in read_metrics(tmp_path / run / "metrics.jsonl") if "eval_loss" in r]
             for run in ("multi", "single")]
    np.testing.assert_allclose(evals[0], evals[1], rtol=1e-5)
    assert (tmp_path / "multi" / "store" / "manifest.json").exists() and not list(tmp_path.glob("multi/store.tmp-*"))


def test_gradient_accumulation_matches_one_big_batch(corpus, tmp_path):
    one = tmp_path / "one"
    two = tmp_path / "two"
    assert train_cli.main(overrides(corpus, one, steps=3, extra=["parallel.mesh=data=1"])) == 0
    assert train_cli.main(overrides(corpus, two, steps=3, extra=["parallel.mesh=data=1", "optim.grad_accum=2"])) == 0
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-5, atol=1e-5)
    # atol: a leaf whose true gradient is zero (the key bias: softmax ignores a shift of every score) holds Adam's
    # normalised rounding noise, about 1e-6 here, which the two summation orders do not share
    want = dict(jax.tree_util.tree_leaves_with_path(_params_of(one, 3)))
    for path, got in jax.tree_util.tree_leaves_with_path(_params_of(two, 3)):
        np.testing.assert_allclose(got, want[path], rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_tensorboard_events_when_installed(parallel_runs):
    pytest.importorskip("tensorboardX")
    _, run = parallel_runs["data8"]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_cross_entropy_smoothing_and_z_loss():
    from flaxformer_lite.training.losses import cross_entropy_sums
    rng = np.random.default_rng(0)
    logits, targets = rng.standard_normal((3, 5, 7)), rng.integers(0, 7, (3, 5))
    weights = (rng.random((3, 5)) > 0.3).astype(np.float32)
    lse = np.log(np.exp(logits).sum(-1))
    logp = logits - lse[..., None]
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    smooth = 0.9 * nll + 0.1 * (-logp.mean(-1))  # cross-entropy against (1-eps) one-hot + eps uniform
    want = ((smooth + 1e-3 * lse ** 2) * weights).sum()
    got = cross_entropy_sums(logits, targets, weights, label_smoothing=0.1, z_loss=1e-3)
    np.testing.assert_allclose(float(got["loss"]), want, rtol=1e-5)
    np.testing.assert_allclose(float(got["nll"]), (nll * weights).sum(), rtol=1e-5)
    assert float(got["correct"]) == ((logits.argmax(-1) == targets) * weights).sum()


@pytest.mark.parametrize("smoothing,z", [(0.0, 0.0), (0.1, 1e-3)])
def test_fused_lm_head_loss_matches_plain(smoothing, z):
    """The fused, chunked loss over the vocabulary == logits then cross-entropy, in value and gradient."""
    import jax.numpy as jnp
    from flaxformer_lite.training.losses import cross_entropy_sums, lm_head_xent_sums
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((37, 16)), jnp.float32)  # 37 tokens: a ragged last chunk of 8
    emb = jnp.asarray(rng.standard_normal((50, 16)), jnp.float32)
    t, w = jnp.asarray(rng.integers(0, 50, 37)), jnp.asarray((rng.random(37) > 0.2).astype(np.float32))
    plain = lambda h, e: cross_entropy_sums(h @ e.T, t, w, label_smoothing=smoothing, z_loss=z)
    fused = lambda h, e: lm_head_xent_sums(h, e, t, w, smoothing, z, 8)
    for key, value in plain(h, emb).items():
        np.testing.assert_allclose(fused(h, emb)[key], value, rtol=1e-5)
    for g, r in zip(jax.grad(lambda *a: fused(*a)["loss"], argnums=(0, 1))(h, emb),
                    jax.grad(lambda *a: plain(*a)["loss"], argnums=(0, 1))(h, emb)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def test_fused_lm_head_runs_in_bf16_with_float32_accumulation():
    """Under bf16 compute the fused loss's matmuls take bf16 operands (float32 params are cast, not the activations
    promoted) and accumulate in float32; values stay within bf16 rounding of the float32 loss."""
    import jax.numpy as jnp
    from flaxformer_lite.training.losses import lm_head_xent_sums
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((64, 32)), jnp.bfloat16)
    emb = jnp.asarray(rng.standard_normal((100, 32)) * 0.1, jnp.float32)  # params stay float32
    t, w = jnp.asarray(rng.integers(0, 100, 64)), jnp.ones(64, jnp.float32)
    loss = lambda h, e: lm_head_xent_sums(h, e, t, w, 0.0, 0.0, 16)["loss"]
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(h, emb).as_text()
    dots = [line for line in hlo.splitlines() if "dot_general" in line]
    assert dots and all("bf16" in line.split("(")[1] and "-> tensor" in line and "f32" in line.split("->")[1]
                        for line in dots), dots
    want = float(lm_head_xent_sums(h.astype(jnp.float32), emb, t, w, 0.0, 0.0, 16)["loss"])
    np.testing.assert_allclose(float(loss(h, emb)), want, rtol=2e-2)


def test_mfu_divides_by_the_datasheet_peak_on_known_accelerators(monkeypatch):
    from flaxformer_lite.training import metrics

    class FakeH200:
        device_kind = "NVIDIA H200"

    monkeypatch.setattr(metrics.jax, "local_devices", lambda: [FakeH200()] * 2)
    monkeypatch.setattr(metrics.jax, "local_device_count", lambda: 2)
    assert metrics.device_peak_flops("bfloat16") == 2 * 989e12
    assert metrics.device_peak_flops("float32") == 2 * 67e12
    assert metrics.mfu_denominator("bfloat16") == 2 * 989e12


def test_tokens_per_s_excludes_compile_time(monkeypatch):
    """The first record's steps carry the compilation; later records count only the steps after it."""
    import types

    import flax.linen as nn
    import jax.numpy as jnp
    from cases import tiny_config

    from flaxformer_lite.models import GPT
    from flaxformer_lite.training import loop
    cfg = tiny_config()
    params = jax.eval_shape(lambda r: GPT(cfg).init(r, jnp.zeros((1, 8), jnp.int32))["params"], jax.random.key(0))
    params = nn.unbox(params)
    speed = loop._Speed(cfg, params, types.SimpleNamespace(batch_size=4, seq_len=8), start=0)
    speed.t0, speed.previous = 0.0, (0, 0.0)
    clock = iter([30.0, 31.0, 33.0])  # 10 steps with a 29 s compile; 10 steps in 1 s; 10 in 2 s
    monkeypatch.setattr(loop.time, "perf_counter", lambda: next(clock))
    first, second, third = speed(10), speed(20), speed(30)
    assert first["tokens_per_s"] == pytest.approx(10 * 32 / 30) and first["step_time_s"] == pytest.approx(3.0)
    assert second["tokens_per_s"] == pytest.approx(10 * 32 / 1) and second["step_time_s"] == pytest.approx(0.1)
    assert third["tokens_per_s"] == pytest.approx(20 * 32 / 3) and third["step_time_s"] == pytest.approx(0.2)
    assert third["mfu"] / third["tokens_per_s"] == pytest.approx(second["mfu"] / second["tokens_per_s"])


def test_ctrl_c_before_the_first_step_is_one_line(corpus, tmp_path):
    """Ctrl-C while the run starts (imports, data, compilation): exit 130 with one line, no traceback (or, on a
    machine fast enough to be training by then, the graceful stop of the test above)."""
    proc = _spawn(overrides(corpus, tmp_path, steps=400), tmp_path)
    time.sleep(4.0)
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130 and "Traceback" not in out, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith(("train.py: interrupted (Ctrl-C)", "train.py: stopped by SIGINT")), out[-3000:]


def test_a_batch_that_cannot_fit_is_refused_before_it_is_built(corpus, tmp_path, capsys):
    """train.batch_size=10**8 needs terabytes of logits alone: one line naming the keys, before any batch is built
    or anything compiled (it ran 70 s and died out of memory)."""
    from flaxformer_lite.models.config import ModelConfig
    from flaxformer_lite.training.memory import memory_capacity, step_memory_floor
    cfg = ModelConfig(vocab_size=512, embed_dim=64, num_layers=2, num_heads=4, mlp_dim=128)
    assert step_memory_floor(cfg, 8, 32) == 8 * 32 * (4 * 512 + 4 * 2 * 64)  # logits + residual stream, float32
    assert step_memory_floor(cfg, 8, 32, accum=4) == 2 * 32 * (4 * 512 + 4 * 2 * 64)
    assert memory_capacity()[0] > 2**28
    capsys.readouterr()
    assert train_cli.main(overrides(corpus, tmp_path, steps=2, extra=["train.batch_size=100000000"])) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train.py")]
    assert len(err) == 1 and re.match(r"train.py: error: train.batch_size=100000000 x train.seq_len=32 "
                                      r"\(optim.grad_accum=1\) needs at least [\d,.]+ GiB per step", err[0])
    assert not (tmp_path / "checkpoints").exists()
    assert train_cli.main(overrides(corpus, tmp_path, steps=2, extra=["model.max_len=1000000000000"])) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train.py")]
    assert len(err) == 1 and "model.max_len=1000000000000 (learned positions) make at least" in err[0]


def test_the_parameter_floor_is_below_the_published_gpt2_count():
    """GPT-2 small has 124,439,808 parameters (Radford et al. 2019; Hugging Face's count): the floor, in float32
    bytes, is below it and not far below."""
    from flaxformer_lite.models.config import preset
    from flaxformer_lite.training.memory import params_floor
    floor = params_floor(preset("gpt2-small")) / 4
    assert 0.8 * 124_439_808 < floor <= 124_439_808


def test_a_run_logged_to_a_file_prints_one_plain_line_per_log_step(capsys):
    """stdout not a terminal (nohup, a scheduler's log): a plain line per logged step, not a bar shown at the end."""
    import io

    from rich.console import Console

    from flaxformer_lite.training.progress import RunProgress, plain_line
    record = {"step": 120, "loss": 3.45123, "lr": 2.4e-4, "tokens_per_s": 12345.0, "mfu": 0.012, "step_time_s": 0.219}
    assert plain_line(record, 1000) == "step 120/1000  loss 3.4512  lr 2.40e-04  12,345 tok/s  MFU 1.2%  ETA 0:03:13"
    with RunProgress(Console(file=io.StringIO()), 1000, 0) as show:
        show(record)
        show({**record, "step": 130})
    assert capsys.readouterr().out.splitlines() == [plain_line(record, 1000), plain_line({**record, "step": 130}, 1000)]
    terminal = io.StringIO()
    with RunProgress(Console(file=terminal, force_terminal=True), 1000, 0) as show:
        show(record)
    assert capsys.readouterr().out == "" and "120/1000" in terminal.getvalue()
    with RunProgress(Console(file=io.StringIO()), 1000, 0, enabled=False) as show:
        show(record)
    assert capsys.readouterr().out == ""
