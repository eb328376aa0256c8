"""linear_attention: every mask kind x feature map x MHA/MQA against the float64 reference, block sizes, gradients,
recurrent decoding, invariances, FAVOR+ stability, low precision, and the documented errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from cases import B, LINEAR_UNSUPPORTED, MASK_CASES, build, check_grads_by_finite_differences, qkv
from flaxformer_lite.attention import (FavorFeatureMap, Mask, linear_attention, linear_init_state, linear_prefill_state,
                                       linear_step, softmax_attention)
from flaxformer_lite.attention.recurrent import common

HEAD_DIM = 16
PHI = {"elu": reference.elu_plus_one, "relu": reference.relu,
       "favor": functools.partial(reference.favor, w=FavorFeatureMap().projection(HEAD_DIM))}
CASES = sorted(set(MASK_CASES) - LINEAR_UNSUPPORTED)
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 1], ids=["mha", "mqa"])
@pytest.mark.parametrize("fmap", sorted(PHI))
@pytest.mark.parametrize("name", CASES)
def test_matches_reference(linear_fn, name, fmap, kv_heads):
    lq, lk, mask, dense = build(name)
    (qn, kn, vn), (q, k, v) = qkv(lq, lk, kv_heads=kv_heads, value_dim=8, seed=kv_heads)
    out = linear_fn(q, k, v, mask=mask, feature_map=fmap, block_size=8)
    assert out.shape == (B, lq, 4, 8) and out.dtype == q.dtype
    np.testing.assert_allclose(out, reference.linear_attention(qn, kn, vn, dense, PHI[fmap]), **TOL)


@pytest.mark.parametrize("name", ["causal", "segments_causal", "segments", "prefix_padding"])
def test_block_size_does_not_change_the_result(linear_fn, name):
    lq, lk, mask, _ = build(name)
    _, (q, k, v) = qkv(lq, lk, kv_heads=2)
    outs = [linear_fn(q, k, v, mask=mask, feature_map="favor", block_size=c) for c in (3, 5, 64)]  # 3: 2 spans
    for out in outs[1:]:
        np.testing.assert_allclose(out, outs[0], **TOL)


@pytest.mark.parametrize("fmap", ["elu", "favor"])
@pytest.mark.parametrize("name", ["causal", "segments_causal", "prefix_padding", "kv_valid"])
def test_grads_match_finite_differences(linear_fn, name, fmap):
    lq, lk, mask, dense = build(name)
    arrays, jax_arrays = qkv(lq, lk, kv_heads=2, seed=11)
    rng = np.random.default_rng(12)
    w = rng.standard_normal((B, lq, 4, HEAD_DIM))
    grads = jax.grad(lambda q, k, v: jnp.sum(linear_fn(q, k, v, mask=mask, feature_map=fmap, block_size=8) * w),
                     argnums=(0, 1, 2))(*jax_arrays)
    check_grads_by_finite_differences(
        grads, arrays, lambda *a: (reference.linear_attention(*a, dense, PHI[fmap]) * w).sum(), rng)


@pytest.mark.parametrize("name", ["causal", "causal_kv_valid"])
def test_spans_of_two_blocks_match_the_reference(monkeypatch, name):
    """Plain causal sums (elu+1, no segments or gates) chain a span's blocks by a cumulative sum: groups of two
    blocks of 4 positions, the sums carried across five spans. Values and gradients against the reference."""
    state_bytes = 4 * B * 2 * HEAD_DIM * HEAD_DIM  # one block's [f, v] states over 2 batch rows and 2 kv heads
    monkeypatch.setitem(common.SPAN_BYTES, jax.default_backend(), 2 * state_bytes)
    assert common.blocks_per_span(10, state_bytes) == 2
    lq, lk, mask, dense = build(name)
    arrays, jax_arrays = qkv(lq, lk, kv_heads=2, seed=13)
    w = np.random.default_rng(14).standard_normal((B, lq, 4, HEAD_DIM))
    fn = jax.jit(lambda q, k, v: linear_attention(q, k, v, mask=mask, block_size=4))  # traced under the patch
    np.testing.assert_allclose(fn(*jax_arrays), reference.linear_attention(*arrays, dense, PHI["elu"]), **TOL)
    grads = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2))(*jax_arrays)
    check_grads_by_finite_differences(
        grads, arrays, lambda *a: (reference.linear_attention(*a, dense, PHI["elu"]) * w).sum(),
        np.random.default_rng(15))


def _decode(q, k, v, fmap, valid=None):
    """Run linear_step over every position with lax.scan: [b, l, h, v]."""
    state = linear_init_state(q.shape[0], k.shape[2], q.shape[3], v.shape[3], fmap)

    def body(state, xs):
        q_t, k_t, v_t, valid_t = xs
        out, state = linear_step(state, q_t, k_t, v_t, feature_map=fmap, valid=valid_t)
        return state, out

    if valid is None:
        valid = jnp.ones(q.shape[:2], bool)
    _, outs = jax.lax.scan(body, state, tuple(x.swapaxes(0, 1) for x in (q, k, v, valid)))
    return outs.swapaxes(0, 1)


@pytest.mark.parametrize("fmap", sorted(PHI))
def test_recurrent_step_equals_causal(linear_fn, fmap):
    _, (q, k, v) = qkv(37, 37, kv_heads=2, value_dim=8)
    k = k * jnp.linspace(0.5, 3.0, 37)[None, :, None, None]  # keys of growing norm move the FAVOR+ running scale
    want = linear_fn(q, k, v, mask=Mask(causal=True), feature_map=fmap, block_size=8)
    np.testing.assert_allclose(jax.jit(_decode, static_argnums=3)(q, k, v, fmap), want, **TOL)


def test_recurrent_step_skips_invalid_positions(linear_fn):
    _, _, mask, _ = build("causal_kv_valid")
    _, (q, k, v) = qkv(37, 37, kv_heads=2)
    want = linear_fn(q, k, v, mask=mask, feature_map="elu", block_size=8)
    got = _decode(q, k, v, "elu", valid=mask.kv_valid)
    np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("fmap", sorted(PHI))
def test_future_keys_do_not_change_past_outputs(linear_fn, fmap):
    """Past keys of large norm (FAVOR+ log-scales near -150) then ordinary future keys: a stabiliser taken over the
    whole sequence (as Performer's) would underflow every past key to 0; ours must leave past rows untouched."""
    _, (q, k, v) = qkv(37, 37, kv_heads=2)
    t = 21  # inside a block of 8, so the same block holds past and future positions
    later = jnp.arange(37)[None, :, None, None] >= t
    k_past_big = k * 10.0
    k2 = jnp.where(later, k, k_past_big)
    v2 = jnp.where(later, v + 5.0, v)
    out = linear_fn(q, k_past_big, v, mask=Mask(causal=True), feature_map=fmap, block_size=8)
    out2 = linear_fn(q, k2, v2, mask=Mask(causal=True), feature_map=fmap, block_size=8)
    assert np.abs(np.asarray(out[:, :t])).max() > 0.1
    np.testing.assert_allclose(out2[:, :t], out[:, :t], rtol=0, atol=1e-6)
    assert not np.allclose(out2[:, t:], out[:, t:])


@pytest.mark.parametrize("name", ["kv_lengths", "cross_padding", "causal_kv_valid"])
def test_padded_keys_change_nothing(linear_fn, name):
    lq, lk, mask, _ = build(name)
    _, (q, k, v) = qkv(lq, lk)
    padded = ~mask.kv_valid_mask(lk)[:, :, None, None]
    noise = jnp.asarray(np.random.default_rng(1).standard_normal(k.shape), jnp.float32) * 10
    for fmap in sorted(PHI):
        out = linear_fn(q, k, v, mask=mask, feature_map=fmap, block_size=8)
        out2 = linear_fn(q, jnp.where(padded, noise, k), jnp.where(padded, noise, v), mask=mask, feature_map=fmap,
                         block_size=8)
        np.testing.assert_allclose(out2, out, rtol=0, atol=1e-6)


# (which inputs get the poison, the poison): NaN or inf planted where the mask hides keys.
POISONS = [("key", np.nan), ("value", np.nan), ("both", np.inf)]


def _plant(valid, k, v, which, poison):
    """k, v with ``poison`` where ``valid [b, l]`` is False."""
    hidden = ~valid[:, :, None, None]
    return (jnp.where(hidden, poison, k) if which in ("key", "both") else k,
            jnp.where(hidden, poison, v) if which in ("value", "both") else v)


@pytest.mark.parametrize("which,poison", POISONS, ids=[p[0] for p in POISONS])
@pytest.mark.parametrize("name", ["cross_padding", "causal_kv_valid", "prefix_padding"])
@pytest.mark.parametrize("fmap", sorted(PHI))
def test_nan_in_padded_keys_leaks_nowhere(linear_fn, fmap, name, which, poison):
    """0 * nan = nan: weight-0 padded keys alone would let a NaN in a padded key or value reach every output row and
    the gradients of the visible inputs. Outputs and gradients must equal the clean run's."""
    lq, lk, mask, _ = build(name)
    _, (q, k, v) = qkv(lq, lk, seed=13)
    kp, vp = _plant(mask.kv_valid_mask(lk), k, v, which, poison)
    f = lambda q, k, v: linear_fn(q, k, v, mask=mask, feature_map=fmap, block_size=8)
    out_p = f(q, kp, vp)
    assert np.isfinite(out_p).all()
    np.testing.assert_allclose(out_p, f(q, k, v), rtol=0, atol=1e-6)
    w = jnp.asarray(np.random.default_rng(14).standard_normal(out_p.shape), jnp.float32)
    grads = lambda *a: jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(*a)
    for g_p, g in zip(grads(q, kp, vp), grads(q, k, v)):
        assert np.isfinite(g_p).all()
        np.testing.assert_allclose(g_p, g, rtol=0, atol=1e-6)


@pytest.mark.parametrize("which,poison", POISONS, ids=[p[0] for p in POISONS])
@pytest.mark.parametrize("fmap", sorted(PHI))
def test_nan_in_invalid_decode_positions_leaks_nowhere(fmap, which, poison):
    """The recurrent form too: `linear_prefill_state` (``kv_valid``) and `linear_step` (``valid``)."""
    _, _, mask, _ = build("causal_kv_valid")
    _, (q, k, v) = qkv(37, 37, kv_heads=2, seed=16)
    kp, vp = _plant(mask.kv_valid, k, v, which, poison)
    prefill = jax.jit(lambda k, v: linear_prefill_state(k, v, feature_map=fmap, kv_valid=mask.kv_valid))
    for got, want in zip(prefill(kp, vp), prefill(k, v)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    decode = jax.jit(_decode, static_argnums=3)
    got = decode(q, kp, vp, fmap, mask.kv_valid)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, decode(q, k, v, fmap, mask.kv_valid), rtol=0, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_fully_masked_rows_are_zero_with_finite_grads(linear_fn, causal):
    mask = Mask(causal=causal, kv_lengths=jnp.array([7, 0]))
    _, (q, k, v) = qkv(37, 37)
    f = lambda q, k, v: linear_fn(q, k, v, mask=mask, feature_map="favor", block_size=8)
    np.testing.assert_array_equal(f(q, k, v)[1], 0.0)
    assert all(np.isfinite(g).all() for g in jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2))(q, k, v))


