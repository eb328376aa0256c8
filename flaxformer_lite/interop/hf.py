"""Hugging Face checkpoints: `load_hf` reads a model folder (config.json + model.safetensors, or pytorch_model.bin
when torch is installed) for GPT-2 (``GPT2LMHeadModel``/``GPT2Model``) and BERT (``BertModel``,
``BertForPreTraining``, ``BertForMaskedLM``, and folders saved without the ``bert.`` prefix, e.g. by
sentence-transformers) into our model and variables; `save_hf` writes the same layout back.

One mapping per architecture (HF tensor name <-> our parameter path, with the transposes between PyTorch's
``[out, in]`` Linear / GPT-2's ``[in, out]`` Conv1D and our ``[in, heads, head_dim]`` kernels) serves both
directions, so load -> save -> load is exact.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..models import BERT, GPT, ModelConfig

SUPPORTED = {"gpt2": ("GPT2LMHeadModel", "GPT2Model"),
             "bert": ("BertModel", "BertForPreTraining", "BertForMaskedLM")}
_GPT2_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
_BERT_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


# -- configs ---------------------------------------------------------------------------------------------------------
def config_from_hf(hf: dict) -> ModelConfig:
    """A `ModelConfig` from a config.json dict; a field we cannot honour raises `ValueError` naming it."""
    kind = hf.get("model_type")
    archs = hf.get("architectures") or []
    if kind not in SUPPORTED or (archs and not set(archs) & set(SUPPORTED[kind])):
        raise ValueError(f"load_hf supports {', '.join(a for v in SUPPORTED.values() for a in v)}; this folder holds "
                         f"model_type={kind!r} architectures={archs}")
    if kind == "gpt2":
        _require(hf, {"add_cross_attention": False, "scale_attn_by_inverse_layer_idx": False,
                      "scale_attn_weights": True})
        act = _choice(hf, "activation_function", _GPT2_ACT, "gelu_new")
        embed = hf.get("n_embd", 768)
        return ModelConfig(model="gpt", vocab_size=hf["vocab_size"], num_layers=hf.get("n_layer", 12),
                           num_heads=hf.get("n_head", 12), embed_dim=embed, mlp_dim=hf.get("n_inner") or 4 * embed,
                           max_len=hf.get("n_positions", 1024), activation=act,
                           norm_epsilon=hf.get("layer_norm_epsilon", 1e-5), dropout_rate=hf.get("resid_pdrop", 0.1),
                           attention_dropout_rate=hf.get("attn_pdrop", 0.1), norm_position="pre",
                           tie_embeddings=hf.get("tie_word_embeddings", True), position="learned",
                           bos_id=_id(hf, "bos_token_id", 50256), eos_id=_id(hf, "eos_token_id", 50256),
                           pad_id=_id(hf, "pad_token_id", _id(hf, "eos_token_id", 50256)))
    _require(hf, {"position_embedding_type": "absolute", "is_decoder": False, "add_cross_attention": False})
    return ModelConfig(model="bert", vocab_size=hf["vocab_size"], num_layers=hf.get("num_hidden_layers", 12),
                       num_heads=hf.get("num_attention_heads", 12), embed_dim=hf.get("hidden_size", 768),
                       mlp_dim=hf.get("intermediate_size", 3072), max_len=hf.get("max_position_embeddings", 512),
                       type_vocab_size=hf.get("type_vocab_size", 2), activation=_choice(hf, "hidden_act", _BERT_ACT),
                       norm_epsilon=hf.get("layer_norm_eps", 1e-12), dropout_rate=hf.get("hidden_dropout_prob", 0.1),
                       attention_dropout_rate=hf.get("attention_probs_dropout_prob", 0.1), norm_position="post",
                       embed_norm=True, position="learned", tie_embeddings=hf.get("tie_word_embeddings", True),
                       pad_id=_id(hf, "pad_token_id", 0))


def _id(hf, key, default):
    value = hf.get(key, default)
    return default if value is None else int(value)


def _require(hf: dict, expected: dict) -> None:
    for key, want in expected.items():
        if key in hf and hf[key] != want:
            raise ValueError(f"config.json field {key}={hf[key]!r} is not supported (only {want!r})")


def _choice(hf: dict, key: str, table: dict, default: str = "gelu") -> str:
    value = hf.get(key, default)
    if value not in table:
        raise ValueError(f"config.json field {key}={value!r} is not supported; supported: {sorted(table)}")
    return table[value]


def _check_exportable(cfg: ModelConfig) -> None:
    """Raise `ValueError` naming the first field that GPT-2's or BERT's Hugging Face layout cannot express."""
    fixed = {"attention": "softmax", "talking_heads": False, "condition_dim": 0, "share_layers": False,
             "embedding_dim": None, "position": "learned", "norm": "layernorm", "use_bias": True,
             "embed_scale": False, "scan_layers": False,
             "norm_position": "pre" if cfg.model == "gpt" else "post"}
    for field, want in fixed.items():
        if getattr(cfg, field) != want:
            raise ValueError(f"save_hf cannot express ModelConfig.{field}={getattr(cfg, field)!r} in Hugging Face's "
                             f"{cfg.model} layout (it needs {want!r})")
    if cfg.num_kv_heads not in (None, cfg.num_heads) or cfg.head_dim not in (None, cfg.embed_dim // cfg.num_heads):
        raise ValueError("save_hf cannot express ModelConfig.num_kv_heads / head_dim other than plain multi-head "
                         "attention in Hugging Face's layout")


def config_to_hf(cfg: ModelConfig) -> dict:
    """config.json for ``cfg`` (GPT -> GPT2LMHeadModel, BERT -> BertForPreTraining)."""
    if cfg.model in ("gpt", "bert"):
        _check_exportable(cfg)
    inverse = lambda table: {v: k for k, v in reversed(list(table.items()))}
    if cfg.model == "gpt":
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
                "n_layer": cfg.num_layers, "n_head": cfg.num_heads, "n_embd": cfg.embed_dim, "n_inner": cfg.mlp_dim,
                "n_positions": cfg.max_len, "activation_function": inverse(_GPT2_ACT)[cfg.activation],
                "layer_norm_epsilon": cfg.norm_epsilon, "resid_pdrop": cfg.dropout_rate, "embd_pdrop": cfg.dropout_rate,
                "attn_pdrop": cfg.attention_dropout_rate, "tie_word_embeddings": cfg.tie_embeddings,
                "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id}
    if cfg.model == "bert":
        return {"model_type": "bert", "architectures": ["BertForPreTraining"], "vocab_size": cfg.vocab_size,
                "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
                "hidden_size": cfg.embed_dim, "intermediate_size": cfg.mlp_dim,
                "max_position_embeddings": cfg.max_len, "type_vocab_size": cfg.type_vocab_size,
                "hidden_act": inverse(_BERT_ACT)[cfg.activation], "layer_norm_eps": cfg.norm_epsilon,
                "hidden_dropout_prob": cfg.dropout_rate, "attention_probs_dropout_prob": cfg.attention_dropout_rate,
                "pad_token_id": cfg.pad_id, "position_embedding_type": "absolute",
                "tie_word_embeddings": cfg.tie_embeddings}
    raise ValueError(f"save_hf writes GPT and BERT models, not cfg.model={cfg.model!r}")


# -- the parameter mappings ---------------------------------------------------------------------------------------------
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


def _gpt2_map(cfg: ModelConfig) -> list:
    h = cfg.num_heads
    out = [("transformer.wte.weight", ("embedder", "token", "embedding"), *_SAME),
           ("transformer.wpe.weight", ("embedder", "position", "embedding"), *_SAME),
           *_norm("transformer.ln_f", ("final_norm",))]
    for i in range(cfg.num_layers):
        p, ours = f"transformer.h.{i}", ("decoder", f"layer_{i}")
        out += _norm(f"{p}.ln_1", ours + ("self_attention_norm",)) + _norm(f"{p}.ln_2", ours + ("mlp_norm",))
        out += [(f"{p}.attn.c_attn.weight", ours + ("self_attention", "qkv_kernel"), *_linear(3 * h, conv1d=True)),
                (f"{p}.attn.c_attn.bias", ours + ("self_attention", "qkv_bias"), *_bias(3 * h)),
                (f"{p}.attn.c_proj.weight", ours + ("self_attention", "out", "kernel"), *_linear(heads_in=h, conv1d=True)),
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
        p, ours = f"{prefix}encoder.layer.{i}", ("encoder", f"layer_{i}")
        for role in ("query", "key", "value"):
            out += [(f"{p}.attention.self.{role}.weight", ours + ("self_attention", role, "kernel"), *_linear(h)),
                    (f"{p}.attention.self.{role}.bias", ours + ("self_attention", role, "bias"), *_bias(h))]
        out += [(f"{p}.attention.output.dense.weight", ours + ("self_attention", "out", "kernel"), *_linear(heads_in=h)),
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


def _mapping(cfg: ModelConfig, prefix: str = "bert.") -> list:
    return _gpt2_map(cfg) if cfg.model == "gpt" else _bert_map(cfg, prefix)


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


def _join_qkv(flat: dict) -> dict:
    out = dict(flat)
    for path in [p for p in flat if p[-2:] == ("query", "kernel") or p[-2:] == ("query", "bias")]:
        base, kind = path[:-2], path[-1]
        parts = [out.pop(base + (role, kind)) for role in ("query", "key", "value")]
        out[base + (f"qkv_{kind}",)] = np.concatenate(parts, axis=1 if kind == "kernel" else 0)
    return out


# -- reading and writing -------------------------------------------------------------------------------------------
def _read_tensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    st = folder / "model.safetensors"
    if st.exists():
        return load_file(str(st))
    index = folder / "model.safetensors.index.json"
    if index.exists():  # large checkpoints are saved in shards
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(str(folder / shard)).items()}
    pt = folder / "pytorch_model.bin"
    if pt.exists():
        try:
            import torch
        except ImportError:
            raise ValueError(f"{pt} is a PyTorch pickle; install torch to read it, or convert it to "
                             "model.safetensors") from None
        state = torch.load(str(pt), map_location="cpu", weights_only=True)
        return {k: v.float().numpy() if v.dtype.is_floating_point else v.numpy() for k, v in state.items()}
    raise ValueError(f"{folder}: no model.safetensors (or pytorch_model.bin) found")


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
    hf = json.loads((folder / "config.json").read_text())
    cfg = dataclasses.replace(config_from_hf(hf), dtype=dtype)
    tensors = _read_tensors(folder)
    prefix = "bert." if any(k.startswith("bert.") for k in tensors) else ""
    model = GPT(cfg) if cfg.model == "gpt" else BERT(cfg)
    init = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"])
    flat, missing = {}, []
    for hf_key, ours, to_ours, _ in _mapping(cfg, prefix):
        if hf_key in tensors:
            flat[ours] = np.asarray(to_ours(tensors[hf_key]), np.float32)
        else:
            missing.append(hf_key)
    flat = _split_qkv(flat)
    missing_required = [k for k in missing if not k.startswith("cls.")]
    if missing_required:
        raise ValueError(f"{folder}: weights missing for {missing_required[:5]} (and {len(missing_required) - 5} "
                         "more)" if len(missing_required) > 5 else f"{folder}: weights missing for {missing_required}")
    params = _fill(init, flat, model, missing)
    return model, {"params": params}


def _fill(init, flat: dict, model, missing: list):
    """Our param tree from the converted tensors; absent (head) params come from a fresh init."""
    fresh = None
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(init)[0]:
        key = tuple(p.key for p in path)
        if key in flat:
            if flat[key].shape != leaf.shape:
                raise ValueError(f"shape mismatch for {'/'.join(key)}: checkpoint {flat[key].shape}, "
                                 f"config {leaf.shape}")
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


def save_hf(model, variables, path: str | Path) -> Path:
    """Write ``model``'s config.json and model.safetensors in Hugging Face's layout (GPT -> GPT2LMHeadModel,
    BERT -> BertForPreTraining) to folder ``path``; `load_hf` and `transformers` read it back."""
    from safetensors.numpy import save_file
    cfg = model.cfg
    config = config_to_hf(cfg)  # raises for anything the layout cannot express
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    flat = {tuple(p.key for p in path): np.asarray(v, np.float32)
            for path, v in jax.tree_util.tree_flatten_with_path(nn.unbox(variables["params"]))[0]}
    if cfg.model == "gpt":
        flat = _join_qkv(flat)
    tensors = {hf_key: np.ascontiguousarray(to_hf(flat[ours])) for hf_key, ours, _, to_hf in _mapping(cfg)
               if ours in flat}
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
