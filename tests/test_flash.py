"""flash_attention (Pallas kernels, interpret mode on CPU) against the float64 reference: values and gradients for
every mask kind, MHA/GQA/MQA, ragged lengths, other block sizes, padded head dims, bf16; the lowering to Triton
(TTIR, which needs no GPU); block-size errors; flash_unsupported's reasons."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from cases import B, MASK_CASES, check_grads_by_finite_differences, lower_for_gpu, qkv, triton_launches
from flaxformer_lite.attention import Mask
from flaxformer_lite.attention.checks import Dims, check_mask, check_qkv
from flaxformer_lite.attention.softmax.flash import block_bounds, fit_blocks, flash_attention, flash_unsupported

TOL = dict(rtol=1e-5, atol=1e-5)
SCALE = 0.3  # not 1/sqrt(d): the scale must be the one given
_RNG = np.random.default_rng(11)
# name -> (lq, lk, Mask fields as NumPy): cases.py's cases plus the ones only a fused kernel finds hard.
CASES = {
    **MASK_CASES,
    # query segment 7 matches no key: those rows see nothing
    "segments_cross": (13, 29, {"q_segment_ids": np.array([[0] * 5 + [1] * 5 + [7] * 3, [2] * 13]),
                                "kv_segment_ids": np.array([[0] * 12 + [1] * 10 + [5] * 7, [2] * 9 + [3] * 20])}),
    "causal_cross": (29, 13, {"causal": True}),  # more queries than keys, no offset
    "decode": (1, 29, {"causal": True, "q_offset": np.array([28, 5]), "kv_lengths": np.array([29, 6])}),
    "all_fields": (13, 29, {"prefix_lengths": np.array([20, 3]), "q_offset": 16, "kv_valid": _RNG.random((B, 29)) > 0.2,
                            "q_segment_ids": np.array([[0] * 6 + [1] * 7, [4] * 13]),
                            "kv_segment_ids": np.array([[0] * 15 + [1] * 14, [4] * 29])}),
    "long": (100, 100, {"causal": True, "kv_lengths": np.array([90, 57])}),  # backward blocks smaller than forward
    # a window spanning blocks: kv_start/kv_stop and q_start/q_stop bounds with 7 query and 4 key blocks
    "long_window": (100, 100, {"causal": True, "window": 20, "kv_lengths": np.array([90, 57])}),
}


def build(name):
    """(lq, lk, Mask, dense reference mask [b, lq, lk])."""
    lq, lk, fields = CASES[name]
    mask = Mask(**{key: (jnp.asarray(val) if isinstance(val, np.ndarray) else val) for key, val in fields.items()})
    return lq, lk, mask, reference.dense_mask(B, lq, lk, **fields)


@functools.partial(jax.jit, static_argnames=("block_q", "block_kv", "interpret"))
def flash_and_grads(q, k, v, mask, cotangent, block_q=16, block_kv=16, interpret=None):
    """flash_attention's output and the gradients of ``sum(out * cotangent)`` w.r.t. q, k, v."""
    def attend(q, k, v):
        dims = check_qkv(q, k, v)
        return flash_attention(q, k, v, dims=dims, mask=check_mask(mask, dims), scale=SCALE, block_q=block_q,
                               block_kv=block_kv, interpret=interpret)
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(cotangent)


def reference_grads(q, k, v, dense, w, scale=SCALE):
    """float64 gradients of ``sum(reference.softmax_attention(q, k, v) * w)`` w.r.t. q, k, v, by hand:
    dV = P^T W, dP = W V^T, dS = P (dP - rowsum(P dP)), dQ = scale dS K, dK = scale dS^T Q; GQA sums over groups."""
    q, k, v, w = (np.asarray(x, np.float64) for x in (q, k, v, w))
    b, lq, h, _ = q.shape
    lk, n = k.shape[1], k.shape[2]
    ke, ve = np.repeat(k, h // n, axis=2), np.repeat(v, h // n, axis=2)
    p = reference.attention_weights(np.einsum("bqhd,bkhd->bhqk", q, ke) * scale, dense)
    dp = np.einsum("bqhv,bkhv->bhqk", w, ve)
    ds = p * (dp - (p * dp).sum(-1, keepdims=True))
    dq = np.einsum("bhqk,bkhd->bqhd", ds, ke) * scale
    dk = np.einsum("bhqk,bqhd->bkhd", ds, q) * scale
    dv = np.einsum("bhqk,bqhv->bkhv", p, w)
    return dq, dk.reshape(b, lk, n, h // n, -1).sum(3), dv.reshape(b, lk, n, h // n, -1).sum(3)


def check(name, kv_heads=2, head_dim=16, value_dim=None, dtype=np.float32, tol=TOL, **blocks):
    """Run flash on case ``name`` and compare values and gradients with the float64 reference; return them."""
    lq, lk, mask, dense = build(name)
    _, (q, k, v) = qkv(lq, lk, kv_heads=kv_heads, head_dim=head_dim, value_dim=value_dim, seed=kv_heads, dtype=dtype)
    w = jnp.asarray(np.random.default_rng(3).standard_normal((B, lq, 4, value_dim or head_dim)), dtype)
    out, grads = flash_and_grads(q, k, v, mask, w, **blocks)
    assert out.shape == (B, lq, 4, value_dim or head_dim) and out.dtype == q.dtype
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape] and all(g.dtype == q.dtype for g in grads)
    inputs = [np.asarray(x, np.float64) for x in (q, k, v, w)]  # bf16 inputs: the reference sees the same values
    np.testing.assert_allclose(np.asarray(out, np.float64),
                               reference.softmax_attention(*inputs[:3], dense, scale=SCALE), **tol)
    for got, want in zip(grads, reference_grads(*inputs[:3], dense, inputs[3])):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, **tol)
    return out, grads


