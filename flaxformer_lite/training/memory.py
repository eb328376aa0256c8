"""A train step's memory, bounded from below before anything is built: a model or a batch that cannot fit is
refused in one line naming the keys, instead of minutes of building batches and compiling that end in an
out-of-memory crash (``train.batch_size=10**6`` ran 71 s; ``model.max_len=10**12`` asked for terabytes at init).

The bound counts only what every model here must hold at once: its parameters and their gradients (the token
embedding, a learned position table, and per layer the value and output projections and the MLP's two), and the
float32 logits ``[b / accum, l, v]`` and the residual stream each layer keeps for the backward pass
``[layers, b / accum, l, e]`` (remat keeps it too). Optimizer state, the other projections and the attention's own
buffers come on top, so a refused config never fits, and a config that passes may still not.
"""
from __future__ import annotations

import os

import jax
import numpy as np


def params_floor(model_cfg) -> int:
    """Bytes of the parameters every model of ``model_cfg`` has at least (see the module docstring)."""
    e, heads = model_cfg.embed_dim, model_cfg.num_heads
    head_dim = model_cfg.head_dim or max(1, e // heads)
    layer = 2 * e * heads * head_dim + 2 * e * model_cfg.mlp_dim
    count = (model_cfg.vocab_size * e + (model_cfg.max_len * e if model_cfg.position == "learned" else 0)
             + (1 if model_cfg.share_layers else model_cfg.num_layers) * layer)
    return count * np.dtype(model_cfg.param_dtype).itemsize


def step_memory_floor(model_cfg, batch: int, seq_len: int, accum: int = 1) -> int:
    """Bytes of activations a train step of ``batch`` rows of ``seq_len`` tokens (``accum`` micro-batches) holds at
    least: float32 logits and each layer's residual stream in the compute dtype."""
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
    """`ValueError` when the parameters and gradients (`params_floor`, twice) and this process's share of a step's
    activations (`step_memory_floor` of ``batch / process_count`` rows) need more than `memory_capacity`; it names
    the model's sizes or ``train.batch_size``, ``train.seq_len`` and ``optim.grad_accum``, whichever needs more."""
    weights = 2 * params_floor(model_cfg)
    activations = step_memory_floor(model_cfg, -(-batch // process_count), seq_len, accum)
    have, where = memory_capacity()
    if weights + activations <= have:
        return
    gib = lambda n: f"{n / 2**30:,.1f} GiB"  # noqa: E731
    c = model_cfg
    if weights >= activations:
        raise ValueError(f"model.vocab_size={c.vocab_size}, model.embed_dim={c.embed_dim}, model.num_layers="
                         f"{c.num_layers}, model.mlp_dim={c.mlp_dim}, model.max_len={c.max_len} ({c.position} "
                         f"positions) make at least {gib(weights)} of parameters and gradients, more than the "
                         f"{gib(have)} {where}; choose smaller sizes")
    raise ValueError(f"train.batch_size={batch} x train.seq_len={seq_len} (optim.grad_accum={accum}) needs at least "
                     f"{gib(activations)} per step (float32 logits over a vocabulary of {c.vocab_size} and "
                     f"{c.num_layers} layers' activations; {gib(weights)} of parameters and gradients besides), more "
                     f"than the {gib(have)} {where}; lower train.batch_size or train.seq_len, or raise "
                     "optim.grad_accum")
