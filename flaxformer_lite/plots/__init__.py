"""Pictures (matplotlib, the ``plot`` extra): attention maps of a model on a text, and training curves of a run.

    python -m flaxformer_lite.plots attention --model runs/default --text "To be, or not to be"
    python -m flaxformer_lite.plots curves runs/default
"""
from .attention_maps import attention_maps, plot_attention_maps
from .curves import plot_curves
from .figure import pyplot, save_figure

__all__ = ["pyplot", "save_figure", "attention_maps", "plot_attention_maps", "plot_curves"]
