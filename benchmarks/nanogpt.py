"""nanoGPT's CPU "baby GPT" and the same model trained by our train.py, one after the other, in rounds: steady-state
step time (the median after the first tenth of the steps) and the losses each reaches.

    python benchmarks/nanogpt.py --nanogpt ~/src/nanoGPT             # a checkout of karpathy/nanoGPT (needs torch)
    python benchmarks/nanogpt.py --nanogpt ~/src/nanoGPT --steps 2000 --rounds 1

nanoGPT runs as an external peer: its checkout is copied into a temporary folder (its code stays out of this
repository), its own `data/shakespeare_char/prepare.py` writes the character data from tiny Shakespeare (the copy in
../shared/data, or --text), and its `train.py` runs the configuration its README documents for a CPU:

    --device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4
    --n_head=4 --n_embd=128 --max_iters=<steps> --lr_decay_iters=2000 --dropout=0.0

Ours is the same model and recipe through train.py: 4 layers, 4 heads, 128 dims, MLP 512, learned positions,
pre-LayerNorm, tied embeddings, batch 12 x 64 characters (a character tokenizer: `data.tokenizer_type=char`), AdamW
(lr 1e-3, 100 warmup steps, b2 0.99, weight decay 0.1, clipping at 1.0), logging every step as nanoGPT does. Step
times are what each trainer reports per step: nanoGPT's ``time`` per iteration, our ``step_time_s``.
Differences left: our vocabulary holds 39 special and user-defined ids besides the 65 characters, documents are
paragraphs (packed, attention kept within each), and the learning rate decays over --steps, not 2000.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import console, show_and_write  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
NANOGPT_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                "--n_embd=128", "--lr_decay_iters=2000", "--dropout=0.0"]
OURS_ARGS = ["model.preset=gpt-tiny", "model.num_layers=4", "model.num_heads=4", "model.embed_dim=128",
             "model.mlp_dim=512", "model.max_len=64", "model.dropout_rate=0", "model.attention_dropout_rate=0",
             "data.tokenizer_type=char", "data.vocab_size=256", "data.byte_fallback=false",
             "data.normalization=identity", "data.character_coverage=1.0", "data.eval_fraction=0.1",
             "train.seq_len=64", "train.batch_size=12", "train.log_every=1", "train.checkpoint_every=100000",
             "train.samples=0", "train.progress=false", "optim.lr=1e-3", "optim.warmup_steps=100", "optim.b2=0.99",
             "optim.weight_decay=0.1", "optim.clip_norm=1.0"]
_ITER = re.compile(r"^iter (\d+): loss ([\d.]+), time ([\d.]+)ms")
_EVAL = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)")


def prepare_nanogpt(checkout: Path, text: Path, work: Path) -> Path:
    """A copy of the nanoGPT checkout in ``work`` with its character data written by its own prepare.py (the
    download it would attempt is skipped: input.txt is already there)."""
    copy = work / "nanoGPT"
    shutil.copytree(checkout, copy, ignore=shutil.ignore_patterns(".git", "out-*", "*.bin"))
    data = copy / "data" / "shakespeare_char"
    shutil.copy(text, data / "input.txt")
    stub = "import sys, types, runpy; sys.modules.setdefault('requests', types.ModuleType('requests')); " \
           "runpy.run_path('prepare.py', run_name='__main__')"
    subprocess.run([sys.executable, "-c", stub], cwd=data, check=True, capture_output=True, text=True)
    return copy


def run_nanogpt(copy: Path, steps: int) -> dict:
    """One nanoGPT run: per-iteration times (ms) and its last train/val estimates."""
    out = subprocess.run([sys.executable, "train.py", *NANOGPT_ARGS, f"--max_iters={steps}",
                          f"--eval_interval={steps}", f"--out_dir={copy / 'out'}"], cwd=copy, capture_output=True,
                         text=True, timeout=3600)
    if out.returncode:
        raise SystemExit(f"nanogpt.py: error: nanoGPT's train.py failed:\n{out.stderr[-2000:]}")
    times = [float(m.group(3)) for m in map(_ITER.match, out.stdout.splitlines()) if m]
    evals = [m for m in map(_EVAL.match, out.stdout.splitlines()) if m]
    return {"step_ms": times, "train_loss": float(evals[-1].group(2)), "eval_loss": float(evals[-1].group(3))}


def run_ours(text: Path, run_dir: Path, steps: int) -> dict:
    """One train.py run: per-step times (ms, from metrics.jsonl) and its last train/eval losses."""
    args = [*OURS_ARGS, f"data.path={text}", f"train.steps={steps}", f"train.eval_every={steps}",
            f"train.run_dir={run_dir}"]
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                         timeout=3600)
    if out.returncode:
        raise SystemExit(f"nanogpt.py: error: our train.py failed:\n{out.stderr[-2000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_ = [r for r in records if "step_time_s" in r]
    evals = [r for r in records if "eval_loss" in r]
    return {"step_ms": [1e3 * r["step_time_s"] for r in steps_], "train_loss": steps_[-1]["loss"],
            "eval_loss": evals[-1]["eval_loss"]}


def steady(times: list[float]) -> float:
    """Median step time after the first tenth of the steps (compilation, warm-up, nanoGPT's first eval)."""
    return statistics.median(times[max(1, len(times) // 10):])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nanogpt", type=Path, required=True, help="a checkout of github.com/karpathy/nanoGPT")
    p.add_argument("--text", type=Path, default=TEXT, help="tiny Shakespeare (default: ../shared/data)")
    p.add_argument("--steps", type=int, default=300, help="steps per run")
    p.add_argument("--rounds", type=int, default=2, help="nanoGPT-then-ours rounds")
    args = p.parse_args(argv)
    checkout = args.nanogpt.expanduser()
    if not (checkout / "train.py").is_file() or not (checkout / "model.py").is_file():
        p.error(f"--nanogpt {checkout}: not a nanoGPT checkout (no train.py/model.py)")
    if not args.text.is_file():
        p.error(f"--text {args.text}: no such file (tiny Shakespeare; ../shared/data holds a copy)")
    if args.steps < 20 or args.rounds < 1:
        p.error(f"--steps must be >= 20 and --rounds >= 1, got {args.steps} and {args.rounds}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        copy = prepare_nanogpt(checkout, args.text, Path(tmp))
        for r in range(args.rounds):
            for name, run in (("nanoGPT (PyTorch eager)", lambda: run_nanogpt(copy, args.steps)),
                              ("flaxformer_lite train.py", lambda: run_ours(args.text, Path(tmp) / f"ours{r}",
                                                                              args.steps))):
                got = run()
                rows.append({"round": r + 1, "model": name, "step ms (median)": steady(got["step_ms"]),
                             "train loss": got["train_loss"], "eval loss": got["eval_loss"]})
                console.print(rows[-1])
    nano = [row["step ms (median)"] for row in rows if row["model"].startswith("nanoGPT")]
    ours = [row["step ms (median)"] for row in rows if not row["model"].startswith("nanoGPT")]
    notes = [f"steps per run: {args.steps}; ours / nanoGPT step time, per round: "
             + ", ".join(f"{o / n:.2f}" for o, n in zip(ours, nano)),
             "losses in nats per character: nanoGPT estimates both on 20 random batches; ours is its last training "
             "batch and the whole held-out tenth"]
    show_and_write("nanogpt-baby-cpu", "nanoGPT baby GPT vs flaxformer_lite (CPU)",
                   ["round", "model", "step ms (median)", "train loss", "eval loss"], rows, notes)


if __name__ == "__main__":
    main()
