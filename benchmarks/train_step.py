"""Training-step benchmark: tokens/s, step time and MFU of one AdamW step for a preset, with Hugging Face peers
timed alternately in the same process (HF Flax from transformers 4.57, the `bench` extra; HF PyTorch when torch is
installed). A peer that is not installed is reported as skipped.

    python benchmarks/train_step.py                                   # GPT-2 small, batch 4 x 256, float32
    python benchmarks/train_step.py --preset bert-base --batch 8 --seq-len 128
    python benchmarks/train_step.py --preset gpt-tiny --repeats 10 --peers ours,hf-flax

MFU = (6 N + 12 L T d) x tokens / step time, over a float32 matmul ceiling measured in the same run.

Every process (ours, HF Flax, and the PyTorch worker) runs with `keep_freed_memory` (glibc keeps freed blocks
instead of unmapping them; see flaxformer_lite/training/host.py) unless ``--malloc system`` is given.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
# PyTorch's OpenMP threads otherwise spin for a while after each op, stealing the cores from whichever impl runs
# next in the same process; passive waiting keeps the alternating timings fair. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from harness import console, show_and_write, write_tables  # noqa: E402

from flaxformer_lite.layers import dense  # noqa: E402
from flaxformer_lite.models import build, preset  # noqa: E402
from flaxformer_lite.training.host import keep_freed_memory  # noqa: E402
from flaxformer_lite.training.metrics import (count_params, device_peak_flops, flops_per_token,  # noqa: E402
                                              matmul_flops)
from flaxformer_lite.training import MeshLayout, TrainStep, make_mesh, make_task  # noqa: E402

OPT = dict(learning_rate=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)


def lm_batch(cfg, batch: int, seq_len: int, seed: int = 0) -> dict:
    """A random causal-LM (GPT) or MLM (BERT) batch of ``batch x seq_len`` tokens."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (batch, seq_len + 1)).astype(np.int32)
    if cfg.model == "bert":
        mask = rng.random((batch, seq_len)) < 0.15
        return {"tokens": tokens[:, :-1], "token_type_ids": np.zeros((batch, seq_len), np.int32),
                "padding_mask": np.ones((batch, seq_len), bool), "mlm_targets": tokens[:, :-1],
                "mlm_mask": mask.astype(np.float32), "nsp_labels": rng.integers(0, 2, batch).astype(np.int32)}
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((batch, seq_len), np.int32),
            "loss_mask": np.ones((batch, seq_len), np.float32)}


def ours(cfg, batch: dict, reorder_kernels: bool = True):
    """flaxformer_lite's jitted, donated AdamW step (the same code path as train.py). ``reorder_kernels=False``
    compiles it with `kernel_dot_general`'s CPU kernel reordering off (the ``ours-plain-dot`` ablation)."""
    model = build(cfg)
    task = make_task("mlm" if cfg.model == "bert" else "causal_lm", model, cfg.model)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(**OPT))
    jbatch = jax.tree_util.tree_map(jnp.asarray, batch)
    step = TrainStep(task, tx, lambda r: task.init_params(r, jbatch), jax.random.PRNGKey(0),
                     MeshLayout(make_mesh("data=1")))
    placed = step.place(batch)

    def run():
        step.state, metrics = step.compiled(step.state, placed)  # no host-to-device copy in the timing
        return metrics["loss"]

    if not reorder_kernels:  # trace and compile now, with the reordering threshold out of reach
        with mock.patch.object(dense, "MIN_ROWS", 1 << 62):
            _block(run())
    return run, count_params(step.params(), exclude_positions=True)


def ours_plain_dot(cfg, batch: dict):
    """Ours with every projection a plain ``lax.dot_general`` (kernels kept ``[in, out]``): measures the
    reordering."""
    return ours(cfg, batch, reorder_kernels=False)


