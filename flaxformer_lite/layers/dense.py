"""The ``dot_general`` behind every projection (``nn.Dense``/``nn.DenseGeneral``): on CPU, for activations with many
rows, the kernel is first copied into ``[out..., in...]`` order (the PyTorch ``Linear`` layout).

XLA:CPU's matmuls (YNNPACK) run the backward pass of ``x @ W`` faster when ``W`` is laid out that way: GPT-2 small's
MLP, fwd+bwd at 1024 x 768, takes 88 ms instead of 101 ms, copy included, and a whole block 169 instead of 185 ms
(2% on the whole training step, where XLA already reorders some kernels itself). The copy costs one read and write
of the kernel, so it is skipped for few rows (decoding), and off CPU (cuBLAS/cuDNN pick layouts themselves). The
result is the same product; only the memory order of one operand changes. Measured in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
from jax import lax

MIN_ROWS = 512  # below this many activation rows the copy is not repaid


def _transpose_pays(lhs, rhs, dimension_numbers) -> bool:
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    if lhs_batch or rhs_batch or jax.default_backend() != "cpu":
        return False
    rows = math.prod(n for d, n in enumerate(lhs.shape) if d not in lhs_contract)
    # already [out..., in...]: nothing to gain
    return rows >= MIN_ROWS and tuple(rhs_contract) != tuple(range(rhs.ndim - len(rhs_contract), rhs.ndim))


def kernel_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """`jax.lax.dot_general` for ``activations (lhs) x kernel (rhs)`` without batch dims, e.g. ``x [b, l, e]`` with
    ``kernel [e, h, d]`` -> ``[b, l, h, d]``. Same signature and result; on CPU with at least ``MIN_ROWS`` activation
    rows the kernel is physically reordered to ``[free..., contracting...]`` first (see the module docstring)."""
    if not _transpose_pays(lhs, rhs, dimension_numbers):
        return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)
    (lhs_contract, rhs_contract), _ = dimension_numbers
    free = [d for d in range(rhs.ndim) if d not in rhs_contract]
    # the barrier keeps XLA from folding the transpose back into the dot's dimension numbers
    kernel_t = lax.optimization_barrier(lax.transpose(rhs, tuple(free) + tuple(rhs_contract)))
    contract_t = tuple(range(len(free), rhs.ndim))
    return lax.dot_general(lhs, kernel_t, ((tuple(lhs_contract), contract_t), ((), ())), precision=precision,
                           preferred_element_type=preferred_element_type, **kwargs)


class _FlatSafeNames(nn.LogicallyPartitioned):
    """Logical names that `nn.DenseGeneral` can carry: it unboxes its kernel while still flat (``[in, out]``) before
    reshaping it to the named shape, and a sharding constraint of the named rank on the flat kernel fails once the
    logical-axis rules are active (as they are while the train step is traced). The constraint is applied only when
    the ranks agree; the parameter itself is placed by the step's shardings either way."""

    def unbox(self, apply_constraint=True):
        return super().unbox(apply_constraint and len(getattr(self.value, "shape", ())) == len(self.names))


def general_kernel_init(init, names: tuple[str, ...]):
    """``nn.with_logical_partitioning(init, names)`` for an `nn.DenseGeneral` kernel or bias (multi-axis features or
    contraction), e.g. ``("embed", "heads", "head_dim")`` for a query projection ``[e, h, d]``."""
    def wrapper(*args, **kwargs):
        return _FlatSafeNames(init(*args, **kwargs), names)
    return wrapper
