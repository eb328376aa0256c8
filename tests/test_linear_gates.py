"""Decay-gated linear attention (RetNet's fixed decay, GLA/Mamba-2's data-dependent one) against the float64
recurrence in tests/reference.py: every causal mask kind x feature map x MHA/GQA, block sizes, gradients, the
recurrent step and prefill, long sequences, bf16, and the documented errors."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from cases import B, L, build, check_grads_by_finite_differences, qkv
from flaxformer_lite.attention import Mask, linear_attention, linear_init_state, linear_prefill_state, linear_step
from flaxformer_lite.attention.recurrent import common
from test_linear import PHI, TOL

CASES = ["causal", "causal_kv_valid", "segments_causal"]


def _gate(kind, n, l=L, seed=3):
    """``(kwargs for linear_attention, log_decay [b, l, n] float64 for the reference)``."""
    if kind == "fixed":
        decay = np.linspace(0.6, 0.95, n)
        return {"decay": jnp.asarray(decay, jnp.float32)}, np.broadcast_to(np.log(decay), (B, l, n))
    log_decay = -np.logaddexp(0, np.random.default_rng(seed).standard_normal((B, l, n)) - 1)  # -softplus
    return {"log_decay": jnp.asarray(log_decay, jnp.float32)}, log_decay


def _reference(name, qn, kn, vn, log_decay, fmap):
    fields = build(name)[2]
    seg = None if fields.q_segment_ids is None else np.asarray(fields.q_segment_ids)
    valid = None if fields.kv_valid is None else np.asarray(fields.kv_valid)
    return reference.gated_linear_attention(qn, kn, vn, log_decay, seg, valid, PHI[fmap])


@pytest.fixture(scope="module")
def gated_fn():
    """jit(linear_attention) with static knobs; the gate a traced argument."""
    return jax.jit(linear_attention, static_argnames=("feature_map", "block_size", "impl"))


@pytest.mark.parametrize("kind,kv_heads", [("fixed", 4), ("data", 2)], ids=["fixed-mha", "data-gqa"])
@pytest.mark.parametrize("fmap", ["elu", "favor"])
@pytest.mark.parametrize("name", CASES)
def test_matches_recurrent_reference(gated_fn, name, fmap, kind, kv_heads):
    _, _, mask, _ = build(name)
    (qn, kn, vn), (q, k, v) = qkv(L, L, kv_heads=kv_heads, value_dim=8, seed=kv_heads)
    gate, log_decay = _gate(kind, kv_heads)
    out = gated_fn(q, k, v, mask=mask, feature_map=fmap, block_size=8, **gate)
    np.testing.assert_allclose(out, _reference(name, qn, kn, vn, log_decay, fmap), **TOL)


@pytest.mark.parametrize("name", ["causal", "segments_causal"])
def test_block_size_does_not_change_the_result(gated_fn, name):
    """Blocks of 3 and 4 make 13 and 10 blocks; 64 is one block."""
    _, _, mask, _ = build(name)
    _, (q, k, v) = qkv(L, L, kv_heads=2)
    gate, _ = _gate("data", 2)
    outs = [gated_fn(q, k, v, mask=mask, feature_map="favor", block_size=c, **gate) for c in (3, 4, 64)]
    for out in outs[1:]:
        np.testing.assert_allclose(out, outs[0], **TOL)


def test_blocks_per_span_keeps_a_span_in_cache():
    """b=1, 8 heads of 64 x 64 states: 8 blocks at a time on CPU; FAVOR+'s 266 x 64, or 8 batch rows: one, unless that
    makes just two spans; all at once on accelerators."""
    elu, favor = 4 * 8 * 64 * 64, 4 * 8 * 266 * 64
    assert common.blocks_per_span(256, elu, "cpu") == 8
    assert common.blocks_per_span(256, favor, "cpu") == common.blocks_per_span(256, 8 * elu, "cpu") == 1
    assert common.blocks_per_span(5, elu, "cpu") == 5
    assert common.blocks_per_span(2, 8 * elu, "cpu") == 2  # two groups of one: all at once instead
    assert common.blocks_per_span(4, 8 * elu, "cpu") == 1
    assert common.blocks_per_span(256, elu, "gpu") == common.blocks_per_span(256, elu, "tpu") == 256


@pytest.mark.parametrize("fmap", ["elu", "favor"])
def test_groups_of_one_block_match_the_reference(monkeypatch, fmap):
    """On CPU, blocks go in groups sized to keep their states in cache (`blocks_per_span`; these tiny shapes fit all
    at once). With one block per group, the scan over groups carries the sums across group boundaries, segments and
    padding included."""
    monkeypatch.setitem(common.SPAN_BYTES, jax.default_backend(), 1)
    _, _, mask, _ = build("segments_causal")
    (qn, kn, vn), (q, k, v) = qkv(L, L, kv_heads=2, value_dim=8, seed=5)
    gate, log_decay = _gate("data", 2)
    out = jax.jit(lambda q, k, v: linear_attention(q, k, v, mask=mask, feature_map=fmap, block_size=4, **gate))(
        q, k, v)
    np.testing.assert_allclose(out, _reference("segments_causal", qn, kn, vn, log_decay, fmap), **TOL)


@pytest.mark.parametrize("fmap,impl", [("elu", "xla"), ("favor", "xla"), ("elu", "pallas")])
@pytest.mark.parametrize("name", ["causal_kv_valid", "segments_causal"])
def test_grads_match_finite_differences(gated_fn, name, fmap, impl):
    """Gradients of q, k, v and of the log decay itself; ``pallas``: the Pallas backward kernel (interpret mode)."""
    _, _, mask, _ = build(name)
    if impl == "pallas" and mask.has_segments:  # the kernel takes one array of segment ids for queries and keys
        mask = dataclasses.replace(mask, kv_segment_ids=mask.q_segment_ids)
    (qn, kn, vn), (q, k, v) = qkv(L, L, kv_heads=2, seed=11)
    gate, log_decay = _gate("data", 2, seed=12)
    rng = np.random.default_rng(13)
    w = rng.standard_normal((B, L, 4, 16))
    loss = lambda q, k, v, a: jnp.sum(
        gated_fn(q, k, v, mask=mask, feature_map=fmap, block_size=8 if impl == "xla" else 16, log_decay=a,
                 impl=impl) * w)
    grads = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, gate["log_decay"])
    check_grads_by_finite_differences(grads, [qn, kn, vn, log_decay],
                                      lambda *a: (_reference(name, *a, fmap) * w).sum(), rng)


@pytest.mark.parametrize("fmap", ["elu", "favor"])
def test_decay_gradient_by_identity_equals_autodiff(gated_fn, fmap):
    """A learnable fixed decay (``decay=``) is differentiated through each block's decay matrix; a data-dependent
    one (``log_decay=``) by the identity dL/dA_t = q_t.dq_t - k_t.dk_t. The same decay both ways: equal gradients."""
    _, _, mask, _ = build("segments_causal")
    _, (q, k, v) = qkv(L, L, kv_heads=2, seed=17)
    w = jnp.asarray(np.random.default_rng(18).standard_normal((B, L, 4, 16)), jnp.float32)
    decay = jnp.array([0.7, 0.9])
    run = lambda **gate: jnp.sum(gated_fn(q, k, v, mask=mask, feature_map=fmap, block_size=8, **gate) * w)
    by_autodiff = jax.grad(lambda d: run(decay=d))(decay)
    by_identity = jax.grad(lambda d: run(log_decay=jnp.broadcast_to(jnp.log(d), (B, L, 2))))(decay)
    assert np.abs(by_autodiff).min() > 1e-3
    np.testing.assert_allclose(by_identity, by_autodiff, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["fixed", "data"])
@pytest.mark.parametrize("fmap", ["elu", "favor"])
def test_step_and_prefill_follow_the_gate(gated_fn, fmap, kind):
    """Prefill the first t positions, then step through the rest: every output equals the parallel form's."""
    _, _, mask, _ = build("causal_kv_valid")
    _, (q, k, v) = qkv(L, L, kv_heads=2, value_dim=8, seed=5)
    gate, _ = _gate(kind, 2)
    want = gated_fn(q, k, v, mask=mask, feature_map=fmap, block_size=8, **gate)
    t = 20
    prefix = {"decay": gate["decay"]} if kind == "fixed" else {"log_decay": gate["log_decay"][:, :t]}
    state = linear_prefill_state(k[:, :t], v[:, :t], feature_map=fmap, kv_valid=mask.kv_valid[:, :t], **prefix)

    @jax.jit
    def steps(state, xs):
        def body(state, x):
            q_t, k_t, v_t, valid_t, a_t = x
            one = {"decay": gate["decay"]} if kind == "fixed" else {"log_decay": a_t}
            out, state = linear_step(state, q_t, k_t, v_t, feature_map=fmap, valid=valid_t, **one)
            return state, out
        return jax.lax.scan(body, state, xs)[1].swapaxes(0, 1)

    a = gate.get("log_decay", jnp.zeros((B, L, 2)))
    got = steps(state, tuple(x[:, t:].swapaxes(0, 1) for x in (q, k, v, mask.kv_valid, a)))
    np.testing.assert_allclose(got, want[:, t:], **TOL)


