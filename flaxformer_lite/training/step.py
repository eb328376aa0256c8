"""The training step, in one home. A step object owns the train state and everything about its layout: building
the state, compiling the step, placing batches, gradient accumulation, the total loss, restoring and saving, and
the evaluation sums. The loop only calls it.

- `JitStep`: one `jax.jit` over a `Mesh` with explicit `NamedSharding`s and the state donated (what `pjit` became).
- `PmapStep`: `jax.pmap` over this process's devices, the state replicated, gradients summed with `lax.psum`
  (kept for parity with older code).

The train state is a dict: ``params``, ``opt_state``, ``step`` (int32), ``rng`` (key), ``finite`` (bool: every
loss so far was finite; checked before any checkpoint is written).
"""
from __future__ import annotations

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


class JitStep:
    """The train step as one `jax.jit` over ``mesh``: state built in its shardings and donated each step.

    Args:
      task: a `Task`; tx: the optax optimizer; init_fn: ``rng -> boxed params``; rng: the init key;
      mesh: the device mesh; accum: micro-batches per step (gradient accumulation).

    Attributes: state (the train state, in its shardings), shardings, batch_sharding, compiled (the jitted
    ``(state, global batch) -> (state, metrics)``, state donated, traced with the logical-axis rules active so that
    activation constraints take effect), notes (one line per logical axis replicated because the mesh cannot split
    it evenly, `fit_rules`).
    """

    def __init__(self, task, tx, init_fn: Callable, rng, mesh, accum: int = 1):
        self.task, self.mesh = task, mesh
        self.state, self.shardings, rules, self.notes = init_state(init_fn, tx, rng, mesh)
        self.batch_sharding = batch_sharding(mesh)

        def step(state, batch):
            with activation_sharding(mesh, rules):
                weights = task.weights(batch)
                rng = jax.random.fold_in(state["rng"], state["step"])
                grads, sums = grads_and_sums(task, state["params"], batch, rng, accum, weights)
                return apply_update(tx, state, grads, sums, weights)

        def evaluate(params, batch):
            with activation_sharding(mesh, rules):
                return task.sums(params, batch, jax.random.key(0), False), task.weights(batch)

        self.compiled = jax.jit(step, in_shardings=(self.shardings, self.batch_sharding),
                             out_shardings=(self.shardings, None), donate_argnums=0)
        self._eval = jax.jit(evaluate)

    def to_device(self, rows: dict) -> dict:
        """This process's rows of a batch -> global arrays over the mesh."""
        return jax.tree_util.tree_map(
            lambda x: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(x)), rows)

    def place(self, rows: dict) -> dict:
        """This process's rows of a batch (``[b / processes, ...]`` NumPy arrays) as the step takes them: global
        arrays over the mesh (safe to call from a prefetching thread)."""
        return self.to_device(rows)

    def run(self, batch: dict) -> dict:
        """One step on a `place`d batch; returns the step's metrics (device scalars, see `apply_update`)."""
        self.state, metrics = self.compiled(self.state, batch)
        return metrics

    def __call__(self, rows: dict) -> dict:
        """`place` then `run`."""
        return self.run(self.place(rows))

    def host_metrics(self, metrics: dict) -> dict:
        """Metrics as host NumPy values."""
        return jax.device_get(metrics)

    def saved_state(self) -> dict:
        """The state as checkpoints hold it (one copy, in its shardings)."""
        return self.state

    def params(self):
        """The current parameters (one copy)."""
        return self.state["params"]

    def restore(self, ckpt: Checkpoints) -> dict | None:
        """Load the newest intact checkpoint into the state (onto this mesh); its meta, or None if there is none."""
        found = ckpt.restore_latest(self.state, self.shardings)
        if found is None:
            return None
        self.state, meta = found
        return meta

    def set_params(self, new) -> None:
        """Replace parameters by ``new`` (host arrays; leaves given as shape structs keep their values)."""
        place = lambda n, old, s: old if isinstance(n, jax.ShapeDtypeStruct) else \
            jax.make_array_from_callback(n.shape, s, lambda index: n[index])
        self.state["params"] = jax.tree_util.tree_map(place, new, self.state["params"], self.shardings["params"])

    def eval_sums(self, rows: dict):
        """Deterministic per-term sums and weights (scalars) of one evaluation batch, given as this process's rows
        (``[b / processes, ...]``)."""
        return self._eval(self.state["params"], self.to_device(rows))


