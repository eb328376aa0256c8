"""Host memory settings for XLA's CPU backend.

XLA:CPU asks the C allocator for every step's buffers afresh (about 2 GB per GPT-2-small step at batch 4 x 256).
glibc serves blocks over 32 MB with ``mmap`` and unmaps them on free, so each step faults all of that memory in
again, 4 KiB at a time: about 500,000 page faults and a second of kernel time per step on the 2-core CI machine, and
the large matmuls that write fresh output run at about 290 instead of 400 GFLOP/s. `keep_freed_memory` makes glibc
keep and reuse freed blocks instead (measured in benchmarks/RESULTS.md).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc <malloc.h>
_applied = False


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge  # private: no public way to ask without starting a backend
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return False


_ACCELERATOR_PACKAGES = ("jax-cuda", "jax-rocm", "libtpu")  # distributions that give JAX a GPU or TPU backend


def backend_is_cpu() -> bool:
    """Whether JAX will run on the CPU, told without starting a backend: ``JAX_PLATFORMS`` if set, else whether a
    GPU or TPU plugin is installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0] == "cpu"
    names = (d.metadata["Name"] or "" for d in importlib.metadata.distributions())
    return not any(n.lower().replace("_", "-").startswith(_ACCELERATOR_PACKAGES) for n in names)


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse: no ``mmap`` for large blocks, one arena, no trimming.

    Call it once at the start of a program, before JAX starts a backend (before the first array, device query or
    ``jax.distributed.initialize``): the arena limit only holds for threads started afterwards, and XLA's thread
    pools are started with the backend. ``train.py`` and ``benchmarks/train_step.py`` call it first thing.

    The process then keeps its peak heap for its lifetime instead of returning it to the OS between steps, which is
    what a training or benchmark process wants. Returns True when applied, False (changing nothing) off Linux/glibc,
    when JAX will run on a GPU or TPU (`backend_is_cpu`: the trick is for XLA:CPU's buffers; an accelerator's live
    in its own memory) or once a JAX backend is running. Idempotent."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux") or _backends_started() or not backend_is_cpu():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: mallopt is a no-op stub or absent
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))  # -1: never trim (mallopt(3))
    _applied = all(mallopt(param, value) == 1 for param, value in settings)
    return _applied
