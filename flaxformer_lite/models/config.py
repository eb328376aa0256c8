"""`ModelConfig`: the one frozen configuration of every model, its validation, and the named presets.

Variants by ``dataclasses.replace(preset("gpt2-small"), attention="linear")``; every field is checked when the
config is built, and a bad value raises `ValueError` naming the field and the accepted values.
"""
from __future__ import annotations

import dataclasses

from ..attention import FEATURE_MAPS, IMPLS
from ..layers.attention import ATTENTION_KINDS
from ..layers.embedder import POSITIONS
from ..layers.mlp import ACTIVATIONS
from ..layers.norms import NORMS

MODELS = ("gpt", "bert", "encoder_decoder")
DTYPES = ("float32", "bfloat16", "float16")
_CHOICES = {"model": MODELS, "attention": ATTENTION_KINDS, "attention_impl": IMPLS, "position": POSITIONS,
            "norm": NORMS, "norm_position": ("pre", "post"), "activation": tuple(sorted(ACTIVATIONS)),
            "dtype": DTYPES, "param_dtype": DTYPES, "feature_map": tuple(sorted(FEATURE_MAPS))}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every model's hyper-parameters (names from the DESIGN.md glossary).

    Attributes:
      model: ``"gpt"``, ``"bert"`` or ``"encoder_decoder"`` (what `build` makes).
      vocab_size, num_layers, num_heads, embed_dim, mlp_dim, max_len: the usual sizes; ``max_len`` bounds the
        sequence length (the learned position table).
      num_decoder_layers: decoder depth of an encoder-decoder (None: ``num_layers``).
      num_kv_heads: GQA/MQA kv heads (None: ``num_heads``). head_dim: None means ``embed_dim // num_heads``.
      dropout_rate: embeddings, residuals and MLP hidden; attention_dropout_rate: attention probabilities.
      attention: ``"softmax"``, ``"linear"``, or a dense variant: ``"additive"`` (Bahdanau), ``"synthesizer_dense"``,
        ``"synthesizer_random"`` (Tay et al.; self-attention only); attention_impl: the softmax impl; feature_map:
        the linear map. talking_heads: mix logits and probabilities across heads (softmax; computed densely).
      position: ``"learned"``, ``"sinusoidal"``, ``"rotary"`` or ``"none"``; rope_base for rotary.
      norm: ``"layernorm"`` or ``"rmsnorm"``; norm_position ``"pre"`` or ``"post"``; norm_epsilon.
      condition_dim: > 0 makes the layer-stack and final norms conditional on a ``condition [b, condition_dim]``
        model input (γ, β predicted from it; GPT and BERT).
      activation: MLP activation (``relu``, ``gelu``, ``gelu_tanh``, ``silu``, ``swiglu``, ``geglu``).
      use_bias: biases in attention and MLP projections.
      tie_embeddings: output projection = token embedding transposed.
      embed_scale: multiply token embeddings by sqrt(embed_dim) (Vaswani et al.).
      embed_norm: normalise the embeddings (BERT); type_vocab_size: token types (BERT: 2; 0 for none).
      embedding_dim: ALBERT's factorised embeddings: tables of this width projected to embed_dim (BERT; None: off).
      share_layers: ALBERT's cross-layer sharing: one set of layer parameters used at every depth.
      init_std: std of the normal initialiser of kernels and embeddings.
      pad_id, bos_id, eos_id: special token ids (bos starts encoder-decoder decoding).
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
    position: str = "learned"
    rope_base: float = 10_000.0
    norm: str = "layernorm"
    norm_position: str = "pre"
    norm_epsilon: float = 1e-5
    condition_dim: int = 0
    activation: str = "gelu_tanh"
    use_bias: bool = True
    tie_embeddings: bool = True
    embed_scale: bool = False
    embed_norm: bool = False
    type_vocab_size: int = 0
    embedding_dim: int | None = None
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
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"ModelConfig.{name} must be one of {list(choices)}, got {getattr(self, name)!r}")
        for name in ("vocab_size", "num_layers", "num_heads", "embed_dim", "mlp_dim", "max_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("dropout_rate", "attention_dropout_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"ModelConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")
        self._check_variants()
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ValueError(f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({kv})")
        if self.head_dim is None and self.embed_dim % self.num_heads:
            raise ValueError(f"ModelConfig.embed_dim ({self.embed_dim}) must be divisible by num_heads "
                             f"({self.num_heads}), or set head_dim")
        if self.position == "sinusoidal" and (self.embedding_dim or self.embed_dim) % 2:
            raise ValueError(f"ModelConfig.position='sinusoidal' needs an even embed_dim (embedding_dim when set), "
                             f"got {self.embedding_dim or self.embed_dim}")
        if self.position == "rotary" and self.resolved_head_dim % 2:
            raise ValueError(f"ModelConfig.position='rotary' needs an even head_dim, got {self.resolved_head_dim}")

    def _check_variants(self):
        for name in ("talking_heads", "share_layers"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.talking_heads and self.attention != "softmax":
            raise ValueError(f"ModelConfig.talking_heads needs attention='softmax', got {self.attention!r}")
        if not isinstance(self.condition_dim, int) or isinstance(self.condition_dim, bool) or self.condition_dim < 0:
            raise ValueError(f"ModelConfig.condition_dim must be an int >= 0, got {self.condition_dim!r}")
        if self.condition_dim and self.model not in ("gpt", "bert"):
            raise ValueError(f"ModelConfig.condition_dim is supported for model 'gpt' and 'bert', not {self.model!r}")
        if self.embedding_dim is not None:
            if not isinstance(self.embedding_dim, int) or isinstance(self.embedding_dim, bool) or self.embedding_dim < 1:
                raise ValueError(f"ModelConfig.embedding_dim must be a positive int or None, got {self.embedding_dim!r}")
            if self.model != "bert":
                raise ValueError(f"ModelConfig.embedding_dim (factorised embeddings) is supported for model 'bert' "
                                 f"(ALBERT), not {self.model!r}")

    @property
    def resolved_head_dim(self) -> int:
        """head_dim, or embed_dim // num_heads when unset."""
        return self.head_dim or self.embed_dim // self.num_heads

    @property
    def decoder_layers(self) -> int:
        """Decoder depth of an encoder-decoder."""
        return self.num_decoder_layers or self.num_layers


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
    "albert-base": dataclasses.replace(_bert(12, 12, 768, vocab=30000), embedding_dim=128, share_layers=True,
                                       activation="gelu_tanh", dropout_rate=0.0, attention_dropout_rate=0.0,
                                       bos_id=2, eos_id=3),
    "albert-large": dataclasses.replace(_bert(24, 16, 1024, vocab=30000), embedding_dim=128, share_layers=True,
                                        activation="gelu_tanh", dropout_rate=0.0, attention_dropout_rate=0.0,
                                        bos_id=2, eos_id=3),
    "transformer-base": _transformer(512, 8, 2048, 0.1),
    "transformer-big": _transformer(1024, 16, 4096, 0.3),
    "transformer-tiny": _transformer(128, 4, 512, 0.1, layers=2, vocab=4096),
}


def preset(name: str) -> ModelConfig:
    """The named configuration (see `list_presets`); raises `ValueError` listing them for an unknown name."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {list_presets()}")
    return PRESETS[name]


def list_presets() -> list[str]:
    """Names accepted by `preset`."""
    return list(PRESETS)
