"""Hugging Face checkpoints: `load_hf` reads a model folder (config.json + model.safetensors, sharded safetensors, or
pytorch_model.bin when torch is installed) into our model and variables, and `save_hf` writes the same layout back,
for the families of one module each: gpt2.py (``GPT2LMHeadModel``/``GPT2Model``), bert.py (``BertModel``,
``BertForPreTraining``, ``BertForMaskedLM``, and folders saved without the ``bert.`` prefix, e.g. by
sentence-transformers) and llama.py (``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``,
``Qwen3ForCausalLM``). This module picks the family and moves the tensors; convert.py holds what the families share,
files.py reads and writes the files.

One mapping per family (HF tensor name <-> our parameter path, with the transposes between PyTorch's ``[out, in]``
Linear / GPT-2's ``[in, out]`` Conv1D and our ``[in, heads, head_dim]`` kernels) serves both directions, so load ->
save -> load is exact. Both directions check before converting: a config field the layout cannot express, a missing
or extra parameter, or a tensor of the wrong shape raises `ValueError` naming it. Loading trusts no size in
config.json: each is a positive int within `files.SIZE_LIMITS`, and the layer count, vocabulary, widths and head
layout must agree with the tensors present, all checked before anything is built.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..models import BERT, GPT, ModelConfig
from . import bert, gpt2, llama
from .files import check_sizes, read_json, read_tensors, write_export

SUPPORTED = {gpt2.MODEL_TYPE: gpt2.ARCHITECTURES, bert.MODEL_TYPE: bert.ARCHITECTURES,
             **{kind: (arch,) for kind, arch in llama.FAMILIES.items()}}


# -- configs ---------------------------------------------------------------------------------------------------------
def config_from_hf(hf: dict) -> ModelConfig:
    """A `ModelConfig` from a config.json dict; a field we cannot honour (or a missing ``vocab_size``) raises
    `ValueError` naming it."""
    if not isinstance(hf, Mapping):
        raise ValueError(f"config.json must hold a JSON object (a dict), got {type(hf).__name__}")
    kind = hf.get("model_type")
    archs = hf.get("architectures") or []
    if kind not in SUPPORTED or (archs and not set(archs) & set(SUPPORTED[kind])):
        raise ValueError(f"load_hf supports {', '.join(a for v in SUPPORTED.values() for a in v)}; this folder holds "
                         f"model_type={kind!r} architectures={archs}")
    if "vocab_size" not in hf:
        raise ValueError(f"config.json (model_type={kind!r}) has no vocab_size, which is required")
    check_sizes(hf)
    return {gpt2.MODEL_TYPE: gpt2, bert.MODEL_TYPE: bert}.get(kind, llama).config_from_hf(hf)


def _family(cfg: ModelConfig, model_type: str | None = None) -> ModuleType:
    """The module of the Hugging Face layout that writes ``cfg`` (gpt2, bert, or llama for a rotary GPT or a
    ``model_type`` of `llama.FAMILIES`); a ``model_type`` or model that none writes raises `ValueError`."""
    if model_type in llama.FAMILIES or (cfg.model == "gpt" and cfg.position == "rotary"):
        return llama
    if model_type not in (None, gpt2.MODEL_TYPE, bert.MODEL_TYPE):
        raise ValueError(f"save_hf model_type must be one of {list(SUPPORTED)} or None, got {model_type!r}")
    if cfg.model not in ("gpt", "bert"):
        raise ValueError(f"save_hf writes GPT and BERT models, not cfg.model={cfg.model!r}")
    family = gpt2 if cfg.model == "gpt" else bert
    if model_type not in (None, family.MODEL_TYPE):
        raise ValueError(f"save_hf model_type={model_type!r} cannot write cfg.model={cfg.model!r} (accepted: "
                         f"{family.MODEL_TYPE!r} or None)")
    return family


def config_to_hf(cfg: ModelConfig, model_type: str | None = None) -> dict:
    """config.json for ``cfg`` (GPT -> GPT2LMHeadModel, or with rotary positions the Llama family's ``model_type``:
    llama, mistral, qwen2, qwen3, None picking the one that expresses it; BERT -> BertForPreTraining); a field the
    layout cannot express raises `ValueError` naming it and the accepted values."""
    family = _family(cfg, model_type)
    return llama.config_to_hf(cfg, model_type) if family is llama else family.config_to_hf(cfg)


# -- the parameter mappings -----------------------------------------------------------------------------------------
def base_prefix(cfg: ModelConfig, names=None) -> str:
    """The prefix of the base model's tensor names: ``"transformer."``, ``"bert."`` or ``"model."`` (what `save_hf`
    writes, as ``GPT2LMHeadModel``, ``BertForPreTraining`` and ``LlamaForCausalLM`` do); given a folder's tensor
    ``names``, the one it uses: ``""`` for a bare base model (``GPT2Model``, ``BertModel``, sentence-transformers)."""
    base = _family(cfg).PREFIX
    return base if names is None or any(name.startswith(base) for name in names) else ""


def _mapping(cfg: ModelConfig, prefix: str | None = None) -> list:
    """``[(HF tensor name, our path, to ours, to HF)]``; ``prefix``: `base_prefix` (None: what `save_hf` writes)."""
    return _family(cfg).param_map(cfg, base_prefix(cfg) if prefix is None else prefix)


def _to_hf(cfg: ModelConfig, flat: dict, prefix: str | None = None) -> dict:
    """HF tensor name -> array, from our parameters as a flat ``{path: array}``."""
    flat = gpt2.join_qkv(flat) if _family(cfg) is gpt2 else flat
    return {hf_key: to_hf(flat[ours]) for hf_key, ours, _, to_hf in _mapping(cfg, prefix)}


def _flatten(params) -> dict:
    return {tuple(p.key for p in path): v for path, v in jax.tree_util.tree_flatten_with_path(nn.unbox(params))[0]}


def _layouts(model, prefix: str | None = None) -> tuple[dict, dict]:
    """``({our path: shape}, {HF tensor name: shape})`` of ``model``'s parameters, traced (nothing computed)."""
    def init():
        params = _flatten(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
        return params, _to_hf(model.cfg, params, prefix)
    return tuple({k: v.shape for k, v in tree.items()} for tree in jax.eval_shape(init))


def _listing(names: list, limit: int = 5) -> str:
    return f"{names[:limit]} (and {len(names) - limit} more)" if len(names) > limit else str(names)


# -- reading and writing -------------------------------------------------------------------------------------------
def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def load_hf(path: str | Path, *, dtype: str = "float32"):
    """``(model, variables)`` from a Hugging Face model folder (config.json + weights); see the module docstring.

    Head weights a checkpoint lacks (e.g. a ``BertModel`` has no MLM/NSP heads) are freshly initialised, with a
    warning naming them. ``dtype`` is the compute dtype of the returned model (params stay float32)."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: not a Hugging Face model folder (no config.json)")
    cfg = dataclasses.replace(config_from_hf(read_json(folder / "config.json")), dtype=dtype)
    tensors = read_tensors(folder)
    prefix = base_prefix(cfg, tensors)
    _check_sizes_against(tensors, cfg, prefix, folder)
    model = GPT(cfg) if cfg.model == "gpt" else BERT(cfg)
    shapes, hf_shapes = _layouts(model, prefix)
    flat, missing = {}, []
    for hf_key, ours, to_ours, _ in _mapping(cfg, prefix):
        if hf_key not in tensors:
            missing.append(hf_key)
        elif tuple(tensors[hf_key].shape) != hf_shapes[hf_key]:
            raise ValueError(f"{folder}: tensor {hf_key} has shape {tuple(tensors[hf_key].shape)}, but config.json "
                             f"needs {hf_shapes[hf_key]}")
        else:
            flat[ours] = np.asarray(to_ours(tensors[hf_key]), np.float32)
    family = _family(cfg)
    flat = gpt2.split_qkv(flat) if family is gpt2 else flat
    optional = tuple(name.format(prefix=prefix) for name in family.OPTIONAL)  # e.g. BertModel has no MLM/NSP heads
    missing_required = [k for k in missing if not k.startswith(optional)]
    if missing_required:
        raise ValueError(f"{folder}: weights missing for {_listing(missing_required)}")
    params = _fill(shapes, flat, model, missing)
    return model, {"params": params}


def _check_sizes_against(tensors: Mapping, cfg: ModelConfig, prefix: str, folder: Path) -> None:
    """Raise `ValueError` naming config.json's key, its value and what the weights hold where a size disagrees with
    the tensors present: the layers (numbered 0 .. n - 1), and each size a tensor's shape shows. Run before anything
    is built, so a huge size costs nothing."""
    layer_key, layers, dims = _family(cfg).size_sources(cfg, prefix)
    pattern = re.compile(re.escape(layers) + r"(\d{1,9})\.")
    found = sorted({int(m.group(1)) for name in tensors if (m := pattern.match(name))})
    if found != list(range(cfg.num_layers)):
        held = f"{len(found)} layers ({layers}{found[0]} .. {layers}{found[-1]})" if found else "no layers"
        raise ValueError(f"{folder}: config.json {layer_key}={cfg.num_layers}, but the weights hold {held}")
    for key, value, name, axis in dims:
        shape = tuple(tensors[name].shape) if name in tensors else None  # a missing tensor is named later
        if shape is not None and (len(shape) <= axis or shape[axis] != value):
            raise ValueError(f"{folder}: config.json {key} gives {value}, but tensor {name} has shape {shape}")


def _fill(shapes: dict, flat: dict, model, missing: list):
    """Our param tree from the converted tensors (shapes already checked); absent (head) params come from a fresh
    init."""
    fresh = None
    out = {}
    for key in shapes:
        if key in flat:
            _set(out, key, jnp.asarray(flat[key]))
        else:
            if fresh is None:
                fresh = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
            _set(out, key, _get(fresh, key))
    if missing:
        warnings.warn(f"not in the checkpoint, freshly initialised: {sorted({m.rsplit('.', 1)[0] for m in missing})}")
    return out


def _get(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def save_hf(model, variables, path: str | Path, *, model_type: str | None = None,
            max_shard_size: int | None = None) -> Path:
    """Write ``model``'s config.json and float32 weights in Hugging Face's layout (GPT -> GPT2LMHeadModel, a rotary
    GPT -> the Llama family's ``model_type``, see `config_to_hf`; BERT -> BertForPreTraining) to folder ``path``;
    `load_hf` and `transformers` read it back. Weights over ``max_shard_size`` bytes are split into
    ``model-0000i-of-0000n.safetensors`` files named by ``model.safetensors.index.json``.

    Before writing anything, raises `ValueError` for a config field the layout cannot express (see `config_to_hf`)
    and for ``variables["params"]`` that do not match ``model``'s parameters (missing, extra or wrong-shaped ones
    are named)."""
    cfg = model.cfg
    config = config_to_hf(cfg, model_type)
    if not isinstance(variables, Mapping) or "params" not in variables:
        got = f"keys {list(variables)}" if isinstance(variables, Mapping) else type(variables).__name__
        raise ValueError(f"save_hf needs variables with a 'params' collection (as model.init returns), got {got}")
    flat = {k: np.asarray(v, np.float32) for k, v in _flatten(variables["params"]).items()}
    _check_params(flat, _layouts(model)[0])
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in _to_hf(cfg, flat).items()}
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    write_export(folder, tensors, config, max_shard_size)
    return folder


def _check_params(flat: dict, shapes: dict) -> None:
    """Raise `ValueError` naming the parameters of ``flat`` that are missing from, extra to, or shaped unlike
    ``shapes`` (both keyed by our parameter paths)."""
    name = "/".join
    problems = {"missing": sorted(name(k) for k in shapes.keys() - flat.keys()),
                "unexpected": sorted(name(k) for k in flat.keys() - shapes.keys()),
                "wrong shape": sorted(f"{name(k)} {flat[k].shape} (model: {shapes[k]})"
                                      for k in shapes.keys() & flat.keys() if flat[k].shape != shapes[k])}
    if any(problems.values()):
        raise ValueError("save_hf: variables['params'] do not match the model's parameters; "
                         + "; ".join(f"{kind}: {_listing(names)}" for kind, names in problems.items() if names))
