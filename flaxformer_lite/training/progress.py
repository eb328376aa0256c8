"""What a person watching a run sees, once per logged step: on a terminal, a rich progress bar (step, loss, lr,
tokens/s, MFU, ETA); when stdout is not a terminal (nohup, a scheduler's log file, CI), one plain line per logged
step instead, since a bar written to a file appears only at the end. Only process 0 shows anything.
"""
from __future__ import annotations

import datetime

import jax
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn


def plain_line(record: dict, steps: int) -> str:
    """``step 120/1000  loss 3.4512  lr 2.40e-04  12,345 tok/s  MFU 1.2%  ETA 0:03:12`` for one logged record
    (``step``, ``loss``, ``lr``, ``tokens_per_s``, ``mfu``, ``step_time_s``)."""
    eta = datetime.timedelta(seconds=round(max(0, steps - record["step"]) * record["step_time_s"]))
    return (f"step {record['step']}/{steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
            f"{record['tokens_per_s']:,.0f} tok/s  MFU {100 * record['mfu']:.1f}%  ETA {eta}")


class RunProgress:
    """Context manager; entered, a function of one logged record that shows it (a bar or a plain line, see the
    module docstring). ``enabled=False`` (``train.progress=false``) shows nothing."""

    def __init__(self, console: Console, steps: int, start: int, enabled: bool = True):
        self.console, self.steps, self.start = console, steps, start
        self.enabled = enabled and jax.process_index() == 0
        self.bar = None

    def __enter__(self):
        if not self.enabled:
            return lambda record: None
        if not self.console.is_terminal:
            return lambda record: print(plain_line(record, self.steps), flush=True)
        self.bar = Progress(
            TextColumn("step {task.completed}/{task.total}"), BarColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:,.0f} tok/s  "
                       "MFU {task.fields[mfu]:.1f}%"), TimeRemainingColumn(), console=self.console, transient=False)
        self.bar.__enter__()
        task = self.bar.add_task("train", total=self.steps, completed=self.start, loss=float("nan"), lr=0.0, tps=0.0,
                                 mfu=0.0)
        return lambda r: self.bar.update(task, completed=r["step"], loss=r["loss"], lr=r["lr"],
                                         tps=r["tokens_per_s"], mfu=100 * r["mfu"])

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc) if self.bar is not None else False
