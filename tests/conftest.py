"""Test set-up, before JAX initialises: 8 CPU devices for sharding tests, kept freed memory, and quick compiles (LLVM
unoptimised, a persistent compilation cache) for these processes and the train.py runs they start; then jitted
kernels shared by tests."""
import importlib.util
import os
import pkgutil
import tempfile


def _accelerator_plugin() -> bool:
    """Whether JAX will run on a GPU or TPU here: a PJRT plugin (jax_plugins.*) or libtpu is installed and
    JAX_PLATFORMS does not restrict JAX to the CPU. Asked before JAX initialises, so its flags can still be set."""
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return False
    plugins = importlib.util.find_spec("jax_plugins")
    found = plugins is not None and any(True for _ in pkgutil.iter_modules(plugins.submodule_search_locations))
    return found or importlib.util.find_spec("libtpu") is not None


# Compile time dominates this suite on the CPU, and most of it is LLVM optimising code that tests run once on tiny
# shapes: without it the kernel tests take half the time. Floating-point semantics do not change (no fast-math either
# way). The flag reaches every backend's LLVM, so it is set only where JAX runs on the CPU: on a GPU it would slow
# the compiled kernels that the GPU check then times.
if not _accelerator_plugin() and "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
# The same train step is compiled by many train.py runs (subprocesses inherit the environment). JAX keys each entry
# by the program, the compile options and the jaxlib version, so a cache kept between sessions is never stale.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"flaxformer_lite-tests-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import jax  # noqa: E402

from flaxformer_lite.training.host import keep_freed_memory  # noqa: E402

keep_freed_memory()  # as train.py does: XLA:CPU's buffers are reused instead of page-faulted in again

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


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



