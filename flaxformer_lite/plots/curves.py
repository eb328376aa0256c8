"""Training curves from a run folder's ``metrics.jsonl``: loss (train and eval), learning rate, and accuracy when
the run logged it, against the step."""
from __future__ import annotations

from pathlib import Path

from .figure import pyplot, save_figure


def plot_curves(run_dir: str | Path, path: str | Path | None = None) -> Path:
    """Read ``run_dir/metrics.jsonl`` and write the curves as a PNG (default ``run_dir/curves.png``)."""
    from ..training.metrics import read_metrics
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise ValueError(f"{run_dir} has no metrics.jsonl (is it a train.py run folder?)")
    records = read_metrics(run_dir / "metrics.jsonl")
    series = lambda key: [(r["step"], r[key]) for r in records if key in r]
    panels = [("loss", ["loss", "eval_loss"]), ("learning rate", ["lr"])]
    if any("eval_accuracy" in r or "accuracy" in r for r in records):
        panels.append(("accuracy", ["accuracy", "eval_accuracy"]))
    if not series("loss"):
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no logged steps yet")
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            points = series(key)
            if points:
                ax.plot(*zip(*points), marker="o" if key.startswith("eval") else None, markersize=3, label=key)
        ax.set(xlabel="step", title=title)
        ax.legend(fontsize=8)
    fig.suptitle(run_dir.name)
    return save_figure(fig, path or run_dir / "curves.png")
