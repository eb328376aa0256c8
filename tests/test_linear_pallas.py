"""pallas_causal_sums (Pallas kernels, interpret mode on CPU) against the float64 recurrence of gated linear
attention (reference.gated_linear_attention) for causal, padded and packed sequences with no, fixed and
data-dependent decay, MHA/GQA, float32/bfloat16; against the XLA form (causal_sums) in values and gradients (the
backward kernels); value tiles and block sizes; many blocks with segments across them; the lowering of every kernel
to Triton (no GPU needed); argument errors and pallas_unsupported's reasons. test_linear_gates checks the backward
kernels against finite differences of the reference."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from cases import lower_for_gpu
from flaxformer_lite.attention.recurrent.linear_causal import causal_sums
from flaxformer_lite.attention.recurrent.linear_pallas import pallas_causal_sums, pallas_unsupported

B, H, D = 2, 4, 16  # batch, query heads, head dim (= features for elu+1)
# Boundaries inside blocks (10, 30), on a block start (16); id 0 comes back after id 1: a new segment all the same.
SEG = np.array([[0] * 10 + [1] * 20 + [0] * 40, [3] * 16 + [4] * 54])
VALID = np.random.default_rng(7).random((B, 70)) > 0.3
VALID[1, :3] = False  # rows that see no key yet: zeros
# 150 positions = 9 blocks of 16 and a padded tenth. Row 0: runs across three blocks (6..47, ending on a block's
# last position; 74..149, into the padding), one exactly a block (48..63), a run of one position (5), a block with
# three runs (64..79). Row 1: runs of whole blocks, one starting on the last block's first position.
LONG_SEG = np.array([[0] * 5 + [1] + [2] * 42 + [3] * 16 + [4] * 3 + [5] * 7 + [6] * 76, [7] * 64 + [8] * 80 + [9] * 6])
F32 = dict(rtol=1e-5, atol=1e-5)
BF16 = dict(rtol=3e-2, atol=3e-2)
sums = functools.partial(jax.jit, static_argnames=("block", "block_v"))(pallas_causal_sums)


@functools.partial(jax.jit, static_argnames=("impl", "block", "block_v", "interpret"))
def sums_and_grads(qf, kf, v, seg, log_decay, w_num, w_den, impl="pallas", block=16, block_v=64, interpret=None):
    """``(num, den)`` and the gradients of ``sum(num * w_num) + sum(den * w_den)`` w.r.t. qf, kf, v, log_decay, by
    the kernel (``impl="pallas"``) or the XLA form (``"xla"``)."""
    def loss(qf, kf, v, log_decay):
        if impl == "pallas":
            num, den = pallas_causal_sums(qf, kf, v, seg, log_decay, block=block, block_v=block_v,
                                          interpret=interpret)
        else:
            num, den = causal_sums(qf, kf, None, v, seg, seg, log_decay, block, dtype=v.dtype)[:2]
        return jnp.sum(num * w_num) + jnp.sum(den * w_den), (num, den)
    grads, sums = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(qf, kf, v, log_decay)
    return sums, grads


def case(mask, decay, kv_heads=2, length=37, value_dim=8, dtype=jnp.float32, seed=0, segments=SEG):
    """Kernel inputs ``(qf, kf, v, seg, log_decay, w_num, w_den)`` and the float64 reference output ``[b, l, h, v]``.

    mask: "causal", "padding" (VALID: hidden keys get zero features and values, and no decay) or "segments"
    (``segments``, SEG by default);
    decay: "none", "fixed" (one per kv head) or "data" (``-softplus`` of noise)."""
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((B, length, H, D)), rng.standard_normal((B, length, kv_heads, D))
    v = rng.standard_normal((B, length, kv_heads, value_dim))
    if dtype != jnp.float32:  # the reference sees the rounded inputs
        q, k, v = (np.asarray(jnp.asarray(x, dtype), np.float64) for x in (q, k, v))
    log_decay = {"none": np.zeros((B, length, kv_heads)),
                 "fixed": np.broadcast_to(np.log(np.linspace(0.95, 0.6, kv_heads)), (B, length, kv_heads)),
                 "data": -np.logaddexp(0.0, rng.standard_normal((B, length, kv_heads)))}[decay]
    valid = VALID[:, :length] if mask == "padding" else None
    seg = segments[:, :length] if mask == "segments" else None
    want = reference.gated_linear_attention(q, k, v, log_decay, segment_ids=seg, kv_valid=valid)
    qf, kf = reference.elu_plus_one(q), reference.elu_plus_one(k)
    if valid is not None:
        kf, v, log_decay = kf * valid[..., None, None], v * valid[..., None, None], log_decay * valid[..., None]
    w = [rng.standard_normal(shape) for shape in ((B, length, kv_heads, H // kv_heads, value_dim),
                                                  (B, length, kv_heads, H // kv_heads))]
    inputs = (jnp.asarray(qf.reshape(B, length, kv_heads, H // kv_heads, D), dtype), jnp.asarray(kf, dtype),
              jnp.asarray(v, dtype), None if seg is None else jnp.asarray(seg, jnp.int32),
              None if decay == "none" else jnp.asarray(log_decay, jnp.float32),
              *(jnp.asarray(x, jnp.float32) for x in w))
    return inputs, want


def output(num, den):
    """``num / den`` (0 where den is 0) as float64 ``[b, l, h, v]``."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)[..., None]
    out = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    return out.reshape(out.shape[:2] + (-1, out.shape[-1]))


