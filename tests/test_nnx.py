"""The models from Flax NNX: built through `nnx.bridge` with their sharding annotations kept (eager sharding on, a
mesh with tensor parallelism), trained with `nnx.Optimizer` + `nnx.jit`, the losses equal Linen's from the same
initial parameters."""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cases import tiny_config
from flax import nnx

from flaxformer_lite import nnx as ffl_nnx
from flaxformer_lite.models import GPT
from flaxformer_lite.training import make_mesh

STEPS = 3


def _data():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (4, 9)), jnp.int32)
    return tokens[:, :-1], tokens[:, 1:]


def _xent(logits, targets):
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


@pytest.fixture(scope="module")
def nnx_run():
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices (tests/conftest.py sets jax_num_cpu_devices=8)")
    inputs, targets = _data()
    model = GPT(tiny_config())
    sharding = ffl_nnx.logical_sharding(model, inputs, mesh=make_mesh("data=2,tensor=2", jax.devices()[:4]))

    @nnx.jit
    def train_step(module, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: _xent(m(inputs), targets))(module)
        optimizer.update(module, grads)
        return loss

    with sharding:
        module = ffl_nnx.to_nnx(model, inputs, rngs=nnx.Rngs(0))
        initial = jax.tree_util.tree_map(np.asarray, nnx.to_pure_dict(nnx.state(module, nnx.Param)))
        optimizer = nnx.Optimizer(module, optax.adamw(1e-2), wrt=nnx.Param)
        losses = [float(train_step(module, optimizer)) for _ in range(STEPS)]
    return sharding, module, initial, losses


def test_parameters_keep_their_sharding(nnx_run):
    sharding, module, _, _ = nnx_run
    assert flax.config.flax_always_shard_variable  # not switched off globally
    params = nnx.state(module, nnx.Param)
    wi = params["decoder"]["layer_0"]["mlp"]["wi"]["kernel"]
    assert wi.get_value().sharding.spec[1] == "tensor"  # ("embed", "mlp") -> (fsdp, of size 1 here; tensor)
    spec = nnx.get_partition_spec(params)["decoder"]["layer_0"]["mlp"]["wi"]["kernel"]
    assert spec.get_value() == jax.sharding.PartitionSpec("embed", "mlp")  # the logical names, as annotated
    assert sharding.notes == ("parallel: vocab (97) does not divide over tensor=2; replicated along it",)


def test_nnx_training_equals_linen(nnx_run):
    _, _, initial, losses = nnx_run
    inputs, targets = _data()
    model, tx = GPT(tiny_config()), optax.adamw(1e-2)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(lambda p: _xent(model.apply({"params": p}, inputs), targets))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    params, state, linen = initial, tx.init(initial), []
    for _ in range(STEPS):
        params, state, loss = step(params, state)
        linen.append(float(loss))
    assert losses[-1] < losses[0]
    np.testing.assert_allclose(losses, linen, rtol=1e-5)


def test_to_nnx_outside_the_context_says_what_to_do():
    inputs, _ = _data()
    with pytest.raises(ValueError, match=r"inside `with flaxformer_lite.nnx.logical_sharding\(model"):
        ffl_nnx.to_nnx(GPT(tiny_config()), inputs, rngs=nnx.Rngs(0))
    assert not nn.get_logical_axis_rules()
