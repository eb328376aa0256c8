"""Shared benchmark plumbing: compile once, read exact compiled memory, time the median of several runs, and write
result tables (Markdown + JSON) to benchmarks/results/ (or ``$FFL_RESULTS_DIR``). Figures are only compared as ratios
within one run. Benchmarks write their table after every row (`write_tables`), so one killed by a time limit still
leaves what it measured."""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
from rich.console import Console
from rich.table import Table

RESULTS_DIR = Path(os.environ.get("FFL_RESULTS_DIR") or Path(__file__).resolve().parent / "results")
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
        table.add_column(col, justify="left" if col in ("impl", "mask", "case", "model", "kernel") else "right")
    for row in rows:
        table.add_row(*[_fmt(row.get(col)) for col in columns])
    console.print(table)
    for note in notes or []:
        console.print(note)
    return write_tables(name, title, columns, rows, notes, out_dir)


def write_tables(name: str, title: str, columns: list[str], rows: list[dict], notes: list[str] | None = None,
                 out_dir: Path = RESULTS_DIR) -> Path:
    """Write ``<name>.md`` and ``<name>.json`` under ``out_dir`` (each replaced whole, through a temporary file, so
    a reader never sees half a table); return the Markdown path. Call it after each row of a long benchmark."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    lines = [f"# {title}", "", f"{device_description()}; {stamp}", "", "| " + " | ".join(columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(col)) for col in columns) + " |" for row in rows]
    lines += [""] + [f"- {note}" for note in notes or []]
    md = out_dir / f"{name}.md"
    _replace(md, "\n".join(lines) + "\n")
    _replace(out_dir / f"{name}.json", json.dumps(
        {"title": title, "device": device_description(), "time": stamp, "rows": rows, "notes": notes or []},
        indent=1, default=str))
    return md


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)
