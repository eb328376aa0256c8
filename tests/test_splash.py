"""splash_attention (the TPU's kernel behind impl="flash", Pallas interpret mode here) against the float64 reference:
values and gradients for the masks it takes, with GQA and MQA and a length that is no block multiple; and the
reasons it gives for the rest."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from cases import build, qkv
from flaxformer_lite.attention import Mask
from flaxformer_lite.attention.checks import Dims, check_qkv
from flaxformer_lite.attention.softmax.splash import splash_attention, splash_unsupported

TOL = dict(rtol=1e-5, atol=1e-5)


def _splash_and_grads(q, k, v, mask, w):
    """Output and vjp, jitted once per mask (closed over, as a model builds it inside its trace)."""
    def f(q, k, v):
        dims = check_qkv(q, k, v)
        return splash_attention(q, k, v, dims=dims, mask=mask, scale=dims.head_dim ** -0.5)

    @jax.jit
    def run(q, k, v, w):
        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(w)
    return run(q, k, v, w)


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
@pytest.mark.parametrize("name", ["none", "causal", "segments", "segments_causal", "window_segments"])
def test_matches_reference(name, kv_heads):
    lq, lk, mask, dense = build(name)  # 37 tokens: padded to one 128 block
    if mask.has_segments:  # self-attention: one array on both sides, as the models pass it
        mask = Mask(causal=mask.causal, window=mask.window, q_segment_ids=mask.q_segment_ids,
                    kv_segment_ids=mask.q_segment_ids)
    (qn, kn, vn), (q, k, v) = qkv(lq, lk, kv_heads=kv_heads, seed=kv_heads)
    w = np.random.default_rng(3).standard_normal(q.shape)
    out, grads = _splash_and_grads(q, k, v, mask, jnp.asarray(w, jnp.float32))
    np.testing.assert_allclose(out, reference.softmax_attention(qn, kn, vn, dense), **TOL)
    loss = lambda q, k, v: jnp.sum(jnp.asarray(w, jnp.float32) * _reference_attention(q, k, v, mask))
    for g, r in zip(grads, jax.grad(loss, argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(g, r, **TOL)


def _reference_attention(q, k, v, mask):
    from flaxformer_lite.attention import softmax_attention
    return softmax_attention(q, k, v, mask=mask, impl="reference")


def test_reasons():
    d = Dims(2, 64, 64, 4, 2, 16, 16)
    seg = jnp.zeros((2, 64), jnp.int32)
    assert splash_unsupported(d, jnp.bfloat16, Mask(causal=True, q_segment_ids=seg, kv_segment_ids=seg), None,
                              0.0) is None
    assert splash_unsupported(d, jnp.bfloat16, Mask(causal=True, window=8), None, 0.0) is None  # LocalMask
    for mask, said in ((Mask(prefix_lengths=jnp.array([3, 4])), "prefix_lengths"),
                       (Mask(kv_lengths=jnp.array([3, 4])), "kv_lengths"),
                       (Mask(kv_valid=jnp.ones((2, 64), bool)), "kv_valid"),
                       (Mask(causal=True, q_offset=jnp.array(3)), "q_offset"),
                       (Mask(q_segment_ids=seg, kv_segment_ids=seg + 0), "separate query and key segment ids")):
        assert said in splash_unsupported(d, jnp.bfloat16, mask, None, 0.0)
    assert "bias" in splash_unsupported(d, jnp.bfloat16, Mask(), jnp.zeros((1, 4, 64, 64)), 0.0)
    assert "dropout" in splash_unsupported(d, jnp.bfloat16, Mask(), None, 0.1)
    assert "float16" in splash_unsupported(d, jnp.float16, Mask(), None, 0.0)
    assert "lq != lk" in splash_unsupported(Dims(2, 8, 64, 4, 2, 16, 16), jnp.float32, Mask(), None, 0.0)
    with pytest.raises(ValueError, match="splash_attention cannot run this call: the mask field kv_lengths"):
        q = jnp.zeros((2, 64, 4, 16))
        splash_attention(q, q[:, :, :2], q[:, :, :2], dims=d, mask=Mask(kv_lengths=jnp.array([3, 4])), scale=0.25)
