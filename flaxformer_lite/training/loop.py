"""The training loop, generic over models: train.py hands it a model, the data and a task.

Per step: the loader's batch for that step (so a resumed run sees the same data), built and placed on the devices
one step ahead in a background thread (`Prefetch`), and one compiled train step; every
``log_every`` steps a line in ``metrics.jsonl`` and the progress (progress.py); every ``eval_every`` an evaluation; every
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

from ..interrupt import interrupted_early
from ..safe_io import write_atomic
from .checkpoint import Checkpoints
from .memory import check_step_fits
from .metrics import MetricsLog, count_params, flops_per_token, mfu_denominator, summarize
from .optimizer import make_optimizer
from .parallel import all_processes
from .prefetch import Prefetch
from .progress import RunProgress
from .step import make_step

console = Console()


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; nothing after the last good checkpoint was saved."""


@dataclasses.dataclass
class Outcome:
    """How a run ended: steps done, the signal that stopped it (``"SIGTERM"``, ``"SIGINT"``: Ctrl-C) or None, the last
    metrics and evaluation, and the checkpoints that could not be written (``[(step, reason)]``, e.g. a full disk)."""

    step: int
    stopped_by: str | None
    last_metrics: dict
    last_eval: dict
    unsaved: list = dataclasses.field(default_factory=list)


class _Stop:
    """Turns SIGTERM and a first Ctrl-C (SIGINT) into a flag checked between steps: the step in flight finishes, then
    a checkpoint is saved. A second Ctrl-C interrupts at once (KeyboardInterrupt), for a user who will not wait."""

    _SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested: str | None = "SIGINT" if interrupted_early() else None  # the signal that asked for the stop
        self._previous: dict = {}

    def __enter__(self):
        try:
            self._previous = {s: signal.signal(s, self._handle) for s in self._SIGNALS}
        except ValueError:  # not the main thread
            self._previous = {}
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, previous in self._previous.items():
            if previous is not None:  # None: a handler not installed from Python, which cannot be put back
                signal.signal(s, previous)


def evaluate(step_fn, loader, batches: int, objective) -> dict:
    """Mean loss and accuracy (and perplexity for token-level terms) over the first ``batches`` eval batches,
    deterministic. An objective of one term reports ``eval_loss``...; several report ``eval_<term>_loss``..."""
    totals: dict = {}
    for i in range(batches):
        sums, weights = step_fn.eval_sums(loader.batch(i))
        for name, s in sums.items():
            t = totals.setdefault(name, {"nll": 0.0, "correct": 0.0, "weight": 0.0})
            t["nll"] += float(s["nll"])
            t["correct"] += float(s["correct"])
            t["weight"] += float(weights[name])
    out = {}
    for term in objective.terms:
        t = totals[term.name]
        w = max(t["weight"], 1.0)
        prefix = "eval" if len(objective.terms) == 1 else f"eval_{term.name}"
        out[f"{prefix}_loss"] = t["nll"] / w
        out[f"{prefix}_accuracy"] = t["correct"] / w
        if not term.per_example:
            out[f"{prefix}_ppl"] = math.exp(min(t["nll"] / w, 50.0))
    return out


def train(cfg, model, data, task, *, sample_fn=None, warm_start=None, started=None) -> Outcome:
    """Run (or resume) training as ``cfg`` says; write metrics.jsonl and checkpoints under ``cfg.train.run_dir``.

    ``warm_start(params) -> params`` (e.g. grafting pretrained weights) sets the initial parameters of a fresh run;
    a resumed run restores its checkpoint instead. ``started(step)`` is called once the checkpoint (if any) is
    restored and before anything in the folder is rewritten: a resume refused there leaves the folder as it was."""
    tc = cfg.train
    run_dir = Path(tc.run_dir)
    check_step_fits(model.cfg, tc.batch_size, tc.seq_len, cfg.optim.grad_accum, jax.process_count())
    tx, schedule = make_optimizer(cfg.optim, tc.steps, model.cfg.embed_dim)
    first = jax.tree_util.tree_map(jnp.asarray, data.train.batch(0))
    step_fn = make_step(cfg.parallel, task, tx, lambda rng: task.init_params(rng, first), jax.random.PRNGKey(tc.seed),
                        cfg.optim.grad_accum)
    for note in step_fn.notes:
        console.print(note)
    ckpt = Checkpoints(run_dir / "checkpoints", keep=tc.keep_checkpoints)
    meta = step_fn.restore(ckpt)
    start = 0 if meta is None else int(meta["step"])
    if started is not None:
        started(start)
    if start:
        console.print(f"resuming from step {start} ({run_dir / 'checkpoints'})")
    elif warm_start is not None:  # fn sees shape structs (parameters may span hosts), returns host arrays
        step_fn.set_params(warm_start(jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                             step_fn.params())))
    eval_batches = _eval_batches(tc, data.eval)
    log = MetricsLog(run_dir / "metrics.jsonl", resume_from=start, enabled=jax.process_index() == 0)
    speed = _Speed(model.cfg, step_fn.params(), tc, start)
    last_metrics, last_eval, done = {}, {}, start
    batches = Prefetch(lambda s: step_fn.place(data.train.batch(s)), start, tc.steps)
    try:
        with _Stop() as stop, RunProgress(console, tc.steps, start, tc.progress) as progress, batches:
            for step in range(start, tc.steps):
                metrics = step_fn.run(batches.get(step))
                done = step + 1
                stopping = _agreed_stop(stop.requested is not None, done, tc.log_every)
                last = done == tc.steps or stopping
                if done % tc.log_every == 0 or last:
                    last_metrics = _log_step(step_fn.host_metrics(metrics), done, ckpt, schedule, speed,
                                             batches.take_waited())
                    log.write(last_metrics)
                    progress(last_metrics)
                if tc.eval_every and (done % tc.eval_every == 0 or done == tc.steps):
                    last_eval = evaluate(step_fn, data.eval, eval_batches, task.objective)
                    log.write({"step": done, **last_eval})
                if done % tc.checkpoint_every == 0 or last:
                    _save(ckpt, step_fn, done, cfg)
                if stopping:
                    break
    finally:  # whatever stops the loop (a non-finite loss, Ctrl-C), a checkpoint being written is finished first
        ckpt.close()
        log.close()
    stopped = done < tc.steps
    if sample_fn is not None and not stopped and jax.process_index() == 0:
        _write_samples(run_dir, sample_fn(step_fn.params()))
    return Outcome(done, (stop.requested or "a signal") if stopped else None, last_metrics, last_eval, ckpt.unsaved)


