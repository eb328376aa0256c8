"""Decode cost per token against context length: softmax with a KV cache against linear attention's recurrent state.

    python benchmarks/decode.py                      # contexts 256 .. 8192, kernel level and a gpt-tiny model
    python benchmarks/decode.py --contexts 512,4096 --repeats 50

Kernel level: one query attending to a ``[b, c, h, d]`` cache (``softmax_attention`` with ``kv_lengths``) against
one ``linear_step`` on a ``[b, h, f, d]`` state. Model level: one cached decode step of a GPT (``decode="step"``)
whose cache holds ``c`` tokens, and of the ``llama-tiny`` preset of the same width and depth (the Llama family's
decoding against GPT's). Median of ``--repeats`` calls after warm-up.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from harness import console, show_and_write  # noqa: E402

from flaxformer_lite.attention import Mask, linear_init_state, linear_step, softmax_attention  # noqa: E402
from flaxformer_lite.decoding import _init_cache, _Task  # noqa: E402
from flaxformer_lite.models import GPT, preset  # noqa: E402


def _median_ms(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def kernel_step_ms(kind: str, context: int, b: int, h: int, d: int, repeats: int) -> float:
    """Milliseconds for one decoded position of one attention layer."""
    key = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(key[0], (b, 1, h, d))
    if kind == "softmax":
        k, v = (jax.random.normal(kk, (b, context, h, d)) for kk in key[1:])
        lengths = jnp.full((b,), context, jnp.int32)
        f = jax.jit(lambda q, k, v, n: softmax_attention(q, k, v, mask=Mask(kv_lengths=n), impl="reference"))
        return _median_ms(lambda: f(q, k, v, lengths), repeats)
    state = linear_init_state(b, h, d, d, kind)
    kt, vt = (jax.random.normal(kk, (b, h, d)) for kk in key[1:])
    f = jax.jit(lambda s, q, k, v: linear_step(s, q, k, v, feature_map=kind))
    return _median_ms(lambda: f(state, q[:, 0], kt, vt), repeats)


def model_step_ms(attention: str, context: int, repeats: int, name: str = "gpt-tiny") -> float:
    """Milliseconds for one cached decode step of the preset ``name`` (4 layers, 256 dims for the tiny ones) holding
    ``context`` tokens."""
    cfg = dataclasses.replace(preset(name), attention=attention, feature_map="elu", max_len=context + 8,
                              dropout_rate=0.0, attention_dropout_rate=0.0)
    model = GPT(cfg)
    prompt = jnp.ones((1, context), jnp.int32)
    params = model.init(jax.random.key(0), prompt[:, :8])["params"]
    cache = _init_cache(_Task(model, 8), params, prompt, context + 8, 1)
    prefill = jax.jit(lambda p, c, t: model.apply({"params": p, "cache": c}, t, decode="prefill", mutable=["cache"]))
    _, mut = prefill(params, cache, prompt)
    step = jax.jit(lambda p, c, t: model.apply({"params": p, "cache": c}, t, decode="step", mutable=["cache"])[0])
    token = jnp.ones((1, 1), jnp.int32)
    return _median_ms(lambda: step(params, mut["cache"], token), repeats)  # the same position each call


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")],
                   default=[256, 512, 1024, 2048, 4096, 8192])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    rows = []
    for c in args.contexts:
        row = {"context": c}
        for kind in ("softmax", "elu", "favor"):
            row[f"kernel {kind} ms"] = kernel_step_ms(kind, c, args.batch, args.heads, args.head_dim, args.repeats)
        for attention in ("softmax", "linear"):
            row[f"model {attention} ms"] = model_step_ms(attention, c, args.repeats)
        row["llama-tiny ms"] = model_step_ms("softmax", c, args.repeats, "llama-tiny")
        row["llama / gpt"] = row["llama-tiny ms"] / row["model softmax ms"]
        row["kernel softmax / elu"] = row["kernel softmax ms"] / row["kernel elu ms"]
        row["model softmax / linear"] = row["model softmax ms"] / row["model linear ms"]
        rows.append(row)
        console.print(f"[dim]{row}[/dim]")
    cols = list(rows[0])
    first, last = rows[0], rows[-1]
    notes = [f"kernel: b={args.batch} h={args.heads} d={args.head_dim} float32; model: gpt-tiny shape (4 layers, 256 "
             "dims, elu feature map for linear); llama-tiny: 4 layers, 256 dims, 8 heads on 2 kv heads, SwiGLU 768, "
             "RMSNorm, rotary, untied head (GQA: a 4x smaller cache)",
             f"linear (elu) per-token kernel time x{last['kernel elu ms'] / first['kernel elu ms']:.2f} from context "
             f"{first['context']} to {last['context']} (flat = 1); softmax x"
             f"{last['kernel softmax ms'] / first['kernel softmax ms']:.1f}"]
    stem = args.name or f"decode-{jax.default_backend()}"
    show_and_write(stem, "Decode cost per token vs context length", cols, rows, notes)


if __name__ == "__main__":
    main()
