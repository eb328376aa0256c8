"""The training loop, generic over models: train.py hands it a model, the data and a task.

Per step: the loader's batch for that step (so a resumed run sees the same data), one compiled train step; every
``log_every`` steps a line in ``metrics.jsonl`` and the progress bar; every ``eval_every`` an evaluation; every
``checkpoint_every`` (and at the end, and on SIGTERM) an asynchronous checkpoint, written only while every loss so
far was finite. A non-finite loss stops the run with a message and the last good checkpoint untouched.
"""
from __future__ import annotations

import dataclasses
import math
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from .checkpoint import Checkpoints
from .metrics import PRIMARY_TERMS, MetricsLog, count_params, flops_per_token, matmul_ceiling, summarize
from .optimizer import make_optimizer
from .parallel import (batch_sharding, eval_sums, init_state, jit_train_step, make_mesh, pmap_train_step, replicate,
                       shard_for_pmap, unreplicate)

console = Console()


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; nothing after the last good checkpoint was saved."""


@dataclasses.dataclass
class Outcome:
    """How a run ended: steps done, whether SIGTERM stopped it, the last metrics and evaluation."""

    step: int
    stopped_by_signal: bool
    last_metrics: dict
    last_eval: dict


class _Stop:
    """Turns SIGTERM into a flag checked between steps (the step in flight finishes, then a checkpoint is saved)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _global_batch(batch: dict, sharding):
    """This process's slice of a batch -> global arrays over the mesh."""
    return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def _setup(cfg, model, data, task):
    """Mesh or pmap set-up, optimizer, initial state and the compiled step."""
    tx, schedule = make_optimizer(cfg.optim, cfg.train.steps, model.cfg.embed_dim)
    first = data.train.batch(0)
    init_fn = lambda rng: task.init_params(rng, jax.tree_util.tree_map(jnp.asarray, first))
    rng = jax.random.PRNGKey(cfg.train.seed)
    accum = cfg.optim.grad_accum
    if cfg.train.batch_size % accum:
        raise ValueError(f"train.batch_size ({cfg.train.batch_size}) must be a multiple of optim.grad_accum ({accum})")
    if cfg.parallel.mode == "pmap":
        n = jax.local_device_count()
        if (cfg.train.batch_size // jax.process_count()) % (n * accum):
            raise ValueError(f"parallel.mode=pmap needs train.batch_size divisible by devices x grad_accum ({n * accum})")
        state, _ = init_state(init_fn, tx, rng, make_mesh("data=1", jax.devices()[:1]))
        return dict(tx=tx, schedule=schedule, state=replicate(state, n), shardings=None, mesh=None,
                    step=pmap_train_step(task, tx, accum), n=n)
    mesh = make_mesh(cfg.parallel.mesh)
    state, shardings = init_state(init_fn, tx, rng, mesh)
    return dict(tx=tx, schedule=schedule, state=state, shardings=shardings, mesh=mesh,
                step=jit_train_step(task, tx, shardings, mesh, accum), n=None)


def _restore(ckpt: Checkpoints, setup: dict) -> tuple[int, dict | None]:
    """Load the latest checkpoint into ``setup['state']``; returns (next step, meta)."""
    latest = ckpt.latest_step()
    if latest is None:
        return 0, None
    if setup["n"] is None:
        state, meta = ckpt.restore(latest, setup["state"], setup["shardings"])
    else:
        single, meta = ckpt.restore(latest, unreplicate(setup["state"]),
                                    jax.tree_util.tree_map(lambda _: jax.devices()[0], unreplicate(setup["state"])))
        state = replicate(single, setup["n"])
    setup["state"] = state
    return int(meta["step"]), meta


def evaluate(task, params, loader, batches: int, to_device=None) -> dict:
    """Mean loss, perplexity and accuracy over the first ``batches`` eval batches (deterministic).
    ``to_device`` turns a process's rows into the arrays the step takes (global arrays over a mesh)."""
    to_device = to_device or (lambda b: jax.tree_util.tree_map(jnp.asarray, b))
    totals: dict = {}
    for i in range(batches):
        sums, weights = eval_sums(task, params, to_device(loader.batch(i)))
        for name, s in sums.items():
            t = totals.setdefault(name, {"nll": 0.0, "correct": 0.0, "weight": 0.0})
            t["nll"] += float(s["nll"])
            t["correct"] += float(s["correct"])
            t["weight"] += float(weights[name])
    out = {}
    for name, t in totals.items():
        w = max(t["weight"], 1.0)
        prefix = "eval" if name in PRIMARY_TERMS else f"eval_{name}"
        out[f"{prefix}_loss"] = t["nll"] / w
        out[f"{prefix}_accuracy"] = t["correct"] / w
        if name in ("lm", "mlm"):
            out[f"{prefix}_ppl"] = math.exp(min(t["nll"] / w, 50.0))
    return out


def train(cfg, model, data, task, *, sample_fn=None, warm_start=None) -> Outcome:
    """Run (or resume) training as ``cfg`` says; write metrics.jsonl and checkpoints under ``cfg.train.run_dir``.

    ``warm_start(params) -> params`` (e.g. grafting pretrained weights) sets the initial parameters of a fresh run;
    a resumed run restores its checkpoint instead."""
    tc = cfg.train
    run_dir = Path(tc.run_dir)
    setup = _setup(cfg, model, data, task)
    ckpt = Checkpoints(run_dir / "checkpoints", keep=tc.keep_checkpoints)
    start, _ = _restore(ckpt, setup)
    if start == 0 and warm_start is not None:
        _warm_start(setup, warm_start)
    log = MetricsLog(run_dir / "metrics.jsonl", resume_from=start, enabled=jax.process_index() == 0)
    params = lambda: setup["state"]["params"] if setup["n"] is None else unreplicate(setup["state"])["params"]
    tokens_per_step = tc.batch_size * tc.seq_len
    matmul_params = count_params(params(), exclude_positions=True,
                                 shared_repeats=model.cfg.num_layers if model.cfg.share_layers else 1)
    flops = flops_per_token(matmul_params, model.cfg, tc.seq_len) * tokens_per_step
    ceiling = matmul_ceiling()
    sharding = None if setup["mesh"] is None else batch_sharding(setup["mesh"])
    if start:
        console.print(f"resuming from step {start} ({run_dir / 'checkpoints'})")
    last_metrics, last_eval, t0, done = {}, {}, time.perf_counter(), start
    with _Stop() as stop, _progress(tc, start) as (progress, bar):
        for step in range(start, tc.steps):
            batch = data.train.batch(step)
            if setup["n"] is None:
                batch = _global_batch(batch, sharding)
            else:
                batch = shard_for_pmap(batch, setup["n"])
            setup["state"], metrics = setup["step"](setup["state"], batch)
            done = step + 1
            stopping = stop.requested  # read once: a signal arriving later in this step is handled next step
            last = done == tc.steps or stopping
            if done % tc.log_every == 0 or last:
                metrics = jax.device_get(metrics if setup["n"] is None else unreplicate(metrics))
                if not np.isfinite(metrics["loss"]):
                    raise NonFiniteLoss(f"the loss became {metrics['loss']} by step {done}; stopping without saving. "
                                        f"The last good checkpoint is step {ckpt.latest_step()}; lower optim.lr or "
                                        "raise optim.warmup_steps")
                elapsed = time.perf_counter() - t0
                rate = tokens_per_step * (done - start) / max(elapsed, 1e-9)
                last_metrics = summarize(metrics, step=done, lr=float(setup["schedule"](done - 1)),
                                         tokens_per_s=rate, mfu=rate / tokens_per_step * flops / ceiling)
                log.write(last_metrics)
                progress.update(bar, completed=done, loss=last_metrics["loss"], lr=last_metrics["lr"],
                                tps=rate, mfu=100 * last_metrics["mfu"])
            if tc.eval_every and (done % tc.eval_every == 0 or last):
                to_device = None if sharding is None else (lambda b: _global_batch(b, sharding))
                last_eval = evaluate(task, params(), data.eval, tc.eval_batches, to_device)
                log.write({"step": done, **last_eval})
            if done % tc.checkpoint_every == 0 or last:
                _save(ckpt, setup, done, cfg)
            if stopping:
                console.print(f"SIGTERM: saved step {done}; exiting")
                break
    ckpt.close()
    log.close()
    stopped = done < tc.steps
    if sample_fn is not None and not stopped and jax.process_index() == 0:
        _write_samples(run_dir, sample_fn(params()))
    return Outcome(done, stopped, last_metrics, last_eval)


def _warm_start(setup: dict, fn) -> None:
    """Replace the initial params by ``fn(params)``, laid out as before (mesh shardings, or replicated for pmap).

    ``fn`` sees shape/dtype structs (no values: parameters may span hosts) and returns host arrays for the leaves
    it sets; leaves it returns as structs keep their initial values."""
    if setup["n"] is None:
        current = setup["state"]["params"]
    else:
        current = unreplicate(setup["state"])["params"]
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), current)
    new = fn(abstract)
    if setup["n"] is None:
        place = lambda n, old, s: old if isinstance(n, jax.ShapeDtypeStruct) else \
            jax.make_array_from_callback(n.shape, s, lambda index: n[index])
        setup["state"]["params"] = jax.tree_util.tree_map(place, new, current, setup["shardings"]["params"])
    else:
        single = unreplicate(setup["state"])
        single["params"] = jax.tree_util.tree_map(
            lambda n, old: old if isinstance(n, jax.ShapeDtypeStruct) else jnp.asarray(n), new, single["params"])
        setup["state"] = replicate(single, setup["n"])


