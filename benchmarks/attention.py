"""Attention benchmark: impl x mask x length -> forward and forward+backward time, compiled temp memory, GFLOP/s,
with Flax's own dense attention as a peer, side by side in one run.

    python benchmarks/attention.py --quick        # ~1 minute: every kernel at small lengths, error vs reference
    python benchmarks/attention.py                # CPU sweep 512 .. 16k, causal (tens of minutes)
    python benchmarks/attention.py --lengths 1024,4096 --impls blockwise,linear-elu --masks causal,segments

Time is the median of ``--repeats`` runs after one warm-up; memory is XLA's compiled temp allocation of the
forward+backward function (exact, no run needed), so a case too big to run still reports its memory.
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from harness import compile_for, console, median_seconds, show_and_write, write_tables  # noqa: E402

from flaxformer_lite.attention import (Mask, choose_impl, delta_attention, linear_attention,  # noqa: E402
                                      softmax_attention)
from flaxformer_lite.attention.checks import Dims  # noqa: E402
from flaxformer_lite.training.metrics import matmul_flops  # noqa: E402


def _flax_peer(q, k, v, mask):
    """Flax's `nn.dot_product_attention` (dense weights, kv heads repeated for GQA): the usual Flax path."""
    g = q.shape[2] // k.shape[2]
    return nn.dot_product_attention(q, jnp.repeat(k, g, 2), jnp.repeat(v, g, 2),
                                    mask=mask.materialize(q.shape[1], k.shape[1]))


def _gated(q, k, v, *, mask, gate, **kw):
    """Linear-elu attention with a decay gate: RetNet's fixed decay per kv head, or a GLA-style decay per token
    computed from the keys (``log_sigmoid(sum_d k) / 16``), so that its gradient is part of fwd+bwd."""
    n = k.shape[2]
    if gate == "fixed":
        return linear_attention(q, k, v, mask=mask, decay=1.0 - 2.0 ** (-5.0 - np.arange(n)), **kw)
    return linear_attention(q, k, v, mask=mask, log_decay=jax.nn.log_sigmoid(k.astype(jnp.float32).sum(-1)) / 16,
                            **kw)


def _delta(q, k, v, *, mask, gate="none", **kw):
    """The delta rule (DeltaNet), beta = sigmoid of the keys' mean per position; gate "data": Gated DeltaNet with the
    decay of `_gated`. Both computed from the inputs, so their gradients are part of fwd+bwd."""
    keys = k.astype(jnp.float32)
    gate = {} if gate == "none" else {"log_decay": jax.nn.log_sigmoid(keys.sum(-1)) / 16}
    return delta_attention(q, k, v, jax.nn.sigmoid(keys.mean(-1)), mask=mask, **gate, **kw)


KERNELS = {
    "reference": functools.partial(softmax_attention, impl="reference"),
    "xla": functools.partial(softmax_attention, impl="xla"),
    "blockwise": functools.partial(softmax_attention, impl="blockwise"),
    "cudnn": functools.partial(softmax_attention, impl="cudnn"),
    "flash": functools.partial(softmax_attention, impl="flash"),  # GPU (on CPU: interpret mode, far too slow)
    "flax (peer)": _flax_peer,
    "linear-elu": functools.partial(linear_attention, feature_map="elu"),
    "linear-relu": functools.partial(linear_attention, feature_map="relu"),
    "linear-favor": functools.partial(linear_attention, feature_map="favor"),
    "linear-elu-xla": functools.partial(linear_attention, feature_map="elu", impl="xla"),
    "linear-elu-pallas": functools.partial(linear_attention, feature_map="elu", impl="pallas"),  # GPU (CPU: interpret)
    "linear-elu-fixed": functools.partial(_gated, gate="fixed"),
    "linear-elu-data": functools.partial(_gated, gate="data"),
    "delta": _delta,  # causal masks only
    "delta-data": functools.partial(_delta, gate="data"),
    "delta-data-xla": functools.partial(_delta, gate="data", impl="xla"),
    "delta-data-pallas": functools.partial(_delta, gate="data", impl="pallas"),  # GPU (CPU: interpret)
}
SOFTMAX = {"reference", "xla", "blockwise", "cudnn", "flash", "flax (peer)"}

