"""Token embeddings (optionally tied to the output projection) and position encodings: learned, sinusoidal, rotary
(with the rope scalings of long-context checkpoints: linear, dynamic NTK, Llama 3).

Shape key: b batch, l length, e embed dim, v vocab, h heads, d head dim.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..choices import RopeScaling

default_embed_init = nn.initializers.normal(stddev=0.02)


class EmbeddingTable(nn.Module):
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


def rope_frequencies(head_dim: int, base: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """The ``d/2`` inverse frequencies ``base^(-2i/d)`` (float64), scaled as ``scaling`` says; for ``"dynamic"`` the
    unscaled ones (it depends on the positions: see `rotary`)."""
    inv = 1.0 / base ** (np.arange(0, head_dim, 2) / head_dim)
    if scaling is None or scaling.rope_type == "dynamic":
        return inv
    if scaling.rope_type == "linear":
        return inv / scaling.factor
    # Llama 3.1 (as transformers' _compute_llama3_parameters)
    old = scaling.original_max_len
    wavelen = 2 * np.pi / inv
    low_wavelen, high_wavelen = old / scaling.low_freq_factor, old / scaling.high_freq_factor
    smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, (1 - smooth) * scaled / scaling.factor + smooth * scaled, scaled)


def _dynamic_frequencies(head_dim: int, base: float, scaling: RopeScaling, positions: jax.Array) -> jax.Array:
    """Dynamic NTK: the base grows with the longest position of this call once it passes ``original_max_len``."""
    length = jnp.maximum(jnp.max(positions).astype(jnp.float32) + 1, scaling.original_max_len)
    grown = base * (scaling.factor * length / scaling.original_max_len - (scaling.factor - 1)) ** (
        head_dim / (head_dim - 2))
    return 1.0 / grown ** jnp.asarray(np.arange(0, head_dim, 2) / head_dim, jnp.float32)


def rotary(x: jax.Array, positions: jax.Array, base: float = 10_000.0, scaling: RopeScaling | None = None) -> jax.Array:
    """Rotary position embedding (Su et al. 2021), rotating pairs ``(x[i], x[i + d/2])``: the GPT-NeoX layout, which
    is Hugging Face's ``rotate_half`` (Llama, Mistral, Qwen checkpoints load without permuting q/k rows; Meta's
    original checkpoints rotate interleaved pairs ``(x[2i], x[2i+1])`` and need transformers' permutation first).

    ``x [b, l, h, d]``, ``positions [b, l]`` -> ``[b, l, h, d]``; ``scaling`` stretches the frequencies
    (`RopeScaling`); computed in float32, returned in x's dtype."""
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"rotary positions need an even head_dim, got {d}")
    if scaling is not None and scaling.rope_type == "dynamic":
        inv = _dynamic_frequencies(d, base, scaling, positions)
    else:
        inv = jnp.asarray(rope_frequencies(d, base, scaling), jnp.float32)
    angles = positions[..., None, None].astype(jnp.float32) * inv  # [b, l, 1, d/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
