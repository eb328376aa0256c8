"""softmax_attention: every impl x every mask kind x MHA/GQA/MQA against the float64 reference, gradients, bias,
dropout, invariances, low precision, impl choice, and the documented errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from cases import B, MASK_CASES, build, check_grads_by_finite_differences, qkv
from flaxformer_lite.attention import Mask, attend_scores, softmax_attention
from flaxformer_lite.attention.softmax.blockwise import _Plan, _static_tiles, blockwise_attention
from flaxformer_lite.attention.checks import Dims, check_qkv
from flaxformer_lite.attention.dropout import dropout_seed, keep_mask
from flaxformer_lite.attention.softmax.dense import cudnn_unsupported
from flaxformer_lite.attention.softmax.dispatch import (AUTO_BLOCKWISE_MIN_LOGITS, AUTO_BLOCKWISE_MIN_LOGITS_DEFAULT,
                                                        _flash_route, choose_impl)

# "blockwise_small" uses 8 x 16 tiles: many tiles, ragged edges, skipped tiles. "blockwise_static" is the same with
# the accelerators' static tile visit (no data-dependent loop or conditional), forced here on the CPU.
IMPLS = ["reference", "xla", "blockwise", "blockwise_small", "blockwise_static"]  # "auto" resolves to the first four
DENSE_AND_CPU = IMPLS[:4]  # the static visit shares every line but the tile list: its own tests are the GQA grid below
TOL = dict(rtol=1e-5, atol=1e-5)


@jax.jit
def _blockwise_static(q, k, v, mask):
    dims = check_qkv(q, k, v)
    k, v = mask.zero_invalid_keys(k, v)  # as softmax_attention does for every impl
    return blockwise_attention(q, k, v, dims=dims, mask=mask, bias=None, scale=dims.head_dim ** -0.5, block_q=8,
                               block_kv=16, static=True)


def run(fn, impl, q, k, v, **kw):
    if impl == "blockwise_small":
        return fn(q, k, v, impl="blockwise", block_q=8, block_kv=16, **kw)
    if impl == "blockwise_static":
        return _blockwise_static(q, k, v, kw.pop("mask"), **kw)
    return fn(q, k, v, impl=impl, **kw)


# Every mask with grouped heads (GQA: the general case); MHA and MQA, the two ends of the grouping, on the masks
# whose tiles differ most (dense causal, packed segments, cross-attention with padding). Full grid: 144 compiles.
HEAD_CASES = ([("gqa", 2, name) for name in sorted(MASK_CASES)]
              + [(ids, n, name) for ids, n in (("mha", 4), ("mqa", 1))
                 for name in ("causal", "segments_causal", "cross_padding")])


GRID = [(impl, *case) for impl in IMPLS for case in HEAD_CASES if impl != "blockwise_static" or case[0] == "gqa"]


@pytest.mark.parametrize("impl,heads,kv_heads,name", GRID, ids=[f"{i}-{h}-{n}" for i, h, _, n in GRID])
def test_matches_reference(softmax_fn, impl, heads, kv_heads, name):
    lq, lk, mask, dense = build(name)
    (qn, kn, vn), (q, k, v) = qkv(lq, lk, kv_heads=kv_heads, seed=kv_heads)
    out = run(softmax_fn, impl, q, k, v, mask=mask)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(out, reference.softmax_attention(qn, kn, vn, dense), **TOL)


@pytest.mark.parametrize("impl", ["reference", "xla", "blockwise_small"])
def test_value_dim_may_differ(softmax_fn, impl):
    lq, lk, mask, dense = build("causal")
    (qn, kn, vn), (q, k, v) = qkv(lq, lk, value_dim=24)
    out = run(softmax_fn, impl, q, k, v, mask=mask)
    assert out.shape == (B, lq, 4, 24)
    np.testing.assert_allclose(out, reference.softmax_attention(qn, kn, vn, dense), **TOL)


def _loss_grads(fn, impl, q, k, v, w, **kw):
    return jax.grad(lambda q, k, v: jnp.sum(run(fn, impl, q, k, v, **kw) * w), argnums=(0, 1, 2))(q, k, v)


GRAD_CASES = ["none", "causal", "prefix_padding", "segments_causal", "kv_lengths", "kv_valid", "cross_causal_offset",
              "window_segments"]


@pytest.mark.parametrize("name", GRAD_CASES)
def test_blockwise_grads_match_reference_autodiff(softmax_fn, name):
    lq, lk, mask, _ = build(name)
    _, (q, k, v) = qkv(lq, lk, seed=3)
    w = jnp.asarray(np.random.default_rng(4).standard_normal(q.shape), jnp.float32)
    want = _loss_grads(softmax_fn, "reference", q, k, v, w, mask=mask)
    for impl in ("blockwise_small", "blockwise_static"):
        got = _loss_grads(softmax_fn, impl, q, k, v, w, mask=mask)
        for g, r in zip(got, want):
            assert np.isfinite(g).all()
            np.testing.assert_allclose(g, r, **TOL)


@pytest.mark.parametrize("name", ["causal", "segments_causal", "prefix_padding", "window"])
def test_blockwise_static_has_no_data_dependent_control_flow(name):
    """On accelerators the blockwise loops have static trip counts and no conditional (each would sync the host)."""
    lq, lk, mask, _ = build(name)
    _, (q, k, v) = qkv(lq, lk)
    grad = jax.grad(lambda q, k, v: jnp.sum(_blockwise_static(q, k, v, mask)), argnums=(0, 1, 2))
    text = str(jax.make_jaxpr(grad)(q, k, v))
    assert "while[" not in text and "cond[" not in text and "scan[" in text
    dynamic = str(jax.make_jaxpr(lambda q, k, v: softmax_attention(q, k, v, mask=mask, impl="blockwise", block_q=8,
                                                                   block_kv=16))(q, k, v))
    assert "while[" in text or "while[" in dynamic  # the CPU's default visit does use data-dependent bounds


@pytest.mark.parametrize("bq,bk,window", [(8, 16, 6), (8, 8, 1), (16, 8, 20), (8, 16, 40)])
def test_blockwise_static_tiles_are_the_band(bq, bk, window):
    """The static visit of a windowed causal mask goes through exactly the tiles holding a visible pair: none left
    of the band, none above the diagonal (the skip is known at trace time)."""
    l = 37
    plan = _Plan(1.0, bq, bk, -(-l // bq), -(-l // bk), l, 1, 0.0, skip_empty=False, static=True,
                 lower_triangle=True, window=window)
    dense = reference.dense_mask(1, plan.nq * bq, plan.nk * bk, causal=True, window=window)[0]
    live = {(i, j) for i in range(plan.nq) for j in range(plan.nk)
            if dense[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk].any()}
    for by_key in (False, True):
        assert set(zip(*map(list, _static_tiles(plan, by_key)))) == live


@pytest.mark.parametrize("impl", ["blockwise", "blockwise_static", "flash"])
@pytest.mark.parametrize("offset", [None, 3])
def test_blockwise_skips_tiles_left_of_the_window(softmax_fn, impl, offset):
    """NaN planted in keys and values left of every later row's band: a visited tile would spread it (0 * nan), so
    finite rows prove those tiles are skipped (by the loop bounds, or by the static tile list without q_offset)."""
    if impl == "blockwise_static" and offset is not None:
        pytest.skip("with q_offset the static visit goes through every tile, masked inside")
    # keys 0..7 lie in key block 0 (16 keys); rows from 32 on see keys from 29 on (a window of 4), in later blocks
    mask = Mask(causal=True, window=4, q_offset=None if offset is None else jnp.asarray(offset))
    _, (q, k, v) = qkv(64, 64 + (offset or 0))
    left = jnp.arange(k.shape[1])[None, :, None, None] < 8
    kp, vp = jnp.where(left, jnp.nan, k), jnp.where(left, jnp.nan, v)
    if impl == "flash":
        attend = lambda q, k, v: softmax_fn(q, k, v, mask=mask, impl="flash", block_q=16, block_kv=16)
    else:
        attend = lambda q, k, v: run(softmax_fn, impl if impl == "blockwise_static" else "blockwise_small", q, k, v,
                                     mask=mask)
    out, out_p = np.asarray(attend(q, k, v)), np.asarray(attend(q, kp, vp))
    assert np.isfinite(out_p[:, 32:]).all()
    np.testing.assert_array_equal(out_p[:, 32:], out[:, 32:])
    w = (jnp.arange(64) >= 32)[None, :, None, None].astype(jnp.float32)  # backward: dq of the late rows only
    dq = jax.grad(lambda q: jnp.sum(jnp.nan_to_num(attend(q, kp, vp) * w)))(q)
    assert np.isfinite(np.asarray(dq)[:, 32:]).all()


@pytest.mark.parametrize("impl", ["reference", "xla", "blockwise_small"])
@pytest.mark.parametrize("name", ["causal", "segments_causal", "kv_lengths"])
def test_grads_match_finite_differences(softmax_fn, impl, name):
    """Directional derivatives of the float64 reference, independent of JAX autodiff."""
    lq, lk, mask, dense = build(name)
    arrays, jax_arrays = qkv(lq, lk, seed=5)
    rng = np.random.default_rng(6)
    w = rng.standard_normal((B, lq, 4, 16))
    grads = _loss_grads(softmax_fn, impl, *jax_arrays, jnp.asarray(w, jnp.float32), mask=mask)
    check_grads_by_finite_differences(grads, arrays, lambda *a: (reference.softmax_attention(*a, dense) * w).sum(),
                                      rng)


@pytest.mark.parametrize("bias_shape", [(1, 4, 37, 37), (B, 1, 1, 37), (4, 37, 37), (B, 4, 1, 37)])
@pytest.mark.parametrize("impl", ["reference", "xla", "blockwise_small"])
def test_bias(softmax_fn, impl, bias_shape):
    lq, lk, mask, dense = build("causal")
    (qn, kn, vn), (q, k, v) = qkv(lq, lk, seed=8)
    bias_np = np.random.default_rng(9).standard_normal(bias_shape)
    bias = jnp.asarray(bias_np, jnp.float32)
    out = run(softmax_fn, impl, q, k, v, mask=mask, bias=bias)
    ref_bias = bias_np.reshape((1,) * (4 - bias_np.ndim) + bias_np.shape)
    np.testing.assert_allclose(out, reference.softmax_attention(qn, kn, vn, dense, bias=ref_bias), **TOL)
    w = jnp.asarray(np.random.default_rng(10).standard_normal(q.shape), jnp.float32)
    loss = lambda impl: jax.grad(lambda b: jnp.sum(run(softmax_fn, impl, q, k, v, mask=mask, bias=b) * w))(bias)
    np.testing.assert_allclose(loss(impl), loss("reference"), **TOL)


def test_scale_argument(softmax_fn):
    lq, lk, mask, dense = build("causal")
    (qn, kn, vn), (q, k, v) = qkv(lq, lk)
    for impl in ["reference", "xla", "blockwise_small"]:
        out = run(softmax_fn, impl, q, k, v, mask=mask, scale=0.5)
        np.testing.assert_allclose(out, reference.softmax_attention(qn, kn, vn, dense, scale=0.5), **TOL)


class TestDropout:
    rate = 0.3

    def test_reference_applies_the_keep_mask(self, softmax_fn):
        lq, lk, mask, dense = build("causal")
        (qn, kn, vn), (q, k, v) = qkv(lq, lk)
        rng = jax.random.key(0)
        out = softmax_fn(q, k, v, mask=mask, impl="reference", dropout_rate=self.rate, dropout_rng=rng)
        keep = keep_mask(dropout_seed(rng), self.rate, jnp.arange(B)[:, None, None, None],
                         jnp.arange(4)[:, None, None], jnp.arange(lq)[:, None], jnp.arange(lk))
        want = reference.softmax_attention(qn, kn, vn, dense, keep=np.asarray(keep), rate=self.rate)
        np.testing.assert_allclose(out, want, **TOL)

    @pytest.mark.parametrize("name", ["causal", "segments_causal", "cross_padding"])
    def test_blockwise_drops_the_same_entries(self, softmax_fn, name):
        lq, lk, mask, _ = build(name)
        _, (q, k, v) = qkv(lq, lk, seed=2)
        kw = dict(mask=mask, dropout_rate=self.rate, dropout_rng=jax.random.key(3))
        np.testing.assert_allclose(run(softmax_fn, "blockwise_small", q, k, v, **kw),
                                   run(softmax_fn, "reference", q, k, v, **kw), **TOL)
        w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
        for g, r in zip(_loss_grads(softmax_fn, "blockwise_small", q, k, v, w, **kw),
                        _loss_grads(softmax_fn, "reference", q, k, v, w, **kw)):
            np.testing.assert_allclose(g, r, **TOL)

    def test_keep_rate_and_seed_dependence(self):
        seed = dropout_seed(jax.random.key(0))
        idx = (jnp.arange(4)[:, None, None, None], jnp.arange(8)[:, None, None], jnp.arange(128)[:, None],
               jnp.arange(256))
        keep = np.asarray(keep_mask(seed, self.rate, *idx))
        assert abs(keep.mean() - (1 - self.rate)) < 0.005
        other = np.asarray(keep_mask(dropout_seed(jax.random.key(1)), self.rate, *idx))
        assert 0.3 < (keep == other).mean() < 0.7  # independent draws agree ~ p^2 + (1-p)^2 = 0.58 of the time

    def test_xla_falls_back_and_agrees(self, softmax_fn):
        lq, lk, mask, _ = build("causal")
        _, (q, k, v) = qkv(lq, lk)
        kw = dict(mask=mask, dropout_rate=self.rate, dropout_rng=jax.random.key(5))
        np.testing.assert_allclose(softmax_fn(q, k, v, impl="xla", **kw),
                                   softmax_fn(q, k, v, impl="reference", **kw), **TOL)


@pytest.mark.parametrize("impl", DENSE_AND_CPU)
def test_future_keys_do_not_change_past_outputs(softmax_fn, impl):
    lq, lk, mask, _ = build("causal")
    _, (q, k, v) = qkv(lq, lk)
    t = 20
    noise = jnp.asarray(np.random.default_rng(1).standard_normal(k.shape), jnp.float32) * 10
    later = jnp.arange(lk)[None, :, None, None] >= t
    out = run(softmax_fn, impl, q, k, v, mask=mask)
    out2 = run(softmax_fn, impl, q, jnp.where(later, k + noise, k), jnp.where(later, v + noise, v), mask=mask)
    np.testing.assert_allclose(out2[:, :t], out[:, :t], rtol=0, atol=1e-6)
    assert not np.allclose(out2[:, t:], out[:, t:])


@pytest.mark.parametrize("impl", DENSE_AND_CPU)
def test_padded_keys_change_nothing(softmax_fn, impl):
    lq, lk, mask, _ = build("cross_padding")
    _, (q, k, v) = qkv(lq, lk)
    padded = jnp.arange(lk)[None, :, None, None] >= mask.kv_lengths[:, None, None, None]
    noise = jnp.asarray(np.random.default_rng(1).standard_normal(k.shape), jnp.float32) * 10
    out = run(softmax_fn, impl, q, k, v, mask=mask)
    out2 = run(softmax_fn, impl, q, jnp.where(padded, noise, k), jnp.where(padded, noise, v), mask=mask)
    np.testing.assert_allclose(out2, out, rtol=0, atol=1e-6)


# (which inputs get the poison, the poison): NaN or inf planted where the mask hides keys.
POISONS = [("key", np.nan), ("value", np.nan), ("both", np.inf)]


def plant(mask, lk, k, v, which, poison):
    """k, v with ``poison`` at the key positions that ``kv_lengths``/``kv_valid`` hide."""
    hidden = ~mask.kv_valid_mask(lk)[:, :, None, None]
    k = jnp.where(hidden, poison, k) if which in ("key", "both") else k
    v = jnp.where(hidden, poison, v) if which in ("value", "both") else v
    return k, v


@pytest.mark.parametrize("which,poison", POISONS, ids=[p[0] for p in POISONS])
@pytest.mark.parametrize("impl,name", [(i, n) for i in IMPLS for n in ("cross_padding", "causal_kv_valid")
                                       if i != "blockwise_static" or n == "causal_kv_valid"])
def test_nan_in_padded_keys_leaks_nowhere(softmax_fn, impl, name, which, poison):
    """0 * nan = nan: masked logits alone would let a NaN in a padded key or value reach every output row and the
    gradients of the visible inputs. Outputs and gradients must equal the clean run's."""
    lq, lk, mask, _ = build(name)
    _, (q, k, v) = qkv(lq, lk, seed=13)
    kp, vp = plant(mask, lk, k, v, which, poison)
    out, out_p = run(softmax_fn, impl, q, k, v, mask=mask), run(softmax_fn, impl, q, kp, vp, mask=mask)
    assert np.isfinite(out_p).all()
    np.testing.assert_allclose(out_p, out, rtol=0, atol=1e-6)
    w = jnp.asarray(np.random.default_rng(14).standard_normal(q.shape), jnp.float32)
    for g_p, g in zip(_loss_grads(softmax_fn, impl, q, kp, vp, w, mask=mask),
                      _loss_grads(softmax_fn, impl, q, k, v, w, mask=mask)):
        assert np.isfinite(g_p).all()
        np.testing.assert_allclose(g_p, g, rtol=0, atol=1e-6)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs a GPU")
