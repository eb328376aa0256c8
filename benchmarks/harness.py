"""Shared benchmark plumbing: compile once, read exact compiled memory, time the median of several runs, and write
result tables (Markdown + JSON) to benchmarks/results/. Figures are only compared as ratios within one run."""
from __future__ import annotations

import dataclasses
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
from rich.console import Console
from rich.table import Table

RESULTS_DIR = Path(__file__).resolve().parent / "results"
console = Console(width=None if sys.stdout.isatty() else 180)


@dataclasses.dataclass
class Compiled:
    """A jitted function compiled for fixed arguments, with XLA's own memory figures."""

    fn: Any
    args: tuple
    temp_bytes: int
    arg_bytes: int
    compile_s: float


def compile_for(fn: Callable, *args) -> Compiled:
    """``jax.jit(fn).lower(*args).compile()`` plus its memory analysis (exact and noise-free)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", -1) if mem is not None else -1
    arg = getattr(mem, "argument_size_in_bytes", -1) if mem is not None else -1
    return Compiled(compiled, args, temp, arg, seconds)


def median_seconds(compiled: Compiled, repeats: int = 5, warmup: int = 1, budget_s: float | None = None) -> float:
    """Median wall time of ``repeats`` runs after ``warmup`` runs; stops early once ``budget_s`` is spent
    (at least one timed run)."""
    for _ in range(warmup):
        jax.block_until_ready(compiled.fn(*compiled.args))
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats:
        t0 = time.perf_counter()
        jax.block_until_ready(compiled.fn(*compiled.args))
        times.append(time.perf_counter() - t0)
        if budget_s is not None and time.perf_counter() - start > budget_s:
            break
    return statistics.median(times)


def device_description() -> str:
    """One line naming the backend and device, for result headers."""
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    return f"{jax.default_backend()} x{jax.device_count()} ({kind}); jax {jax.__version__}; {platform.processor() or platform.machine()}"


def show_and_write(name: str, title: str, columns: list[str], rows: list[dict], notes: list[str] | None = None,
                   out_dir: Path = RESULTS_DIR) -> Path:
    """Print ``rows`` as a rich table and write ``<name>.md`` and ``<name>.json`` under ``out_dir``."""
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col in ("impl", "mask", "case", "model") else "right")
    for row in rows:
        table.add_row(*[_fmt(row.get(col)) for col in columns])
    console.print(table)
    for note in notes or []:
        console.print(note)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    lines = [f"# {title}", "", f"{device_description()}; {stamp}", "", "| " + " | ".join(columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(col)) for col in columns) + " |" for row in rows]
    lines += [""] + [f"- {note}" for note in notes or []]
    md = out_dir / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    (out_dir / f"{name}.json").write_text(json.dumps(
        {"title": title, "device": device_description(), "time": stamp, "rows": rows, "notes": notes or []},
        indent=1, default=str))
    return md


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)
