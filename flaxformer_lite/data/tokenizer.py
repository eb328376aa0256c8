"""SentencePiece tokenizers: train one from a corpus (unigram or BPE) with the special tokens every objective needs,
save it next to the run, and load it back.

Ids: pad 0, unk 1, bos 2, eos 3, then ``<mask>``, ``<cls>``, ``<sep>`` (BERT), sentinels ``<extra_id_0..31>``
(T5 span corruption) and a newline piece: a line break in the text is encoded as one piece whatever the
normalization (which would otherwise turn it into a space), so a model trained on a play or on code can write one.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import numbers
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import sentencepiece as spm

from ..safe_io import write_atomic

SPECIAL = {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
USER_SYMBOLS = ["<mask>", "<cls>", "<sep>"] + [f"<extra_id_{i}>" for i in range(32)]
NEWLINE = "\u240a"  # "␊": stands for "\n" inside the model (no normalization rewrites it)
NORMALIZATIONS = ("nmt_nfkc", "nfkc", "identity", "nmt_nfkc_cf", "nfkc_cf")
MAX_SENTENCE_BYTES = 4192  # SentencePiece's max_sentence_length: a longer line is skipped in training
_PIECE_CHARS = MAX_SENTENCE_BYTES // 4  # so many characters are at most MAX_SENTENCE_BYTES in UTF-8


class Tokenizer:
    """A trained SentencePiece model with named special ids. ``encode(str) -> list[int]``, ``decode(ids) -> str``."""

    def __init__(self, model_proto: bytes):
        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = (SPECIAL[k] for k in ("pad", "unk", "bos", "eos"))
        self.mask_id, self.cls_id, self.sep_id = (self.sp.piece_to_id(p) for p in USER_SYMBOLS[:3])
        self.sentinel_ids = [self.sp.piece_to_id(p) for p in USER_SYMBOLS[3:]]
        self.newline_id = self.sp.piece_to_id(NEWLINE)  # unk for tokenizers trained before the newline piece

    @property
    def vocab_size(self) -> int:
        """Number of ids."""
        return self.sp.get_piece_size()

    @property
    def sha256(self) -> str:
        """The SHA-256 of the model file's bytes (hex): what token stores record."""
        return hashlib.sha256(self.proto).hexdigest()

    @property
    def special_ids(self) -> set[int]:
        """Ids that are not text (never masked or corrupted)."""
        return {self.pad_id, self.unk_id, self.bos_id, self.eos_id, self.mask_id, self.cls_id, self.sep_id,
                *self.sentinel_ids}

    def encode(self, text: str) -> list[int]:
        """Text -> ids (no bos/eos added); line breaks become the newline piece."""
        return self.sp.encode(self._lines_in(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Texts -> ids, in one call (SentencePiece's threads on every core)."""
        return self.sp.encode([self._lines_in(t) for t in texts])

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """`encode_batch` as int32 arrays ``[len_i]``, which SentencePiece (0.2.1 and later) writes without making a
        Python int per id: what the token store encodes with."""
        lines = [self._lines_in(t) for t in texts]
        try:
            return self.sp.encode(lines, out_type="numpy")
        except (ValueError, TypeError):  # an older SentencePiece: ids as lists
            return [np.asarray(ids, np.int32) for ids in self.sp.encode(lines)]

    def _lines_in(self, text: str) -> str:
        if self.newline_id == self.unk_id:
            return text
        return text.replace("\r\n", "\n").replace("\n", NEWLINE)

    def decode(self, ids) -> str:
        """Ids (each in ``[0, vocab_size)``) -> text; special ids other than unk are dropped."""
        skip = self.special_ids - {self.unk_id}
        return self.sp.decode([i for i in self._checked_ids(ids) if i not in skip]).replace(NEWLINE, "\n")

    def pieces(self, ids) -> list[str]:
        """The vocabulary piece of each id (for labelling pictures)."""
        return [self.sp.id_to_piece(i) for i in self._checked_ids(ids)]

    def _checked_ids(self, ids) -> list[int]:
        """``ids`` as ints; `ValueError` for one outside the vocabulary (SentencePiece raises an IndexError)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"id {bad[0]} is outside the vocabulary [0, {self.vocab_size}) of this tokenizer")
        return ids

    def save(self, path: str | Path) -> Path:
        """Write the ``.model`` file (atomically: `safe_io.write_atomic`). A write that fails (a full disk) is a
        one-line `ValueError` naming the file, and a file already there is kept as it was."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, self.proto)
        except OSError as err:
            raise ValueError(f"could not write the tokenizer {path} ({err.strerror or err}); free some space or "
                             "choose another folder: a file already there is unchanged") from None
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Read a ``.model`` file written by `save` (or any SentencePiece model with the same special tokens)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"tokenizer {path}: no such file")
        try:
            tok = cls(path.read_bytes())
        except RuntimeError as err:  # SentencePiece's parse error
            raise ValueError(f"tokenizer {path} is not a SentencePiece model file ({str(err).strip()})") from None
        if tok.sp.id_to_piece(tok.eos_id) != "</s>" or tok.mask_id == tok.unk_id:
            raise ValueError(f"tokenizer {path} lacks this project's special tokens (pad/unk/bos/eos = 0/1/2/3 and "
                             f"{USER_SYMBOLS[:3]}); train one with flaxformer_lite.data.train_tokenizer")
        return tok


MODEL_TYPES = ("unigram", "bpe", "char")


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 4096, model_type: str = "unigram",
                    character_coverage: float = 0.9995, byte_fallback: bool = True,
                    normalization: str = "nmt_nfkc", max_sentences: int = 2_000_000) -> Tokenizer:
    """Train a SentencePiece model on ``texts`` (each split into lines).

    Args: vocab_size; model_type ``"unigram"``, ``"bpe"`` or ``"char"`` (one piece per character, as nanoGPT's
    character-level models; vocab_size is then an upper bound); character_coverage in ``[0.98, 1]`` (SentencePiece's
    range; 1.0 for scripts with many characters, e.g. Chinese); byte_fallback (unknown characters become bytes, so
    nothing is lost); normalization (``"identity"`` keeps text byte-exact). An empty corpus, a text that is not a
    str, or a vocab_size above what the text supports (SentencePiece would stop short of it) raises `ValueError`.
    """
    _check_settings(vocab_size, model_type, character_coverage, byte_fallback, normalization)
    faults: list[ValueError] = []
    sentences = _lines(texts, faults)
    first = next(sentences, None)  # SentencePiece fails on an empty corpus with an opaque RuntimeError
    if faults:
        raise faults[0]
    if first is None:
        raise ValueError("the tokenizer corpus is empty: texts hold no non-blank line")
    model = io.BytesIO()
    try:
        _train(model, itertools.chain([first], sentences), vocab_size, model_type, character_coverage, byte_fallback,
               normalization, max_sentences)
    except RuntimeError as err:
        if faults:
            raise faults[0] from None
        if "required_chars" in str(err) or "Vocabulary size" in str(err):
            held = " (byte_fallback's 256 byte pieces are part of it)" if byte_fallback else ""
            raise ValueError(f"vocab_size {vocab_size} is too small for character_coverage {character_coverage} on "
                             f"this corpus ({str(err).split('.')[-3].strip()}){held}; raise data.vocab_size or lower "
                             "data.character_coverage (byte_fallback keeps rare characters as bytes)") from None
        raise
    if faults:
        raise faults[0]
    tok = Tokenizer(model.getvalue())
    # the soft limit stops at what the text supports: say so instead of clamping (char: vocab_size is an upper bound)
    if tok.vocab_size < vocab_size and model_type != "char":
        raise ValueError(f"data.vocab_size={vocab_size} is more than this text supports: SentencePiece ({model_type}) "
                         f"finds at most {tok.vocab_size} pieces in it; set data.vocab_size <= {tok.vocab_size} or "
                         "train on more text")
    return tok


def _check_settings(vocab_size, model_type, character_coverage, byte_fallback, normalization) -> None:
    """`ValueError` naming the first setting SentencePiece cannot train with."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"tokenizer_type must be one of {MODEL_TYPES}, got {model_type!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    minimum = len(SPECIAL) + len(USER_SYMBOLS) + 2
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral) or vocab_size <= minimum:
        raise ValueError(f"vocab_size must exceed {minimum} (special tokens) as an int, got {vocab_size!r}")
    if byte_fallback and vocab_size <= minimum + 256:
        raise ValueError(f"vocab_size {vocab_size} is too small for byte_fallback: its 256 byte pieces and the "
                         f"{minimum} special ones leave no room for text; raise data.vocab_size above "
                         f"{minimum + 256} or set data.byte_fallback=false")
    if not isinstance(character_coverage, numbers.Real) or not 0.98 <= character_coverage <= 1.0:
        raise ValueError(f"character_coverage must be a number in [0.98, 1] (SentencePiece's range), "
                         f"got {character_coverage!r}")


def _lines(texts: Iterable[str], faults: list[ValueError]):
    """The non-blank lines of ``texts``. A text that is not a str (a row with a null text field) ends the stream and
    is noted in ``faults``: an exception raised inside SentencePiece's iterator would come back as a RuntimeError."""
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            hint = " (a row with no text?)" if text is None else ""
            faults.append(ValueError(f"tokenizer corpus: text {i} is {type(text).__name__}, not str{hint}"))
            return
        for line in text.splitlines():
            if line.strip():
                yield from _short(line)


def _short(line: str):
    """``line``, or when it is longer than SentencePiece trains on (which would skip it: a corpus of one long line,
    such as a text file without line breaks, would train on nothing), its pieces of at most `_PIECE_CHARS`
    characters, cut at a space where there is one (no piece spans a space, so none is lost)."""
    if len(line) <= _PIECE_CHARS or len(line.encode("utf-8")) <= MAX_SENTENCE_BYTES:
        yield line
        return
    start = 0
    while start < len(line):
        end = start + _PIECE_CHARS
        if end < len(line):
            space = line.rfind(" ", start + 1, end + 1)
            end = space if space > start else end
        if line[start:end].strip():
            yield line[start:end]
        start = end


def _train(model, sentences, vocab_size, model_type, character_coverage, byte_fallback, normalization, max_sentences):
    # hard_vocab_limit=False: one pass that stops at the most pieces the text supports (the number SentencePiece's
    # hard-limit error would quote); train_tokenizer refuses the shortfall rather than clamp data.vocab_size silently
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences, model_writer=model, vocab_size=vocab_size, model_type=model_type,
        character_coverage=character_coverage, byte_fallback=byte_fallback,
        normalization_rule_name=normalization, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        user_defined_symbols=USER_SYMBOLS + [NEWLINE], input_sentence_size=max_sentences, shuffle_input_sentence=True,
        hard_vocab_limit=False, minloglevel=2, num_threads=os.cpu_count() or 1,
        remove_extra_whitespaces=normalization != "identity", split_digits=True)



def tokenizer_from_proto(proto: bytes):
    """The encoder of a token store's tokenizer bytes: a SentencePiece `Tokenizer`, or for a Hugging Face tokenizer
    (`HFTokenizer.proto`) its `hf_tokenizer.StoreEncoder`. Both give ``encode_arrays``, ``eos_id`` and ``vocab_size``."""
    from .hf_tokenizer import StoreEncoder
    if StoreEncoder.holds(proto):
        return StoreEncoder(proto)
    return Tokenizer(proto)