# cases.py's "segments", "causal_kv_valid" and "cross" take no kernel path that the others leave untaken.
@pytest.mark.parametrize("name", sorted(set(CASES) - {"long", "long_window", "segments", "causal_kv_valid", "cross"}))
def test_matches_reference_gqa(name):
    check(name)


@pytest.mark.parametrize("name,kv_heads", [("causal", 4), ("segments_causal", 4), ("all_fields", 1),
                                           ("cross_padding", 1)])
def test_mha_and_mqa(name, kv_heads):
    check(name, kv_heads=kv_heads)


@pytest.mark.parametrize("name,block_q,block_kv", [("prefix_padding", 32, 16), ("cross_causal_offset", 16, 32),
                                                   ("long", 128, 128), ("long_window", 16, 32)])
def test_other_block_sizes(name, block_q, block_kv):
    check(name, block_q=block_q, block_kv=block_kv)


def test_padded_head_dims_and_value_dim_differs():
    check("all_fields", head_dim=8, value_dim=24)  # padded to 16 and 32 inside


def test_rows_that_see_no_key_are_zero_with_zero_grads():
    out, (dq, dk, dv) = check("kv_lengths")  # batch row 1 has kv_lengths 0
    assert (np.asarray(out[1]) == 0).all() and (np.asarray(dq[1]) == 0).all()
    assert all(np.isfinite(np.asarray(g)).all() for g in (dq, dk, dv))
    out, (dq, _, _) = check("segments_cross")  # query segment 7 (batch row 0, last 3 rows) matches no key
    assert (np.asarray(out[0, -3:]) == 0).all() and (np.asarray(dq[0, -3:]) == 0).all()


@pytest.mark.parametrize("name,dtype", [("causal", jnp.bfloat16), ("all_fields", jnp.bfloat16),
                                        ("causal", jnp.float16)])
def test_low_precision(name, dtype):
    """bf16/f16 matmul operands, float32 softmax statistics: the float64 reference on the same rounded inputs."""
    check(name, dtype=dtype, tol=dict(rtol=2e-2, atol=3e-2))


def test_reference_grads_match_finite_differences():
    """The hand-written float64 gradients used above, against directional finite differences."""
    lq, lk, _, dense = build("all_fields")
    arrays, _ = qkv(lq, lk, seed=5)
    w = np.random.default_rng(6).standard_normal((B, lq, 4, 16))
    grads = reference_grads(*arrays, dense, w)
    check_grads_by_finite_differences(grads, arrays,
                                      lambda *a: (reference.softmax_attention(*a, dense, scale=SCALE) * w).sum(),
                                      np.random.default_rng(7), tol=1e-6)


@pytest.mark.parametrize("name,kv_heads,dtype", [("all_fields", 2, jnp.float32), ("causal", 4, jnp.bfloat16),
                                                 ("none", 1, jnp.float32), ("cross_window_offset", 2, jnp.bfloat16)])
def test_lowers_to_triton(name, kv_heads, dtype):
    """Forward and both backward kernels lower through the Pallas Triton backend (to TTIR; compiling it to PTX
    needs a GPU) without falling back: three Triton custom calls."""
    lq, lk, mask, _ = build(name)
    _, (q, k, v) = qkv(lq, lk, kv_heads=kv_heads, head_dim=8, value_dim=24, dtype=dtype)
    w = jnp.zeros((B, lq, 4, 24), dtype)
    text = lower_for_gpu(flash_and_grads, q, k, v, mask, w, block_q=64, block_kv=32, interpret=False)
    assert text.count("xla.gpu.triton") == 3


