"""Starting a run from pretrained weights (``train.init_from``): a Hugging Face model folder or a train.py run folder
-> its `ModelConfig`, parameters and tokenizer; and grafting those parameters into a fine-tuning model.

Glue between interop/, training/checkpoint.py, data/ and experiment.py; models know nothing of it.
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
        params = jax.device_get(nn.unbox(variables["params"]))  # host copies: grafting places them itself
        return Pretrained(model.cfg, params, HFTokenizer.from_folder(folder), str(folder))
    if (folder / "config.yaml").is_file() and (folder / "checkpoints").is_dir():
        from .experiment import load_config
        from .data.tokenizer import Tokenizer
        from .safe_io import refuse_link
        from .training.checkpoint import Checkpoints
        for name in ("config.yaml", "tokenizer.model", "tokenizer"):  # the run's own files, never a link's
            refuse_link(folder / name)
        cfg = load_config(folder / "config.yaml").model
        ckpt = Checkpoints(folder / "checkpoints", async_save=False)
        try:
            params, _ = ckpt.restore_params()
        finally:
            ckpt.close()
        params = jax.device_get(params)
        if "backbone" in params:  # a fine-tuned run (e.g. a SequenceClassifier): its backbone is the model
            params = params["backbone"]
        if (folder / "tokenizer.model").is_file():
            tokenizer = Tokenizer.load(folder / "tokenizer.model")
        elif (folder / "tokenizer").is_dir():
            from .data.hf_tokenizer import HFTokenizer
            tokenizer = HFTokenizer.from_folder(folder / "tokenizer")
        else:
            raise ValueError(f"{folder} has no tokenizer.model (nor a Hugging Face tokenizer/ folder)")
        return Pretrained(cfg, params, tokenizer, str(folder))
    raise ValueError(f"train.init_from {str(path)!r} is neither a Hugging Face model folder (config.json) nor a "
                     "train.py run folder (config.yaml + checkpoints/)")


def graft(params, pretrained, into: str | None = "backbone"):
    """``params`` (a fine-tuning model's, e.g. a `SequenceClassifier`'s; arrays or `jax.ShapeDtypeStruct`s) with
    ``params[into]`` (the whole tree when ``into`` is None) replaced by the matching ``pretrained`` params, as host
    arrays of the model's dtypes. Pretrained entries the model does not use (e.g. pre-training heads) are left out;
    a model parameter missing from ``pretrained``, or of another shape, raises `ValueError`."""
    if into is None:
        return graft({"all": params}, pretrained, "all")["all"]
    if into not in params:
        raise ValueError(f"the model has no {into!r} parameters to start from pretrained weights")
    flat_target = _flatten(params[into])
    flat_source = _flatten(pretrained)
    missing = [k for k in flat_target if k not in flat_source]
    if missing:
        raise ValueError(f"the pretrained weights lack {len(missing)} parameters the model needs, e.g. "
                         f"{'/'.join(missing[0])}")
    wrong = [k for k, v in flat_target.items() if _shape(flat_source[k]) != _shape(v)]
    if wrong:
        k = wrong[0]
        raise ValueError(f"pretrained {'/'.join(k)} has shape {_shape(flat_source[k])}, the model wants "
                         f"{_shape(flat_target[k])}")
    grafted = jax.tree_util.tree_map_with_path(
        lambda path, x: np.asarray(flat_source[tuple(_key(p) for p in path)], dtype=x.dtype), params[into])
    return {**params, into: grafted}


def _shape(x) -> tuple:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


def _key(entry) -> str:
    return str(getattr(entry, "key", getattr(entry, "name", entry)))


def _flatten(tree) -> dict:
    return {tuple(_key(p) for p in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
