"""BERT's Hugging Face layout (``BertModel``, ``BertForPreTraining``, ``BertForMaskedLM``, and folders saved without
the ``bert.`` prefix, e.g. by sentence-transformers) <-> our `BERT`: `config_from_hf`, `config_to_hf`, `param_map`,
`size_sources`; hf.py reads and writes the files. A folder without the MLM/NSP heads (``BertModel``) or the pooler
(``BertForMaskedLM``) loads with those freshly initialised (`OPTIONAL`).
"""
from __future__ import annotations

from ..models import ModelConfig
from ..names import layer_name
from .convert import (SAME, bias, check_accepted, choice, divides, hf_names, learned_fields, linear, norm, require,
                      special_id)

MODEL_TYPE = "bert"  # config.json's model_type
ARCHITECTURES = ("BertModel", "BertForPreTraining", "BertForMaskedLM")
PREFIX = "bert."  # of the base model's tensors in a BertForPreTraining folder
OPTIONAL = ("cls.", "{prefix}pooler.")  # tensor name prefixes a folder may lack (freshly initialised)
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def config_from_hf(hf: dict) -> ModelConfig:
    """A `ModelConfig` from a BERT config.json dict (already checked by hf.py: supported architecture, sizes)."""
    # our BERT always ties its MLM output to the token embedding
    require(hf, {"position_embedding_type": "absolute", "is_decoder": False, "add_cross_attention": False,
                 "tie_word_embeddings": True})
    divides(hf, ("num_attention_heads", 12), ("hidden_size", 768))
    return ModelConfig(model="bert", vocab_size=hf["vocab_size"], num_layers=hf.get("num_hidden_layers", 12),
                       num_heads=hf.get("num_attention_heads", 12), embed_dim=hf.get("hidden_size", 768),
                       mlp_dim=hf.get("intermediate_size", 3072), max_len=hf.get("max_position_embeddings", 512),
                       type_vocab_size=hf.get("type_vocab_size", 2),
                       activation=choice(hf, "hidden_act", ACTIVATIONS, "gelu"),
                       norm_epsilon=hf.get("layer_norm_eps", 1e-12), dropout_rate=hf.get("hidden_dropout_prob", 0.1),
                       attention_dropout_rate=hf.get("attention_probs_dropout_prob", 0.1), norm_position="post",
                       embed_norm=True, position="learned", tie_embeddings=True,
                       init_std=hf.get("initializer_range", 0.02), pad_id=special_id(hf, "pad_token_id", 0),
                       bos_id=special_id(hf, "bos_token_id", ModelConfig.bos_id),
                       eos_id=special_id(hf, "eos_token_id", ModelConfig.eos_id))


def config_to_hf(cfg: ModelConfig) -> dict:
    """config.json (``BertForPreTraining``) for ``cfg``; a field the layout cannot express raises `ValueError`
    naming it and the accepted values."""
    # our BERT ties its MLM output to the token embedding whatever the flag
    check_accepted(cfg, {**learned_fields(cfg), "norm_position": ("post",), "embed_norm": (True,),
                         "activation": tuple(sorted(set(ACTIVATIONS.values()))), "tie_embeddings": (True,)}, cfg.model)
    if cfg.type_vocab_size < 1:
        raise ValueError(f"save_hf cannot express ModelConfig.type_vocab_size={cfg.type_vocab_size!r} in Hugging "
                         "Face's bert layout (accepted: an int >= 1)")
    return {"model_type": MODEL_TYPE, "architectures": ["BertForPreTraining"], "vocab_size": cfg.vocab_size,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "hidden_size": cfg.embed_dim, "intermediate_size": cfg.mlp_dim,
            "max_position_embeddings": cfg.max_len, "type_vocab_size": cfg.type_vocab_size,
            "hidden_act": hf_names(ACTIVATIONS)[cfg.activation], "layer_norm_eps": cfg.norm_epsilon,
            "hidden_dropout_prob": cfg.dropout_rate, "attention_probs_dropout_prob": cfg.attention_dropout_rate,
            "initializer_range": cfg.init_std, "pad_token_id": cfg.pad_id, "bos_token_id": cfg.bos_id,
            "eos_token_id": cfg.eos_id, "position_embedding_type": "absolute", "tie_word_embeddings": True}


