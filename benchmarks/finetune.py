"""Fine-tuning on real text: does a pre-trained backbone help? Authorship of 14-word windows (Shakespeare, speaker
lines removed, against Soseki's "Botchan" in English) from ``../shared/data``, 600 train and 200 eval examples.

Runs three train.py jobs side by side and prints eval accuracy per evaluation step:
  1. pre-train BERT-Tiny (MLM + NSP) on both texts;
  2. fine-tune a classifier from it (``train.init_from``);
  3. the same classifier from scratch, with the same tokenizer and config.

    python benchmarks/finetune.py                       # runs under runs/finetune-bench/
    python benchmarks/finetune.py --pretrain-steps 200 --steps 60
"""
from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"


def make_data(out: Path, examples: int, words: int = 14, seed: int = 0) -> None:
    """``authors.jsonl`` (text, label) and ``both.txt`` (the pre-training corpus) under ``out``."""
    rng = random.Random(seed)
    shakespeare = "\n".join(line for line in (DATA / "tinyshakespeare.txt").read_text().splitlines()
                            if not re.fullmatch(r"[A-Z][A-Za-z ]*:", line.strip()))
    botchan = (DATA / "botchan.txt").read_text()
    botchan = botchan[botchan.find("CHAPTER I"):]

    def windows(text: str, n: int) -> list[str]:
        tokens = text.split()
        return [" ".join(tokens[s:s + words]) for s in rng.sample(range(len(tokens) - words), n)]

    rows = [{"text": t, "label": "shakespeare"} for t in windows(shakespeare, examples // 2)]
    rows += [{"text": t, "label": "botchan"} for t in windows(botchan, examples // 2)]
    rng.shuffle(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "authors.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "both.txt").write_text(shakespeare + "\n\n" + botchan)


def train(*args: str) -> None:
    cmd = [sys.executable, str(ROOT / "train.py"), *args, "train.progress=false"]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def eval_accuracy(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["eval_accuracy"] for r in rows if "eval_accuracy" in r}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "runs" / "finetune-bench"))
    parser.add_argument("--pretrain-steps", type=int, default=800)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    if not (DATA / "tinyshakespeare.txt").is_file():
        print(f"benchmarks/finetune.py needs {DATA} (tinyshakespeare.txt, botchan.txt)", file=sys.stderr)
        return 2
    out = Path(args.out)
    make_data(out, 800)
    config = str(ROOT / "configs" / "bert-tiny.yaml")
    train("--config", config, f"data.path={out / 'both.txt'}", f"train.steps={args.pretrain_steps}",
          f"train.run_dir={out / 'pretrain'}")
    common = [f"data.path={out / 'authors.jsonl'}", "data.objective=classify", "data.eval_fraction=0.25",
              "train.seq_len=32", "train.batch_size=32", f"train.steps={args.steps}",
              f"train.eval_every={max(1, args.steps // 3)}", "train.eval_batches=6", "train.log_every=10",
              f"optim.lr={args.lr}", "optim.warmup_steps=15"]
    train(*common, f"train.init_from={out / 'pretrain'}", f"train.run_dir={out / 'finetuned'}")
    train("--config", config, *common, f"data.tokenizer={out / 'pretrain' / 'tokenizer.model'}",
          f"train.run_dir={out / 'scratch'}")
    tuned, scratch = eval_accuracy(out / "finetuned"), eval_accuracy(out / "scratch")
    print("\n| eval step | from the pre-trained backbone | from scratch |\n|---|---|---|")
    for step in sorted(tuned):
        print(f"| {step} | {tuned[step]:.1%} | {scratch.get(step, float('nan')):.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
