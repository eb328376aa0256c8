"""Reading a Hugging Face model folder's files: config.json and the weights (model.safetensors, sharded safetensors
with an index, or a weights-only PyTorch pickle when torch is installed), every fault a one-line `ValueError` naming
the file."""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..messages import short_repr


def read_json(path: Path):
    """The JSON value in ``path``; `ValueError` naming the file if it is not JSON text."""
    try:
        return json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an int of more than 4300 digits
        raise ValueError(f"{path}: not valid JSON ({str(e)[:120]})") from None


# The largest value accepted for each size field of config.json (GPT-2, BERT and Llama-family names): generous for
# published models (Llama 3.1 405B: 126 layers, 16384 wide; vocabularies up to 256k; contexts up to 10M), small
# enough that a typo or a hostile file sizes nothing before the weights are compared with it.
SIZE_LIMITS = {**dict.fromkeys(("n_layer", "num_hidden_layers", "n_head", "num_attention_heads",
                                "num_key_value_heads"), 2**12),
               **dict.fromkeys(("n_embd", "hidden_size", "head_dim", "n_inner", "intermediate_size"), 2**20),
               **dict.fromkeys(("vocab_size", "type_vocab_size"), 2**24),
               **dict.fromkeys(("n_positions", "max_position_embeddings"), 2**26)}
NULLABLE_SIZES = ("n_inner", "head_dim", "num_key_value_heads")  # null: derived from the others


def check_sizes(config: Mapping) -> None:
    """Raise a one-line `ValueError` naming config.json's key and value unless every size field of `SIZE_LIMITS`
    present in ``config`` is an int in ``[1, limit]`` (null only for `NULLABLE_SIZES`): a bool, float, string, list
    or null is refused before anything is sized by it."""
    for key, limit in SIZE_LIMITS.items():
        value = config.get(key, 1)
        if value is None and key in NULLABLE_SIZES:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            null = " or null" if key in NULLABLE_SIZES else ""
            raise ValueError(f"config.json {key}={short_repr(value)} is not supported; supported: an int in "
                             f"[1, {limit}]{null}")


def read_tensors(folder: Path) -> dict[str, np.ndarray]:
    """``{tensor name: array}`` of a model folder's weights, whichever of the supported files holds them."""
    from safetensors.numpy import load_file
    st = folder / "model.safetensors"
    if st.exists():
        return _load_safetensors(load_file, st)
    index = folder / "model.safetensors.index.json"
    if index.exists():  # large checkpoints are saved in shards
        contents = read_json(index)
        if not isinstance(contents, dict) or not isinstance(contents.get("weight_map"), dict):
            raise ValueError(f"{index}: no weight_map object")
        bad = next(((n, f) for n, f in contents["weight_map"].items() if not _plain_name(f)), None)
        if bad is not None:
            raise ValueError(f"{index}: weight_map names {repr(bad[1])[:80]} for {repr(bad[0])[:80]}, not a file "
                             f"name in {folder}; refused (an index names files beside it)")
        shards = sorted(set(contents["weight_map"].values()))
        return {k: v for shard in shards for k, v in _load_safetensors(load_file, folder / shard).items()}
    pt = folder / "pytorch_model.bin"
    if pt.exists():
        try:
            import torch
        except ImportError:
            raise ValueError(f"{pt} is a PyTorch pickle; install torch to read it, or convert it to "
                             "model.safetensors") from None
        try:
            state = torch.load(str(pt), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001  torch raises UnpicklingError, RuntimeError, EOFError, ...
            raise ValueError(f"{pt}: not loaded: it is not a plain PyTorch state dict of tensors, or it is damaged "
                             f"({type(err).__name__}); only weights-only pickles are read. Convert it to "
                             "model.safetensors") from None
        return _state_dict_arrays(pt, state)
    raise ValueError(f"{folder}: no model.safetensors (or pytorch_model.bin) found")


def _state_dict_arrays(path: Path, state) -> dict[str, np.ndarray]:
    """``{name: array}`` of what a PyTorch pickle held, which must be a state dict (tensor names -> tensors);
    anything else (a list, a number, a dict of strings, a training checkpoint nesting the state dict under a key)
    is a one-line `ValueError` naming the file and what it holds. Floating tensors come back as float32."""
    import torch
    if not isinstance(state, Mapping):
        held = _kind(state)
    else:
        bad = next(((k, v) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)),
                   None)
        held = None if bad is None else (f"a dict with the key {short_repr(bad[0], 60)}" if not isinstance(bad[0], str)
                                         else f"a dict whose entry {short_repr(bad[0], 60)} is {_kind(bad[1])}")
    if held is not None:
        raise ValueError(f"{path}: holds {held}, where a PyTorch state dict (tensor name -> tensor, as "
                         "torch.save(model.state_dict(), ...) writes) was expected")
    out = {}
    for name, tensor in state.items():
        try:
            out[name] = tensor.float().numpy() if tensor.dtype.is_floating_point else tensor.numpy()
        except Exception as err:  # noqa: BLE001  a sparse, quantized or meta tensor has no NumPy form
            raise ValueError(f"{path}: tensor {short_repr(name, 60)} ({tensor.dtype}, {tensor.layout}) has no NumPy "
                             f"form ({type(err).__name__}); convert it to model.safetensors") from None
    return out


