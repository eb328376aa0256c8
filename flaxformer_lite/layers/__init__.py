"""Linen modules with parameters, built on the attention kernels. Every parameter carries logical axis names."""
from .attention import ATTENTION_KINDS, MultiHeadAttention

__all__ = ["MultiHeadAttention", "ATTENTION_KINDS"]
