"""From a corpus to train/eval loaders for one objective. Knows no model; takes the data settings by field name
(an `experiment.DataConfig` or anything with the same fields).

Shape key: b batch, l ``seq_len``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np

from . import objectives
from .corpus import column, load_corpus
from .loader import Loader, ShardedLoader
from .prepare import prepare_store, prepare_tokenizer, store_tokenizer, tokenizer_sample
from .registry import get_objective
from .store import TokenStore
from .tokenizer import Tokenizer


def special_ids(tok: Tokenizer) -> objectives.SpecialIds:
    """The ids objectives use, read off a tokenizer."""
    return objectives.SpecialIds(pad=tok.pad_id, bos=tok.bos_id, eos=tok.eos_id, mask=tok.mask_id, cls=tok.cls_id,
                                 sep=tok.sep_id, sentinels=tuple(tok.sentinel_ids), vocab_size=tok.vocab_size,
                                 special=frozenset(tok.special_ids))


@dataclasses.dataclass
class Data:
    """What training needs from the data side: ``train``/``eval`` loaders (``batch(step)`` gives this process's
    rows), the tokenizer and a few figures."""

    tokenizer: Tokenizer
    train: Loader | ShardedLoader
    eval: Loader | ShardedLoader
    objective: str
    num_train_examples: int
    unigram_entropy: float  # nats per token of the corpus (a token store's) or of this process's training documents
    label_names: list[str] | None = None  # classify: label id i is label_names[i]


def split_documents(n: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/eval split of ``n`` documents: (train indices, eval indices), eval at least 1."""
    order = np.random.default_rng([seed, 7]).permutation(n)
    n_eval = max(1, int(round(n * eval_fraction))) if n > 1 else 0
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


def reading_shards(num_shards: int, batch_size: int, process_index: int, process_count: int) -> range:
    """This process's contiguous block of reading shards; checks the divisibility the layout needs."""
    shards = num_shards or process_count
    if shards % process_count or batch_size % shards:
        raise ValueError(f"data.shards ({shards}) must be a multiple of the process count ({process_count}) and "
                         f"divide train.batch_size ({batch_size})")
    per = shards // process_count
    return range(process_index * per, (process_index + 1) * per)


def build_data(data, *, seq_len: int, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1,
               tokenizer: Tokenizer | None = None, store: str | Path | None = None,
               sync: Callable[[], None] = lambda: None, refuse: str | None = None, progress: bool = True) -> Data:
    """The train and eval loaders of ``data.objective``, and the tokenizer: ``tokenizer`` (e.g. a pretrained
    model's or the run's own) or a new one trained on a seeded sample of the corpus (the same on every host).

    With ``store`` (a folder), a text objective reads a token store there, written once (`prepare_store`: by process
    0 while the others wait in ``sync()``; with ``refuse``, a store that no longer matches the corpus is refused
    with that message, not replaced) and memory-mapped: start-up costs the same for any corpus size, and every
    process draws its rows of each batch from one global pool. The eval set is ``data.eval_path`` (its own store)
    or the corpus's last ``data.eval_fraction`` of tokens. Otherwise (and for seq2seq and classify) this process's
    shards of the corpus are tokenized in memory."""
    objective = get_objective(data.objective)
    objective.check(seq_len=seq_len)
    if store is not None and objective.stream_pool is not None:
        primary = process_index == 0
        found = prepare_store(data, store, seed=seed, tokenizer=tokenizer, primary=primary, sync=sync,
                              refuse=refuse, progress=progress)
        tok = tokenizer or store_tokenizer(found)
        held_out = None
        if data.eval_path:  # the user's held-out corpus, in its own store, with the same tokenizer
            try:
                held_out = prepare_store(dataclasses.replace(data, path=data.eval_path), f"{store}-eval", seed=seed,
                                         tokenizer=tok, primary=primary, sync=sync, progress=progress)
            except ValueError as err:  # the corpus reader names data.path: here it is data.eval_path
                raise ValueError(str(err).replace("data.path=", "data.eval_path=", 1)) from None
        return _stream_data(data, objective, found, held_out, tok, seq_len=seq_len, batch_size=batch_size,
                            seed=seed, process_index=process_index, process_count=process_count)
    return _memory_data(data, objective, seq_len=seq_len, batch_size=batch_size, seed=seed,
                        process_index=process_index, process_count=process_count, tokenizer=tokenizer)


