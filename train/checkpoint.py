"""One wrapper over orbax's CheckpointManager: train state + data iterator state + metadata, saved
together, asynchronously, keeping the last K checkpoints plus the best by validation score (ANLS by default).

orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save leaves no checkpoint that restore would pick up; ``latest_step`` only sees finished ones.
Restoring targets an abstract state carrying shardings, so every process reads its shards directly.
Each process saves its own data-iterator position (``data/process_I-of-N.json``): the processes read
different records and may have skipped different numbers of bad ones.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

log = logging.getLogger(__name__)


class ProcessJsonHandler(ocp.CheckpointHandler):
    """A JSON document per process, ``process_{index}-of-{count}.json``; each process restores its own."""

    def save(self, directory, args: ProcessJsonSave):
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (directory / name).write_text(json.dumps(args.item))

    def restore(self, directory, args: ProcessJsonRestore | None = None):
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        path = directory / name
        if not path.exists():
            found = sorted(p.name for p in directory.glob("process_*.json"))
            raise ValueError(f"{directory} has no {name} (it holds {found}): the data positions were saved by "
                             "another number of processes; resume with that many processes")
        return json.loads(path.read_text())

    def metadata(self, directory):
        return None

    def finalize(self, directory) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessJsonSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessJsonRestore(ocp.args.CheckpointArgs):
    pass


class _QuietMissingMetrics(logging.Filter):
    """orbax warns on every save without metrics once a best metric is tracked; between evaluations that is
    the normal case (only evaluated steps have a score), so the warning is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietMissingMetrics())


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int = 2, async_save: bool = True):
        self.directory = Path(directory).absolute()
        policy = pp.AnyPreservationPolicy([
            pp.LatestN(n=max(keep, 1)),
            pp.BestN(get_metric_fn=_selection_score, reverse=False, n=1, keep_checkpoints_without_metrics=False),
        ])
        # best_fn makes orbax write the metrics with each step (without it BestN and best_step() see none).
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save, preservation_policy=policy, create=True,
            cleanup_tmp_directories=True, best_fn=_selection_score, best_mode="max",
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
            data=ProcessJsonSave(data_state or {}),
            meta=ocp.args.JsonSave(meta),
        )
        return self.manager.save(step, args=args, metrics=metrics, force=force)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """Restore into ``abstract_state``'s structure, dtypes and shardings (ShapeDtypeStructs)."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ProcessJsonRestore(),
            meta=ocp.args.JsonRestore(),
        )
        out = self.manager.restore(step, args=args)
        return out["state"], dict(out["data"] or {}), dict(out["meta"] or {})

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict, dict] | None:
        """``(step, state, data_state, meta)`` of the newest checkpoint that restores; None without any.

        A checkpoint that fails to restore (a truncated array file, a missing metadata file, ...) is moved aside
        to ``<checkpoints>_unreadable/<step>`` (never deleted), with a one-line warning naming the problem, and
        the next newest is tried. When none restores, ``CheckpointRestoreError`` says what to do.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        failures = []
        for step in steps:
            try:
                return (step, *self.restore(step, abstract_state))
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is handled the same way
                reason = _one_line(e)
                if jax.process_count() > 1:
                    raise CheckpointRestoreError(
                        f"checkpoint {step} in {self.directory} does not restore ({reason}); with several processes "
                        f"it is not moved automatically: move {self.directory / str(step)} out of the way and rerun"
                    ) from e
                moved = self._move_aside(step)
                log.warning("checkpoint %d does not restore (%s); moved to %s, trying an older one", step, reason,
                            moved)
                print(f"warning: checkpoint {step} does not restore ({reason}); moved to {moved}", flush=True)
                failures.append(step)
        if failures:
            raise CheckpointRestoreError(
                f"no checkpoint in {self.directory} restores (steps {failures} were moved to "
                f"{self.directory}_unreadable): start again in a new --workdir, or delete {self.directory} to "
                "train from the start in this one")
        return None

    def _move_aside(self, step: int) -> Path:
        self.manager.wait_until_finished()
        target_root = self.directory.parent / f"{self.directory.name}_unreadable"
        target_root.mkdir(parents=True, exist_ok=True)
        target = target_root / str(step)
        n = 1
        while target.exists():
            target, n = target_root / f"{step}.{n}", n + 1
        (self.directory / str(step)).rename(target)
        self.manager.reload()
        return target

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class CheckpointRestoreError(RuntimeError):
    """No checkpoint of a run restores; the message says what to do."""


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    text = f"{type(e).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _selection_score(metrics: dict) -> float:
    """The evaluation score a checkpoint is kept for (``EvalResult.score``; -inf when it was not evaluated)."""
    return float(metrics.get("score", float("-inf")))


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with the shardings of ``tree``'s arrays: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
