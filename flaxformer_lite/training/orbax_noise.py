"""Orbax's own reports of a checkpoint fault, kept out of the user's terminal: one damaged file makes Orbax log a
traceback per array read and thread, and its abandoned readers print more as they are collected (7,088 lines for one
deleted file). `attempt` runs one restore try with its reports held back (replayed only when it succeeds) and says
why it failed in one short line (`reason`); `quiet_orbax_errors` drops the reports that arrive later (readers a
failed restore left behind, a failing save's threads). `checkpoint.Checkpoints` says each fault once itself.
"""
from __future__ import annotations

import gc
import logging
import re
import sys
import warnings


class _OrbaxErrors(logging.Filter):
    """Drops Orbax's own error records: it logs a traceback per failed file and thread (over a hundred for one full
    disk, or for the readers a failed restore left behind), and `Checkpoints` reports each failure once itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = str(record.msg)
        # asyncio's name the Orbax coroutine, or the TensorStore error of a future
        return not any(name in record.pathname or name in message for name in ("orbax", "tensorstore"))


_ORBAX_ERRORS = _OrbaxErrors()


def quiet_orbax_errors(loggers=("", "absl", "orbax", "asyncio")) -> None:
    """From now on, drop Orbax's error records (of ``loggers``) and its unraisable exceptions (`_orbax_noise`):
    armed by the first save, whose failures `_reported` says in one line, and by a failed restore (asyncio's records
    only), whose readers (still running, or pending tasks of a closed event loop) report their errors after it, from
    other threads or when collected."""
    for name in loggers:
        logger = logging.getLogger(name)
        if _ORBAX_ERRORS not in logger.filters:
            logger.addFilter(_ORBAX_ERRORS)
    if not getattr(sys.unraisablehook, "ffl_quiet", False):
        sys.unraisablehook = _without_orbax_noise(sys.unraisablehook)


def _without_orbax_noise(hook):
    """``hook`` (a `sys.unraisablehook`) less Orbax's unraisable exceptions."""
    def unraisable(info):
        if not _orbax_noise(info):
            hook(info)
    unraisable.ffl_quiet = True
    return unraisable


def reason(err: BaseException) -> str:
    """Why a checkpoint cannot be read, in one short line: the innermost cause (TensorStore's, under Orbax's
    "Encountered error while reading array index"), without its spec and folders (the caller names the step's)."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = re.sub(r' in OCDBT database at local file "[^"]*"| \[tensorstore_spec=.*', "", str(err), flags=re.S)
    text = re.sub(r'local file "[^"]*/([^"/]+)"', r"file \1", text)
    first = (text.strip().splitlines() or [""])[0].split(". See full TensorStore details")[0]
    return f"{type(err).__name__}: {first[:240]}" if first else type(err).__name__


def attempt(read, *args):
    """``(read(*args), None)``, or ``(None, why)`` when it raises: one try at reading a checkpoint, Orbax's reports
    of a failed read dropped (see `_QuietRestore`)."""
    with _QuietRestore() as quiet:
        try:
            return read(*args), None
        except Exception as err:  # noqa: BLE001  Orbax/TensorStore raise many types for one damaged file
            why = reason(err)
        quiet.failed()
    return None, why


_QUIET_LOGGERS = ("", "absl", "orbax", "asyncio", "tensorstore")


class _QuietRestore(logging.Filter):
    """Around one restore attempt: the log records of Orbax and of the asyncio loops it reads with are held back
    (those of the root logger only when Orbax made them) and replayed when the attempt succeeds, so a healthy
    restore shows whatever it logs. A failed one (`failed`) drops them, with the tracebacks its abandoned readers
    print as they are garbage-collected (one per array, over a hundred for one missing file): it collects them here,
    and drops their "Exception ignored" reports and "never awaited" warnings; `_set_aside` says it in one line."""

    def __enter__(self):
        self.held: list[logging.LogRecord] = []
        self._hook, self._drop = sys.unraisablehook, False
        sys.unraisablehook = self._unraisable
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).addFilter(self)
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", r"coroutine '.*' was never awaited", RuntimeWarning)
        return self

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "root" and "orbax" not in record.pathname:
            return True
        self.held.append(record)
        return False

    def failed(self) -> None:
        """The attempt failed: drop what it reported, and collect the readers it abandoned now (each reports its
        error as it goes); what those still running report later is dropped too (`quiet_orbax_errors`)."""
        self._drop = True
        gc.collect()

    def _unraisable(self, info) -> None:
        if not _orbax_noise(info):
            self._hook(info)

    def __exit__(self, exc_type, *exc):
        self._warnings.__exit__(None, None, None)
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).removeFilter(self)
        if sys.unraisablehook == self._unraisable:
            sys.unraisablehook = self._hook
        if self._drop:
            quiet_orbax_errors(("asyncio",))
        elif exc_type is None:
            for record in self.held:
                logging.getLogger(None if record.name == "root" else record.name).handle(record)
        self.held = []
        return False


def _orbax_noise(info) -> bool:
    """Whether an unraisable exception comes from Orbax's readers: one raised in Orbax's code (a reader coroutine
    closed unfinished), or "Event loop is closed" from a reader thread finishing late."""
    if isinstance(info.exc_value, RuntimeError) and str(info.exc_value) == "Event loop is closed":
        return True
    tb = info.exc_traceback
    while tb is not None:
        if "orbax" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    code = getattr(info.object, "cr_code", None)
    return code is not None and "orbax" in code.co_filename