def check_reference(mask, decay, tol=F32, **kwargs):
    inputs, want = case(mask, decay, **kwargs)
    num, den = sums(*inputs[:5], block=16)
    assert num.dtype == den.dtype == jnp.float32
    assert num.shape == inputs[0].shape[:4] + (inputs[2].shape[-1],) and den.shape == inputs[0].shape[:4]
    np.testing.assert_allclose(output(num, den), want, **tol)


def assert_close(got, want, rel):
    """Equal up to ``rel`` times want's largest magnitude (den sums hundreds of products)."""
    want = np.asarray(want, np.float64)
    scale = max(float(np.abs(want).max()), 1.0)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rel, atol=rel * scale)


@pytest.mark.parametrize("decay", ["none", "fixed", "data"])
@pytest.mark.parametrize("mask", ["causal", "padding", "segments"])
def test_matches_reference_gqa(mask, decay):
    check_reference(mask, decay)


@pytest.mark.parametrize("mask,decay", [("causal", "data"), ("padding", "none"), ("segments", "fixed")])
def test_matches_reference_mha_longer(mask, decay):
    """4 kv heads, 70 positions (5 blocks), a value dim of 16."""
    check_reference(mask, decay, kv_heads=4, length=70, value_dim=16)


@pytest.mark.parametrize("mask,decay", [("causal", "none"), ("padding", "fixed"), ("segments", "data")])
def test_matches_reference_bfloat16(mask, decay):
    """bf16 matmul operands, float32 sums and state."""
    check_reference(mask, decay, tol=BF16, dtype=jnp.bfloat16)


@pytest.mark.parametrize("mask,decay,kv_heads,dtype", [
    ("segments", "data", 2, jnp.float32), ("padding", "fixed", 4, jnp.float32), ("causal", "none", 1, jnp.float32),
    ("segments", "fixed", 2, jnp.bfloat16)])
def test_values_and_grads_match_xla_form(mask, decay, kv_heads, dtype):
    """The kernel's sums and the gradients through its custom_vjp equal causal_sums' (ka=None)."""
    inputs, _ = case(mask, decay, kv_heads=kv_heads, dtype=dtype, seed=1)
    (num, den), grads = sums_and_grads(*inputs)
    (num_x, den_x), grads_x = sums_and_grads(*inputs, impl="xla")
    rel = 1e-5 if dtype == jnp.float32 else 1e-2
    assert_close(num, num_x, rel)
    assert_close(den, den_x, rel)
    assert (grads[3] is None) == (decay == "none")
    for got, want, x in zip(grads, grads_x, inputs[:3] + inputs[4:5]):
        if x is not None:
            assert got.dtype == x.dtype and got.shape == x.shape
            assert_close(got, want, rel)


