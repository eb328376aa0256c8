"""Batches built ahead of the step: a background thread makes (and places on the devices) the batches of the next
steps while the current one runs, so a fast accelerator never waits for the host when the host can keep up.
Batch ``step`` is a pure function of the step, so building it early changes nothing in what is trained.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable


class Prefetch:
    """``make(step)`` for ``step`` in ``[start, stop)``, up to ``depth`` steps ahead, in a daemon thread; a context
    manager. `get` returns them in order (re-raising an error of ``make`` there); `waited` is the seconds `get`
    spent blocked, which `take_waited` returns and resets."""

    def __init__(self, make: Callable[[int], Any], start: int, stop: int, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(make, start, stop), daemon=True,
                                        name="flaxformer_lite-prefetch")
        self.waited = 0.0

    def _fill(self, make, start: int, stop: int) -> None:
        for step in range(start, stop):
            try:
                item = (step, make(step), None)
            except BaseException as err:  # noqa: BLE001  handed to the consumer, raised there
                item = (step, None, err)
            while not self._closed.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None or self._closed.is_set():
                return

    def get(self, step: int):
        """The batch of ``step`` (the next one in order)."""
        t = time.perf_counter()
        got, batch, err = self._queue.get()
        self.waited += time.perf_counter() - t
        if err is not None:
            raise err
        if got != step:
            raise RuntimeError(f"prefetch out of order: asked for step {step}, got {got}")
        return batch

    def take_waited(self) -> float:
        """Seconds blocked in `get` since the last call."""
        waited, self.waited = self.waited, 0.0
        return waited

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._closed.set()
        self._thread.join(timeout=10)