@pytest.mark.parametrize("fmap", sorted(PHI))
def test_bfloat16_inputs_accumulate_in_float32(linear_fn, fmap):
    lq, lk, mask, dense = build("segments_causal")
    _, (q, k, v) = qkv(lq, lk, dtype=jnp.bfloat16)
    out = linear_fn(q, k, v, mask=mask, feature_map=fmap, block_size=8)
    assert out.dtype == jnp.bfloat16
    want = reference.linear_attention(*(np.asarray(x, np.float64) for x in (q, k, v)), dense, PHI[fmap])
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=2e-2, rtol=2e-2)


# id 0 comes back after 1 (inside a block of 8, across blocks of 4); row 1 also reuses 5
REUSED = np.array([[0] * 6 + [1] * 10 + [0] * 12 + [2] * 9, [5] * 3 + [3] * 17 + [5] * 17])


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("impl,block", [("xla", 4), ("xla", 64), ("pallas", 16)])
def test_a_segment_id_that_comes_back_starts_a_new_segment(causal, impl, block):
    """Each contiguous run is its own segment, as the state carried along the sequence sees it, whatever the block
    size: the reference's dense mask is built from the runs. (The Pallas kernel is causal only.)"""
    if impl == "pallas" and not causal:
        pytest.skip("the Pallas kernel computes causal sums")
    runs = np.cumsum(np.concatenate([np.zeros((B, 1), int), REUSED[:, 1:] != REUSED[:, :-1]], 1), 1)
    dense = reference.dense_mask(B, 37, 37, causal=causal, q_segment_ids=runs, kv_segment_ids=runs)
    (qn, kn, vn), (q, k, v) = qkv(37, 37, kv_heads=2, seed=3)
    seg = jnp.asarray(REUSED)
    out = linear_attention(q, k, v, mask=Mask(causal=causal, q_segment_ids=seg, kv_segment_ids=seg),
                           block_size=block, impl=impl)
    np.testing.assert_allclose(out, reference.linear_attention(qn, kn, vn, dense, PHI["elu"]), **TOL)