@pytest.mark.parametrize("which,poison", POISONS, ids=[p[0] for p in POISONS])
def test_nan_in_padded_keys_leaks_nowhere_cudnn(which, poison):
    lq, lk, mask, _ = build("cross_padding")
    _, (q, k, v) = qkv(lq, lk, seed=13, dtype=jnp.bfloat16)
    kp, vp = plant(mask, lk, k, v, which, poison)
    f = jax.jit(lambda q, k, v: softmax_attention(q, k, v, mask=mask, impl="cudnn"))
    out_p = np.asarray(f(q, kp, vp), np.float32)
    assert np.isfinite(out_p).all()
    np.testing.assert_allclose(out_p, np.asarray(f(q, k, v), np.float32), rtol=0, atol=1e-6)
    grads = jax.grad(lambda *a: f(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, kp, vp)
    assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in grads)


@pytest.mark.parametrize("which,poison", [("value", np.nan), ("logits", np.nan), ("both", np.inf)])
def test_nan_in_padded_keys_leaks_nowhere_attend_scores(which, poison):
    lq, lk, mask, _ = build("cross_padding")
    _, (q, k, v) = qkv(lq, lk, seed=15)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, jnp.repeat(k, 2, axis=2))
    hidden = ~mask.kv_valid_mask(lk)
    sp = jnp.where(hidden[:, None, None, :], poison, scores) if which != "value" else scores
    vp = jnp.where(hidden[:, :, None, None], poison, v) if which != "logits" else v
    f = jax.jit(lambda s, v: attend_scores(s, v, mask=mask))
    np.testing.assert_allclose(f(sp, vp), f(scores, v), rtol=0, atol=1e-6)
    for g_p, g in zip(jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1))(sp, vp),
                      jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1))(scores, v)):
        assert np.isfinite(g_p).all()
        np.testing.assert_allclose(g_p, g, rtol=0, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_fully_masked_rows_are_zero_with_finite_grads(softmax_fn, impl):
    lq, lk, mask, _ = build("kv_lengths")  # batch row 1 has kv_lengths 0
    _, (q, k, v) = qkv(lq, lk)
    out = run(softmax_fn, impl, q, k, v, mask=mask)
    np.testing.assert_array_equal(out[1], 0.0)
    grads = jax.grad(lambda q, k, v: run(softmax_fn, impl, q, k, v, mask=mask).sum(), argnums=(0, 1, 2))(q, k, v)
    assert all(np.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("impl", DENSE_AND_CPU)
def test_low_precision_huge_logits_stay_finite(softmax_fn, impl, dtype):
    """Logits near +-1e4 (beyond fp16's exp range): statistics must be float32."""
    lq, lk, mask, dense = build("causal")
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, lq, 4, 16)) * 50
    k = rng.standard_normal((B, lk, 2, 16)) * 50
    v = rng.standard_normal((B, lk, 2, 16))
    args = [jnp.asarray(x, dtype) for x in (q, k, v)]
    out = run(softmax_fn, impl, *args, mask=mask)
    assert out.dtype == dtype and np.isfinite(np.asarray(out, np.float32)).all()
    logits = np.einsum("bqhd,bkhd->bhqk", *[np.asarray(a, np.float64) for a in args[:1]],
                       np.repeat(np.asarray(args[1], np.float64), 2, 2)) / 4
    assert np.abs(logits).max() > 5e3
    want = reference.softmax_attention(*[np.asarray(a, np.float64) for a in args], dense)
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=3e-2, rtol=3e-2)


