"""flaxformer_lite: small, fast JAX/Flax Transformer building blocks.

    import flaxformer_lite as ffl
    from flaxformer_lite.attention import Mask, softmax_attention, linear_attention
    cfg = ffl.models.preset("gpt2-small"); model = ffl.models.GPT(cfg)
    tokens = ffl.generate(model, variables, prompt, max_new_tokens=20)

The names below are imported on first use (`_lazy`), so ``import flaxformer_lite.data`` or a config alone starts
without JAX.
"""
from . import _lazy

__version__ = "0.1.0"
_LAZY = {"attention": ".attention", "interop": ".interop", "layers": ".layers", "models": ".models", "plots": ".plots",
         "Mask": ".attention", "softmax_attention": ".attention", "linear_attention": ".attention",
         "generate": ".decoding", "beam_search": ".decoding"}
__getattr__, __dir__ = _lazy.lazy_attributes(__name__, _LAZY)
__all__ = [*_LAZY, "__version__"]
