"""`keep_freed_memory`: after it, a large block freed and allocated again is served from kept memory (no page
faults); without it glibc unmaps and re-faults the block. Runs in fresh processes: the setting is process-wide and
must come before a JAX backend starts."""
import platform
import subprocess
import sys

import pytest

SCRIPT = """
import ctypes, resource, sys
from flaxformer_lite.training.host import keep_freed_memory
if sys.argv[1] == "after-backend":
    import jax; jax.devices()
applied = keep_freed_memory() if sys.argv[1] != "system" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
size = 64 << 20  # 64 MiB: glibc would mmap it, and unmap it on free
def touch():
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    return block
libc.free(touch())
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

pytestmark = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")


def _run(mode: str, env=None) -> tuple[bool, int]:
    import os
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stderr
    applied, faults = out.stdout.split()[-2:]
    return applied == "True", int(faults)


def test_freed_blocks_are_reused_without_page_faults():
    applied, kept_faults = _run("keep")
    assert applied
    _, system_faults = _run("system")
    assert system_faults > 10_000  # 64 MiB of 4 KiB pages faulted in again: what the setting removes
    assert kept_faults < 1_000


def test_refused_once_a_backend_runs():
    applied, faults = _run("after-backend")
    assert not applied  # XLA's threads already have their arenas: it would not hold, so nothing is changed
    assert faults > 10_000


def test_left_alone_when_jax_will_run_on_an_accelerator(monkeypatch):
    from flaxformer_lite.training.host import backend_is_cpu
    applied, faults = _run("keep", env={"JAX_PLATFORMS": "cuda"})
    assert not applied and faults > 10_000  # a GPU's buffers live on the GPU: glibc is left as it is
    monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
    assert not backend_is_cpu()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert backend_is_cpu()
