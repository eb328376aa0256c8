"""Hugging Face checkpoints: `load_hf` reads a model folder (config.json + model.safetensors, sharded safetensors, or
pytorch_model.bin when torch is installed) for GPT-2 (``GPT2LMHeadModel``/``GPT2Model``), BERT (``BertModel``,
``BertForPreTraining``, ``BertForMaskedLM``, and folders saved without the ``bert.`` prefix, e.g. by
sentence-transformers) and the Llama family (``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``,
``Qwen3ForCausalLM``: see llama.py) into our model and variables; `save_hf` writes the same layout back.

One mapping per architecture (HF tensor name <-> our parameter path, with the transposes between PyTorch's
``[out, in]`` Linear / GPT-2's ``[in, out]`` Conv1D and our ``[in, heads, head_dim]`` kernels) serves both
directions, so load -> save -> load is exact. Both directions check before converting: a config field the layout
cannot express, a missing or extra parameter, or a tensor of the wrong shape raises `ValueError` naming it. Loading
trusts no size in config.json: each is a positive int within `files.SIZE_LIMITS`, and the layer count, vocabulary,
widths and head layout must agree with the tensors present, all checked before anything is built.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..layers.blocks import layer_name
from ..messages import short_repr
from ..models import BERT, GPT, ModelConfig
from . import llama
from .files import check_sizes, read_json, read_tensors, write_export

SUPPORTED = {"gpt2": ("GPT2LMHeadModel", "GPT2Model"),
             "bert": ("BertModel", "BertForPreTraining", "BertForMaskedLM"),
             **{kind: (arch,) for kind, arch in llama.FAMILIES.items()}}
_GPT2_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
_BERT_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


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
    if kind in llama.FAMILIES:
        return llama.config_from_hf(hf)
    if kind == "gpt2":
        _require(hf, {"add_cross_attention": False, "scale_attn_by_inverse_layer_idx": False,
                      "scale_attn_weights": True})
        act = _choice(hf, "activation_function", _GPT2_ACT, "gelu_new")
        _divides(hf, ("n_head", 12), ("n_embd", 768))
        embed, eos = hf.get("n_embd", 768), _id(hf, "eos_token_id", 50256)
        return ModelConfig(model="gpt", vocab_size=hf["vocab_size"], num_layers=hf.get("n_layer", 12),
                           num_heads=hf.get("n_head", 12), embed_dim=embed, mlp_dim=hf.get("n_inner") or 4 * embed,
                           max_len=hf.get("n_positions", 1024), activation=act,
                           norm_epsilon=hf.get("layer_norm_epsilon", 1e-5), dropout_rate=hf.get("resid_pdrop", 0.1),
                           attention_dropout_rate=hf.get("attn_pdrop", 0.1), norm_position="pre",
                           tie_embeddings=hf.get("tie_word_embeddings", True), position="learned",
                           init_std=hf.get("initializer_range", 0.02),
                           bos_id=_id(hf, "bos_token_id", 50256), eos_id=eos, pad_id=_id(hf, "pad_token_id", eos))
    # our BERT always ties its MLM output to the token embedding
    _require(hf, {"position_embedding_type": "absolute", "is_decoder": False, "add_cross_attention": False,
                  "tie_word_embeddings": True})
    _divides(hf, ("num_attention_heads", 12), ("hidden_size", 768))
    return ModelConfig(model="bert", vocab_size=hf["vocab_size"], num_layers=hf.get("num_hidden_layers", 12),
                       num_heads=hf.get("num_attention_heads", 12), embed_dim=hf.get("hidden_size", 768),
                       mlp_dim=hf.get("intermediate_size", 3072), max_len=hf.get("max_position_embeddings", 512),
                       type_vocab_size=hf.get("type_vocab_size", 2), activation=_choice(hf, "hidden_act", _BERT_ACT),
                       norm_epsilon=hf.get("layer_norm_eps", 1e-12), dropout_rate=hf.get("hidden_dropout_prob", 0.1),
                       attention_dropout_rate=hf.get("attention_probs_dropout_prob", 0.1), norm_position="post",
                       embed_norm=True, position="learned", tie_embeddings=True,
                       init_std=hf.get("initializer_range", 0.02), pad_id=_id(hf, "pad_token_id", 0),
                       bos_id=_id(hf, "bos_token_id", ModelConfig.bos_id),
                       eos_id=_id(hf, "eos_token_id", ModelConfig.eos_id))


def _id(hf, key, default):
    """A special token id from ``config.json``. transformers writes GPT-2's default 50256 even for a smaller
    vocabulary (it only uses the ids to generate), so an id outside ``[0, vocab_size)`` becomes the last id."""
    value = hf.get(key, default)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"config.json field {key}={short_repr(value)} is not supported; supported: an int id or null")
    vocab = hf["vocab_size"]
    if not 0 <= value < vocab:
        warnings.warn(f"config.json {key}={value} is outside the vocabulary ({vocab} ids); using {vocab - 1}",
                      stacklevel=3)
        value = vocab - 1
    return value


def _require(hf: dict, expected: dict) -> None:
    for key, want in expected.items():
        if key in hf and hf[key] != want:
            raise ValueError(f"config.json field {key}={short_repr(hf[key])} is not supported (only {want!r})")


def _choice(hf: dict, key: str, table: dict, default: str = "gelu") -> str:
    value = hf.get(key, default)
    if not isinstance(value, str) or value not in table:
        raise ValueError(f"config.json field {key}={short_repr(value)} is not supported; supported: {sorted(table)}")
    return table[value]


def _divides(hf: dict, part: tuple[str, int], whole: tuple[str, int]) -> None:
    """Raise `ValueError` unless config.json's ``part`` key (its default when absent) divides its ``whole`` key."""
    (part_key, p), (whole_key, w) = ((key, hf.get(key, default)) for key, default in (part, whole))
    if w % p:
        raise ValueError(f"config.json {part_key}={p} does not divide {whole_key}={w}; supported: a divisor of it")


