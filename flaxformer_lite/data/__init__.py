"""Data: corpora (HF datasets), SentencePiece tokenizers, packing, objectives, and a deterministic loader.
Knows no model.

Public names import their module on first use (`flaxformer_lite._lazy`), so ``python -m flaxformer_lite.run.prepare``
runs a module that importing the package has not already imported (runpy warned about that on every call)."""
from .._lazy import lazy_attributes

_NAMES = {
    "load_corpus": ".corpus", "stdlib_docstrings": ".corpus", "Loader": ".loader", "SpecialIds": ".objectives",
    "pack_documents": ".packing", "pad_rows": ".packing", "Data": ".pipeline", "build_data": ".pipeline",
    "prepare_tokenizer": ".pipeline", "special_ids": ".pipeline", "OBJECTIVES": ".registry", "Objective": ".registry",
    "Term": ".registry", "get_objective": ".registry", "Tokenizer": ".tokenizer", "train_tokenizer": ".tokenizer",
}
__getattr__, __dir__ = lazy_attributes(__name__, _NAMES)
__all__ = list(_NAMES)
