"""Softmax attention, one function over several implementations (`softmax_attention`, dispatch.py): the dense
reference and `jax.nn.dot_product_attention` (dense.py), blockwise in pure JAX (blockwise.py), our Pallas
FlashAttention-2 kernels (flash.py over flash_kernels.py) and the TPU's splash attention (splash.py)."""
from .dense import attend_scores, attention_weights
from .dispatch import IMPLS, choose_impl, softmax_attention

__all__ = ["softmax_attention", "attend_scores", "attention_weights", "IMPLS", "choose_impl"]
