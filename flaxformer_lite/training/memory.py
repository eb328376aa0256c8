"""A train step's memory, bounded from below before anything is built: a batch that cannot fit is refused in one
line naming the keys, instead of minutes of building batches and compiling that end in an out-of-memory crash.

The bound counts only what every model here must hold at once: the float32 logits ``[b / accum, l, v]`` and the
residual stream each layer keeps for the backward pass ``[layers, b / accum, l, e]`` (in the compute dtype; remat
keeps it too). Parameters, optimizer state and the attention's own buffers come on top, so a refused config never
fits, and a config that passes may still not.
"""
from __future__ import annotations

import os

import jax
import numpy as np


def step_memory_floor(model_cfg, batch: int, seq_len: int, accum: int = 1) -> int:
    """Bytes a train step of ``batch`` rows of ``seq_len`` tokens (``accum`` micro-batches) holds at least."""
    rows = -(-batch // accum)
    width = np.dtype(model_cfg.dtype).itemsize * model_cfg.num_layers * model_cfg.embed_dim
    return rows * seq_len * (4 * model_cfg.vocab_size + width)


def memory_capacity() -> tuple[int, str]:
    """(bytes, what they are): the local accelerators' memory limits summed, or this host's physical memory when
    the devices report none (CPU)."""
    limits = [(d.memory_stats() or {}).get("bytes_limit", 0) for d in jax.local_devices()]
    if all(limits):
        return int(sum(limits)), f"the {len(limits)} local {jax.local_devices()[0].platform.upper()} device(s) hold"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this host holds"


def check_step_fits(model_cfg, batch: int, seq_len: int, accum: int, process_count: int = 1) -> None:
    """`ValueError` naming ``train.batch_size``, ``train.seq_len`` and ``optim.grad_accum`` when this process's share
    of a step (``batch / process_count`` rows) needs more than `memory_capacity` by `step_memory_floor`."""
    need = step_memory_floor(model_cfg, -(-batch // process_count), seq_len, accum)
    have, where = memory_capacity()
    if need > have:
        raise ValueError(f"train.batch_size={batch} x train.seq_len={seq_len} (optim.grad_accum={accum}) needs at "
                         f"least {need / 2**30:,.1f} GiB per step (float32 logits over a vocabulary of "
                         f"{model_cfg.vocab_size} and {model_cfg.num_layers} layers' activations), more than the "
                         f"{have / 2**30:,.1f} GiB {where}; lower train.batch_size or train.seq_len, or raise "
                         "optim.grad_accum")