def test_long_sequences_stay_finite_and_exact():
    """4096 positions of strong decay: the cumulative log decay reaches -12000, far past float32's exp range, so
    factoring exp(A_i - A_j) as exp(A_i) exp(-A_j) over the sequence would give inf/nan. Sums inside a block only
    keep every output exact."""
    l = 4096
    (qn, kn, vn), (q, k, v) = qkv(l, l, kv_heads=2, seed=21)
    log_decay = np.full((B, l, 2), -3.0)
    out = jax.jit(lambda q, k, v: linear_attention(q, k, v, mask=Mask(causal=True), log_decay=log_decay))(q, k, v)
    assert np.isfinite(out).all()
    want = reference.gated_linear_attention(qn[:, -64:], kn[:, -64:], vn[:, -64:], log_decay[:, -64:])
    # the last 64 rows see 64 keys and a state decayed by >= e^-192 from before them: equal to within rounding
    np.testing.assert_allclose(out[:, -32:], want[:, -32:], **TOL)


def test_bfloat16_inputs_accumulate_in_float32(gated_fn):
    _, _, mask, _ = build("segments_causal")
    _, (q, k, v) = qkv(L, L, dtype=jnp.bfloat16)
    gate, log_decay = _gate("data", 2)
    out = gated_fn(q, k, v, mask=mask, feature_map="elu", block_size=8, **gate)
    assert out.dtype == jnp.bfloat16
    want = _reference("segments_causal", *(np.asarray(x, np.float64) for x in (q, k, v)), log_decay, "elu")
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_a_log_decay_of_minus_infinity_resets_the_state(impl):
    """-inf (a decay of 0) is accepted and floored at LOG_DECAY_FLOOR: the output equals the reference's, where the
    state is simply emptied, instead of exp(-inf + inf) = NaN."""
    _, _, mask, _ = build("causal")
    (qn, kn, vn), (q, k, v) = qkv(L, L, kv_heads=2, seed=9)
    gate, log_decay = _gate("data", 2)
    log_decay = np.array(log_decay)
    log_decay[:, [5, 20]] = -np.inf
    out = linear_attention(q, k, v, mask=mask, log_decay=jnp.asarray(log_decay, jnp.float32), block_size=16,
                           impl=impl)
    np.testing.assert_allclose(out, _reference("causal", qn, kn, vn, log_decay, "elu"), **TOL)


