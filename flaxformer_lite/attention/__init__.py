"""Attention kernels: pure functions, no parameters. Layout ``[batch, length, heads, head_dim]`` everywhere."""
from .masks import Mask
from .softmax import IMPLS, choose_impl, softmax_attention

__all__ = ["Mask", "softmax_attention", "IMPLS", "choose_impl"]
