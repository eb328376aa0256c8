"""The delta rule (DeltaNet) and its gated form against the float64 recurrence in tests/reference.py: causal,
padding and packed segments x MHA/GQA x no/fixed/data gate, block sizes, gradients, the recurrent step after a
prefill, and the documented errors; impl='pallas' (the Pallas kernels, interpret mode on CPU) against the same
reference, the XLA form's state and gradients, and their lowering to Triton."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from cases import B, L, build, check_grads_by_finite_differences, lower_for_gpu, qkv, triton_launches
from flaxformer_lite.attention import Mask, delta_attention, delta_impl, delta_init_state, delta_step
from flaxformer_lite.attention.recurrent import common
from flaxformer_lite.attention.recurrent.common import run_ids
from flaxformer_lite.attention.recurrent.delta import _blocks as delta_blocks
from flaxformer_lite.attention.recurrent.delta import unit_lower_inverse
from flaxformer_lite.attention.recurrent.delta_pallas import pallas_delta

TOL = dict(rtol=2e-5, atol=2e-5)
CASES = ["causal", "causal_kv_valid", "segments_causal"]


def _mask(name):
    """The case's mask, with one segment-id array for queries and keys (as a packed batch gives it)."""
    mask = build(name)[2]
    if mask.q_segment_ids is not None:
        mask = Mask(causal=True, q_segment_ids=mask.q_segment_ids, kv_segment_ids=mask.q_segment_ids)
    return mask


def _inputs(kv_heads, gate, seed=0, l=L):
    """``(float64 q, k, v, beta, log_decay), (jax q, k, v, beta), gate kwargs``."""
    (qn, kn, vn), (q, k, v) = qkv(l, l, kv_heads=kv_heads, value_dim=8, seed=seed)
    rng = np.random.default_rng(seed + 100)
    beta = 1 / (1 + np.exp(-rng.standard_normal((B, l, kv_heads))))
    log_decay, kwargs = None, {}
    if gate == "fixed":
        decay = np.linspace(0.7, 0.95, kv_heads)
        log_decay, kwargs = np.broadcast_to(np.log(decay), (B, l, kv_heads)), {"decay": jnp.asarray(decay, jnp.float32)}
    elif gate == "data":
        log_decay = -np.logaddexp(0, rng.standard_normal((B, l, kv_heads)) - 1)  # -softplus
        kwargs = {"log_decay": jnp.asarray(log_decay, jnp.float32)}
    return (qn, kn, vn, beta, log_decay), (q, k, v, jnp.asarray(beta, jnp.float32)), kwargs


def _reference(name, qn, kn, vn, beta, log_decay, return_state=False):
    mask = _mask(name)
    seg = None if mask.q_segment_ids is None else np.asarray(mask.q_segment_ids)
    valid = None if mask.kv_valid is None else np.asarray(mask.kv_valid)
    return reference.delta_rule_attention(qn, kn, vn, beta, log_decay, seg, valid, return_state)


@pytest.fixture(scope="module")
def delta_fn():
    return jax.jit(delta_attention, static_argnames=("block_size", "return_state", "impl"))


@pytest.mark.parametrize("gate,kv_heads", [("none", 4), ("fixed", 2), ("data", 2), ("data", 1)],
                         ids=["mha", "fixed-gqa", "data-gqa", "data-mqa"])
@pytest.mark.parametrize("name", CASES)
def test_matches_recurrent_reference(delta_fn, name, gate, kv_heads):
    arrays, (q, k, v, beta), kwargs = _inputs(kv_heads, gate, seed=kv_heads)
    out = delta_fn(q, k, v, beta, mask=_mask(name), block_size=8, **kwargs)
    np.testing.assert_allclose(out, _reference(name, *arrays), **TOL)


@pytest.mark.parametrize("name", ["causal", "segments_causal"])
def test_block_size_does_not_change_the_result(delta_fn, name):
    _, (q, k, v, beta), kwargs = _inputs(2, "data")
    outs = [delta_fn(q, k, v, beta, mask=_mask(name), block_size=c, **kwargs) for c in (3, 16, 64)]
    for out in outs[1:]:
        np.testing.assert_allclose(out, outs[0], **TOL)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("name", ["causal_kv_valid", "segments_causal"])
