"""The training step, in one home: `TrainStep` owns the train state and the step (gradient accumulation, the total
loss, the update, the evaluation sums, restoring and saving); a layout says where the state and the batches live:

- `MeshLayout`: one `jax.jit` over a `Mesh` with explicit `NamedSharding`s and the state donated (what `pjit`
  became);
- `PmapLayout`: `jax.pmap` over this process's devices, the state replicated, weights, gradients and sums added
  across devices with `lax.psum` (kept for parity with older code).

The loop only calls the step: `place` (in the prefetching thread), `run`, `host_metrics`, `restore`, `saved_state`.

The train state is a dict: ``params``, ``opt_state``, ``step`` (int32), ``rng`` (key), ``finite`` (bool: every
loss so far was finite; checked before any checkpoint is written).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .checkpoint import Checkpoints
from .parallel import (activation_sharding, batch_sharding, init_state, make_mesh, mesh_batch_shards, replicate,
                       shard_for_pmap, unreplicate)


def total_loss(sums: dict, weights: dict) -> jax.Array:
    """The training loss: the sum over loss terms of (term's loss sum) / (term's weight)."""
    return sum(s["loss"] / jnp.maximum(weights[k], 1.0) for k, s in sums.items())


def _micro_batches(batch: dict, accum: int) -> dict:
    """``[b, ...]`` -> ``[accum, b / accum, ...]`` with micro-batch i = rows i, i + accum, ...: a sharded batch's
    every micro-batch keeps rows on every data shard (a plain reshape would give micro-batch 0 to the first
    shards only)."""
    return jax.tree_util.tree_map(
        lambda x: x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1), batch)


def grads_and_sums(task, params, batch, rng, accum: int, weights: dict):
    """Gradients of `total_loss` (a tree like ``params``) and the per-term sums (``{term: {"loss", "nll",
    "correct"}}`` scalars) of one step on ``batch`` (``[b, ...]`` arrays), accumulated over ``accum`` micro-batches
    of ``b / accum`` rows; ``weights`` (``{term: scalar}``) are the whole batch's, so the micro-batches add up."""
    def loss(p, b, r):
        sums = task.sums(p, b, r, True)
        return total_loss(sums, weights), sums

    grad_fn = jax.value_and_grad(loss, has_aux=True)
    if accum == 1:
        (_, sums), grads = grad_fn(params, batch, rng)
        return grads, sums

    def body(carry, xs):
        mb, i = xs
        (_, sums), grads = grad_fn(params, mb, jax.random.fold_in(rng, i))
        return jax.tree_util.tree_map(jnp.add, carry, (grads, sums)), None

    micro = _micro_batches(batch, accum)
    first = jax.tree_util.tree_map(lambda x: x[0], micro)
    sums_shape = jax.eval_shape(lambda: task.sums(params, first, rng, True))
    zeros = (jax.tree_util.tree_map(jnp.zeros_like, params),
             jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape))
    (grads, sums), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum)))
    return grads, sums


def apply_update(tx, state: dict, grads, sums: dict, weights: dict) -> tuple[dict, dict]:
    """One optimizer update: the new state and the step's metrics, scalars: ``loss``, ``grad_norm``,
    ``<term>_<loss|nll|correct>`` sums and ``<term>_weight``."""
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    loss, grad_norm = total_loss(sums, weights), optax.tree.norm(grads)
    # a finite loss with an overflowing backward (fp16/bf16) still writes NaN into the params: both are checked
    new = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state, "step": state["step"] + 1,
           "rng": state["rng"], "finite": state["finite"] & jnp.isfinite(loss) & jnp.isfinite(grad_norm)}
    metrics = {"loss": loss, "grad_norm": grad_norm,
               **{f"{k}_{m}": v for k, s in sums.items() for m, v in s.items()},
               **{f"{k}_weight": w for k, w in weights.items()}}
    return new, metrics