@pytest.mark.parametrize("kwargs,match", [
    (dict(decay=jnp.full((3,), 0.9)), r"decay must have shape \[kv_heads\] = \[2\]"),
    (dict(decay=jnp.array([0.9, 0.0])), r"decay must be in \(0, 1\]"),
    (dict(decay=jnp.array([0.9, 1.5])), r"decay must be in \(0, 1\]"),
    (dict(log_decay=jnp.full((B, 5, 2), 0.1)), r"log_decay must be <= 0"),
    (dict(log_decay=jnp.zeros((B, 5, 4))), r"log_decay must have shape \[batch, length, kv_heads\] = \[2, 5, 2\]"),
    (dict(decay=jnp.full((2,), 0.9), log_decay=jnp.zeros((B, 5, 2))), "not both"),
    (dict(decay=jnp.full((2,), 0.9), mask=Mask()), "need a causal mask"),
    (dict(decay=jnp.full((2,), 0.9), mask=Mask(prefix_lengths=jnp.array([2, 2]))), "without prefix_lengths"),
])
def test_bad_gates_raise(kwargs, match):
    _, (q, k, v) = qkv(5, 5, kv_heads=2)
    kwargs.setdefault("mask", Mask(causal=True))
    with pytest.raises(ValueError, match=match):
        linear_attention(q, k, v, **kwargs)


def test_bad_step_gates_raise():
    state = linear_init_state(2, 2, 16, 16)
    one = (jnp.zeros((2, 4, 16)), jnp.zeros((2, 2, 16)), jnp.zeros((2, 2, 16)))
    with pytest.raises(ValueError, match=r"log_decay of one position must have shape \[batch, kv_heads\] = \[2, 2\]"):
        linear_step(state, *one, log_decay=jnp.zeros((2, 5, 2)))
    with pytest.raises(ValueError, match=r"decay must be in \(0, 1\]"):
        linear_step(state, *one, decay=jnp.array([1.0, 2.0]))
