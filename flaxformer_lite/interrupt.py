"""Ctrl-C before a command's main work is ready to stop gracefully (data, tokenizer, compilation): it raises
KeyboardInterrupt at once, as usual, and is also remembered, because Python drops an exception raised inside a
garbage-collection callback (JAX has one): a Ctrl-C lost that way stops the training loop after its first step, with
a checkpoint (`training.loop`). Plain Python, no JAX (the ground floor), so a command installs it first."""
from __future__ import annotations

import signal
import sys

_state = {"interrupted": False}


def interrupted_early() -> bool:
    """Whether a Ctrl-C came before the training loop took over SIGINT."""
    return _state["interrupted"]


def watch_ctrl_c() -> None:
    """Install the handler (from the main thread of a command-line program). Dropped KeyboardInterrupts are not
    printed as tracebacks."""
    previous_hook = sys.unraisablehook

    def handle(signum, frame):
        _state["interrupted"] = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handle)
    sys.unraisablehook = lambda u: None if u.exc_type is KeyboardInterrupt else previous_hook(u)
