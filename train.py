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
import dataclasses
import json
import os
import sys
from pathlib import Path

import yaml

from flaxformer_lite.interrupt import watch_ctrl_c
from flaxformer_lite.safe_io import refuse_link, write_atomic


def _help_text() -> str:
    from flaxformer_lite.experiment import describe_keys
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


def _sample_fn(model, data, cfg):
    """Continuations of a few held-out prompts (objectives that declare a prompt key), or None."""
    import jax
    import jax.numpy as jnp

    import flaxformer_lite as ffl
    from flaxformer_lite.data import get_objective
    key = get_objective(data.objective).prompt_key
    if cfg.train.samples <= 0 or key is None:
        return None
    tok = data.tokenizer

    def sample(params):
        prompts = jnp.asarray(data.eval.batch(0)[key][:cfg.train.samples, :16])
        start = prompts.shape[1] if key == "tokens" else 0  # a decoder continues its prompt; an encoder-decoder
        n = min(cfg.train.sample_tokens, model.cfg.max_len - start - 1)  # answers it
        if n < 1:
            return []  # no room after the prompt: nothing to sample
        out = ffl.generate(model, {"params": params}, prompts, n, temperature=0.8, top_k=40,
                           rng=jax.random.PRNGKey(cfg.train.seed), eos_id=tok.eos_id)
        return [f"{tok.decode(p)} ||| {tok.decode(o[start:])}" for p, o in zip(prompts.tolist(), out.tolist())]
    return sample


RUNTIME_MODEL_KEYS = ("dtype", "remat", "dropout_rate", "attention_dropout_rate", "attention_impl")  # not architecture
TOKENIZER_MODEL_KEYS = ("vocab_size", "pad_id", "bos_id", "eos_id")  # set from the run's tokenizer


def _model_overrides(overrides) -> list[str]:
    """The ``model.*`` keys given on the command line, without the prefix."""
    return [o.split("=", 1)[0].strip()[len("model."):] for o in overrides if o.startswith("model.")]


def _note_ignored(keys, why: str) -> None:
    if keys:
        print(f"train.py: note: {why}; ignoring {', '.join('model.' + k for k in keys)}", file=sys.stderr)


def _load_pretrained(cfg, overrides):
    """``train.init_from``'s weights, tokenizer and model config (with the ``model.*`` overrides that leave the
    architecture alone), or None."""
    if not cfg.train.init_from:
        return None
    from flaxformer_lite.pretrained import load_pretrained
    pretrained = load_pretrained(cfg.train.init_from)
    given = _model_overrides(overrides)
    kept = {k: getattr(cfg.model, k) for k in given if k in RUNTIME_MODEL_KEYS}
    _note_ignored([k for k in given if k not in RUNTIME_MODEL_KEYS], "the architecture comes from train.init_from "
                  f"(allowed: {', '.join('model.' + k for k in RUNTIME_MODEL_KEYS)})")
    pretrained.cfg = dataclasses.replace(pretrained.cfg, **kept)
    print(f"starting from {pretrained.source} ({pretrained.cfg.model}, {pretrained.cfg.num_layers} layers)")
    return pretrained


def _save_tokenizer(tok, run_dir: Path) -> None:
    """Keep the run's tokenizer in its folder (a pretrained or given one too), so the folder stands alone."""
    if hasattr(tok, "save"):  # written aside and renamed: a crash never leaves half a tokenizer
        write_atomic(run_dir / "tokenizer.model", tok.proto)
    elif hasattr(tok, "hf") and not (run_dir / "tokenizer").exists():
        tok.hf.save_pretrained(str(run_dir / "tokenizer"))


TOKENIZER_DATA_KEYS = ("path", "format", "text_field", "source_field", "tokenizer", "vocab_size", "tokenizer_type",
                       "character_coverage", "byte_fallback", "normalization")  # what the tokenizer is trained from


def _saved_config(run_dir: Path) -> dict:
    """The run folder's config.yaml as a dict ({} if there is none or it cannot be read; `ValueError` if it is a
    symbolic link: the run reads only its own files)."""
    refuse_link(run_dir / "config.yaml")
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return saved if isinstance(saved, dict) else {}