def test_auto_choice():
    dims = lambda l, d=64: Dims(1, l, l, 8, 8, d, d)
    causal = Mask(causal=True)
    assert choose_impl(dims(128), jnp.float32, causal, 0.0, "cpu") == "reference"  # fastest dense path on CPU
    assert choose_impl(dims(128), jnp.bfloat16, causal, 0.0, "cpu") == "reference"  # never a fused kernel off GPU
    assert choose_impl(dims(128), jnp.bfloat16, causal, 0.0, "gpu") == "flash"  # (cuDNN, through flash)
    assert choose_impl(dims(128), jnp.float32, causal, 0.0, "gpu") == "xla"  # fused kernels for bf16/fp16 only
    for backend in ("cpu", "gpu"):
        threshold = AUTO_BLOCKWISE_MIN_LOGITS.get(backend, AUTO_BLOCKWISE_MIN_LOGITS_DEFAULT)
        big, small = int(np.sqrt(threshold / 8)) + 1, int(np.sqrt(threshold / 8)) - 1
        assert choose_impl(dims(big), jnp.float32, causal, 0.0, backend) == "blockwise"
        assert choose_impl(dims(small), jnp.float32, causal, 0.0, backend) == ("reference" if backend == "cpu"
                                                                              else "xla")
    assert choose_impl(Dims(1, 1, 10**6, 8, 8, 64, 64), jnp.float32, causal, 0.0, "cpu") == "reference"  # one row
    seg = jnp.zeros((1, 128), jnp.int32)
    packed = Mask(causal=True, q_segment_ids=seg, kv_segment_ids=seg)  # the GPT task's batches
    assert choose_impl(dims(128), jnp.bfloat16, packed, 0.0, "gpu") == "flash"  # (the Pallas kernels)
    assert choose_impl(dims(128), jnp.float16, Mask(prefix_lengths=jnp.array([3])), 0.0, "gpu") == "flash"
    bias = jnp.zeros((1, 8, 128, 128))
    assert choose_impl(dims(128), jnp.bfloat16, causal, 0.0, "gpu", bias=bias) == "flash"  # cuDNN takes a bias
    assert choose_impl(dims(128), jnp.bfloat16, packed, 0.0, "gpu", bias=bias) == "xla"  # Pallas takes none
    assert choose_impl(dims(128), jnp.bfloat16, packed, 0.1, "gpu") == "reference"  # nor dropout
    assert choose_impl(dims(128), jnp.bfloat16, packed, 0.0, "tpu") == "flash"  # (splash attention)
    assert choose_impl(dims(128), jnp.bfloat16, Mask(prefix_lengths=jnp.array([3])), 0.0, "tpu") == "xla"
    assert choose_impl(Dims(1, 128, 128, 8, 8, 64, 32), jnp.float32, causal, 0.0, "gpu") == "reference"  # dv != d
    assert choose_impl(dims(128), jnp.float32, causal, 0.1, "gpu") == "reference"  # dropout
    assert choose_impl(dims(128), jnp.float32, causal, 0.0, "tpu") == "xla"


