"""Multi-process start-up: ``jax.distributed.initialize`` when a run spans processes."""

from __future__ import annotations

import itertools

import jax

from florence_jax import distributed, hardware
from train.config import DistributedConfig

_barrier_ids = itertools.count()


def maybe_initialize(cfg: DistributedConfig) -> bool:
    """:func:`florence_jax.distributed.initialize` with the run's settings; returns whether the runtime is
    distributed."""
    return distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id)


def wait_for_all(name: str, timeout_s: int = 3600) -> None:
    """Block until every process gets here: a coordination-service barrier (no device collective), so a
    process may arrive long after the others (writing data, compiling). No-op in a single process."""
    if jax.process_count() == 1:
        return
    from orbax.checkpoint import multihost

    multihost.get_barrier_sync_fn()(key=f"florence_jax_{name}_{next(_barrier_ids)}", timeout_ms=timeout_s * 1000)


def compile_then_wait(jitted, name: str, *args):
    """Compile ``jitted`` for ``args`` (the call that follows reuses it), then wait for every process. Returns
    the compiled program when it compiled ahead (several processes, or the CPU, whose memory the caller
    checks), else None.

    The first run of a program creates the collective communicators it needs; on CPU (gloo) a process must
    join within 30 s of the first, while compile times can differ by minutes (one process hits the
    compilation cache, another compiles). Call before the first run of each large program.
    """
    compiled = jitted.lower(*args).compile() if jax.process_count() > 1 or hardware.backend() == "cpu" else None
    if jax.process_count() > 1:
        wait_for_all(f"compiled_{name}")
    return compiled
