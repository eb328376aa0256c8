"""The Llama family's Hugging Face layout: ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` and
``Qwen3ForCausalLM`` <-> our `GPT` with rotary positions: `config_from_hf`, `config_to_hf`, `param_map`,
`size_sources`; hf.py reads and writes the files.

Every config.json field that changes the function is mapped or refused by name (with the values we support) before
any weight is read: mixture-of-experts, attention sinks, quantised weights, per-layer attention types, partial
rotary, and rope types other than default / linear / dynamic / llama3. Fields that only steer PyTorch (``use_cache``,
``dtype``, ``pretraining_tp``, tensor-parallel plans) are ignored.

Rotary layout: transformers' ``rotate_half`` rotates the pairs ``(x[i], x[i + d/2])``, and so does our `rotary`, so
q_proj and k_proj rows are taken as they are (no permutation). Meta's original ``consolidated.pth`` files rotate
interleaved pairs; transformers' conversion script permutes them into this layout, and we read only its output.
"""
from __future__ import annotations

from collections.abc import Mapping

from ..choices import RopeScaling
from ..models import ModelConfig
from ..names import layer_name
from .convert import SAME, accepted_fields, bias, check_accepted, hf_names, linear, refuse, special_id

FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM"}
PREFIX = "model."  # of the base model's tensors
OPTIONAL = ()  # tensor name prefixes a folder may lack (freshly initialised)
HF_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
_ACTIVATIONS = {"silu": "swiglu", "gelu_pytorch_tanh": "geglu"}  # HF's gated MLP: act(gate(x)) * up(x)
# Fields of other architectures that change the function: present and set, they are refused.
_REFUSED = {
    "num_experts": "mixture-of-experts", "num_local_experts": "mixture-of-experts",
    "n_routed_experts": "mixture-of-experts", "num_experts_per_tok": "mixture-of-experts",
    "moe_intermediate_size": "mixture-of-experts", "attention_sinks": "attention sinks", "sinks": "attention sinks",
    "sliding_window_pattern": "per-layer attention types", "quantization_config": "quantised weights",
    "partial_rotary_factor": "partial rotary", "attn_logit_softcapping": "logit soft-capping",
    "final_logit_softcapping": "logit soft-capping", "residual_multiplier": "muP multipliers",
    "embedding_multiplier": "muP multipliers", "logits_scaling": "muP multipliers", "no_rope_layers": "NoPE layers",
}


def _get(hf: Mapping, key: str, default, kind=int):
    """``hf[key]`` (``default`` when absent or null), checked to be of ``kind``."""
    value = hf.get(key)
    value = default if value is None else value
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        refuse(key, value, f"a {kind.__name__}")
    return float(value) if kind is float else value


