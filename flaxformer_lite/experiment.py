"""The experiment config tree: frozen dataclasses, YAML files, dotted ``key.sub=value`` overrides, validation.

    cfg = load_config("configs/gpt-tiny.yaml", ["train.steps=100", "model.attention=linear"])

Every key is typed; an unknown key, a value of the wrong type or one out of its range (`RANGES`) fails before any
work, listing the valid keys, choices or bounds. ``model.preset`` names a `ModelConfig` preset and the other
``model.*`` keys override it.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .data.corpus import TEXT_UNITS
from .data.registry import OBJECTIVES
from .config_text import Text, merge, parse_overrides, read_yaml
from .messages import short, short_repr
from .models.config import ModelConfig, preset


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Corpus, tokenizer and objective.

    path: '' for the built-in corpus (docstrings of the installed Python standard library), else a file, glob,
    directory saved with ``save_to_disk``, or a hub dataset name. text_unit: one document of a plain-text file is a
    paragraph (blank-line separated), the whole file (one continuous stream, as nanoGPT reads tiny Shakespeare) or a
    line. objective: causal_lm | prefix_lm | mlm | span_corruption | seq2seq | classify (fine-tuning: ``text_field``
    and optional ``text_pair_field`` -> the ``label_field`` column, ints or strings). store: the token store of a
    text objective's corpus (causal_lm, prefix_lm, mlm, span_corruption): tokenized once, read through a memmap; ''
    keeps it in the run folder (``<run_dir>/store``); a folder made by ``python -m flaxformer_lite.run.prepare`` is
    reused. eval_path: a held-out corpus for evaluation (its own store, ``<store>-eval``); '' holds out the last
    ``eval_fraction`` of the corpus's tokens. workers: encoding processes when writing it (0 or 1: this process,
    SentencePiece's threads on every core). allow_corpus_change: resume on a corpus that changed since the
    checkpoints. shards (seq2seq and classify, which read in memory): contiguous reading shards (0: one per
    process); each process reads and tokenizes only its block of shards, and each global batch takes an equal chunk
    from every shard.
    """

    path: str = ""
    format: str = "auto"
    text_unit: str = "paragraph"
    text_field: str = "text"
    source_field: str = "source"
    target_field: str = "target"
    text_pair_field: str = ""
    label_field: str = "label"
    objective: str = "causal_lm"
    tokenizer: str = ""
    vocab_size: int = 4096
    tokenizer_type: str = "unigram"
    character_coverage: float = 0.9995
    byte_fallback: bool = True
    normalization: str = "nmt_nfkc"
    eval_fraction: float = 0.02
    mlm_probability: float = 0.15
    noise_density: float = 0.15
    mean_span_length: float = 3.0
    prefix_fraction: float = 0.5
    shards: int = 0
    store: str = ""
    eval_path: str = ""
    workers: int = 0
    allow_corpus_change: bool = False


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optax optimizer and schedule. schedule: cosine (linear warmup + cosine) | noam | constant."""

    name: str = "adamw"
    lr: float = 1e-3
    schedule: str = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    grad_accum: int = 1
    label_smoothing: float = 0.0
    z_loss: float = 0.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop: steps, batch, length, logging, evaluation, checkpoints, run folder, seed, samples at the end.
    init_from: start from pretrained weights: a Hugging Face model folder (config.json) or a train.py run folder
    (config.yaml + checkpoints/); the model config and tokenizer come from it."""

    steps: int = 600
    batch_size: int = 16
    seq_len: int = 128
    log_every: int = 20
    eval_every: int = 200
    eval_batches: int = 4
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    run_dir: str = "runs/default"
    seed: int = 0
    samples: int = 3
    sample_tokens: int = 40
    progress: bool = True
    init_from: str = ""


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """mode: jit (NamedSharding over a mesh) | pmap. mesh: comma-separated ``axis=size`` over data, fsdp, tensor;
    -1 takes the remaining devices (default ``data=-1``)."""

    mode: str = "jit"
    mesh: str = "data=-1"


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-host set-up for `jax.distributed.initialize`; empty/negative values defer to its environment."""

    coordinator: str = ""
    num_processes: int = 0
    process_id: int = -1


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """The whole run."""

    model: ModelConfig = dataclasses.field(default_factory=lambda: preset("gpt-tiny"))
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)


CHOICES = {
    "data.format": ("auto", "text", "json", "csv", "parquet", "saved", "hub"),
    "data.text_unit": TEXT_UNITS,
    "data.objective": tuple(OBJECTIVES),
    "data.tokenizer_type": ("unigram", "bpe", "char"),
    "data.normalization": ("nmt_nfkc", "nfkc", "identity", "nmt_nfkc_cf", "nfkc_cf"),
    "optim.name": ("adamw", "adam"),
    "optim.schedule": ("cosine", "noam", "constant"),
    "parallel.mode": ("jit", "pmap"),
}


@dataclasses.dataclass(frozen=True)
class Interval:
    """Numbers from ``low`` to ``high``; ``open`` names the ends left out ("low", "high" or "both")."""

    low: float = -math.inf
    high: float = math.inf
    open: str = ""

    def __contains__(self, value) -> bool:
        above = value > self.low if self.open in ("low", "both") else value >= self.low
        below = value < self.high if self.open in ("high", "both") else value <= self.high
        return above and below

    def __str__(self) -> str:
        left = "(" if self.open in ("low", "both") or self.low == -math.inf else "["
        right = ")" if self.open in ("high", "both") or self.high == math.inf else "]"
        show = lambda x: str(int(x)) if math.isfinite(x) and float(x).is_integer() else f"{x:g}"  # noqa: E731
        return f"{left}{show(self.low)}, {show(self.high)}{right}"


POSITIVE, NON_NEGATIVE, FRACTION = Interval(1), Interval(0), Interval(0, 1, "high")
RANGES = {  # numeric keys with bounds (0 means "off" where allowed: eval_every, samples, clip_norm, shards)
    "data.eval_fraction": FRACTION,
    "data.mlm_probability": Interval(0, 1, "low"),
    "data.noise_density": Interval(0, 1, "both"),
    "data.mean_span_length": Interval(1),
    "data.prefix_fraction": Interval(0, 1, "both"),
    "data.vocab_size": Interval(4, 2**24),  # SentencePiece's ids are int32; 16.7M is beyond any tokenizer trained
    "data.shards": NON_NEGATIVE,
    "data.workers": NON_NEGATIVE,
    "optim.lr": NON_NEGATIVE,  # 0 freezes the weights (a check, or to evaluate)
    "optim.warmup_steps": NON_NEGATIVE,
    "optim.min_lr_ratio": Interval(0, 1),
    "optim.b1": FRACTION,
    "optim.b2": FRACTION,
    "optim.eps": NON_NEGATIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.clip_norm": NON_NEGATIVE,
    "optim.grad_accum": POSITIVE,
    "optim.label_smoothing": FRACTION,
    "optim.z_loss": NON_NEGATIVE,
    "train.steps": POSITIVE,
    "train.seed": Interval(0, 2**32 - 1),  # a PRNG key's and NumPy's seed: unsigned 32 bits
    "train.batch_size": POSITIVE,
    "train.seq_len": Interval(2),
    "train.log_every": POSITIVE,
    "train.eval_every": NON_NEGATIVE,
    "train.eval_batches": POSITIVE,
    "train.checkpoint_every": POSITIVE,
    "train.keep_checkpoints": POSITIVE,
    "train.samples": NON_NEGATIVE,
    "train.sample_tokens": POSITIVE,
    "distributed.num_processes": NON_NEGATIVE,
    "distributed.process_id": Interval(-1),
}


def _field_type(cls, name):
    return typing.get_type_hints(cls)[name]


def _parsed(key: str, value: Any) -> Any:
    """``value`` with every `Text` in it (a mapping's too: ``model.rope_scaling.factor=16``) read as YAML."""
    if isinstance(value, Text):
        return value.parsed(key)
    if isinstance(value, dict):
        return {k: _parsed(f"{key}.{k}", v) for k, v in value.items()}
    return value


PATH_KEYS = ("data.path", "data.tokenizer", "data.store", "data.eval_path", "train.run_dir", "train.init_from")


def _coerce(key: str, value: Any, kind) -> Any:
    """Check (and where lossless, convert) ``value`` to the annotated type ``kind``, then its choices or range; a
    path key's leading ``~`` becomes the home folder (the shell leaves ``key=~/x`` alone)."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        options = [k for k in typing.get_args(kind) if k is not type(None)]
        if value is None or (isinstance(value, Text) and value.parsed(key) is None):
            return None
        return _coerce(key, value, options[0])
    value = str(value) if isinstance(value, Text) and kind is str else _parsed(key, value)
    value = _convert(key, value, kind)
    if key in PATH_KEYS and value:
        value = os.path.expanduser(value)
    if key in CHOICES and value not in CHOICES[key]:
        raise ValueError(f"{key} must be one of {list(CHOICES[key])}, got {short_repr(value)}")
    if key in RANGES and not (math.isfinite(value) and value in RANGES[key]):
        raise ValueError(f"{key} must be in {RANGES[key]}, got {short_repr(value)}")
    return value


def _convert(key: str, value: Any, kind) -> Any:
    """``value`` as ``kind`` where that is lossless (int -> float, "1e-4" -> float, "true" -> bool), else a
    `ValueError` for a value of another type."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    exact = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind in (int, float, bool, str) and not exact:
        raise ValueError(f"{key} must be {kind.__name__}, got {short_repr(value)} ({type(value).__name__})")
    return value


def _build(cls, values: dict, prefix: str):
    """A ``cls`` from nested ``values``; unknown keys raise listing the valid ones."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields) - ({"preset"} if cls is ModelConfig else set()))
    if unknown:
        raise ValueError(f"unknown config key {prefix}{short(unknown[0])}; valid keys under {prefix or 'the top level'}: "
                         f"{sorted(fields) + (['preset'] if cls is ModelConfig else [])}")
    kwargs = {}
    for name, value in values.items():
        if name == "preset":
            continue
        kind = _field_type(cls, name)
        if dataclasses.is_dataclass(kind):
            if isinstance(value, Text):  # a whole section given after one "=": its keys are read as YAML
                value = value.parsed(f"{prefix}{name}")
            if not isinstance(value, dict):
                raise ValueError(f"{prefix}{name} must be a mapping of keys, got {short_repr(value)}")
            kwargs[name] = _build(kind, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", value, kind)
    if cls is ModelConfig:
        base = preset(values.get("preset", "gpt-tiny"))
        scaling = kwargs.get("rope_scaling")
        if isinstance(scaling, dict) and base.rope_scaling is not None:  # model.rope_scaling.factor=16 on a preset
            kwargs["rope_scaling"] = {**dataclasses.asdict(base.rope_scaling), **scaling}
        return dataclasses.replace(base, **kwargs)
    return cls(**kwargs)


# config keys renamed: the old name still loads (a file, an override, a run folder's config.yaml) for one release,
# with a one-line note naming the new one
RENAMED = {"model.linear_gate": "model.recurrent_gate"}


def renamed(values: dict, note: bool = True) -> dict:
    """``values`` (a nested config dict) with each `RENAMED` key moved to its new name, noted on stderr unless
    ``note`` is False; `ValueError` when both names are given."""
    out = {section: dict(keys) if isinstance(keys, dict) else keys for section, keys in values.items()}
    for old, new in RENAMED.items():
        (section, key), (_, new_key) = old.split("."), new.split(".")
        keys = out.get(section)
        if not isinstance(keys, dict) or key not in keys:
            continue
        if new_key in keys:
            raise ValueError(f"{old} and {new} are one key (the first its old name); give only {new}")
        keys[new_key] = keys.pop(key)
        if note:
            print(f"note: {old} is now {new}; the old name goes in the next release", file=sys.stderr)
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML file (optional), apply dotted overrides, and validate everything."""
    values: dict = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"--config {path}: no such file")
        try:
            values = read_yaml(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise ValueError(f"--config {path}: not a text file (a YAML config is UTF-8 text)") from None
        except yaml.YAMLError as err:
            raise ValueError(f"--config {path}: not valid YAML: {' '.join(str(err).split())[:300]}") from None
        if not isinstance(values, dict):
            raise ValueError(f"--config {path}: the top level must be a mapping of sections")
    values = merge(renamed(values), renamed(parse_overrides(overrides or [])))
    return _build(ExperimentConfig, values, "")


def to_dict(cfg) -> dict:
    """A plain nested dict of the config (for YAML and checkpoints)."""
    return dataclasses.asdict(cfg)


def describe_keys() -> list[tuple[str, str, str]]:
    """``(key, type, default)`` for every config key, for ``--help``."""
    rows = []

    def walk(cls, obj, prefix):
        for f in dataclasses.fields(cls):
            kind, value = _field_type(cls, f.name), getattr(obj, f.name)
            if dataclasses.is_dataclass(kind):
                walk(kind, value, f"{prefix}{f.name}.")
            else:
                key = f"{prefix}{f.name}"
                name = getattr(kind, "__name__", re.sub(r"\b[\w.]+\.(\w+)", r"\1", str(kind)))
                bounds = f" {list(CHOICES[key])}" if key in CHOICES else f" in {RANGES[key]}" if key in RANGES else ""
                rows.append((key, name + bounds, repr(value)))
        if cls is ModelConfig:
            rows.append((f"{prefix}preset", "str (a ModelConfig preset)", "'gpt-tiny'"))

    walk(ExperimentConfig, ExperimentConfig(), "")
    return rows
