"""From a corpus to train/eval loaders for one objective. Knows no model; takes the data settings by field name
(a `config.DataConfig` or anything with the same fields).

Shape key: b batch, l ``seq_len``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from . import objectives
from .corpus import load_corpus
from .loader import Loader, ShardedLoader
from .packing import pack_documents
from .tokenizer import Tokenizer, train_tokenizer

OBJECTIVES = ("causal_lm", "prefix_lm", "mlm", "span_corruption", "seq2seq", "classify")
MLM_SPECIAL_TOKENS = 3  # [CLS] A [SEP] B [SEP]
MLM_MIN_CHUNK = 8  # MLM makes examples only of document chunks this long (shorter tails are dropped)
MLM_MIN_SEQ_LEN = MLM_MIN_CHUNK + MLM_SPECIAL_TOKENS


def special_ids(tok: Tokenizer) -> objectives.SpecialIds:
    """The ids objectives use, read off a tokenizer."""
    return objectives.SpecialIds(pad=tok.pad_id, bos=tok.bos_id, eos=tok.eos_id, mask=tok.mask_id, cls=tok.cls_id,
                                 sep=tok.sep_id, sentinels=tuple(tok.sentinel_ids), vocab_size=tok.vocab_size,
                                 special=frozenset(tok.special_ids))


TOKENIZER_SAMPLE_DOCS = 50_000  # documents every host reads to train the same tokenizer


def prepare_tokenizer(texts: list[str], data, run_dir: str | Path) -> Tokenizer:
    """``data.tokenizer`` if given; else the run folder's ``tokenizer.model`` (a resumed run); else train one on
    ``texts`` and save it there."""
    if data.tokenizer:
        return Tokenizer.load(data.tokenizer)
    path = Path(run_dir) / "tokenizer.model"
    if path.exists():
        return Tokenizer.load(path)
    tok = train_tokenizer(texts, vocab_size=data.vocab_size, model_type=data.tokenizer_type,
                          character_coverage=data.character_coverage, byte_fallback=data.byte_fallback,
                          normalization=data.normalization)
    tok.save(path)
    return tok


@dataclasses.dataclass
class Data:
    """What training needs from the data side (``train``/``eval`` hold this process's shards)."""

    tokenizer: Tokenizer
    train: ShardedLoader
    eval: ShardedLoader
    objective: str
    num_train_examples: int
    unigram_entropy: float  # nats per token of this process's training documents
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


def build_data(data, *, seq_len: int, batch_size: int, seed: int, run_dir: str | Path, process_index: int = 0,
               process_count: int = 1, tokenizer=None) -> Data:
    """Read this process's shards of the corpus, prepare the tokenizer (the same on every host; ``tokenizer``, e.g.
    a pretrained model's, overrides it), and make the train and eval loaders of ``data.objective``."""
    if data.objective not in OBJECTIVES:
        raise ValueError(f"data.objective must be one of {OBJECTIVES}, got {data.objective!r}")
    if data.objective == "mlm" and seq_len < MLM_MIN_SEQ_LEN:
        raise ValueError(f"train.seq_len must be at least {MLM_MIN_SEQ_LEN} for data.objective='mlm' (a chunk of "
                         f"{MLM_MIN_CHUNK} tokens in [CLS] A [SEP] B [SEP]), got {seq_len}")
    ds = load_corpus(data.path, data.format, data.text_field if data.objective != "seq2seq" else data.source_field)
    for key, column in _extra_columns(data):
        if column not in ds.column_names:
            raise ValueError(f"data.{key} {column!r} is not a column; columns: {ds.column_names}")
    label_names = label_vocabulary(ds[data.label_field]) if data.objective == "classify" else None
    tok = tokenizer or prepare_tokenizer(ds.select(range(min(len(ds), TOKENIZER_SAMPLE_DOCS)))["text"], data, run_dir)
    if data.objective == "mlm" and tok.mask_id < 0:
        raise ValueError("data.objective='mlm' needs a tokenizer with a mask token; this one has none")
    ids = special_ids(tok)
    mine = reading_shards(data.shards, batch_size, process_index, process_count)
    num_shards = len(mine) * process_count
    train, evals, entropy_docs = {}, {}, []
    for k in mine:
        part = ds.shard(num_shards, k, contiguous=True)
        encoded = tok.encode_batch(list(part["text"]))
        targets = tok.encode_batch(list(part[data.target_field])) if data.objective == "seq2seq" else None
        if data.objective == "classify":
            pairs = tok.encode_batch(list(part[data.text_pair_field])) if data.text_pair_field else None
            index = {name: i for i, name in enumerate(label_names)}
            labels = [index[str(x)] for x in part[data.label_field]]
        train_idx, eval_idx = split_documents(len(encoded), data.eval_fraction, seed + k)
        entropy_docs += [encoded[i] for i in train_idx]
        for idx, is_train, out in ((train_idx, True, train), (eval_idx, False, evals)):
            if data.objective == "classify":
                examples = [(encoded[i], None if pairs is None else pairs[i], labels[i]) for i in idx]
                size, make_batch = len(examples), lambda rows, rngs, ex=examples: objectives.classification(
                    [ex[i] for i in rows], seq_len, ids)
            elif targets is not None:
                size, make_batch = _seq2seq_pool([(encoded[i], targets[i]) for i in idx], seq_len, ids)
            else:
                size, make_batch = _pool(data, [encoded[i] for i in idx], seq_len, ids)
            out[k] = Loader(size, batch_size // num_shards, make_batch, seed=seed * 1000 + 2 * k + (not is_train),
                            shuffle=is_train)
    return Data(tok, ShardedLoader(train, num_shards), ShardedLoader(evals, num_shards), data.objective,
                sum(ld.num_examples for ld in train.values()), unigram_entropy(entropy_docs, tok.vocab_size),
                label_names)


def _extra_columns(data) -> list[tuple[str, str]]:
    """``(config key, column)`` of each column besides the text that ``data.objective`` reads (so must exist)."""
    if data.objective == "seq2seq":
        return [("target_field", data.target_field)]
    if data.objective == "classify":
        return [("label_field", data.label_field)] + ([("text_pair_field", data.text_pair_field)]
                                                       if data.text_pair_field else [])
    return []


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


def _pool(data, docs: list[list[int]], seq_len: int, ids) -> tuple[int, callable]:
    """(number of examples, make_batch) for the text objectives."""
    if data.objective in ("causal_lm", "prefix_lm"):
        rows, segs = pack_documents(docs, seq_len + 1, ids.eos)
        if data.objective == "causal_lm":
            return len(rows), lambda idx, rngs: objectives.causal_lm(rows[idx], segs[idx])
        return len(rows), lambda idx, rngs: objectives.prefix_lm(rows[idx], segs[idx], rngs, data.prefix_fraction)
    if data.objective == "mlm":
        step = seq_len - MLM_SPECIAL_TOKENS
        chunks = [d[i:i + step] for d in docs for i in range(0, len(d), step) if len(d[i:i + step]) >= MLM_MIN_CHUNK]
        return len(chunks), lambda idx, rngs: objectives.bert_mlm_nsp(chunks, idx, rngs, seq_len, ids,
                                                                        data.mlm_probability)
    rows, _ = pack_documents(docs, seq_len, ids.eos)
    return len(rows), lambda idx, rngs: objectives.span_corruption(rows[idx], rngs, ids, data.noise_density,
                                                                   data.mean_span_length)


def _seq2seq_pool(pairs, seq_len: int, ids) -> tuple[int, callable]:
    return len(pairs), lambda idx, rngs: objectives.seq2seq([pairs[i] for i in idx], seq_len, seq_len, ids)
