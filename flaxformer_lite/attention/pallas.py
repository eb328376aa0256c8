"""The tile helpers every Pallas kernel here shares: the flash kernels (softmax/) and the chunk kernels (recurrent/).

All of them are written for the Pallas Triton GPU backend and run by Pallas interpret mode on the CPU (for tests):
every tile a program loads is ``[power of two >= 16, ...]`` (`tile_size`, `block_length`, `padded_dim`); launches go
through `pallas_call` with Triton's parameters; matmuls inside a kernel body go through `dot`, which accumulates in
float32 at the precision that suits the mode (`dot_precision`).
"""
from __future__ import annotations

import contextvars

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .checks import check_block_size

MIN_BLOCK = 16  # Triton's smallest matmul tile
MAX_BLOCK = 128  # a [block, block] float32 tile (logits, scores, decays) lives in registers
NUM_STAGES = 2  # Triton software pipelining: copies of the tiles a loop loads kept in shared memory at once
DTYPES = ("float32", "bfloat16", "float16")  # the operand dtypes the kernels take
# Whether the kernel body being traced runs in interpret mode: set by `pallas_call` around the trace, read by `dot`.
_INTERPRET = contextvars.ContextVar("flaxformer_lite_pallas_interpret", default=True)


def unsupported(kernels: str, backend: str, dtype=None) -> str | None:
    """Why ``kernels`` (their name in a message, plural) cannot run on ``backend``, or on operands of ``dtype`` if
    given; None if they can: Triton on a GPU, interpret mode on the CPU, `DTYPES`."""
    if backend not in ("gpu", "cpu"):
        return f"{kernels} target Triton on GPU (and interpret mode on CPU), not {backend!r}"
    if dtype is not None and jnp.dtype(dtype).name not in DTYPES:
        return f"dtype {jnp.dtype(dtype).name} ({kernels} take {', '.join(DTYPES)})"
    return None


def block_unsupported(block_size: int) -> str | None:
    """Why the chunk kernels cannot take ``block_size`` (they take a power of two >= 16), or None."""
    if block_size < MIN_BLOCK or block_size & (block_size - 1):
        return f"block_size={block_size} (the kernel takes a power of two >= {MIN_BLOCK})"
    return None


def tile_size(name: str, size, largest: int | None) -> int:
    """A tile size checked to be a power of two >= 16 (else `ValueError` naming ``name``), clipped to ``largest``."""
    size = check_block_size(name, size)
    if size < MIN_BLOCK or size & (size - 1):
        raise ValueError(f"{name} must be a power of two >= {MIN_BLOCK} for the Pallas kernels, got {size}")
    return size if largest is None else min(size, largest)


def block_length(block, length: int, name: str = "block") -> int:
    """A kernel's block length: ``block`` checked by `tile_size` (errors name ``name``), clipped to `MAX_BLOCK` and
    to ``length`` rounded up to a power of two (at least `MIN_BLOCK`)."""
    return min(tile_size(name, block, MAX_BLOCK), max(MIN_BLOCK, pl.next_power_of_2(max(length, 1))))


def padded_dim(size: int) -> int:
    """Feature, head and value dims padded to a power of two >= 16 (zeros change no product)."""
    return max(MIN_BLOCK, pl.next_power_of_2(size))


def pallas_call(kernel, operands: list, *, grid: tuple, in_specs, out_specs, out_shape, num_warps: int,
                interpret: bool, name: str, num_stages: int = NUM_STAGES):
    """`pl.pallas_call` of ``kernel`` on ``operands`` with Triton's launch parameters, its body traced knowing
    whether it runs in interpret mode (which sets `dot`'s float32 precision)."""
    token = _INTERPRET.set(bool(interpret))
    try:
        return pl.pallas_call(
            kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
            compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
            interpret=interpret, name=name,
        )(*operands)
    finally:
        _INTERPRET.reset(token)


def dot_precision(dtype, interpret: bool):
    """The precision of a kernel's ``dot`` on operands of ``dtype``: for float32, full float32 products in interpret
    mode (XLA:CPU takes no other algorithm) and 3xTF32 on the GPU (Triton lowers full precision to unrolled FMA,
    without tensor cores: minutes of compile time and register spills; 3xTF32 splits each operand into a high and a
    low TF32 part and keeps three products, about float32's accuracy); None (the default) for bf16/fp16 operands,
    which the tensor cores take as they are."""
    if jnp.dtype(dtype) != jnp.float32:
        return None
    return lax.Precision.HIGHEST if interpret else lax.DotAlgorithmPreset.TF32_TF32_F32_X3


def dot(a, b, *, trans_a=False, trans_b=False):
    """``a @ b`` (either transposed) accumulated in float32, at `dot_precision` (float32 operands: full precision in
    interpret mode, 3xTF32 compiled). Call it inside a kernel body launched by `pallas_call`."""
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=dot_precision(a.dtype, _INTERPRET.get()))
