"""Input checks shared by the models: token arrays, lengths, per-token arrays, id ranges (on the host, when values
are known)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..ranges import check_range


def check_tokens(tokens, cfg, name: str = "tokens", max_len: int | None = None) -> None:
    """Raise `ValueError` unless ``tokens`` is int ``[b, l]`` with ``l <= max_len`` (default ``cfg.max_len``) and, when
    its values are concrete (not traced), every id is in ``[0, cfg.vocab_size)``."""
    if getattr(tokens, "ndim", None) != 2:
        raise ValueError(f"{name} must be int [batch, length], got shape {getattr(tokens, 'shape', type(tokens))}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {tokens.dtype}")
    limit = cfg.max_len if max_len is None else max_len
    if tokens.shape[1] > limit:
        raise ValueError(f"{name} has length {tokens.shape[1]} > max_len {limit}; raise ModelConfig.max_len "
                         "or feed shorter sequences")
    _check_range(tokens, name, cfg, "vocab_size")


def check_ids(ids, tokens, cfg, name: str, field: str) -> None:
    """Raise `ValueError` unless the optional per-token ids ``ids`` (positions, token types) are int with ``tokens``'
    shape ``[b, l]``, index a table ``cfg.<field>`` that exists (> 0) and, when concrete (not traced), lie in
    ``[0, cfg.<field>)``."""
    if ids is None:
        return
    if not getattr(cfg, field):
        raise ValueError(f"{name} was given but ModelConfig.{field} is 0 (the model has no such embedding)")
    check_mask_shape(ids, tokens, name)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{name} must hold integer ids, got dtype {ids.dtype}")
    _check_range(ids, name, cfg, field)


def _check_range(ids, name: str, cfg, field: str) -> None:
    """Raise `ValueError` if ``ids`` are concrete (not traced) and one lies outside ``[0, cfg.<field>)``."""
    limit = getattr(cfg, field)
    check_range(name, ids, lambda x: (x >= 0) & (x < limit), f"ids in [0, {field}={limit})")


def check_mask_shape(mask, tokens, name: str) -> None:
    """Raise `ValueError` unless an optional per-token array matches ``tokens``' shape (``[b, l]``)."""
    if mask is not None and np.shape(mask) != np.shape(tokens):
        raise ValueError(f"{name} must have the shape of its tokens {np.shape(tokens)}, got {np.shape(mask)}")


def check_condition(condition, tokens, cfg) -> None:
    """Raise `ValueError` unless ``condition`` is None or ``[b, cfg.condition_dim]`` float for a conditional model."""
    if condition is None:
        return
    if not cfg.condition_dim:
        raise ValueError("condition was given but ModelConfig.condition_dim is 0 (no conditional norms)")
    if getattr(condition, "ndim", None) != 2 or tuple(condition.shape) != (tokens.shape[0], cfg.condition_dim):
        raise ValueError(f"condition must be [batch, condition_dim] = {[tokens.shape[0], cfg.condition_dim]}, got "
                         f"{list(getattr(condition, 'shape', [type(condition).__name__]))}")
    if not jnp.issubdtype(condition.dtype, jnp.floating):
        raise ValueError(f"condition must be floating point, got dtype {condition.dtype}")


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Positions restarting at 0 at every segment boundary: int ``[b, l]`` -> ``[b, l]``."""
    idx = jnp.arange(segment_ids.shape[1])
    boundary = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    starts = jax.lax.cummax(jnp.where(boundary, idx, 0), axis=1)
    return idx - starts
