"""Token embeddings (optionally tied to the output projection) and position encodings: learned, sinusoidal, rotary.

Shape key: b batch, l length, e embed dim, v vocab, h heads, d head dim.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

default_embed_init = nn.initializers.normal(stddev=0.02)


class Embed(nn.Module):
    """A ``[v, e]`` embedding table; `attend` reuses it as the tied output projection.

    Attributes: num_embeddings (v), features (e), dtype, param_dtype, embedding_init, axes (logical names).
    """

    num_embeddings: int
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    embedding_init: Callable = default_embed_init
    axes: tuple[str, str] = ("vocab", "embed")

    def setup(self):
        self.embedding = self.param("embedding", nn.with_logical_partitioning(self.embedding_init, self.axes),
                                    (self.num_embeddings, self.features), self.param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        """int ids ``[...]`` -> ``[..., e]`` in ``dtype``."""
        return jnp.take(jnp.asarray(self.embedding, self.dtype), ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits against every row: ``[..., e]`` -> ``[..., v]`` (float32 accumulation)."""
        return jnp.einsum("...e,ve->...v", x, jnp.asarray(self.embedding, self.dtype),
                          preferred_element_type=jnp.float32)


def sinusoidal(positions: jax.Array, features: int, max_timescale: float = 10_000.0) -> jax.Array:
    """Vaswani et al. 2017: ``PE[p, 2i] = sin(p / T^(2i/e))``, ``PE[p, 2i+1] = cos(...)``.
    ``positions [b, l]`` -> ``[b, l, e]`` (float32)."""
    if features % 2:
        raise ValueError(f"sinusoidal positions need an even embed_dim, got {features}")
    inv = 1.0 / max_timescale ** (np.arange(0, features, 2) / features)
    angles = positions[..., None].astype(jnp.float32) * inv
    return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*positions.shape, features)


def rotary(x: jax.Array, positions: jax.Array, base: float = 10_000.0) -> jax.Array:
    """Rotary position embedding (Su et al. 2021), rotating pairs ``(x[i], x[i + d/2])`` (the GPT-NeoX / Llama layout).

    ``x [b, l, h, d]``, ``positions [b, l]`` -> ``[b, l, h, d]``; computed in float32, returned in x's dtype."""
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"rotary positions need an even head_dim, got {d}")
    inv = 1.0 / base ** (np.arange(0, d, 2) / d)
    angles = positions[..., None, None].astype(jnp.float32) * inv  # [b, l, 1, d/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