def test_grads_match_finite_differences(delta_fn, name, impl):
    """Gradients of q, k, v, beta and the log decay; ``pallas``: the backward kernel (interpret mode)."""
    arrays, (q, k, v, beta), kwargs = _inputs(2, "data", seed=11)
    rng = np.random.default_rng(13)
    w = rng.standard_normal((B, L, 4, 8))
    mask = _mask(name)
    block = 8 if impl == "xla" else 16
    loss = lambda q, k, v, beta, a: jnp.sum(
        delta_fn(q, k, v, beta, mask=mask, block_size=block, log_decay=a, impl=impl) * w)
    grads = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, beta, kwargs["log_decay"])
    check_grads_by_finite_differences(grads, list(arrays), lambda *a: (_reference(name, *a) * w).sum(), rng)


@pytest.mark.parametrize("gate", ["fixed", "data"])
def test_step_after_prefill_continues_the_parallel_form(delta_fn, gate):
    """The state of the first t positions (``return_state``), then `delta_step` through the rest (padding
    included): every output equals the parallel form's."""
    mask = _mask("causal_kv_valid")
    _, (q, k, v, beta), kwargs = _inputs(2, gate, seed=5)
    want = delta_fn(q, k, v, beta, mask=mask, block_size=8, **kwargs)
    t = 20
    head = {"decay": kwargs["decay"]} if gate == "fixed" else {"log_decay": kwargs["log_decay"][:, :t]}
    prefix = Mask(causal=True, kv_valid=mask.kv_valid[:, :t])
    out, state = delta_fn(q[:, :t], k[:, :t], v[:, :t], beta[:, :t], mask=prefix, block_size=8, return_state=True,
                          **head)
    np.testing.assert_allclose(out, want[:, :t], **TOL)

    @jax.jit
    def steps(state, xs):
        def body(state, x):
            q_t, k_t, v_t, beta_t, valid_t, a_t = x
            one = {"decay": kwargs["decay"]} if gate == "fixed" else {"log_decay": a_t}
            out, state = delta_step(state, q_t, k_t, v_t, beta_t, valid=valid_t, **one)
            return state, out
        return jax.lax.scan(body, state, xs)[1].swapaxes(0, 1)

    a = kwargs.get("log_decay", jnp.zeros((B, L, 2)))
    got = steps(state, tuple(x[:, t:].swapaxes(0, 1) for x in (q, k, v, beta, mask.kv_valid, a)))
    np.testing.assert_allclose(got, want[:, t:], **TOL)


def test_steps_from_the_empty_state_equal_the_reference():
    arrays, (q, k, v, beta), _ = _inputs(2, "none", seed=9, l=6)
    state, outs = delta_init_state(B, 2, 16, 8), []
    for t in range(6):
        out, state = delta_step(state, q[:, t], k[:, t], v[:, t], beta[:, t])
        outs.append(out)
    np.testing.assert_allclose(jnp.stack(outs, 1), reference.delta_rule_attention(*arrays[:4]), **TOL)


@pytest.mark.parametrize("gate", ["none", "data"])
def test_groups_of_one_block_match_the_reference(monkeypatch, gate):
    """With one block per group (on CPU `blocks_per_span` sizes groups by their states; these tiny shapes fit all at
    once), the scan over groups carries the state across group boundaries, segments and padding included."""
    monkeypatch.setitem(common.SPAN_BYTES, jax.default_backend(), 1)
    arrays, (q, k, v, beta), kwargs = _inputs(2, gate, seed=4)
    out = jax.jit(lambda *x: delta_attention(*x, mask=_mask("segments_causal"), block_size=4, **kwargs))(q, k, v, beta)
    np.testing.assert_allclose(out, _reference("segments_causal", *arrays), **TOL)


