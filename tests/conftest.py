"""Test set-up: 8 CPU devices for sharding tests and kept freed memory (both before JAX initialises), and jitted
kernels shared by tests."""
import jax

from flaxformer_lite.training.host import keep_freed_memory

keep_freed_memory()  # as train.py does: XLA:CPU's buffers are reused instead of page-faulted in again

jax.config.update("jax_num_cpu_devices", 8)


import pytest  # noqa: E402

from flaxformer_lite.attention import linear_attention, softmax_attention  # noqa: E402


@pytest.fixture(scope="session")
def softmax_fn():
    """jit(softmax_attention) with static knobs; compiled once per (mask structure, shapes, knobs)."""
    return jax.jit(softmax_attention, static_argnames=("impl", "scale", "block_q", "block_kv", "dropout_rate"))


@pytest.fixture(scope="session")
def linear_fn():
    """jit(linear_attention) with static knobs."""
    return jax.jit(linear_attention, static_argnames=("feature_map", "block_size"))



