"""The one checker of a user value's range (the ground floor: NumPy, no JAX import): kernels, models and decoding
check lengths, decays, ids and positions with it. Values known on the host are checked; traced ones (inside a
caller's `jax.jit`) cannot be, and pass.
"""
from __future__ import annotations

import numpy as np


def check_range(name: str, x, ok, accepted: str) -> None:
    """Raise a one-line `ValueError` (``{name} must be {accepted}; got [...] among its values``, at most three shown)
    if a concrete ``x`` has an entry where ``ok`` (a function of float64 values -> bool array) is False."""
    try:
        values = np.asarray(x)
    except TypeError:  # a tracer (jax's TracerArrayConversionError and ConcretizationTypeError are TypeErrors)
        return
    bad = ~np.asarray(ok(values.astype(np.float64)))
    if bad.any():
        raise ValueError(f"{name} must be {accepted}; got {values[bad].ravel()[:3].tolist()} among its values")
