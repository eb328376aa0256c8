"""Pictures (matplotlib, the ``plot`` extra): attention maps of a model on a text, and training curves of a run.

    python -m flaxformer_lite.plots attention --model runs/default --text "To be, or not to be"
    python -m flaxformer_lite.plots curves runs/default
"""
from __future__ import annotations


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend; `ValueError` with the install hint when it is missing."""
    try:
        import matplotlib
    except ImportError as err:
        raise ValueError("pictures need matplotlib: pip install -e '.[plot]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path) -> "Path":
    """Lay out ``fig``, write it as a PNG to ``path`` (making its folder), close it; returns the path."""
    from pathlib import Path
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


from .attention_maps import attention_maps, plot_attention_maps  # noqa: E402
from .curves import plot_curves  # noqa: E402

__all__ = ["pyplot", "save_figure", "attention_maps", "plot_attention_maps", "plot_curves"]
