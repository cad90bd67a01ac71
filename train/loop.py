"""The training run: sharded state from the setup (``train.setup``), the step loop, and when it logs (the
``Reporter``), evaluates (``train.evaluate``) and saves (``train.checkpoint``): ``itstime``, ``eval_now``,
``checkpoint_now``.

Running the same command again resumes from the workdir's latest complete checkpoint: parameters,
optimizer state, step and the data iterator's position are restored together, so the resumed run sees
the same batches in the same order as an uninterrupted one. SIGTERM (preemption) saves at the next step
boundary and exits cleanly.
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import threading
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from florence_jax import hardware
from florence_jax.sharding import batch_sharding, make_mesh
from train.checkpoint import Checkpointer, abstract_like
from train.compiles import CompileWatch
from train.config import ConfigError, TrainConfig
from train.distributed import compile_then_wait
from train.evaluate import Evaluator, evaluator_for, format_samples
from train.optim import count_params
from train.reporting import Reporter, data_busy, strict_json
from train.setup import (
    build_pipelines,
    check_batch_sizes,
    check_export,
    check_lengths,
    check_training_records,
    export_model,
    get_datasets,
    get_processor,
    setup_runtime,
    structured_output_warnings,
    use_feature_cache,
)
from train.state import create_model, init_train_state
from train.step import jit_eval_step, jit_train_step

log = logging.getLogger("train")


class Prefetcher:
    """Reads host batches and puts them on devices in a background thread, two steps ahead.

    Each batch travels with the iterator state captured right after it was read, so a checkpoint saved
    after consuming batch k resumes at batch k + 1 whatever the prefetch depth.
    """

    def __init__(self, iterator, to_global, depth: int = 2):
        self.iterator, self.to_global = iterator, to_global
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        # Seconds the thread spent making batches (reading them and putting them on devices) and waiting
        # for the loop to take one. Mostly busy means the loop waits for data: the input pipeline is the
        # bottleneck. Mostly waiting means the data keeps ahead of the step.
        self.busy_s = 0.0
        self.waiting_s = 0.0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            while True:
                t0 = time.perf_counter()
                batch = next(self.iterator)
                item = (self.to_global(batch), self.iterator.get_state(), None)
                t1 = time.perf_counter()
                self.queue.put(item)
                self.busy_s += t1 - t0
                self.waiting_s += time.perf_counter() - t1
        except StopIteration:
            self.queue.put((None, None, StopIteration()))
        except Exception as e:  # surfaced in the main thread
            self.queue.put((None, None, e))

    def __next__(self):
        batch, state, err = self.queue.get()
        if err is not None:
            raise err
        return batch, state

    def busy(self) -> tuple[float, float]:
        """``(busy_s, waiting_s)`` so far; differences of two readings give a window's data_busy fraction."""
        return self.busy_s, self.waiting_s


class _Preemption:
    """SIGTERM sets a flag the loop checks at step boundaries (all processes agree before acting)."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def should_stop(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray([self.requested]))
        return bool(np.any(flags))

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


# Config fields that do not change what a run computes: a resumed run may change them freely.
UNTRACKED_FIELDS = ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "export_at_end", "export_layout",
                    "export_code_repo", "push_to_hub", "compilation_cache_dir", "eval.", "distributed.",
                    "data.num_workers", "data.max_eval_examples", "mesh.")


def config_changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """``["optim.learning_rate: 1e-06 -> 1e-05", ...]``: the fields that differ and change the run's trajectory.
    Both are compared as saved (JSON: tuples as lists); a dataset's fields are ``data.mixture.<i>.<field>``."""
    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                v = {str(i): x for i, x in enumerate(v)}
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(json.loads(json.dumps(before))), flat(json.loads(json.dumps(after)))
    changed = []
    for key in sorted(set(a) | set(b)):
        untracked = key.startswith(UNTRACKED_FIELDS) or (key.startswith("data.mixture.")
                                                         and key.endswith(".max_eval_examples"))
        if untracked or a.get(key) == b.get(key):
            continue
        old, new = a.get(key), b.get(key)
        changed.append(f"{key}: {_show(old)} -> {_show(new)}")
    return changed


def _show(value: Any) -> str:
    return repr(tuple(value)) if isinstance(value, list) else repr(value)


def _has_checkpoint(workdir: Path) -> bool:
    directory = workdir / "checkpoints"
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


# ------------------------------------------------------------------------------------------ when
def itstime(step: int, every_n_steps: int, total_steps: int) -> bool:
    """Whether a periodic action is due after ``step`` steps: at each multiple of ``every_n_steps`` (0: never)
    and at the last step."""
    return step == total_steps or bool(every_n_steps and step % every_n_steps == 0)