# name -> (Mask builder, fraction of (query, key) pairs visible, for useful-FLOP counts)
MASKS = {
    "causal": (lambda b, l: Mask(causal=True), lambda l: (l + 1) / (2 * l)),
    "none": (lambda b, l: Mask(), lambda l: 1.0),
    "padding": (lambda b, l: Mask(kv_lengths=jnp.full((b,), 3 * l // 4)), lambda l: 0.75),
    "segments": (lambda b, l: Mask(causal=True, q_segment_ids=_segments(b, l), kv_segment_ids=_segments(b, l)),
                 lambda l: 1 / 8),
}


def _segments(b, l):
    """Four equal packed documents per row."""
    return jnp.broadcast_to(jnp.arange(l) * 4 // l, (b, l)).astype(jnp.int32)


def flops(impl: str, mask: str, b: int, l: int, h: int, d: int, features: int, chunk: int = 64) -> float:
    """Useful FLOPs of forward+backward (backward = 2.5x forward for softmax, as FlashAttention counts; 2x for
    linear). Softmax counts only visible pairs, so impls that skip masked blocks are not credited for them."""
    if impl in SOFTMAX:
        return 3.5 * 4 * b * h * l * l * d * MASKS[mask][1](l)
    if mask == "none" or mask == "padding":
        fwd = 4 * b * h * l * features * (d + 1)
    else:
        fwd = b * h * l * (2 * chunk * (features + d) + 4 * features * (d + 1))
    return 3.0 * fwd


def _inputs(b, l, h, n, d, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(key, shape, dtype) for key, shape in zip(keys, [(b, l, h, d), (b, l, n, d),
                                                                                  (b, l, n, d)]))


def bench_case(impl, mask_name, l, args, budget_bytes, repeats, time_budget):
    """One row: compile forward and forward+backward, read memory, time what fits in the memory budget."""
    b, h, n, d = args.batch, args.heads, args.kv_heads, args.head_dim
    q, k, v = _inputs(b, l, h, n, d, jnp.dtype(args.dtype))
    mask = MASKS[mask_name][0](b, l)
    kernel = KERNELS[impl]
    if impl == "blockwise":
        kernel = functools.partial(kernel, block_q=args.block, block_kv=args.block)
    elif impl.startswith("linear"):
        kernel = functools.partial(kernel, block_size=args.chunk)
    fwd = lambda q, k, v, m: kernel(q, k, v, mask=m) if impl != "flax (peer)" else kernel(q, k, v, m)
    loss = lambda q, k, v, m: fwd(q, k, v, m).astype(jnp.float32).sum()
    row = {"impl": impl, "mask": mask_name, "length": l}
    try:
        c_fwd = compile_for(fwd, q, k, v, mask)
        c_bwd = compile_for(jax.grad(loss, argnums=(0, 1, 2)), q, k, v, mask)
    except ValueError as err:  # e.g. cudnn off GPU
        row["note"] = f"n/a: {str(err)[:60]}"
        return row, None
    row["fwd+bwd temp MiB"] = c_bwd.temp_bytes / 2**20
    row["fwd temp MiB"] = c_fwd.temp_bytes / 2**20
    if c_bwd.temp_bytes > budget_bytes:
        row["note"] = "memory only (over --max-temp-gib)"
        return row, None
    row["fwd ms"] = 1e3 * median_seconds(c_fwd, repeats, budget_s=time_budget)
    row["fwd+bwd ms"] = 1e3 * median_seconds(c_bwd, repeats, budget_s=time_budget)
    features = KERNELS[impl].keywords.get("feature_map", "elu") if impl.startswith("linear") else None
    f = {"favor": int(d * np.log(d))}.get(features, d)
    row["GFLOP/s"] = flops(impl, mask_name, b, l, h, d, f, args.chunk) / (row["fwd+bwd ms"] / 1e3) / 1e9
    return row, np.asarray(c_fwd.fn(q, k, v, mask), np.float32)


COLUMNS = ["impl", "mask", "length", "fwd ms", "fwd+bwd ms", "time / ref", "fwd+bwd temp MiB", "mem / ref",
           "GFLOP/s", "max |err|", "note"]


def _title(args) -> str:
    return f"Attention, b={args.batch} h={args.heads}/{args.kv_heads} d={args.head_dim} {args.dtype}"


def run(args) -> list[dict]:
    """Every (mask, length, impl) row, the table rewritten after each (so a run cut short keeps its rows)."""
    rows = []
    budget = args.max_temp_gib * 2**30
    for mask_name in args.masks:
        for l in args.lengths:
            ref_row, ref_out = None, None
            for impl in args.impls:
                row, out = bench_case(impl, mask_name, l, args, budget, args.repeats, args.time_budget)
                if impl == "reference":
                    ref_row, ref_out = row, out
                elif ref_row is not None:
                    _compare(row, ref_row, out if impl in SOFTMAX else None, ref_out)
                rows.append(row)
                console.print(f"[dim]{impl:>13} {mask_name} {l:>6}: fwd {row.get('fwd ms', 0):9.1f} ms, fwd+bwd "
                              f"{row.get('fwd+bwd ms', 0):9.1f} ms, temp {row.get('fwd+bwd temp MiB', 0):9.1f} MiB "
                              f"{row.get('note', '')}[/dim]")
                write_tables(args.name, _title(args), COLUMNS, rows, ["(partial: the run has not finished)"])
    return rows


def _compare(row, ref_row, out, ref_out):
    if row.get("fwd+bwd ms") and ref_row.get("fwd+bwd ms"):
        row["time / ref"] = row["fwd+bwd ms"] / ref_row["fwd+bwd ms"]
    if row.get("fwd+bwd temp MiB") and ref_row.get("fwd+bwd temp MiB"):
        row["mem / ref"] = row["fwd+bwd temp MiB"] / ref_row["fwd+bwd temp MiB"]
    if out is not None and ref_out is not None:
        row["max |err|"] = float(np.abs(out - ref_out).max())


def target_notes(rows, args) -> list[str]:
    """The issue's targets, read off this run's rows."""
    get = {(r["impl"], r["mask"], r["length"]): r for r in rows}
    notes, top = [], max(args.lengths)
    ref, blk, lin = (get.get((i, "causal", top)) for i in ("reference", "blockwise", "linear-elu"))
    if ref and blk and ref.get("fwd+bwd temp MiB"):
        notes.append(f"blockwise causal @ {top}: temp memory {blk['fwd+bwd temp MiB']:.0f} MiB = "
                     f"{100 * blk['fwd+bwd temp MiB'] / ref['fwd+bwd temp MiB']:.2f}% of reference's "
                     f"{ref['fwd+bwd temp MiB']:.0f} MiB (target <= 5%)")
    timed = [l for l in args.lengths if get.get(("reference", "causal", l), {}).get("fwd+bwd ms")
             and get.get(("blockwise", "causal", l), {}).get("fwd+bwd ms")]
    if timed:
        l = max(timed)
        r = get[("blockwise", "causal", l)]["fwd+bwd ms"] / get[("reference", "causal", l)]["fwd+bwd ms"]
        notes.append(f"blockwise / reference fwd+bwd time, causal @ {l} (longest both ran): {r:.2f}x (target <= 1.5x)")
    if blk and lin and blk.get("fwd+bwd ms") and lin.get("fwd+bwd ms"):
        notes.append(f"linear-elu causal @ {top}: {blk['fwd+bwd ms'] / lin['fwd+bwd ms']:.1f}x faster than blockwise "
                     "fwd+bwd (target >= 10x)")
    lin_times = [(l, get[("linear-elu", "causal", l)].get("fwd+bwd ms")) for l in args.lengths
                 if ("linear-elu", "causal", l) in get]
    if len(lin_times) > 1 and all(t for _, t in lin_times):
        (l0, t0), (l1, t1) = lin_times[0], lin_times[-1]
        notes.append(f"linear-elu causal fwd+bwd time x{t1 / t0:.1f} for length x{l1 / l0:.0f} (linear growth: equal)")
    if lin and lin.get("fwd+bwd ms") and args.ceiling:
        useful = 12 * args.batch * top * args.heads * args.head_dim ** 2 / (lin["fwd+bwd ms"] / 1e3) / 1e9
        notes.append(f"linear-elu causal @ {top}: {useful:.1f} GFLOP/s counting the recurrent form's 12 l h d^2 = "
                     f"{100 * useful / args.ceiling:.1f}% of the {args.dtype} matmul ceiling, {args.ceiling:.0f} "
                     "GFLOP/s measured in this run (target >= 20%)")
    for gated in ("linear-elu-fixed", "linear-elu-data", "delta", "delta-data"):
        row = get.get((gated, "causal", top))
        if lin and row and lin.get("fwd+bwd ms") and row.get("fwd+bwd ms"):
            target = " (target <= 1.3x)" if gated.startswith("linear") else ""  # a target of the gated linear forms
            notes.append(f"{gated} causal @ {top}: {row['fwd+bwd ms'] / lin['fwd+bwd ms']:.2f}x linear-elu's fwd+bwd "
                         f"time{target}")
    for lin in ("linear-elu", "linear-favor"):
        notes.append(_crossover(get, args.lengths, lin))
    dims = lambda l: Dims(args.batch, l, l, args.heads, args.kv_heads, args.head_dim, args.head_dim)
    picks = {l: choose_impl(dims(l), jnp.dtype(args.dtype), Mask(causal=True), 0.0, jax.default_backend())
             for l in args.lengths}
    notes.append("impl='auto' picks (causal): " + ", ".join(f"{l}: {p}" for l, p in picks.items()))
    return notes


def _crossover(get: dict, lengths: list[int], linear: str) -> str:
    """The shortest length at which ``linear`` runs fwd+bwd faster than every softmax impl timed (causal)."""
    for l in lengths:
        lin = get.get((linear, "causal", l), {}).get("fwd+bwd ms")
        soft = [r["fwd+bwd ms"] for (impl, mask, n), r in get.items()
                if impl in SOFTMAX and mask == "causal" and n == l and r.get("fwd+bwd ms")]
        if lin and soft and lin < min(soft):
            return f"crossover: {linear} is faster than the fastest softmax impl from length {l} on (fwd+bwd, causal)"
    return f"crossover: {linear} never beat the fastest softmax impl at the lengths timed"


def parse_args(argv=None):
    gpu = jax.default_backend() == "gpu"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small lengths, every kernel, a few repeats")
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--impls", type=lambda s: s.split(","), default=None, help=f"any of {list(KERNELS)}")
    p.add_argument("--masks", type=lambda s: s.split(","), default=["causal"], help=f"any of {list(MASKS)}")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16" if gpu else "float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--block", type=int, default=512, help="blockwise tile size (block_q = block_kv)")
    p.add_argument("--chunk", type=int, default=64, help="linear attention chunk size")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--time-budget", type=float, default=60.0, help="seconds of timed runs per case at most")
    p.add_argument("--max-temp-gib", type=float, default=8.0, help="report memory only above this temp size")
    p.add_argument("--name", default=None, help="results file stem (default attention-<backend>[-quick])")
    args = p.parse_args(argv)
    default_impls = [i for i in KERNELS if gpu or i not in ("cudnn", "flash", "linear-elu-pallas", "delta-data-pallas")]
    if args.quick:
        args.lengths = args.lengths or [256, 1024]
        args.repeats = min(args.repeats, 3)
    args.lengths = args.lengths or [512, 1024, 2048, 4096, 8192, 16384]
    args.impls = args.impls or (default_impls if args.quick else
                                ["reference", "xla", "blockwise", "flax (peer)", "linear-elu", "linear-favor",
                                 "linear-elu-fixed", "linear-elu-data"]
                                + (["cudnn", "flash"] if gpu else []))
    for name, given, known in (("--impls", args.impls, KERNELS), ("--masks", args.masks, MASKS)):
        bad = [x for x in given if x not in known]
        if bad:
            p.error(f"{name}: unknown {bad}; choose from {list(known)}")
    args.name = args.name or f"attention-{jax.default_backend()}{'-quick' if args.quick else ''}"
    return args


def main(argv=None):
    args = parse_args(argv)
    console.print(f"attention benchmark: b={args.batch} h={args.heads} kv_heads={args.kv_heads} d={args.head_dim} "
                  f"{args.dtype}, lengths {args.lengths}, masks {args.masks}")
    args.ceiling = matmul_flops(2048, dtype=args.dtype) / 1e9
    rows = run(args)
    args.ceiling = max(args.ceiling, matmul_flops(2048, dtype=args.dtype) / 1e9)  # before and after: the better
    path = show_and_write(args.name, _title(args), COLUMNS, rows, target_notes(rows, args))
    console.print(f"written to {path}")


if __name__ == "__main__":
    main()
