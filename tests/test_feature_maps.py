"""Feature maps: FAVOR+ projections are orthogonal in blocks and seeded; features are positive and estimate
exp(x.y / sqrt(d)); names resolve and unknown ones raise."""
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from flaxformer_lite.attention import FavorFeatureMap, get_feature_map


def test_favor_projection_is_blockwise_orthogonal_and_seeded():
    fmap = FavorFeatureMap(features=40, seed=3)
    w = fmap.projection(16)
    assert w.shape == (40, 16) and w.dtype == np.float32
    for start in (0, 16):  # full blocks of d rows are mutually orthogonal
        block = w[start:start + 16].astype(np.float64)
        gram = block @ block.T
        np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0.0, atol=1e-4)
    np.testing.assert_array_equal(w, FavorFeatureMap(features=40, seed=3).projection(16))
    assert not np.allclose(w, FavorFeatureMap(features=40, seed=4).projection(16))
    assert FavorFeatureMap().num_features(64) == int(64 * np.log(64))


def test_favor_features_match_reference_and_are_positive():
    fmap = FavorFeatureMap(features=32)
    x = np.random.default_rng(0).standard_normal((2, 5, 3, 16))
    feats, scale = fmap(jnp.asarray(x, jnp.float32), is_query=False)
    assert (np.asarray(feats) > 0).all() and scale.shape == (2, 5, 3)
    phi = np.asarray(feats, np.float64) * np.exp(np.asarray(scale, np.float64))[..., None]
    np.testing.assert_allclose(phi, reference.favor(x, fmap.projection(16)), rtol=1e-5)


def test_favor_estimates_the_softmax_kernel():
    """E[phi(x).phi(y)] = exp(x.y / sqrt(d)) (Performer Lemma 1): the estimate tightens with more features."""
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((2, 64, 16)) * 0.5
    exact = np.exp((x * y).sum(-1) / 4.0)
    errs = []
    for m in (32, 8192):
        w = FavorFeatureMap(features=m, seed=5).projection(16)
        est = (reference.favor(x, w) * reference.favor(y, w)).sum(-1)
        errs.append(np.abs(est / exact - 1).mean())
    assert errs[1] < 0.05 and errs[1] < errs[0] / 4, errs


@pytest.mark.parametrize("name", ["elu", "relu", "favor"])
def test_names_resolve(name):
    fmap = get_feature_map(name)
    feats, _ = fmap(jnp.ones((1, 2, 1, 8)), is_query=True)
    assert feats.shape[-1] == fmap.num_features(8) and (np.asarray(feats) >= 0).all()


@pytest.mark.parametrize("bad", ["softmax", 3, lambda x: x])
def test_unknown_feature_map_raises(bad):
    with pytest.raises(ValueError, match="feature_map must be one of"):
        get_feature_map(bad)