def eval_now(step: int, cfg: TrainConfig, steps_per_epoch: int, total_steps: int) -> bool:
    """Evaluate after ``step``: every ``eval_every_steps`` steps, or (0) at each epoch's end; always after the
    last step; never with ``eval.enabled`` false."""
    if not cfg.eval.enabled:
        return False
    return itstime(step, cfg.eval_every_steps or steps_per_epoch, total_steps)


def checkpoint_now(step: int, cfg: TrainConfig, steps_per_epoch: int, total_steps: int, *, evaluated: bool,
                   preempted: bool) -> bool:
    """Save after ``step``: every ``checkpoint_every_steps`` steps (0: never by count), at each epoch's end, after
    the last step, after an evaluation (so its score can pick the best checkpoint) and when preempted."""
    return (evaluated or preempted or step % steps_per_epoch == 0
            or itstime(step, cfg.checkpoint_every_steps, total_steps))


# ------------------------------------------------------------------------------------------ run
def run(cfg: TrainConfig, workdir: str | Path, *, allow_config_change: bool = False) -> dict[str, Any]:
    """Train (or resume) in ``workdir``; returns the final summary (also in ``workdir/summary.json``).

    Resuming with a config that changes the run's trajectory (batch, learning rate, schedule, data, model, seed,
    ...) is refused with the list of changes, unless ``allow_config_change``; then the previous config is kept
    next to the new one (``config.previous-<time>.json``)."""
    workdir = Path(workdir).absolute()
    setup_runtime(cfg)
    rep = _open_workdir(cfg, workdir, allow_config_change)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    check_batch_sizes(cfg, mesh)
    processor = get_processor(cfg, workdir)
    pipes = build_pipelines(cfg, processor, get_datasets(cfg, workdir))
    check_training_records(pipes)
    # A mixture's "epoch" is as many examples as all its datasets hold together (not each seen once).
    per_process_records = pipes.num_train // jax.process_count()
    steps_per_epoch = per_process_records // (cfg.batch_size // jax.process_count())
    if steps_per_epoch == 0:
        raise ConfigError(f"{pipes.num_train} training records give no full batch of {cfg.batch_size} (per process: "
                          f"{per_process_records} records, batches of {cfg.batch_size // jax.process_count()}): lower "
                          "config.batch_size or give more training data")
    total_steps = cfg.max_steps or cfg.num_epochs * steps_per_epoch

    model = create_model(cfg.model, mesh, tokenizer=processor.tokenizer, seed=cfg.seed,
                         min_shard_size=cfg.mesh.fsdp_min_size, lora=cfg.lora)
    check_lengths(cfg, model, pipes)
    check_export(cfg, model)
    fns, state, schedule = init_train_state(model, cfg.optim, total_steps, mesh,
                                            grad_accum_steps=cfg.grad_accum_steps,
                                            min_shard_size=cfg.mesh.fsdp_min_size, pixel_table=pipes.pixel_table,
                                            shard_optimizer=cfg.mesh.shard_optimizer)
    bsh = batch_sharding(mesh)
    if cfg.data.cache_vision_features:
        use_feature_cache(cfg, fns, pipes, model, workdir)

    def to_global(host_batch):
        if jax.process_count() == 1:
            return jax.device_put(host_batch, bsh)
        return {k: jax.make_array_from_process_local_data(bsh, v) for k, v in host_batch.items()}

    train_step = jit_train_step(fns, state, bsh)
    eval_step = jit_eval_step(fns, state, bsh)
    evaluator = evaluator_for(pipes, lambda pipe, metric: Evaluator(
        pipe, model, processor.tokenizer, batch_sharding=bsh, eval_step=eval_step, num_beams=cfg.eval.num_beams,
        max_new_tokens=cfg.eval.max_new_tokens, threshold=cfg.eval.anls_threshold,
        num_samples=cfg.eval.num_print, to_global=to_global, metric=metric,
        no_repeat_ngram_size=cfg.eval.no_repeat_ngram_size))

    ckpt = Checkpointer(workdir / "checkpoints", keep=cfg.keep_checkpoints)
    iterator = iter(pipes.train())
    restored = ckpt.restore_latest(abstract_like(state))
    start = None if restored is None else restored[0]
    best: dict[str, Any] = {"score": None, "step": None}  # score: EvalResult.score, higher is better
    train_records = [len(d.train) for d in pipes.datasets]
    if restored is not None:
        start, state, data_state, meta = restored
        change = data_change(meta.get("train_records"), train_records, [d.name for d in pipes.datasets])
        if change and not allow_config_change:
            raise ConfigError(f"the training data changed since the checkpoint of step {start} ({change}): the "
                              "data order and the saved position are the old records'. Restore the data, pass "
                              "--allow_config_change to go on from the saved position in the new records, or use "
                              "a new --workdir")
        if change:
            rep.print(f"Resuming on changed training data (--allow_config_change): {change}")
        iterator.set_state(data_state)
        best = meta.get("best", best)
        rep.print(f"Resuming from step {start} ({workdir / 'checkpoints'})")
        rep.forget_after(start)  # what the interrupted launch logged past the checkpoint is redone now
    step = int(state.step)
    data_state = iterator.get_state()  # as of the last batch a step took (the prefetcher reads ahead of it)

    def consumed_counters() -> dict[str, int]:
        """The data counters as of the last batch a step took: the iterator's own run ahead by the batches the
        prefetcher holds."""
        counters = data_state.get("counters") if isinstance(data_state, dict) else None
        return dict(getattr(iterator, "counters", {}) if counters is None else counters)

    _print_start(rep, cfg, mesh, model, count_params(state.params, fns.labels), steps_per_epoch, total_steps, pipes)

    def do_eval(tag: str):
        t0 = time.time()
        res = evaluator(state.params, state.rest, progress=True)
        epoch = step / steps_per_epoch
        rec = res.record(step, round(epoch, 3))
        rec["seconds"] = round(time.time() - t0, 1)
        rep.eval_metrics(rec)
        rep.print(f"[{tag}] step {step} epoch {epoch:.2f}: val_loss {res.val_loss:.4f}  {res.summary()} "
                  f"({rec['seconds']}s)")
        for line in data_notes(consumed_counters(), res.num_examples, pipes.num_val):
            rep.print(f"  {line}")
        if res.samples:
            rep.print(format_samples(res.samples))
        return res

    if start is None and cfg.eval_at_start and cfg.eval.enabled:
        do_eval("before training")  # no checkpoint holds step 0, so it is never the best one

    prefetch = Prefetcher(iterator, to_global)
    rng = jax.random.key(cfg.seed)
    busy_start = prefetch.busy()
    rep.start_training(step, total_steps, batch_size=cfg.batch_size, steps_per_epoch=steps_per_epoch,
                       log_every_steps=cfg.log_every_steps, num_workers=cfg.data.num_workers, busy=busy_start)
    first_step = step  # of this launch
    preempted = False
    step_compiles = CompileWatch("train step")
    with _Preemption() as preemption:
        while step < total_steps:
            batch, data_state = next(prefetch)
            if step == first_step:
                compiled = compile_then_wait(train_step, "train_step", state, batch, rng)
                if compiled is not None and hardware.backend() == "cpu":
                    check_host_memory(compiled, len(mesh.local_devices))
            with step_compiles:
                state, metrics = train_step(state, batch, rng)
            step += 1
            if itstime(step, cfg.log_every_steps, total_steps):
                rep.log_train_step(step, metrics, lr=float(schedule(step - 1)), busy=prefetch.busy())
            rep.step_done()
            evaluated = eval_now(step, cfg, steps_per_epoch, total_steps)
            ckpt_metrics = None
            if evaluated:
                res = do_eval(f"epoch {step / steps_per_epoch:.2f}")
                ckpt_metrics = {"score": res.score, "val_loss": res.val_loss}
                if best["score"] is None or res.score > best["score"]:
                    best = {"score": res.score, "step": step}
            preempted = preemption.should_stop(step)
            if checkpoint_now(step, cfg, steps_per_epoch, total_steps, evaluated=evaluated, preempted=preempted):
                ckpt.save(step, state, data_state, _meta(cfg, step, steps_per_epoch, best, train_records),
                          metrics=ckpt_metrics, force=True)
            if preempted:
                rep.print(f"SIGTERM received: checkpoint saved at step {step}; rerun the same command to resume")
                break
    rep.end_training()
    ckpt.wait()
    summary = {"step": step, "total_steps": total_steps, "best": best, "last_train": rep.last_train,
               "preempted": preempted, "data_counters": consumed_counters(),
               "train_step_compiles": step_compiles.compiles, "train_step_recompiles": step_compiles.recompiles,
               "data_busy": data_busy(busy_start, prefetch.busy())}
    if not preempted and step >= total_steps:
        _finish(cfg, rep, model, state, processor, workdir)
    ckpt.close()
    rep.close()
    if rep.enabled:
        (workdir / "summary.json").write_text(strict_json(summary, indent=2, default=str))
    return summary


