"""The run entry point: what ``python train.py`` does, as a package that tests and scripts import.

- `command.py`: the command line (``main``, ``cli``): parse, lock the run folder, check, build, train, report.
- `folder.py`: the run folder: saved config, tokenizer, token store's place, resume checks.
- `model.py`: the run's model and task, from the config or ``train.init_from``; grafting; samples.
- `prepare.py`: ``python -m flaxformer_lite.run.prepare``, a token store prepared ahead of training.

This is the top floor: it imports the rest of the package; nothing in the package imports it.
"""
from .command import cli, main

__all__ = ["cli", "main"]