def hf_flax(cfg, batch: dict):
    """transformers 4.57's FlaxGPT2LMHeadModel / FlaxBertForPreTraining with the same optimizer, jitted and donated."""
    import transformers
    if cfg.model == "bert":
        hf_cfg = transformers.BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim,
                                         num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                                         intermediate_size=cfg.mlp_dim, max_position_embeddings=cfg.max_len)
        model = transformers.FlaxBertForPreTraining(hf_cfg, seed=0)
    else:
        hf_cfg = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_embd=cfg.embed_dim, n_layer=cfg.num_layers,
                                         n_head=cfg.num_heads, n_positions=cfg.max_len)
        model = transformers.FlaxGPT2LMHeadModel(hf_cfg, seed=0)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(**OPT))
    params = model.params
    state = (params, tx.init(params))
    jbatch = jax.tree_util.tree_map(jnp.asarray, batch)

    def loss_fn(params, b):
        if cfg.model == "bert":
            out = model(b["tokens"], token_type_ids=b["token_type_ids"], attention_mask=b["padding_mask"],
                        params=params, train=False)
            mlm = optax.softmax_cross_entropy_with_integer_labels(out.prediction_logits, b["mlm_targets"])
            nsp = optax.softmax_cross_entropy_with_integer_labels(out.seq_relationship_logits, b["nsp_labels"])
            return (mlm * b["mlm_mask"]).sum() / b["mlm_mask"].sum() + nsp.mean()
        logits = model(b["tokens"], params=params, train=False).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["targets"]).mean()

    def step(state, b):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, b)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    step = jax.jit(step, donate_argnums=0)
    holder = {"state": state}

    def run():
        holder["state"], loss = step(holder["state"], jbatch)
        return loss

    return run, count_params(params)


def _torch_step_fn(cfg, batch: dict):
    """transformers' PyTorch GPT2LMHeadModel / BertForPreTraining with torch.optim.AdamW (CPU, float32)."""
    import torch
    import transformers
    torch.manual_seed(0)
    if cfg.model == "bert":
        hf_cfg = transformers.BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim,
                                         num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                                         intermediate_size=cfg.mlp_dim, max_position_embeddings=cfg.max_len)
        model = transformers.BertForPreTraining(hf_cfg)
    else:
        hf_cfg = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_embd=cfg.embed_dim, n_layer=cfg.num_layers,
                                         n_head=cfg.num_heads, n_positions=cfg.max_len)
        model = transformers.GPT2LMHeadModel(hf_cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=OPT["learning_rate"], betas=(OPT["b1"], OPT["b2"]), eps=OPT["eps"],
                            weight_decay=OPT["weight_decay"])
    tb = {k: torch.as_tensor(np.asarray(v)) for k, v in batch.items()}

    def run():
        opt.zero_grad(set_to_none=True)
        if cfg.model == "bert":
            labels = torch.where(tb["mlm_mask"] > 0, tb["mlm_targets"].long(), torch.tensor(-100))
            out = model(input_ids=tb["tokens"].long(), token_type_ids=tb["token_type_ids"].long(),
                        attention_mask=tb["padding_mask"].long(), labels=labels,
                        next_sentence_label=tb["nsp_labels"].long())
        else:
            out = model(input_ids=tb["tokens"].long(), labels=tb["tokens"].long())  # HF shifts labels itself
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return out.loss.item()

    return run, sum(p.numel() for p in model.parameters())


def _torch_worker(conn, cfg, batch, malloc):
    """A separate process for PyTorch: its thread pool and XLA's must not share one process (measured: loading torch
    next to XLA slowed our step by ~1.5x). Runs one step per request and replies with nothing but 'done'."""
    if malloc == "keep":
        keep_freed_memory()
    try:
        run, n = _torch_step_fn(cfg, batch)
    except ImportError as err:
        conn.send(("missing", err.name or str(err)))
        return
    conn.send(("ready", n))
    try:
        while conn.recv() == "step":
            run()
            conn.send("done")
    except EOFError:  # the benchmark finished and closed the pipe
        pass


def hf_torch(cfg, batch: dict, malloc: str = "keep"):
    """The PyTorch peer, driven step by step in its own process (so timings still alternate with the others)."""
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_torch_worker, args=(child, cfg, batch, malloc), daemon=True)
    proc.start()
    status, info = parent.recv()
    if status == "missing":
        proc.join()
        raise ImportError(f"{info} not installed", name=info)

    def run():
        parent.send("step")
        return parent.recv()

    return run, info


