"""Count XLA compilations, to prove the train step compiles once (static shapes, no silent recompiles).

JAX reports every backend compilation as a ``/jax/core/compile/backend_compile_duration`` monitoring
event; one listener (registered on first use) counts them process-wide. ``CompileWatch`` attributes the
compilations that happen inside a call site: the first call of a jitted step compiles once, and any later
compilation there is a recompile (a shape, dtype or sharding that changed between steps).
"""

from __future__ import annotations

import logging
import threading

import jax

log = logging.getLogger("train")

_EVENT = "/jax/core/compile/backend_compile_duration"
_lock = threading.Lock()
_count = 0
_registered = False


def _listener(event: str, duration: float, **kwargs) -> None:
    global _count
    if event == _EVENT:
        with _lock:
            _count += 1


def compile_count() -> int:
    """XLA compilations in this process since the first call of this function."""
    global _registered
    with _lock:
        if not _registered:
            jax.monitoring.register_event_duration_secs_listener(_listener)
            _registered = True
        return _count


class CompileWatch:
    """``with watch: step(...)`` counts compilations inside the block; ``recompiles`` are those after the
    first call. A recompile is logged once as a warning, since each one stalls training for the length of
    a compile."""

    def __init__(self, name: str):
        self.name = name
        self.calls = 0
        self.compiles = 0
        self.recompiles = 0
        compile_count()

    def __enter__(self):
        self._before = compile_count()
        return self

    def __exit__(self, *exc):
        n = compile_count() - self._before
        self.compiles += n
        if self.calls > 0 and n:
            if self.recompiles == 0:
                log.warning("%s recompiled at call %d: an input shape, dtype or sharding changed between "
                            "calls (each recompile stalls training)", self.name, self.calls + 1)
            self.recompiles += n
        self.calls += 1
        return False
