"""Normalisation layers with logical axis names: LayerNorm (with bias), RMSNorm (the T5 norm: no mean, no bias), and
their conditional form (γ and β produced from a condition vector, as in conditional batch/layer norm).

Shape key: b batch, l length, e embed dim, c condition dim.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..choices import NORMS


def make_norm(kind: str, *, epsilon: float = 1e-5, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
              condition_dim: int = 0, name: str | None = None) -> nn.Module:
    """A norm over the last (``embed``) axis: ``"layernorm"`` (scale + bias) or ``"rmsnorm"`` (scale only).
    Statistics are float32 whatever ``dtype``. ``condition_dim > 0`` makes it a `ConditionalNorm`."""
    if kind not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")
    if not isinstance(condition_dim, int) or isinstance(condition_dim, bool) or condition_dim < 0:
        raise ValueError(f"condition_dim must be an int >= 0, got {condition_dim!r}")
    if condition_dim:
        return ConditionalNorm(kind, condition_dim, epsilon, dtype, param_dtype, name=name)
    scale = nn.with_logical_partitioning(nn.initializers.ones, ("embed",))
    if kind == "layernorm":
        return nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, scale_init=scale,
                            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), name=name)
    return nn.RMSNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, scale_init=scale, name=name)


class ConditionalNorm(nn.Module):
    """``x [b, l, e]``, ``condition [b, c]`` -> ``normalise(x) * (γ + c W_γ) + (β + c W_β)`` (no β for RMSNorm).

    The conditional layer norm of bert4keras (Su 2019), after conditional batch norm (de Vries et al. 2017): the
    condition shifts the norm's gain and bias per example. ``W_γ`` and ``W_β`` start at zero, so an untrained or a
    missing condition (``condition=None``) gives exactly the plain norm.

    Attributes: kind (``"layernorm"`` | ``"rmsnorm"``), condition_dim (c), epsilon, dtype, param_dtype.
    """

    kind: str
    condition_dim: int
    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, condition: jax.Array | None = None) -> jax.Array:
        e = x.shape[-1]
        if self.kind == "layernorm":
            x32 = x.astype(jnp.float32)
            x32 = x32 - x32.mean(-1, keepdims=True)
        else:
            x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt((x32 * x32).mean(-1, keepdims=True) + self.epsilon)
        gain = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (e,),
                          self.param_dtype).astype(jnp.float32)
        shift = None
        if self.kind == "layernorm":
            shift = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (e,),
                               self.param_dtype).astype(jnp.float32)
        kernels = {name: self.param(name, nn.with_logical_partitioning(nn.initializers.zeros, ("condition", "embed")),
                                    (self.condition_dim, e), self.param_dtype)
                   for name in (("scale_kernel", "bias_kernel") if shift is not None else ("scale_kernel",))}
        if condition is not None:
            if condition.ndim != 2 or condition.shape != (x.shape[0], self.condition_dim):
                raise ValueError(f"condition must be [batch, condition_dim] = {[x.shape[0], self.condition_dim]}, "
                                 f"got {list(condition.shape)}")
            c = condition.astype(jnp.float32)
            per_example = (x.shape[0],) + (1,) * (x.ndim - 2) + (e,)
            gain = gain + (c @ kernels["scale_kernel"].astype(jnp.float32)).reshape(per_example)
            if shift is not None:
                shift = shift + (c @ kernels["bias_kernel"].astype(jnp.float32)).reshape(per_example)
        y = y * gain
        return (y if shift is None else y + shift).astype(self.dtype)


def apply_norm(norm: nn.Module, x: jax.Array, condition: jax.Array | None = None) -> jax.Array:
    """``norm(x)``, passing ``condition [b, c]`` when ``norm`` is a `ConditionalNorm`."""
    return norm(x, condition) if isinstance(norm, ConditionalNorm) else norm(x)