@pytest.mark.parametrize("blocks", [dict(block=16, block_v=16), dict(block=128, block_v=64)])
def test_value_tiles_and_block_sizes(blocks):
    """Two value tiles (block_v 16 of 32: the backward sums their shares of dq and dk, and counts d den once), and
    one tile with blocks of 128 (clipped to 64), give the XLA form's sums and gradients."""
    inputs, _ = case("segments", "data", length=45, value_dim=32, seed=2)
    (num_x, den_x), grads_x = sums_and_grads(*inputs, impl="xla")
    (num, den), grads = sums_and_grads(*inputs, **blocks)
    for got, want in zip((num, den) + grads, (num_x, den_x) + grads_x):
        assert_close(got, want, 1e-5)


def test_many_blocks_with_segments_across_them():
    """LONG_SEG over ten blocks with data decay, MQA (one walk of the sums per kv head serves four query heads): the
    reference's outputs; the XLA form's sums and gradients, which the backward's two walks and its parallel blocks
    must chain across every block boundary."""
    inputs, want = case("segments", "data", kv_heads=1, length=150, seed=3, segments=LONG_SEG)
    (num, den), grads = sums_and_grads(*inputs)
    (num_x, den_x), grads_x = sums_and_grads(*inputs, impl="xla")
    np.testing.assert_allclose(output(num, den), want, **F32)
    for got, want in zip((num, den) + grads, (num_x, den_x) + grads_x):
        assert_close(got, want, 1e-5)


@pytest.mark.parametrize("dtype,structure", [(jnp.float32, True), (jnp.bfloat16, True), (jnp.bfloat16, False)])
def test_lowers_to_triton(dtype, structure):
    """Every kernel lowers through the Pallas Triton backend (to TTIR; compiling it to PTX needs a GPU): for the
    values a walk storing the sums entering each block and the blocks' outputs in parallel, for the gradients a
    backward walk and the blocks' gradients in parallel. ``structure``: segments and decay."""
    inputs, _ = case("segments" if structure else "causal", "data" if structure else "none", dtype=dtype)
    text = lower_for_gpu(sums_and_grads, *inputs, interpret=False)
    assert text.count("xla.gpu.triton") == 4
    for name in ("linear_causal_states", "linear_causal_output", "linear_causal_backward_states",
                 "linear_causal_backward_blocks"):
        assert f'name = "{name}"' in text, name


@pytest.mark.parametrize("kwargs,match", [
    (dict(block=24), "block must"), (dict(block=8), "block must"), (dict(block_v=8), "block_v"),
    (dict(kf=jnp.zeros((B, 16, 2, 4))), "kf"), (dict(v=jnp.zeros((B, 16, 3, 8))), "v must"),
    (dict(seg=jnp.zeros((B, 16))), "seg"), (dict(log_decay=jnp.zeros((B, 16, 1))), "log_decay"),
    (dict(dtype=jnp.float64), "float64")])
def test_bad_arguments(kwargs, match):
    args = dict(qf=jnp.zeros((B, 16, 2, 2, 8)), kf=jnp.zeros((B, 16, 2, 8)), v=jnp.zeros((B, 16, 2, 8)), seg=None,
                log_decay=None)
    with pytest.raises(ValueError, match=match):
        pallas_causal_sums(**{**args, **kwargs})


def test_empty_sequence():
    num, den = pallas_causal_sums(jnp.zeros((B, 0, 2, 2, 8)), jnp.zeros((B, 0, 2, 8)), jnp.zeros((B, 0, 2, 5)), None,
                                  None)
    assert num.shape == (B, 0, 2, 2, 5) and den.shape == (B, 0, 2, 2)


@pytest.mark.parametrize("kwargs,match", [(dict(backend="tpu"), "Triton"), (dict(feature_has_scale=True), "FAVOR"),
                                          (dict(dtype=jnp.float64), "float64"), (dict(dtype=jnp.int8), "int8")])
