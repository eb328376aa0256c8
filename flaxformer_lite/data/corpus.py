"""Corpora through Hugging Face `datasets`: local text/JSONL/CSV/Parquet files or globs, a dataset saved with
``save_to_disk``, a Hub name ``owner/name`` (when online), or the built-in default corpus, which needs no download:
the docstrings of the installed Python standard library, extracted with `ast` (modules are never imported) and cached.
A source that cannot be used raises a one-line `ValueError` that names ``data.path`` and the fault (train.py prints it).
"""
from __future__ import annotations

import ast
import errno
import glob
import hashlib
import itertools
import json
import os
import re
import sys
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: `datasets` is optional for everything but reading a corpus
    import datasets

_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "ensurepip", "turtledemo",
              "__pycache__", "pydoc_data"}
_SUFFIX_FORMATS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv",
                   ".parquet": "parquet"}
_GLOB_CHARS = "*?["
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, as the Hub spells repository ids
_SNIFF_BYTES = 4096
_TAIL_BYTES = 1 << 20  # a JSON Lines row longer than this skips the cheap torn-last-line check
_SAMPLE_WHOLE = 1 << 20  # a file up to this size is hashed whole in its fingerprint; a bigger one by pieces:
_SAMPLE_PIECES, _SAMPLE_PIECE = 64, 4096  # this many evenly spaced pieces of this size, and the last piece


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
    """The reader for ``path``: ``fmt`` itself unless it is ``"auto"``, else told by the folder, the suffix, or the
    shape of the name. A missing path is a Hub name only if it reads ``owner/name``: a bare word is far more likely a
    mistyped file, and a pattern that matches nothing is never one."""
    if fmt != "auto":
        return fmt
    if Path(path).is_dir():
        markers = ("dataset_info.json", "state.json", "dataset_dict.json")
        if any((Path(path) / m).exists() for m in markers):
            return "saved"
        raise ValueError(f"data.path={path}: a folder but not a dataset saved with save_to_disk; "
                         "give a file or a glob such as 'folder/*.txt'")
    suffix = Path(path.replace("*", "x")).suffix.lower()
    if not Path(path).exists():
        if any(c in path for c in _GLOB_CHARS):
            if not glob.glob(path):
                raise ValueError(f"data.path={path}: no file matches this pattern")
        elif _HUB_NAME.fullmatch(path) and suffix not in _SUFFIX_FORMATS:
            return "hub"
        elif suffix not in _SUFFIX_FORMATS:
            raise ValueError(f"data.path={path}: no such file or directory (a Hub dataset name has the form "
                             "owner/name; set data.format=hub to ask the Hub anyway)")
    if suffix in _SUFFIX_FORMATS:
        return _SUFFIX_FORMATS[suffix]
    raise ValueError(f"data.path={path}: cannot tell the format from the name; set data.format to one of "
                     "text, json, csv, parquet, saved, hub")


TEXT_UNITS = ("paragraph", "document", "line")  # what one document of a plain-text file is (datasets' sample_by)


def source_fingerprint(path: str = "", fmt: str = "auto", text_field: str = "text",
                       text_unit: str = "paragraph") -> dict:
    """What identifies a corpus without reading it all: each file's absolute path, size, modification time and
    `content_sample` (the files of a glob or a saved folder; the built-in corpus's cache file), or a Hub name; and
    the text field. A token store records it, so a changed corpus is noticed (`same_source`). A matched file that
    cannot be read (a dangling or looping symbolic link, a folder) is a one-line `ValueError` naming it."""
    if not path:
        files = [str(stdlib_docstrings())]
    else:
        fmt = _format_of(path, fmt)
        if fmt == "hub":
            return {"hub": path, "text_field": text_field}
        if fmt == "saved":
            files = sorted(str(p) for p in Path(path).rglob("*") if p.is_file())
        else:
            files = sorted(glob.glob(path)) if not Path(path).exists() else [path]
    return {"files": [_file_entry(path, f) for f in files], "text_field": text_field, "text_unit": text_unit}


def _file_entry(path: str, file: str) -> list:
    """``[absolute path, size, mtime_ns, content sample]`` of one corpus file; `ValueError` if it cannot be read."""
    fault = _open_fault(file)
    if fault is None:
        try:
            st = os.stat(file)
            return [os.path.abspath(file), st.st_size, st.st_mtime_ns, content_sample(file, st.st_size)]
        except OSError as err:  # unreadable (permissions), or gone since
            fault = f"cannot be read ({err.strerror or err})"
    raise ValueError(f"data.path={_where(path, file)}: {fault}")


def _open_fault(file: str) -> str | None:
    """Why ``file`` cannot be read as a regular file (missing, a dangling or looping symbolic link, a folder), or
    None."""
    try:
        os.stat(file)
    except OSError as err:
        if not os.path.islink(file):
            return "no such file" if err.errno == errno.ENOENT else f"cannot be read ({err.strerror or err})"
        if err.errno == errno.ELOOP:
            return "a symbolic link that loops (it leads back to itself); remove it or fix its target"
        return f"a symbolic link to {os.readlink(file)!r}, which does not exist; remove it or fix its target"
    return None if os.path.isfile(file) else "not a regular file"