def test_float16_inputs_compute_in_float32():
    """fp16 matmul operands would overflow the carried sums: values about 1000 pass 65504 within one block of 64
    (`matmul_dtype`); the output, back in fp16, matches the reference."""
    (qn, kn, vn), _ = qkv(256, 256, kv_heads=2, seed=5)
    vn = vn + 1000.0
    q, k, v = (jnp.asarray(x, jnp.float16) for x in (qn, kn, vn))
    out = linear_attention(q, k, v, mask=Mask(causal=True))
    assert out.dtype == jnp.float16 and np.isfinite(np.asarray(out, np.float32)).all()
    want = reference.linear_attention(*(np.asarray(x, np.float64) for x in (q, k, v)),
                                      reference.dense_mask(B, 256, 256, causal=True), PHI["elu"])
    np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=2e-3)


def test_favor_estimates_softmax_attention():
    """With many random features, FAVOR+ linear attention approaches exact softmax attention (the paper's claim)."""
    (qn, kn, vn), (q, k, v) = qkv(37, 37, kv_heads=4)
    qn, kn, q, k = qn * 0.5, kn * 0.5, q * 0.5, k * 0.5
    exact = reference.softmax_attention(qn, kn, vn)
    errors = [np.abs(np.asarray(linear_attention(q, k, v, feature_map=FavorFeatureMap(features=m))) - exact).mean()
              for m in (16, 4096)]
    assert errors[1] < 0.03 and errors[1] < errors[0] / 4, errors