def test_unsupported_reasons(kwargs, match):
    args = dict(feature_has_scale=False, dtype=jnp.bfloat16, backend="gpu")
    assert pallas_unsupported(**args) is None
    assert pallas_unsupported(**{**args, "backend": "cpu", "dtype": jnp.float32}) is None
    assert pallas_unsupported(**{**args, "dtype": jnp.float16}) is None
    reason = pallas_unsupported(**{**args, **kwargs})
    assert reason is not None and match in reason


# -- dispatch from linear_attention ----------------------------------------------------------------------------------
def test_linear_attention_impl_pallas_equals_xla():
    """impl='pallas' (interpret mode here) through the public function: gates, packed segments and padding."""
    from cases import build, qkv
    from flaxformer_lite.attention import Mask, linear_attention
    _, _, mask, _ = build("segments_causal")
    mask = Mask(causal=True, q_segment_ids=mask.q_segment_ids, kv_segment_ids=mask.q_segment_ids,
                kv_lengths=jnp.array([30, 37]))
    _, (q, k, v) = qkv(37, 37, kv_heads=2, seed=4)
    log_decay = -jax.nn.softplus(jax.random.normal(jax.random.key(1), (2, 37, 2)))
    run = jax.jit(lambda impl: linear_attention(q, k, v, mask=mask, log_decay=log_decay, block_size=16, impl=impl),
                  static_argnums=0)
    np.testing.assert_allclose(run("pallas"), run("xla"), rtol=1e-5, atol=1e-5)


def test_linear_impl_choice_and_errors():
    from flaxformer_lite.attention import Mask, linear_impl
    causal, f32 = Mask(causal=True), jnp.float32
    assert linear_impl("auto", causal, False, f32, 64, backend="gpu") == "pallas"
    assert linear_impl("auto", causal, False, f32, 64, backend="cpu") == "xla"
    assert linear_impl("auto", causal, True, f32, 64, backend="gpu") == "xla"  # FAVOR+
    assert linear_impl("auto", Mask(), False, f32, 64, backend="gpu") == "xla"
    assert linear_impl("auto", causal, False, f32, 24, backend="gpu") == "xla"
    seg = jnp.zeros((2, 5), jnp.int32)
    # two arrays of segment ids: linear_attention checks they are equal and runs on the query ids
    assert linear_impl("auto", Mask(causal=True, q_segment_ids=seg, kv_segment_ids=seg + 0), False, f32, 64,
                       backend="gpu") == "pallas"
    for args, match in [(("flash", causal, False, f32, 64), r"impl must be one of \('auto', 'xla', 'pallas'\)"),
                        (("pallas", causal, True, f32, 64), "key log-scales"),
                        (("pallas", Mask(), False, f32, 64), "not causal"),
                        (("pallas", causal, False, f32, 8), "block_size=8")]:
        with pytest.raises(ValueError, match=match):
            linear_impl(*args, backend="cpu")


@pytest.mark.parametrize("dtype,interpret,want", [(jnp.float32, False, "TF32_TF32_F32_X3"),
                                                  (jnp.float32, True, "HIGHEST"), (jnp.bfloat16, False, None)])
def test_dot_precision_follows_the_mode(dtype, interpret, want):
    """Float32 dots: 3xTF32 compiled for the GPU (Triton lowers full precision to FMA loops without tensor cores),
    full precision in interpret mode (XLA:CPU refuses 3xTF32); bf16 dots never 3xTF32 (the default precision, which
    JAX_DEFAULT_MATMUL_PRECISION may show as HIGHEST)."""
    q, k, v = (jnp.ones(shape, dtype) for shape in [(1, 32, 1, 1, 16), (1, 32, 1, 16), (1, 32, 1, 16)])
    text = str(jax.make_jaxpr(lambda *a: pallas_causal_sums(*a, None, None, interpret=interpret))(q, k, v))
    assert ("TF32_TF32_F32_X3" in text) == (want == "TF32_TF32_F32_X3")
    if want == "HIGHEST":
        assert "HIGHEST" in text