def _open_workdir(cfg: TrainConfig, workdir: Path, allow_config_change: bool) -> Reporter:
    """The run's reporter, once the workdir is known writable and, when it holds a run, that run's config is
    this one (or the change is allowed: the previous config is kept); the config is saved there."""
    try:
        rep = Reporter(workdir)
        if rep.enabled:
            (workdir / ".write_check").touch()
            (workdir / ".write_check").unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to the workdir {workdir} ({type(e).__name__}: {e}); pass a writable "
                          "--workdir") from None
    saved_config = workdir / "config.json"
    if saved_config.exists() and _has_checkpoint(workdir):
        changes = config_changes(json.loads(saved_config.read_text()), cfg.to_dict())
        if changes and not allow_config_change:
            raise ConfigError(f"{workdir} holds a run with another config; resuming would change {len(changes)} "
                              "setting(s) that shape the run:\n  " + "\n  ".join(changes) + "\nRerun with the run's "
                              "own settings, pass --allow_config_change to resume with these (both configs are kept), "
                              "or use a new --workdir")
        if changes and rep.enabled:
            kept = workdir / f"config.previous-{time.strftime('%Y%m%d-%H%M%S')}.json"
            saved_config.rename(kept)
            rep.print(f"Resuming with {len(changes)} changed setting(s) (--allow_config_change); the previous config "
                      f"is kept in {kept.name}:\n  " + "\n  ".join(changes))
    if rep.enabled:
        saved_config.write_text(cfg.to_json())
    return rep


