"""One run per run folder: a lock file (``<run>/.lock``, JSON with the owner's pid, host and start time) taken
before anything in the folder is written and removed when the run ends.

A live owner on this host, or any owner on another host (whose liveness cannot be checked from here), makes a
second run fail with a one-line `ValueError`; a lock left by a dead process on this host is taken over.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """The lock of ``run_dir``; a context manager (``with RunLock(run_dir): ...``), or `acquire` / `release`.

    Attributes: path (the lock file)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self._held = False

    def acquire(self) -> None:
        """Take the lock, or raise `ValueError` naming the owner while it lives."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):  # at most one stale lock to clear
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._clear_stale_or_refuse()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._held = True
            return
        raise ValueError(f"{self.path.parent} is being taken by another run at this moment; try again")

    def _clear_stale_or_refuse(self) -> None:
        try:
            owner = json.loads(self.path.read_text())
            pid, host = int(owner["pid"]), str(owner["host"])
        except (OSError, ValueError, KeyError, TypeError):  # torn by a crash between create and write
            if time.time() - _mtime(self.path) < 5:
                raise ValueError(f"{self.path.parent} is being taken by another run at this moment") from None
            self.path.unlink(missing_ok=True)
            return
        if host == socket.gethostname() and not _alive(pid):
            self.path.unlink(missing_ok=True)  # its owner died without releasing it
            return
        where = "this host" if host == socket.gethostname() else f"host {host}"
        raise ValueError(f"train.run_dir {str(self.path.parent)!r} is in use by process {pid} on {where} (since "
                         f"{owner.get('started', '?')}); wait for it, stop it, or use another train.run_dir"
                         + ("" if where == "this host" else f" (if that run is gone, delete {self.path})"))

    def release(self) -> None:
        """Remove the lock if this object holds it."""
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
