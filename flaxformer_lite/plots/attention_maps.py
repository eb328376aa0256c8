"""Attention maps: every self-attention layer's weights ``[h, q, k]`` for one text, drawn as a grid of heatmaps
(a row per layer, a column per head), with the tokens on the axes.

The weights are what `MultiHeadAttention` sows into the ``intermediates`` collection (linear attention has none).
"""
from __future__ import annotations

import re
from pathlib import Path

import jax
import numpy as np

from ..names import LAYER_STACKS, layer_name
from .figure import pyplot, save_figure


def attention_maps(model, variables, tokens, *, method=None, **kwargs) -> list[tuple[str, np.ndarray]]:
    """``[(label, weights [b, h, q, k])]`` for every attention layer of ``model`` on ``tokens [b, l]``, in depth order
    (scanned or shared layers are split per layer). ``method``/``kwargs`` go to ``model.apply`` (e.g.
    ``method="encode"`` for an encoder-decoder's encoder)."""
    _, state = model.apply(variables, tokens, method=method, mutable=["intermediates"], **kwargs)
    found = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.get("intermediates", {}))[0]:
        names = [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]
        if "attention_weights" not in names:
            continue
        names = [n for n in names if n != "attention_weights" and not n.isdigit()]
        weights = np.asarray(leaf)
        if any(n in LAYER_STACKS for n in names):  # scanned or shared layers: [layers, b, h, q, k]
            found += [("/".join(layer_name(i) if n in LAYER_STACKS else n for n in names), w)
                      for i, w in enumerate(weights)]
        else:
            found.append(("/".join(names), weights))
    if not found:
        raise ValueError("the model sowed no attention weights (linear attention has no attention matrix)")
    natural = lambda label: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", label[0])]
    return sorted(found, key=natural)


def plot_attention_maps(maps: list[tuple[str, np.ndarray]], pieces: list[str], path: str | Path,
                        row: int = 0) -> Path:
    """Draw batch row ``row`` of ``maps`` (from `attention_maps`) as a layers x heads grid of heatmaps labelled with
    the token ``pieces``; write a PNG to ``path``."""
    plt = pyplot()
    heads = max(w.shape[1] for _, w in maps)
    size = max(2.2, 0.18 * len(pieces))
    fig, axes = plt.subplots(len(maps), heads, figsize=(size * heads, size * len(maps)), squeeze=False)
    for r, (label, weights) in enumerate(maps):
        for h in range(heads):
            ax = axes[r][h]
            ax.axis("off")
            if h >= weights.shape[1]:
                continue
            ax.imshow(weights[row, h], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"{label.replace('/self_attention', '')} · head {h}", fontsize=7)
            if len(pieces) <= 48:
                ax.axis("on")
                ticks = range(len(pieces))
                ax.set_xticks(ticks, pieces[:weights.shape[3]], rotation=90, fontsize=5)
                ax.set_yticks(ticks, pieces[:weights.shape[2]], fontsize=5)
    fig.supxlabel("key (attended to)")
    fig.supylabel("query")
    return save_figure(fig, path)
