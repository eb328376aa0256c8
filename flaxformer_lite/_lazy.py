"""Lazy package attributes (PEP 562): a public name imports its module on first use, so importing a package, or a
JAX-free module inside it (the configs, the data pipeline), does not import JAX and Flax (about 1.3 s)."""
from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_attributes(package: str, names: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``(__getattr__, __dir__)`` of ``package``. ``names`` maps each lazy public name to the module
    that defines it, relative to ``package`` (``".attention"``); a name mapped to ``"." + name`` is that submodule."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(names[name], package)
        value = module if names[name] == f".{name}" else getattr(module, name)
        setattr(sys.modules[package], name, value)  # looked up once
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(names))

    return __getattr__, __dir__