def _kind(value) -> str:
    """``value``'s type for a message: "None", "an int", "a list"..."""
    if value is None:
        return "None"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiouAEIOU' else 'a'} {name}"


def _plain_name(name) -> bool:
    """A file name with no folder in it: a string, not ``.``/``..``, no path separator (so an index cannot name
    ``../../x`` or ``/etc/passwd``)."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def _load_safetensors(load_file, path: Path) -> dict[str, np.ndarray]:
    """`safetensors.numpy.load_file`, with a damaged or foreign file reported as a one-line `ValueError`.
    bfloat16 tensors (most Llama-family checkpoints), which NumPy cannot name, come back as float32 (exact)."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file (named by the safetensors index)")
    try:
        try:
            return load_file(str(path))
        except TypeError as err:
            if "bfloat16" not in str(err):
                raise
            return _load_bfloat16(path)
    except Exception as err:  # noqa: BLE001  SafetensorError and friends have no common public base
        raise ValueError(f"{path}: not a readable safetensors file ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:120] if str(err) else 'no detail'})") from None


def _load_bfloat16(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file holding bfloat16 tensors, read through JAX (ml_dtypes names the type), as float32."""
    from safetensors import safe_open
    out = {}
    with safe_open(str(path), framework="flax") as f:
        for name in f.keys():
            x = np.asarray(f.get_tensor(name))
            out[name] = x.astype(np.float32) if x.dtype.name == "bfloat16" else x
    return out


# The weight files an export of ours (or Hugging Face's save_pretrained) writes, and so the only ones it replaces or
# removes: never a file that an index merely names (a stale or hostile index may name tokenizer.json, README.md...).
_WEIGHT_FILES = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")


def write_export(folder: Path, tensors: dict[str, np.ndarray], config: dict, max_shard_size: int | None = None) -> None:
    """``config`` as ``folder/config.json`` and ``tensors`` as ``folder/model.safetensors``, or, when they exceed
    ``max_shard_size`` bytes, as ``model-00001-of-0000n.safetensors``... with Hugging Face's
    ``model.safetensors.index.json`` (a tensor larger than the limit gets a shard of its own).

    Every file is written under a temporary name and synced first; only then are they renamed into place and the
    weight files of an earlier export that the new one does not replace removed (`_WEIGHT_FILES` only: other files
    in the folder are the user's). A full disk or any other write failure is a one-line `ValueError`, with the
    temporary files removed and the folder as it was."""
    from safetensors.numpy import save_file
    if max_shard_size is not None and (isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int)
                                       or max_shard_size < 1):
        raise ValueError(f"max_shard_size must be a positive int (bytes) or None, got {max_shard_size!r}")
    files = _shards(tensors, max_shard_size)
    written: list[tuple[Path, str]] = []
    try:
        for name, content in files.items():
            tmp = folder / f".{name}.tmp-{os.getpid()}"
            written.append((tmp, name))
            if isinstance(content, dict):
                save_file(content, str(tmp))
            else:
                tmp.write_text(content)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        written.append((folder / f".config.json.tmp-{os.getpid()}", "config.json"))
        written[-1][0].write_text(json.dumps(config, indent=2))
    except Exception as err:  # noqa: BLE001  OSError, SafetensorError (no common base): a full disk, a read-only folder
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        raise ValueError(f"save_hf: could not write {folder} ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:160] if str(err) else 'no detail'}); nothing there was "
                         "changed") from None
    for tmp, name in written[:-1]:
        os.replace(tmp, folder / name)
    for stale in folder.iterdir():  # after the new weights are in place: a kill leaves a loadable folder
        if _WEIGHT_FILES.fullmatch(stale.name) and stale.name not in files:
            stale.unlink()
    os.replace(written[-1][0], folder / "config.json")


def _shards(tensors: dict[str, np.ndarray], max_shard_size: int | None) -> dict[str, dict | str]:
    """File name -> the tensors it holds (or, for the index, its JSON text) of an export."""
    total = sum(x.nbytes for x in tensors.values())
    if max_shard_size is None or total <= max_shard_size:
        return {"model.safetensors": tensors}
    shards: list[dict] = [{}]
    for name, x in tensors.items():
        if shards[-1] and sum(v.nbytes for v in shards[-1].values()) + x.nbytes > max_shard_size:
            shards.append({})
        shards[-1][name] = x
    files = {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": shard for i, shard in enumerate(shards)}
    weight_map = {name: file for file, shard in files.items() for name in shard}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    return {**files, "model.safetensors.index.json": json.dumps(index, indent=2)}
