"""Data path at scale: prepare (tokenize once into the token store) and train.py's first run and resume, at several
corpus sizes, with wall time and peak memory of each process, and the random-access read time of a batch.

    python benchmarks/data.py                      # 8 MB and 128 MB corpora built from ../shared/data
    python benchmarks/data.py --sizes 8,128,1024   # and 1 GB (a few minutes more)

Corpora are JSONL files of real text (tiny Shakespeare, Botchan, classical Chinese from ../shared/data, or the
built-in corpus when that folder is absent), repeated with a numbered header per document up to the size asked.
Peak memory is the process's maximum resident set (`wait4`), so child processes of prepare's workers are reported
separately from the main one.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import console, show_and_write  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
MODEL = ["model.num_layers=2", "model.embed_dim=64", "model.num_heads=4", "model.mlp_dim=128", "model.max_len=128"]


def source_texts() -> list[str]:
    """Paragraphs of the shared corpora (or the built-in corpus)."""
    texts = []
    for path in sorted(SHARED.glob("*.txt")) if SHARED.is_dir() else []:
        texts += [p for p in path.read_text(encoding="utf-8", errors="replace").split("\n\n") if p.strip()]
    if not texts:
        sys.path.insert(0, str(ROOT))
        from flaxformer_lite.data import load_corpus
        texts = list(load_corpus()["text"])
    return texts


def make_corpus(folder: Path, megabytes: int, texts: list[str]) -> Path:
    """A JSONL corpus of about ``megabytes`` MB: documents of a few paragraphs each, numbered."""
    path = folder / f"corpus-{megabytes}mb.jsonl"
    if path.exists():
        return path
    target, written, i = megabytes * 1_000_000, 0, 0
    with path.open("w", encoding="utf-8") as f:
        while written < target:
            doc = f"Document {i}.\n" + "\n\n".join(texts[(i * 3 + k) % len(texts)] for k in range(3))
            line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode())
            i += 1
    return path


def timed(args: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak resident GiB of the process itself, output) of one command."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, **(env or {})})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(args[:4])} failed:\n{out[-3000:]}")
    return seconds, usage.ru_maxrss / 2**20, out


def batch_data_ms(store_dir: Path, batch: int = 8, length: int = 1024, repeats: int = 200) -> dict:
    """A training step's data time: train.py's causal-LM `Loader` making batch ``step`` (random windows read from
    the memmap, targets, segment ids), reading the bare memmap or through the store's checksum checks, the two
    alternating batch by batch on the same batches. Median ms of ``repeats`` batches bare and with every block
    unchecked before each (the worst case: a big corpus's early steps); and the checked/bare ratio of the total over
    a whole first epoch (what a run pays: every block checked once)."""
    sys.path.insert(0, str(ROOT))
    from flaxformer_lite.data.checksums import CheckedTokens
    from flaxformer_lite.data.loader import Loader
    from flaxformer_lite.data.pipeline import special_ids
    from flaxformer_lite.data.prepare import store_tokenizer
    from flaxformer_lite.data.registry import get_objective
    from flaxformer_lite.data.store import TokenStore
    from flaxformer_lite.experiment import DataConfig
    store = TokenStore(store_dir)
    raw, m, stream = store.tokens.raw, store.manifest, get_objective("causal_lm").stream_pool
    ids = special_ids(store_tokenizer(store))
    checked = CheckedTokens(raw, store.tokens.sums, m.vocab_size, store.folder, m.checksum_block)
    loaders = {}
    for name, tokens in (("bare", raw), ("checked", checked)):
        size, make_batch = stream(DataConfig(), tokens, 0, m.tokens, length, ids)
        loaders[name] = Loader(size, batch, make_batch, seed=0)

    def times(steps, fresh: bool) -> dict:
        out = {"bare": [], "checked": []}
        for step in steps:
            if fresh:
                checked.checked[:] = bytes(len(checked.checked))  # every block unchecked again
            for name, loader in loaders.items():
                t = time.perf_counter()
                loader.batch(step)
                out[name].append(time.perf_counter() - t)
        return out

    worst = times(range(repeats), fresh=True)
    checked.checked[:] = bytes(len(checked.checked))
    epoch = times(range(loaders["bare"].distinct_batches()), fresh=False)
    return {"batch data ms": 1e3 * float(np.median(worst["bare"])),
            "checked, worst ms": 1e3 * float(np.median(worst["checked"])),
            "checked, first epoch x": sum(epoch["checked"]) / sum(epoch["bare"])}


def train_command(work: Path, corpus: Path, megabytes: int, steps: int) -> list[str]:
    """train.py on ``corpus``, its run folder (and the run's own store) in ``work``, up to ``steps``."""
    return [sys.executable, "train.py", *MODEL, f"data.path={corpus}", "data.vocab_size=8192", "train.seq_len=128",
            "train.batch_size=8", "train.eval_every=0", "train.samples=0", "train.progress=false",
            f"train.run_dir={work / f'run-{megabytes}'}", "train.checkpoint_every=2", f"train.steps={steps}"]


def prepare_and_first_run(megabytes: int, work: Path, texts: list[str], steps: int, repeats: int) -> dict:
    """Prepare (the median of ``repeats`` runs, each from scratch) and train.py's first run, on a corpus of about
    ``megabytes`` MB; each from an empty datasets cache."""
    corpus = make_corpus(work, megabytes, texts)  # corpora are kept between runs of the benchmark; stores and runs not
    store, cache = work / f"store-{megabytes}", work / f"datasets-cache-{megabytes}"
    fresh = {"HF_DATASETS_CACHE": str(cache)}  # datasets' Arrow copy of the corpus: made afresh, as for a new user
    prepares = []
    for _ in range(repeats):
        for old in (store, work / f"run-{megabytes}", cache):
            shutil.rmtree(old, ignore_errors=True)
        prepares.append(timed([sys.executable, "-m", "flaxformer_lite.run.prepare", "--out", str(store),
                               f"data.path={corpus}", "data.vocab_size=8192"], fresh))
    shutil.rmtree(cache)
    first_s, first_gib, _ = timed(train_command(work, corpus, megabytes, steps), fresh)
    shutil.rmtree(cache, ignore_errors=True)
    size_mb = corpus.stat().st_size / 1e6
    prep_s = float(np.median([t[0] for t in prepares]))
    return {"corpus MB": size_mb, "tokens": json.loads((store / "manifest.json").read_text())["tokens"],
            "prepare s": prep_s, "prepare MB/s": size_mb / prep_s, "prepare MB/s range":
            f"{size_mb / max(t[0] for t in prepares):.1f}-{size_mb / min(t[0] for t in prepares):.1f}",
            "prepare peak GiB": max(t[1] for t in prepares), "first run s": first_s, "first run peak GiB": first_gib,
            **batch_data_ms(store)}


def resume(megabytes: int, work: Path, steps: int) -> tuple[float, float]:
    """(wall seconds, peak GiB) of train.py resuming its run on the ``megabytes`` corpus, up to ``steps``."""
    seconds, gib, out = timed(train_command(work, work / f"corpus-{megabytes}mb.jsonl", megabytes, steps))
    assert "resuming from step" in out, out[-2000:]
    return seconds, gib


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="8,128", help="corpus sizes in MB, comma-separated")
    p.add_argument("--steps", type=int, default=2, help="training steps of the first run (the resume runs 2 more)")
    p.add_argument("--work", default=None, help="folder for corpora, stores and runs (default: a temporary one)")
    p.add_argument("--repeats", type=int, default=3, help="prepares and resumes per size (their median is reported)")
    args = p.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    texts = source_texts()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = []
        for mb in sizes:
            rows.append(prepare_and_first_run(mb, work, texts, args.steps, args.repeats))
            console.print(rows[-1])
        resumes = {mb: [] for mb in sizes}
        for r in range(args.repeats):  # sizes interleaved, so that the machine's load changes hit each alike
            for mb in sizes:
                resumes[mb].append(resume(mb, work, args.steps + 2 * (r + 1)))
        for mb, row in zip(sizes, rows):
            row["resume s"] = float(np.median([t[0] for t in resumes[mb]]))
            row["resume peak GiB"] = max(t[1] for t in resumes[mb])
    notes = [f"cores: {os.cpu_count()}; model: 2 layers, 64 dims; batch 8 x 128; data.vocab_size=8192",
             "prepare = tokenizer training on a seeded sample of <= 50,000 documents + streaming the whole corpus "
             "into the store; first run = train.py on the prepared corpus's own store in its run folder (written "
             "again there: the run's store), compile included; resume = the same command with 2 more steps; prepare "
             "and first run each start from an empty datasets cache (the corpus's Arrow copy made afresh)",
             f"prepare s and resume s: medians of {args.repeats} runs (resumes of the sizes interleaved); peak "
             "memory: the largest of them",
             "batch data = a training step's data time: train.py's causal-LM loader making a batch of 8 random "
             "windows of 1024+1 tokens (memmap read, targets, segment ids), median of 200; checked, worst = the same "
             "batches read through the checksums with every block unchecked before each (a big corpus's early steps); "
             "checked, first epoch = total over a whole epoch, checked / bare (every block checked once, as in a run); "
             "bare and checked alternate batch by batch (target: checksums cost <= 5% of the data time)"]
    if len(rows) > 1:
        small, big = rows[0], rows[1]
        notes.append(f"resume {big['corpus MB']:.0f} MB vs {small['corpus MB']:.0f} MB: wall x"
                     f"{big['resume s'] / small['resume s']:.2f}, peak memory x"
                     f"{big['resume peak GiB'] / small['resume peak GiB']:.2f} (target <= 1.25 each)")
    cols = ["corpus MB", "tokens", "prepare s", "prepare MB/s", "prepare MB/s range", "prepare peak GiB", "first run s",
            "first run peak GiB", "resume s", "resume peak GiB", "batch data ms", "checked, worst ms",
            "checked, first epoch x"]
    show_and_write("data", "Data path: prepare, first run and resume by corpus size", cols, rows, notes)


if __name__ == "__main__":
    main()
