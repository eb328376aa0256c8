"""Parallelism by configuration: a `Mesh` over ``data``/``fsdp``/``tensor`` axes, one table of logical-axis rules,
sharded state initialisation, and the pmap layout helpers. The step itself lives in step.py.
"""
from __future__ import annotations

import contextlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..names import SCANNED_LAYERS

MESH_AXES = ("data", "fsdp", "tensor")
# Logical name -> mesh axes. Parameters shard 'embed' over fsdp (ZeRO-3 style) and the wide dims over tensor;
# activations shard the batch over data x fsdp. A mesh axis is used at most once per array (Flax skips repeats).
RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
         ("kv_heads", "tensor"), ("vocab", "tensor"), ("length", None), ("head_dim", None), (SCANNED_LAYERS, None),
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


def mesh_batch_shards(spec: str, devices=None) -> int:
    """How many ways the ``parallel.mesh`` spec splits the batch (data x fsdp), checked against the devices."""
    sizes = parse_mesh(spec, len(jax.devices() if devices is None else devices))
    return sizes["data"] * sizes["fsdp"]


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over data x fsdp; the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def fit_rules(abstract_params, mesh: Mesh, rules=RULES) -> tuple[tuple, list[str]]:
    """``rules`` with every logical name that some parameter dim cannot split evenly over its mesh axes mapped to
    None (replicated), and one note per such name (e.g. GPT-2's 50257-id vocabulary on ``tensor=2``, 6 heads on
    ``tensor=4``). Replicating, not padding, leaves checkpoints, parameter counts and Hugging Face parity unchanged.

    ``abstract_params``: boxed (``nn.Partitioned``) parameters or shape structs of them. The same rules then serve
    the parameters and the activation constraints, so both agree."""
    sizes, table = dict(mesh.shape), dict(rules)
    uneven: dict[str, str] = {}
    for leaf in jax.tree_util.tree_leaves(abstract_params, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
        if not isinstance(leaf, nn.Partitioned):
            continue
        for name, dim in zip(leaf.names, leaf.value.shape):
            axes = table.get(name)
            axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            ways = int(np.prod([sizes[a] for a in axes]))
            if dim % ways and name not in uneven:
                over = " x ".join(f"{a}={sizes[a]}" for a in axes)
                uneven[name] = f"parallel: {name} ({dim}) does not divide over {over}; replicated along it"
    return tuple((name, None if name in uneven else axes) for name, axes in rules), list(uneven.values())


def init_state(init_fn, tx, rng, mesh: Mesh):
    """Build the train state directly in its shardings (nothing is materialised on one device first).

    ``init_fn(rng) -> boxed params`` (a model's ``init(...)["params"]`` with logical names). Returns
    ``(state, shardings, rules, notes)``: the rules (`fit_rules`) that placed the parameters, to be active while the
    step is traced, and the notes on what they replicate."""
    def boxed_state(rng):
        params = init_fn(rng)
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
                "rng": jax.random.fold_in(rng, 1), "finite": jnp.ones((), bool)}

    abstract = jax.eval_shape(boxed_state, rng)
    rules, notes = fit_rules(abstract["params"], mesh)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
    state = jax.jit(lambda r: nn.unbox(boxed_state(r)), out_shardings=shardings)(rng)
    return state, shardings, rules, notes


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules):
    """While tracing under this context, `nn.with_logical_constraint` on activations takes effect: ``mesh`` is the
    current mesh and ``rules`` the logical-axis table (without both, Flax makes the constraints no-ops)."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
        yield


def all_processes(flag: bool) -> bool:
    """True when ``flag`` is True in every process (a collective: every process must call it); ``flag`` itself in
    a single-process run. For decisions that must not differ between hosts (stop now, a checkpoint is readable)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.int32(bool(flag)))))


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