def _rope(hf: Mapping, max_len: int) -> tuple[float, RopeScaling | None, int]:
    """``(rope_base, rope_scaling, max_len)`` from ``rope_parameters`` (transformers 5) or ``rope_theta`` +
    ``rope_scaling`` (older files)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, Mapping):
        refuse("rope_parameters", params, "a mapping")
    if params and all(isinstance(v, Mapping) for v in params.values()):
        refuse("rope_parameters", dict(params), "one set for every layer (not one per layer type)")
    theta = _get({**hf, **params}, "rope_theta", 10_000.0, float)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in HF_ROPE_TYPES:
        refuse("rope_parameters.rope_type", kind, f"{list(HF_ROPE_TYPES)}")
    if params.get("attention_factor") not in (None, 1, 1.0):
        refuse("rope_parameters.attention_factor", params["attention_factor"], "1.0 (or absent)")
    if params.get("partial_rotary_factor") not in (None, 1, 1.0):
        refuse("rope_parameters.partial_rotary_factor", params["partial_rotary_factor"], "1.0 (or absent)")
    if kind == "default":
        return theta, None, max_len
    factor = _get(params, "factor", None, float)
    if kind == "linear":
        return theta, RopeScaling("linear", factor), max_len
    if kind == "dynamic":  # transformers' dynamic NTK stretches beyond max_position_embeddings: allow that far
        return theta, RopeScaling("dynamic", factor, original_max_len=max_len), int(max_len * factor)
    return theta, RopeScaling("llama3", factor, _get(params, "low_freq_factor", None, float),
                              _get(params, "high_freq_factor", None, float),
                              _get(params, "original_max_position_embeddings", max_len)), max_len


def _window(hf: Mapping, kind: str, layers: int) -> int | None:
    """The one sliding window of every layer, or None; a mix of full and windowed layers is refused."""
    window = hf.get("sliding_window")
    if kind in ("qwen2", "qwen3"):
        window = window if hf.get("use_sliding_window") else None
        first = _get(hf, "max_window_layers", 28)
        default = ["sliding_attention" if window is not None and i >= first
                   else "full_attention" for i in range(layers)]
    else:
        default = ["sliding_attention" if window is not None else "full_attention"] * layers
    types = hf.get("layer_types") or default
    if kind == "llama" and window is not None:
        refuse("sliding_window", window, "null for llama (use mistral)")
    if len(set(types)) > 1 or not set(types) <= {"full_attention", "sliding_attention"}:
        field = "layer_types" if hf.get("layer_types") else "max_window_layers"
        refuse(field, hf.get(field), "the same attention, full_attention or sliding_attention, in every layer")
    if types and types[0] == "full_attention":
        return None
    if window is None or isinstance(window, bool) or not isinstance(window, int) or window < 1:
        refuse("sliding_window", window, "a positive int with sliding_attention layers")
    return window


def config_from_hf(hf: Mapping) -> ModelConfig:
    """A `ModelConfig` from a Llama, Mistral, Qwen2 or Qwen3 config.json dict; what we cannot honour raises
    `ValueError` naming the field and the supported values."""
    kind = hf["model_type"]
    for key, what in _REFUSED.items():
        if hf.get(key) not in (None, False, 0, [], {}) and not (key == "partial_rotary_factor" and hf[key] == 1):
            refuse(key, hf[key], f"absent ({what} is not implemented)")
    act = hf.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        refuse("hidden_act", act, f"{sorted(_ACTIVATIONS)}")
    attention_bias = _get(hf, "attention_bias", False, bool) if kind in ("llama", "qwen3") else kind == "qwen2"
    if kind == "qwen3" and attention_bias:
        refuse("attention_bias", True, "False for qwen3 (an o_proj bias without MLP biases has no ModelConfig form)")
    mlp_bias = _get(hf, "mlp_bias", False, bool) if kind == "llama" else False
    if kind == "llama" and attention_bias != mlp_bias:
        refuse("mlp_bias", mlp_bias, f"the same as attention_bias ({attention_bias}): one use_bias covers both")
    embed, heads = _get(hf, "hidden_size", 4096), _get(hf, "num_attention_heads", 32)
    head_dim, kv_heads = _get(hf, "head_dim", embed // heads), _get(hf, "num_key_value_heads", heads)
    if heads % kv_heads:
        refuse("num_key_value_heads", kv_heads, f"a divisor of num_attention_heads ({heads})")
    layers = _get(hf, "num_hidden_layers", 32)
    theta, scaling, max_len = _rope(hf, _get(hf, "max_position_embeddings", 2048))
    eos = special_id(hf, "eos_token_id", None, lists=True)
    bos = special_id(hf, "bos_token_id", eos, lists=True)
    eos = (0 if bos is None else bos) if eos is None else eos  # neither set (a bare test config): id 0
    bos = eos if bos is None else bos
    return ModelConfig(
        model="gpt", vocab_size=hf["vocab_size"], num_layers=layers, num_heads=heads,
        num_kv_heads=kv_heads, embed_dim=embed,
        head_dim=None if head_dim * heads == embed else head_dim, mlp_dim=_get(hf, "intermediate_size", 11008),
        max_len=max_len, dropout_rate=0.0, attention_dropout_rate=_get(hf, "attention_dropout", 0.0, float),
        position="rotary", rope_base=theta, rope_scaling=scaling, norm="rmsnorm", norm_position="pre",
        norm_epsilon=_get(hf, "rms_norm_eps", 1e-6, float), activation=_ACTIVATIONS[act],
        use_bias=attention_bias and kind != "qwen2", qkv_bias=True if kind == "qwen2" else None,
        qk_norm=kind == "qwen3", sliding_window=_window(hf, kind, layers),
        tie_embeddings=_get(hf, "tie_word_embeddings", False, bool),
        init_std=_get(hf, "initializer_range", 0.02, float),
        pad_id=special_id(hf, "pad_token_id", eos, lists=True), bos_id=bos, eos_id=eos)


def size_sources(cfg: ModelConfig, prefix: str = PREFIX) -> tuple[str, str, list]:
    """``(layer count key, layer tensor prefix, [(config.json key, its value, HF tensor name, axis)])``: where the
    weights show each size of ``cfg`` (hf.py compares them before building anything)."""
    attn, d = f"{prefix}layers.0.self_attn", cfg.resolved_head_dim
    return "num_hidden_layers", f"{prefix}layers.", [
        ("vocab_size", cfg.vocab_size, f"{prefix}embed_tokens.weight", 0),
        ("hidden_size", cfg.embed_dim, f"{prefix}embed_tokens.weight", 1),
        ("intermediate_size", cfg.mlp_dim, f"{prefix}layers.0.mlp.gate_proj.weight", 0),  # Linear: [out, in]
        ("num_attention_heads * head_dim", cfg.num_heads * d, f"{attn}.q_proj.weight", 0),
        ("num_key_value_heads * head_dim", (cfg.num_kv_heads or cfg.num_heads) * d, f"{attn}.k_proj.weight", 0)]


def family_of(cfg: ModelConfig) -> str:
    """The Hugging Face model type that expresses ``cfg``: qwen3 (QK-norm), qwen2 (q/k/v biases alone), mistral
    (a sliding window), else llama."""
    if cfg.qk_norm:
        return "qwen3"
    if cfg.qkv_bias and not cfg.use_bias:
        return "qwen2"
    return "mistral" if cfg.sliding_window is not None else "llama"


def _check_exportable(cfg: ModelConfig, kind: str) -> None:
    """Raise `ValueError` naming the first field of ``cfg`` that ``kind``'s layout cannot express."""
    accepted = {"model": ("gpt",), **accepted_fields(cfg), "position": ("rotary",), "norm": ("rmsnorm",),
                "norm_position": ("pre",), "embed_norm": (False,), "type_vocab_size": (0,),
                "activation": tuple(sorted(_ACTIVATIONS.values()))}
    if kind == "qwen2":
        accepted.update(use_bias=(False,), qkv_bias=(True,))
    if kind == "qwen3":  # its attention_bias would bias o_proj but not the MLP: no ModelConfig form
        accepted.update(qk_norm=(True,), use_bias=(False,))
    if kind == "mistral":
        accepted.update(use_bias=(False,))
    if kind == "llama":
        accepted.update(sliding_window=(None,))
    check_accepted(cfg, accepted, FAMILIES[kind])
    s = cfg.rope_scaling
    if s is not None and s.rope_type == "dynamic" and cfg.max_len != int(s.original_max_len * s.factor):
        raise ValueError(f"save_hf cannot express ModelConfig.max_len={cfg.max_len} with dynamic rope scaling: "
                         "Hugging Face keeps only max_position_embeddings (the original length), and a load gives "
                         f"max_len = original_max_len * factor = {int(s.original_max_len * s.factor)}; set max_len to "
                         "that")