PEERS = {"ours": ours, "ours-plain-dot": ours_plain_dot, "hf-flax": hf_flax, "hf-torch": hf_torch}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _block(x):
    return x.block_until_ready() if hasattr(x, "block_until_ready") else x


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2-small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--peers", default="ours,hf-flax,hf-torch", help=f"comma list of {list(PEERS)}")
    p.add_argument("--set", nargs="*", default=[], help="ModelConfig overrides for ours, e.g. attention_impl=blockwise")
    p.add_argument("--name", default=None, help="results file stem")
    p.add_argument("--malloc", choices=("keep", "system"), default="keep",
                   help="keep: glibc keeps freed memory in every peer's process (keep_freed_memory); system: as is")
    args = p.parse_args(argv)
    kept = args.malloc == "keep" and keep_freed_memory()  # before any JAX backend starts
    names = args.peers.split(",")
    bad = [n for n in names if n not in PEERS]
    if bad:
        p.error(f"--peers: unknown {bad}; choose from {list(PEERS)}")
    cfg = dataclasses.replace(preset(args.preset), dropout_rate=0.0, attention_dropout_rate=0.0)
    overrides = dict(kv.split("=", 1) for kv in args.set)
    ours_cfg = dataclasses.replace(cfg, **{k: type(getattr(cfg, k))(v) if not isinstance(getattr(cfg, k), bool)
                                           else v == "true" for k, v in overrides.items()})
    batch = lm_batch(cfg, args.batch, args.seq_len)
    tokens = args.batch * args.seq_len
    console.print(f"{args.preset}: batch {args.batch} x {args.seq_len}, {ours_cfg.dtype}, {jax.default_backend()}")
    stem = args.name or f"train_step-{args.preset}-{args.batch}x{args.seq_len}-{jax.default_backend()}"
    title = f"Train step, {args.preset}, batch {args.batch} x {args.seq_len}"
    runners, rows, compiled = {}, [], []
    for name in names:
        try:
            extra = {"malloc": args.malloc} if name == "hf-torch" else {}
            runners[name] = PEERS[name](ours_cfg if name.startswith("ours") else cfg, batch, **extra)
        except ImportError as err:
            rows.append({"impl": name, "note": f"skipped: {err.name or err} not installed"})
            continue
        start = time.perf_counter()
        _block(runners[name][0]())  # compile + first step
        console.print(f"  {name}: first step (compile) {time.perf_counter() - start:.1f} s")
        compiled.append({"impl": name, "note": f"first step (compile) {time.perf_counter() - start:.1f} s"})
        write_tables(stem, title, ["impl", "note"], rows + compiled, ["(partial: steps not timed yet)"])
    size = 2048 if jax.default_backend() == "cpu" else 8192
    ceiling = matmul_flops(size, dtype=ours_cfg.dtype) / 1e9  # measured before and after the steps; the better is kept
    times = {name: [] for name in runners}
    order = list(runners)
    for r in range(args.repeats):  # alternate, rotating the order, so that noise and neighbours hit all alike
        for name in order[r % len(order):] + order[:r % len(order)]:
            run = runners[name][0]
            times[name].append(_timed(lambda: _block(run())))
    ceiling = max(ceiling, matmul_flops(size, dtype=ours_cfg.dtype) / 1e9)
    peak = device_peak_flops(ours_cfg.dtype)
    peak = peak / 1e12 if peak else None
    model_params = runners["ours"][1] if "ours" in runners else next(iter(runners.values()))[1]  # positions excluded
    flops = flops_per_token(model_params, cfg, args.seq_len) * tokens
    base = {n: statistics.median(t) for n, t in times.items()}
    for name, t in base.items():
        rows.insert(len(rows), {"impl": name, "params": runners[name][1], "step s": t, "tokens/s": tokens / t,
                                "GFLOP/s": flops / t / 1e9, "MFU %": 100 * flops / t / 1e9 / ceiling,
                                "MFU % of peak": 100 * flops / t / 1e12 / peak if peak else None,
                                **{f"x vs {o}": base[o] / t for o in base if o != name and name == "ours"}})
    notes = [f"matmul ceiling ({ours_cfg.dtype} {size}^3, same run, best of before and after the steps): "
             f"{ceiling:.0f} GFLOP/s; datasheet peak: {f'{peak} TFLOP/s' if peak else 'unknown device'}",
             f"FLOPs per step: {flops / 1e9:.0f} G (6N + 12 L T d per token, N = {model_params:,})",
             f"host malloc: {'freed memory kept (keep_freed_memory)' if kept else 'system default'}",
             f"median of {args.repeats} steps each, impls alternating in rotating order after one warm-up step each"]
    cols = ["impl", "params", "step s", "tokens/s", "GFLOP/s", "MFU %"] + (["MFU % of peak"] if peak else []) + \
        [f"x vs {o}" for o in base if o != "ours"] + ["note"]
    notes += [f"{row['impl']}: {row['note']}" for row in compiled]
    show_and_write(stem, title, cols, rows, notes)


if __name__ == "__main__":
    main()
