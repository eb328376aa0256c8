"""flaxformer_lite: small, fast JAX/Flax Transformer building blocks."""
__version__ = "0.1.0"
