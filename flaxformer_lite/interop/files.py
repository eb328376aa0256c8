"""Reading a Hugging Face model folder's files: config.json and the weights (model.safetensors, sharded safetensors
with an index, or a weights-only PyTorch pickle when torch is installed), every fault a one-line `ValueError` naming
the file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def read_json(path: Path):
    """The JSON value in ``path``; `ValueError` naming the file if it is not JSON text."""
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


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
        return {k: v.float().numpy() if v.dtype.is_floating_point else v.numpy() for k, v in state.items()}
    raise ValueError(f"{folder}: no model.safetensors (or pytorch_model.bin) found")


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


def write_tensors(folder: Path, tensors: dict[str, np.ndarray], max_shard_size: int | None = None) -> None:
    """``tensors`` as ``folder/model.safetensors``, or, when they exceed ``max_shard_size`` bytes, as
    ``model-00001-of-0000n.safetensors``... with Hugging Face's ``model.safetensors.index.json`` (a tensor larger
    than the limit gets a shard of its own)."""
    from safetensors.numpy import save_file
    if max_shard_size is not None and (isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int)
                                       or max_shard_size < 1):
        raise ValueError(f"max_shard_size must be a positive int (bytes) or None, got {max_shard_size!r}")
    _remove_weights(folder)  # a folder written before, in the other form, must not shadow what is written now
    total = sum(x.nbytes for x in tensors.values())
    if max_shard_size is None or total <= max_shard_size:
        save_file(tensors, str(folder / "model.safetensors"))
        return
    shards: list[dict] = [{}]
    for name, x in tensors.items():
        if shards[-1] and sum(v.nbytes for v in shards[-1].values()) + x.nbytes > max_shard_size:
            shards.append({})
        shards[-1][name] = x
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file))
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _remove_weights(folder: Path) -> None:
    """Delete the safetensors weights (single file, or index and its shards) a folder already holds."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (ValueError, AttributeError):
            shards = set()
        for shard in shards:
            if "/" not in shard:
                (folder / shard).unlink(missing_ok=True)
        index.unlink()
    (folder / "model.safetensors").unlink(missing_ok=True)
