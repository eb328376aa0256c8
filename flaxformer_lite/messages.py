"""How one-line errors show a user's values: cut (`short`, `short_repr`), so that a huge value (a megabyte string in
a YAML file, a 100,000-element list in a config.json) never becomes a huge error line."""
from __future__ import annotations


def short(text: str, limit: int = 80) -> str:
    """``text``, cut to ``limit`` characters (``...`` at the end when cut)."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def short_repr(value, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters."""
    return short(repr(value), limit)