def _eval_batches(tc, loader) -> int:
    """``train.eval_batches``, capped (with a note) at the batches the eval set holds: more would repeat rows."""
    batches = min(tc.eval_batches, loader.distinct_batches())
    if tc.eval_every and batches < tc.eval_batches:
        console.print(f"note: the eval set holds {batches} batch(es) of {tc.batch_size}; evaluating on those, "
                      f"not train.eval_batches={tc.eval_batches} (which would repeat them)")
    return batches


def _agreed_stop(requested: bool, done: int, log_every: int) -> bool:
    """Whether to stop after step ``done``: at once in a single process; in several, decided together at log steps
    (a collective), so that every process stops at the same step and saves the same checkpoint."""
    if jax.process_count() == 1:
        return requested
    return done % log_every == 0 and not all_processes(not requested)


class _Speed:
    """Tokens/s, MFU (model FLOPs over the devices' peak, `mfu_denominator`) and seconds per step. The first record
    after a start or resume times its steps with the compilation in them; every later record counts only the steps
    since that first record, so tokens/s excludes compile time. ``step_time_s`` is the mean wall time of the steps
    since the previous record."""

    def __init__(self, model_cfg, params, tc, start: int):
        self.tokens_per_step = tc.batch_size * tc.seq_len
        self.start, self.t0 = start, time.perf_counter()
        self.previous = (start, self.t0)
        self.first_record = True
        matmul_params = count_params(params, exclude_positions=True,
                                     shared_repeats=model_cfg.num_layers if model_cfg.share_layers else 1)
        self.flops = flops_per_token(matmul_params, model_cfg, tc.seq_len) * self.tokens_per_step
        self.ceiling = mfu_denominator(model_cfg.dtype)

    def __call__(self, done: int) -> dict[str, float]:
        """``tokens_per_s``, ``mfu`` and ``step_time_s`` after ``done`` steps."""
        now = time.perf_counter()
        steps_per_s = (done - self.start) / max(now - self.t0, 1e-9)
        step_time = (now - self.previous[1]) / max(done - self.previous[0], 1)
        if self.first_record:  # from here on, count without the compilation
            self.start, self.t0, self.first_record = done, now, False
        self.previous = (done, now)
        return {"tokens_per_s": steps_per_s * self.tokens_per_step, "mfu": steps_per_s * self.flops / self.ceiling,
                "step_time_s": step_time}


def _log_step(metrics: dict, done: int, ckpt: Checkpoints, schedule, speed: _Speed, waited: float) -> dict:
    """The logged record of step ``done`` (``data_wait_s``: seconds the loop waited for batches since the last
    record); stops the run on a non-finite loss."""
    if not np.isfinite(metrics["loss"]):
        raise NonFiniteLoss(f"the loss became {metrics['loss']} by step {done}; stopping without saving. "
                            f"The last good checkpoint is step {ckpt.latest_step()}; lower optim.lr or "
                            "raise optim.warmup_steps")
    return summarize(metrics, step=done, lr=float(schedule(done - 1)), **speed(done), data_wait_s=waited)


def _save(ckpt: Checkpoints, step_fn, step: int, cfg) -> None:
    state = step_fn.saved_state()
    if not bool(jax.device_get(state["finite"])):
        raise NonFiniteLoss(f"a loss or gradient before step {step} was not finite; checkpoint {step} not written "
                            f"(the last good one is step {ckpt.latest_step()})")
    ckpt.save(step, state, {"step": step, "loader_position": step, "config": dataclasses.asdict(cfg)})


def _write_samples(run_dir: Path, samples: list[str]) -> None:
    if not samples:
        return
    text = "\n\n".join(f"--- sample {i} ---\n{s}" for i, s in enumerate(samples))
    write_atomic(run_dir / "samples.txt", text + "\n")
    console.print(text)
