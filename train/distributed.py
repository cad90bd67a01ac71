"""Multi-process start-up: ``jax.distributed.initialize`` when a run spans processes."""

from __future__ import annotations

import logging
import os

import jax

from train.config import DistributedConfig

log = logging.getLogger("train")

_initialized = False


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
    return True