def _has_checkpoints(run_dir: Path) -> bool:
    folder = run_dir / "checkpoints"
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def _run_tokenizer(run_dir: Path, cfg):
    """The run folder's tokenizer when it was trained from these data settings (a resumed run), else None (one is
    trained). One from other settings is refused if checkpoints were trained with it, else replaced; checkpoints
    without their tokenizer are refused."""
    path = run_dir / "tokenizer.model"
    refuse_link(path)  # the run's tokenizer is a file of its folder, never one a link names
    if not path.is_file():
        if _has_checkpoints(run_dir) and not cfg.data.tokenizer and not (run_dir / "tokenizer").is_dir():
            raise ValueError(f"{run_dir} holds checkpoints but not the tokenizer.model they were trained with; put "
                             "it back, or give a new train.run_dir")
        return None
    from flaxformer_lite.data import Tokenizer
    from flaxformer_lite.experiment import to_dict
    old = _saved_config(run_dir).get("data", {})
    new = to_dict(cfg)["data"]
    changed = [f"data.{k}: {old.get(k)!r} -> {new[k]!r}" for k in TOKENIZER_DATA_KEYS if old.get(k) != new[k]]
    if not changed:
        return Tokenizer.load(path)
    if _has_checkpoints(run_dir):
        raise ValueError(f"{run_dir} holds checkpoints trained with a tokenizer of other data settings "
                         f"({'; '.join(changed)}); resume with the same settings, or give a new train.run_dir")
    print(f"train.py: note: training a new tokenizer ({'; '.join(changed)})", file=sys.stderr)
    return None


def _model_and_task(cfg, data, pretrained, overrides=()):
    """The model config (fitted to the tokenizer, or the pretrained one), the model, and its task."""
    from flaxformer_lite.models import SequenceClassifier, build
    from flaxformer_lite.training import make_task
    tok = data.tokenizer
    if pretrained is None:
        _note_ignored([k for k in _model_overrides(overrides) if k in TOKENIZER_MODEL_KEYS],
                      "the vocabulary and special ids come from the tokenizer (set data.vocab_size instead)")
        model_cfg = dataclasses.replace(cfg.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id, bos_id=tok.bos_id,
                                        eos_id=tok.eos_id)
    else:
        model_cfg = pretrained.cfg
        if tok.vocab_size > model_cfg.vocab_size:
            raise ValueError(f"the tokenizer of {pretrained.source} has {tok.vocab_size} ids, more than the model's "
                             f"vocabulary ({model_cfg.vocab_size})")
    cfg = dataclasses.replace(cfg, model=model_cfg)
    classify = cfg.data.objective == "classify"
    model = SequenceClassifier(model_cfg, len(data.label_names)) if classify else build(model_cfg)
    task = make_task(cfg.data.objective, model, model_cfg.model, label_smoothing=cfg.optim.label_smoothing,
                     z_loss=cfg.optim.z_loss)
    return cfg, model, task


def _preflight(cfg, pretrained) -> None:
    """Every check that needs no data, run before any corpus is read or tokenizer trained."""
    import jax

    from flaxformer_lite.data import get_objective
    from flaxformer_lite.data.pipeline import reading_shards
    from flaxformer_lite.training import check_layout
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


def _check_resume(run_dir: Path, cfg, skip=()) -> None:
    """Refuse, before anything in ``run_dir`` is rewritten, to resume checkpoints of another architecture (keys in
    ``skip`` are not compared yet: those the tokenizer sets)."""
    from flaxformer_lite.experiment import to_dict
    if not _has_checkpoints(run_dir):
        return
    old = _saved_config(run_dir).get("model", {})
    new = yaml.safe_load(yaml.safe_dump(to_dict(cfg)["model"]))
    changed = [f"model.{k}: {old[k]!r} -> {v!r}" for k, v in new.items()
               if k in old and k not in RUNTIME_MODEL_KEYS and k not in skip and old[k] != v]  # a newer key: no say
    if changed:
        raise ValueError(f"{run_dir} holds checkpoints of another model ({'; '.join(changed)}); resume with the "
                         f"same model, or give a new train.run_dir")
    if not skip:  # the last check: say once what makes the resumed run differ from an uninterrupted one
        _note_inexact_resume(_saved_config(run_dir), yaml.safe_load(yaml.safe_dump(to_dict(cfg))))


EXACT_RESUME_KEYS = {"train": ("seed", "batch_size", "seq_len", "steps"), "data": ("eval_fraction",), "optim": None}


def _note_inexact_resume(old: dict, new: dict) -> None:
    """A note naming the `EXACT_RESUME_KEYS` (None: the whole section) that differ from the checkpoints' config: a
    resume with them is allowed, but it reads other batches or follows another learning-rate schedule."""
    changed = [f"{section}.{k}: {old[section][k]!r} -> {new[section][k]!r}"
               for section, keys in EXACT_RESUME_KEYS.items()
               for k in (keys or sorted(new.get(section, {})))
               if k in old.get(section, {}) and k in new.get(section, {}) and old[section][k] != new[section][k]]
    if changed:
        print(f"train.py: note: resuming with settings other than the checkpoints' ({'; '.join(changed)}): the "
              "batches, the learning-rate schedule or the optimizer differ from an uninterrupted run's",
              file=sys.stderr)


