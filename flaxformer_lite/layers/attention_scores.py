"""Attention logits that are not ``q . k / sqrt(d)``: the variants `MultiHeadAttention` switches on by configuration.

- `AdditiveScores`: Bahdanau et al. 2015, ``s[b, h, i, j] = w_h . tanh(q_i + k_j)`` on projected queries and keys.
- `DenseSynthesizerScores`: Tay et al. 2021 ("Synthesizer"), dense: each query's row of logits over key positions is
  predicted from that token alone, ``s[b, h, i, :] = W2_h relu(W1_h x_i + b1_h) + b2_h``; no queries or keys.
- `RandomSynthesizerScores`: Synthesizer, random: a learned ``[h, max_len, max_len]`` table of logits, the same for
  every input.
- `TalkingHeads`: Shazeer et al. 2020, learned ``[h, h]`` mixings of the logits before the softmax and of the
  probabilities after it (identity at initialisation, so training starts from plain multi-head attention).
- `dot_scores`: the plain scaled dot product as a dense ``[b, h, q, k]`` array (what talking-heads mixes).

All of these materialise ``[b, h, q, k]`` (additive even ``[b, q, k, h, d]``): they are dense by construction and
meant for short sequences; `attention.attend_scores` applies the `Mask` and the softmax.

Shape key: b batch, q query length, k key length, e embed dim, h query heads, n kv heads, d head dim.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from .dense import general_kernel_init


def _expand_kv(k: jax.Array, heads: int) -> jax.Array:
    """``[b, k, n, d]`` -> ``[b, k, h, d]``: query head i reads kv head ``i // (h // n)`` (GQA/MQA)."""
    return k if k.shape[2] == heads else jnp.repeat(k, heads // k.shape[2], axis=2)


def dot_scores(q: jax.Array, k: jax.Array) -> jax.Array:
    """``q [b, q, h, d]``, ``k [b, k, n, d]`` -> float32 logits ``q . k / sqrt(d)`` as ``[b, h, q, k]``."""
    q = q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
    return jnp.einsum("bqhd,bkhd->bhqk", q, _expand_kv(k, q.shape[2]), preferred_element_type=jnp.float32)


def _positions_table_check(lk: int, max_len: int, what: str) -> None:
    if lk > max_len:
        raise ValueError(f"{what} attention covers at most max_len={max_len} keys, got {lk}; raise max_len")


class AdditiveScores(nn.Module):
    """Additive (Bahdanau) logits ``q [b, q, h, d]``, ``k [b, k, n, d]`` -> float32 ``[b, h, q, k]``.

    Attributes: dtype, param_dtype, kernel_init (of the ``energy`` vectors ``[h, d]``).
    """

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.normal(stddev=0.02)

    @nn.compact
    def __call__(self, q: jax.Array, k: jax.Array) -> jax.Array:
        h, d = q.shape[2], q.shape[3]
        energy = self.param("energy", nn.with_logical_partitioning(self.kernel_init, ("heads", "head_dim")),
                            (h, d), self.param_dtype)
        hidden = jnp.tanh(q[:, :, None] + _expand_kv(k, h)[:, None])  # [b, q, k, h, d]
        return jnp.einsum("bqkhd,hd->bhqk", hidden, energy.astype(self.dtype), preferred_element_type=jnp.float32)


class DenseSynthesizerScores(nn.Module):
    """Dense Synthesizer logits from the query-side input ``x [b, q, e]`` and the key positions ``[b, k]`` (each
    below ``max_len``) -> float32 ``[b, h, q, k]``: column ``j`` reads the predicted logit of key position
    ``k_positions[b, j]`` (positions restart in each packed document).

    Attributes: num_heads (h), head_dim (d, the hidden width per head), max_len, dtype, param_dtype, kernel_init.
    """

    num_heads: int
    head_dim: int
    max_len: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.normal(stddev=0.02)

    @nn.compact
    def __call__(self, x: jax.Array, k_positions: jax.Array) -> jax.Array:
        _positions_table_check(k_positions.shape[1], self.max_len, "Dense Synthesizer")
        h, d = self.num_heads, self.head_dim
        hidden = nn.DenseGeneral(
            (h, d), dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=general_kernel_init(self.kernel_init, ("embed", "heads", "head_dim")),
            bias_init=general_kernel_init(nn.initializers.zeros, ("heads", "head_dim")), name="hidden")(x)
        kernel = self.param("scores_kernel", nn.with_logical_partitioning(
            self.kernel_init, ("heads", "head_dim", "position")), (h, d, self.max_len), self.param_dtype)
        bias = self.param("scores_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "position")),
                          (h, self.max_len), self.param_dtype)
        table = jnp.einsum("bqhd,hdk->bhqk", jax.nn.relu(hidden), kernel.astype(self.dtype),
                           preferred_element_type=jnp.float32) + bias[None, :, None].astype(jnp.float32)
        columns = jnp.clip(k_positions, 0, self.max_len - 1)[:, None, None, :]  # [b, 1, 1, k]
        return jnp.take_along_axis(table, jnp.broadcast_to(columns, table.shape[:3] + columns.shape[3:]), axis=-1)


class RandomSynthesizerScores(nn.Module):
    """Random Synthesizer logits: entries ``[q_positions, k_positions]`` (``[b, q]``, ``[b, k]``) of a learned
    ``[h, max_len, max_len]`` table -> float32 ``[b, h, q, k]``.

    Attributes: num_heads (h), max_len, param_dtype, kernel_init (the paper draws the table at random; here it is
    trained too, its "Random" rather than "Fixed Random" variant).
    """

    num_heads: int
    max_len: int
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.normal(stddev=0.02)

    @nn.compact
    def __call__(self, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
        _positions_table_check(k_positions.shape[1], self.max_len, "Random Synthesizer")
        table = self.param("random_scores", nn.with_logical_partitioning(
            self.kernel_init, ("heads", "position", "position")), (self.num_heads, self.max_len, self.max_len),
            self.param_dtype)
        rows = jnp.clip(q_positions, 0, self.max_len - 1)[:, :, None]  # [b, q, 1]
        cols = jnp.clip(k_positions, 0, self.max_len - 1)[:, None, :]  # [b, 1, k]
        return jnp.moveaxis(table[:, rows, cols], 0, 1).astype(jnp.float32)  # [h, b, q, k] -> [b, h, q, k]


def _identity(key, shape, dtype=jnp.float32):
    del key
    return jnp.eye(shape[0], shape[1], dtype=dtype)


class TalkingHeads(nn.Module):
    """The two ``[h, h]`` mixings of talking-heads attention: ``logits_mix`` (before the softmax, applied here to
    ``[b, h, q, k]`` logits) and ``weights_mix`` (after it; returned for `attend_scores`'s ``head_mix``).

    Attributes: num_heads (h), param_dtype.
    """

    num_heads: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, scores: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``[b, h, q, k]`` logits -> ``(mixed logits [b, h, q, k], weights_mix [h, h])``."""
        h = self.num_heads
        init = nn.with_logical_partitioning(_identity, ("heads", "heads_mix"))
        logits_mix = self.param("logits_mix", init, (h, h), self.param_dtype)
        weights_mix = self.param("weights_mix", init, (h, h), self.param_dtype)
        mixed = jnp.einsum("bhqk,hj->bjqk", scores, logits_mix.astype(jnp.float32))
        return mixed, weights_mix
