"""The figure plumbing every picture shares: matplotlib on the file-only Agg backend, and writing a figure as a PNG."""
from __future__ import annotations

from pathlib import Path


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend; `ValueError` with the install hint when it is missing."""
    try:
        import matplotlib
    except ImportError as err:
        raise ValueError("pictures need matplotlib: pip install -e '.[plot]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Lay out ``fig``, write it as a PNG to ``path`` (making its folder), close it; returns the path. The PNG is
    ``figsize * dpi`` pixels (width x height)."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