@pytest.mark.parametrize("c", [1, 3, 16, 37, 64])
def test_unit_lower_inverse_matches_numpy(c):
    """The block system's inverse by recursive doubling against float64 `np.linalg.inv`, for sizes that are and
    are not powers of two."""
    a = np.tril(np.random.default_rng(c).uniform(-1, 1, (2, 3, c, c)), -1)
    want = np.linalg.inv(np.eye(c) + a)
    got = unit_lower_inverse(jnp.asarray(a, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_no_lapack_triangular_solve():
    """The chunk form and its gradient use matmuls only: LAPACK's trsm, run twice at once on XLA:CPU's thread pool,
    deadlocks (jaxlib 0.10; train.py on gpt-tiny-deltanet.yaml hung in both of two starts)."""
    (q, k, v, beta), kwargs = _inputs(2, "data")[1:]
    grad = jax.grad(lambda *x: delta_attention(*x, **kwargs).sum(), (0, 1, 2, 3))
    assert "triangular_solve" not in str(jax.make_jaxpr(grad)(q, k, v, beta))


def test_long_sequences_stay_finite():
    """4096 positions with strong decay (cumulative log decay -12000) and full-strength writes: every output is finite
    and the last rows equal the reference run over their last 64 positions (the state before is decayed away)."""
    l = 4096
    arrays, (q, k, v, beta), _ = _inputs(2, "none", seed=21, l=l)
    log_decay = np.full((B, l, 2), -3.0)
    out = jax.jit(lambda *x: delta_attention(*x, log_decay=log_decay))(q, k, v, beta)
    assert np.isfinite(out).all()
    want = reference.delta_rule_attention(*(x[:, -64:] for x in arrays[:4]), log_decay[:, -64:])
    np.testing.assert_allclose(out[:, -32:], want[:, -32:], **TOL)


@pytest.mark.parametrize("impl,block", [("xla", 4), ("xla", 64), ("pallas", 16)])
def test_a_segment_id_that_comes_back_starts_a_new_segment(delta_fn, impl, block):
    """[0]*6 + [1]*10 + [0]*12 + ...: the third run restarts the state although its id came before, whatever the
    block size; the reference restarts wherever the id changes. A log decay of -inf (a decay of 0) on the way is
    floored, not NaN."""
    arrays, (q, k, v, beta), kwargs = _inputs(2, "data", seed=51)
    seg = np.array([[0] * 6 + [1] * 10 + [0] * 12 + [2] * 9, [5] * 3 + [3] * 17 + [5] * 17])
    log_decay = np.array(arrays[4])
    log_decay[:, 30] = -np.inf
    mask = Mask(causal=True, q_segment_ids=jnp.asarray(seg), kv_segment_ids=jnp.asarray(seg))
    out = delta_fn(q, k, v, beta, mask=mask, block_size=block, impl=impl,
                   log_decay=jnp.asarray(log_decay, jnp.float32))
    want = reference.delta_rule_attention(*arrays[:4], log_decay, seg)
    np.testing.assert_allclose(out, want, **TOL)


def test_bfloat16_inputs_compute_in_float32(delta_fn):
    arrays, (q, k, v, beta), _ = _inputs(2, "none")
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    out = delta_fn(q, k, v, beta, block_size=8)
    assert out.dtype == jnp.bfloat16
    want = reference.delta_rule_attention(*(np.asarray(x, np.float64) for x in (q, k, v)), arrays[3])
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(beta=jnp.full((B, 5, 3), 0.5)), r"beta must have shape \[batch, length, kv_heads\] = \[2, 5, 2\]"),
    (dict(beta=jnp.full((B, 5, 2), 2.5)), r"beta must be in \[0, 2\]"),
    (dict(decay=jnp.array([0.9, 1.5])), r"decay must be in \(0, 1\]"),
    (dict(log_decay=jnp.full((B, 5, 2), 0.1)), r"log_decay must be <= 0"),
    (dict(mask=Mask()), "needs a causal mask"),
    (dict(mask=Mask(prefix_lengths=jnp.array([2, 2]))), "without prefix_lengths"),
    (dict(mask=Mask(causal=True, window=3)), "without prefix_lengths, window"),
    (dict(mask=Mask(causal=True, q_segment_ids=jnp.zeros((B, 5), int), kv_segment_ids=jnp.ones((B, 5), int))),
     "delta_attention needs kv_segment_ids equal to q_segment_ids"),
    (dict(block_size=0), "block_size must be a positive int"),
])
def test_bad_input_raises(kwargs, match):
    _, (q, k, v) = qkv(5, 5, kv_heads=2)
    kwargs.setdefault("beta", jnp.full((B, 5, 2), 0.5))
    with pytest.raises(ValueError, match=match):
        delta_attention(q, k, v, **kwargs)


def test_bad_step_input_raises():
    state = delta_init_state(2, 2, 16, 16)
    one = (jnp.zeros((2, 4, 16)), jnp.zeros((2, 2, 16)), jnp.zeros((2, 2, 16)))
    with pytest.raises(ValueError, match=r"state must have shape \[batch, kv_heads, head_dim, value_dim\]"):
        delta_step(delta_init_state(2, 2, 16, 8), *one, jnp.full((2, 2), 0.5))
    with pytest.raises(ValueError, match=r"beta must have shape"):
        delta_step(state, *one, jnp.full((2, 3), 0.5))
    with pytest.raises(ValueError, match=r"log_decay of one position must have shape \[batch, kv_heads\] = \[2, 2\]"):
        delta_step(state, *one, jnp.full((2, 2), 0.5), log_decay=jnp.zeros((2, 5, 2)))


