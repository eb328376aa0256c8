"""A deterministic, resumable, host-sharded batch loader.

Batch ``step`` is a pure function of ``(seed, step)``: example ``step * global_batch + j`` of an endless stream
that reshuffles every epoch, and each example's own randomness (masking, corruption) is seeded by its global index.
So a run resumed at step s sees exactly the batches it would have seen, and any number of processes, each building
only its rows, together produce the same global batch. `ShardedLoader` serves the data read in memory (seq2seq,
classify): reading shards, one `Loader` each, each process holding only its shards.
"""
from __future__ import annotations

import functools
from typing import Callable

import numpy as np


class Loader:
    """Batches of ``global_batch`` examples drawn from ``num_examples``.

    Args:
      num_examples: size of the example pool.
      global_batch: examples per step over all processes.
      make_batch: ``(example_indices [n], rngs: list of n NumPy generators) -> dict of arrays [n, ...]``.
      seed: shuffling and per-example randomness.
      process_index, process_count: this process builds rows ``[p * b / P, (p + 1) * b / P)`` of every batch
        (one global pool: any number of processes together make the same batches).
      shuffle: reshuffle the pool every epoch (else examples in order).
    """

    def __init__(self, num_examples: int, global_batch: int, make_batch: Callable, *, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, shuffle: bool = True):
        if num_examples < 1:
            raise ValueError("the corpus yields no examples: use more text, or a shorter train.seq_len")
        if global_batch < 1 or global_batch % process_count:
            raise ValueError(f"train.batch_size ({global_batch}) must be a positive multiple of the process count "
                             f"({process_count})")
        self.num_examples, self.global_batch, self.make_batch = num_examples, global_batch, make_batch
        self.seed, self.shuffle = seed, shuffle
        self.local = global_batch // process_count
        self.offset = process_index * self.local

    def distinct_batches(self) -> int:
        """How many batches an epoch holds before examples repeat (at least 1)."""
        return max(1, self.num_examples // self.global_batch)

    @functools.lru_cache(maxsize=4)
    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def example_indices(self, step: int) -> np.ndarray:
        """The pool indices of this process's examples of batch ``step``."""
        g = step * self.global_batch + self.offset + np.arange(self.local)
        epochs, pos = g // self.num_examples, g % self.num_examples
        return np.array([self._order(int(e))[p] for e, p in zip(epochs, pos)])

    def batch(self, step: int) -> dict:
        """This process's rows of batch ``step``."""
        js = step * self.global_batch + self.offset + np.arange(self.local)
        rngs = [np.random.default_rng([self.seed, 1, int(j)]) for j in js]
        return self.make_batch(self.example_indices(step), rngs)


class ShardedLoader:
    """Global batches made of one equal chunk per reading shard, each drawn by its own `Loader` from that shard's
    pool. A process holds only its shards (a contiguous block), so it reads and tokenizes only their documents;
    the global batch depends on the number of shards, not on how many processes share them.

    Args:
      shard_loaders: ``{shard index: Loader}`` for this process's shards, each with ``global_batch / num_shards``.
      num_shards: reading shards in all.
    """

    def __init__(self, shard_loaders: dict, num_shards: int):
        self.loaders = dict(sorted(shard_loaders.items()))
        self.num_shards = num_shards
        self.num_examples = sum(ld.num_examples for ld in self.loaders.values())

    def distinct_batches(self) -> int:
        """How many batches an epoch holds before examples repeat in some shard (at least 1)."""
        return min(ld.distinct_batches() for ld in self.loaders.values())

    def batch(self, step: int) -> dict:
        """This process's rows of global batch ``step``: its shards' chunks, in shard order."""
        parts = [ld.batch(step) for ld in self.loaders.values()]
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