def _grafter(pretrained, objective):
    """warm_start for the loop: the pretrained weights into the backbone (classify) or the whole model."""
    from flaxformer_lite.pretrained import graft
    return lambda params: graft(params, pretrained.params, "backbone" if objective == "classify" else None)


def _write_run_files(run_dir: Path, cfg, data, new_tokenizer: bool) -> None:
    """The tokenizer (when it is new to the folder), config.yaml and labels.json: written only once every check has
    passed. A replaced tokenizer goes in with config.yaml removed first, so a crash between the two never leaves a
    tokenizer beside the settings of another."""
    from flaxformer_lite.experiment import to_dict
    if new_tokenizer:
        (run_dir / "config.yaml").unlink(missing_ok=True)
        _save_tokenizer(data.tokenizer, run_dir)
    write_atomic(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if data.label_names is not None:
        write_atomic(run_dir / "labels.json", json.dumps(data.label_names) + "\n")
    print(f"{data.num_train_examples:,} training examples; tokenizer {data.tokenizer.vocab_size} ids; unigram "
          f"entropy of the training tokens {data.unigram_entropy:.3f} nats (a model that ignores context gets no "
          "lower)")


def _store_args(cfg, run_dir: Path) -> dict:
    """Where the token store is, when a store may not be replaced (checkpoints were trained on it, or the user
    prepared it), and the barrier of a multi-process run."""
    import jax
    given = bool(cfg.data.store)
    refuse = None
    if given:
        refuse = (f"data.store {cfg.data.store!r} holds another corpus or tokenizer than data.path="
                  f"{cfg.data.path or '(built-in)'}; prepare it again (python -m flaxformer_lite.data.prepare), or "
                  "leave data.store unset")
    elif _has_checkpoints(run_dir) and not cfg.data.allow_corpus_change:
        refuse = (f"the corpus changed since this run's checkpoints were written (data.path="
                  f"{cfg.data.path or '(built-in)'} no longer matches {run_dir / 'store'}); give a new "
                  "train.run_dir, or set data.allow_corpus_change=true to go on with the new corpus")

    def sync():
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("flaxformer_lite token store")
    return {"store": cfg.data.store if given else run_dir / "store", "refuse": refuse, "sync": sync,
            "progress": cfg.train.progress}


def _run(cfg, overrides, run_dir: Path) -> int:
    """Checks, data, model, training; the exit status."""
    import jax

    from flaxformer_lite.data import build_data
    from flaxformer_lite.training import NonFiniteLoss, train
    pretrained = _load_pretrained(cfg, overrides)
    _preflight(cfg, pretrained)
    if pretrained is None:
        _check_resume(run_dir, cfg, skip=TOKENIZER_MODEL_KEYS)
    tokenizer = pretrained.tokenizer if pretrained is not None else _run_tokenizer(run_dir, cfg)
    new_tokenizer = tokenizer is None or not (run_dir / "tokenizer.model").exists()
    data = build_data(cfg.data, seq_len=cfg.train.seq_len, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                      process_index=jax.process_index(), process_count=jax.process_count(), tokenizer=tokenizer,
                      **_store_args(cfg, run_dir))
    cfg, model, task = _model_and_task(cfg, data, pretrained, overrides)
    _check_resume(run_dir, cfg)
    write_files = (lambda step: _write_run_files(run_dir, cfg, data, new_tokenizer)) if jax.process_index() == 0 \
        else None  # once the checkpoint is restored: a resume refused there leaves config.yaml as it was
    try:
        outcome = train(cfg, model, data, task, sample_fn=_sample_fn(model, data, cfg),
                        warm_start=None if pretrained is None else _grafter(pretrained, cfg.data.objective),
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
    from flaxformer_lite.experiment import load_config
    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    from flaxformer_lite.training.host import keep_freed_memory
    keep_freed_memory()  # before any JAX backend starts: XLA:CPU steps stop re-faulting their buffers
    _init_distributed(cfg.distributed)
    import jax

    from flaxformer_lite.training.parallel import all_processes
    from flaxformer_lite.training.run_lock import RunLock
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


if __name__ == "__main__":
    watch_ctrl_c()
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C before the first step, or a second one during it: one line, no traceback
        print("train.py: interrupted (Ctrl-C); the checkpoints saved before stay, and the same command resumes from "
              "the latest", file=sys.stderr)
        sys.exit(130)
