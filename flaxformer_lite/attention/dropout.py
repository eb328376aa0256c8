"""Dropout on the attention weights that every kernel reproduces exactly, tile by tile.

Whether the probability of (batch row, head, query position, key position) is kept is a hash of those four
integers and a seed. So the dense reference and a blockwise kernel (its forward and its recomputing backward) drop
the same entries without storing a ``[b, h, lq, lk]`` mask, and impls can be tested against each other with dropout on.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _fmix32(x: jax.Array) -> jax.Array:
    # MurmurHash3's finaliser: a bijection on uint32 with full avalanche.
    x = x ^ (x >> 16)
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def dropout_seed(rng: jax.Array) -> jax.Array:
    """Two uint32 words drawn from a PRNG key (raw ``uint32[2]`` or typed key); the seed `keep_mask` takes."""
    return jax.random.bits(rng, (2,), jnp.uint32)


def keep_mask(seed: jax.Array, rate: float, batch_idx, head_idx, q_idx, kv_idx) -> jax.Array:
    """Keep decisions for attention weights: bool, the broadcast shape of the four index arrays.

    Args:
      seed: ``uint32[2]`` from `dropout_seed`.
      rate: drop probability in ``[0, 1)``.
      batch_idx, head_idx, q_idx, kv_idx: integer arrays of batch row, query head, query position and key position,
        broadcastable against each other (e.g. ``[b,1,1,1]``, ``[1,h,1,1]``, ``[1,1,q,1]``, ``[1,1,1,k]``).
    """
    def u32(x):
        return jnp.asarray(x).astype(jnp.uint32)

    x = _fmix32(seed[0] ^ u32(batch_idx))
    x = _fmix32(x ^ u32(head_idx) ^ seed[1])
    x = _fmix32(x ^ (u32(q_idx) * np.uint32(0x9E3779B1)))
    x = _fmix32(x ^ u32(kv_idx))
    threshold = np.uint32(min(int(round(rate * 2.0**32)), 2**32 - 1))
    return x >= threshold


def grouped_keep_mask(seed: jax.Array, rate: float, batch: int, kv_heads: int, groups: int, q_idx, kv_idx):
    """`keep_mask` for scores laid out ``[b, n, g, q, k]`` (query head ``= kv head * g + group``).

    ``q_idx [q]`` and ``kv_idx [k]`` are absolute positions. Returns bool ``[b, n, g, q, k]``."""
    head = (jnp.arange(kv_heads)[:, None] * groups + jnp.arange(groups)[None, :])[None, :, :, None, None]
    return keep_mask(seed, rate, jnp.arange(batch)[:, None, None, None, None], head, q_idx[:, None], kv_idx)