@pytest.mark.parametrize("name", ["window", "long_window", "cross_window_offset", "all_fields", "long"])
def test_loop_bounds(name):
    """The kernels' loop bounds per batch row (`block_bounds`) drop no visible pair (key blocks outside
    ``[kv_start, kv_stop)`` of a query block, query blocks outside ``[q_start, q_stop)`` of a key block) and do
    skip: in a long sequence, some key blocks lie left of a query block's window band."""
    lq, lk, mask, dense = build(name)
    bq = bk = 16
    lq_pad, lk_pad = -(-lq // bq) * bq, -(-lk // bk) * bk
    dims = Dims(B, lq, lk, 4, 2, 16, 16)
    kv_start, kv_stop, q_start, q_stop = (np.asarray(x) for x in block_bounds(mask, dims, lq_pad, lk_pad, bq, bk))
    full = np.zeros((B, lq_pad, lk_pad), bool)
    full[:, :lq, :lk] = dense
    for b in range(B):
        for i in range(lq_pad // bq):
            rows = full[b, i * bq:(i + 1) * bq]
            assert not rows[:, :kv_start[b, i] * bk].any() and not rows[:, kv_stop[b, i] * bk:].any()
        for j in range(lk_pad // bk):
            keys = full[b, :, j * bk:(j + 1) * bk]
            assert not keys[:q_start[b, j] * bq].any() and not keys[q_stop[b, j] * bq:].any()
    if name == "long_window":  # a window of 20 over 100 tokens leaves blocks on both sides of the band
        assert kv_start.max() > 0 and (q_stop < lq_pad // bq).any()


def test_blocks_are_clipped_to_128():
    """A dispatcher's larger default (softmax_attention's 512) gives the same result as 128."""
    lq, lk, mask, _ = build("long")
    _, (q, k, v) = qkv(lq, lk)
    w = jnp.ones((B, lq, 4, 16))
    for got, want in zip(jax.tree.leaves(flash_and_grads(q, k, v, mask, w, block_q=512, block_kv=512)),
                         jax.tree.leaves(flash_and_grads(q, k, v, mask, w, block_q=128, block_kv=128))):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("block_q", [0, 8, 24])
def test_block_sizes_must_be_powers_of_two_from_16(block_q):
    _, (q, k, v) = qkv(16, 16)
    with pytest.raises(ValueError, match="block_q"):
        flash_attention(q, k, v, dims=check_qkv(q, k, v), mask=Mask(), scale=1.0, block_q=block_q)


@pytest.mark.parametrize("itemsize,dim,forward,backward", [
    (2, 128, (128, 128), (64, 64)), (2, 256, (64, 64), (64, 32)), (4, 128, (64, 64), (64, 32)),
    (4, 256, (32, 32), (32, 16))])
def test_blocks_shrink_to_fit_shared_memory(itemsize, dim, forward, backward):
    """Sizes compiled with Triton 3.9 for sm_80/sm_90 (TTIR from this module): each fits an A100's 163 KiB."""
    assert fit_blocks(128, 128, dim, 2 * dim, itemsize) == forward
    assert fit_blocks(64, 64, 2 * dim, 2 * dim, itemsize, swapped_too=True) == backward


def _dims(head_dim=64, value_dim=64):
    return Dims(batch=2, lq=128, lk=128, heads=8, kv_heads=2, head_dim=head_dim, value_dim=value_dim)


@pytest.mark.parametrize("kwargs,match", [
    (dict(bias=jnp.zeros((1, 1, 128, 128))), "bias"),
    (dict(dropout_rate=0.1), "dropout"),
    (dict(dtype=jnp.float64), "float64"),
    (dict(dims=_dims(head_dim=512)), "256"),
    (dict(dims=_dims(value_dim=320)), "256"),
    (dict(backend="tpu"), "Triton"),
])
def test_unsupported_reasons(kwargs, match):
    args = dict(dims=_dims(), dtype=jnp.bfloat16, mask=Mask(causal=True), bias=None, dropout_rate=0.0, backend="gpu")
    assert flash_unsupported(**args) is None
    assert flash_unsupported(**{**args, "backend": "cpu", "dtype": jnp.float32}) is None
    reason = flash_unsupported(**{**args, **kwargs})
    assert reason is not None and match in reason


def test_unsupported_call_raises_naming_the_reason():
    q = jnp.zeros((1, 16, 1, 512))
    with pytest.raises(ValueError, match="head dims above 256"):
        flash_attention(q, q, q, dims=check_qkv(q, q, q), mask=Mask(), scale=1.0)


@pytest.mark.parametrize("dtype,head_dim,want", [
    (jnp.bfloat16, 64, {"flash_forward": (2, 8), "flash_backward_dq": (4, 4), "flash_backward_dkdv": (4, 4)}),
    (jnp.bfloat16, 128, {"flash_forward": (2, 8), "flash_backward_dq": (4, 8), "flash_backward_dkdv": (4, 8)}),
    (jnp.float32, 64, {"flash_forward": (8, 8), "flash_backward_dq": (8, 8), "flash_backward_dkdv": (8, 8)})])
def test_launch_parameters_avoid_register_spills(dtype, head_dim, want):
    """The launches that compiled without spills offline for sm_90 (benchmarks/triton_resources.py): the forward at
    8 warps, the backward at 4 for bf16 head dims <= 64 and 8 above, float32 in blocks of 32 at 8 warps. Grid x is
    the number of query blocks (forward, dq) or key blocks (dk/dv) of 256 positions."""
    mask = Mask(causal=True)
    q = k = v = jnp.zeros((1, 256, 2, head_dim), dtype)
    text = lower_for_gpu(flash_and_grads, q, k, v, mask, q, block_q=128, block_kv=128, interpret=False)
    assert triton_launches(text) == want
