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

# The smoke set (``pytest -m smoke``): a few tests of each floor (kernels and their GPU lowering, layers, models,
# decoding, sharding, training through train.py), for a quick check on another jax (CI's newest-jax leg) or machine.
SMOKE = {
    "test_softmax.py": ["test_flash_through_softmax_attention", "test_fully_masked_rows_are_zero_with_finite_grads",
                        "test_auto_choice", "test_pallas_never_falls_back"],
    "test_flash.py": ["test_lowers_to_triton", "test_rows_that_see_no_key_are_zero_with_zero_grads"],
    "test_linear.py": ["test_recurrent_step_equals_causal", "test_fully_masked_rows_are_zero_with_finite_grads"],
    "test_linear_pallas.py": ["test_lowers_to_triton", "test_dot_precision_follows_the_mode"],
    "test_delta.py": ["test_pallas_lowers_to_triton", "test_steps_from_the_empty_state_equal_the_reference",
                      "test_unit_lower_inverse_matches_numpy"],
    "test_layers_attention.py": ["test_matches_numpy_forward", "test_gated_delta_matches_numpy_forward"],
    "test_models.py": ["test_published_parameter_counts", "test_gpt_is_causal", "test_every_param_has_logical_names"],
    "test_decoding.py": ["test_gpt_greedy_equals_recompute[softmax]", "test_gpt_greedy_equals_recompute[linear]",
                         "test_beam_of_one_is_greedy"],
    "test_attention_sharding.py": ["test_sharded_equals_single_device[xla]",
                                   "test_sharded_equals_single_device[blockwise]"],
    "test_parallel.py": ["test_tensor_parallel_losses_equal_one_device"],
    "test_training.py": ["test_loss_falls_for_every_objective[causal_lm]", "test_loss_falls_for_every_objective[mlm]"],
}


# The slow set (``pytest -m "not slow"`` skips it while working): whole runs through train.py and several processes,
# each about 10 s or more on 2 cores (``--durations``). CI runs everything.
SLOW = {
    "test_readme.py": ["test_readme_python_example_runs"],
    "test_training.py": ["test_two_processes_equal_one", "test_sigkill_then_resume_is_bit_identical",
                         "test_pmap_run_resumes_as_if_uninterrupted", "test_loss_falls_for_every_objective",
                         "test_sigterm_or_ctrl_c_saves_a_usable_checkpoint"],
    "test_finetune.py": ["test_finetune_from_our_pretraining_run",
                         "test_finetune_from_hugging_face_folder_starts_at_its_weights"],
    "test_configs.py": ["test_every_shipped_config_trains_two_steps"],
    "test_store.py": ["test_resume_refuses_a_changed_corpus_unless_allowed"],
    "test_user_data.py": ["test_links_planted_in_a_run_folder_are_never_followed"],
    "test_faults.py": ["test_resume_skips_a_damaged_newest_checkpoint"],
}


def _named(table: dict, item) -> bool:
    """Whether ``table`` names ``item``: every parametrization of a function named, or the one named with its
    parameters."""
    named = table.get(item.path.name, ())
    return getattr(item, "originalname", item.name) in named or item.name in named


def pytest_collection_modifyitems(config, items):
    """Mark the `SMOKE` and `SLOW` tests."""
    for item in items:
        if _named(SMOKE, item):
            item.add_marker(pytest.mark.smoke)
        if _named(SLOW, item):
            item.add_marker(pytest.mark.slow)

from flaxformer_lite.attention import linear_attention, softmax_attention  # noqa: E402


@pytest.fixture(scope="session")
def softmax_fn():
    """jit(softmax_attention) with static knobs; compiled once per (mask structure, shapes, knobs)."""
    return jax.jit(softmax_attention, static_argnames=("impl", "scale", "block_q", "block_kv", "dropout_rate"))


@pytest.fixture(scope="session")
def linear_fn():
    """jit(linear_attention) with static knobs."""
    return jax.jit(linear_attention, static_argnames=("feature_map", "block_size"))



