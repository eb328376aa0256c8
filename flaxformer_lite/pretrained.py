"""Starting a run from pretrained weights (``train.init_from``): a Hugging Face model folder or a train.py run folder
-> its `ModelConfig`, parameters and tokenizer; and grafting those parameters into a fine-tuning model.

Glue between interop/, training/checkpoint.py, data/ and config.py; models know nothing of it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from .models import ModelConfig


@dataclasses.dataclass
class Pretrained:
    """A pretrained backbone: cfg (its `ModelConfig`), params (a pytree of arrays), tokenizer, source (the path)."""

    cfg: ModelConfig
    params: Any
    tokenizer: Any
    source: str


def load_pretrained(path: str | Path) -> Pretrained:
    """Read ``path``: a Hugging Face folder (``config.json`` + weights, via `interop.load_hf`, with its own
    tokenizer) or a train.py run folder (``config.yaml``, ``tokenizer.model``, ``checkpoints/``; the latest step)."""
    folder = Path(path)
    if (folder / "config.json").is_file():
        from .data.hf_tokenizer import HFTokenizer
        from .interop import load_hf
        model, variables = load_hf(folder)
        return Pretrained(model.cfg, nn.unbox(variables["params"]), HFTokenizer.from_folder(folder), str(folder))
    if (folder / "config.yaml").is_file() and (folder / "checkpoints").is_dir():
        from .config import load_config
        from .data.tokenizer import Tokenizer
        from .training.checkpoint import Checkpoints
        cfg = load_config(folder / "config.yaml").model
        ckpt = Checkpoints(folder / "checkpoints", async_save=False)
        try:
            params, _ = ckpt.restore_params()
        finally:
            ckpt.close()
        return Pretrained(cfg, params, Tokenizer.load(folder / "tokenizer.model"), str(folder))
    raise ValueError(f"train.init_from {str(path)!r} is neither a Hugging Face model folder (config.json) nor a "
                     "train.py run folder (config.yaml + checkpoints/)")


def graft(params, pretrained, into: str | None = "backbone"):
    """``params`` (a fine-tuning model's, e.g. a `SequenceClassifier`'s) with ``params[into]`` (the whole tree when
    ``into`` is None) replaced by the matching ``pretrained`` params. Pretrained entries the model does not use
    (e.g. pre-training heads) are left out; a model parameter missing from ``pretrained``, or of another shape,
    raises `ValueError`."""
    if into is None:
        return graft({"all": params}, pretrained, "all")["all"]
    flat_target = _flatten(params[into])
    flat_source = _flatten(pretrained)
    missing = [k for k in flat_target if k not in flat_source]
    if missing:
        raise ValueError(f"the pretrained weights lack {len(missing)} parameters the model needs, e.g. "
                         f"{'/'.join(missing[0])}")
    wrong = [k for k, v in flat_target.items() if tuple(np.shape(flat_source[k])) != tuple(np.shape(v))]
    if wrong:
        k = wrong[0]
        raise ValueError(f"pretrained {'/'.join(k)} has shape {np.shape(flat_source[k])}, the model wants "
                         f"{np.shape(flat_target[k])}")
    grafted = jax.tree_util.tree_map_with_path(
        lambda path, x: np.asarray(flat_source[tuple(_key(p) for p in path)], dtype=x.dtype), params[into])
    return {**params, into: grafted}


def _key(entry) -> str:
    return str(getattr(entry, "key", getattr(entry, "name", entry)))


def _flatten(tree) -> dict:
    return {tuple(_key(p) for p in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