def _print_start(rep: Reporter, cfg: TrainConfig, mesh, model, counts, steps_per_epoch: int, total_steps: int,
                 pipes) -> None:
    """What the run is about to do: devices, model, data, schedule, notes, generation settings."""
    rep.print(_summary(cfg, mesh, counts, steps_per_epoch, total_steps, pipes.num_train, pipes.num_val))
    for note in schedule_notes(cfg, steps_per_epoch, total_steps):
        rep.print(f"  note         {note}")
    if cfg.eval.enabled:
        from florence_jax.generation_config import describe_settings

        settings = describe_settings(model, cfg.eval.num_beams, cfg.eval.max_new_tokens, cfg.eval.no_repeat_ngram_size)
        rep.print(f"  evaluation   {settings}")
        for warning in structured_output_warnings(cfg, model):
            log.warning("%s", warning)
            rep.print(f"  WARNING      {warning}")
    if not cfg.data.mixed and cfg.data.mixture[0].source == "synthetic":
        from train.data.synthetic import question_only_bound

        bound = question_only_bound(threshold=cfg.eval.anls_threshold)
        rep.print(f"Question-only ANLS bound on this data: {bound.overall:.3f} (a model must read the image to beat it)")


def _finish(cfg: TrainConfig, rep: Reporter, model, state, processor, workdir: Path) -> None:
    """After the last step: the export (and push), the training curves and the before/after line."""
    if cfg.export_at_end:
        nnx_update(model, state)
        out = workdir / "export"
        written = export_model(cfg, model, processor, out)
        if rep.enabled:
            rep.print(f"Exported to {', '.join(str(p) for p in written)}")
        if cfg.push_to_hub and rep.enabled:
            from florence_jax.lora import has_lora, merge_lora

            (merge_lora(model) if has_lora(model) else model).push_to_hub(cfg.push_to_hub, processor=processor)
    plot = rep.plot()
    if plot:
        rep.print(f"Training curves: {plot}")
    from train.metrics import get_metric

    metric = cfg.data.mixture[0].metric
    line = (rep.before_after("score") if cfg.data.mixed
            else rep.before_after(metric, get_metric(metric).higher_is_better))
    if line:
        rep.print(line[0].upper() + line[1:])


def data_notes(counters: dict[str, int], evaluated: int, num_val: int) -> list[str]:
    """Lines for the evaluation summary when records were lost or cut: training records skipped by reason,
    truncated prompts and targets, validation records not scored."""
    notes = []
    reasons = {k[len("skipped_"):]: v for k, v in counters.items() if k.startswith("skipped_") and "/" not in k and v}
    if counters.get("skipped"):
        detail = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
        notes.append(f"training data: {counters['skipped']} records skipped so far" + (f" ({detail})" if detail else ""))
    cut = {k: counters.get(f"truncated_{k}", 0) for k in ("prompt", "target")}
    if any(cut.values()):
        notes.append(f"training data: {cut['prompt']} prompts and {cut['target']} targets truncated to "
                     "data.max_prompt_tokens / data.max_target_tokens so far")
    if num_val and evaluated < num_val:
        notes.append(f"validation: {evaluated} of {num_val} records scored ({num_val - evaluated} skipped as unusable)")
    return notes


