"""Parallelism by configuration: a `Mesh` over ``data``/``fsdp``/``tensor`` axes, one table of logical-axis rules,
sharded state initialisation, and the train step as one `jax.jit` with explicit shardings and donated state (what
`pjit` became) or as `jax.pmap` (replicated state, gradients summed over devices) for parity with older code.

The train state is a dict: ``params``, ``opt_state``, ``step`` (int32), ``rng`` (key), ``finite`` (bool: every
loss so far was finite; checked before any checkpoint is written).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
# Logical name -> mesh axes. Parameters shard 'embed' over fsdp (ZeRO-3 style) and the wide dims over tensor;
# activations shard the batch over data x fsdp. A mesh axis is used at most once per array (Flax skips repeats).
RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
         ("kv_heads", "tensor"), ("vocab", "tensor"), ("length", None), ("head_dim", None), ("layers", None),
         ("position", None), ("token_type", None), ("classes", None), ("heads_mix", None),
         ("condition", None), ("embed_factor", None))


def parse_mesh(spec: str, num_devices: int) -> dict[str, int]:
    """``"data=-1,tensor=2"`` -> sizes of data/fsdp/tensor (missing axes 1; one -1 takes the remaining devices)."""
    sizes = {axis: 1 for axis in MESH_AXES}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        if name not in sizes or not value.lstrip("-").isdigit():
            raise ValueError(f"parallel.mesh {spec!r}: each part must be axis=size with axis in {list(MESH_AXES)}")
        sizes[name] = int(value)
    free = [a for a, s in sizes.items() if s == -1]
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    if len(free) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
        raise ValueError(f"parallel.mesh {spec!r}: sizes must be positive, with at most one -1")
    if free:
        if num_devices % fixed:
            raise ValueError(f"parallel.mesh {spec!r}: {num_devices} devices do not divide by {fixed}")
        sizes[free[0]] = num_devices // fixed
    if int(np.prod(list(sizes.values()))) > num_devices:
        raise ValueError(f"parallel.mesh {spec!r} needs {int(np.prod(list(sizes.values())))} devices, "
                         f"but there are {num_devices}")
    return sizes


def make_mesh(spec: str = "data=-1", devices=None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor) over ``devices`` (default: all), classic sharding propagation.
    A mesh smaller than the device count uses the first devices (e.g. ``data=1`` for one device)."""
    devices = jax.devices() if devices is None else devices
    sizes = parse_mesh(spec, len(devices))
    used = int(np.prod(list(sizes.values())))
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices[:used])


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over data x fsdp; the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def init_state(init_fn, tx, rng, mesh: Mesh):
    """Build the train state directly in its shardings (nothing is materialised on one device first).

    ``init_fn(rng) -> boxed params`` (a model's ``init(...)["params"]`` with logical names). Returns
    ``(state, shardings)``."""
    def boxed_state(rng):
        params = init_fn(rng)
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
                "rng": jax.random.fold_in(rng, 1), "finite": jnp.ones((), bool)}

    abstract = jax.eval_shape(boxed_state, rng)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, RULES)
    state = jax.jit(lambda r: nn.unbox(boxed_state(r)), out_shardings=shardings)(rng)
    return state, shardings


def _grads(task, params, batch, rng, accum: int, weights):
    """Gradients and per-term sums of one step, accumulated over ``accum`` micro-batches (a lax.scan)."""
    grad_fn = jax.value_and_grad(lambda p, b, r: task.loss(p, b, r, True, weights), has_aux=True)
    if accum == 1:
        (_, sums), grads = grad_fn(params, batch, rng)
        return grads, sums
    micro = jax.tree_util.tree_map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)

    def body(carry, xs):
        mb, i = xs
        (_, sums), grads = grad_fn(params, mb, jax.random.fold_in(rng, i))
        return jax.tree_util.tree_map(jnp.add, carry, (grads, sums)), None

    first = jax.tree_util.tree_map(lambda x: x[0], micro)
    sums_shape = jax.eval_shape(lambda: task.sums(params, first, rng, True))
    zeros = (jax.tree_util.tree_map(jnp.zeros_like, params),
             jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape))
    (grads, sums), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum)))
    return grads, sums


def _apply(tx, state, grads, sums, weights):
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    loss = sum(s["loss"] / jnp.maximum(weights[k], 1.0) for k, s in sums.items())
    new = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state, "step": state["step"] + 1,
           "rng": state["rng"], "finite": state["finite"] & jnp.isfinite(loss)}
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               **{f"{k}_{m}": v for k, s in sums.items() for m, v in s.items()},
               **{f"{k}_weight": w for k, w in weights.items()}}
    return new, metrics


def jit_train_step(task, tx, state_shardings, mesh: Mesh, accum: int = 1):
    """``step(state, batch) -> (state, metrics)``: one jit over the mesh, state donated."""
    def step(state, batch):
        rng = jax.random.fold_in(state["rng"], state["step"])
        weights = task.weights(batch)
        grads, sums = _grads(task, state["params"], batch, rng, accum, weights)
        return _apply(tx, state, grads, sums, weights)

    return jax.jit(step, in_shardings=(state_shardings, batch_sharding(mesh)), out_shardings=(state_shardings, None),
                   donate_argnums=0)


def pmap_train_step(task, tx, accum: int = 1):
    """``step(replicated_state, batch [devices, b / devices, ...]) -> (state, metrics)`` with `jax.pmap`: each device
    differentiates its share, divided by the global token count, and gradients are summed with `lax.psum`."""
    def step(state, batch):
        rng = jax.random.fold_in(state["rng"], state["step"])
        weights = jax.tree_util.tree_map(lambda w: jax.lax.psum(w, "data"), task.weights(batch))
        grads, sums = _grads(task, state["params"], batch, rng, accum, weights)
        grads = jax.lax.psum(grads, "data")
        sums = jax.lax.psum(sums, "data")
        return _apply(tx, state, grads, sums, weights)

    return jax.pmap(step, axis_name="data", donate_argnums=0)


def replicate(tree, num_devices: int) -> Any:
    """A copy of every leaf per device, stacked on a new leading axis (the pmap layout). Built from host copies so
    that pmap places them itself, whatever sharding the leaves had."""
    return jax.tree_util.tree_map(lambda x: np.broadcast_to(np.asarray(x), (num_devices,) + x.shape), tree)


def unreplicate(tree) -> Any:
    """The first device's copy of a pmap-replicated tree."""
    return jax.tree_util.tree_map(lambda x: x[0], tree)


def shard_for_pmap(batch, num_devices: int):
    """``[b, ...]`` -> ``[devices, b / devices, ...]``."""
    return jax.tree_util.tree_map(lambda x: x.reshape((num_devices, x.shape[0] // num_devices) + x.shape[1:]), batch)


@functools.lru_cache(maxsize=None)
def _eval_step(task):
    def step(params, batch):
        weights = task.weights(batch)
        return task.sums(params, batch, jax.random.key(0), False), weights
    return jax.jit(step)


def eval_sums(task, params, batch):
    """Deterministic per-term sums and weights of one batch (for evaluation)."""
    return _eval_step(task)(params, batch)