class MeshLayout:
    """The state in its `NamedSharding`s over ``mesh`` (built there directly), batches as global arrays over the
    mesh's data x fsdp axes, the step one `jax.jit` with the state donated and the logical-axis rules active (so that
    activation constraints take effect). Attributes once `init` ran: shardings, rules."""

    def __init__(self, mesh):
        self.mesh, self.batch_sharding = mesh, batch_sharding(mesh)

    def init(self, init_fn: Callable, tx, rng):
        """(state, notes): the train state in its shardings, and one note per logical axis the mesh cannot split."""
        state, self.shardings, self.rules, notes = init_state(init_fn, tx, rng, self.mesh)
        return state, notes

    def context(self):
        return activation_sharding(self.mesh, self.rules)

    def reduce(self, tree):
        return tree  # one program over the global batch: nothing to add up

    def device_rng(self, rng):
        return rng

    def compile(self, step: Callable) -> Callable:
        return jax.jit(step, in_shardings=(self.shardings, self.batch_sharding), out_shardings=(self.shardings, None),
                       donate_argnums=0)

    def place(self, rows: dict) -> dict:
        return jax.tree_util.tree_map(
            lambda x: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(x)), rows)

    place_eval = place

    def one_copy(self, state):
        return state

    def spread(self, state):
        return state

    def copy_shardings(self, state):
        return self.shardings

    def put_params(self, new, old):
        put = lambda n, o, s: o if isinstance(n, jax.ShapeDtypeStruct) else \
            jax.make_array_from_callback(n.shape, s, lambda index: n[index])
        return jax.tree_util.tree_map(put, new, old, self.shardings["params"])

    def host(self, metrics: dict) -> dict:
        return jax.device_get(metrics)


class PmapLayout:
    """The state replicated on this process's devices (a leading device axis), batches ``[devices, b / devices,
    ...]``, the step `jax.pmap`ped over axis ``data``: each device differentiates its rows (with its own dropout) and
    the weights, gradients and sums are added with `lax.psum`. Evaluation runs on one device."""

    def __init__(self):
        self.n = jax.local_device_count()

    def init(self, init_fn: Callable, tx, rng):
        single = init_state(init_fn, tx, rng, make_mesh("data=1", jax.local_devices()[:1]))[0]
        return replicate(single, self.n), []

    def context(self):
        return contextlib.nullcontext()

    def reduce(self, tree):
        return jax.lax.psum(tree, "data")

    def device_rng(self, rng):
        return jax.random.fold_in(rng, jax.lax.axis_index("data"))  # each device its own dropout: other examples

    def compile(self, step: Callable) -> Callable:
        return jax.pmap(step, axis_name="data", donate_argnums=0)

    def place(self, rows: dict) -> dict:
        return shard_for_pmap(rows, self.n)

    def place_eval(self, rows: dict) -> dict:
        return jax.tree_util.tree_map(jnp.asarray, rows)

    def one_copy(self, state):
        return unreplicate(state)

    def spread(self, state):
        return replicate(state, self.n)

    def copy_shardings(self, state):
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree_util.tree_map(lambda _: device, state)

    def put_params(self, new, old):
        return jax.tree_util.tree_map(lambda n, o: o if isinstance(n, jax.ShapeDtypeStruct) else jnp.asarray(n), new,
                                      old)

    def host(self, metrics: dict) -> dict:
        return jax.device_get(unreplicate(metrics))  # every device holds the same, psum'd