def _check_exportable(cfg: ModelConfig) -> None:
    """Raise `ValueError` naming the first field that GPT-2's or BERT's Hugging Face layout cannot express, with
    the values it accepts."""
    gpt = cfg.model == "gpt"
    accepted = {"attention": ("softmax",), "talking_heads": (False,), "condition_dim": (0,), "share_layers": (False,),
                "table_dim": (None,), "position": ("learned",), "norm": ("layernorm",), "use_bias": (True,),
                "embed_scale": (False,), "scan_layers": (False,), "num_kv_heads": (None, cfg.num_heads),
                "head_dim": (None, cfg.embed_dim // cfg.num_heads), "norm_position": ("pre" if gpt else "post",),
                "embed_norm": (not gpt,), "activation": tuple(sorted(set((_GPT2_ACT if gpt else _BERT_ACT).values()))),
                "qkv_bias": (None, cfg.use_bias), "qk_norm": (False,), "sliding_window": (None,)}
    if gpt:
        accepted["type_vocab_size"] = (0,)
    else:
        accepted["tie_embeddings"] = (True,)  # our BERT ties its MLM output to the token embedding whatever the flag
    for field, values in accepted.items():
        if getattr(cfg, field) not in values:
            raise ValueError(f"save_hf cannot express ModelConfig.{field}={getattr(cfg, field)!r} in Hugging Face's "
                             f"{cfg.model} layout (accepted: {', '.join(map(repr, values))})")
    if not gpt and cfg.type_vocab_size < 1:
        raise ValueError(f"save_hf cannot express ModelConfig.type_vocab_size={cfg.type_vocab_size!r} in Hugging "
                         "Face's bert layout (accepted: an int >= 1)")


def _rotary(cfg: ModelConfig) -> bool:
    """Whether ``cfg`` is written in the Llama family's layout (a GPT with rotary positions), not GPT-2's."""
    return cfg.model == "gpt" and cfg.position == "rotary"


def config_to_hf(cfg: ModelConfig, model_type: str | None = None) -> dict:
    """config.json for ``cfg`` (GPT -> GPT2LMHeadModel, or with rotary positions the Llama family's ``model_type``:
    llama, mistral, qwen2, qwen3, None picking the one that expresses it; BERT -> BertForPreTraining); a field the
    layout cannot express raises `ValueError` naming it and the accepted values."""
    if _rotary(cfg) or model_type in llama.FAMILIES:
        return llama.config_to_hf(cfg, model_type)
    if model_type not in (None, "gpt2", "bert"):
        raise ValueError(f"save_hf model_type must be one of {list(SUPPORTED)} or None, got {model_type!r}")
    if cfg.model in ("gpt", "bert"):
        _check_exportable(cfg)
    inverse = lambda table: {v: k for k, v in reversed(list(table.items()))}
    if cfg.model == "gpt":
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
                "n_layer": cfg.num_layers, "n_head": cfg.num_heads, "n_embd": cfg.embed_dim, "n_inner": cfg.mlp_dim,
                "n_positions": cfg.max_len, "activation_function": inverse(_GPT2_ACT)[cfg.activation],
                "layer_norm_epsilon": cfg.norm_epsilon, "resid_pdrop": cfg.dropout_rate, "embd_pdrop": cfg.dropout_rate,
                "attn_pdrop": cfg.attention_dropout_rate, "tie_word_embeddings": cfg.tie_embeddings,
                "initializer_range": cfg.init_std, "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id,
                "pad_token_id": cfg.pad_id}
    if cfg.model == "bert":
        return {"model_type": "bert", "architectures": ["BertForPreTraining"], "vocab_size": cfg.vocab_size,
                "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
                "hidden_size": cfg.embed_dim, "intermediate_size": cfg.mlp_dim,
                "max_position_embeddings": cfg.max_len, "type_vocab_size": cfg.type_vocab_size,
                "hidden_act": inverse(_BERT_ACT)[cfg.activation], "layer_norm_eps": cfg.norm_epsilon,
                "hidden_dropout_prob": cfg.dropout_rate, "attention_probs_dropout_prob": cfg.attention_dropout_rate,
                "initializer_range": cfg.init_std, "pad_token_id": cfg.pad_id, "bos_token_id": cfg.bos_id,
                "eos_token_id": cfg.eos_id, "position_embedding_type": "absolute", "tie_word_embeddings": True}
    raise ValueError(f"save_hf writes GPT and BERT models, not cfg.model={cfg.model!r}")


