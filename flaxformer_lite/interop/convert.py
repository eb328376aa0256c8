"""What every family's Hugging Face layout (gpt2.py, bert.py, llama.py) is written with: reading config.json fields
(refused by name, with the values we support), the converters between PyTorch's tensors and our kernels, and the
fields a layout accepts.

A parameter mapping is a list of ``(HF tensor name, our path, to_ours(hf array), to_hf(our array))``; hf.py applies
it in both directions, so load -> save -> load is exact.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping

from ..messages import short_repr
from ..models import ModelConfig


# -- config.json fields -----------------------------------------------------------------------------------------
def refuse(field: str, value, supported: str) -> None:
    """Raise the one-line `ValueError` for a config.json field we cannot honour."""
    raise ValueError(f"config.json field {field}={short_repr(value)} is not supported; supported: {supported}")


def require(hf: Mapping, expected: dict) -> None:
    """Refuse each key of ``expected`` that ``hf`` holds with another value."""
    for key, want in expected.items():
        if key in hf and hf[key] != want:
            raise ValueError(f"config.json field {key}={short_repr(hf[key])} is not supported (only {want!r})")


def choice(hf: Mapping, key: str, table: dict, default: str) -> str:
    """``table[hf[key]]`` (``default`` when absent); a value not in ``table`` is refused."""
    value = hf.get(key, default)
    if not isinstance(value, str) or value not in table:
        refuse(key, value, f"{sorted(table)}")
    return table[value]


def divides(hf: Mapping, part: tuple[str, int], whole: tuple[str, int]) -> None:
    """Raise `ValueError` unless config.json's ``part`` key (its default when absent) divides its ``whole`` key."""
    (part_key, p), (whole_key, w) = ((key, hf.get(key, default)) for key, default in (part, whole))
    if w % p:
        raise ValueError(f"config.json {part_key}={p} does not divide {whole_key}={w}; supported: a divisor of it")


def special_id(hf: Mapping, key: str, default: int | None, lists: bool = False) -> int | None:
    """A special token id from config.json, ``default`` when absent or null (None stays None). ``lists``: a list
    (instruct checkpoints list several end-of-turn ids) gives its first. transformers writes GPT-2's default 50256
    even for a smaller vocabulary (it only uses the ids to generate), so an id outside ``[0, vocab_size)`` becomes
    the last id, with a warning."""
    value = hf.get(key)
    if lists and isinstance(value, list):
        value = value[0] if value else None
    value = default if value is None else value
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        refuse(key, hf.get(key), "an int id, a list of them, or null" if lists else "an int id or null")
    vocab = hf["vocab_size"]
    if not 0 <= value < vocab:
        warnings.warn(f"config.json {key}={value} is outside the vocabulary ({vocab} ids); using {vocab - 1}",
                      stacklevel=4)
        value = vocab - 1
    return value


# -- what save_hf can express -------------------------------------------------------------------------------------
def accepted_fields(cfg: ModelConfig) -> dict:
    """``{ModelConfig field: its accepted values}`` that every Hugging Face layout we write shares: softmax
    attention, one set of parameters per layer, no scan, no conditioning or factorised tables, q/k/v biases as the
    other biases, no QK-norm. Each family updates it with its own."""
    return {"attention": ("softmax",), "talking_heads": (False,), "condition_dim": (0,), "share_layers": (False,),
            "table_dim": (None,), "scan_layers": (False,), "embed_scale": (False,), "qkv_bias": (None, cfg.use_bias),
            "qk_norm": (False,)}


def learned_fields(cfg: ModelConfig) -> dict:
    """The accepted fields GPT-2's and BERT's layouts share (learned positions, LayerNorm, biases, one head layout)
    beyond `accepted_fields`."""
    return {**accepted_fields(cfg), "position": ("learned",), "norm": ("layernorm",), "use_bias": (True,),
            "num_kv_heads": (None, cfg.num_heads), "head_dim": (None, cfg.embed_dim // cfg.num_heads),
            "sliding_window": (None,)}


def hf_names(table: dict) -> dict:
    """Our value -> the first Hugging Face name of it in ``table``."""
    return {v: k for k, v in reversed(list(table.items()))}


def check_accepted(cfg: ModelConfig, accepted: dict, layout: str) -> None:
    """Raise `ValueError` naming the first field of ``cfg`` whose value ``accepted`` does not list, with the values
    it does, in ``layout`` (a Hugging Face layout's name, for the message)."""
    for field, values in accepted.items():
        if getattr(cfg, field) not in values:
            raise ValueError(f"save_hf cannot express ModelConfig.{field}={getattr(cfg, field)!r} in Hugging Face's "
                             f"{layout} layout (accepted: {', '.join(map(repr, values))})")


# -- tensor converters: (to_ours, to_hf) pairs ----------------------------------------------------------------------
def linear(heads_out=None, heads_in=None, conv1d=False):
    """Converters for a projection stored as torch Linear (``[out, in]``) or GPT-2's Conv1D (``[in, out]``), to our
    ``[in, out]``, ``[in, heads_out, d]`` (query/key/value) or ``[heads_in, d, out]`` (the output projection)."""
    def to_ours(w):
        w = w if conv1d else w.T  # -> [in, out]
        if heads_out:
            return w.reshape(w.shape[0], heads_out, -1)
        if heads_in:
            return w.reshape(heads_in, -1, w.shape[1])
        return w

    def to_hf(w):
        w = w.reshape(w.shape[0], -1) if heads_out else w.reshape(-1, w.shape[-1]) if heads_in else w
        return w if conv1d else w.T
    return to_ours, to_hf


def bias(heads=None):
    """Converters for a bias, split per head (``[heads, d]``) when ``heads`` is given."""
    return ((lambda b: b.reshape(heads, -1)) if heads else (lambda b: b)), (lambda b: b.reshape(-1))


SAME = (lambda x: x, lambda x: x)


def norm(hf: str, ours: tuple, weight="weight", bias="bias") -> list:
    """The mapping entries of a LayerNorm's scale and bias."""
    return [(f"{hf}.{weight}", ours + ("scale",), *SAME), (f"{hf}.{bias}", ours + ("bias",), *SAME)]
