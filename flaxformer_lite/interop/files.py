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
    """`safetensors.numpy.load_file`, with a damaged or foreign file reported as a one-line `ValueError`."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file (named by the safetensors index)")
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001  SafetensorError and friends have no common public base
        raise ValueError(f"{path}: not a readable safetensors file ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:120] if str(err) else 'no detail'})") from None
