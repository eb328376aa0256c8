"""`Embedder`: token embedding (optionally scaled by sqrt(e)) + positions (learned or sinusoidal; rotary lives in
attention) + token types (BERT) -> optional LayerNorm -> dropout. One front end for every model.

Also `CacheIndex`, the decode position kept in the ``cache`` collection. Shape key: b batch, l length, e embed dim.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..choices import POSITIONS
from .common import config_dtypes, config_norm, dense
from .embeddings import EmbeddingTable, sinusoidal



class Embedder(nn.Module):
    """Tokens ``[b, l]`` -> ``[b, l, e]``. ``token`` is the (tyable) `EmbeddingTable`; call `attend` for tied logits.

    With ``cfg.table_dim`` set (ALBERT's factorised embeddings) the tables are that narrower width E and a Dense
    ``projection`` maps ``[b, l, E]`` to ``[b, l, e]`` after the norm and dropout; `attend` then takes ``[b, l, E]``.

    Attributes: cfg (fields: vocab_size, embed_dim, table_dim, max_len, position, type_vocab_size, embed_scale,
    embed_norm, norm, norm_epsilon, dropout_rate, init_std, dtype, param_dtype).
    """

    cfg: Any

    def setup(self):
        cfg = self.cfg
        dtype, param_dtype = config_dtypes(cfg)
        init = nn.initializers.normal(cfg.init_std)
        width = cfg.table_dim or cfg.embed_dim
        self.token = EmbeddingTable(cfg.vocab_size, width, dtype, param_dtype, init)
        if cfg.position == "learned":
            self.position = EmbeddingTable(cfg.max_len, width, dtype, param_dtype, init, axes=("position", "embed"))
        if cfg.type_vocab_size:
            self.token_type = EmbeddingTable(cfg.type_vocab_size, width, dtype, param_dtype, init,
                                    axes=("token_type", "embed"))
        if cfg.embed_norm:
            self.norm = config_norm(cfg, conditional=False)
        self.dropout = nn.Dropout(cfg.dropout_rate)
        if cfg.table_dim:
            self.projection = dense(cfg, cfg.embed_dim, ("embed_factor", "embed"))

    def __call__(self, tokens: jax.Array, positions: jax.Array, token_type_ids: jax.Array | None = None,
                 deterministic: bool = True) -> jax.Array:
        """``tokens``, ``positions`` (and ``token_type_ids``) ``[b, l]`` int -> ``[b, l, e]``."""
        cfg = self.cfg
        x = self.token(tokens)
        if cfg.embed_scale:
            x = x * jnp.sqrt(jnp.asarray(x.shape[-1], x.dtype))
        if cfg.position == "learned":
            x = x + self.position(positions)
        elif cfg.position == "sinusoidal":
            x = x + sinusoidal(positions, x.shape[-1]).astype(x.dtype)
        if cfg.type_vocab_size:
            x = x + self.token_type(jnp.zeros_like(tokens) if token_type_ids is None else token_type_ids)
        if cfg.embed_norm:
            x = self.norm(x)
        x = self.dropout(x, deterministic=deterministic)
        if self.cfg.table_dim:
            x = self.projection(x)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output logits ``[b, l, e]`` -> ``[b, l, v]`` (float32)."""
        return self.token.attend(x)


class CacheIndex(nn.Module):
    """Where the next decoded tokens go: an int32 scalar in the ``cache`` collection, advanced by each call."""

    @nn.compact
    def __call__(self, length: int) -> jax.Array:
        """Return the current index (0 while the cache is being created) and advance it by ``length``."""
        initializing = not self.has_variable("cache", "index")
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        if initializing:
            return jnp.zeros((), jnp.int32)
        start = index.value
        index.value = start + length
        return start
