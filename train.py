"""Pre-train a model from one command.

    python train.py                                   # gpt-tiny on the built-in corpus, a few minutes on a CPU
    python train.py --config configs/bert-tiny.yaml train.steps=200
    python train.py --config configs/gpt-tiny.yaml data.path=../shared/data/tinyshakespeare.txt train.run_dir=runs/tiny

``--help`` lists every key. The command lives in the package (`flaxformer_lite.run`), which tests and scripts
import; this file only starts it.
"""
import sys

from flaxformer_lite.run import cli, main  # noqa: F401  (main: for scripts that load this file)

if __name__ == "__main__":
    sys.exit(cli())
