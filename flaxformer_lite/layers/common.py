"""Builders that read a model config: its dtypes, its norm, a Dense with logical axis names, and the two modules that
end a layer stack (the final norm and the untied output head). Layers and models build these parts here, so that no
layer file imports a sibling and no model file imports another model only for a helper.

``cfg`` is a `models.ModelConfig` or any object with the same field names (layers may not import models/).
Shape key: b batch, l length, e embed dim, v vocab.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .dense import kernel_dot_general
from .norms import apply_norm, make_norm


def config_dtypes(cfg) -> tuple[Any, Any]:
    """``(dtype, param_dtype)`` of a config whose fields may be dtype names."""
    return jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)


def config_norm(cfg, *, conditional: bool = True, name: str | None = None) -> nn.Module:
    """The config's norm over ``[..., e]`` (``cfg.norm``, ``cfg.norm_epsilon``, dtypes); conditional on a
    ``condition [b, c]`` when ``conditional`` and ``cfg.condition_dim > 0`` (call it through `apply_norm`)."""
    dtype, param_dtype = config_dtypes(cfg)
    return make_norm(cfg.norm, epsilon=cfg.norm_epsilon, dtype=dtype, param_dtype=param_dtype,
                     condition_dim=cfg.condition_dim if conditional else 0, name=name)


def apply_config_norm(cfg, name: str, x: jax.Array, condition: jax.Array | None) -> jax.Array:
    """Apply the config's (conditional) norm named ``name`` to ``x [b, l, e]`` (``condition [b, c]`` or None)."""
    return apply_norm(config_norm(cfg, name=name), x, condition)


def dense(cfg, features: int, axes: tuple[str, str], name: str | None = None) -> nn.Dense:
    """``[..., in] -> [..., features]``: a Dense with the config's dtypes and initialiser (normal, ``cfg.init_std``),
    a bias, and logical axis names ``axes`` (``(in, out)``) on its kernel (``axes[1:]`` on its bias)."""
    dtype, param_dtype = config_dtypes(cfg)
    return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, dot_general=kernel_dot_general,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]), name=name)


def output_head(cfg) -> nn.Dense | None:
    """The untied output projection ``[b, l, e] -> [b, l, v]`` (no bias), or None when ``cfg.tie_embeddings``."""
    if cfg.tie_embeddings:
        return None
    dtype, param_dtype = config_dtypes(cfg)
    return nn.Dense(cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("embed", "vocab")))


def final_norm(cfg) -> nn.Module | None:
    """The last norm ``[b, l, e] -> [b, l, e]`` of a pre-LN stack (post-LN stacks end normalised already), or None.
    Conditional when ``cfg.condition_dim > 0`` (call it through `apply_norm`)."""
    return config_norm(cfg) if cfg.norm_position == "pre" else None
