"""`HFTokenizer`: a Hugging Face model folder's own tokenizer (WordPiece for BERT, byte-level BPE for GPT-2) behind the
interface of our SentencePiece `Tokenizer`, so a checkpoint imported with ``interop.load_hf`` is fine-tuned on the
ids it was trained with. Needs ``transformers`` (it reads ``tokenizer.json`` / ``vocab.txt`` / ``vocab.json``).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

STORE_FORMAT = "flaxformer_lite.hf_tokenizer/1"  # the bytes a token store keeps for a Hugging Face tokenizer


class HFTokenizer:
    """``encode``/``encode_batch``/``decode`` and the named special ids of a Hugging Face tokenizer.

    Ids a tokenizer lacks fall back sensibly: GPT-2 has no pad/cls/sep, so its end-of-text id stands in for them.
    A missing mask token stays -1, and masked-LM training refuses such a tokenizer.
    """

    def __init__(self, tokenizer):
        self.hf = tokenizer
        def pick(*names, fallback=True):
            for name in names + (("eos", "sep") if fallback else ()):
                value = getattr(tokenizer, f"{name}_token_id", None)
                if value is not None:
                    return int(value)
            return -1  # none: objectives that need it refuse (see `require`)

        self.pad_id, self.unk_id = pick("pad"), pick("unk")
        self.bos_id, self.eos_id = pick("bos", "cls"), pick("eos", "sep")
        self.cls_id, self.sep_id = pick("cls", "bos"), pick("sep", "eos")
        self.mask_id = pick("mask", fallback=False)  # never a stand-in: masking with a real token would be wrong
        if min(self.pad_id, self.cls_id, self.sep_id) < 0:
            raise ValueError("this Hugging Face tokenizer has no end-of-text or separator token to stand in for "
                             "pad/cls/sep")
        self.sentinel_ids: list[int] = []

    @classmethod
    def from_folder(cls, path: str | Path) -> "HFTokenizer":
        """Load the tokenizer saved in a Hugging Face model folder; a one-line `ValueError` if the folder is missing,
        holds no usable tokenizer, or transformers is not installed."""
        if not Path(path).is_dir():  # else transformers takes the path for a Hub repository id
            raise ValueError(f"{path}: no such folder (a Hugging Face tokenizer is read from a model folder)")
        try:
            from transformers import AutoTokenizer
        except ImportError as err:
            raise ValueError(f"{path} holds a Hugging Face model; reading its tokenizer needs `pip install "
                             "transformers`") from err
        try:
            loaded = AutoTokenizer.from_pretrained(str(path))
        except Exception as err:  # transformers raises OSError, ValueError, TypeError... for missing/odd files
            reason = " ".join(f"{type(err).__name__}: {err}".split())  # transformers' messages span lines
            raise ValueError(f"{path}: no usable tokenizer files (tokenizer.json, vocab.txt or vocab.json + "
                             f"merges.txt): {reason}") from err
        return cls(loaded)

    @property
    def vocab_size(self) -> int:
        """Number of ids."""
        return len(self.hf)

    @property
    def proto(self) -> bytes:
        """What a token store keeps to encode with this tokenizer in its worker processes: the fast tokenizer's
        ``tokenizer.json``, the end id and the number of ids (JSON). `ValueError` for a tokenizer without the fast
        (Rust) backend."""
        backend = getattr(self.hf, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"{type(self.hf).__name__} has no fast (tokenizers) backend; a token store needs one "
                             "(save the model folder with its tokenizer.json)")
        return json.dumps({"format": STORE_FORMAT, "tokenizer": backend.to_str(), "eos_id": self.eos_id,
                           "vocab_size": self.vocab_size}, sort_keys=True).encode()

    @property
    def sha256(self) -> str:
        """The SHA-256 (hex) of `proto`: what token stores record."""
        return hashlib.sha256(self.proto).hexdigest()

    @property
    def special_ids(self) -> set[int]:
        """Ids that are not text."""
        return {int(i) for i in self.hf.all_special_ids} | {self.pad_id, self.cls_id, self.sep_id}

    def encode(self, text: str) -> list[int]:
        """Text -> ids (no special tokens added)."""
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Texts -> ids, in one call."""
        return self.hf(list(texts), add_special_tokens=False)["input_ids"] if texts else []

    def pieces(self, ids) -> list[str]:
        """The vocabulary piece of each id (for labelling pictures)."""
        return self.hf.convert_ids_to_tokens([int(i) for i in ids])

    def decode(self, ids) -> str:
        """Ids -> text, special tokens dropped."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)


class StoreEncoder:
    """A Hugging Face tokenizer rebuilt from `HFTokenizer.proto` with the `tokenizers` library alone (no
    transformers): what a token store's encoding workers use. ``encode_batch`` gives `HFTokenizer.encode_batch`'s
    ids (no special tokens added)."""

    def __init__(self, proto: bytes):
        from tokenizers import Tokenizer
        contents = json.loads(proto)
        self.tokenizer = Tokenizer.from_str(contents["tokenizer"])
        self.eos_id, self.vocab_size = int(contents["eos_id"]), int(contents["vocab_size"])

    @staticmethod
    def holds(proto: bytes) -> bool:
        """Whether ``proto`` is an `HFTokenizer.proto` (a SentencePiece model file is binary protobuf)."""
        return proto[:1] == b"{" and STORE_FORMAT.encode() in proto[:200]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Texts -> ids, in one call (the tokenizer's own threads)."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """`encode_batch` as int64 arrays ``[len_i]`` (what the token store encodes with)."""
        return [np.asarray(ids, np.int64) for ids in self.encode_batch(texts)]
