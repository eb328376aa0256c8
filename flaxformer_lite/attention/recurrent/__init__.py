"""Attention that carries a state along the sequence: linear attention (linear.py; its chunk form linear_causal.py,
its Pallas kernels linear_pallas.py over linear_pallas_kernels.py, its feature maps feature_maps.py) and the delta
rule (delta.py; its Pallas kernels delta_pallas.py over delta_pallas_kernels.py and delta_pallas_backward.py).
common.py holds what both share (the impl choice, segment runs, decay gates, block spans), chunk_tiles.py what
their Pallas kernels share."""
from .common import LINEAR_IMPLS
from .delta import delta_attention, delta_impl, delta_init_state, delta_step
from .feature_maps import FEATURE_MAPS, EluFeatureMap, FavorFeatureMap, FeatureMap, ReluFeatureMap, get_feature_map
from .linear import LinearState, linear_attention, linear_impl
from .linear import init_state as linear_init_state
from .linear import prefill_state as linear_prefill_state
from .linear import step as linear_step

__all__ = [
    "linear_attention", "LINEAR_IMPLS", "linear_impl", "linear_init_state", "linear_step", "linear_prefill_state",
    "LinearState", "FeatureMap", "EluFeatureMap", "ReluFeatureMap", "FavorFeatureMap", "FEATURE_MAPS",
    "get_feature_map", "delta_attention", "delta_impl", "delta_init_state", "delta_step",
]