def content_sample(file: str, size: int) -> str:
    """The SHA-256 (hex) of ``file``'s bytes: all of them up to 1 MB, else 64 evenly spaced 4 KB pieces and the
    last 4 KB. A corpus edited with its size and modification time kept is noticed at every resume, and the cost
    stays at most about 260 KB read per file, whatever its size."""
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        if size <= _SAMPLE_WHOLE:
            digest.update(f.read())
        else:
            for start in [i * (size // _SAMPLE_PIECES) for i in range(_SAMPLE_PIECES)] + [size - _SAMPLE_PIECE]:
                f.seek(start)
                digest.update(f.read(_SAMPLE_PIECE))
    return digest.hexdigest()


def same_source(recorded: dict, now: dict) -> bool:
    """Whether a store's recorded corpus fingerprint is ``now``'s (`source_fingerprint`). A store written before
    fingerprints held a content sample records ``[path, size, mtime]`` per file: it matches when those agree."""
    files = recorded.get("files") if isinstance(recorded, dict) else None
    if isinstance(files, list) and files and all(isinstance(f, list) and len(f) == 3 for f in files):
        now = {**now, "files": [f[:3] for f in now.get("files", [])]}
    return recorded == now


def load_corpus(path: str = "", fmt: str = "auto", text_field: str = "text",
                text_unit: str = "paragraph") -> datasets.Dataset:
    """The corpus as a `datasets.Dataset` with a ``text`` column of strings (and any others the source has).

    ``path=""`` is the built-in corpus. Plain-text files become one row per ``text_unit``: ``"paragraph"``
    (blank-line separated), ``"document"`` (the whole file, one continuous stream) or ``"line"``. A source
    that cannot be read, or whose ``text_field`` is missing, not text, null in some rows or blank in all, raises a
    one-line `ValueError` naming ``data.path`` (and the file) and the fault."""
    import datasets  # noqa: PLC0415  (see the imports above)
    if not path:
        return datasets.load_dataset("json", data_files=str(stdlib_docstrings()), split="train")
    fmt = _format_of(path, fmt)
    if fmt == "saved":
        try:
            ds = datasets.load_from_disk(path)
        except Exception as err:  # datasets raises FileNotFoundError, ArrowInvalid, JSONDecodeError... for a bad folder
            raise ValueError(f"data.path={path}: not a readable save_to_disk folder ({_one_line(err)})") from err
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ValueError(f"data.path={path}: the saved DatasetDict has no 'train' split; splits: {list(ds)}")
            ds = ds["train"]
    elif fmt == "hub":
        try:
            ds = datasets.load_dataset(path, split="train")
        except Exception as err:  # offline, no such repo, no 'train' split, a loading script...: all the user's to fix
            raise ValueError(f"data.path={path}: no such file or directory, and not a loadable Hub dataset "
                             f"({_one_line(err)})") from err
    else:
        if text_unit not in TEXT_UNITS:
            raise ValueError(f"data.text_unit must be one of {TEXT_UNITS}, got {text_unit!r}")
        ds = _load_files(path, fmt, text_unit)
    if text_field not in ds.column_names:
        raise ValueError(f"data.text_field {text_field!r} is not a column of data.path={path}; "
                         f"columns: {ds.column_names}")
    _check_text(ds, path, text_field)
    if text_field != "text":
        if "text" in ds.column_names:
            ds = ds.remove_columns("text")
        ds = ds.rename_column(text_field, "text")
    return ds


def column(ds: datasets.Dataset, name: str, rows: list[int] | None = None) -> list:
    """Column ``name`` of ``ds`` (only ``rows``, when given) as a list, read as one batch: ``ds[name]`` is a lazy
    column in datasets 4 and later, and iterating it reads one row at a time (15x slower on 16,000 documents)."""
    return ds.select_columns([name])[slice(None) if rows is None else rows][name]


def _load_files(path: str, fmt: str, text_unit: str = "paragraph") -> datasets.Dataset:
    """Local files (a path or a glob) through ``datasets``; cheap checks first, a diagnosis if datasets fails."""
    pattern = not Path(path).exists() and any(c in path for c in _GLOB_CHARS)
    files = sorted(glob.glob(path)) if pattern else [path]
    if not files:
        raise ValueError(f"data.path={path}: no file matches this pattern")
    if fmt not in _READERS:
        raise ValueError(f"data.format must be one of auto, {', '.join(_READERS)}, saved, hub; got {fmt!r}")
    for file in files:
        fault = _file_fault(file, fmt)
        if fault:
            raise ValueError(f"data.path={_where(path, file)}: {fault}")
    kwargs = {"sample_by": text_unit} if fmt == "text" else {}
    import datasets  # noqa: PLC0415
    try:
        return datasets.load_dataset(fmt, data_files=files, split="train", **kwargs)
    except Exception as err:  # datasets wraps every reader's failure in its own errors; name the file and the fault
        for file in files:
            fault = _READERS[fmt](file)
            if fault:
                raise ValueError(f"data.path={_where(path, file)}: {fault}") from err
        raise ValueError(f"data.path={path}: datasets cannot read it as {fmt} ({_one_line(err)})") from err


def _where(path: str, file: str) -> str:
    """``path``, plus the matched file when ``path`` is a pattern."""
    return path if file == path else f"{path} (file {file})"


def _file_fault(file: str, fmt: str) -> str | None:
    """What is wrong with ``file`` that a glance at its size, first bytes and (JSON Lines) last line tells: all the
    common path pays. A torn last line, the usual fault of an interrupted write, is caught here."""
    fault = _open_fault(file)
    if fault:
        return fault
    if Path(file).stat().st_size == 0:
        return "the file is empty"
    with open(file, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    if fmt == "parquet":
        return None if head[:4] in (b"PAR1", b"PARE") else "not a Parquet file (it does not start with PAR1)"
    if b"\0" in head:
        return f"a binary file, not UTF-8 {fmt} (NUL bytes in its first {_SNIFF_BYTES} bytes)"
    if fmt == "json" and b"\n" in head and _is_json(head.split(b"\n", 1)[0]) and not _is_json(_last_line(file)):
        return _json_fault(file)  # JSON Lines (its first line is a whole value) whose last line is not
    return None


def _last_line(file: str) -> bytes:
    """The last non-blank line of ``file``, read from its end; ``b"0"`` (valid JSON) if longer than the window."""
    with open(file, "rb") as f:
        f.seek(0, os.SEEK_END)
        start = max(0, f.tell() - _TAIL_BYTES)
        f.seek(start)
        lines = f.read().rstrip().rsplit(b"\n", 1)
    return lines[-1] if len(lines) == 2 or start == 0 else b"0"


def _is_json(raw: bytes) -> bool:
    """Whether ``raw`` parses as one JSON value."""
    try:
        json.loads(raw)
        return True
    except ValueError:  # JSONDecodeError or UnicodeDecodeError
        return False


def _text_fault(file: str) -> str | None:
    """The first line of ``file`` that is not UTF-8, if any."""
    with open(file, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return (f"line {n} is not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}; "
                        "a binary file?)")
    return None


def _json_fault(file: str) -> str | None:
    """The first fault of a JSON Lines file (or of a whole-file JSON document that starts with ``[``), if any."""
    with open(file, "rb") as f:
        if f.read(_SNIFF_BYTES).lstrip().startswith(b"["):
            try:
                json.loads(Path(file).read_bytes())
                return None
            except ValueError as err:  # JSONDecodeError or UnicodeDecodeError
                return f"not valid JSON ({_one_line(err)})"
        f.seek(0)
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except UnicodeDecodeError:
                return _text_fault(file)
            except json.JSONDecodeError as err:
                torn = n > 1 and not any(rest.strip() for rest in f)  # rows, then half a row: a cut-off write
                return f"line {n} is not valid JSON " + ("(torn last line?)" if torn else
                                                         f"({err.msg} at column {err.colno})")
            if not isinstance(row, dict):
                return f"line {n} is a JSON {type(row).__name__}, not an object such as {{\"text\": ...}}"
    return None


def _csv_fault(file: str) -> str | None:
    """A line of ``file`` that is not UTF-8, or a header with no rows under it."""
    fault = _text_fault(file)
    if fault:
        return fault
    with open(file, "rb") as f:
        rows = sum(1 for _ in itertools.islice((raw for raw in f if raw.strip()), 2))
    return "no rows (a header line at most)" if rows < 2 else None


_READERS = {"text": _text_fault, "json": _json_fault, "csv": _csv_fault, "parquet": lambda file: None}


def _check_text(ds: datasets.Dataset, path: str, field: str) -> None:
    """Refuse a corpus whose ``field`` is not strings, is null (or missing) in some rows, or is blank in every row.
    Arrow does the scans: null counts are stored, and the blank check stops at the first chunk with text."""
    import datasets  # noqa: PLC0415
    import pyarrow.compute as pc  # noqa: PLC0415
    if len(ds) == 0:
        raise ValueError(f"data.path={path}: no rows")
    feature, column = ds.features[field], ds.data.column(field)
    if column.null_count:
        first = pc.index(pc.is_null(column), True).as_py()
        raise ValueError(f"data.path={path}: {column.null_count} of {len(ds)} rows have no text in field {field!r} "
                         f"(first: row {first + 1}); fill or drop them")
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise ValueError(f"data.path={path}: field {field!r} holds {feature}, not strings; set data.text_field to a "
                         f"text column; columns: {ds.column_names}")
    if not any(pc.any(pc.match_substring_regex(chunk, r"\S")).as_py() for chunk in column.chunks):
        raise ValueError(f"data.path={path}: no text (field {field!r} is blank in every row)")


def _one_line(err: BaseException) -> str:
    """The innermost cause of ``err`` as ``Type: message`` on one line, at most 300 characters."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= 300 else text[:297] + "..."
