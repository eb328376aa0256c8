"""Pre-training objectives: each turns examples into a batch dict of NumPy arrays, deterministically from a
NumPy generator. Knows no model; training/tasks.py knows which model input each key feeds.

- causal LM: next-token targets within each packed document;
- prefix LM: as causal, with a random bidirectional prefix that carries no loss;
- BERT: masked LM (15% of text tokens: 80% [MASK], 10% random, 10% kept) + next-sentence prediction (50% the real
  next segment, 50% a random one);
- T5 span corruption: noise spans replaced by sentinels in the source, the target lists them;
- seq2seq: (source, target) pairs, e.g. from a JSONL file;
- classification (fine-tuning): a text or a text pair and its label.

Shape key: b batch, l length, s source length, t target length.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .packing import pad_rows


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """The token ids objectives need (from the tokenizer)."""

    pad: int
    bos: int
    eos: int
    mask: int = -1
    cls: int = -1
    sep: int = -1
    sentinels: tuple[int, ...] = ()
    vocab_size: int = 0
    special: frozenset = frozenset()


def causal_lm(rows: np.ndarray, segments: np.ndarray) -> dict:
    """Packed rows ``[b, l + 1]`` -> tokens/targets/segment_ids/loss_mask ``[b, l]``; the loss skips targets of
    another document."""
    return {"tokens": rows[:, :-1], "targets": rows[:, 1:], "segment_ids": segments[:, :-1],
            "loss_mask": (segments[:, 1:] == segments[:, :-1]).astype(np.float32)}


def prefix_lm(rows: np.ndarray, segments: np.ndarray, rngs: list[np.random.Generator], fraction: float) -> dict:
    """Causal LM batch plus ``prefix_lengths [b]`` drawn uniformly from ``[1, 2 * fraction * l]``; targets inside
    the prefix carry no loss (the prefix is context, seen bidirectionally)."""
    return with_prefix(causal_lm(rows, segments), rngs, fraction)


def with_prefix(batch: dict, rngs: list[np.random.Generator], fraction: float) -> dict:
    """A causal LM batch made prefix-LM: ``prefix_lengths [b]`` drawn uniformly from ``[1, 2 * fraction * l]``, and
    no loss on targets inside the prefix."""
    l = batch["tokens"].shape[1]
    hi = max(2, min(l, int(round(2 * fraction * l))))
    prefix = np.array([g.integers(1, hi) for g in rngs], np.int32)
    batch["prefix_lengths"] = prefix
    batch["loss_mask"] = batch["loss_mask"] * (np.arange(l)[None, :] >= prefix[:, None] - 1)
    return batch


def bert_mlm_nsp(chunks: list[list[int]], picks: np.ndarray, rngs: list[np.random.Generator], length: int,
                 ids: SpecialIds, mlm_probability: float = 0.15) -> dict:
    """Sentence pairs ``[CLS] A [SEP] B [SEP]`` from document chunks, masked for MLM.

    ``picks[i]`` is the chunk of example i; B is the chunk's second half (label 1) or, half of the time, the second
    half of a random other chunk (label 0). Returns tokens, token_type_ids, padding_mask, mlm_targets, mlm_mask
    ``[b, l]`` and nsp_labels ``[b]``.
    """
    seqs, types, labels = [], [], []
    budget = length - 3
    for idx, g in zip(picks, rngs):
        chunk = chunks[idx][:budget]
        cut = int(g.integers(1, max(2, len(chunk))))
        a, b = chunk[:cut], chunk[cut:]
        is_next = bool(g.random() < 0.5) or len(chunks) == 1
        if not is_next:
            other = chunks[int(g.integers(len(chunks)))]
            b = other[len(other) // 2:]
        b = b[:max(0, budget - len(a))]
        seqs.append([ids.cls, *a, ids.sep, *b, ids.sep])
        types.append([0] * (len(a) + 2) + [1] * (len(b) + 1))
        labels.append(int(is_next))
    tokens, valid = pad_rows(seqs, length, ids.pad)
    token_types, _ = pad_rows(types, length, 0)
    targets, mlm_mask = tokens.copy(), np.zeros_like(valid)
    for row, g in enumerate(rngs):
        candidates = np.flatnonzero(valid[row] & ~np.isin(tokens[row], list(ids.special)))
        chosen = candidates[g.random(len(candidates)) < mlm_probability]
        mlm_mask[row, chosen] = True
        action = g.random(len(chosen))
        tokens[row, chosen[action < 0.8]] = ids.mask
        rand = chosen[(action >= 0.8) & (action < 0.9)]
        tokens[row, rand] = g.integers(max(ids.special) + 1, ids.vocab_size, len(rand))  # a random text token
    return {"tokens": tokens, "token_type_ids": token_types, "padding_mask": valid, "mlm_targets": targets,
            "mlm_mask": mlm_mask.astype(np.float32), "nsp_labels": np.array(labels, np.int32)}


def span_lengths(length: int, density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, spans) for a row of ``length`` (T5's counts), both at least 1."""
    noise = min(max(1, int(round(length * density))), length - 1)
    return noise, max(1, min(noise, int(round(noise / mean_span))))


