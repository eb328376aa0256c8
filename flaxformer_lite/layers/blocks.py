"""`TransformerBlock`: self-attention, optional cross-attention, and MLP, each a residual sublayer with dropout,
normalised before (pre-LN, GPT-2) or after (post-LN, Vaswani et al. / BERT) the residual sum; `LayerStack`: the
blocks of one encoder or decoder, unrolled, scanned or shared.

The stack names its layers in a parameter (or cache, or intermediates) tree with the ground floor's names
(`flaxformer_lite.names`: ``layer_0``..., ``SCANNED_LAYERS``, ``SHARED_LAYER``).

The block takes its configuration whole: a `models.ModelConfig` or any object with the same field names (layers may
not import models/). Shape key: b batch, l length, s source length, e embed dim, c condition dim.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax

from ..attention import Mask
from ..names import SCANNED_LAYERS, SHARED_LAYER, layer_name
from .attention import SYNTHESIZERS, MultiHeadAttention
from .common import apply_config_norm, config_dtypes
from .mlp import MLP


@flax.struct.dataclass
class BlockInputs:
    """What a block reads besides ``x`` (a pytree; None fields are absent), passed whole so that `nn.scan` can
    broadcast it and `nn.remat` trace it.

    Attributes: mask (self-attention `Mask`), encoded (``[b, s, e]`` encoder output for cross-attention), cross_mask
    (its `Mask`), positions (int ``[b, l]``, for rotary), cache_index (int scalar: where decoded tokens go in the
    cache), condition (``[b, c]`` input of conditional norms).
    """

    mask: Mask | None = None
    encoded: jax.Array | None = None
    cross_mask: Mask | None = None
    positions: jax.Array | None = None
    cache_index: jax.Array | None = None
    condition: jax.Array | None = None


class TransformerBlock(nn.Module):
    """One layer: ``x [b, l, e]``, `BlockInputs` -> ``([b, l, e], None)`` (a pair, so that the block can be the body
    of `nn.scan`).

    Attributes: cfg (fields: num_heads, num_kv_heads, head_dim, mlp_dim, max_len, attention, attention_impl,
    feature_map, recurrent_gate (self-attention only), talking_heads, dropout_rate, attention_dropout_rate, position,
    rope_base, rope_scaling, norm, norm_position, norm_epsilon, condition_dim, activation, use_bias, qkv_bias,
    qk_norm, init_std, dtype, param_dtype); cross_attention (decoder blocks of an encoder-decoder); deterministic
    (False enables dropout); decode (None | "prefill" | "step"). The last two are attributes, not call arguments,
    so that `nn.remat` and `nn.scan` see them as static Python values.
    """

    cfg: Any
    cross_attention: bool = False
    deterministic: bool = True
    decode: str | None = None

    def _residual(self, name, x, sublayer, condition):
        """``x + dropout(sublayer(norm(x)))`` (pre-LN) or ``norm(x + dropout(sublayer(x)))`` (post-LN)."""
        pre = self.cfg.norm_position == "pre"
        h = sublayer(apply_config_norm(self.cfg, f"{name}_norm", x, condition) if pre else x)
        x = x + nn.Dropout(self.cfg.dropout_rate)(h, deterministic=self.deterministic)
        return x if pre else apply_config_norm(self.cfg, f"{name}_norm", x, condition)

    def _attention(self, name, rotary, cross=False):
        cfg = self.cfg
        dtype, param_dtype = config_dtypes(cfg)
        # Synthesizers replace self-attention only (Tay et al. keep cross-attention a dot product)
        kind = "softmax" if cross and cfg.attention in SYNTHESIZERS else cfg.attention
        return MultiHeadAttention(
            num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, attention=kind,
            attention_impl=cfg.attention_impl, feature_map=cfg.feature_map,
            recurrent_gate="none" if cross else cfg.recurrent_gate,
            talking_heads=cfg.talking_heads and kind == "softmax", max_len=cfg.max_len,
            dropout_rate=cfg.attention_dropout_rate if kind not in ("linear", "delta") else 0.0,
            rope_base=cfg.rope_base if rotary and cfg.position == "rotary" else None,
            rope_scaling=cfg.rope_scaling, use_bias=cfg.use_bias, qkv_bias=cfg.qkv_bias, qk_norm=cfg.qk_norm,
            norm_epsilon=cfg.norm_epsilon, dtype=dtype, param_dtype=param_dtype,
            kernel_init=nn.initializers.normal(cfg.init_std), name=name)

    @nn.compact
    def __call__(self, x: jax.Array, inputs: BlockInputs | None = None) -> tuple[jax.Array, None]:
        """``x [b, l, e]`` -> ``([b, l, e], None)``; ``inputs`` (None: all fields absent) as `BlockInputs`."""
        cfg, inputs = self.cfg, BlockInputs() if inputs is None else inputs
        run = dict(deterministic=self.deterministic, decode=self.decode)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        x = self._residual("self_attention", x, lambda h: self._attention("self_attention", rotary=True)(
            h, mask=inputs.mask, positions=inputs.positions, cache_index=inputs.cache_index, **run), inputs.condition)
        if self.cross_attention:
            x = self._residual("cross_attention", x, lambda h: self._attention("cross_attention", False, True)(
                h, inputs.encoded, mask=inputs.cross_mask, **run), inputs.condition)
        dtype, param_dtype = config_dtypes(cfg)
        mlp = MLP(cfg.mlp_dim, cfg.activation, use_bias=cfg.use_bias, dropout_rate=cfg.dropout_rate, dtype=dtype,
                  param_dtype=param_dtype, kernel_init=nn.initializers.normal(cfg.init_std), name="mlp")
        x = self._residual("mlp", x, lambda h: mlp(h, self.deterministic), inputs.condition)
        return x, None


class LayerStack(nn.Module):
    """``num_layers`` blocks, unrolled (``layer_0``, ...) or as one `nn.scan` (``cfg.scan_layers``; params stacked
    on a leading ``layers`` axis, under ``SCANNED_LAYERS``), each optionally rematerialised in the backward pass
    (``cfg.remat``). Same function either way.

    ``cfg.share_layers`` applies one block's parameters at every depth (ALBERT's cross-layer sharing, Lan et al.
    2020), as a scan whose parameters are broadcast (under ``SHARED_LAYER``); decode caches and sown intermediates
    stay per layer.
    """

    cfg: Any
    num_layers: int
    cross_attention: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, mask: Mask | None = None, encoded: jax.Array | None = None,
                 cross_mask: Mask | None = None, positions: jax.Array | None = None, deterministic: bool = True,
                 decode: str | None = None, cache_index: jax.Array | None = None,
                 condition: jax.Array | None = None) -> jax.Array:
        """``x [b, l, e]`` -> ``[b, l, e]``; the keyword arguments as `BlockInputs` and `TransformerBlock`'s
        deterministic and decode."""
        cfg = self.cfg
        inputs = BlockInputs(mask=mask, encoded=encoded, cross_mask=cross_mask, positions=positions,
                             cache_index=cache_index, condition=condition)
        looped = cfg.scan_layers or cfg.share_layers
        block = TransformerBlock
        if cfg.remat:  # nothing static to declare: deterministic and decode are module attributes
            block = nn.remat(block, prevent_cse=not looped)
        attrs = dict(cfg=cfg, cross_attention=self.cross_attention, deterministic=deterministic, decode=decode)
        per_layer = {"cache": 0, "intermediates": 0}
        if cfg.share_layers:
            shared = nn.scan(block, variable_broadcast="params", variable_axes=per_layer,
                             split_rngs={"params": False, "dropout": True}, in_axes=(nn.broadcast,),
                             length=self.num_layers)
            return shared(**attrs, name=SHARED_LAYER)(x, inputs)[0]
        if cfg.scan_layers:
            scanned = nn.scan(block, variable_axes={"params": 0, **per_layer},
                              split_rngs={"params": True, "dropout": True}, in_axes=(nn.broadcast,),
                              length=self.num_layers, metadata_params={nn.PARTITION_NAME: SCANNED_LAYERS})
            return scanned(**attrs, name=SCANNED_LAYERS)(x, inputs)[0]
        for i in range(self.num_layers):
            x, _ = block(**attrs, name=layer_name(i))(x, inputs)
        return x
