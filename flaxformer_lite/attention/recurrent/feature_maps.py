"""Feature maps phi for linear attention: ``sim(q, k) = phi(q) . phi(k)`` with nonnegative features.

A feature map returns ``(features, log_scale)`` meaning ``phi(x) = features * exp(log_scale)[..., None]``:
``features [..., f]`` float32, nonnegative and O(1); ``log_scale [...]`` float32 or None (= 0). Splitting off the
scale lets FAVOR+ keys, whose raw features span many orders of magnitude, be combined stably with a running max
(see linear.py). Query features may drop any positive per-row factor: it cancels in the normalised output.

Shape key: d head dim, f features.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np


class FeatureMap(Protocol):
    """What `linear_attention` needs from a feature map."""

    def num_features(self, head_dim: int) -> int:
        """f for inputs with head dim d."""

    def __call__(self, x: jax.Array, *, is_query: bool) -> tuple[jax.Array, jax.Array | None]:
        """``x [..., d]`` -> ``(features [..., f] float32 >= 0, log_scale [...] float32 or None)``."""


@dataclasses.dataclass(frozen=True)
class EluFeatureMap:
    """``phi(x) = elu(x) + 1`` (Katharopoulos et al. 2020, "Transformers are RNNs")."""

    def num_features(self, head_dim: int) -> int:
        """f = d: one feature per input dimension."""
        return head_dim

    def __call__(self, x, *, is_query):
        return jax.nn.elu(x.astype(jnp.float32)) + 1.0, None


@dataclasses.dataclass(frozen=True)
class ReluFeatureMap:
    """``phi(x) = relu(x)``; a query or key with no positive entry attends / is attended with weight 0."""

    def num_features(self, head_dim: int) -> int:
        """f = d: one feature per input dimension."""
        return head_dim

    def __call__(self, x, *, is_query):
        return jax.nn.relu(x.astype(jnp.float32)), None


@dataclasses.dataclass(frozen=True)
class FavorFeatureMap:
    """Performer FAVOR+ positive random features (Choromanski et al. 2021), estimating ``exp(q . k / sqrt(d))``.

    ``phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(f)`` with ``x' = x / d**0.25`` and ``W [f, d]`` Gaussian rows made
    orthogonal in blocks of d (norms kept chi-distributed), drawn from ``seed`` with NumPy: fixed, so the map is a
    pure function. ``features`` (f) defaults to ``int(d * ln d)`` as in the paper.
    """

    features: int | None = None
    seed: int = 0
    orthogonal: bool = True

    def num_features(self, head_dim: int) -> int:
        """f: ``features``, else ``int(d * ln d)``."""
        return self.features or max(1, int(head_dim * math.log(max(head_dim, 2))))

    def projection(self, head_dim: int) -> np.ndarray:
        """The random matrix ``W``: float32 ``[f, d]``."""
        return _favor_projection(self.num_features(head_dim), head_dim, self.seed, self.orthogonal)

    def __call__(self, x, *, is_query):
        d = x.shape[-1]
        w = jnp.asarray(self.projection(d))
        x = x.astype(jnp.float32) * d ** -0.25
        logits = jnp.einsum("...d,fd->...f", x, w) - 0.5 * jnp.sum(x * x, -1, keepdims=True)
        scale = jax.lax.stop_gradient(logits.max(-1))  # exact: phi = exp(logits - scale) * exp(scale)
        features = jnp.exp(logits - scale[..., None]) / math.sqrt(w.shape[0])
        return features, None if is_query else scale


@functools.lru_cache(maxsize=64)
def _favor_projection(num_features: int, head_dim: int, seed: int, orthogonal: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if not orthogonal:
        return rng.standard_normal((num_features, head_dim)).astype(np.float32)
    blocks = []
    for _ in range(-(-num_features // head_dim)):
        qmat, _ = np.linalg.qr(rng.standard_normal((head_dim, head_dim)))
        blocks.append(qmat.T)
    rows = np.concatenate(blocks)[:num_features]
    norms = np.linalg.norm(rng.standard_normal((num_features, head_dim)), axis=1)
    return (rows * norms[:, None]).astype(np.float32)


FEATURE_MAPS = {"elu": EluFeatureMap(), "relu": ReluFeatureMap(), "favor": FavorFeatureMap()}


def get_feature_map(spec: "str | FeatureMap") -> FeatureMap:
    """Resolve a name in ``FEATURE_MAPS`` or pass a `FeatureMap` object through (e.g.
    ``FavorFeatureMap(features=256, seed=1)``)."""
    if isinstance(spec, str):
        if spec not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)} or a FeatureMap, got {spec!r}")
        return FEATURE_MAPS[spec]
    if callable(spec) and hasattr(spec, "num_features"):
        return spec
    raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)} or a FeatureMap, got {spec!r}")