# -- the parameter mappings -----------------------------------------------------------------------------------------
# Each entry: (HF tensor name, our path, to_ours(hf array) -> array, to_hf(our array) -> array).
def _linear(heads_out=None, heads_in=None, conv1d=False):
    """Converters for a projection stored as torch Linear ([out, in]) or GPT-2 Conv1D ([in, out])."""
    def to_ours(w):
        w = w if conv1d else w.T  # -> [in, out]
        if heads_out:
            return w.reshape(w.shape[0], heads_out, -1)
        if heads_in:
            return w.reshape(heads_in, -1, w.shape[1])
        return w

    def to_hf(w):
        w = w.reshape(w.shape[0], -1) if heads_out else w.reshape(-1, w.shape[-1]) if heads_in else w
        return w if conv1d else w.T
    return to_ours, to_hf


def _bias(heads=None):
    return ((lambda b: b.reshape(heads, -1)) if heads else (lambda b: b)), (lambda b: b.reshape(-1))


_SAME = (lambda x: x, lambda x: x)


def _norm(hf: str, ours: tuple, weight="weight", bias="bias"):
    return [(f"{hf}.{weight}", ours + ("scale",), *_SAME), (f"{hf}.{bias}", ours + ("bias",), *_SAME)]


def _gpt2_map(cfg: ModelConfig, prefix: str) -> list:
    h = cfg.num_heads
    out = [(f"{prefix}wte.weight", ("embedder", "token", "embedding"), *_SAME),
           (f"{prefix}wpe.weight", ("embedder", "position", "embedding"), *_SAME),
           *_norm(f"{prefix}ln_f", ("final_norm",))]
    for i in range(cfg.num_layers):
        p, ours = f"{prefix}h.{i}", ("decoder", layer_name(i))
        out += _norm(f"{p}.ln_1", ours + ("self_attention_norm",)) + _norm(f"{p}.ln_2", ours + ("mlp_norm",))
        out += [(f"{p}.attn.c_attn.weight", ours + ("self_attention", "qkv_kernel"), *_linear(3 * h, conv1d=True)),
                (f"{p}.attn.c_attn.bias", ours + ("self_attention", "qkv_bias"), *_bias(3 * h)),
                (f"{p}.attn.c_proj.weight", ours + ("self_attention", "out", "kernel"),
                 *_linear(heads_in=h, conv1d=True)),
                (f"{p}.attn.c_proj.bias", ours + ("self_attention", "out", "bias"), *_SAME),
                (f"{p}.mlp.c_fc.weight", ours + ("mlp", "wi", "kernel"), *_linear(conv1d=True)),
                (f"{p}.mlp.c_fc.bias", ours + ("mlp", "wi", "bias"), *_SAME),
                (f"{p}.mlp.c_proj.weight", ours + ("mlp", "wo", "kernel"), *_linear(conv1d=True)),
                (f"{p}.mlp.c_proj.bias", ours + ("mlp", "wo", "bias"), *_SAME)]
    if not cfg.tie_embeddings:
        out.append(("lm_head.weight", ("lm_head", "kernel"), *_linear()))
    return out


