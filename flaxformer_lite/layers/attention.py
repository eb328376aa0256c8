"""`MultiHeadAttention`: query/key/value/out projections around a softmax or linear attention kernel.

Shape key: b batch, q query length, k key length, e embed dim, h query heads, n kv heads, d head dim.
Parameters carry logical axis names (``embed``, ``heads``, ``kv_heads``, ``head_dim``) for sharding rules.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..attention import FEATURE_MAPS, IMPLS, FeatureMap, Mask, linear_attention, softmax_attention

ATTENTION_KINDS = ("softmax", "linear")
default_kernel_init = nn.initializers.normal(stddev=0.02)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with GQA/MQA, a free head dim, and the kernel chosen by configuration.

    Attributes:
      num_heads: query heads h.
      num_kv_heads: key/value heads n (``h % n == 0``); None means ``h`` (MHA); 1 is MQA.
      head_dim: d; None means ``embed_dim // num_heads``. It may differ from that (a wider head removes the
        low-rank bottleneck of small heads, Bhojanapalli et al. 2020).
      out_dim: output features; None means the query input's feature size.
      attention: ``"softmax"`` or ``"linear"``.
      attention_impl: softmax impl (``"auto"``, ``"reference"``, ``"xla"``, ``"blockwise"``, ``"cudnn"``).
      feature_map: linear-attention feature map (``"elu"``, ``"relu"``, ``"favor"`` or a `FeatureMap`).
      dropout_rate: attention-probability dropout (softmax only), active when ``deterministic=False``.
      use_bias: biases on the four projections.
      dtype: compute dtype; param_dtype: parameter dtype.
      kernel_init: initialiser of the projection kernels.
    """

    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    out_dim: int | None = None
    attention: str = "softmax"
    attention_impl: str = "auto"
    feature_map: "str | FeatureMap" = "elu"
    dropout_rate: float = 0.0
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = default_kernel_init

    def _check(self, embed_dim: int) -> tuple[int, int]:
        kv_heads = self.num_kv_heads or self.num_heads
        if self.num_heads < 1 or self.num_heads % kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a positive multiple of num_kv_heads ({kv_heads})")
        if self.head_dim is None and embed_dim % self.num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) is not divisible by num_heads ({self.num_heads}); "
                             "set head_dim explicitly")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.attention == "softmax" and self.attention_impl not in IMPLS:
            raise ValueError(f"attention_impl must be one of {IMPLS}, got {self.attention_impl!r}")
        if self.attention == "linear" and isinstance(self.feature_map, str) and self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)}, got {self.feature_map!r}")
        if self.attention == "linear" and self.dropout_rate:
            raise ValueError("dropout_rate must be 0 with attention='linear' (no attention probabilities to drop)")
        return kv_heads, self.head_dim or embed_dim // self.num_heads

    def _project(self, name: str, x: jax.Array, heads: int, head_dim: int, head_axis: str) -> jax.Array:
        return nn.DenseGeneral(
            (heads, head_dim), use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(self.kernel_init, ("embed", head_axis, "head_dim")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (head_axis, "head_dim")), name=name)(x)

    @nn.compact
    def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array | None = None, *, mask: Mask | None = None,
                 bias: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        """Attend from ``inputs_q [b, q, e]`` to ``inputs_kv [b, k, e]`` (itself when None) -> ``[b, q, out_dim]``.

        ``mask`` is a `Mask`; ``bias`` an additive logits bias broadcastable to ``[b, h, q, k]`` (softmax only).
        """
        if inputs_q.ndim != 3 or (inputs_kv is not None and inputs_kv.ndim != 3):
            raise ValueError(f"inputs must be [batch, length, features]; got {inputs_q.shape} and "
                             f"{None if inputs_kv is None else inputs_kv.shape}")
        inputs_kv = inputs_q if inputs_kv is None else inputs_kv
        kv_heads, head_dim = self._check(inputs_q.shape[-1])
        q = self._project("query", inputs_q, self.num_heads, head_dim, "heads")
        k = self._project("key", inputs_kv, kv_heads, head_dim, "kv_heads")
        v = self._project("value", inputs_kv, kv_heads, head_dim, "kv_heads")
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        k = nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "head_dim"))
        v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "head_dim"))
        if self.attention == "softmax":
            rate = 0.0 if deterministic else self.dropout_rate
            rng = self.make_rng("dropout") if rate > 0 else None
            out = softmax_attention(q, k, v, mask=mask, bias=bias, impl=self.attention_impl,
                                    dropout_rate=rate, dropout_rng=rng)
        else:
            out = linear_attention(q, k, v, mask=mask, feature_map=self.feature_map, bias=bias)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        return nn.DenseGeneral(
            self.out_dim or inputs_q.shape[-1], axis=(-2, -1), use_bias=self.use_bias, dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(self.kernel_init, ("heads", "head_dim", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), name="out")(out)