def test_flash_routes_to_cudnn_the_pallas_kernels_or_blockwise():
    d = Dims(1, 64, 64, 8, 8, 64, 64)
    seg = jnp.zeros((1, 64), jnp.int32)
    packed = Mask(causal=True, q_segment_ids=seg, kv_segment_ids=seg)
    assert _flash_route(d, jnp.bfloat16, Mask(causal=True), None, 0.0, "gpu") == "cudnn"
    assert _flash_route(d, jnp.bfloat16, packed, None, 0.0, "gpu") == "flash"
    assert _flash_route(d, jnp.float32, Mask(causal=True), None, 0.0, "cpu") == "flash"  # interpret mode
    with pytest.warns(UserWarning, match=r"impl='flash' cannot run this call \(dropout_rate > 0.*'blockwise'"):
        assert _flash_route(d, jnp.bfloat16, packed, None, 0.1, "gpu") == "blockwise"
    assert _flash_route(d, jnp.bfloat16, packed, None, 0.0, "tpu") == "splash"
    window = Mask(causal=True, window=16)
    assert [_flash_route(d, jnp.bfloat16, window, None, 0.0, b) for b in ("gpu", "tpu", "cpu")] == \
        ["cudnn", "splash", "flash"]
    with pytest.warns(UserWarning, match=r"\(the mask field prefix_lengths \(per-example prefixes"):
        assert _flash_route(d, jnp.bfloat16, Mask(prefix_lengths=jnp.array([3])), None, 0.0, "tpu") == "blockwise"


