"""Joining the processes of a multi-process job: ``jax.distributed.initialize`` when a run spans processes
(training, the labeller)."""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger("florence_jax")

_initialized = False


def detected_cluster() -> str | None:
    """"slurm" or "tpu" where the job's processes can be found without settings, else None."""
    if os.environ.get("SLURM_NTASKS", "1") not in ("", "1") and "SLURM_PROCID" in os.environ:
        return "slurm"
    if os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CLOUD_TPU_TASK_ID") or os.environ.get(
        "MEGASCALE_COORDINATOR_ADDRESS"
    ):
        return "tpu"
    return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Join the job's processes: explicit coordinator settings, or auto-detection on Cloud TPU and SLURM.

    A single-process run (nothing set, nothing detected) does nothing. Returns whether the runtime is
    distributed.
    """
    global _initialized
    if _initialized:
        return True
    explicit = coordinator_address is not None or (num_processes or 1) > 1
    cluster = detected_cluster()
    if not explicit and cluster is None:
        return False
    if explicit:
        if coordinator_address is None or num_processes is None or process_id is None:
            raise ValueError("a multi-process run needs coordinator_address, num_processes and process_id "
                             "(or run on Cloud TPU / SLURM where they are detected)")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
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
