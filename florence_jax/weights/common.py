"""What the native and the original-layout export share (kept apart so neither imports the other for it)."""

from __future__ import annotations

import numpy as np


def to_numpy(x) -> np.ndarray:
    """A host copy of an array, gathered from every process when it is sharded across them."""
    import jax
    from jax.experimental import multihost_utils

    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


class ExportError(ValueError):
    """A model that the requested layout cannot represent (the message says what to do instead)."""
