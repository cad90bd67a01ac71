"""What a user sees and keeps: console summaries, metrics.jsonl, TensorBoard events, eval.jsonl, a plot.

Only process 0 writes; other processes get a writer whose methods do nothing.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import jax

log = logging.getLogger("train")


DATA_BOUND = 0.9  # a log window whose prefetch thread was busier than this waited for data


def data_busy(before: tuple[float, float], after: tuple[float, float]) -> float | None:
    """Fraction of a window the prefetch thread spent making batches (None before it made any), from two
    ``(busy_s, waiting_s)`` readings."""
    busy, waiting = after[0] - before[0], after[1] - before[1]
    return busy / (busy + waiting) if busy + waiting > 0 else None


class Reporter:
    def __init__(self, workdir: Path, enabled: bool | None = None):
        self.workdir = Path(workdir)
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = None
        self._progress = None
        self.last_train: dict[str, float] = {}  # the last logged training metrics
        if self.enabled:
            self.workdir.mkdir(parents=True, exist_ok=True)
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
            except ImportError:  # optional: metrics.jsonl has everything
                log.warning("tensorboardX not installed; TensorBoard events are not written")

    def print(self, msg: str = "") -> None:
        if self.enabled:
            print(msg, flush=True)

    def _append(self, name: str, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.workdir / name, "a") as f:
                f.write(strict_json(record) + "\n")

    def forget_after(self, step: int) -> None:
        """Drop metrics.jsonl and eval.jsonl records past ``step`` (a resumed run redoes those steps), so no step
        is recorded twice."""
        if not self.enabled:
            return
        for name in ("metrics.jsonl", "eval.jsonl"):
            path = self.workdir / name
            kept = [r for r in _read_jsonl(path) if r.get("step", 0) <= step]
            if path.exists():
                tmp = path.with_suffix(".jsonl.tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
                tmp.replace(path)

    def train_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._append("metrics.jsonl", {"step": step, "time": time.time(), **metrics})
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"train/{k}", v, step)

    def start_training(self, step: int, total_steps: int, *, batch_size: int, steps_per_epoch: int,
                       log_every_steps: int, num_workers: int, busy: tuple[float, float]) -> None:
        """Begin the training steps of this launch at ``step``: a progress bar, and the first window of the
        throughput and data-wait figures (``busy``: the prefetcher's reading now)."""
        self._batch_size, self._steps_per_epoch = batch_size, steps_per_epoch
        self._log_every, self._num_workers = log_every_steps, num_workers
        self._first_step = self._step_last = step
        self._t_last, self._busy_last = time.time(), busy
        self._warned_data_bound = False
        if self.enabled:
            from tqdm.auto import tqdm

            self._progress = tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True)

    def log_train_step(self, step: int, metrics: dict[str, Any], *, lr: float, busy: tuple[float, float]) -> None:
        """The step's metrics (device values) with the learning rate, examples/s, epoch and the fraction of the
        window the input pipeline was busy since the last log; written to metrics.jsonl and TensorBoard, shown
        on the progress bar, and the pipeline named once as the bottleneck when the step waited for it."""
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.time()
        m["lr"] = lr
        m["examples_per_s"] = (step - self._step_last) * self._batch_size / max(now - self._t_last, 1e-9)
        m["epoch"] = step / self._steps_per_epoch
        frac = data_busy(self._busy_last, busy)
        if frac is not None:
            m["data_busy"] = frac
            if frac > DATA_BOUND and not self._warned_data_bound and step - self._first_step > self._log_every:
                self._warned_data_bound = True
                self.print(f"The input pipeline is the bottleneck: it was busy {100 * frac:.0f}% of the last "
                           f"{step - self._step_last} steps, so the step waited for data. Raise "
                           f"data.num_workers (now {self._num_workers}) or prepare the dataset once "
                           "(python -m scripts.prepare_data; docs/scale-out.md).")
        self._t_last, self._step_last, self._busy_last = now, step, busy
        self.last_train = m
        self.train_metrics(step, m)
        if self._progress is not None:
            self._progress.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", ex_s=f"{m['examples_per_s']:.1f}")

    def step_done(self) -> None:
        if self._progress is not None:
            self._progress.update(1)

    def end_training(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None

    def eval_metrics(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._append("eval.jsonl", record)
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("step", "epoch", "seconds") and isinstance(v, int | float) and v is not None:
                    self._tb.add_scalar(f"eval/{k}", v, record["step"])

    def plot(self) -> Path | None:
        """training_curves.png: training loss and learning rate by step, validation loss and ANLS (or mAP)."""
        if not self.enabled:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        # null (a NaN written as strict JSON) plots as a gap
        train = [_nan_for_null(r) for r in _read_jsonl(self.workdir / "metrics.jsonl")]
        evals = [_nan_for_null(r) for r in _read_jsonl(self.workdir / "eval.jsonl")]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        if train:
            axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
            axes[0].set_xlabel("step")
            axes[0].set_title("training loss")
            axes[1].plot([r["step"] for r in train], [r.get("lr", 0) for r in train])
            axes[1].set_title("learning rate")
        if evals:
            steps = [r["step"] for r in evals]
            axes[0].plot(steps, [r["val_loss"] for r in evals], "o-", label="validation loss")
            axes[0].legend()
            keys = [k for k, v in evals[-1].items()
                    if k not in ("step", "epoch", "seconds", "val_loss", "num_examples", "score")
                    and not k.startswith(("val_loss/", "num_examples/", "ap/")) and isinstance(v, int | float)]
            for k in keys:
                axes[2].plot(steps, [r.get(k, float("nan")) for r in evals], "o-", label=k)
            if len(keys) > 1:
                axes[2].legend()
            if all(0 <= r.get(k, 0) <= 1 for r in evals for k in keys):
                axes[2].set_ylim(0, 1)
            axes[2].set_title("validation " + (keys[0] if len(keys) == 1 else "metrics"))
        for ax in axes:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = self.workdir / "training_curves.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def before_after(self, key: str, higher_is_better: bool = True) -> str | None:
        """One line comparing the validation ``key`` before training (step 0) with the last evaluation and the
        best one; None without both."""
        if not self.enabled:
            return None
        return before_after(_read_jsonl(self.workdir / "eval.jsonl"), key, higher_is_better)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _nan_for_null(record: dict[str, Any]) -> dict[str, Any]:
    return {k: float("nan") if v is None else v for k, v in record.items()}


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def strict_json(value: Any, **kwargs) -> str:
    """JSON that every parser reads: NaN and infinities (a diverged loss, an epoch that does not apply) become
    null instead of the bare ``NaN`` Python writes."""
    return json.dumps(_finite(value), allow_nan=False, **kwargs)


def print_quietly(text: str) -> None:
    """Print to stdout; a reader that went away (``| head``) ends the output silently instead of with a
    BrokenPipeError traceback."""
    import os
    import sys

    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null so that flush cannot fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def before_after(evals: list[dict[str, Any]], key: str, higher_is_better: bool = True) -> str | None:
    """``"validation anls: 0.041 before fine-tuning -> 0.912 after 375 steps (best 0.915 at step 250)"``
    from eval.jsonl records; None unless there is a step-0 record and a later one with ``key``."""
    scored = [r for r in evals if isinstance(r.get(key), int | float)]
    if len(scored) < 2 or scored[0]["step"] != 0:
        return None
    first, last = scored[0], scored[-1]
    best = max(scored[1:], key=lambda r: r[key] if higher_is_better else -r[key])
    line = (f"validation {key}: {first[key]:.3f} before fine-tuning -> {last[key]:.3f} after {last['step']} steps")
    if best[key] != last[key]:
        line += f" (best {best[key]:.3f} at step {best['step']})"
    return line


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
