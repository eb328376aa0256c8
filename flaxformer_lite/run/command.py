"""Pre-train a model from one command.

    python train.py                                   # gpt-tiny on the built-in corpus, a few minutes on a CPU
    python train.py --config configs/bert-tiny.yaml train.steps=200
    python train.py --config configs/gpt-tiny.yaml data.path=../shared/data/tinyshakespeare.txt train.run_dir=runs/tiny

Writes ``train.run_dir``: config.yaml, tokenizer.model (``tokenizer/`` for a Hugging Face tokenizer), metrics.jsonl,
checkpoints/, samples.txt (labels.json when classifying). Running the same command again resumes from the latest
checkpoint. ``train.init_from=PATH`` starts from a Hugging Face folder's or another run's weights (fine-tuning with
``data.objective=classify``). ``--help`` lists every key.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..interrupt import watch_ctrl_c
from .folder import check_resume, run_tokenizer, store_args, write_run_files
from .model import TOKENIZER_MODEL_KEYS, grafter, load_pretrained_weights, model_and_task, sample_fn

def _help_text() -> str:
    from ..experiment import describe_keys
    rows = describe_keys()
    width = max(len(k) for k, _, _ in rows)
    return "config keys (key=value overrides; defaults shown):\n" + "\n".join(
        f"  {k:<{width}}  {t}  default {d}" for k, t, d in rows)


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, epilog=_help_text() if "--help" in argv or "-h" in argv
                                     else None, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100")
    return parser.parse_intermixed_args(argv)  # options may come between overrides


def _init_distributed(dist) -> None:
    import jax
    env = any(os.environ.get(k) for k in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS"))
    if dist.num_processes > 1 or dist.coordinator or env:
        kwargs = {}
        if dist.coordinator:
            kwargs["coordinator_address"] = dist.coordinator
        if dist.num_processes > 0:
            kwargs["num_processes"] = dist.num_processes
        if dist.process_id >= 0:
            kwargs["process_id"] = dist.process_id
        jax.distributed.initialize(**kwargs)


def _preflight(cfg, pretrained) -> None:
    """Every check that needs no data, run before any corpus is read or tokenizer trained."""
    import jax

    from ..data import get_objective
    from ..data.pipeline import reading_shards
    from ..training import check_layout
    model_cfg = cfg.model if pretrained is None else pretrained.cfg
    get_objective(cfg.data.objective).check(model_kind=model_cfg.model, seq_len=cfg.train.seq_len)
    if cfg.train.seq_len > model_cfg.max_len:
        raise ValueError(f"train.seq_len ({cfg.train.seq_len}) > model.max_len ({model_cfg.max_len})")
    check_layout(cfg.parallel, cfg.train.batch_size, cfg.optim.grad_accum)
    if get_objective(cfg.data.objective).stream_pool is None:  # read in memory, by shards
        reading_shards(cfg.data.shards, cfg.train.batch_size, jax.process_index(), jax.process_count())
    elif cfg.data.shards:
        print("train.py: note: data.shards is not used by a token store (every process reads its rows of one pool)",
              file=sys.stderr)


def _run(cfg, overrides, run_dir: Path) -> int:
    """Checks, data, model, training; the exit status."""
    import jax

    from ..data import build_data
    from ..training import NonFiniteLoss, train
    pretrained = load_pretrained_weights(cfg, overrides)
    _preflight(cfg, pretrained)
    if pretrained is None:
        check_resume(run_dir, cfg, skip=TOKENIZER_MODEL_KEYS)
    tokenizer = pretrained.tokenizer if pretrained is not None else run_tokenizer(run_dir, cfg)
    new_tokenizer = tokenizer is None or not (run_dir / "tokenizer.model").exists()
    data = build_data(cfg.data, seq_len=cfg.train.seq_len, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                      process_index=jax.process_index(), process_count=jax.process_count(), tokenizer=tokenizer,
                      **store_args(cfg, run_dir))
    cfg, model, task = model_and_task(cfg, data, pretrained, overrides)
    check_resume(run_dir, cfg)
    write_files = (lambda step: write_run_files(run_dir, cfg, data, new_tokenizer)) if jax.process_index() == 0 \
        else None  # once the checkpoint is restored: a resume refused there leaves config.yaml as it was
    try:
        outcome = train(cfg, model, data, task, sample_fn=sample_fn(model, data, cfg),
                        warm_start=None if pretrained is None else grafter(pretrained, cfg.data.objective),
                        started=write_files)
    except NonFiniteLoss as err:
        print(f"train.py: stopped: {err}", file=sys.stderr)
        return 3
    return _report(outcome)


def _report(outcome) -> int:
    """The closing line and exit status: 0 done, 143 stopped by SIGTERM and 130 by Ctrl-C (128 + the signal, as
    shells and schedulers expect), 1 when the final checkpoint could not be written."""
    final = dict(outcome.unsaved).get(outcome.step)
    saved = "checkpoint saved" if final is None else f"checkpoint NOT saved: {final}"
    if outcome.stopped_by:
        print(f"train.py: stopped by {outcome.stopped_by} at step {outcome.step} ({saved}); the same command resumes",
              file=sys.stderr)
        return 130 if outcome.stopped_by == "SIGINT" else 143
    if final is not None:
        print(f"train.py: error: the final checkpoint (step {outcome.step}) was not saved: {final}", file=sys.stderr)
        return 1
    print(f"done: step {outcome.step}; " + ", ".join(f"{k} {v:.4g}" for k, v in {**outcome.last_metrics,
                                                                                  **outcome.last_eval}.items()
                                                     if isinstance(v, float)))
    return 0


def main(argv=None) -> int:
    """The command line: parse, lock the run folder, run; returns the exit status (see `_report`; 2 for a bad
    setting or file, with one ``train.py: error:`` line)."""
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    from ..experiment import load_config
    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    from ..training.host import keep_freed_memory
    keep_freed_memory()  # before any JAX backend starts: XLA:CPU steps stop re-faulting their buffers
    _init_distributed(cfg.distributed)
    import jax

    from ..training.parallel import all_processes
    from ..training.run_lock import RunLock
    run_dir = Path(cfg.train.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        print(f"train.py: error: train.run_dir={run_dir} is a file, not a folder; name a new or existing run folder",
              file=sys.stderr)
        return 2
    lock = RunLock(run_dir) if jax.process_index() == 0 else None  # one run per folder (process 0 holds it)
    try:
        refused = None
        if lock is not None:
            try:
                lock.acquire()
            except ValueError as err:
                refused = err
        if not all_processes(refused is None):  # every process stops, not process 0 alone
            raise refused or ValueError(f"train.run_dir {str(run_dir)!r} is in use by another run")
        return _run(cfg, args.overrides, run_dir)
    except ValueError as err:  # bad settings or data, found before (or, like a mesh, while) building the run
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    finally:
        if lock is not None:
            lock.release()


def cli() -> int:
    """``python train.py ...``: `main` with Ctrl-C watched from the start (a first Ctrl-C saves a checkpoint at the
    step it stops; one before the first step, or a second one, ends in one line, exit 130)."""
    watch_ctrl_c()
    try:
        return main()
    except KeyboardInterrupt:
        print("train.py: interrupted (Ctrl-C); the checkpoints saved before stay, and the same command resumes from "
              "the latest", file=sys.stderr)
        return 130
