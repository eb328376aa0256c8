"""The position-wise feed-forward block: ``wo(act(wi x))``, or the gated ``wo(silu(wi_0 x) * wi_1 x)`` (SwiGLU).

Shape key: b batch, l length, e embed dim, m mlp dim.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from .dense import kernel_dot_general

ACTIVATIONS: dict[str, Callable] = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # exact erf form (BERT)
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),  # GPT-2's "gelu_new"
    "silu": jax.nn.silu,
    "swiglu": jax.nn.silu,  # gated: silu(wi_0 x) * (wi_1 x), Shazeer 2020
    "geglu": functools.partial(jax.nn.gelu, approximate=True),
}
GATED = {"swiglu", "geglu"}


def check_activation(name: str) -> None:
    """Raise `ValueError` unless ``name`` is in ``ACTIVATIONS``."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")


class MLP(nn.Module):
    """Feed-forward ``[b, l, e] -> [b, l, e]`` with hidden size ``mlp_dim``.

    Attributes: mlp_dim (m), activation (a key of ``ACTIVATIONS``), use_bias, dropout_rate (on the hidden
    activations), dtype, param_dtype, kernel_init.
    """

    mlp_dim: int
    activation: str = "gelu"
    use_bias: bool = True
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.normal(stddev=0.02)

    def _dense(self, features, axes, name):
        return nn.Dense(features, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                        dot_general=kernel_dot_general,
                        kernel_init=nn.with_logical_partitioning(self.kernel_init, axes),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]), name=name)

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        check_activation(self.activation)
        act = ACTIVATIONS[self.activation]
        if self.activation in GATED:
            hidden = act(self._dense(self.mlp_dim, ("embed", "mlp"), "wi_0")(x)) * \
                self._dense(self.mlp_dim, ("embed", "mlp"), "wi_1")(x)
        else:
            hidden = act(self._dense(self.mlp_dim, ("embed", "mlp"), "wi")(x))
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
        hidden = nn.Dropout(self.dropout_rate)(hidden, deterministic=deterministic)
        return self._dense(x.shape[-1], ("mlp", "embed"), "wo")(hidden)
