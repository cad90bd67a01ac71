"""The platform a program is traced for, which picks a few backend-specific formulations.

A few choices in the model, in generation and in input normalization depend on how a backend's compiler
treats a formulation (each is explained where it is made). Three are right for XLA:CPU only: the vision
blocks' stored residual stream (``davit._store_residuals``), beam queries against the cross-attention
keys one by one (``bart._beam_queries_one_by_one``) and beam search's row-by-row cache copies
(``generation._copy_slots_row_by_row``). One is right for TPUs only: uint8 pixels become the model's
input through a one-hot product rather than a gather (``processing.normalize_pixels``).

By default the platform is JAX's default backend, where the program will run. Compiling ahead of time
for another target from this machine (``scripts.aot_compile`` for a GPU config on simulated CPU devices,
or for a TPU topology) must trace the target's program instead, so its memory figures are the
target's: ``with compiling_for("tpu"): ...``. The platform is read while tracing, so the context must
enclose the trace (``lower``). JAX reuses a jitted function's trace for the same inputs whatever this
context says, so entering and leaving it clear JAX's caches: nothing traced for one platform is reused
for another, at the cost of tracing (and compiling) again afterwards.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax

PLATFORMS = ("cpu", "gpu", "tpu")
_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("florence_jax_platform", default=None)


def platform() -> str:
    """The platform being traced for: the innermost :func:`compiling_for`'s, else JAX's default backend."""
    return _PLATFORM.get() or jax.default_backend()


@contextlib.contextmanager
def compiling_for(name: str) -> Iterator[None]:
    """Trace for ``name`` (``cpu``, ``gpu`` or ``tpu``; ``cuda`` and ``rocm`` mean ``gpu``)."""
    name = {"cuda": "gpu", "rocm": "gpu"}.get(name, name)
    if name not in PLATFORMS:
        raise ValueError(f"unknown platform {name!r}: expected one of {', '.join(PLATFORMS)}")
    token = _PLATFORM.set(name)
    jax.clear_caches()
    try:
        yield
    finally:
        _PLATFORM.reset(token)
        jax.clear_caches()
