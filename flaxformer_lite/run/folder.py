"""A run folder (``train.run_dir``): what train.py reads from it and writes into it besides the loop's own files
(checkpoints, metrics), and the checks that keep a resume honest: the saved config, the run's tokenizer, the token
store's place, and the refusals of a resume with another architecture or tokenizer, each made before anything in
the folder is rewritten. Every file is read and written as a plain file of the folder, never through a link.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from ..safe_io import refuse_link, write_atomic
from .model import RUNTIME_MODEL_KEYS

TOKENIZER_DATA_KEYS = ("path", "format", "text_field", "source_field", "tokenizer", "vocab_size", "tokenizer_type",
                       "character_coverage", "byte_fallback", "normalization")  # what the tokenizer is trained from


EXACT_RESUME_KEYS = {"train": ("seed", "batch_size", "seq_len", "steps"), "data": ("eval_fraction",), "optim": None}


def save_tokenizer(tok, run_dir: Path) -> None:
    """Keep the run's tokenizer in its folder (a pretrained or given one too), so the folder stands alone."""
    if hasattr(tok, "save"):  # written aside and renamed: a crash never leaves half a tokenizer
        write_atomic(run_dir / "tokenizer.model", tok.proto)
    elif hasattr(tok, "hf") and not (run_dir / "tokenizer").exists():
        tok.hf.save_pretrained(str(run_dir / "tokenizer"))


def saved_config(run_dir: Path) -> dict:
    """The run folder's config.yaml as a dict, its renamed keys under their new names (a folder written before a
    rename resumes); {} if there is none or it cannot be read; `ValueError` if it is a symbolic link (the run reads
    only its own files)."""
    from ..experiment import renamed
    refuse_link(run_dir / "config.yaml")
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return renamed(saved, note=False) if isinstance(saved, dict) else {}


def has_checkpoints(run_dir: Path) -> bool:
    folder = run_dir / "checkpoints"
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def run_tokenizer(run_dir: Path, cfg):
    """The run folder's tokenizer when it was trained from these data settings (a resumed run), else None (one is
    trained). One from other settings is refused if checkpoints were trained with it, else replaced; checkpoints
    without their tokenizer are refused."""
    path = run_dir / "tokenizer.model"
    refuse_link(path)  # the run's tokenizer is a file of its folder, never one a link names
    if not path.is_file():
        if has_checkpoints(run_dir) and not cfg.data.tokenizer and not (run_dir / "tokenizer").is_dir():
            raise ValueError(f"{run_dir} holds checkpoints but not the tokenizer.model they were trained with; put "
                             "it back, or give a new train.run_dir")
        return None
    from ..data import Tokenizer
    from ..experiment import to_dict
    old = saved_config(run_dir).get("data", {})
    new = to_dict(cfg)["data"]
    changed = [f"data.{k}: {old.get(k)!r} -> {new[k]!r}" for k in TOKENIZER_DATA_KEYS if old.get(k) != new[k]]
    if not changed:
        return Tokenizer.load(path)
    if has_checkpoints(run_dir):
        raise ValueError(f"{run_dir} holds checkpoints trained with a tokenizer of other data settings "
                         f"({'; '.join(changed)}); resume with the same settings, or give a new train.run_dir")
    print(f"train.py: note: training a new tokenizer ({'; '.join(changed)})", file=sys.stderr)
    return None


def check_resume(run_dir: Path, cfg, skip=()) -> None:
    """Refuse, before anything in ``run_dir`` is rewritten, to resume checkpoints of another architecture (keys in
    ``skip`` are not compared yet: those the tokenizer sets)."""
    from ..experiment import to_dict
    if not has_checkpoints(run_dir):
        return
    old = saved_config(run_dir).get("model", {})
    new = yaml.safe_load(yaml.safe_dump(to_dict(cfg)["model"]))
    changed = [f"model.{k}: {old[k]!r} -> {v!r}" for k, v in new.items()
               if k in old and k not in RUNTIME_MODEL_KEYS and k not in skip and old[k] != v]  # a newer key: no say
    if changed:
        raise ValueError(f"{run_dir} holds checkpoints of another model ({'; '.join(changed)}); resume with the "
                         f"same model, or give a new train.run_dir")
    if not skip:  # the last check: say once what makes the resumed run differ from an uninterrupted one
        _note_inexact_resume(saved_config(run_dir), yaml.safe_load(yaml.safe_dump(to_dict(cfg))))


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


def write_run_files(run_dir: Path, cfg, data, new_tokenizer: bool) -> None:
    """The tokenizer (when it is new to the folder), config.yaml and labels.json: written only once every check has
    passed. A replaced tokenizer goes in with config.yaml removed first, so a crash between the two never leaves a
    tokenizer beside the settings of another."""
    from ..experiment import to_dict
    if new_tokenizer:
        (run_dir / "config.yaml").unlink(missing_ok=True)
        save_tokenizer(data.tokenizer, run_dir)
    write_atomic(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if data.label_names is not None:
        write_atomic(run_dir / "labels.json", json.dumps(data.label_names) + "\n")
    print(f"{data.num_train_examples:,} training examples; tokenizer {data.tokenizer.vocab_size} ids; unigram "
          f"entropy of the training tokens {data.unigram_entropy:.3f} nats (a model that ignores context gets no "
          "lower)")


def store_args(cfg, run_dir: Path) -> dict:
    """Where the token store is, when a store may not be replaced (checkpoints were trained on it, or the user
    prepared it), and the barrier of a multi-process run."""
    import jax
    given = bool(cfg.data.store)
    refuse = None
    if given:
        refuse = (f"data.store {cfg.data.store!r} holds another corpus or tokenizer than data.path="
                  f"{cfg.data.path or '(built-in)'}; prepare it again (python -m flaxformer_lite.run.prepare), or "
                  "leave data.store unset")
    elif has_checkpoints(run_dir) and not cfg.data.allow_corpus_change:
        refuse = (f"the corpus changed since this run's checkpoints were written (data.path="
                  f"{cfg.data.path or '(built-in)'} no longer matches {run_dir / 'store'}); give a new "
                  "train.run_dir, or set data.allow_corpus_change=true to go on with the new corpus")

    def sync():
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("flaxformer_lite token store")
    return {"store": cfg.data.store if given else run_dir / "store", "refuse": refuse, "sync": sync,
            "progress": cfg.train.progress}
