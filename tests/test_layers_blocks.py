"""Layers: positions (sinusoidal, rotary), norms, MLP activations against NumPy; blocks pre/post-LN; the layer
stack: scan == unrolled and remat == plain (outputs and gradients)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from cases import tiny_config
from flaxformer_lite.attention import Mask
from flaxformer_lite.layers import MLP, SCANNED_LAYERS, LayerStack, layer_name, make_norm, rotary, sinusoidal

TOL = dict(rtol=1e-5, atol=1e-5)


def _x(shape=(2, 9, 64), seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_sinusoidal_matches_paper():
    pos = np.array([[0, 3, 17, 250]])
    np.testing.assert_allclose(sinusoidal(jnp.asarray(pos), 16)[0], reference.sinusoidal(pos[0], 16), **TOL)


def test_rotary_is_relative_and_norm_preserving():
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.standard_normal((1, 1, 1, 32)), jnp.float32) for _ in range(2))
    dot = lambda m, n: float(jnp.sum(rotary(q, jnp.array([[m]])) * rotary(k, jnp.array([[n]]))))
    assert abs(dot(3, 1) - dot(12, 10)) < 1e-4 and abs(dot(7, 7) - dot(0, 0)) < 1e-4
    assert abs(dot(3, 1) - dot(1, 3)) > 1e-3
    np.testing.assert_allclose(jnp.linalg.norm(rotary(q, jnp.array([[5]]))), jnp.linalg.norm(q), rtol=1e-5)
    np.testing.assert_allclose(rotary(q, jnp.array([[0]])), q, **TOL)


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_norms_match_numpy(kind):
    norm = make_norm(kind, epsilon=1e-6)
    x = _x()
    params = norm.init(jax.random.key(0), x)
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64) + 0.3, nn.unbox(params))["params"]
    out = norm.apply({"params": jax.tree_util.tree_map(jnp.asarray, p)}, x)
    want = (reference.layer_norm(x, p["scale"], p["bias"], 1e-6) if kind == "layernorm"
            else reference.rms_norm(x, p["scale"], 1e-6))
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
    assert ("bias" in p) == (kind == "layernorm")


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu"])
def test_mlp_matches_numpy(activation):
    mlp = MLP(32, activation, kernel_init=nn.initializers.normal(0.3))
    x = _x((2, 5, 16))
    params = nn.unbox(mlp.init(jax.random.key(1), x))["params"]
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    xn = np.asarray(x, np.float64)
    silu = lambda h: h / (1 + np.exp(-h))
    act = {"relu": lambda h: np.maximum(h, 0), "gelu": reference.gelu_exact, "gelu_tanh": reference.gelu_tanh,
           "silu": silu, "swiglu": silu, "geglu": reference.gelu_tanh}[activation]
    if activation in ("swiglu", "geglu"):  # gated: act(x W_0 + b_0) * (x W_1 + b_1)
        gate = xn @ p["wi_0"]["kernel"] + p["wi_0"]["bias"]
        hidden = act(gate) * (xn @ p["wi_1"]["kernel"] + p["wi_1"]["bias"])
        assert "wi" not in p
    else:
        hidden = act(xn @ p["wi"]["kernel"] + p["wi"]["bias"])
    np.testing.assert_allclose(mlp.apply({"params": params}, x), hidden @ p["wo"]["kernel"] + p["wo"]["bias"],
                               rtol=1e-4, atol=1e-4)


def test_unknown_activation_raises():
    with pytest.raises(ValueError, match="activation must be one of"):
        MLP(8, "tanhh").init(jax.random.key(0), _x((1, 2, 4)))


def test_unknown_norm_raises():
    with pytest.raises(ValueError, match="norm must be one of"):
        make_norm("batchnorm")


def _stack(cfg, cross=False):
    return LayerStack(cfg, cfg.num_layers, cross_attention=cross)


def _stack_params_to_scan(params, num_layers):
    """Unrolled {'layer_i': tree} -> scanned {'layers': tree with a leading layer axis}."""
    layers = [params[layer_name(i)] for i in range(num_layers)]
    return {SCANNED_LAYERS: jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)}


@pytest.mark.parametrize("norm_position", ["pre", "post"])
@pytest.mark.parametrize("cross", [False, True])
def test_scan_equals_unrolled(norm_position, cross):
    cfg = tiny_config("encoder_decoder" if cross else "gpt", norm_position=norm_position, position="rotary")
    x, enc = _x(), _x((2, 7, 64), seed=1)
    kwargs = dict(mask=Mask(causal=True), encoded=enc if cross else None,
                  positions=jnp.broadcast_to(jnp.arange(9), (2, 9)))
    plain = _stack(cfg, cross)
    params = nn.unbox(plain.init(jax.random.key(0), x, **kwargs))["params"]
    scanned = _stack(tiny_config("encoder_decoder" if cross else "gpt", norm_position=norm_position,
                                 position="rotary", scan_layers=True), cross)
    scan_params = _stack_params_to_scan(params, cfg.num_layers)
    assert jax.tree_util.tree_structure(scan_params) == jax.tree_util.tree_structure(
        nn.unbox(scanned.init(jax.random.key(0), x, **kwargs))["params"])
    np.testing.assert_allclose(scanned.apply({"params": scan_params}, x, **kwargs),
                               plain.apply({"params": params}, x, **kwargs), **TOL)


@pytest.mark.parametrize("scan", [False, True])
def test_remat_equals_plain(scan):
    cfg = tiny_config(scan_layers=scan)
    x = _x()
    plain, remat = _stack(cfg), _stack(tiny_config(scan_layers=scan, remat=True))
    params = plain.init(jax.random.key(0), x, mask=Mask(causal=True))["params"]
    loss = lambda module, p, x: jnp.sum(module.apply({"params": p}, x, mask=Mask(causal=True)) ** 2)
    np.testing.assert_allclose(remat.apply({"params": params}, x, mask=Mask(causal=True)),
                               plain.apply({"params": params}, x, mask=Mask(causal=True)), **TOL)
    for g, w in zip(jax.tree_util.tree_leaves(jax.grad(loss, argnums=(1, 2))(remat, params, x)),
                    jax.tree_util.tree_leaves(jax.grad(loss, argnums=(1, 2))(plain, params, x))):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_post_ln_output_is_normalised_pre_ln_is_not():
    x = _x() * 5 + 3
    for position, normalised in (("post", True), ("pre", False)):
        cfg = tiny_config(norm_position=position)
        stack = _stack(cfg)
        out = stack.apply(stack.init(jax.random.key(0), x, mask=Mask(causal=True)), x, mask=Mask(causal=True))
        assert np.allclose(np.asarray(out).mean(-1), 0, atol=1e-4) == normalised
