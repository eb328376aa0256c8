"""`ModelConfig`: the one frozen configuration of every model, its validation, and the named presets.

Variants by ``dataclasses.replace(preset("gpt2-small"), attention="linear")``; every field is checked when the
config is built, and a bad value raises `ValueError` naming the field and the accepted values.
"""
from __future__ import annotations

import dataclasses
import math

from ..choices import (ACTIVATION_NAMES, ATTENTION_KINDS, FEATURE_MAP_NAMES, IMPLS, RECURRENT_GATES, NORMS, POSITIONS,
                       RopeScaling)
from ..messages import short_repr

MODELS = ("gpt", "bert", "encoder_decoder")
DTYPES = ("float32", "bfloat16", "float16")
_CHOICES = {"model": MODELS, "attention": ATTENTION_KINDS, "attention_impl": IMPLS, "position": POSITIONS,
            "norm": NORMS, "norm_position": ("pre", "post"), "activation": ACTIVATION_NAMES,
            "dtype": DTYPES, "param_dtype": DTYPES, "feature_map": FEATURE_MAP_NAMES,
            "recurrent_gate": RECURRENT_GATES}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:  # Python numbers only (no NumPy scalars): the config is dumped to YAML
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# field -> (the accepted values in words, `str.format`ted with vocab_size; their test of (value, config)). Checked in
# this order, so vocab_size is known valid before the token ids are compared with it.
_POSITIVE_INT = ("a positive int", lambda v, c: _is_int(v) and v >= 1)
_POSITIVE_INT_OR_NONE = ("a positive int or None", lambda v, c: v is None or (_is_int(v) and v >= 1))
_COUNT = ("an int >= 0", lambda v, c: _is_int(v) and v >= 0)
_FRACTION = ("a number in [0, 1)", lambda v, c: _is_number(v) and 0 <= v < 1)
_POSITIVE = ("a finite number > 0", lambda v, c: _is_number(v) and v > 0)
_TOKEN_ID = ("an int in [0, vocab_size={vocab_size})", lambda v, c: _is_int(v) and 0 <= v < c.vocab_size)
_BOOL = ("a bool", lambda v, c: isinstance(v, bool))
_FIELDS = {
    **dict.fromkeys(("vocab_size", "num_layers", "num_heads", "embed_dim", "mlp_dim", "max_len"), _POSITIVE_INT),
    **dict.fromkeys(("num_decoder_layers", "num_kv_heads", "head_dim", "table_dim"), _POSITIVE_INT_OR_NONE),
    **dict.fromkeys(("condition_dim", "type_vocab_size"), _COUNT),
    **dict.fromkeys(("dropout_rate", "attention_dropout_rate"), _FRACTION),
    **dict.fromkeys(("norm_epsilon", "init_std"), _POSITIVE),
    "rope_base": ("a finite number > 1", lambda v, c: _is_number(v) and v > 1),  # base 1: one frequency for all
    **dict.fromkeys(("pad_id", "bos_id", "eos_id"), _TOKEN_ID),
    **dict.fromkeys(("talking_heads", "use_bias", "tie_embeddings", "embed_scale", "embed_norm", "share_layers",
                     "remat", "scan_layers", "qk_norm"), _BOOL),
    "qkv_bias": ("a bool or None", lambda v, c: v is None or isinstance(v, bool)),
    "sliding_window": _POSITIVE_INT_OR_NONE,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every model's hyper-parameters (names from the glossary in ARCHITECTURE.md).

    Attributes:
      model: ``"gpt"``, ``"bert"`` or ``"encoder_decoder"`` (what `build` makes).
      vocab_size, num_layers, num_heads, embed_dim, mlp_dim, max_len: the usual sizes; ``max_len`` bounds the
        sequence length (the learned position table).
      num_decoder_layers: decoder depth of an encoder-decoder (None: ``num_layers``).
      num_kv_heads: GQA/MQA kv heads (None: ``num_heads``). head_dim: None means ``embed_dim // num_heads``.
      dropout_rate: embeddings, residuals and MLP hidden; attention_dropout_rate: attention probabilities.
      attention: ``"softmax"``, ``"linear"``, ``"delta"`` (DeltaNet's delta rule; model ``"gpt"``), or a dense
        variant: ``"additive"`` (Bahdanau), ``"synthesizer_dense"``, ``"synthesizer_random"`` (Tay et al.;
        self-attention only); attention_impl: the softmax impl; feature_map: the linear map; recurrent_gate:
        ``"none"``, ``"fixed"`` (RetNet's per-head decay) or ``"data"`` (GLA-style per-token decay; with delta,
        Gated DeltaNet) of the linear or delta state (model ``"gpt"``). talking_heads: mix logits and
        probabilities across heads (softmax; computed densely).
      position: ``"learned"``, ``"sinusoidal"``, ``"rotary"`` or ``"none"``; rope_base (> 1) for rotary (Hugging
        Face's ``rope_theta``); rope_scaling: a `RopeScaling` (``linear``, ``dynamic`` or ``llama3`` long-context
        frequency stretch; a mapping of its fields is accepted, as YAML gives it) or None; rotary only.
      norm: ``"layernorm"`` or ``"rmsnorm"``; norm_position ``"pre"`` or ``"post"``; norm_epsilon (> 0).
      condition_dim: > 0 makes the layer-stack and final norms conditional on a ``condition [b, condition_dim]``
        model input (γ, β predicted from it; GPT and BERT).
      activation: MLP activation (``relu``, ``gelu``, ``gelu_tanh``, ``silu``, ``swiglu``, ``geglu``).
      use_bias: biases in attention and MLP projections; qkv_bias: biases on the query/key/value projections when
        it differs from that (None: as use_bias; Qwen2: ``use_bias=False, qkv_bias=True``).
      qk_norm: RMSNorm over each head's queries and keys before rotary (Qwen3), with norm_epsilon.
      sliding_window: each query sees itself and the ``sliding_window - 1`` tokens before it (Mistral; Hugging
        Face's ``sliding_window``), in training and decoding; None: the whole causal context. GPT, not linear.
      tie_embeddings: output projection = token embedding transposed.
      embed_scale: multiply token embeddings by sqrt(embed_dim) (Vaswani et al.).
      embed_norm: normalise the embeddings (BERT); type_vocab_size: token types (BERT: 2; 0 for none).
      table_dim: ALBERT's factorised embeddings: the width of the embedding tables, projected to embed_dim (BERT;
        None: the tables are embed_dim wide).
      share_layers: ALBERT's cross-layer sharing: one set of layer parameters used at every depth.
      init_std: std (> 0) of the normal initialiser of kernels and embeddings.
      pad_id, bos_id, eos_id: special token ids in ``[0, vocab_size)`` (bos starts encoder-decoder decoding).
      dtype: compute dtype; param_dtype: parameter dtype.
      remat: rematerialise each layer in the backward pass; scan_layers: one `nn.scan` over layers.
    """

    model: str = "gpt"
    vocab_size: int = 50257
    num_layers: int = 12
    num_decoder_layers: int | None = None
    num_heads: int = 12
    num_kv_heads: int | None = None
    embed_dim: int = 768
    head_dim: int | None = None
    mlp_dim: int = 3072
    max_len: int = 1024
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    attention: str = "softmax"
    talking_heads: bool = False
    attention_impl: str = "auto"
    feature_map: str = "elu"
    recurrent_gate: str = "none"
    position: str = "learned"
    rope_base: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    norm: str = "layernorm"
    norm_position: str = "pre"
    norm_epsilon: float = 1e-5
    condition_dim: int = 0
    activation: str = "gelu_tanh"
    use_bias: bool = True
    qkv_bias: bool | None = None
    qk_norm: bool = False
    sliding_window: int | None = None
    tie_embeddings: bool = True
    embed_scale: bool = False
    embed_norm: bool = False
    type_vocab_size: int = 0
    table_dim: int | None = None
    share_layers: bool = False
    init_std: float = 0.02
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    scan_layers: bool = False

    def __post_init__(self):
        if self.rope_scaling is not None:  # a mapping from YAML or config.json becomes the (hashable) dataclass
            object.__setattr__(self, "rope_scaling", RopeScaling.from_dict(self.rope_scaling))
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"ModelConfig.{name} must be one of {list(choices)}, got "
                                 f"{short_repr(getattr(self, name))}")
        for name, (accepted, valid) in _FIELDS.items():
            if not valid(getattr(self, name), self):
                raise ValueError(f"ModelConfig.{name} must be {accepted.format(vocab_size=self.vocab_size)}, "
                                 f"got {short_repr(getattr(self, name))}")
        self._check_combinations()

    def _check_combinations(self):
        kv = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
        if self.num_heads % kv:
            raise ValueError(f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({kv})")
        if self.head_dim is None and self.embed_dim % self.num_heads:
            raise ValueError(f"ModelConfig.embed_dim ({self.embed_dim}) must be divisible by num_heads "
                             f"({self.num_heads}), or set head_dim")
        if self.position == "sinusoidal" and (self.table_dim or self.embed_dim) % 2:
            raise ValueError(f"ModelConfig.position='sinusoidal' needs an even embed_dim (table_dim when set), "
                             f"got {self.table_dim or self.embed_dim}")
        if self.position == "rotary" and self.resolved_head_dim % 2:
            raise ValueError(f"ModelConfig.position='rotary' needs an even head_dim, got {self.resolved_head_dim}")
        if self.talking_heads and self.attention != "softmax":
            raise ValueError(f"ModelConfig.talking_heads needs attention='softmax', got {self.attention!r}")
        if self.condition_dim and self.model not in ("gpt", "bert"):
            raise ValueError(f"ModelConfig.condition_dim is supported for model 'gpt' and 'bert', not {self.model!r}")
        self._check_decoder_fields()
        if self.table_dim is not None and self.model != "bert":
            raise ValueError(f"ModelConfig.table_dim (factorised embeddings) is supported for model 'bert' "
                             f"(ALBERT), not {self.model!r}")

    def _check_decoder_fields(self):
        """The fields of the modern decoders (Llama, Mistral, Qwen): each only where it has a meaning."""
        if self.rope_scaling is not None and self.position != "rotary":
            raise ValueError(f"ModelConfig.rope_scaling needs position='rotary', got position={self.position!r}")
        if self.sliding_window is not None and self.model != "gpt":
            raise ValueError(f"ModelConfig.sliding_window is supported for model 'gpt', not {self.model!r}")
        if self.sliding_window is not None and self.attention in ("linear", "delta"):
            raise ValueError("ModelConfig.sliding_window needs attention='softmax' (or a dense variant), not "
                             f"{self.attention!r}")
        if self.recurrent_gate != "none" and (self.attention not in ("linear", "delta") or self.model != "gpt"):
            raise ValueError(f"ModelConfig.recurrent_gate={self.recurrent_gate!r} needs attention 'linear' or 'delta' and "
                             f"model 'gpt' (a decay runs forward in time: causal self-attention), got attention="
                             f"{self.attention!r}, model={self.model!r}")
        if self.attention == "delta" and self.model != "gpt":
            raise ValueError(f"ModelConfig.attention='delta' is causal self-attention: model 'gpt', not {self.model!r}")
        if self.qk_norm and self.attention in ("synthesizer_dense", "synthesizer_random"):
            raise ValueError(f"ModelConfig.qk_norm needs queries and keys; attention={self.attention!r} has none")

    @property
    def resolved_head_dim(self) -> int:
        """head_dim, or embed_dim // num_heads when unset."""
        return self.embed_dim // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def decoder_layers(self) -> int:
        """Decoder depth of an encoder-decoder."""
        return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers


def _gpt2(layers, heads, embed):
    return ModelConfig(model="gpt", vocab_size=50257, num_layers=layers, num_heads=heads, embed_dim=embed,
                       mlp_dim=4 * embed, max_len=1024, activation="gelu_tanh", norm_position="pre",
                       position="learned", norm_epsilon=1e-5, bos_id=50256, eos_id=50256, pad_id=50256)


def _bert(layers, heads, embed, vocab=30522):
    return ModelConfig(model="bert", vocab_size=vocab, num_layers=layers, num_heads=heads, embed_dim=embed,
                       mlp_dim=4 * embed, max_len=512, activation="gelu", norm_position="post", position="learned",
                       norm_epsilon=1e-12, embed_norm=True, type_vocab_size=2, pad_id=0, bos_id=101, eos_id=102)


def _transformer(embed, heads, mlp, dropout, layers=6, vocab=37000):
    return ModelConfig(model="encoder_decoder", vocab_size=vocab, num_layers=layers, num_heads=heads, embed_dim=embed,
                       mlp_dim=mlp, max_len=1024, dropout_rate=dropout, attention_dropout_rate=0.0,
                       activation="relu", norm_position="post", position="sinusoidal", norm_epsilon=1e-6,
                       embed_scale=True, init_std=embed ** -0.5)


def _decoder(vocab, layers, heads, kv_heads, embed, mlp, max_len, theta, eps, bos, eos, **fields):
    """A Llama-style decoder: pre-RMSNorm, SwiGLU, rotary (``rope_base`` = theta), no biases, no dropout; the pad id
    is the end-of-text id unless given (these checkpoints have none)."""
    fields = {"pad_id": eos, **fields}
    return ModelConfig(model="gpt", vocab_size=vocab, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                       embed_dim=embed, mlp_dim=mlp, max_len=max_len, dropout_rate=0.0, attention_dropout_rate=0.0,
                       position="rotary", rope_base=theta, norm="rmsnorm", norm_position="pre", norm_epsilon=eps,
                       activation="swiglu", use_bias=False, bos_id=bos, eos_id=eos, **fields)


PRESETS = {
    "gpt2-small": _gpt2(12, 12, 768),
    "gpt2-medium": _gpt2(24, 16, 1024),
    "gpt2-large": _gpt2(36, 20, 1280),
    "gpt2-xl": _gpt2(48, 25, 1600),
    "gpt-tiny": dataclasses.replace(_gpt2(4, 4, 256), vocab_size=4096, max_len=256, pad_id=0, bos_id=1, eos_id=2),
    "bert-base": _bert(12, 12, 768),
    "bert-large": _bert(24, 16, 1024),
    "bert-tiny": _bert(2, 2, 128),  # Google's BERT-Tiny (L=2, H=128, A=2)
    # ALBERT v2 (Lan et al. 2020): factorised 128-wide embeddings, one layer's parameters shared by every depth
    "albert-base": dataclasses.replace(_bert(12, 12, 768, vocab=30000), table_dim=128, share_layers=True,
                                       activation="gelu_tanh", dropout_rate=0.0, attention_dropout_rate=0.0,
                                       bos_id=2, eos_id=3),
    "albert-large": dataclasses.replace(_bert(24, 16, 1024, vocab=30000), table_dim=128, share_layers=True,
                                        activation="gelu_tanh", dropout_rate=0.0, attention_dropout_rate=0.0,
                                        bos_id=2, eos_id=3),
    "transformer-base": _transformer(512, 8, 2048, 0.1),
    "transformer-big": _transformer(1024, 16, 4096, 0.3),
    "transformer-tiny": _transformer(128, 4, 512, 0.1, layers=2, vocab=4096),
    # Hugging Face's config.json of each (counts: 1,235,814,400; 494,032,768; 596,049,920 parameters)
    "llama-3.2-1b": _decoder(128256, 16, 32, 8, 2048, 8192, 131072, 500_000.0, 1e-5, 128000, 128001,
                             tie_embeddings=True, rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)),
    "qwen2.5-0.5b": _decoder(151936, 24, 14, 2, 896, 4864, 32768, 1_000_000.0, 1e-6, 151643, 151643,
                             tie_embeddings=True, qkv_bias=True),
    "qwen3-0.6b": _decoder(151936, 28, 16, 8, 1024, 3072, 40960, 1_000_000.0, 1e-6, 151643, 151645,
                           tie_embeddings=True, head_dim=128, qk_norm=True),
    # small ones for tests and train.py (a few minutes on a CPU, as gpt-tiny)
    "llama-tiny": _decoder(4096, 4, 8, 2, 256, 768, 256, 10_000.0, 1e-5, 1, 2, pad_id=0, tie_embeddings=False),
    "mistral-tiny": _decoder(4096, 4, 8, 2, 256, 768, 256, 10_000.0, 1e-5, 1, 2, pad_id=0, tie_embeddings=False,
                             sliding_window=64),
    "qwen3-tiny": _decoder(4096, 4, 8, 4, 256, 768, 256, 1_000_000.0, 1e-6, 1, 2, pad_id=0, tie_embeddings=True,
                           head_dim=64, qk_norm=True),
}


def preset(name: str) -> ModelConfig:
    """The named configuration (see `list_presets`); raises `ValueError` listing them for an unknown name."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {list_presets()}")
    return PRESETS[name]


def list_presets() -> list[str]:
    """Names accepted by `preset`."""
    return list(PRESETS)
