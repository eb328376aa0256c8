"""Orbax checkpoints behind one small interface: asynchronous, atomic saves (Orbax writes to a temporary folder and
renames it), keeping the last N; the latest step; and restore onto whatever shardings the caller gives, so a
checkpoint written on one mesh restores onto another. Each checkpoint holds the train state and a JSON ``meta``
(loader position, config).

Faults never cost what is already saved: a checkpoint that cannot be read (a truncated or missing file) is moved
aside to ``<run>/damaged_checkpoints/`` with a one-line warning and the next older one is used; a save that fails
(e.g. a full disk) is reported in one line, recorded in `unsaved`, and the earlier checkpoints stay. Orbax's own
reports of such a fault (a traceback per array read and thread) are not shown (orbax_noise.py).
"""
from __future__ import annotations

import contextlib
import shutil
import sys
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from ..safe_io import refuse_link
from .orbax_noise import attempt, quiet_orbax_errors
from .parallel import all_processes


class Checkpoints:
    """Checkpoints of one run under ``directory``. Attributes: manager (the `ocp.CheckpointManager`)."""

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        _refuse_links(self.directory, self._aside_dir())
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self.unsaved: list[tuple[int, str]] = []  # (step, reason) of saves that failed
        self._pending: int | None = None  # the step an asynchronous save is writing

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        """Start saving ``state`` (any pytree of arrays) and ``meta`` (JSON-able) as ``step``; returns at once.
        A failure (of this save, or of the previous one, which surfaces now) is reported, not raised."""
        self._settle()
        quiet_orbax_errors()
        with _reported(self, step):
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            meta=ocp.args.JsonSave(meta)), force=True)
            self._pending = step

    def _settle(self) -> None:
        """Wait for the save in flight; report it if it failed."""
        if self._pending is None:
            return
        step, self._pending = self._pending, None
        with _reported(self, step):
            self.manager.wait_until_finished()
            self.manager.check_for_errors()

    def restore_latest(self, target, shardings=None):
        """``(state, meta)`` of the newest checkpoint that reads back whole (see `restore`), or None when there is
        none. One that cannot be read, even on its own terms, is warned about and moved aside, and the next older
        one tried; `ValueError` if none can be read, or if one reads on its own but not as ``target`` (the run's
        optimizer or model settings changed). Every process takes the same decision (a collective)."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        for step in steps:
            found, err = attempt(self.restore, step, target, shardings)
            if all_processes(found is not None):
                return found
            if all_processes(self._readable(step)):
                raise ValueError(f"checkpoint step {step} ({self.directory / str(step)}) holds another train state "
                                 f"than this run builds ({err or 'on another process'}): the optimizer or model "
                                 "settings differ from the run's config.yaml; resume with those, or give a new "
                                 "train.run_dir")
            self._set_aside(step, err)
        if steps:
            raise ValueError(f"no checkpoint in {self.directory} can be read (steps {steps} are damaged; moved to "
                             f"{self._aside_dir()}); start over with a new train.run_dir")
        aside = sorted(p.name for p in self._aside_dir().iterdir()) if self._aside_dir().is_dir() else []
        if aside:  # every checkpoint was set aside before: starting at step 0 would rewrite metrics.jsonl
            raise ValueError(f"every checkpoint of this run was set aside as damaged ({self._aside_dir()}: "
                             f"{', '.join(aside[:5])}); starting again at step 0 would rewrite its metrics: give a "
                             f"new train.run_dir, or remove {self._aside_dir()} to start over in this one")
        return None

    def _readable(self, step: int) -> bool:
        """Whether ``step`` reads back whole with its own structure (on one device)."""
        return attempt(self._params_of, step)[1] is None

    def _aside_dir(self) -> Path:
        return self.directory.parent / "damaged_checkpoints"

    def _set_aside(self, step: int, err: str | None) -> None:
        """Move damaged checkpoint ``step`` out of the way (process 0), keeping its files, and say so in one line
        (``err``: why it cannot be read)."""
        where = self.directory / str(step)
        dest = self._aside_dir() / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0 and where.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(where), dest)
        _warn(f"checkpoint step {step} cannot be read ({err or 'on another process'}); moved {where} to {dest}; "
              f"{'trying an older one' if len(self.manager.all_steps()) > 1 else 'none older'}")
        self.manager.reload()

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
        """``(params, meta)`` of ``step`` (default: the newest that reads back whole, damaged newer ones skipped
        with a warning, left in place) on one device, whatever mesh wrote it, without a target state: for starting
        another run (e.g. fine-tuning) from this one's weights."""
        steps = sorted(self.manager.all_steps(), reverse=True) if step is None else [step]
        if not steps:
            raise ValueError(f"{self.directory} holds no checkpoint")
        for s in steps:
            found, err = attempt(self._params_of, s)
            if err is None:
                return found
            if step is not None:
                raise ValueError(f"checkpoint {self.directory / str(s)} cannot be read: {err}")
            _warn(f"checkpoint step {s} cannot be read ({self.directory / str(s)}: {err})")
        raise ValueError(f"no checkpoint in {self.directory} can be read (steps {steps} are damaged)")

    def _params_of(self, step: int):
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        saved = self.manager.item_metadata(step)["state"]
        target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
        state, meta = self.restore(step, target)
        return state["params"], meta

    def wait(self) -> None:
        """Block until pending saves are on disk (or reported failed)."""
        self._settle()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self._settle()
        with contextlib.suppress(Exception):
            self.manager.close()


def _refuse_links(*folders: Path) -> None:
    """`ValueError` (`safe_io.refuse_link`) if a checkpoint folder, or anything in it, is a symbolic link: Orbax
    would write checkpoints where it points, read them from there, and delete old ones through it."""
    for folder in folders:
        refuse_link(folder)
        for path in folder.iterdir() if folder.is_dir() else ():
            refuse_link(path)


_OS_FAULTS = ("No space left on device", "Disk quota exceeded", "Read-only file system", "Permission denied")


def _one_line(err: BaseException) -> str:
    """A short reason: the operating-system fault when there is one, else the error's first line."""
    text = str(err)
    for fault in _OS_FAULTS:
        if fault in text:
            return fault
    first = (text.strip().splitlines() or [""])[0].split(". See full TensorStore details")[0]
    return f"{type(err).__name__}: {first[:160]}" if first else type(err).__name__


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _reported(ckpt: Checkpoints, step: int):
    """Turn a failed save of ``step`` into one line and an `unsaved` entry; earlier checkpoints are untouched."""
    try:
        yield
    except Exception as err:  # noqa: BLE001  OSError, or Orbax wrapping it in its own types
        if all(s != step for s, _ in ckpt.unsaved):
            ckpt.unsaved.append((step, _one_line(err)))
            kept = sorted(ckpt.manager.all_steps())
            _warn(f"checkpoint step {step} not saved ({_one_line(err)}); kept: steps {kept or 'none'}")
