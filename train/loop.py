"""The training run: data, model, sharded state, the step loop, evaluation, checkpoints and export.

Running the same command again resumes from the workdir's latest complete checkpoint: parameters,
optimizer state, step and the data iterator's position are restored together, so the resumed run sees
the same batches in the same order as an uninterrupted one. SIGTERM (preemption) saves at the next step
boundary and exits cleanly.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import queue
import signal
import threading
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from florence_jax.sharding import batch_sharding, make_mesh
from train.checkpoint import Checkpointer, abstract_like
from train.config import TrainConfig
from train.evaluate import Evaluator, format_samples
from train.optim import count_params
from train.reporting import Reporter
from train.state import create_model, init_train_state
from train.step import jit_eval_step, jit_train_step

log = logging.getLogger("train")


# ------------------------------------------------------------------------------------------ setup
def setup_runtime(cfg: TrainConfig) -> None:
    from train.distributed import maybe_initialize

    maybe_initialize(cfg.distributed)
    if cfg.compilation_cache_dir:
        path = os.path.expanduser(cfg.compilation_cache_dir)
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def get_processor(cfg: TrainConfig, workdir: Path):
    """The model's processor; a random-init model gets a tiny tokenizer saved into the workdir."""
    from florence_jax.processing import load_processor

    if cfg.model.processor:
        return load_processor(cfg.model.processor)
    if cfg.model.name_or_path.startswith("random:"):
        from florence_jax.testing.processor import build_tiny_processor

        path = workdir / "processor"
        if (path / "tokenizer.json").exists():
            return load_processor(path)
        return build_tiny_processor(save_dir=path if jax.process_index() == 0 else None,
                                    image_size=cfg.data.image_size)
    return load_processor(cfg.model.name_or_path, revision=cfg.model.revision)


