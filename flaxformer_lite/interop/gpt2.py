"""GPT-2's Hugging Face layout (``GPT2LMHeadModel``, and ``GPT2Model`` saved without the ``transformer.`` prefix) <->
our `GPT` with learned positions: `config_from_hf`, `config_to_hf`, `param_map`, `size_sources`; hf.py reads and
writes the files.

GPT-2 stores its projections as Conv1D (``[in, out]``, no transpose) and keeps q, k and v in one ``c_attn`` tensor:
the mapping names it as a virtual ``qkv_kernel``/``qkv_bias`` leaf, which `split_qkv` and `join_qkv` turn into our
query, key and value.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ..models import ModelConfig
from ..names import layer_name
from .convert import (SAME, bias, check_accepted, choice, divides, hf_names, learned_fields, linear, norm,
                      require, special_id)

MODEL_TYPE = "gpt2"  # config.json's model_type
ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
PREFIX = "transformer."  # of the base model's tensors in a GPT2LMHeadModel folder
OPTIONAL = ()  # tensor name prefixes a folder may lack (freshly initialised)
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


def config_from_hf(hf: dict) -> ModelConfig:
    """A `ModelConfig` from a GPT-2 config.json dict (already checked by hf.py: supported architecture, sizes)."""
    require(hf, {"add_cross_attention": False, "scale_attn_by_inverse_layer_idx": False, "scale_attn_weights": True})
    act = choice(hf, "activation_function", ACTIVATIONS, "gelu_new")
    divides(hf, ("n_head", 12), ("n_embd", 768))
    embed, eos = hf.get("n_embd", 768), special_id(hf, "eos_token_id", 50256)
    return ModelConfig(model="gpt", vocab_size=hf["vocab_size"], num_layers=hf.get("n_layer", 12),
                       num_heads=hf.get("n_head", 12), embed_dim=embed, mlp_dim=hf.get("n_inner") or 4 * embed,
                       max_len=hf.get("n_positions", 1024), activation=act,
                       norm_epsilon=hf.get("layer_norm_epsilon", 1e-5), dropout_rate=hf.get("resid_pdrop", 0.1),
                       attention_dropout_rate=hf.get("attn_pdrop", 0.1), norm_position="pre",
                       tie_embeddings=hf.get("tie_word_embeddings", True), position="learned",
                       init_std=hf.get("initializer_range", 0.02), bos_id=special_id(hf, "bos_token_id", 50256),
                       eos_id=eos, pad_id=special_id(hf, "pad_token_id", eos))


def config_to_hf(cfg: ModelConfig) -> dict:
    """config.json (``GPT2LMHeadModel``) for ``cfg``; a field the layout cannot express raises `ValueError` naming
    it and the accepted values."""
    check_accepted(cfg, {**learned_fields(cfg), "norm_position": ("pre",), "embed_norm": (False,),
                         "activation": tuple(sorted(set(ACTIVATIONS.values()))), "type_vocab_size": (0,)}, cfg.model)
    return {"model_type": MODEL_TYPE, "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
            "n_layer": cfg.num_layers, "n_head": cfg.num_heads, "n_embd": cfg.embed_dim, "n_inner": cfg.mlp_dim,
            "n_positions": cfg.max_len, "activation_function": hf_names(ACTIVATIONS)[cfg.activation],
            "layer_norm_epsilon": cfg.norm_epsilon, "resid_pdrop": cfg.dropout_rate, "embd_pdrop": cfg.dropout_rate,
            "attn_pdrop": cfg.attention_dropout_rate, "tie_word_embeddings": cfg.tie_embeddings,
            "initializer_range": cfg.init_std, "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id,
            "pad_token_id": cfg.pad_id}


def param_map(cfg: ModelConfig, prefix: str) -> list:
    """``(HF tensor name, our path, to_ours, to_hf)`` for every parameter of ``cfg``; ``prefix``: the base model's
    (`PREFIX`, or ``""`` for a bare ``GPT2Model``)."""
    h = cfg.num_heads
    out = [(f"{prefix}wte.weight", ("embedder", "token", "embedding"), *SAME),
           (f"{prefix}wpe.weight", ("embedder", "position", "embedding"), *SAME),
           *norm(f"{prefix}ln_f", ("final_norm",))]
    for i in range(cfg.num_layers):
        p, ours = f"{prefix}h.{i}", ("decoder", layer_name(i))
        out += norm(f"{p}.ln_1", ours + ("self_attention_norm",)) + norm(f"{p}.ln_2", ours + ("mlp_norm",))
        out += [(f"{p}.attn.c_attn.weight", ours + ("self_attention", "qkv_kernel"), *linear(3 * h, conv1d=True)),
                (f"{p}.attn.c_attn.bias", ours + ("self_attention", "qkv_bias"), *bias(3 * h)),
                (f"{p}.attn.c_proj.weight", ours + ("self_attention", "out", "kernel"),
                 *linear(heads_in=h, conv1d=True)),
                (f"{p}.attn.c_proj.bias", ours + ("self_attention", "out", "bias"), *SAME),
                (f"{p}.mlp.c_fc.weight", ours + ("mlp", "wi", "kernel"), *linear(conv1d=True)),
                (f"{p}.mlp.c_fc.bias", ours + ("mlp", "wi", "bias"), *SAME),
                (f"{p}.mlp.c_proj.weight", ours + ("mlp", "wo", "kernel"), *linear(conv1d=True)),
                (f"{p}.mlp.c_proj.bias", ours + ("mlp", "wo", "bias"), *SAME)]
    if not cfg.tie_embeddings:
        out.append(("lm_head.weight", ("lm_head", "kernel"), *linear()))
    return out


def size_sources(cfg: ModelConfig, prefix: str) -> tuple[str, str, list]:
    """``(layer count key, layer tensor prefix, [(config.json key, its value, HF tensor name, axis)])``: where the
    weights show each size of ``cfg`` (hf.py compares them before building anything)."""
    wte, fc = f"{prefix}wte.weight", f"{prefix}h.0.mlp.c_fc.weight"  # Conv1D: [in, out]
    return "n_layer", f"{prefix}h.", [("vocab_size", cfg.vocab_size, wte, 0), ("n_embd", cfg.embed_dim, wte, 1),
                                      ("n_positions", cfg.max_len, f"{prefix}wpe.weight", 0),
                                      ("n_inner", cfg.mlp_dim, fc, 1)]


def split_qkv(flat: dict) -> dict:
    """``flat`` ({our path: array}) with each virtual ``qkv_kernel``/``qkv_bias`` split into query, key, value."""
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


def join_qkv(flat: dict) -> dict:
    """The inverse of `split_qkv` (jnp, not np: hf.py traces it to learn the shapes)."""
    out = dict(flat)
    for path in [p for p in flat if p[-2:] == ("query", "kernel") or p[-2:] == ("query", "bias")]:
        base, kind = path[:-2], path[-1]
        parts = [out.pop(base + (role, kind)) for role in ("query", "key", "value")]
        out[base + (f"qkv_{kind}",)] = jnp.concatenate(parts, axis=1 if kind == "kernel" else 0)
    return out
