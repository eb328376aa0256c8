"""`BERT` (Devlin et al. 2019): bidirectional post-LN encoder with token types, padding mask, pooler, and the
pre-training heads (masked LM, tied to the embedding; next-sentence prediction) in Hugging Face's layout.

Shape key: b batch, l length, e embed dim, v vocab.
"""
from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..attention import Mask
from ..layers.blocks import LayerStack
from ..layers.common import config_dtypes, config_norm, dense, final_norm
from ..layers.embedder import Embedder
from ..layers.mlp import ACTIVATIONS
from ..layers.norms import apply_norm
from .checks import check_condition, check_ids, check_mask_shape, check_tokens
from .config import ModelConfig


class BertOutput(NamedTuple):
    """hidden ``[b, l, e]``, pooled ``[b, e]``, mlm_logits ``[b, l, v]``, nsp_logits ``[b, 2]`` (float32 logits)."""

    hidden: jax.Array
    pooled: jax.Array
    mlm_logits: jax.Array
    nsp_logits: jax.Array


class BERT(nn.Module):
    """``tokens [b, l]`` -> `BertOutput`. ``token_type_ids [b, l]`` are in ``[0, type_vocab_size)`` (None: all 0);
    ``padding_mask [b, l]`` is a valid mask despite its name: True = a real (non-padding) token, False = padding
    (None: every token is real)."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.embedder = Embedder(cfg)
        self.encoder = LayerStack(cfg, cfg.num_layers)
        self.final_norm = final_norm(cfg)
        self.pooler = dense(cfg, cfg.embed_dim, ("embed", "mlp"))
        self.mlm_transform = dense(cfg, cfg.table_dim or cfg.embed_dim, ("embed", "mlp"))  # back to the table width
        self.mlm_norm = config_norm(cfg, conditional=False)
        self.mlm_bias = self.param("mlm_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                                   (cfg.vocab_size,), config_dtypes(cfg)[1])
        self.nsp = dense(cfg, 2, ("embed", "classes"))

    def encode(self, tokens, *, token_type_ids=None, padding_mask=None, condition=None, deterministic=True):
        """``(hidden [b, l, e], pooled [b, e])``: the encoder output and tanh(Dense(hidden[:, 0])).

        ``padding_mask [b, l]``: True = a real (non-padding) token, which keys may attend; None: all real.
        Other arguments as ``__call__``."""
        check_tokens(tokens, self.cfg)
        check_condition(condition, tokens, self.cfg)
        check_ids(token_type_ids, tokens, self.cfg, "token_type_ids", "type_vocab_size")
        check_mask_shape(padding_mask, tokens, "padding_mask")
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        mask = None if padding_mask is None else Mask(kv_valid=padding_mask.astype(bool))
        x = self.embedder(tokens, positions, token_type_ids, deterministic=deterministic)
        x = self.encoder(x, mask=mask, positions=positions, deterministic=deterministic, condition=condition)
        if self.final_norm is not None:
            x = apply_norm(self.final_norm, x, condition)
        return x, jnp.tanh(self.pooler(x[:, 0]))

    def __call__(self, tokens, *, token_type_ids=None, padding_mask=None, condition=None,
                 deterministic=True) -> BertOutput:
        """``tokens [b, l]`` (with ``token_type_ids [b, l]`` and ``padding_mask [b, l]``, True = a real
        (non-padding) token; ``condition [b, c]`` for conditional norms, see `GPT`) -> `BertOutput`."""
        hidden, pooled = self.encode(tokens, token_type_ids=token_type_ids, padding_mask=padding_mask,
                                     condition=condition, deterministic=deterministic)
        h = self.mlm_norm(ACTIVATIONS[self.cfg.activation](self.mlm_transform(hidden)))
        mlm = self.embedder.attend(h) + self.mlm_bias.astype(jnp.float32)
        return BertOutput(hidden, pooled, mlm, self.nsp(pooled).astype(jnp.float32))