@pytest.mark.parametrize("name,impl", [("segments_causal", "flash"), ("prefix_padding", "pallas")])
def test_flash_through_softmax_attention(softmax_fn, name, impl):
    """impl="flash" and impl="pallas" on the CPU: the Pallas kernels in interpret mode, values and gradients against
    the references (tests/test_flash.py covers every mask kind on the kernels themselves)."""
    lq, lk, mask, dense = build(name)
    (qn, kn, vn), (q, k, v) = qkv(lq, lk, seed=5)
    np.testing.assert_allclose(softmax_fn(q, k, v, mask=mask, impl=impl, block_q=16, block_kv=16),
                               reference.softmax_attention(qn, kn, vn, dense), **TOL)
    w = jnp.asarray(np.random.default_rng(6).standard_normal(q.shape), jnp.float32)
    got = jax.grad(lambda q, k, v: jnp.sum(softmax_fn(q, k, v, mask=mask, impl=impl, block_q=16,
                                                      block_kv=16) * w), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, _loss_grads(softmax_fn, "reference", q, k, v, w, mask=mask)):
        np.testing.assert_allclose(g, r, **TOL)


def test_flash_with_a_bias_falls_back_with_one_warning():
    lq, lk, mask, dense = build("segments_causal")
    (qn, kn, vn), (q, k, v) = qkv(lq, lk, seed=7)
    bias = np.random.default_rng(8).standard_normal((1, 4, lq, lk))
    with pytest.warns(UserWarning, match=r"an additive bias") as caught:
        out = softmax_attention(q, k, v, mask=mask, bias=jnp.asarray(bias, jnp.float32), impl="flash")
    assert len(caught) == 1
    np.testing.assert_allclose(out, reference.softmax_attention(qn, kn, vn, dense, bias=bias), **TOL)


