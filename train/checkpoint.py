"""One wrapper over orbax's CheckpointManager: train state + data iterator state + metadata, saved
together, asynchronously, keeping the last K checkpoints plus the best by the validation metric (ANLS by
default, ``best_metric`` names another key of the metrics passed to ``save``, e.g. "map").

orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save leaves no checkpoint that restore would pick up; ``latest_step`` only sees finished ones.
Restoring targets an abstract state carrying shardings, so every process reads its shards directly.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

log = logging.getLogger(__name__)


class _QuietMissingMetrics(logging.Filter):
    """orbax warns on every save without metrics once a best metric is tracked; between evaluations that is
    the normal case (only evaluated steps have a score), so the warning is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietMissingMetrics())


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int = 2, async_save: bool = True, best_metric: str = "anls"):
        self.directory = Path(directory).absolute()
        self.best_metric = best_metric

        def metric(m: dict) -> float:  # checkpoints saved under another metric rank last
            return float(m.get(best_metric, float("-inf")))

        policy = pp.AnyPreservationPolicy([
            pp.LatestN(n=max(keep, 1)),
            pp.BestN(get_metric_fn=metric, reverse=False, n=1, keep_checkpoints_without_metrics=False),
        ])
        # best_fn makes orbax write the metrics with each step (without it BestN and best_step() see none).
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save, preservation_policy=policy, create=True,
            cleanup_tmp_directories=True, best_fn=metric, best_mode="max",
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def save(self, step: int, state: Any, data_state: dict | None, meta: dict, *, metrics: dict | None = None,
             force: bool = False) -> bool:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state or {}),
            meta=ocp.args.JsonSave(meta),
        )
        return self.manager.save(step, args=args, metrics=metrics, force=force)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """Restore into ``abstract_state``'s structure, dtypes and shardings (ShapeDtypeStructs)."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        )
        out = self.manager.restore(step, args=args)
        return out["state"], dict(out["data"] or {}), dict(out["meta"] or {})

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with the shardings of ``tree``'s arrays: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
