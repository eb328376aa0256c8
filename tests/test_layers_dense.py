"""`kernel_dot_general`: the CPU path that reorders the kernel to ``[out..., in...]`` before the product gives the
same values and gradients as the plain product (float64 NumPy reference), and is taken only where it pays."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

from flaxformer_lite.layers import MLP, kernel_dot_general
from flaxformer_lite.layers.dense import MIN_ROWS

# (name, x shape, kernel shape, dimension numbers, einsum of the same product)
CASES = [
    ("dense", (600, 16), (16, 24), (((1,), (0,)), ((), ())), "ne,ef->nf"),
    ("in-projection", (2, 300, 16), (16, 4, 8), (((2,), (0,)), ((), ())), "ble,ehd->blhd"),
    ("out-projection", (2, 300, 4, 8), (4, 8, 16), (((2, 3), (0, 1)), ((), ())), "blhd,hde->ble"),
]


def _reordered(fn, *args) -> bool:
    return "optimization_barrier" in str(jax.make_jaxpr(fn)(*args))


@pytest.mark.parametrize("name,xs,ks,dims,spec", CASES, ids=[c[0] for c in CASES])
def test_same_product_and_gradients_as_float64(name, xs, ks, dims, spec):
    rng = np.random.default_rng(0)
    x, k, dy = (rng.standard_normal(s) for s in (xs, ks, xs[:len(xs) - len(dims[0][0])] + ks[len(dims[0][1]):]))
    f = lambda x, k: kernel_dot_general(x, k, dims)
    assert _reordered(f, jnp.float32(x), jnp.float32(k)), "600 rows on CPU should take the reordered path"
    y, vjp = jax.vjp(f, jnp.float32(x), jnp.float32(k))
    dx, dk = vjp(jnp.float32(dy))
    np.testing.assert_allclose(y, np.einsum(spec, x, k), rtol=1e-5, atol=1e-4)
    lhs, rhs = spec.split("->")[0].split(","), spec.split("->")[1]
    np.testing.assert_allclose(dx, np.einsum(f"{rhs},{lhs[1]}->{lhs[0]}", dy, k), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dk, np.einsum(f"{lhs[0]},{rhs}->{lhs[1]}", x, dy), rtol=1e-5, atol=1e-3)


def test_plain_product_where_the_copy_does_not_pay():
    k = jnp.ones((16, 24))
    plain = lambda x, k: kernel_dot_general(x, k, (((1,), (0,)), ((), ())))
    assert not _reordered(plain, jnp.ones((MIN_ROWS - 1, 16)), k)  # decoding-sized: no kernel copy
    assert _reordered(plain, jnp.ones((MIN_ROWS, 16)), k)
    # a kernel already in [out, in] order, and batched products, go straight to dot_general
    assert not _reordered(lambda x, k: kernel_dot_general(x, k, (((1,), (1,)), ((), ()))),
                          jnp.ones((MIN_ROWS, 16)), jnp.ones((24, 16)))
    assert not _reordered(lambda x, k: kernel_dot_general(x, k, (((2,), (1,)), ((0,), (0,)))),
                          jnp.ones((2, MIN_ROWS, 16)), jnp.ones((2, 16, 24)))


def test_mlp_on_many_rows_matches_float64():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 300, 16))
    mlp = MLP(32, "gelu_tanh")
    params = nn.unbox(mlp.init(jax.random.PRNGKey(0), jnp.float32(x)))["params"]
    params = jax.tree_util.tree_map(lambda p: p + 0.1 * rng.standard_normal(p.shape).astype(np.float32), params)
    y = mlp.apply({"params": params}, jnp.float32(x))
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    want = ref.gelu_tanh(x @ p["wi"]["kernel"] + p["wi"]["bias"]) @ p["wo"]["kernel"] + p["wo"]["bias"]
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
