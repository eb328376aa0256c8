"""The names a model config chooses among, for each pluggable part, and `RopeScaling`: plain Python, no JAX.

`ModelConfig` validates against these, so a config loads (and ``python -m flaxformer_lite.run.prepare`` starts)
without importing JAX. The modules that implement each part take their names from here; where a part is a table of
functions (feature maps, activations), a test checks that its keys are these names.
"""
from __future__ import annotations

import dataclasses
import math

IMPLS = ("auto", "reference", "xla", "blockwise", "cudnn", "flash", "pallas")  # softmax_attention(impl=...)
FEATURE_MAP_NAMES = ("elu", "favor", "relu")  # attention.FEATURE_MAPS
ATTENTION_KINDS = ("softmax", "linear", "delta", "additive", "synthesizer_dense", "synthesizer_random")
RECURRENT_GATES = ("none", "fixed", "data")  # decay of a linear or delta state: none, fixed per head (RetNet), per token
POSITIONS = ("learned", "sinusoidal", "rotary", "none")
ACTIVATION_NAMES = ("geglu", "gelu", "gelu_tanh", "relu", "silu", "swiglu")  # layers.mlp.ACTIVATIONS
NORMS = ("layernorm", "rmsnorm")

ROPE_TYPES = ("linear", "dynamic", "llama3")


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How rotary frequencies are stretched for contexts longer than pre-training's (Hugging Face's ``rope_scaling``
    / ``rope_parameters``; the defaults are Llama 3.1's).

    Attributes:
      rope_type: ``"linear"`` (positions divided by ``factor``, Chen et al. 2023), ``"dynamic"`` (NTK-aware: the base
        grows with the longest position of the call once it passes ``original_max_len``), ``"llama3"`` (Llama 3.1:
        low frequencies divided by ``factor``, high ones kept, a smooth ramp between).
      factor: the stretch (> 0); low_freq_factor, high_freq_factor (llama3; high > low > 0): wavelengths longer
        than ``original_max_len / low_freq_factor`` are scaled, shorter than ``original_max_len / high_freq_factor``
        kept.
      original_max_len: the pre-training context (llama3, dynamic; a positive int).
    """

    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"RopeScaling.rope_type must be one of {list(ROPE_TYPES)}, got {self.rope_type!r}")
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            if not _positive_number(getattr(self, name)):
                raise ValueError(f"RopeScaling.{name} must be a finite number > 0, got {getattr(self, name)!r}")
            object.__setattr__(self, name, float(getattr(self, name)))  # 8 and 8.0: one config, one YAML form
        value = self.original_max_len
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"RopeScaling.original_max_len must be a positive int, got {value!r}")
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"RopeScaling.high_freq_factor ({self.high_freq_factor}) must exceed low_freq_factor "
                             f"({self.low_freq_factor}) for rope_type='llama3'")

    @classmethod
    def from_dict(cls, values) -> "RopeScaling":
        """From a mapping (a YAML/JSON form); an unknown key raises `ValueError` listing the valid ones."""
        if isinstance(values, cls):
            return values
        fields = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(values, dict):
            raise ValueError(f"rope_scaling must be a mapping with keys {fields} (or None), got {values!r}")
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"unknown rope_scaling key {unknown[0]!r}; valid keys: {fields}")
        return cls(**values)
