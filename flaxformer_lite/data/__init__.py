"""Data: corpora (HF datasets), SentencePiece tokenizers, packing, objectives, and a deterministic loader.
Knows no model."""
from .corpus import load_corpus, stdlib_docstrings
from .loader import Loader
from .objectives import SpecialIds
from .packing import pack_documents, pad_rows
from .pipeline import Data, build_data, prepare_tokenizer, special_ids
from .registry import OBJECTIVES, Objective, Term, get_objective
from .tokenizer import Tokenizer, train_tokenizer

__all__ = ["load_corpus", "stdlib_docstrings", "Loader", "SpecialIds", "pack_documents", "pad_rows", "OBJECTIVES",
           "Objective", "Term", "get_objective", "Data", "build_data", "prepare_tokenizer", "special_ids", "Tokenizer",
           "train_tokenizer"]
