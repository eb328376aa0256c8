"""Metrics: the ``metrics.jsonl`` log (one JSON object per logged step), model FLOPs per token, the matmul ceiling
measured in this process (for MFU), and turning a step's sums into readable numbers."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..names import SHARED_LAYER
from ..safe_io import append_text, refuse_link, write_atomic


class MetricsLog:
    """Appends JSON lines to ``path``. On resume from step s, lines past s (logged after the last checkpoint, then
    lost) are dropped first, so the file reads as one uninterrupted run. When `tensorboardX` is installed (the
    ``tensorboard`` extra) the same scalars also go to TensorBoard event files in ``<run>/tensorboard``."""

    def __init__(self, path: str | Path, resume_from: int = 0, enabled: bool = True):
        self.path, self.enabled, self.tb = Path(path), enabled, None
        self.failed = False  # a write failed (e.g. a full disk): said once, then the run goes on
        if not enabled:
            return
        refuse_link(self.path)  # before anything is read or made: its records are the run's, not a linked file's
        refuse_link(self.path.parent / "tensorboard")  # its event files go in the run folder, not where a link points
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=resume_from + 1)
        except ImportError:
            pass
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_from]
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))  # old or new, never half

    def write(self, record: dict) -> None:
        """Append one record."""
        if not self.enabled:
            return
        try:
            append_text(self.path, json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")
            if self.tb is not None:
                for key, value in record.items():
                    if key != "step" and isinstance(_plain(value), (int, float)):
                        self.tb.add_scalar(key, _plain(value), record.get("step", 0))
                self.tb.flush()
        except OSError as err:
            if not self.failed:
                print(f"warning: {self.path.parent}: cannot write metrics ({err.strerror or err}); the run goes on",
                      file=sys.stderr)
            self.failed = True

    def close(self) -> None:
        """Close the TensorBoard writer, if any."""
        if self.tb is not None:
            self.tb.close()


def _plain(value):
    if isinstance(value, (np.generic, jax.Array)):
        return value.item()
    return value


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a ``metrics.jsonl``. A torn last line (a write cut short by a kill or a full disk) is left out
    with a warning; a bad line elsewhere raises `ValueError` naming the file and the line."""
    lines = [(i, line) for i, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1)
             if line.strip()]
    records = []
    for i, line in lines:
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise json.JSONDecodeError("not an object", line, 0)
            records.append(record)
        except json.JSONDecodeError:
            if i != lines[-1][0]:
                raise ValueError(f"{path}: line {i} is not a JSON record; fix or remove that line") from None
            print(f"warning: {path}: the last line (line {i}) is incomplete; left out", file=sys.stderr)
    return records


def summarize(sums: dict, **extra) -> dict:
    """A step's host sums -> ``loss``, per-term accuracies (and losses), ``grad_norm`` and the given extras. A run
    of one loss term logs ``accuracy``; several log ``<term>_accuracy`` and ``<term>_loss``."""
    out = {**extra, "loss": float(sums["loss"]), "grad_norm": float(sums["grad_norm"])}
    terms = [k[:-len("_weight")] for k in sums if k.endswith("_weight")]
    for term in terms:
        w = max(float(sums[f"{term}_weight"]), 1.0)
        prefix = "" if len(terms) == 1 else f"{term}_"
        out[f"{prefix}accuracy"] = float(sums[f"{term}_correct"]) / w
        if prefix:
            out[f"{term}_loss"] = float(sums[f"{term}_nll"]) / w
    return out


def count_params(params, exclude_positions: bool = False, shared_repeats: int = 1) -> int:
    """Number of parameters in a tree; optionally without a learned position table (which costs no FLOPs), and with
    a ``shared_layer`` (ALBERT sharing) counted ``shared_repeats`` times, once per depth it runs at."""
    def count(tree, name=None) -> int:
        if isinstance(tree, dict):
            n = sum(count(v, k) for k, v in tree.items())
            return n * shared_repeats if name == SHARED_LAYER else n
        return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))

    n = count(params)
    if exclude_positions and isinstance(params, dict):
        root = params.get("backbone", params)  # a fine-tuning head's backbone
        table = root.get("embedder", {}).get("position", {}).get("embedding")
        n -= 0 if table is None else int(np.prod(table.shape))
    return n


def flops_per_token(num_params: int, model_cfg, seq_len: int) -> float:
    """Training FLOPs per token: 6 N (N = parameters doing matmuls) plus attention 12 L T d (Kaplan et al. 2020,
    PaLM appendix B), forward and backward."""
    layers = model_cfg.num_layers + (model_cfg.decoder_layers if model_cfg.model == "encoder_decoder" else 0)
    width = model_cfg.num_heads * model_cfg.resolved_head_dim
    return 6.0 * num_params + 12.0 * layers * seq_len * width


# Dense (no sparsity) peak TFLOP/s by device kind, from the vendors' datasheets: (bfloat16/float16, float32).
PEAK_TFLOPS = {"H200": (989, 67), "H100": (989, 67), "A100": (312, 19.5), "L4": (121, 30), "TPU v4": (275, 275),
               "TPU v5 lite": (197, 197), "TPU v5p": (459, 459), "TPU v6": (918, 918)}


def device_peak_flops(dtype: str) -> float | None:
    """The datasheet peak FLOP/s of this process's devices (all of them) for ``dtype`` compute, or None for a CPU
    or a device kind not in `PEAK_TFLOPS`."""
    kind = getattr(jax.local_devices()[0], "device_kind", "")
    for name, (half, single) in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            per_device = half if dtype in ("bfloat16", "float16") else single
            return per_device * 1e12 * jax.local_device_count()
    return None


def mfu_denominator(dtype: str) -> float:
    """What MFU divides by: the devices' datasheet peak for ``dtype`` (GPU, TPU), else a float32 matmul measured
    now (CPU, unknown devices)."""
    return device_peak_flops(dtype) or matmul_ceiling()


def matmul_flops(size: int = 1024, repeats: int = 5, dtype: str = "float32") -> float:
    """FLOP/s of one ``dtype`` ``size``-square matmul on one device, best of ``repeats``, measured now."""
    x = jnp.ones((size, size), dtype)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * size ** 3 / best


def matmul_ceiling(size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a float32 ``size``-square matmul on this process's devices, measured now (the MFU denominator)."""
    # CPU "devices" (jax_num_cpu_devices) share the same cores: one measurement is the whole machine.
    devices = 1 if jax.default_backend() == "cpu" else jax.local_device_count()
    return matmul_flops(size, repeats) * devices