def span_corruption(rows: np.ndarray, rngs: list[np.random.Generator], ids: SpecialIds, density: float,
                    mean_span: float) -> dict:
    """T5 span corruption of rows ``[b, l]``: src keeps the text with each noise span replaced by one sentinel;
    the target is ``sentinel_0 span_0 sentinel_1 span_1 ... eos``. Returns src/src_padding_mask ``[b, l]`` and
    tgt_in/tgt/tgt_mask ``[b, t]`` (tgt_in starts with bos)."""
    l = rows.shape[1]
    noise, spans = span_lengths(l, density, mean_span)
    if spans > len(ids.sentinels):
        raise ValueError(f"span corruption needs {spans} sentinels per row, the tokenizer has {len(ids.sentinels)}; "
                         "lower data.noise_density or raise data.mean_span_length")
    srcs, tgts = [], []
    for row, g in zip(rows, rngs):
        noise_lens = _split(noise, spans, g)
        keep_lens = _split(l - noise, spans, g) if l - noise >= spans else np.ones(spans, int)
        src, tgt, pos = [], [], 0
        for k, (keep, drop) in enumerate(zip(keep_lens, noise_lens)):
            src += list(row[pos:pos + keep]) + [ids.sentinels[k]]
            tgt += [ids.sentinels[k]] + list(row[pos + keep:pos + keep + drop])
            pos += keep + drop
        srcs.append(src + list(row[pos:]))
        tgts.append(tgt + [ids.eos])
    src, src_valid = pad_rows(srcs, l, ids.pad)
    t = noise + spans + 1
    tgt, tgt_valid = pad_rows(tgts, t, ids.pad)
    tgt_in = np.concatenate([np.full((len(rows), 1), ids.bos, np.int32), tgt[:, :-1]], 1)
    return {"src": src, "src_padding_mask": src_valid, "tgt_in": tgt_in, "tgt": tgt,
            "tgt_mask": tgt_valid.astype(np.float32)}


def _split(total: int, parts: int, g: np.random.Generator) -> np.ndarray:
    """A random composition of ``total`` into ``parts`` positive integers."""
    cuts = np.sort(g.choice(np.arange(1, total), parts - 1, replace=False)) if parts > 1 else np.array([], int)
    return np.diff(np.concatenate([[0], cuts, [total]])).astype(int)


def seq2seq(pairs: list[tuple[list[int], list[int]]], src_len: int, tgt_len: int, ids: SpecialIds) -> dict:
    """(source, target) id pairs -> src/src_padding_mask ``[b, s]`` and tgt_in/tgt/tgt_mask ``[b, t]``
    (target = ids + eos, truncated; tgt_in = bos + target[:-1])."""
    src, src_valid = pad_rows([p[0] for p in pairs], src_len, ids.pad)
    tgt, tgt_valid = pad_rows([list(p[1])[:tgt_len - 1] + [ids.eos] for p in pairs], tgt_len, ids.pad)
    tgt_in = np.concatenate([np.full((len(pairs), 1), ids.bos, np.int32), tgt[:, :-1]], 1)
    return {"src": src, "src_padding_mask": src_valid, "tgt_in": tgt_in, "tgt": tgt,
            "tgt_mask": tgt_valid.astype(np.float32)}


def classification(examples: list[tuple[list[int], list[int] | None, int]], length: int, ids: SpecialIds) -> dict:
    """Sequence classification: ``(text ids, pair ids or None, label)`` -> ``[CLS] A [SEP] (B [SEP])`` rows ``[b, l]``
    with ``token_type_ids`` (0 for A, 1 for B), ``padding_mask`` (True for real tokens) and ``labels [b]``.

    Too-long inputs lose tokens from the end of the longer text first (BERT's longest-first truncation)."""
    if length < 4:
        raise ValueError(f"classification rows need seq_len >= 4 ([CLS] A [SEP] B [SEP]), got {length}")
    b = len(examples)
    tokens = np.full((b, length), ids.pad, np.int32)
    types = np.zeros((b, length), np.int32)
    lengths = np.zeros((b,), np.int32)
    for row, (a, pair, _) in enumerate(examples):
        budget = length - (3 if pair is not None else 2)
        a, pair = _truncate_longest_first(list(a), None if pair is None else list(pair), budget)
        seq = [ids.cls] + a + [ids.sep]
        if pair is not None:
            types[row, len(seq):len(seq) + len(pair) + 1] = 1
            seq += pair + [ids.sep]
        tokens[row, :len(seq)] = seq
        lengths[row] = len(seq)
    return {"tokens": tokens, "token_type_ids": types, "padding_mask": np.arange(length)[None] < lengths[:, None],
            "labels": np.array([label for _, _, label in examples], np.int32)}


def _truncate_longest_first(a: list[int], pair: list[int] | None, budget: int):
    """Trim the longer of ``a`` and ``pair`` (the pair on ties, as Hugging Face does) until both fit ``budget``."""
    if pair is None:
        return a[:budget], None
    excess = len(a) + len(pair) - budget
    if excess <= 0:
        return a, pair
    # each removal takes from the longer side: first even them out, then alternate (pair first on a tie)
    gap = min(excess, abs(len(a) - len(pair)))
    if len(a) > len(pair):
        a = a[:len(a) - gap]
    else:
        pair = pair[:len(pair) - gap]
    rest = excess - gap
    return a[:len(a) - rest // 2], pair[:len(pair) - (rest - rest // 2)]
