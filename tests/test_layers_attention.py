"""MultiHeadAttention: parameter shapes and logical names, parity with a NumPy forward pass built from its params,
GQA/MQA, free head_dim, cross-attention, dropout, dtypes, causality, a sliding window through the KV cache and
configuration errors."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from flaxformer_lite.attention import Mask
from flaxformer_lite.layers import MultiHeadAttention

E = 64


def _x(b=2, length=11, seed=0, features=E):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((b, length, features)), jnp.float32)


def _numpy_forward(params, xq, xkv, mask_dense, attention="softmax", phi=None):
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), nn.unbox(params))
    xq, xkv = np.asarray(xq, np.float64), np.asarray(xkv, np.float64)
    q = np.einsum("ble,ehd->blhd", xq, p["query"]["kernel"]) + p["query"]["bias"]
    k = np.einsum("ble,ehd->blhd", xkv, p["key"]["kernel"]) + p["key"]["bias"]
    v = np.einsum("ble,ehd->blhd", xkv, p["value"]["kernel"]) + p["value"]["bias"]
    if attention == "softmax":
        o = reference.softmax_attention(q, k, v, mask_dense)
    else:
        o = reference.linear_attention(q, k, v, mask_dense, phi)
    return np.einsum("blhd,hde->ble", o, p["out"]["kernel"]) + p["out"]["bias"]


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, None, None), (4, 2, None), (4, 1, 32), (2, 2, 48)])
def test_param_shapes_and_logical_names(heads, kv_heads, head_dim):
    layer = MultiHeadAttention(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim)
    variables = layer.init(jax.random.key(0), _x())
    d, n = head_dim or E // heads, kv_heads or heads
    shapes = jax.tree_util.tree_map(jnp.shape, nn.unbox(variables["params"]))
    assert shapes == {"query": {"kernel": (E, heads, d), "bias": (heads, d)},
                      "key": {"kernel": (E, n, d), "bias": (n, d)},
                      "value": {"kernel": (E, n, d), "bias": (n, d)},
                      "out": {"kernel": (heads, d, E), "bias": (E,)}}
    boxed = jax.tree_util.tree_leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(p, nn.LogicallyPartitioned) and len(p.names) == p.value.ndim for p in boxed)
    names = {p.names for p in boxed}
    assert ("embed", "heads", "head_dim") in names and ("heads", "head_dim", "embed") in names
    assert ("embed", "kv_heads", "head_dim") in names


@pytest.mark.parametrize("attention,fmap", [("softmax", None), ("linear", "elu"), ("linear", "relu")])
@pytest.mark.parametrize("mask_kind", ["causal", "padding"])
def test_matches_numpy_forward(attention, fmap, mask_kind):
    layer = MultiHeadAttention(num_heads=4, num_kv_heads=2, head_dim=24, attention=attention,
                               feature_map=fmap or "elu", kernel_init=nn.initializers.normal(0.2))
    x = _x()
    if mask_kind == "causal":
        mask, dense = Mask(causal=True), reference.dense_mask(2, 11, 11, causal=True)
    else:
        mask, dense = Mask(kv_lengths=jnp.array([5, 11])), reference.dense_mask(2, 11, 11, kv_lengths=[5, 11])
    variables = layer.init(jax.random.key(1), x, mask=mask)
    out = layer.apply(variables, x, mask=mask)
    phi = {"elu": reference.elu_plus_one, "relu": reference.relu}.get(fmap)
    want = _numpy_forward(variables["params"], x, x, dense, attention, phi)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)


def test_cross_attention_and_out_dim():
    layer = MultiHeadAttention(num_heads=4, out_dim=32)
    xq, xkv = _x(length=7), _x(length=13, seed=1, features=48)
    mask = Mask(kv_lengths=jnp.array([13, 4]))
    variables = layer.init(jax.random.key(2), xq, xkv, mask=mask)
    out = layer.apply(variables, xq, xkv, mask=mask)
    assert out.shape == (2, 7, 32)
    assert nn.unbox(variables["params"])["key"]["kernel"].shape == (48, 4, 16)
    want = _numpy_forward(variables["params"], xq, xkv, reference.dense_mask(2, 7, 13, kv_lengths=[13, 4]))
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)


def test_dropout_only_when_not_deterministic():
    layer = MultiHeadAttention(num_heads=4, dropout_rate=0.5)
    x = _x()
    variables = layer.init(jax.random.key(0), x)
    plain = MultiHeadAttention(num_heads=4).apply(variables, x)
    np.testing.assert_allclose(layer.apply(variables, x), plain, rtol=1e-6, atol=1e-6)
    a = layer.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    b = layer.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(a, plain) and not np.allclose(a, b)


@pytest.mark.parametrize("gate", ["fixed", "data"])
def test_linear_gate_matches_numpy_forward(gate):
    """The gate's decay (RetNet's constants, or GLA's log_sigmoid(x W + b) / 16 from the layer's own parameters)
    reaches the float64 recurrence of tests/reference.py; ``gate`` params are ``[embed, kv_heads]``, ``[kv_heads]``."""
    layer = MultiHeadAttention(num_heads=4, num_kv_heads=2, attention="linear", recurrent_gate=gate,
                               kernel_init=nn.initializers.normal(0.2))
    x, mask = _x(), Mask(causal=True)
    variables = layer.init(jax.random.key(0), x, mask=mask)
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), nn.unbox(variables["params"]))
    xn = np.asarray(x, np.float64)
    if gate == "fixed":
        assert "gate" not in p
        log_decay = np.broadcast_to(np.log(1 - 2.0 ** (-5 - np.arange(2))), (2, 11, 2))
    else:
        assert p["gate"]["kernel"].shape == (E, 2) and p["gate"]["bias"].shape == (2,)
        logits = xn @ p["gate"]["kernel"] + p["gate"]["bias"]
        log_decay = -np.logaddexp(0, -logits) / 16
    proj = lambda name: np.einsum("ble,ehd->blhd", xn, p[name]["kernel"]) + p[name]["bias"]
    o = reference.gated_linear_attention(proj("query"), proj("key"), proj("value"), log_decay)
    want = np.einsum("blhd,hde->ble", o, p["out"]["kernel"]) + p["out"]["bias"]
    np.testing.assert_allclose(layer.apply(variables, x, mask=mask), want, rtol=1e-4, atol=1e-5)


def test_gated_delta_matches_numpy_forward():
    """attention='delta' with the data gate: beta = sigmoid(x W + b) from the ``beta`` params, the decay from
    ``gate``, both ``[embed, kv_heads]`` and ``[kv_heads]``, reach the float64 delta-rule recurrence."""
    layer = MultiHeadAttention(num_heads=4, num_kv_heads=2, attention="delta", recurrent_gate="data",
                               kernel_init=nn.initializers.normal(0.2))
    x, mask = _x(), Mask(causal=True)
    variables = layer.init(jax.random.key(0), x, mask=mask)
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), nn.unbox(variables["params"]))
    xn = np.asarray(x, np.float64)
    assert p["beta"]["kernel"].shape == (E, 2) and p["beta"]["bias"].shape == (2,)
    dense = lambda name: xn @ p[name]["kernel"] + p[name]["bias"]
    beta, log_decay = 1 / (1 + np.exp(-dense("beta"))), -np.logaddexp(0, -dense("gate")) / 16
    proj = lambda name: np.einsum("ble,ehd->blhd", xn, p[name]["kernel"]) + p[name]["bias"]
    o = reference.delta_rule_attention(proj("query"), proj("key"), proj("value"), beta, log_decay)
    want = np.einsum("blhd,hde->ble", o, p["out"]["kernel"]) + p["out"]["bias"]
    np.testing.assert_allclose(layer.apply(variables, x, mask=mask), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attention", ["softmax", "linear"])
def test_causal_through_the_layer(attention):
    layer = MultiHeadAttention(num_heads=4, attention=attention, feature_map="favor")
    x = _x()
    mask = Mask(causal=True)
    variables = layer.init(jax.random.key(0), x, mask=mask)
    x2 = x.at[:, 6:].set(_x(seed=5)[:, 6:])
    out, out2 = layer.apply(variables, x, mask=mask), layer.apply(variables, x2, mask=mask)
    np.testing.assert_allclose(out2[:, :6], out[:, :6], rtol=0, atol=1e-6)


def test_dtypes():
    layer = MultiHeadAttention(num_heads=4, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    x = _x().astype(jnp.bfloat16)
    variables = layer.init(jax.random.key(0), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(nn.unbox(variables)))
    assert layer.apply(variables, x).dtype == jnp.bfloat16


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_heads=3, num_kv_heads=2), "multiple of num_kv_heads"),
    (dict(num_heads=5), "not divisible by num_heads"),
    (dict(num_heads=4, attention="sparse"), "attention must be one of"),
    (dict(num_heads=4, attention_impl="splash"), "attention_impl"),
    (dict(num_heads=4, attention="linear", feature_map="softmax"), "feature_map"),
    (dict(num_heads=4, attention="linear", dropout_rate=0.1), "dropout_rate"),
    (dict(num_heads=4, attention="linear", recurrent_gate="retnet"), r"recurrent_gate must be one of \('none'"),
    (dict(num_heads=4, recurrent_gate="fixed"), "recurrent_gate='fixed' needs attention 'linear' or 'delta'"),
    (dict(num_heads=4, attention="delta", dropout_rate=0.1), "dropout_rate must be 0 with attention='delta'"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiHeadAttention(**kwargs).init(jax.random.key(0), _x())


def test_delta_is_self_attention_only():
    with pytest.raises(ValueError, match="attention='delta' .* is for causal self-attention, not cross-attention"):
        MultiHeadAttention(num_heads=4, attention="delta").init(jax.random.key(0), _x(), _x(length=5))


def test_input_rank_error():
    with pytest.raises(ValueError, match="batch, length, features"):
        MultiHeadAttention(num_heads=4).init(jax.random.key(0), jnp.zeros((11, E)))


@pytest.mark.parametrize("impl", ["blockwise"])  # the dense impls share the layer's mask path; blockwise also skips
def test_sliding_window_cache_equals_full_forward(impl):
    """Decoding against the KV cache with a windowed mask (``q_offset`` = the cache index: a prompt, then one token
    a step) gives the full forward pass's outputs under the same window; the window does change them."""
    layer = MultiHeadAttention(num_heads=4, num_kv_heads=2, attention_impl=impl, rope_base=10000.0)
    x, window, prompt = _x(length=12), 3, 5
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    params = {"params": layer.init(jax.random.key(0), x)["params"]}
    full = layer.apply(params, x, mask=Mask(causal=True, window=window), positions=pos)
    assert not np.allclose(full, layer.apply(params, x, mask=Mask(causal=True), positions=pos), atol=1e-3)
    _, cache = layer.apply(params, x, decode="prefill", mutable=["cache"])  # allocates a zeroed 12-position cache

    @functools.partial(jax.jit, static_argnames="decode")
    def call(cache, xs, ps, start, decode):
        mask = Mask(causal=True, window=window, q_offset=start)
        return layer.apply({**params, **cache}, xs, mask=mask, positions=ps, decode=decode, cache_index=start,
                           mutable=["cache"])

    out, cache = call(cache, x[:, :prompt], pos[:, :prompt], jnp.asarray(0), "prefill")
    outs = [out]
    for t in range(prompt, 12):
        out, cache = call(cache, x[:, t:t + 1], pos[:, t:t + 1], jnp.asarray(t), "step")
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-5, atol=1e-5)