def _save(ckpt: Checkpoints, setup: dict, step: int, cfg) -> None:
    state = setup["state"] if setup["n"] is None else unreplicate(setup["state"])
    if not bool(jax.device_get(state["finite"])):
        raise NonFiniteLoss(f"a loss before step {step} was not finite; checkpoint {step} not written "
                            f"(the last good one is step {ckpt.latest_step()})")
    ckpt.save(step, state, {"step": step, "loader_position": step, "config": dataclasses.asdict(cfg)})


def _write_samples(run_dir: Path, samples: list[str]) -> None:
    if not samples:
        return
    text = "\n\n".join(f"--- sample {i} ---\n{s}" for i, s in enumerate(samples))
    (run_dir / "samples.txt").write_text(text + "\n", encoding="utf-8")
    console.print(text)


class _progress:
    """A rich progress bar (step, loss, lr, tokens/s, MFU, ETA), or nothing when disabled / not process 0."""

    def __init__(self, tc, start: int):
        self.enabled = tc.progress and jax.process_index() == 0
        self.tc, self.start = tc, start

    def __enter__(self):
        self.progress = Progress(
            TextColumn("step {task.completed}/{task.total}"), BarColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:,.0f} tok/s  "
                       "MFU {task.fields[mfu]:.1f}%"), TimeRemainingColumn(), console=console,
            disable=not self.enabled, transient=False)
        self.progress.__enter__()
        bar = self.progress.add_task("train", total=self.tc.steps, completed=self.start, loss=float("nan"),
                                     lr=0.0, tps=0.0, mfu=0.0)
        return self.progress, bar

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)