# -- impl='pallas': the Pallas kernels (interpret mode here) -------------------------------------------------------
@pytest.mark.parametrize("gate,kv_heads", [("none", 4), ("fixed", 2), ("data", 1)],
                         ids=["mha", "fixed-gqa", "data-mqa"])
@pytest.mark.parametrize("name", CASES)
def test_pallas_matches_recurrent_reference(delta_fn, name, gate, kv_heads):
    """Blocks of 16: 37 positions make 3 blocks, the last one padded; segment boundaries inside and across blocks."""
    arrays, (q, k, v, beta), kwargs = _inputs(kv_heads, gate, seed=kv_heads)
    out = delta_fn(q, k, v, beta, mask=_mask(name), block_size=16, impl="pallas", **kwargs)
    np.testing.assert_allclose(out, _reference(name, *arrays), **TOL)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("name", CASES)
def test_final_state_matches_the_reference(delta_fn, name, impl):
    """``return_state``: the states after the last position, those of the last segment. 37 positions in blocks of
    16: the last block is padded inside, which must not start a segment of its own."""
    arrays, (q, k, v, beta), kwargs = _inputs(2, "data", seed=41)
    out, state = delta_fn(q, k, v, beta, mask=_mask(name), block_size=16, return_state=True, impl=impl, **kwargs)
    want_out, want_state = _reference(name, *arrays, return_state=True)
    np.testing.assert_allclose(out, want_out, **TOL)
    np.testing.assert_allclose(state, want_state, **TOL)


@pytest.mark.parametrize("name,gate,kv_heads", [("causal_kv_valid", "data", 2), ("segments_causal", "data", 2),
                                               ("causal", "none", 4), ("segments_causal", "fixed", 1)])
def test_pallas_grads_equal_the_xla_form(delta_fn, name, gate, kv_heads):
    """Gradients through the backward kernel, of the outputs and the final state, equal the XLA form's (a fixed
    decay's through its log)."""
    _, (q, k, v, beta), kwargs = _inputs(kv_heads, gate, seed=21)
    mask = _mask(name)
    w = jnp.asarray(np.random.default_rng(22).standard_normal((B, L, 4, 8)), jnp.float32)
    ws = jnp.asarray(np.random.default_rng(23).standard_normal((B, kv_heads, 16, 8)), jnp.float32)
    (gate_name, gate_value), = kwargs.items() if kwargs else [(None, jnp.zeros(()))]

    def loss(q, k, v, beta, a, impl):
        out, state = delta_fn(q, k, v, beta, mask=mask, block_size=16, return_state=True, impl=impl,
                              **({} if gate_name is None else {gate_name: a}))
        return jnp.sum(out * w) + jnp.sum(state * ws), (out, state)

    results = {impl: jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(q, k, v, beta, gate_value, impl)
               for impl in ("pallas", "xla")}
    (grads, (out, state)), (grads_x, (out_x, state_x)) = results["pallas"], results["xla"]
    for got, want in zip((out, state) + grads, (out_x, state_x) + grads_x):
        np.testing.assert_allclose(got, want, **TOL)


def test_pallas_many_blocks_with_segments_across_them(delta_fn):
    """150 positions in blocks of 16 (9 and a padded tenth), MQA (one state walk per kv head serves four query
    heads), data decay, runs that span several blocks, fill one exactly, start on a block's first position or end
    on its last, a run of one position and a block holding three runs: the reference's outputs and final state, the
    XLA form's gradients."""
    l = 150
    seg = np.array([[0] * 5 + [1] + [2] * 42 + [3] * 16 + [4] * 3 + [5] * 7 + [6] * 76, [7] * 64 + [8] * 80 + [9] * 6])
    arrays, (q, k, v, beta), kwargs = _inputs(1, "data", seed=61, l=l)
    mask = Mask(causal=True, q_segment_ids=jnp.asarray(seg), kv_segment_ids=jnp.asarray(seg))
    rng = np.random.default_rng(62)
    w, ws = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((B, l, 4, 8), (B, 1, 16, 8)))

    def loss(q, k, v, beta, a, impl):
        out, state = delta_fn(q, k, v, beta, mask=mask, block_size=16, return_state=True, impl=impl, log_decay=a)
        return jnp.sum(out * w) + jnp.sum(state * ws), (out, state)

    grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)
    (grads, (out, state)), (grads_x, _) = (grad(q, k, v, beta, kwargs["log_decay"], impl) for impl in ("pallas", "xla"))
    want_out, want_state = reference.delta_rule_attention(*arrays, seg, None, True)
    np.testing.assert_allclose(out, want_out, **TOL)
    np.testing.assert_allclose(state, want_state, **TOL)
    for got, want in zip(grads, grads_x):
        np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("blocks", [dict(block=16, block_v=16), dict(block=128, block_v=64)])
