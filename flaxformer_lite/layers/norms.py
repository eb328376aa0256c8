"""Normalisation layers with logical axis names: LayerNorm (with bias) and RMSNorm (the T5 norm: no mean, no bias)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

NORMS = ("layernorm", "rmsnorm")


def make_norm(kind: str, *, epsilon: float = 1e-5, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
              name: str | None = None) -> nn.Module:
    """A norm over the last (``embed``) axis: ``"layernorm"`` (scale + bias) or ``"rmsnorm"`` (scale only).
    Statistics are float32 whatever ``dtype``."""
    scale = nn.with_logical_partitioning(nn.initializers.ones, ("embed",))
    if kind == "layernorm":
        return nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, scale_init=scale,
                            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), name=name)
    if kind == "rmsnorm":
        return nn.RMSNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, scale_init=scale, name=name)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")