def _bert_map(cfg: ModelConfig, prefix: str) -> list:
    h = cfg.num_heads
    e = f"{prefix}embeddings"
    out = [(f"{e}.word_embeddings.weight", ("embedder", "token", "embedding"), *_SAME),
           (f"{e}.position_embeddings.weight", ("embedder", "position", "embedding"), *_SAME),
           (f"{e}.token_type_embeddings.weight", ("embedder", "token_type", "embedding"), *_SAME),
           *_norm(f"{e}.LayerNorm", ("embedder", "norm")),
           (f"{prefix}pooler.dense.weight", ("pooler", "kernel"), *_linear()),
           (f"{prefix}pooler.dense.bias", ("pooler", "bias"), *_SAME)]
    for i in range(cfg.num_layers):
        p, ours = f"{prefix}encoder.layer.{i}", ("encoder", layer_name(i))
        for role in ("query", "key", "value"):
            out += [(f"{p}.attention.self.{role}.weight", ours + ("self_attention", role, "kernel"), *_linear(h)),
                    (f"{p}.attention.self.{role}.bias", ours + ("self_attention", role, "bias"), *_bias(h))]
        out += [(f"{p}.attention.output.dense.weight", ours + ("self_attention", "out", "kernel"),
                 *_linear(heads_in=h)),
                (f"{p}.attention.output.dense.bias", ours + ("self_attention", "out", "bias"), *_SAME),
                *_norm(f"{p}.attention.output.LayerNorm", ours + ("self_attention_norm",)),
                (f"{p}.intermediate.dense.weight", ours + ("mlp", "wi", "kernel"), *_linear()),
                (f"{p}.intermediate.dense.bias", ours + ("mlp", "wi", "bias"), *_SAME),
                (f"{p}.output.dense.weight", ours + ("mlp", "wo", "kernel"), *_linear()),
                (f"{p}.output.dense.bias", ours + ("mlp", "wo", "bias"), *_SAME),
                *_norm(f"{p}.output.LayerNorm", ours + ("mlp_norm",))]
    heads = [("cls.predictions.transform.dense.weight", ("mlm_transform", "kernel"), *_linear()),
             ("cls.predictions.transform.dense.bias", ("mlm_transform", "bias"), *_SAME),
             *_norm("cls.predictions.transform.LayerNorm", ("mlm_norm",)),
             ("cls.predictions.bias", ("mlm_bias",), *_SAME),
             ("cls.seq_relationship.weight", ("nsp", "kernel"), *_linear()),
             ("cls.seq_relationship.bias", ("nsp", "bias"), *_SAME)]
    return out + heads


def base_prefix(cfg: ModelConfig, names=None) -> str:
    """The prefix of GPT-2's or BERT's base-model tensor names: ``"transformer."`` or ``"bert."`` (what `save_hf`
    writes, as ``GPT2LMHeadModel`` and ``BertForPreTraining`` do); given a folder's tensor ``names``, the one it
    uses: ``""`` for a bare base model (``GPT2Model``, ``BertModel``, sentence-transformers)."""
    base = "transformer." if cfg.model == "gpt" else "bert."
    return base if names is None or any(name.startswith(base) for name in names) else ""


