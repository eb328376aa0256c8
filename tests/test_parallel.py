"""Tensor parallelism for any head count and vocabulary: a dim the mesh cannot split is replicated (with a note), the
losses match one device, and the logical-axis rules are active while the step is traced (activation constraints
reach the compiled program)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxformer_lite.models import GPT, preset
from flaxformer_lite.training import MeshLayout, TrainStep, make_mesh, make_task
from flaxformer_lite.training.parallel import RULES, fit_rules

# 6 heads and a 4001-id vocabulary: neither divides tensor=4; mlp 128 and embed 48 do
CFG = dataclasses.replace(preset("gpt-tiny"), num_layers=2, embed_dim=48, num_heads=6, mlp_dim=128, vocab_size=4001,
                          max_len=32, dropout_rate=0.0, attention_dropout_rate=0.0)
B, L, STEPS = 8, 16, 3


def _batch(step: int) -> dict:
    rng = np.random.default_rng(step)
    tokens = rng.integers(0, CFG.vocab_size, (B, L + 1)).astype(np.int32)
    segments = np.repeat(np.array([[1] * 10 + [2] * 6]), B, 0).astype(np.int32)  # two packed documents per row
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments,
            "loss_mask": np.ones((B, L), np.float32)}


def _step(mesh_spec: str) -> TrainStep:
    model = GPT(CFG)
    task = make_task("causal_lm", model, "gpt")
    first = jax.tree_util.tree_map(jnp.asarray, _batch(0))
    tx = optax.adamw(1e-2)
    return TrainStep(task, tx, lambda r: task.init_params(r, first), jax.random.PRNGKey(0),
                     MeshLayout(make_mesh(mesh_spec)))


@pytest.fixture(scope="module")
def runs():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets jax_num_cpu_devices=8)")
    out = {}
    for spec in ("data=1", "data=2,tensor=4"):
        step = _step(spec)
        out[spec] = (step, [float(step(_batch(0))["loss"]) for _ in range(STEPS)])  # one batch, learnt
    return out


def test_uneven_dims_are_replicated_with_a_note():
    abstract = jax.eval_shape(lambda r: GPT(CFG).init(r, jnp.zeros((1, L), jnp.int32))["params"],
                              jax.random.PRNGKey(0))
    rules, notes = fit_rules(abstract, make_mesh("tensor=4", jax.devices()[:4]))
    table = dict(rules)
    assert table["vocab"] is None and table["heads"] is None
    assert table["mlp"] == "tensor" and table["embed"] == "fsdp" and table["batch"] == dict(RULES)["batch"]
    assert "parallel: vocab (4001) does not divide over tensor=4; replicated along it" in notes
    assert any(n.startswith("parallel: heads (6)") for n in notes) and len(notes) == len(set(notes))
    _, none = fit_rules(abstract, make_mesh("tensor=2", jax.devices()[:2]))
    assert any("vocab (4001)" in n for n in none) and not any("heads" in n for n in none)  # 6 heads split in 2


def test_tensor_parallel_losses_equal_one_device(runs):
    one, tp = runs["data=1"][1], runs["data=2,tensor=4"][1]
    assert one[-1] < one[0]  # it trains
    np.testing.assert_allclose(tp, one, rtol=1e-4)
    step = runs["data=2,tensor=4"][0]
    mlp = step.state["params"]["decoder"]["layer_0"]["mlp"]["wi"]["kernel"]
    assert "tensor" in str(mlp.sharding.spec)  # what divides is still split


def test_activation_constraints_reach_the_compiled_step(runs):
    step = runs["data=2,tensor=4"][0]
    placed = step.place(_batch(0))
    text = step.compiled.lower(step.state, placed).as_text()
    # the MLP hidden activation, constrained to ("batch", "length", "mlp") -> (data x fsdp, None, tensor)
    assert '{"data", "fsdp"}, {}, {"tensor"}' in text.replace("?", ""), "no activation constraint in the program"
