"""What the project reads back from devices: an array's values on the host, a compiled program's memory.

:func:`to_host` is the one way arrays come back to numpy: an array that spans other processes' devices
(a multi-host batch or an FSDP-sharded parameter) is gathered first, so every process sees all of it.
:func:`compiled_memory` reads XLA's ``memory_analysis()`` of a compiled program into one record, with
the two totals the callers need: what a call needs in all (``total``) and what it allocates beyond its
inputs (``beyond_inputs``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import numpy as np


def to_host(x: Any) -> np.ndarray:
    """``x`` as a numpy array on every process, gathered across processes when it is not fully addressable
    from this one."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


@dataclass(frozen=True)
class CompiledMemory:
    """Bytes of one device's buffers for one call of a compiled program, as XLA's memory analysis gives them."""

    argument: int
    output: int
    temp: int
    alias: int  # outputs that reuse a donated argument's buffer

    @property
    def total(self) -> int:
        """Arguments + outputs + temporaries, a donated buffer counted once."""
        return self.argument + self.output + self.temp - self.alias

    @property
    def beyond_inputs(self) -> int:
        """What a call allocates besides its arguments: temporaries, and outputs that do not reuse a donated
        argument."""
        return self.temp + max(self.output - self.alias, 0)


def compiled_memory(compiled: Any) -> CompiledMemory | None:
    """The memory analysis of a ``jax.stages.Compiled``; None where the backend gives none."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend (or runtime version) implements it
        return None
    if stats is None:
        return None

    def field(name: str) -> int:
        return int(getattr(stats, f"{name}_size_in_bytes", 0) or 0)

    return CompiledMemory(argument=field("argument"), output=field("output"), temp=field("temp"),
                          alias=field("alias"))
