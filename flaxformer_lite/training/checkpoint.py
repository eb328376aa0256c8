"""Orbax checkpoints behind one small interface: asynchronous, atomic saves (Orbax writes to a temporary folder and
renames it), keeping the last N; the latest step; and restore onto whatever shardings the caller gives, so a
checkpoint written on one mesh restores onto another. Each checkpoint holds the train state and a JSON ``meta``
(loader position, config)."""
from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class Checkpoints:
    """Checkpoints of one run under ``directory``. Attributes: manager (the `ocp.CheckpointManager`)."""

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        """Start saving ``state`` (any pytree of arrays) and ``meta`` (JSON-able) as ``step``; returns at once."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, target, shardings=None):
        """``(state, meta)`` of ``step``, laid out like ``target`` (arrays or shape structs) with ``shardings``
        (default: each target leaf's own sharding)."""
        if shardings is None:
            shardings = jax.tree_util.tree_map(lambda x: getattr(x, "sharding", None), target)
        abstract = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                          target, shardings)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                 meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def restore_params(self, step: int | None = None):
        """``(params, meta)`` of ``step`` (default the latest) on one device, whatever mesh wrote it, without a
        target state: for starting another run (e.g. fine-tuning) from this one's weights."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"{self.directory} holds no checkpoint")
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        saved = self.manager.item_metadata(step)["state"]
        target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
        state, meta = self.restore(step, target)
        return state["params"], meta

    def wait(self) -> None:
        """Block until pending saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
