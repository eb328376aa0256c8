"""The GPU check's pre-flight: versions, the device JAX sees, every entry point imported, and which optional packages
are here (a missing one is named on one line with the sections it changes).

    python benchmarks/preflight.py --expect gpu     # exit 1 if JAX does not see a GPU, or an entry point fails
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]

# Everything the check (and a user on the GPU image) imports: the package's parts, the CLI, the benchmarks.
ENTRY_POINTS = [
    "flaxformer_lite", "flaxformer_lite.attention", "flaxformer_lite.attention.softmax.flash",
    "flaxformer_lite.attention.recurrent.linear_pallas", "flaxformer_lite.attention.recurrent.delta_pallas",
    "flaxformer_lite.attention.softmax.splash", "flaxformer_lite.layers", "flaxformer_lite.models",
    "flaxformer_lite.decoding", "flaxformer_lite.training", "flaxformer_lite.data", "flaxformer_lite.interop", "flaxformer_lite.experiment",
    "flaxformer_lite.nnx", "train", "harness", "attention", "fused_probe", "train_step",
    "jax.experimental.pallas.ops.gpu.attention",
]
# optional package (import name) -> what its absence changes in the check
OPTIONAL = {
    "xdist": "kernel tests run in one process (pytest-xdist missing: no -n)",
    "tokamax": "fused attention: the tokamax-cudnn row reports 'fails' (carry its wheels in .whl/)",
    "datasets": "no section of this check (train.py and data.prepare need it to read a corpus)",
    "transformers": "no section of this check (train_step's hf-flax/hf-torch peers, interop tests)",
}


def versions() -> None:
    import jax  # noqa: PLC0415
    print(f"python {platform.python_version()} ({sys.executable})")
    for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "numpy", "sentencepiece", "pytest", "triton"):
        try:
            module = importlib.import_module(name)
            print(f"  {name} {getattr(module, '__version__', '?')}")
        except ImportError:
            print(f"  {name}: not installed")
    print(f"jax backend {jax.default_backend()}, devices {jax.devices()}")


def entry_points() -> list[str]:
    """Import each entry point; return those that failed (each printed with its error's last line)."""
    failed = []
    for name in ENTRY_POINTS:
        start = time.perf_counter()
        try:
            importlib.import_module(name)
            print(f"  import {name}: ok ({time.perf_counter() - start:.1f} s)")
        except Exception:  # noqa: BLE001  any failure is a finding, reported in one line
            failed.append(name)
            print(f"  import {name}: FAILED: {traceback.format_exc().strip().splitlines()[-1]}")
    return failed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--expect", choices=("gpu", "cpu", "any"), default="any", help="the backend JAX must see")
    args = p.parse_args(argv)
    versions()
    import jax  # noqa: PLC0415
    status = 0
    if args.expect != "any" and jax.default_backend() != args.expect:
        print(f"FAILED: expected JAX on {args.expect}, it runs on {jax.default_backend()} "
              "(is jax's CUDA plugin installed and matched to jaxlib?)")
        status = 1
    for name, effect in OPTIONAL.items():
        found = importlib.util.find_spec(name) is not None
        print(f"optional {name}: {'here' if found else 'missing -> ' + effect}")
    failed = entry_points()
    if failed:
        print(f"FAILED: {len(failed)} entry point(s) do not import: {', '.join(failed)}")
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