def test_pallas_never_falls_back():
    """impl="pallas" runs our kernels or says why not, naming the impl: no silent route to cuDNN or blockwise."""
    lq, lk, mask, _ = build("segments_causal")
    _, (q, k, v) = qkv(lq, lk, seed=7)
    with pytest.raises(ValueError, match=r"impl='pallas' cannot run this call: an additive bias"):
        softmax_attention(q, k, v, mask=mask, bias=jnp.zeros((1, 4, lq, lk)), impl="pallas")


def test_cudnn_reasons():
    d = Dims(1, 64, 64, 8, 8, 64, 64)
    assert cudnn_unsupported(d, jnp.bfloat16, Mask(causal=True), 0.0, "gpu") is None
    assert cudnn_unsupported(d, jnp.bfloat16, Mask(kv_lengths=jnp.array([3])), 0.0, "gpu") is None
    assert cudnn_unsupported(d, jnp.bfloat16, Mask(causal=True, window=8, kv_lengths=jnp.array([30])), 0.0,
                             "gpu") is None  # local_window_size
    assert "q_offset" in cudnn_unsupported(Dims(1, 1, 64, 8, 8, 64, 64), jnp.bfloat16,
                                           Mask(causal=True, window=8, q_offset=jnp.array(63)), 0.0, "gpu")
    assert "GPU" in cudnn_unsupported(d, jnp.bfloat16, Mask(), 0.0, "cpu")
    assert "bfloat16" in cudnn_unsupported(d, jnp.float32, Mask(), 0.0, "gpu")
    assert "prefix_lengths" in cudnn_unsupported(d, jnp.bfloat16, Mask(prefix_lengths=jnp.array([3])), 0.0, "gpu")
    assert "lq != lk" in cudnn_unsupported(Dims(1, 1, 64, 8, 8, 64, 64), jnp.bfloat16, Mask(causal=True), 0.0, "gpu")
    assert "head dim" in cudnn_unsupported(Dims(1, 64, 64, 8, 8, 60, 60), jnp.bfloat16, Mask(), 0.0, "gpu")
    assert "dropout" in cudnn_unsupported(d, jnp.bfloat16, Mask(), 0.1, "gpu")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs a GPU")
