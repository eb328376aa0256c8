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


from .attention_maps import attention_maps, plot_attention_maps  # noqa: E402
from .curves import plot_curves  # noqa: E402

__all__ = ["pyplot", "attention_maps", "plot_attention_maps", "plot_curves"]
