"""flaxformer_lite: small, fast JAX/Flax Transformer building blocks.

    import flaxformer_lite as ffl
    from flaxformer_lite.attention import Mask, softmax_attention, linear_attention
    cfg = ffl.models.preset("gpt2-small"); model = ffl.models.GPT(cfg)
    tokens = ffl.generate(model, variables, prompt, max_new_tokens=20)
"""
from . import attention, interop, layers, models, plots
from .attention import Mask, linear_attention, softmax_attention
from .decoding import beam_search, generate

__version__ = "0.1.0"
__all__ = ["attention", "interop", "layers", "models", "plots", "Mask", "softmax_attention", "linear_attention",
           "generate", "beam_search", "__version__"]
