"""Writing the files of a folder the library owns (a run folder) without following a symbolic link out of it: a
link planted at a file's name, or at its temporary name, is replaced or refused, never written through. Plain Python,
no JAX (the ground floor)."""
from __future__ import annotations

import os
from pathlib import Path

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def refuse_link(path: str | Path) -> None:
    """`ValueError` (one line, naming the file) if ``path`` is a symbolic link: reading or writing it would reach
    wherever it points."""
    if Path(path).is_symlink():
        raise ValueError(f"{path} is a symbolic link: the library reads and writes its files only as plain files in "
                         "its own folders, never through a link; remove the link")


def open_no_follow(path: str | Path, flags: int, mode: int = 0o644) -> int:
    """``os.open(path, flags | O_NOFOLLOW)``: a file descriptor, or `ValueError` (`refuse_link`) where ``path`` is a
    symbolic link."""
    try:
        return os.open(path, flags | _NOFOLLOW, mode)
    except OSError:
        refuse_link(path)
        raise


def append_text(path: str | Path, text: str) -> None:
    """Append ``text`` (UTF-8) to ``path``, created if absent; a symbolic link there is refused (`open_no_follow`)."""
    with os.fdopen(open_no_follow(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND), "a", encoding="utf-8") as f:
        f.write(text)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` aside, sync it, and rename it into place: a crash leaves the old file or the new,
    never half, and a symbolic link at ``path`` or at the temporary name is replaced, not followed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)  # a link planted at the temporary name goes (the link only, not what it names)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd = open_no_follow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
