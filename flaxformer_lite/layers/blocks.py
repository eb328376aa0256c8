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

from .attention import SYNTHESIZERS, MultiHeadAttention
from .mlp import MLP
from .norms import apply_norm, make_norm


def config_dtypes(cfg) -> tuple[Any, Any]:
    """``(dtype, param_dtype)`` of a config whose fields may be dtype names."""
    return jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)


def block_norm(cfg, name: str, x: jax.Array, condition: jax.Array | None) -> jax.Array:
    """Apply the config's norm (conditional when ``cfg.condition_dim``) named ``name`` to ``x [b, l, e]``."""
    dtype, param_dtype = config_dtypes(cfg)
    norm = make_norm(cfg.norm, epsilon=cfg.norm_epsilon, dtype=dtype, param_dtype=param_dtype,
                     condition_dim=cfg.condition_dim, name=name)
    return apply_norm(norm, x, condition)


class TransformerBlock(nn.Module):
    """One layer. ``__call__`` returns ``(x, None)`` so that the block can be the body of `nn.scan`.

    Attributes: cfg (fields: num_heads, num_kv_heads, head_dim, mlp_dim, max_len, attention, attention_impl,
    feature_map, talking_heads, dropout_rate, attention_dropout_rate, position, rope_base, norm, norm_position,
    norm_epsilon, condition_dim, activation, use_bias, init_std, dtype, param_dtype); cross_attention (decoder
    blocks of an encoder-decoder).
    """

    cfg: Any
    cross_attention: bool = False

    def _residual(self, name, x, sublayer, deterministic, condition):
        """``x + dropout(sublayer(norm(x)))`` (pre-LN) or ``norm(x + dropout(sublayer(x)))`` (post-LN)."""
        pre = self.cfg.norm_position == "pre"
        h = sublayer(block_norm(self.cfg, f"{name}_norm", x, condition) if pre else x)
        x = x + nn.Dropout(self.cfg.dropout_rate)(h, deterministic=deterministic)
        return x if pre else block_norm(self.cfg, f"{name}_norm", x, condition)

    def _attention(self, name, rotary, cross=False):
        cfg = self.cfg
        dtype, param_dtype = config_dtypes(cfg)
        # Synthesizers replace self-attention only (Tay et al. keep cross-attention a dot product)
        kind = "softmax" if cross and cfg.attention in SYNTHESIZERS else cfg.attention
        return MultiHeadAttention(
            num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, attention=kind,
            attention_impl=cfg.attention_impl, feature_map=cfg.feature_map,
            talking_heads=cfg.talking_heads and kind == "softmax", max_len=cfg.max_len,
            dropout_rate=cfg.attention_dropout_rate if kind != "linear" else 0.0,
            rotary_base=cfg.rope_base if rotary and cfg.position == "rotary" else None, use_bias=cfg.use_bias,
            dtype=dtype, param_dtype=param_dtype, kernel_init=nn.initializers.normal(cfg.init_std), name=name)

    @nn.compact
    def __call__(self, x, mask, encoded, cross_mask, positions, deterministic: bool, decode, cache_index,
                 condition=None):
        """``x [b, l, e]`` -> ``([b, l, e], None)``.

        Args: mask (self-attention `Mask`), encoded (``[b, s, e]`` for cross-attention, else None), cross_mask,
        positions (``[b, l]``, for rotary), deterministic, decode (None | "prefill" | "step"), cache_index,
        condition (``[b, c]`` for conditional norms, or None).
        """
        cfg = self.cfg
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        x = self._residual("self_attention", x, lambda h: self._attention("self_attention", rotary=True)(
            h, mask=mask, positions=positions, deterministic=deterministic, decode=decode, cache_index=cache_index),
            deterministic, condition)
        if self.cross_attention:
            x = self._residual("cross_attention", x, lambda h: self._attention("cross_attention", False, True)(
                h, encoded, mask=cross_mask, deterministic=deterministic, decode=decode), deterministic, condition)
        dtype, param_dtype = config_dtypes(cfg)
        mlp = MLP(cfg.mlp_dim, cfg.activation, use_bias=cfg.use_bias, dropout_rate=cfg.dropout_rate, dtype=dtype,
                  param_dtype=param_dtype, kernel_init=nn.initializers.normal(cfg.init_std), name="mlp")
        x = self._residual("mlp", x, lambda h: mlp(h, deterministic), deterministic, condition)
        return x, None


class LayerStack(nn.Module):
    """``num_layers`` blocks, unrolled or as one `nn.scan` (``cfg.scan_layers``; params stacked on a leading
    ``layers`` axis), each optionally rematerialised in the backward pass (``cfg.remat``). Same function either way.

    ``cfg.share_layers`` applies one block's parameters at every depth (ALBERT's cross-layer sharing, Lan et al.
    2020), as a scan whose parameters are broadcast; decode caches and sown intermediates stay per layer.
    """

    cfg: Any
    num_layers: int
    cross_attention: bool = False

    @nn.compact
    def __call__(self, x, mask=None, encoded=None, cross_mask=None, positions=None, deterministic: bool = True,
                 decode=None, cache_index=None, condition=None) -> jax.Array:
        """``[b, l, e]`` -> ``[b, l, e]``; arguments as `TransformerBlock`."""
        cfg = self.cfg
        looped = cfg.scan_layers or cfg.share_layers
        block = TransformerBlock
        if cfg.remat:  # argnums count self: deterministic and decode are static
            block = nn.remat(block, prevent_cse=not looped, static_argnums=(6, 7))
        args = (mask, encoded, cross_mask, positions, deterministic, decode, cache_index, condition)
        per_layer = {"cache": 0, "intermediates": 0}
        if cfg.share_layers:
            shared = nn.scan(block, variable_broadcast="params", variable_axes=per_layer,
                             split_rngs={"params": False, "dropout": True}, in_axes=(nn.broadcast,) * len(args),
                             length=self.num_layers)
            return shared(cfg, self.cross_attention, name="shared_layer")(x, *args)[0]
        if cfg.scan_layers:
            scanned = nn.scan(block, variable_axes={"params": 0, **per_layer}, split_rngs={"params": True, "dropout": True},
                              in_axes=(nn.broadcast,) * len(args), length=self.num_layers,
                              metadata_params={nn.PARTITION_NAME: "layers"})
            return scanned(cfg, self.cross_attention, name="layers")(x, *args)[0]
        for i in range(self.num_layers):
            x, _ = block(cfg, self.cross_attention, name=f"layer_{i}")(x, *args)
        return x
