"""One run per run folder: an exclusive `flock` on ``<run>/.lock``, taken before anything in the folder is written.

The kernel releases the lock when its process ends, however it ends (SIGKILL, a crash, a preempted node), so a
dead run never blocks the next one. The file also names the owner (pid, host, start time) for the message a second
run gets, and is removed when the run ends. On a shared filesystem the lock holds across hosts where the
filesystem supports `flock` (local disks, NFSv4, Lustre with ``flock``).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ..safe_io import open_no_follow


class RunLock:
    """The lock of ``run_dir``; a context manager (``with RunLock(run_dir): ...``), or `acquire` / `release`.

    Attributes: path (the lock file)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise `ValueError` naming the run that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            fd = open_no_follow(self.path, os.O_RDWR | os.O_CREAT)  # a planted link: refused, not truncated
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ValueError(self._held_message()) from None
            if _same_file(fd, self.path):  # not a file its previous owner unlinked while we opened it
                break
            os.close(fd)
        else:
            raise ValueError(f"{self.path} keeps changing under this run; is another run starting there?")
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self._fd = fd

    def _held_message(self) -> str:
        try:
            owner = json.loads(self.path.read_text())
            who = f"process {owner['pid']} on {owner['host']} (since {owner['started']})"
        except (OSError, ValueError, KeyError, TypeError):
            who = "another run"
        return (f"train.run_dir {str(self.path.parent)!r} is in use by {who}; wait for it, stop it, or use another "
                "train.run_dir")

    def release(self) -> None:
        """Remove the lock file and release the lock, if this object holds it."""
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked: a waiting run then opens a new file
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False
