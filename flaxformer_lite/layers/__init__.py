"""Linen modules with parameters, built on the attention kernels. Every parameter carries logical axis names."""
from ..choices import ROPE_TYPES, RopeScaling
from .attention import ATTENTION_KINDS, DECODE_MODES, MultiHeadAttention
from ..names import LAYER_STACKS, SCANNED_LAYERS, SHARED_LAYER, layer_name
from .blocks import BlockInputs, LayerStack, TransformerBlock
from .dense import kernel_dot_general
from .embedder import POSITIONS, CacheIndex, Embedder
from .embeddings import EmbeddingTable, rope_frequencies, rotary, sinusoidal
from .mlp import ACTIVATIONS, MLP
from .norms import NORMS, make_norm

__all__ = ["MultiHeadAttention", "ATTENTION_KINDS", "DECODE_MODES", "TransformerBlock", "LayerStack", "BlockInputs",
           "SCANNED_LAYERS", "SHARED_LAYER", "LAYER_STACKS", "layer_name", "Embedder",
           "CacheIndex", "POSITIONS", "kernel_dot_general", "EmbeddingTable", "rotary", "RopeScaling", "ROPE_TYPES",
           "rope_frequencies", "sinusoidal", "MLP", "ACTIVATIONS",
           "make_norm", "NORMS"]
