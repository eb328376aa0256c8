"""Names shared across floors, plain Python (the ground floor): how the stacked layers appear in a parameter, cache
or intermediates tree. A layer stack is ``layer_0``, ``layer_1``, ... (`layer_name`) when unrolled, one
``SCANNED_LAYERS`` subtree stacked on a leading layer axis under `nn.scan`, or one ``SHARED_LAYER`` subtree under
ALBERT-style sharing. Everything that reads those trees (decoding, plots, Hugging Face import, metrics, sharding
rules) uses these names, so `training/` and `interop/` need not import `layers/`.
"""
from __future__ import annotations

SCANNED_LAYERS = "layers"  # `nn.scan`ned stack: params, caches, intermediates on a leading axis (also its logical axis)
SHARED_LAYER = "shared_layer"  # one block's params at every depth; its caches and intermediates stay per layer
LAYER_STACKS = (SCANNED_LAYERS, SHARED_LAYER)  # subtrees whose cache/intermediates leaves are ``[layers, ...]``


def layer_name(i: int) -> str:
    """The name of layer ``i`` of an unrolled stack (``layer_0``, ...)."""
    return f"layer_{i}"