def _rope_to_hf(cfg: ModelConfig) -> tuple[dict, int]:
    """``(rope_parameters, max_position_embeddings)``."""
    params = {"rope_type": "default", "rope_theta": cfg.rope_base}
    s = cfg.rope_scaling
    if s is None:
        return params, cfg.max_len
    params.update(rope_type=s.rope_type, factor=s.factor)
    if s.rope_type == "dynamic":
        return params, s.original_max_len
    if s.rope_type == "llama3":
        params.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                      original_max_position_embeddings=s.original_max_len)
    return params, cfg.max_len


def config_to_hf(cfg: ModelConfig, kind: str | None = None) -> dict:
    """config.json for ``cfg`` in ``kind``'s layout (a key of ``FAMILIES``; None: `family_of`). Writes the rope
    settings both ways (``rope_parameters`` for transformers 5, ``rope_theta`` + ``rope_scaling`` for older
    readers)."""
    kind = family_of(cfg) if kind is None else kind
    if kind not in FAMILIES:
        raise ValueError(f"save_hf model_type must be one of {list(FAMILIES)}, got {kind!r}")
    _check_exportable(cfg, kind)
    rope, max_pos = _rope_to_hf(cfg)
    out = {"model_type": kind, "architectures": [FAMILIES[kind]], "vocab_size": cfg.vocab_size,
           "hidden_size": cfg.embed_dim, "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.num_layers,
           "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads or cfg.num_heads,
           "head_dim": cfg.resolved_head_dim, "hidden_act": hf_names(_ACTIVATIONS)[cfg.activation],
           "max_position_embeddings": max_pos, "rms_norm_eps": cfg.norm_epsilon,
           "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings,
           "attention_dropout": cfg.attention_dropout_rate, "rope_parameters": rope, "rope_theta": cfg.rope_base,
           "rope_scaling": None if cfg.rope_scaling is None else {k: v for k, v in rope.items() if k != "rope_theta"},
           "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id, "pad_token_id": cfg.pad_id,
           "sliding_window": cfg.sliding_window, "dtype": "float32"}
    if kind in ("llama", "qwen3"):
        out["attention_bias"] = cfg.use_bias  # always False for qwen3 (checked above)
    if kind == "llama":
        out["mlp_bias"] = cfg.use_bias
    if kind in ("qwen2", "qwen3"):
        windowed = cfg.sliding_window is not None
        out.update(use_sliding_window=windowed, max_window_layers=0 if windowed else cfg.num_layers,
                   layer_types=[("sliding" if windowed else "full") + "_attention"] * cfg.num_layers)
    return out