def param_map(cfg: ModelConfig, prefix: str) -> list:
    """``(HF tensor name, our path, to_ours, to_hf)`` for every parameter of ``cfg``; ``prefix``: the base model's
    (`PREFIX`, or ``""`` for a bare ``BertModel``). The heads (``cls.``) never carry the prefix."""
    e = f"{prefix}embeddings"
    out = [(f"{e}.word_embeddings.weight", ("embedder", "token", "embedding"), *SAME),
           (f"{e}.position_embeddings.weight", ("embedder", "position", "embedding"), *SAME),
           (f"{e}.token_type_embeddings.weight", ("embedder", "token_type", "embedding"), *SAME),
           *norm(f"{e}.LayerNorm", ("embedder", "norm")),
           (f"{prefix}pooler.dense.weight", ("pooler", "kernel"), *linear()),
           (f"{prefix}pooler.dense.bias", ("pooler", "bias"), *SAME)]
    for i in range(cfg.num_layers):
        out += _layer_map(cfg.num_heads, f"{prefix}encoder.layer.{i}", ("encoder", layer_name(i)))
    heads = [("cls.predictions.transform.dense.weight", ("mlm_transform", "kernel"), *linear()),
             ("cls.predictions.transform.dense.bias", ("mlm_transform", "bias"), *SAME),
             *norm("cls.predictions.transform.LayerNorm", ("mlm_norm",)),
             ("cls.predictions.bias", ("mlm_bias",), *SAME),
             ("cls.seq_relationship.weight", ("nsp", "kernel"), *linear()),
             ("cls.seq_relationship.bias", ("nsp", "bias"), *SAME)]
    return out + heads


def _layer_map(h: int, p: str, ours: tuple) -> list:
    """The mapping entries of one encoder layer: HF names under ``p``, ours under ``ours``, ``h`` heads."""
    out = []
    for role in ("query", "key", "value"):
        out += [(f"{p}.attention.self.{role}.weight", ours + ("self_attention", role, "kernel"), *linear(h)),
                (f"{p}.attention.self.{role}.bias", ours + ("self_attention", role, "bias"), *bias(h))]
    return out + [(f"{p}.attention.output.dense.weight", ours + ("self_attention", "out", "kernel"),
                   *linear(heads_in=h)),
                  (f"{p}.attention.output.dense.bias", ours + ("self_attention", "out", "bias"), *SAME),
                  *norm(f"{p}.attention.output.LayerNorm", ours + ("self_attention_norm",)),
                  (f"{p}.intermediate.dense.weight", ours + ("mlp", "wi", "kernel"), *linear()),
                  (f"{p}.intermediate.dense.bias", ours + ("mlp", "wi", "bias"), *SAME),
                  (f"{p}.output.dense.weight", ours + ("mlp", "wo", "kernel"), *linear()),
                  (f"{p}.output.dense.bias", ours + ("mlp", "wo", "bias"), *SAME),
                  *norm(f"{p}.output.LayerNorm", ours + ("mlp_norm",))]


def size_sources(cfg: ModelConfig, prefix: str) -> tuple[str, str, list]:
    """``(layer count key, layer tensor prefix, [(config.json key, its value, HF tensor name, axis)])``: where the
    weights show each size of ``cfg`` (hf.py compares them before building anything)."""
    e = f"{prefix}embeddings"
    return "num_hidden_layers", f"{prefix}encoder.layer.", [
        ("vocab_size", cfg.vocab_size, f"{e}.word_embeddings.weight", 0),
        ("hidden_size", cfg.embed_dim, f"{e}.word_embeddings.weight", 1),
        ("max_position_embeddings", cfg.max_len, f"{e}.position_embeddings.weight", 0),
        ("type_vocab_size", cfg.type_vocab_size, f"{e}.token_type_embeddings.weight", 0),
        ("intermediate_size", cfg.mlp_dim, f"{prefix}encoder.layer.0.intermediate.dense.weight", 0)]