class PmapStep:
    """The train step with `jax.pmap` over this process's devices: the state replicated, each device
    differentiating its share of the batch (divided by the global token count) and gradients summed with
    `lax.psum`. Same arguments as `JitStep`, without the mesh. Attributes: state (replicated, a leading device
    axis), n (devices), compiled (the pmapped ``(state, batch [n, b / n, ...]) -> (state, metrics)``)."""

    def __init__(self, task, tx, init_fn: Callable, rng, accum: int = 1):
        self.task, self.n, self.notes = task, jax.local_device_count(), []
        single = init_state(init_fn, tx, rng, make_mesh("data=1", jax.local_devices()[:1]))[0]
        self.state = replicate(single, self.n)

        def step(state, batch):
            weights = jax.tree_util.tree_map(lambda w: jax.lax.psum(w, "data"), task.weights(batch))
            # each device its own dropout: its rows are other examples
            rng = jax.random.fold_in(jax.random.fold_in(state["rng"], state["step"]), jax.lax.axis_index("data"))
            grads, sums = grads_and_sums(task, state["params"], batch, rng, accum, weights)
            grads, sums = jax.lax.psum((grads, sums), "data")
            return apply_update(tx, state, grads, sums, weights)

        self.compiled = jax.pmap(step, axis_name="data", donate_argnums=0)
        self._eval = jax.jit(lambda params, batch: (task.sums(params, batch, jax.random.key(0), False),
                                                    task.weights(batch)))

    def place(self, rows: dict) -> dict:
        """This process's rows of a batch as pmap takes them: ``[devices, b / devices, ...]``."""
        return shard_for_pmap(rows, self.n)

    def run(self, batch: dict) -> dict:
        """One step on a `place`d batch; returns the step's metrics (per device)."""
        self.state, metrics = self.compiled(self.state, batch)
        return metrics

    def __call__(self, rows: dict) -> dict:
        """`place` then `run`."""
        return self.run(self.place(rows))

    def host_metrics(self, metrics: dict) -> dict:
        """The first device's metrics (all devices hold the same, psum'd) as host values."""
        return jax.device_get(unreplicate(metrics))

    def saved_state(self) -> dict:
        """The state as checkpoints hold it (the first device's copy)."""
        return unreplicate(self.state)

    def params(self):
        """The current parameters (one copy)."""
        return unreplicate(self.state)["params"]

    def restore(self, ckpt: Checkpoints) -> dict | None:
        """Load the newest intact checkpoint (onto one device, then replicated); its meta, or None."""
        single = unreplicate(self.state)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        found = ckpt.restore_latest(single, jax.tree_util.tree_map(lambda _: device, single))
        if found is None:
            return None
        single, meta = found
        self.state = replicate(single, self.n)
        return meta

    def set_params(self, new) -> None:
        """Replace parameters by ``new`` (host arrays; leaves given as shape structs keep their values)."""
        single = unreplicate(self.state)
        single["params"] = jax.tree_util.tree_map(
            lambda n, old: old if isinstance(n, jax.ShapeDtypeStruct) else jnp.asarray(n), new, single["params"])
        self.state = replicate(single, self.n)

    def eval_sums(self, rows: dict):
        """Deterministic per-term sums and weights of one evaluation batch (on one device)."""
        return self._eval(self.params(), jax.tree_util.tree_map(jnp.asarray, rows))


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


def make_step(parallel, task, tx, init_fn: Callable, rng, accum: int = 1):
    """The step object ``parallel.mode`` asks for: `JitStep` over ``parallel.mesh`` or `PmapStep`."""
    if parallel.mode == "pmap":
        return PmapStep(task, tx, init_fn, rng, accum)
    return JitStep(task, tx, init_fn, rng, make_mesh(parallel.mesh), accum)