def param_map(cfg: ModelConfig, prefix: str = PREFIX) -> list:
    """``(HF tensor name, our path, to_ours, to_hf)`` for every parameter of ``cfg`` (a torch Linear ``[out, in]``
    <-> our ``[in, (heads, d)]``); ``prefix``: the base model's (`PREFIX`)."""
    out = [(f"{prefix}embed_tokens.weight", ("embedder", "token", "embedding"), *SAME),
           (f"{prefix}norm.weight", ("final_norm", "scale"), *SAME)]
    if not cfg.tie_embeddings:
        out.append(("lm_head.weight", ("lm_head", "kernel"), *linear()))
    for i in range(cfg.num_layers):
        out += _layer_map(cfg, f"{prefix}layers.{i}", ("decoder", layer_name(i)))
    return out


def _layer_map(cfg: ModelConfig, p: str, ours: tuple) -> list:
    """The mapping entries of one decoder layer: HF names under ``p``, ours under ``ours``."""
    h, kv = cfg.num_heads, cfg.num_kv_heads or cfg.num_heads
    qkv_bias = cfg.use_bias if cfg.qkv_bias is None else cfg.qkv_bias
    att = ours + ("self_attention",)
    out = [(f"{p}.input_layernorm.weight", ours + ("self_attention_norm", "scale"), *SAME),
           (f"{p}.post_attention_layernorm.weight", ours + ("mlp_norm", "scale"), *SAME),
           (f"{p}.self_attn.o_proj.weight", att + ("out", "kernel"), *linear(heads_in=h))]
    for hf_name, role, heads in (("q_proj", "query", h), ("k_proj", "key", kv), ("v_proj", "value", kv)):
        out.append((f"{p}.self_attn.{hf_name}.weight", att + (role, "kernel"), *linear(heads)))
        if qkv_bias:
            out.append((f"{p}.self_attn.{hf_name}.bias", att + (role, "bias"), *bias(heads)))
    if cfg.use_bias:
        out.append((f"{p}.self_attn.o_proj.bias", att + ("out", "bias"), *SAME))
    if cfg.qk_norm:
        out += [(f"{p}.self_attn.q_norm.weight", att + ("query_norm", "scale"), *SAME),
                (f"{p}.self_attn.k_norm.weight", att + ("key_norm", "scale"), *SAME)]
    for hf_name, role in (("gate_proj", "wi_0"), ("up_proj", "wi_1"), ("down_proj", "wo")):
        out.append((f"{p}.mlp.{hf_name}.weight", ours + ("mlp", role, "kernel"), *linear()))
        if cfg.use_bias:
            out.append((f"{p}.mlp.{hf_name}.bias", ours + ("mlp", role, "bias"), *SAME))
    return out
