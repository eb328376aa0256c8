"""flaxformer_lite: small, fast JAX/Flax Transformer building blocks.

    import flaxformer_lite as ffl
    from flaxformer_lite.attention import Mask, softmax_attention, linear_attention
"""
from . import attention, layers
from .attention import Mask, linear_attention, softmax_attention

__version__ = "0.1.0"
__all__ = ["attention", "layers", "Mask", "softmax_attention", "linear_attention", "__version__"]
