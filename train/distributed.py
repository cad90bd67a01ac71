"""Multi-process start-up: ``jax.distributed.initialize`` when a run spans processes."""

from __future__ import annotations

import itertools
import logging
import os

import jax

from florence_jax import hardware
from train.config import DistributedConfig

log = logging.getLogger("train")

_initialized = False
_barrier_ids = itertools.count()


def _detected_cluster() -> str | None:
    if os.environ.get("SLURM_NTASKS", "1") not in ("", "1") and "SLURM_PROCID" in os.environ:
        return "slurm"
    if os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CLOUD_TPU_TASK_ID") or os.environ.get(
        "MEGASCALE_COORDINATOR_ADDRESS"
    ):
        return "tpu"
    return None


def maybe_initialize(cfg: DistributedConfig) -> bool:
    """Join the job's processes: explicit coordinator settings, or auto-detection on Cloud TPU and SLURM.

    A single-process run (nothing set, nothing detected) does nothing. Returns whether the runtime is
    distributed.
    """
    global _initialized
    if _initialized:
        return True
    explicit = cfg.coordinator_address is not None or (cfg.num_processes or 1) > 1
    cluster = _detected_cluster()
    if not explicit and cluster is None:
        return False
    if explicit:
        if cfg.coordinator_address is None or cfg.num_processes is None or cfg.process_id is None:
            raise ValueError("a multi-process run needs coordinator_address, num_processes and process_id "
                             "(or run on Cloud TPU / SLURM where they are detected)")
        jax.distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
    else:
        log.info("detected a %s cluster: initialising jax.distributed", cluster)
        jax.distributed.initialize()
    _initialized = True
    # The processes are in step now. Device barriers (sync_global_devices, also used by orbax) run a small
    # collective whose CPU (gloo) communicator is created on first use, and a process must join it within
    # 30 s; create it here, where none can be late (once created it waits as long as it takes).
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("florence_jax_start")
    return True


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