@pytest.mark.parametrize("kwargs,match", [
    (dict(bias=jnp.zeros((1, 1, 5, 5))), "bias"),
    (dict(scale=0.5), "scale"),
    (dict(dropout_rate=0.1), "dropout_rate"),
    (dict(block_size=0), "block_size"),
    (dict(feature_map="softmax"), "feature_map"),
    (dict(mask=Mask(causal=True, q_offset=2)), "q_offset"),
    (dict(mask=Mask(causal=True, window=3)), "^sliding-window masks are not supported by linear attention"),
    (dict(mask=Mask(causal=True, q_segment_ids=jnp.zeros((B, 5), int), kv_segment_ids=jnp.ones((B, 5), int))),
     "needs kv_segment_ids equal to q_segment_ids"),
])
def test_bad_input_raises(kwargs, match):
    _, (q, k, v) = qkv(5, 5)
    with pytest.raises(ValueError, match=match):
        linear_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("q,kv,match", [
    (jnp.zeros((1, 3, 2, 16)), jnp.zeros((1, 3, 2, 16), jnp.bfloat16), "share one dtype, got float32, bfloat16"),
    (jnp.zeros((1, 3, 2, 16)), jnp.zeros((1, 3, 0, 16)), "at least 1 head"),
    (jnp.zeros((1, 3, 2, 0)), jnp.zeros((1, 3, 2, 0)), "head_dim >= 1"),
], ids=["mixed_dtypes", "no_kv_heads", "no_head_dim"])
def test_qkv_checks_shared_by_every_kernel(q, kv, match):
    """The shared entry check answers alike for every kernel (impl='reference' used to take the mixed dtypes that
    'xla' rejected)."""
    for kernel in (linear_attention, functools.partial(softmax_attention, impl="reference"),
                   functools.partial(softmax_attention, impl="xla")):
        with pytest.raises(ValueError, match=match):
            kernel(q, kv, kv)


@pytest.mark.parametrize("mask", [Mask(causal=True), Mask(prefix_lengths=jnp.array([2, 2]))])
def test_causal_cross_attention_raises(mask):
    _, (q, k, v) = qkv(5, 9)
    with pytest.raises(ValueError, match="lq == lk"):
        linear_attention(q, k, v, mask=mask)


def test_step_shape_errors():
    state = linear_init_state(2, 2, HEAD_DIM, HEAD_DIM)
    with pytest.raises(ValueError, match="one position"):
        linear_step(state, jnp.zeros((2, 1, 4, HEAD_DIM)), jnp.zeros((2, 2, HEAD_DIM)), jnp.zeros((2, 2, HEAD_DIM)))
    one = lambda d, b=2: (jnp.zeros((b, 4, d)), jnp.zeros((b, 2, d)), jnp.zeros((b, 2, d)))
    with pytest.raises(ValueError, match="state is for"):
        linear_step(state, *one(HEAD_DIM, b=3))
    with pytest.raises(ValueError, match=r"state is for other shapes.*linear_init_state\(2, 2, 8, 8"):
        linear_step(state, *one(8))  # a state built for another head_dim
    with pytest.raises(ValueError, match="state is for other shapes"):
        linear_step(state, *one(HEAD_DIM), feature_map="favor")  # ... or another feature map
    k = jnp.zeros((2, 5, 2, HEAD_DIM))
    with pytest.raises(ValueError, match=r"k must have shape .* \(rank 4\)"):
        linear_prefill_state(k[:, :, 0], k)
    with pytest.raises(ValueError, match=r"kv_valid must be bool \[2, 5\]"):
        linear_prefill_state(k, k, kv_valid=jnp.ones((2, 4), bool))