class TrainStep:
    """The train step over a layout (`MeshLayout` or `PmapLayout`).

    Args:
      task: a `Task`; tx: the optax optimizer; init_fn: ``rng -> boxed params``; rng: the init key; layout: where
        the state and batches live; accum: micro-batches per step (gradient accumulation).

    Attributes: state (the train state, in the layout), layout, compiled (``(state, placed batch) -> (state,
    metrics)``, state donated), notes (one line per logical axis replicated because the mesh cannot split it
    evenly, `fit_rules`).
    """

    def __init__(self, task, tx, init_fn: Callable, rng, layout, accum: int = 1):
        self.task, self.layout = task, layout
        self.state, self.notes = layout.init(init_fn, tx, rng)

        def step(state, batch):
            with layout.context():
                weights = layout.reduce(task.weights(batch))
                rng = layout.device_rng(jax.random.fold_in(state["rng"], state["step"]))
                grads, sums = layout.reduce(grads_and_sums(task, state["params"], batch, rng, accum, weights))
                return apply_update(tx, state, grads, sums, weights)

        def evaluate(params, batch):
            with layout.context():
                return task.sums(params, batch, jax.random.key(0), False), task.weights(batch)

        self.compiled = layout.compile(step)
        self._eval = jax.jit(evaluate)

    def place(self, rows: dict) -> dict:
        """This process's rows of a batch (``[b / processes, ...]`` NumPy arrays) as the step takes them (safe to
        call from a prefetching thread)."""
        return self.layout.place(rows)

    def run(self, batch: dict) -> dict:
        """One step on a `place`d batch; returns the step's metrics (device scalars, see `apply_update`)."""
        self.state, metrics = self.compiled(self.state, batch)
        return metrics

    def __call__(self, rows: dict) -> dict:
        """`place` then `run`."""
        return self.run(self.place(rows))

    def host_metrics(self, metrics: dict) -> dict:
        """Metrics as host NumPy values (one copy)."""
        return self.layout.host(metrics)

    def saved_state(self) -> dict:
        """The state as checkpoints hold it (one copy)."""
        return self.layout.one_copy(self.state)

    def params(self):
        """The current parameters (one copy)."""
        return self.saved_state()["params"]

    def restore(self, ckpt: Checkpoints) -> dict | None:
        """Load the newest intact checkpoint into the state (onto this layout); its meta, or None if there is none."""
        single = self.saved_state()
        found = ckpt.restore_latest(single, self.layout.copy_shardings(single))
        if found is None:
            return None
        single, meta = found
        self.state = self.layout.spread(single)
        return meta

    def set_params(self, new) -> None:
        """Replace parameters by ``new`` (host arrays; leaves given as shape structs keep their values)."""
        single = dict(self.saved_state())
        single["params"] = self.layout.put_params(new, single["params"])
        self.state = self.layout.spread(single)

    def eval_sums(self, rows: dict):
        """Deterministic per-term sums and weights (scalars) of one evaluation batch, given as this process's rows
        (``[b / processes, ...]``)."""
        return self._eval(self.params(), self.layout.place_eval(rows))


def check_layout(parallel, batch_size: int, accum: int) -> None:
    """Raise `ValueError` (naming the keys) when ``train.batch_size`` cannot be split as the parallel layout and
    ``optim.grad_accum`` need, before anything is built or compiled."""
    if batch_size % accum:
        raise ValueError(f"train.batch_size ({batch_size}) must be a multiple of optim.grad_accum ({accum})")
    local = batch_size // jax.process_count()
    if parallel.mode == "pmap":
        n = jax.local_device_count()
        if local % (n * accum):
            raise ValueError(f"parallel.mode=pmap needs train.batch_size divisible by processes x devices x "
                             f"grad_accum ({jax.process_count() * n * accum}), got {batch_size}")
        return
    shards = mesh_batch_shards(parallel.mesh)
    if (batch_size // accum) % shards:
        raise ValueError(f"train.batch_size / optim.grad_accum ({batch_size // accum}) must divide over the "
                         f"{shards} batch shards of parallel.mesh={parallel.mesh!r} (data x fsdp)")


def make_step(parallel, task, tx, init_fn: Callable, rng, accum: int = 1) -> TrainStep:
    """The step ``parallel.mode`` asks for: over a `MeshLayout` of ``parallel.mesh``, or a `PmapLayout`."""
    layout = PmapLayout() if parallel.mode == "pmap" else MeshLayout(make_mesh(parallel.mesh))
    return TrainStep(task, tx, init_fn, rng, layout, accum)
