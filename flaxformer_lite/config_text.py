"""Reading config text, plain Python (the ground floor): YAML without aliases (`read_yaml`), and dotted
``key.sub=value`` overrides (`parse_overrides`) whose values stay text (`Text`) until the field they set says how
to read them: a str field takes the text as typed, every other field its YAML reading. experiment.py builds and
checks the config tree from what these return.
"""
from __future__ import annotations

from typing import Any

import yaml

from .messages import short, short_repr


class Text(str):
    """An override's value as typed after ``=``. A field of type str takes the text itself (``train.run_dir=exp #3``
    stays ``exp #3``, ``data.path=2024`` a path); every other field takes its YAML reading (``train.steps=10``,
    ``optim.lr=3e-4``, ``null``, a ``{...}`` mapping)."""

    def parsed(self, key: str) -> Any:
        if not self.strip():
            return ""
        try:
            return read_yaml(str(self))
        except yaml.YAMLError as err:
            raise ValueError(f"override {key}={short(str(self))}: the value is not valid YAML ({err.problem}); "
                             f"quote it, e.g. {key}='\"...\"'") from None
        except ValueError as err:  # e.g. an integer of more than 4,300 digits
            raise ValueError(f"override {key}={short(str(self))}: the value cannot be read "
                             f"({str(err).split(';')[0]})") from None


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for part in parts[:-1]:
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            raise ValueError(f"override {key}: {part} is not a section")
    tree[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict:
    """``["train.steps=10", "model.attention=linear"]`` -> nested dict of `Text` values: read as YAML scalars,
    except by fields of type str, which take the text as typed."""
    tree: dict = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {short_repr(item)} must look like key.sub=value (see --help for the keys)")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), Text(raw))
    return tree


def merge(base: dict, extra: dict) -> dict:
    """``base`` with ``extra``'s keys set, nested mappings merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class NoAliasLoader(yaml.SafeLoader):
    """YAML's safe loader without aliases (``*name``): a config needs none, and a few hundred bytes of nested
    aliases expand to gigabytes (the "billion laughs")."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"found the alias *{event.anchor}, which configs do not "
                                                          "accept (write the value out)", event.start_mark)
        return super().compose_node(parent, index)


def read_yaml(text: str):
    """``yaml.safe_load`` without aliases (`NoAliasLoader`)."""
    return yaml.load(text, Loader=NoAliasLoader)  # noqa: S506  a SafeLoader subclass