def get_sources(cfg: TrainConfig, workdir: Path):
    from train.data.sources import SourceSpec, open_source

    d = cfg.data
    if d.source == "synthetic":
        from train.data import synthetic

        out = workdir / "data"
        s = d.synthetic
        if not (out / "validation.parquet").exists():
            if jax.process_index() == 0:
                synthetic.generate(out, s.num_train, s.num_val, image_size=s.image_size, seed=s.seed)
            _barrier("synthetic_data")
        return open_source(str(out / "train.parquet")), open_source(str(out / "validation.parquet"))
    if d.source == "synthetic_detection":
        from train.data import synthetic_detection

        out = workdir / "data"
        s = d.synthetic
        if not (out / "validation.json").exists():
            if jax.process_index() == 0:
                synthetic_detection.generate(out, s.num_train, s.num_val, image_size=s.image_size, seed=s.seed)
            _barrier("synthetic_detection_data")
        return open_source(str(out / "train.json")), open_source(str(out / "validation.json"))
    train = open_source(SourceSpec(path=d.source, kind=d.format, split=d.train_split, image_root=d.image_root))
    val = open_source(SourceSpec(path=d.eval_source or d.source, kind=d.format, split=d.eval_split,
                                 image_root=d.eval_image_root if d.eval_source else d.image_root))
    return train, val


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def make_pipelines(cfg: TrainConfig, processor, train_src, val_src):
    from train.data.pipeline import DataConfig as PipelineConfig
    from train.data.pipeline import DataPipeline

    n = jax.process_count()
    eval_bs = cfg.eval.batch_size or cfg.batch_size
    for name, b in (("batch_size", cfg.batch_size), ("eval.batch_size", eval_bs)):
        if b % n:
            raise ValueError(f"config.{name}={b} is not divisible by the {n} processes")
    base = PipelineConfig(
        batch_size=cfg.batch_size // n, max_prompt_tokens=cfg.data.max_prompt_tokens,
        max_target_tokens=cfg.data.max_target_tokens, image_size=cfg.data.image_size, seed=cfg.seed,
        num_epochs=None, shuffle=True, worker_count=cfg.data.num_workers, template=cfg.data.template,
    )
    train = DataPipeline(train_src, processor, base)
    if cfg.data.max_eval_examples:
        val_src = _Head(val_src, cfg.data.max_eval_examples)
    val = DataPipeline(val_src, processor, dataclasses.replace(base, batch_size=eval_bs // n, shuffle=False))
    return train, val


class _Head:
    """The first ``n`` records of a source (evaluation on a fixed prefix, never a random subset)."""

    def __init__(self, source, n: int):
        self.source, self.n = source, min(n, len(source))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.source[i]


class Prefetcher:
    """Reads host batches and puts them on devices in a background thread, two steps ahead.

    Each batch travels with the iterator state captured right after it was read, so a checkpoint saved
    after consuming batch k resumes at batch k + 1 whatever the prefetch depth.
    """

    def __init__(self, iterator, to_global, depth: int = 2):
        self.iterator, self.to_global = iterator, to_global
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            while True:
                batch = next(self.iterator)
                state = self.iterator.get_state()
                self.queue.put((self.to_global(batch), state, None))
        except StopIteration:
            self.queue.put((None, None, StopIteration()))
        except Exception as e:  # surfaced in the main thread
            self.queue.put((None, None, e))

    def __next__(self):
        batch, state, err = self.queue.get()
        if err is not None:
            raise err
        return batch, state


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


# ------------------------------------------------------------------------------------------ run
def run(cfg: TrainConfig, workdir: str | Path) -> dict[str, Any]:
    """Train (or resume) in ``workdir``; returns the final summary (also in ``workdir/summary.json``)."""
    workdir = Path(workdir).absolute()
    setup_runtime(cfg)
    rep = Reporter(workdir)
    if rep.enabled:
        (workdir / "config.json").write_text(cfg.to_json())
    processor = get_processor(cfg, workdir)
    train_src, val_src = get_sources(cfg, workdir)
    train_pipe, val_pipe = make_pipelines(cfg, processor, train_src, val_src)

    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    n_dev = mesh.devices.size
    micro = cfg.batch_size // cfg.grad_accum_steps
    if cfg.batch_size % cfg.grad_accum_steps or micro % n_dev:
        raise ValueError(f"batch_size {cfg.batch_size} / grad_accum_steps {cfg.grad_accum_steps} must be a "
                         f"multiple of the {n_dev} devices")
    eval_bs = cfg.eval.batch_size or cfg.batch_size
    if eval_bs % n_dev:
        raise ValueError(f"eval batch size {eval_bs} must be a multiple of the {n_dev} devices "
                         "(set --config.eval.batch_size)")
    per_process_records = len(train_src) // jax.process_count()
    steps_per_epoch = per_process_records // (cfg.batch_size // jax.process_count())
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_src)} training records give no full batch of {cfg.batch_size}")
    total_steps = cfg.max_steps or cfg.num_epochs * steps_per_epoch

    model = create_model(cfg.model, mesh, tokenizer=processor.tokenizer, seed=cfg.seed,
                         min_shard_size=cfg.mesh.fsdp_min_size)
    fns, state, schedule = init_train_state(model, cfg.optim, total_steps, mesh,
                                            grad_accum_steps=cfg.grad_accum_steps,
                                            min_shard_size=cfg.mesh.fsdp_min_size)
    bsh = batch_sharding(mesh)

    def to_global(host_batch):
        if jax.process_count() == 1:
            return jax.device_put(host_batch, bsh)
        return {k: jax.make_array_from_process_local_data(bsh, v) for k, v in host_batch.items()}

    train_step = jit_train_step(fns, state, bsh)
    eval_step = jit_eval_step(fns, state, bsh)
    evaluator = Evaluator(val_pipe, model, processor.tokenizer, batch_sharding=bsh, eval_step=eval_step,
                          num_beams=cfg.eval.num_beams, max_new_tokens=cfg.eval.max_new_tokens,
                          threshold=cfg.eval.anls_threshold, num_samples=cfg.eval.num_print,
                          to_global=to_global, metric=cfg.eval.metric)

    metric = cfg.eval.metric
    ckpt = Checkpointer(workdir / "checkpoints", keep=cfg.keep_checkpoints, best_metric=metric)
    iterator = iter(train_pipe.train())
    start = ckpt.latest_step()
    best = {metric: -1.0, "step": None}
    if start is not None:
        state, data_state, meta = ckpt.restore(start, abstract_like(state))
        iterator.set_state(data_state)
        if metric in meta.get("best", {}):
            best = meta["best"]
        rep.print(f"Resuming from step {start} ({workdir / 'checkpoints'})")
    step = int(state.step)

    counts = count_params(state.params, fns.labels)
    rep.print(_summary(cfg, mesh, counts, steps_per_epoch, total_steps, len(train_src), len(val_src)))
    if cfg.data.source == "synthetic":
        from train.data.synthetic import question_only_bound

        bound = question_only_bound(threshold=cfg.eval.anls_threshold)
        rep.print(f"Question-only ANLS bound on this data: {bound.overall:.3f} (a model must read the image to beat it)")

    def do_eval(tag: str):
        t0 = time.time()
        res = evaluator(state.params, state.rest, progress=True)
        epoch = step / steps_per_epoch
        rec = res.record(step, round(epoch, 3))
        rec["seconds"] = round(time.time() - t0, 1)
        rep.eval_metrics(rec)
        rep.print(f"[{tag}] step {step} epoch {epoch:.2f}: val_loss {res.val_loss:.4f}  {res.headline()} "
                  f"on {res.num_examples} examples ({rec['seconds']}s)")
        if res.samples:
            rep.print(format_samples(res.samples))
        return res

    if start is None and cfg.eval_at_start:
        res = do_eval("before training")
        best = {metric: res.score, "step": 0}

    prefetch = Prefetcher(iterator, to_global)
    rng = jax.random.key(cfg.seed)
    progress = None
    if rep.enabled:
        from tqdm.auto import tqdm

        progress = tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True)
    t_last, step_last = time.time(), step
    last_metrics: dict[str, float] = {}
    data_state = iterator.get_state()
    preempted = False
    with _Preemption() as preemption:
        while step < total_steps:
            batch, data_state = next(prefetch)
            state, metrics = train_step(state, batch, rng)
            step += 1
            if step % cfg.log_every_steps == 0 or step == total_steps:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.time()
                m["lr"] = float(schedule(step - 1))
                m["examples_per_s"] = (step - step_last) * cfg.batch_size / max(now - t_last, 1e-9)
                m["epoch"] = step / steps_per_epoch
                t_last, step_last = now, step
                last_metrics = m
                rep.train_metrics(step, m)
                if progress is not None:
                    progress.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}",
                                         ex_s=f"{m['examples_per_s']:.1f}")
            if progress is not None:
                progress.update(1)
            epoch_end = step % steps_per_epoch == 0
            eval_now = step == total_steps or (
                cfg.eval_every_steps and step % cfg.eval_every_steps == 0) or (
                not cfg.eval_every_steps and epoch_end)
            ckpt_metrics = None
            if eval_now:
                res = do_eval(f"epoch {step / steps_per_epoch:.2f}")
                ckpt_metrics = {metric: res.score, "val_loss": res.val_loss}
                if res.score > best[metric]:
                    best = {metric: res.score, "step": step}
            preempted = preemption.should_stop(step)
            if (eval_now or epoch_end or preempted or step == total_steps
                    or (cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0)):
                ckpt.save(step, state, data_state, _meta(cfg, step, steps_per_epoch, best),
                          metrics=ckpt_metrics, force=True)
            if preempted:
                rep.print(f"SIGTERM received: checkpoint saved at step {step}; rerun the same command to resume")
                break
    if progress is not None:
        progress.close()
    ckpt.wait()
    summary = {"step": step, "total_steps": total_steps, "best": best, "last_train": last_metrics,
               "preempted": preempted, "data_counters": dict(getattr(iterator, "counters", {}))}
    if not preempted and step >= total_steps:
        if cfg.export_at_end:
            nnx_update(model, state)
            out = workdir / "export"
            model.save_pretrained(out)
            if rep.enabled:
                processor.save_pretrained(out)
                rep.print(f"Exported a transformers-loadable model to {out}")
            if cfg.push_to_hub and rep.enabled:
                model.push_to_hub(cfg.push_to_hub, processor=processor)
        plot = rep.plot()
        if plot:
            rep.print(f"Training curves: {plot}")
    ckpt.close()
    rep.close()
    if rep.enabled:
        import json

        (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def nnx_update(model, state) -> None:
    from flax import nnx

    nnx.update(model, state.params, state.rest)


def _meta(cfg: TrainConfig, step: int, steps_per_epoch: int, best: dict) -> dict:
    return {"step": step, "epoch": step / steps_per_epoch, "best": best, "config": cfg.to_dict()}


def _summary(cfg, mesh, counts, steps_per_epoch, total_steps, n_train, n_val) -> str:
    devices = jax.devices()
    return "\n".join([
        "florence-jax fine-tuning",
        f"  devices      {len(devices)} x {devices[0].device_kind} ({jax.process_count()} process(es)); "
        f"mesh data={mesh.shape['data']} fsdp={mesh.shape['fsdp']}",
        f"  model        {cfg.model.name_or_path} (compute {cfg.model.dtype}, params {cfg.model.param_dtype})",
        f"  parameters   {counts['trainable']:,} trainable, {counts['frozen']:,} frozen",
        f"  data         {cfg.data.source}: {n_train:,} train / {n_val:,} validation records",
        f"  batch        global {cfg.batch_size} ({cfg.batch_size // jax.process_count()} per process, "
        f"grad accumulation {cfg.grad_accum_steps})",
        f"  schedule     {steps_per_epoch} steps/epoch, {total_steps} steps "
        f"({total_steps / steps_per_epoch:.2f} epochs), lr {cfg.optim.learning_rate:g} {cfg.optim.schedule}",
    ])


def evaluate_only(cfg: TrainConfig, workdir: str | None = None, model: str | None = None) -> dict[str, Any]:
    """Score a run's latest checkpoint or a model directory/Hub id on the config's validation split."""
    workdir_path = Path(workdir).absolute() if workdir else Path(os.getcwd()) / "eval_workdir"
    setup_runtime(cfg)
    if model:
        cfg.model.name_or_path = model
    processor = get_processor(cfg, workdir_path)
    train_src, val_src = get_sources(cfg, workdir_path)
    _, val_pipe = make_pipelines(cfg, processor, train_src, val_src)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    net = create_model(cfg.model, mesh, tokenizer=processor.tokenizer, seed=cfg.seed,
                       min_shard_size=cfg.mesh.fsdp_min_size)
    fns, state, _ = init_train_state(net, cfg.optim, 1, mesh, min_shard_size=cfg.mesh.fsdp_min_size)
    step = 0
    if workdir and not model:
        ckpt = Checkpointer(workdir_path / "checkpoints", keep=cfg.keep_checkpoints)
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {workdir_path / 'checkpoints'}")
        state, _, _ = ckpt.restore(step, abstract_like(state))
        ckpt.close()
    bsh = batch_sharding(mesh)
    evaluator = Evaluator(val_pipe, net, processor.tokenizer, batch_sharding=bsh,
                          eval_step=jit_eval_step(fns, state, bsh), num_beams=cfg.eval.num_beams,
                          max_new_tokens=cfg.eval.max_new_tokens, threshold=cfg.eval.anls_threshold,
                          metric=cfg.eval.metric)
    res = evaluator(state.params, state.rest, progress=True)
    return {**res.record(step, math.nan), "samples": res.samples}