def test_pallas_value_tiles(blocks):
    """A value dim of 32 in two tiles of 16 (the backward sums their shares of dq, dk, dbeta and the decay's
    gradient), and blocks of 128 clipped to 64: the XLA form's outputs, state and gradients."""
    _, (q, k, _, beta), kwargs = _inputs(2, "data", seed=31)
    v = jnp.asarray(np.random.default_rng(32).standard_normal((B, L, 2, 32)), jnp.float32)
    seg = _mask("segments_causal").q_segment_ids
    w = jnp.asarray(np.random.default_rng(33).standard_normal((B, L, 2, 2, 32)), jnp.float32)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)

    def loss(q, k, v, beta, a, fn):
        out, state = fn(unit(q.reshape(B, L, 2, 2, 16)), unit(k), v, beta, a)
        return jnp.sum(out * w) + jnp.sum(state), (out, state)

    pallas = lambda *x: pallas_delta(*x[:4], seg, x[4], **blocks)
    xla = lambda *x: delta_blocks(*x, run_ids(seg), 16)
    args = (q, k, v, beta, kwargs["log_decay"])
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True), static_argnums=5)  # eager: 3x the time
    (grads, sums), (grads_x, sums_x) = (grad(*args, fn) for fn in (pallas, xla))
    for got, want in zip(sums + grads, sums_x + grads_x):
        np.testing.assert_allclose(got, want, **TOL)


def test_pallas_lowers_to_triton():
    """Every kernel lowers through the Pallas Triton backend (to TTIR; compiling them needs a GPU), segments and
    decay included: three Triton calls for the values (the blocks' systems in parallel, the state pass, the outputs
    in parallel) and three for the gradients (the queries' share in parallel, the pass carrying the state's
    cotangent, the blocks' systems in parallel)."""
    _, (q, k, v, beta), kwargs = _inputs(2, "data")
    seg = _mask("segments_causal").q_segment_ids
    loss = lambda q, k: jnp.sum(pallas_delta(q, k, v, beta, seg, kwargs["log_decay"], interpret=False)[0])
    # the value too: from jax 0.12 a kernel whose outputs the gradient alone does not need is dropped (DCE)
    text = lower_for_gpu(jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), q.reshape(B, L, 2, 2, 16), k)
    assert text.count("xla.gpu.triton") == 6
    warps = {name: w for name, (_, w) in triton_launches(text).items()}
    # 4 warps by the width rule (16 columns) but where the offline sm_90 compile spilled less at another count
    assert warps == {"delta_rule_blocks": 4, "delta_rule_states": 4, "delta_rule_output": 4,
                     "delta_rule_backward_queries": 8, "delta_rule_backward_states": 8, "delta_rule_backward_blocks": 8}


def test_pallas_empty_sequence():
    out, state = pallas_delta(jnp.zeros((B, 0, 2, 2, 16)), jnp.zeros((B, 0, 2, 16)), jnp.zeros((B, 0, 2, 8)),
                              jnp.zeros((B, 0, 2)), None, None)
    assert out.shape == (B, 0, 2, 2, 8) and state.shape == (B, 2, 16, 8) and not state.any()


def test_delta_impl_choice_and_errors():
    assert delta_impl("auto", 64, backend="gpu") == "pallas"
    assert delta_impl("auto", 64, backend="cpu") == delta_impl("auto", 24, backend="gpu") == "xla"
    assert delta_impl("pallas", 16, backend="cpu") == "pallas"
    with pytest.raises(ValueError, match=r"impl must be one of \('auto', 'xla', 'pallas'\) for delta_attention"):
        delta_impl("flash", 64)
    with pytest.raises(ValueError, match="impl='pallas' cannot compute this call: block_size=24"):
        delta_impl("pallas", 24, backend="gpu")
    with pytest.raises(ValueError, match="Triton"):
        delta_impl("pallas", 64, backend="tpu")