@pytest.mark.parametrize("padded", [False, True])
def test_cudnn_window_matches_reference(padded):
    """A sliding window as cuDNN's local_window_size (its sliding_window_length = window), alone and with key
    padding (PADDING_CAUSAL; rows whose window holds only padding are zero), against the float64 reference."""
    lq, lk, mask, dense = build("window")
    if not padded:
        mask, dense = Mask(causal=True, window=mask.window), reference.dense_mask(B, lq, lk, causal=True, window=6)
    (qn, kn, vn), (q, k, v) = qkv(lq, lk, dtype=jnp.bfloat16)
    out = jax.jit(lambda q, k, v: softmax_attention(q, k, v, mask=mask, impl="cudnn"))(q, k, v)
    want = reference.softmax_attention(*[np.asarray(x, np.float64) for x in (q, k, v)], dense)
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU error")
def test_cudnn_on_cpu_raises():
    _, (q, k, v) = qkv(8, 8, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="cudnn.*GPU"):
        softmax_attention(q, k, v, impl="cudnn")


@pytest.mark.parametrize("kwargs,match", [
    (dict(q=np.zeros((2, 3, 4))), "q must have shape"),
    (dict(q=np.zeros((2, 3, 4, 8), np.int32)), "floating"),
    (dict(k=np.zeros((3, 5, 2, 8))), "batch"),
    (dict(k=np.zeros((2, 5, 2, 4)), v=np.zeros((2, 5, 2, 4))), "head_dim"),
    (dict(k=np.zeros((2, 5, 3, 8)), v=np.zeros((2, 5, 3, 8))), "multiple of kv heads"),
    (dict(v=np.zeros((2, 6, 2, 8))), "v must match k"),
    (dict(impl="fused"), "impl must be one of"),
    (dict(bias=np.zeros((2, 4, 3, 4))), "bias shape"),
    (dict(bias=np.zeros((1, 1, 2, 4, 3, 5))), "bias must be broadcastable"),
    (dict(dropout_rate=1.0, dropout_rng=jax.random.key(0)), "dropout_rate"),
    (dict(dropout_rate=0.1), "dropout_rng"),
    (dict(mask=np.ones((2, 3, 5), bool)), "must be a flaxformer_lite Mask"),
    (dict(mask=Mask(kv_lengths=np.array([1, 2, 3]))), "mask batch size"),
    (dict(mask=Mask(kv_valid=np.ones((2, 4), bool))), "key length"),
    (dict(scale=jnp.array(0.5)), "scale must be a Python number"),
    (dict(scale=float("nan")), "scale must be a finite number, got nan"),
    (dict(scale=float("inf")), "scale must be a finite number, got inf"),
    (dict(impl="blockwise", block_q=0), "block_q"),
])
def test_bad_input_raises(kwargs, match):
    args = dict(q=np.zeros((2, 3, 4, 8), np.float32), k=np.zeros((2, 5, 2, 8), np.float32),
                v=np.zeros((2, 5, 2, 8), np.float32))
    args.update({key: kwargs.pop(key) for key in ("q", "k", "v") if key in kwargs})
    with pytest.raises(ValueError, match=match):
        softmax_attention(args["q"], args["k"], args["v"], **kwargs)
