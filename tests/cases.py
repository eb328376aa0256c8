"""Mask cases shared by the kernel tests: each gives a Mask and the same mask built by tests/reference.py; and the
finite-difference check of gradients they share."""
from __future__ import annotations

import numpy as np

import jax.numpy as jnp
import reference
from flaxformer_lite.attention import Mask

B, L = 2, 37           # self-attention: odd length, not a multiple of any block size
LQ, LK = 13, 29        # cross-attention / decoding against a cache

_SEG = np.array([[0] * 10 + [1] * 20 + [2] * 7, [3] * 37])
_VALID = np.random.default_rng(7).random((B, L)) > 0.3

# name -> (lq, lk, Mask fields as NumPy); causal/prefix cases need lq == lk except the q_offset one.
MASK_CASES = {
    "none": (L, L, {}),
    "causal": (L, L, {"causal": True}),
    "prefix": (L, L, {"prefix_lengths": np.array([5, 0])}),
    "kv_lengths": (L, L, {"kv_lengths": np.array([7, 0])}),  # the second row sees no key at all
    "kv_valid": (L, L, {"kv_valid": _VALID}),
    "segments_causal": (L, L, {"causal": True, "q_segment_ids": _SEG, "kv_segment_ids": _SEG}),
    "segments": (L, L, {"q_segment_ids": _SEG, "kv_segment_ids": _SEG}),
    "prefix_padding": (L, L, {"prefix_lengths": np.array([5, 20]), "kv_lengths": np.array([30, 12])}),
    "causal_kv_valid": (L, L, {"causal": True, "kv_valid": _VALID}),
    "cross": (LQ, LK, {}),
    "cross_padding": (LQ, LK, {"kv_lengths": np.array([29, 3])}),
    "cross_causal_offset": (LQ, LK, {"causal": True, "q_offset": np.array([16, 10])}),
    # sliding windows (Mistral): each query sees itself and the window - 1 keys before it
    "window": (L, L, {"causal": True, "window": 6, "kv_lengths": np.array([37, 9])}),  # row 1: rows 14+ see nothing
    "window_segments": (L, L, {"causal": True, "window": 5, "q_segment_ids": _SEG, "kv_segment_ids": _SEG}),
    # decoding against a cache: in row 1 the queries from position 18 on see no key (the window has left the 12)
    "cross_window_offset": (LQ, LK, {"causal": True, "window": 7, "q_offset": np.array([16, 10]),
                                     "kv_lengths": np.array([29, 12])}),
}
WINDOW_CASES = {"window", "window_segments", "cross_window_offset"}
# linear attention decodes with linear_step() instead of q_offset, and refuses windows
LINEAR_UNSUPPORTED = {"cross_causal_offset"} | WINDOW_CASES


def build(name):
    """(lq, lk, Mask, dense reference mask [b, lq, lk])."""
    lq, lk, fields = MASK_CASES[name]
    mask = Mask(**{key: (jnp.asarray(val) if isinstance(val, np.ndarray) else val) for key, val in fields.items()})
    return lq, lk, mask, reference.dense_mask(B, lq, lk, **fields)


def qkv(lq, lk, heads=4, kv_heads=2, head_dim=16, value_dim=None, seed=0, dtype=np.float32):
    """Random q [b, lq, h, d], k [b, lk, n, d], v [b, lk, n, dv] as float64 NumPy and as JAX arrays of dtype."""
    rng = np.random.default_rng(seed)
    arrays = (rng.standard_normal((B, lq, heads, head_dim)), rng.standard_normal((B, lk, kv_heads, head_dim)),
              rng.standard_normal((B, lk, kv_heads, value_dim or head_dim)))
    return arrays, tuple(jnp.asarray(a, dtype) for a in arrays)


def tiny_config(model: str = "gpt", **overrides):
    """A CPU-sized ModelConfig (2 layers, 64 dims, vocab 97, no dropout) of the given kind, with overrides."""
    import dataclasses

    from flaxformer_lite.models import preset
    base = {"gpt": "gpt-tiny", "bert": "bert-tiny", "encoder_decoder": "transformer-tiny"}[model]
    fields = dict(num_layers=2, embed_dim=64, num_heads=4, mlp_dim=128, vocab_size=97, max_len=48,
                  dropout_rate=0.0, attention_dropout_rate=0.0, pad_id=0, bos_id=1, eos_id=2)
    fields.update(overrides)
    return dataclasses.replace(preset(base), **fields)


def check_grads_by_finite_differences(grads, arrays, loss, rng, tol=1e-4):
    """Each of ``grads`` (finite) along a random direction drawn from ``rng``, one array after another, equals the
    central difference of the float64 scalar ``loss(*arrays)`` along it (rtol = atol = ``tol``)."""
    for idx, (grad, array) in enumerate(zip(grads, arrays)):
        assert np.isfinite(grad).all()
        direction = rng.standard_normal(array.shape)

        def along(x):
            args = list(arrays)
            args[idx] = x
            return float(loss(*args))

        fd = reference.numerical_directional_grad(along, array, direction)
        np.testing.assert_allclose(float((np.asarray(grad, np.float64) * direction).sum()), fd, rtol=tol, atol=tol)


def lower_for_gpu(jitted, *args, **kwargs) -> str:
    """The StableHLO text of ``jitted(*args, **kwargs)`` traced and lowered for CUDA on this GPU-less host.

    Under an abstract H100: from jax 0.11, lowering a Pallas Triton kernel with no GPU device at hand raises "No
    supported GPU devices found"; tracing and lowering under an abstract mesh naming a GPU device works on every jax
    version."""
    import jax
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device)):
        return jitted.trace(*args, **kwargs).lower(lowering_platforms=("cuda",)).as_text()


def triton_launches(text: str) -> dict:
    """kernel name -> (grid x, num_warps) of each Triton call in StableHLO text from `lower_for_gpu`."""
    import re
    found = re.findall(r'grid_x = (\d+) : i32.*?name = "(\w+)".*?num_warps = (\d+) : i32', text)
    return {name: (int(grid), int(warps)) for grid, name, warps in found}
