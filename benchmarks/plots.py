"""Plots of benchmark results (matplotlib, the `plot` extra): attention time and memory against length, and decode
cost per token against context, as PNG files next to the JSON tables they read.

    python benchmarks/plots.py                       # every attention-*.json and decode-*.json in benchmarks/results
    python benchmarks/plots.py benchmarks/results/attention-cpu.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flaxformer_lite.plots import pyplot, save_figure

RESULTS = Path(__file__).resolve().parent / "results"


def _pyplot():
    try:
        return pyplot()
    except ValueError as err:
        sys.exit(f"benchmarks/plots.py: {err}")


def plot_attention(path: Path) -> Path:
    """Two panels (fwd+bwd time, temp memory) against length, one line per impl, log-log; ``<stem>.png``."""
    plt = _pyplot()
    data = json.loads(path.read_text())
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for (metric, label), ax in zip((("fwd+bwd ms", "forward + backward (ms)"),
                                    ("fwd+bwd temp MiB", "compiled temp memory (MiB)")), axes):
        impls = sorted({r["impl"] for r in data["rows"]})
        for impl in impls:
            pts = sorted((r["length"], r[metric]) for r in data["rows"]
                         if r["impl"] == impl and r.get(metric) and r.get("mask") == "causal")
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel=label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{data['title']} (causal) - {data['device'].split(';')[0]}")
    return save_figure(fig, path.with_suffix(".png"))


def plot_decode(path: Path) -> Path:
    """Per-token decode time against context, kernel and model level; ``<stem>.png``."""
    plt = _pyplot()
    data = json.loads(path.read_text())
    rows = data["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in [k for k in rows[0] if k.endswith(" ms")]:
        ax.plot([r["context"] for r in rows], [r[key] for r in rows], marker="o", label=key[:-3])
    contexts = [r["context"] for r in rows]
    ax.set(xscale="log", yscale="log", xlabel="context length (tokens in the cache)", ylabel="ms per decoded token")
    ax.set_xticks(contexts, [str(c) for c in contexts], minor=False)
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{data['title']} - {data['device'].split(';')[0]}")
    return save_figure(fig, path.with_suffix(".png"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", type=Path)
    files = p.parse_args(argv).files or sorted(RESULTS.glob("attention-*.json")) + sorted(RESULTS.glob("decode-*.json"))
    for f in files:
        out = plot_decode(f) if f.name.startswith("decode") else plot_attention(f)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
