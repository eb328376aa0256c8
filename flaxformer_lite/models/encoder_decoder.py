"""`EncoderDecoder`: the original Transformer (Vaswani et al. 2017): an encoder, a decoder with masked
self-attention and cross-attention, one shared vocabulary and embedding.

Shape key: b batch, s source length, t target length, e embed dim, v vocab.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..attention import Mask
from ..layers.blocks import LayerStack
from ..layers.common import final_norm, output_head
from ..layers.embedder import CacheIndex, Embedder
from .checks import check_mask_shape, check_tokens
from .config import ModelConfig


class EncoderDecoder(nn.Module):
    """``(src [b, s], tgt [b, t])`` -> ``logits [b, t, v]``. The padding masks (``src_padding_mask [b, s]``,
    ``tgt_padding_mask [b, t]``) are valid masks despite their names: True = a real (non-padding) token, False =
    padding; None: every token is real.

    For generation, `encode` once and call `decode` per step (see `ffl.generate`).
    """

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.embedder = Embedder(cfg)
        self.encoder = LayerStack(cfg, cfg.num_layers)
        self.decoder = LayerStack(cfg, cfg.decoder_layers, cross_attention=True)
        self.encoder_norm = final_norm(cfg)
        self.decoder_norm = final_norm(cfg)
        self.lm_head = output_head(cfg)
        self.cache_index = CacheIndex()

    def encode(self, src_tokens, *, src_padding_mask=None, deterministic=True) -> jax.Array:
        """``src [b, s]`` -> ``encoded [b, s, e]``; ``src_padding_mask [b, s]``: True = a real (non-padding)
        token."""
        check_tokens(src_tokens, self.cfg, "src_tokens")
        check_mask_shape(src_padding_mask, src_tokens, "src_padding_mask")
        positions = jnp.broadcast_to(jnp.arange(src_tokens.shape[1]), src_tokens.shape)
        mask = None if src_padding_mask is None else Mask(kv_valid=src_padding_mask.astype(bool))
        x = self.embedder(src_tokens, positions, deterministic=deterministic)
        x = self.encoder(x, mask=mask, positions=positions, deterministic=deterministic)
        return x if self.encoder_norm is None else self.encoder_norm(x)

    def decode(self, encoded, tgt_tokens, *, src_padding_mask=None, tgt_padding_mask=None, deterministic=True,
               decode=None) -> jax.Array:
        """``encoded [b, s, e]``, ``tgt [b, t]`` -> ``logits [b, t, v]``; ``decode`` as in `GPT`.
        ``src_padding_mask [b, s]`` and ``tgt_padding_mask [b, t]``: True = a real (non-padding) token (the target
        mask is not used while decoding, where every cached token is real)."""
        check_tokens(tgt_tokens, self.cfg, "tgt_tokens")
        check_mask_shape(tgt_padding_mask, tgt_tokens, "tgt_padding_mask")
        b, t = tgt_tokens.shape
        start = self.cache_index(t) if decode else None
        positions = jnp.broadcast_to(jnp.arange(t), (b, t)) + (0 if start is None else start)
        kv_valid = None if tgt_padding_mask is None or decode else tgt_padding_mask.astype(bool)
        mask = Mask(causal=True, kv_valid=kv_valid, q_offset=start)
        cross = None if src_padding_mask is None else Mask(kv_valid=src_padding_mask.astype(bool))
        x = self.embedder(tgt_tokens, positions, deterministic=deterministic)
        x = self.decoder(x, mask=mask, encoded=encoded, cross_mask=cross, positions=positions,
                         deterministic=deterministic, decode=decode, cache_index=start)
        if self.decoder_norm is not None:
            x = self.decoder_norm(x)
        out = self.embedder.attend(x) if self.lm_head is None else self.lm_head(x)
        return nn.with_logical_constraint(out.astype(jnp.float32), ("batch", "length", "vocab"))

    def __call__(self, src_tokens, tgt_tokens, *, src_padding_mask=None, tgt_padding_mask=None, deterministic=True,
                 decode=None) -> jax.Array:
        """``src [b, s]``, ``tgt [b, t]`` -> ``logits [b, t, v]`` (teacher forcing); the padding masks
        ``[b, s]``, ``[b, t]``: True = a real (non-padding) token."""
        encoded = self.encode(src_tokens, src_padding_mask=src_padding_mask, deterministic=deterministic)
        return self.decode(encoded, tgt_tokens, src_padding_mask=src_padding_mask,
                           tgt_padding_mask=tgt_padding_mask, deterministic=deterministic, decode=decode)