def _memory_data(data, objective, *, seq_len: int, batch_size: int, seed: int, process_index: int,
                 process_count: int, tokenizer: Tokenizer | None) -> Data:
    """This process's shards of the corpus, tokenized in memory (seq2seq, classify, or no store)."""
    role, field = objective.columns[0]
    if not getattr(data, field):
        raise ValueError(f"data.{field} must name the column of the text for data.objective={data.objective!r}")
    fields = [(role, getattr(data, field), field) for role, field in objective.columns if getattr(data, field)]
    ds = load_corpus(data.path, data.format, fields[0][1], data.text_unit)
    fields[0] = (fields[0][0], "text", fields[0][2])  # load_corpus names the text column "text"
    for _, name, field in fields[1:]:
        if name not in ds.column_names:
            raise ValueError(f"data.{field} {name!r} is not a column; columns: {ds.column_names}")
    label_names = label_vocabulary(column(ds, data.label_field)) if "label" in dict(objective.columns) else None
    tok = tokenizer or prepare_tokenizer(tokenizer_sample(ds, seed), data)
    if data.objective == "mlm" and tok.mask_id < 0:
        raise ValueError("data.objective='mlm' needs a tokenizer with a mask token; this one has none")
    ids = special_ids(tok)
    mine = reading_shards(data.shards, batch_size, process_index, process_count)
    num_shards = len(mine) * process_count
    train, evals, entropy_docs = {}, {}, []
    for k in mine:
        columns = _encode_columns(ds.shard(num_shards, k, contiguous=True), fields, tok, label_names)
        train_idx, eval_idx = split_documents(len(columns["text"]), data.eval_fraction, seed + k)
        entropy_docs += [columns["text"][i] for i in train_idx]
        for idx, is_train, out in ((train_idx, True, train), (eval_idx, False, evals)):
            part = {role: [values[i] for i in idx] for role, values in columns.items()}
            size, make_batch = objective.make_pool(data, part, seq_len, ids)
            out[k] = Loader(size, batch_size // num_shards, make_batch, seed=seed * 1000 + 2 * k + (not is_train),
                            shuffle=is_train)
    return Data(tok, ShardedLoader(train, num_shards), ShardedLoader(evals, num_shards), data.objective,
                sum(ld.num_examples for ld in train.values()), unigram_entropy(entropy_docs, tok.vocab_size),
                label_names)


def _stream_data(data, objective, store: TokenStore, held_out: TokenStore | None, tok: Tokenizer, *, seq_len: int,
                 batch_size: int, seed: int, process_index: int, process_count: int) -> Data:
    """Loaders over a token store's stream: training on it all and eval on ``held_out``, or training on its first
    tokens and eval on the last ``data.eval_fraction``."""
    if data.objective == "mlm" and tok.mask_id < 0:
        raise ValueError("data.objective='mlm' needs a tokenizer with a mask token; this one has none")
    ids, total = special_ids(tok), store.manifest.tokens
    if held_out is None:
        cut = int(round(total * (1.0 - data.eval_fraction)))
        parts = (("train", store, 0, cut), ("eval", store, cut, total))
    else:
        parts = (("train", store, 0, total), ("eval", held_out, 0, held_out.manifest.tokens))
    loaders = {}
    for name, source, start, stop in parts:
        size, make_batch = objective.stream_pool(data, source.tokens, start, stop, seq_len, ids)
        if size < 1:
            raise ValueError(f"the {name} part of the corpus ({stop - start:,} tokens) is shorter than one example of "
                             f"train.seq_len={seq_len}; use more text, a shorter train.seq_len, or another "
                             "data.eval_fraction")
        loaders[name] = Loader(size, batch_size, make_batch, seed=seed * 1000 + (name == "eval"),
                               process_index=process_index, process_count=process_count, shuffle=name == "train")
    return Data(tok, loaders["train"], loaders["eval"], data.objective, loaders["train"].num_examples,
                store.unigram_entropy())


def _encode_columns(part, fields, tok: Tokenizer, label_names) -> dict[str, list]:
    """``{role: values}`` of one shard: text columns tokenized, labels as ids into ``label_names``."""
    out = {}
    for role, name, _ in fields:
        if role == "label":
            index = {label: i for i, label in enumerate(label_names)}
            out[role] = [index[str(x)] for x in column(part, name)]
        else:
            out[role] = tok.encode_batch(column(part, name))
    return out


def label_vocabulary(values) -> list[str]:
    """The sorted distinct labels as strings (numerically sorted when they are all integers); id i names entry i."""
    distinct = set(values)
    if not distinct:
        raise ValueError("the classification data has no labels")
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in distinct):
        return [str(v) for v in sorted(distinct)]
    return sorted(str(v) for v in distinct)


def unigram_entropy(docs: list[list[int]], vocab_size: int) -> float:
    """Entropy (nats) of the token frequencies in ``docs``."""
    counts = np.bincount(np.concatenate([np.asarray(d, np.int64) for d in docs if len(d)]), minlength=vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