def schedule_notes(cfg: TrainConfig, steps_per_epoch: int, total_steps: int) -> list[str]:
    """One line for each schedule setting that does not do what it says."""
    notes = []
    if cfg.max_steps and cfg.max_steps != cfg.num_epochs * steps_per_epoch:
        notes.append(f"max_steps={cfg.max_steps} sets the length ({total_steps / steps_per_epoch:.2f} epochs), not "
                     f"num_epochs={cfg.num_epochs}")
    if cfg.optim.warmup_steps >= total_steps:
        notes.append(f"optim.warmup_steps={cfg.optim.warmup_steps} is not below the run's {total_steps} steps: the "
                     "learning rate rises for the whole run and never decays")
    return notes


def _host_memory_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_host_memory(compiled, devices: int, available: int | None = None) -> int:
    """On the CPU, refuse a step whose compiled program needs more memory than the machine has free (it would be
    killed mid-step without a message). The need is what one call allocates beyond its inputs, temporaries and
    outputs that do not reuse a donated input, for each local device. Returns it in bytes."""
    from florence_jax.devices import compiled_memory

    memory = compiled_memory(compiled)
    if memory is None:
        return 0
    need = memory.beyond_inputs * devices
    available = _host_memory_available() if available is None else available
    if available is not None and need > 0.9 * available:
        raise ConfigError(f"the train step needs {need / 2**30:.1f} GiB of memory beyond the model and optimizer "
                          f"state ({devices} device(s)), and {available / 2**30:.1f} GiB is available: lower "
                          "batch_size or data.image_size, raise grad_accum_steps, or set model.remat_policy=full")
    return need


def nnx_update(model, state) -> None:
    from flax import nnx

    nnx.update(model, state.params, state.rest)


def _meta(cfg: TrainConfig, step: int, steps_per_epoch: int, best: dict, train_records: list[int]) -> dict:
    return {"step": step, "epoch": step / steps_per_epoch, "best": best, "config": cfg.to_dict(),
            "train_records": train_records}


def data_change(saved: list[int] | None, now: list[int], names: list[str]) -> str | None:
    """How the training records differ from those a checkpoint was trained on (counted per dataset), or None.
    The data order and the saved position are the old records': a file edited between launches changes both."""
    if saved is None or list(saved) == list(now):
        return None
    if len(saved) != len(now):
        return f"{len(saved)} dataset(s), now {len(now)}"
    return ", ".join(f"{name + ': ' if name else ''}{a:,} training records, now {b:,}"
                     for name, a, b in zip(names, saved, now, strict=True) if a != b)


def _summary(cfg, mesh, counts, steps_per_epoch, total_steps, n_train, n_val) -> str:
    devices = jax.devices()
    return "\n".join([
        "florence-jax fine-tuning",
        f"  devices      {len(devices)} x {devices[0].device_kind} ({jax.process_count()} process(es)); "
        f"mesh data={mesh.shape['data']} fsdp={mesh.shape['fsdp']}",
        f"  model        {cfg.model.name_or_path} (compute {cfg.model.dtype}, params {cfg.model.param_dtype})",
        f"  parameters   {counts['trainable']:,} trainable, {counts['frozen']:,} frozen"
        + (f" (LoRA rank {cfg.lora.rank}, alpha {cfg.lora.alpha:g})" if cfg.lora.enabled else ""),
        f"  data         {_data_summary(cfg)}: {n_train:,} train / {n_val:,} validation records",
        f"  batch        global {cfg.batch_size} ({cfg.batch_size // jax.process_count()} per process, "
        f"grad accumulation {cfg.grad_accum_steps})",
        f"  schedule     {steps_per_epoch} steps/epoch, {total_steps} steps "
        f"({total_steps / steps_per_epoch:.2f} epochs), lr {cfg.optim.learning_rate:g} {cfg.optim.schedule}",
    ])


def _data_summary(cfg: TrainConfig) -> str:
    if not cfg.data.mixed:
        (only,) = cfg.data.mixture
        return only.source + (f" ({only.subset})" if only.subset else "")
    total = sum(c.weight for c in cfg.data.mixture)
    return "mixture " + ", ".join(f"{c.name} {c.weight / total:.0%} ({c.metric})" for c in cfg.data.mixture)
