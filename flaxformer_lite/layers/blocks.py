"""`TransformerBlock`: self-attention, optional cross-attention, and MLP, each a residual sublayer with dropout,
normalised before (pre-LN, GPT-2) or after (post-LN, Vaswani et al. / BERT) the residual sum.

The block takes its configuration whole: a `models.ModelConfig` or any object with the same field names (layers may
not import models/). Shape key: b batch, l length, s source length, e embed dim.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .attention import MultiHeadAttention
from .mlp import MLP
from .norms import make_norm


def config_dtypes(cfg) -> tuple[Any, Any]:
    """``(dtype, param_dtype)`` of a config whose fields may be dtype names."""
    return jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)


class TransformerBlock(nn.Module):
    """One layer. ``__call__`` returns ``(x, None)`` so that the block can be the body of `nn.scan`.

    Attributes: cfg (fields: num_heads, num_kv_heads, head_dim, mlp_dim, attention, attention_impl, feature_map,
    dropout_rate, attention_dropout_rate, position, rope_base, norm, norm_position, norm_epsilon, activation,
    use_bias, init_std, dtype, param_dtype); cross_attention (decoder blocks of an encoder-decoder).
    """

    cfg: Any
    cross_attention: bool = False

    def _norm(self, name):
        dtype, param_dtype = config_dtypes(self.cfg)
        return make_norm(self.cfg.norm, epsilon=self.cfg.norm_epsilon, dtype=dtype, param_dtype=param_dtype,
                         name=name)

    def _residual(self, name, x, sublayer, deterministic):
        """``x + dropout(sublayer(norm(x)))`` (pre-LN) or ``norm(x + dropout(sublayer(x)))`` (post-LN)."""
        pre = self.cfg.norm_position == "pre"
        h = sublayer(self._norm(f"{name}_norm")(x) if pre else x)
        x = x + nn.Dropout(self.cfg.dropout_rate)(h, deterministic=deterministic)
        return x if pre else self._norm(f"{name}_norm")(x)

    def _attention(self, name, rotary):
        cfg = self.cfg
        dtype, param_dtype = config_dtypes(cfg)
        return MultiHeadAttention(
            num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, attention=cfg.attention,
            attention_impl=cfg.attention_impl, feature_map=cfg.feature_map,
            dropout_rate=cfg.attention_dropout_rate if cfg.attention == "softmax" else 0.0,
            rotary_base=cfg.rope_base if rotary and cfg.position == "rotary" else None, use_bias=cfg.use_bias,
            dtype=dtype, param_dtype=param_dtype, kernel_init=nn.initializers.normal(cfg.init_std), name=name)

    @nn.compact
    def __call__(self, x, mask, encoded, cross_mask, positions, deterministic: bool, decode, cache_index):
        """``x [b, l, e]`` -> ``([b, l, e], None)``.

        Args: mask (self-attention `Mask`), encoded (``[b, s, e]`` for cross-attention, else None), cross_mask,
        positions (``[b, l]``, for rotary), deterministic, decode (None | "prefill" | "step"), cache_index.
        """
        cfg = self.cfg
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        x = self._residual("self_attention", x, lambda h: self._attention("self_attention", rotary=True)(
            h, mask=mask, positions=positions, deterministic=deterministic, decode=decode, cache_index=cache_index),
            deterministic)
        if self.cross_attention:
            x = self._residual("cross_attention", x, lambda h: self._attention("cross_attention", rotary=False)(
                h, encoded, mask=cross_mask, deterministic=deterministic, decode=decode), deterministic)
        dtype, param_dtype = config_dtypes(cfg)
        mlp = MLP(cfg.mlp_dim, cfg.activation, use_bias=cfg.use_bias, dropout_rate=cfg.dropout_rate, dtype=dtype,
                  param_dtype=param_dtype, kernel_init=nn.initializers.normal(cfg.init_std), name="mlp")
        x = self._residual("mlp", x, lambda h: mlp(h, deterministic), deterministic)
        return x, None


class LayerStack(nn.Module):
    """``num_layers`` blocks, unrolled or as one `nn.scan` (``cfg.scan_layers``; params stacked on a leading
    ``layers`` axis), each optionally rematerialised in the backward pass (``cfg.remat``). Same function either way.
    """

    cfg: Any
    num_layers: int
    cross_attention: bool = False

    @nn.compact
    def __call__(self, x, mask=None, encoded=None, cross_mask=None, positions=None, deterministic: bool = True,
                 decode=None, cache_index=None) -> jax.Array:
        """``[b, l, e]`` -> ``[b, l, e]``; arguments as `TransformerBlock`."""
        block = TransformerBlock
        if self.cfg.remat:  # argnums count self: deterministic and decode are static
            block = nn.remat(block, prevent_cse=not self.cfg.scan_layers, static_argnums=(6, 7))
        args = (mask, encoded, cross_mask, positions, deterministic, decode, cache_index)
        if self.cfg.scan_layers:
            scanned = nn.scan(block, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True, "dropout": True},
                              in_axes=(nn.broadcast,) * len(args), length=self.num_layers,
                              metadata_params={nn.PARTITION_NAME: "layers"})
            return scanned(self.cfg, self.cross_attention, name="layers")(x, *args)[0]
        for i in range(self.num_layers):
            x, _ = block(self.cfg, self.cross_attention, name=f"layer_{i}")(x, *args)
        return x
