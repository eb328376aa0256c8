"""Prepare a token store ahead of training, e.g. a big corpus on a big machine (what train.py does on its first run,
by process 0, when ``data.store`` is unset):

    python -m flaxformer_lite.run.prepare --out stores/shakespeare data.path=../shared/data/tinyshakespeare.txt
    python train.py data.store=stores/shakespeare ...

The store is reused while its manifest matches the corpus (files, sizes, modification times, a content sample) and
the tokenizer settings; `flaxformer_lite.data.prepare` does the work. Exit 0 with a summary line, 2 with one
``prepare: error:`` line for a bad setting, corpus or folder.
"""
from __future__ import annotations

import argparse
import sys

from ..data.prepare import prepare_store
from ..experiment import load_config


def main(argv=None) -> int:
    """``python -m flaxformer_lite.run.prepare --out DIR [--config F] [data.key=value ...]``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the store folder to write (or check)")
    p.add_argument("--config", help="a train.py YAML config (its data section is used)")
    p.add_argument("overrides", nargs="*", help="data.* (and train.seed) overrides, as for train.py")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        store = prepare_store(cfg.data, args.out, seed=cfg.train.seed)
    except ValueError as err:
        print(f"prepare: error: {err}", file=sys.stderr)
        return 2
    m = store.manifest
    print(f"{store.folder}: {m.documents:,} documents, {m.tokens:,} tokens ({m.dtype}), {m.text_bytes / 1e6:.1f} MB "
          f"of text, vocabulary {m.vocab_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
