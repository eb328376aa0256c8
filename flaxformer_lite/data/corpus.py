"""Corpora through Hugging Face `datasets`: local text/JSONL/CSV/Parquet files or globs, a dataset saved with
``save_to_disk``, a hub name (when online), or the built-in default corpus, which needs no download: the docstrings
of the installed Python standard library, extracted with `ast` (modules are never imported) and cached.
"""
from __future__ import annotations

import ast
import glob
import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path

import datasets

_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "ensurepip", "turtledemo",
              "__pycache__", "pydoc_data"}
_SUFFIX_FORMATS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv",
                   ".parquet": "parquet"}


def cache_dir() -> Path:
    """Where built corpora and other derived files are kept (``$FLAXFORMER_LITE_CACHE`` or ~/.cache/...)."""
    path = Path(os.environ.get("FLAXFORMER_LITE_CACHE", Path.home() / ".cache" / "flaxformer_lite"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def stdlib_docstrings(min_chars: int = 40) -> Path:
    """Build (once) and return a JSONL file of the standard library's docstrings, one ``{"text": ...}`` per line:
    about 1.5 MB of real English prose and code comments, deduplicated, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = cache_dir() / f"stdlib_docstrings-py{sys.version_info.major}{sys.version_info.minor}.jsonl"
    if out.exists():
        return out
    seen, lines = set(), []
    for path in sorted(root.rglob("*.py")):
        if _SKIP_DIRS & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars and doc not in seen:
                    seen.add(doc)
                    lines.append(json.dumps({"text": doc}))
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(out)  # atomic: a half-written corpus is never picked up
    return out


def _format_of(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if Path(path).is_dir():
        markers = ("dataset_info.json", "state.json", "dataset_dict.json")
        if any((Path(path) / m).exists() for m in markers):
            return "saved"
        raise ValueError(f"data.path {path!r} is a folder but not a dataset saved with save_to_disk; "
                         "give a file or a glob such as 'folder/*.txt'")
    suffix = Path(path.replace("*", "x")).suffix.lower()
    if suffix in _SUFFIX_FORMATS:
        return _SUFFIX_FORMATS[suffix]
    if glob.glob(path):
        raise ValueError(f"data.path {path!r}: cannot tell the format from the name; set data.format to one of "
                         "text, json, csv, parquet, saved")
    return "hub"


def load_corpus(path: str = "", fmt: str = "auto", text_field: str = "text") -> datasets.Dataset:
    """The corpus as a `datasets.Dataset` with a ``text`` column (and any others the source has).

    ``path=""`` is the built-in corpus. Text files become one row per paragraph (blank-line separated)."""
    if not path:
        return datasets.load_dataset("json", data_files=str(stdlib_docstrings()), split="train")
    fmt = _format_of(path, fmt)
    if fmt == "saved":
        ds = datasets.load_from_disk(path)
        ds = ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
    elif fmt == "hub":
        ds = datasets.load_dataset(path, split="train")
    else:
        files = sorted(glob.glob(path)) or [path]
        missing = [f for f in files if not Path(f).exists()]
        if missing:
            raise ValueError(f"data.path {path!r}: no such file")
        kwargs = {"sample_by": "paragraph"} if fmt == "text" else {}
        ds = datasets.load_dataset(fmt, data_files=files, split="train", **kwargs)
    if text_field not in ds.column_names:
        raise ValueError(f"data.text_field {text_field!r} is not a column of {path!r}; columns: {ds.column_names}")
    if text_field != "text":
        if "text" in ds.column_names:
            ds = ds.remove_columns("text")
        ds = ds.rename_column(text_field, "text")
    return ds


def fingerprint(texts: list[str]) -> str:
    """A short content hash, to name cached derived files."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:16]
