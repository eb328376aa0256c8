"""The kernels are shardable: jit over an 8-device mesh (batch on 'data', heads on 'model') == one device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from flaxformer_lite.attention import Mask, linear_attention, softmax_attention

B, L, H, N, D = 8, 40, 4, 2, 16


@pytest.fixture(scope="module")
def mesh():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets jax_num_cpu_devices=8)")
    return jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))


KERNELS = {
    "blockwise": lambda q, k, v, m: softmax_attention(q, k, v, mask=m, impl="blockwise", block_q=16, block_kv=16),
    "xla": lambda q, k, v, m: softmax_attention(q, k, v, mask=m, impl="xla"),
    "linear_favor": lambda q, k, v, m: linear_attention(q, k, v, mask=m, feature_map="favor", block_size=16),
}


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_sharded_equals_single_device(mesh, kernel):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((B, L, H, D), (B, L, N, D), (B, L, N, D)))
    seg = jnp.asarray(np.repeat(np.arange(4), 10)[None].repeat(B, 0))
    mask = Mask(causal=True, q_segment_ids=seg, kv_segment_ids=seg, kv_lengths=jnp.arange(B) * 5 + 3)
    fn = KERNELS[kernel]
    loss = lambda q, k, v, m: jnp.sum(fn(q, k, v, m) ** 2)
    want_out, want_grads = fn(q, k, v, mask), jax.grad(loss, argnums=(0, 1, 2))(q, k, v, mask)

    heads = NamedSharding(mesh, P("data", None, "model", None))
    rows = NamedSharding(mesh, P("data"))
    q_s, k_s, v_s = (jax.device_put(x, heads) for x in (q, k, v))
    mask_s = jax.device_put(mask, jax.tree_util.tree_map(lambda _: rows, mask))
    out = jax.jit(fn, out_shardings=heads)(q_s, k_s, v_s, mask_s)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q_s, k_s, v_s, mask_s)
    assert out.sharding.is_equivalent_to(heads, 4)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