def _mapping(cfg: ModelConfig, prefix: str | None = None) -> list:
    """``[(HF tensor name, our path, to ours, to HF)]``; ``prefix``: `base_prefix` (None: what `save_hf` writes)."""
    if _rotary(cfg):
        return llama.param_map(cfg, _linear, _bias, _SAME)
    prefix = base_prefix(cfg) if prefix is None else prefix
    return _gpt2_map(cfg, prefix) if cfg.model == "gpt" else _bert_map(cfg, prefix)


# GPT-2 keeps q, k, v in one tensor: these virtual leaves are split/joined around the mapping.
def _split_qkv(flat: dict) -> dict:
    out = {}
    for path, value in flat.items():
        if path[-1] in ("qkv_kernel", "qkv_bias"):
            kind = "kernel" if path[-1] == "qkv_kernel" else "bias"
            parts = np.split(value, 3, axis=1 if kind == "kernel" else 0)
            for role, part in zip(("query", "key", "value"), parts):
                out[path[:-1] + (role, kind)] = part
        else:
            out[path] = value
    return out


def _join_qkv(flat: dict) -> dict:  # jnp, not np: `_layouts` traces it
    out = dict(flat)
    for path in [p for p in flat if p[-2:] == ("query", "kernel") or p[-2:] == ("query", "bias")]:
        base, kind = path[:-2], path[-1]
        parts = [out.pop(base + (role, kind)) for role in ("query", "key", "value")]
        out[base + (f"qkv_{kind}",)] = jnp.concatenate(parts, axis=1 if kind == "kernel" else 0)
    return out


def _to_hf(cfg: ModelConfig, flat: dict, prefix: str | None = None) -> dict:
    """HF tensor name -> array, from our parameters as a flat ``{path: array}``."""
    flat = _join_qkv(flat) if cfg.model == "gpt" and not _rotary(cfg) else flat
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
    flat = _split_qkv(flat)
    heads = ("cls.", f"{prefix}pooler.")  # BertModel has no MLM/NSP heads; BertForMaskedLM has no pooler
    missing_required = [k for k in missing if not k.startswith(heads)]
    if missing_required:
        raise ValueError(f"{folder}: weights missing for {_listing(missing_required)}")
    params = _fill(shapes, flat, model, missing)
    return model, {"params": params}


def _size_sources(cfg: ModelConfig, prefix: str) -> tuple[str, str, list]:
    """``(layer count key, layer tensor prefix, [(config.json key, its value, HF tensor name, axis)])``: where the
    weights show each size of GPT-2's or BERT's config (the Llama family: `llama.size_sources`)."""
    if _rotary(cfg):
        return llama.size_sources(cfg)
    if cfg.model == "gpt":
        wte, fc = f"{prefix}wte.weight", f"{prefix}h.0.mlp.c_fc.weight"  # Conv1D: [in, out]
        return "n_layer", f"{prefix}h.", [("vocab_size", cfg.vocab_size, wte, 0), ("n_embd", cfg.embed_dim, wte, 1),
                                          ("n_positions", cfg.max_len, f"{prefix}wpe.weight", 0),
                                          ("n_inner", cfg.mlp_dim, fc, 1)]
    e = f"{prefix}embeddings"
    return "num_hidden_layers", f"{prefix}encoder.layer.", [
        ("vocab_size", cfg.vocab_size, f"{e}.word_embeddings.weight", 0),
        ("hidden_size", cfg.embed_dim, f"{e}.word_embeddings.weight", 1),
        ("max_position_embeddings", cfg.max_len, f"{e}.position_embeddings.weight", 0),
        ("type_vocab_size", cfg.type_vocab_size, f"{e}.token_type_embeddings.weight", 0),
        ("intermediate_size", cfg.mlp_dim, f"{prefix}encoder.layer.0.intermediate.dense.weight", 0)]


def _check_sizes_against(tensors: Mapping, cfg: ModelConfig, prefix: str, folder: Path) -> None:
    """Raise `ValueError` naming config.json's key, its value and what the weights hold where a size disagrees with
    the tensors present: the layers (numbered 0 .. n - 1), and each size a tensor's shape shows. Run before anything
    is built, so a huge size costs nothing."""
    layer_key, layers, dims = _size_sources(cfg, prefix)
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
