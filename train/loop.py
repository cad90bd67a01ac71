"""The training run: data, model, sharded state, the step loop, evaluation, checkpoints and export.

Running the same command again resumes from the workdir's latest complete checkpoint: parameters,
optimizer state, step and the data iterator's position are restored together, so the resumed run sees
the same batches in the same order as an uninterrupted one. SIGTERM (preemption) saves at the next step
boundary and exits cleanly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
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
from train.compiles import CompileWatch
from train.config import PIXEL_DTYPE, ConfigError, MixtureComponent, TrainConfig
from train.distributed import compile_then_wait
from train.evaluate import Evaluator, MixtureEvaluator, format_samples
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
        processor = load_processor(cfg.model.processor)
    elif cfg.model.name_or_path.startswith("random:"):
        from florence_jax.testing.processor import build_tiny_processor

        path = workdir / "processor"
        saved = (path / "tokenizer.json").exists()
        _barrier("processor")  # every process has looked before process 0 may write
        if saved:
            processor = load_processor(path)
        else:
            processor = build_tiny_processor(save_dir=path if jax.process_index() == 0 else None,
                                             image_size=cfg.data.image_size)
    else:
        processor = load_processor(cfg.model.name_or_path, revision=cfg.model.revision)
    if cfg.model.add_tokens:
        from florence_jax.vocab import add_tokens

        add_tokens(processor.tokenizer, cfg.model.add_tokens)
    return processor


def code_repo_for(cfg: TrainConfig, model) -> str:
    """The Hub repo an original-layout export's ``auto_map`` names (``config.export_code_repo``)."""
    if cfg.export_code_repo:
        return cfg.export_code_repo
    name = cfg.model.name_or_path
    if name.startswith("microsoft/Florence-2-"):
        return name
    return "microsoft/Florence-2-large" if model.config.text_config.d_model >= 1024 else "microsoft/Florence-2-base"


def export_model(cfg: TrainConfig, model, processor, out: Path, lora_mode: str | None = None,
                 layout: str | None = None) -> list[Path]:
    """Write ``out``: a transformers-loadable model with the processor; with LoRA, ``lora_mode`` (default
    ``cfg.lora.export``) picks the merged model, a peft adapter directory, or both (adapter in
    ``out/adapter``). An adapter whose base is not the loaded checkpoint as is (added tokens, random init)
    comes with that base in ``<adapter dir>/base``. ``layout`` (default ``cfg.export_layout``) ``"original"``
    writes the microsoft/Florence-2-* remote-code layout instead (a full model, adapters merged). Returns the
    directories written."""
    from florence_jax.lora import has_lora, merge_lora, save_peft_adapter, strip_lora

    main = jax.process_index() == 0
    if (layout or cfg.export_layout) == "original":
        from florence_jax.weights.original import save_original_processor

        full = merge_lora(model) if has_lora(model) else model
        repo = code_repo_for(cfg, model)
        full.save_pretrained(out, layout="original", code_repo=repo)
        if main:
            save_original_processor(processor, out, repo)
        return [out]
    if not has_lora(model):
        model.save_pretrained(out)
        if main:
            processor.save_pretrained(out)
        return [out]
    mode = lora_mode or cfg.lora.export
    written = []
    if mode in ("merged", "both"):
        merge_lora(model).save_pretrained(out)
        if main:
            processor.save_pretrained(out)
        written.append(out)
    if mode in ("adapter", "both"):
        adapter_dir = out if mode == "adapter" else out / "adapter"
        base_name, revision = cfg.model.name_or_path, cfg.model.revision
        if cfg.model.add_tokens or base_name.startswith("random:"):
            base_dir = adapter_dir / "base"
            strip_lora(model).save_pretrained(base_dir)
            if main:
                processor.save_pretrained(base_dir)
            base_name, revision = "base", None  # relative to the adapter directory: the folder can move
        elif Path(base_name).is_dir():
            # A local checkpoint: named relative to the adapter directory, so both can move together.
            base_name = os.path.relpath(Path(base_name).absolute(), adapter_dir.absolute())
        save_peft_adapter(model, adapter_dir, base_model_name_or_path=base_name, revision=revision)
        if main:
            processor.save_pretrained(adapter_dir)
        written.append(adapter_dir)
    return written


def _synthetic_sources(cfg: TrainConfig, workdir: Path, kind: str = "synthetic"):
    """The generated train/validation set (``synthetic`` documents as parquet, ``synthetic_detection``
    shapes as COCO JSON), written once by process 0 into ``workdir/data``."""
    import importlib

    from train.data.sources import open_source

    module = importlib.import_module(f"train.data.{kind}")
    suffix = ".json" if kind == "synthetic_detection" else ".parquet"
    out = workdir / "data"
    s = cfg.data.synthetic
    ready = (out / f"validation{suffix}").exists()
    _barrier(f"{kind}_check")  # every process has looked before process 0 may write
    if not ready:
        if jax.process_index() == 0:
            module.generate(out, s.num_train, s.num_val, image_size=s.image_size, seed=s.seed)
        _barrier(f"{kind}_data")
    return open_source(str(out / f"train{suffix}")), open_source(str(out / f"validation{suffix}"))


@dataclasses.dataclass
class RunDataset:
    """One dataset of a run (the only one, or a mixture component): its records and configured template."""

    component: MixtureComponent
    template: Any  # train.data.templates.ConfiguredTemplate
    train: Any  # records (a Sequence of dicts)
    val: Any  # records, or None when the component is not evaluated

    @property
    def name(self) -> str:
        return self.component.name


def get_datasets(cfg: TrainConfig, workdir: Path) -> list[RunDataset]:
    """Open every dataset of the run (``data.mixture``: one or several) and check, at start, that
    each template finds its columns (after ``columns`` renames)."""
    from train.data.sources import SourceSpec, open_source
    from train.data.templates import ConfiguredTemplate

    out = []
    for c in cfg.data.mixture:
        where = f"config.data.mixture[{c.name}]" if c.name else "config.data"
        template = ConfiguredTemplate(c.template, c.columns, c.prompt_prefix)
        if c.source in ("synthetic", "synthetic_detection"):
            train, val = _synthetic_sources(cfg, workdir, c.source)
        else:
            image = template.column("image")  # JSONL: relative image paths resolve in this column
            train = open_source(SourceSpec(path=c.source, kind=c.format, split=c.train_split, name=c.subset,
                                           image_column=image, image_root=c.image_root))
            val = None
            if c.eval_split is not None:
                val = open_source(SourceSpec(
                    path=c.eval_source or c.source, kind=c.format, split=c.eval_split, name=c.subset,
                    image_column=image, image_root=c.eval_image_root if c.eval_source else c.image_root))
        template.check_columns(train, where)
        if val is not None:
            template.check_columns(val, where)
        val = None if c.eval_split is None else template.prepare(val)
        out.append(RunDataset(c, template, template.prepare(train), val))
    return out


def get_sources(cfg: TrainConfig, workdir: Path):
    """(train, validation) records of a single-dataset run."""
    (only,) = get_datasets(cfg, workdir)
    return only.train, only.val


def _barrier(name: str) -> None:
    from train.distributed import wait_for_all

    wait_for_all(name)


def _pipeline_config(cfg: TrainConfig):
    from train.data.pipeline import PipelineConfig

    n = jax.process_count()
    eval_bs = cfg.eval.batch_size or cfg.batch_size
    for name, b in (("batch_size", cfg.batch_size), ("eval.batch_size", eval_bs)):
        if b % n:
            raise ValueError(f"config.{name}={b} is not divisible by the {n} processes")
    return PipelineConfig(
        batch_size=cfg.batch_size // n, max_prompt_tokens=cfg.data.max_prompt_tokens,
        max_target_tokens=cfg.data.max_target_tokens, image_size=cfg.data.image_size, seed=cfg.seed,
        num_epochs=None, shuffle=True, worker_count=cfg.data.num_workers, template=cfg.data.mixture[0].template,
        pixel_dtype=PIXEL_DTYPE,
    ), eval_bs // n


def make_pipelines(cfg: TrainConfig, processor, train_src, val_src, template=None):
    """Training and validation pipelines of one dataset (``template``: a ConfiguredTemplate, or the first
    dataset's template name)."""
    from train.data.pipeline import DataPipeline

    base, eval_bs = _pipeline_config(cfg)
    if template is not None:
        base = dataclasses.replace(base, template=template)
    train = DataPipeline(train_src, processor, base)
    if val_src is None:
        return train, None
    limit = cfg.data.max_eval_examples
    if limit:
        val_src = _Head(val_src, limit)
    val = DataPipeline(val_src, processor, dataclasses.replace(base, batch_size=eval_bs, shuffle=False))
    return train, val


@dataclasses.dataclass
class RunPipelines:
    """The run's pipelines, one pair per dataset; ``train()`` mixes them by weight when there are several."""

    datasets: list[RunDataset]
    train_pipes: list[Any]
    val_pipes: list[Any]  # None where a component is not evaluated

    @property
    def mixture(self) -> bool:
        return bool(self.datasets[0].name)

    @property
    def pixel_table(self):
        """The table the step normalizes uint8 pixel batches with (one processor: the same for every dataset)."""
        return self.train_pipes[0].encoder.pixel_table

    def train(self):
        if not self.mixture:
            return self.train_pipes[0].train()
        from train.data.pipeline import mixture_train

        return mixture_train(self.train_pipes, [d.component.weight for d in self.datasets],
                             [d.name for d in self.datasets])

    @property
    def num_train(self) -> int:
        return sum(len(p.source) for p in self.train_pipes)

    @property
    def num_val(self) -> int:
        return sum(len(p.source) for p in self.val_pipes if p is not None)

    def evaluator(self, make):
        """``make(val_pipeline, metric)`` -> Evaluator; one per evaluated dataset, combined for a mixture."""
        if not self.mixture:
            return make(self.val_pipes[0], self.datasets[0].component.metric)
        return MixtureEvaluator([(d.name, d.component.weight, make(p, d.component.metric))
                                 for d, p in zip(self.datasets, self.val_pipes) if p is not None])


def build_pipelines(cfg: TrainConfig, processor, datasets: list[RunDataset]) -> RunPipelines:
    trains, vals = [], []
    for d in datasets:
        if d.name and d.component.max_eval_examples:
            cfg_d = dataclasses.replace(cfg, data=dataclasses.replace(
                cfg.data, max_eval_examples=d.component.max_eval_examples))
        else:
            cfg_d = cfg
        t, v = make_pipelines(cfg_d, processor, d.train, d.val, template=d.template)
        trains.append(t)
        vals.append(v)
    return RunPipelines(datasets, trains, vals)


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


def data_busy(before: tuple[float, float], after: tuple[float, float]) -> float | None:
    """Fraction of a window the prefetch thread spent making batches (None before it made any)."""
    busy, waiting = after[0] - before[0], after[1] - before[1]
    return busy / (busy + waiting) if busy + waiting > 0 else None


DATA_BOUND = 0.9  # a log window whose prefetch thread was busier than this waited for data


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


def _template_id(template) -> str:
    if isinstance(template, str):
        return template
    return f"{getattr(template, 'name', type(template).__name__)}:{getattr(template, 'renames', '')}"


def _use_feature_cache(cfg: TrainConfig, fns, pipes, model, workdir: Path) -> None:
    """Compute (or reuse) every training dataset's vision features and have its pipeline yield them."""
    from train.feature_cache import build_or_load

    if not fns.freeze_vision:
        raise ValueError("config.data.cache_vision_features needs a frozen vision tower: keep "
                         r"'^model\.vision_tower\.' in config.optim.freeze (or turn the cache off)")
    for d, pipe in zip(pipes.datasets, pipes.train_pipes):
        key = {"model": cfg.model.name_or_path, "revision": cfg.model.revision, "seed": cfg.seed,
               "image_size": cfg.data.image_size, "dtype": cfg.model.dtype, "dataset": d.name,
               "template": _template_id(pipe.config.template), "source": repr(pipe.source),
               "records": len(pipe.source)}
        if cfg.model.name_or_path.startswith("random:"):
            key["synthetic"] = dataclasses.asdict(cfg.data.synthetic)
        store = build_or_load(workdir / "vision_features", key, pipe, model, dtype=cfg.model.dtype,
                              progress=jax.process_index() == 0)
        pipe.encoder.features = store


# ------------------------------------------------------------------------------------------ run
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


def run(cfg: TrainConfig, workdir: str | Path, *, allow_config_change: bool = False) -> dict[str, Any]:
    """Train (or resume) in ``workdir``; returns the final summary (also in ``workdir/summary.json``).

    Resuming with a config that changes the run's trajectory (batch, learning rate, schedule, data, model, seed,
    ...) is refused with the list of changes, unless ``allow_config_change``; then the previous config is kept
    next to the new one (``config.previous-<time>.json``)."""
    workdir = Path(workdir).absolute()
    setup_runtime(cfg)
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
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    n_dev = mesh.devices.size
    micro = cfg.batch_size // cfg.grad_accum_steps
    if cfg.batch_size % cfg.grad_accum_steps or micro % n_dev:
        raise ConfigError(f"batch_size {cfg.batch_size} / grad_accum_steps {cfg.grad_accum_steps} must be a "
                          f"multiple of the {n_dev} devices: set --config.batch_size to a multiple of "
                          f"{n_dev * cfg.grad_accum_steps}")
    eval_bs = cfg.eval.batch_size or cfg.batch_size
    if eval_bs % n_dev:
        raise ConfigError(f"eval batch size {eval_bs} must be a multiple of the {n_dev} devices: set "
                          f"--config.eval.batch_size to a multiple of {n_dev}")
    processor = get_processor(cfg, workdir)
    pipes = build_pipelines(cfg, processor, get_datasets(cfg, workdir))
    # A mixture's "epoch" is as many examples as all its datasets hold together (not each seen once).
    per_process_records = pipes.num_train // jax.process_count()
    steps_per_epoch = per_process_records // (cfg.batch_size // jax.process_count())
    if steps_per_epoch == 0:
        raise ValueError(f"{pipes.num_train} training records give no full batch of {cfg.batch_size}")
    total_steps = cfg.max_steps or cfg.num_epochs * steps_per_epoch

    model = create_model(cfg.model, mesh, tokenizer=processor.tokenizer, seed=cfg.seed,
                         min_shard_size=cfg.mesh.fsdp_min_size, lora=cfg.lora)
    check_lengths(cfg, model, pipes)
    check_export(cfg, model)
    fns, state, schedule = init_train_state(model, cfg.optim, total_steps, mesh,
                                            grad_accum_steps=cfg.grad_accum_steps,
                                            min_shard_size=cfg.mesh.fsdp_min_size, pixel_table=pipes.pixel_table)
    bsh = batch_sharding(mesh)
    if cfg.data.cache_vision_features:
        _use_feature_cache(cfg, fns, pipes, model, workdir)

    def to_global(host_batch):
        if jax.process_count() == 1:
            return jax.device_put(host_batch, bsh)
        return {k: jax.make_array_from_process_local_data(bsh, v) for k, v in host_batch.items()}

    train_step = jit_train_step(fns, state, bsh)
    eval_step = jit_eval_step(fns, state, bsh)
    evaluator = pipes.evaluator(lambda pipe, metric: Evaluator(
        pipe, model, processor.tokenizer, batch_sharding=bsh, eval_step=eval_step, num_beams=cfg.eval.num_beams,
        max_new_tokens=cfg.eval.max_new_tokens, threshold=cfg.eval.anls_threshold,
        num_samples=cfg.eval.num_print, to_global=to_global, metric=metric))

    ckpt = Checkpointer(workdir / "checkpoints", keep=cfg.keep_checkpoints)
    iterator = iter(pipes.train())
    restored = ckpt.restore_latest(abstract_like(state))
    start = None if restored is None else restored[0]
    best: dict[str, Any] = {"score": None, "step": None}  # score: EvalResult.score, higher is better
    if restored is not None:
        start, state, data_state, meta = restored
        iterator.set_state(data_state)
        best = meta.get("best", best)
        if "score" not in best:  # a checkpoint written before scores: its best was by ANLS
            best = {"score": best.get("anls"), "step": best.get("step")}
        rep.print(f"Resuming from step {start} ({workdir / 'checkpoints'})")
        rep.forget_after(start)  # what the interrupted launch logged past the checkpoint is redone now
    step = int(state.step)

    counts = count_params(state.params, fns.labels)
    rep.print(_summary(cfg, mesh, counts, steps_per_epoch, total_steps, pipes.num_train, pipes.num_val))
    for note in schedule_notes(cfg, steps_per_epoch, total_steps):
        rep.print(f"  note         {note}")
    if cfg.eval.enabled:
        from florence_jax.generation_config import describe_settings

        rep.print(f"  evaluation   {describe_settings(model, cfg.eval.num_beams, cfg.eval.max_new_tokens)}")
    if not cfg.data.mixed and cfg.data.mixture[0].source == "synthetic":
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
        rep.print(f"[{tag}] step {step} epoch {epoch:.2f}: val_loss {res.val_loss:.4f}  {res.summary()} "
                  f"({rec['seconds']}s)")
        for line in data_notes(getattr(iterator, "counters", {}), res.num_examples, pipes.num_val):
            rep.print(f"  {line}")
        if res.samples:
            rep.print(format_samples(res.samples))
        return res

    if start is None and cfg.eval_at_start and cfg.eval.enabled:
        do_eval("before training")  # no checkpoint holds step 0, so it is never the best one

    prefetch = Prefetcher(iterator, to_global)
    rng = jax.random.key(cfg.seed)
    progress = None
    if rep.enabled:
        from tqdm.auto import tqdm

        progress = tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True)
    t_last, step_last = time.time(), step
    busy_last = busy_start = prefetch.busy()
    warned_data_bound = False
    first_step = step  # of this launch
    last_metrics: dict[str, float] = {}
    data_state = iterator.get_state()
    preempted = False
    step_compiles = CompileWatch("train step")
    with _Preemption() as preemption:
        while step < total_steps:
            batch, data_state = next(prefetch)
            if step == first_step:
                compiled = compile_then_wait(train_step, "train_step", state, batch, rng)
                if compiled is not None and jax.default_backend() == "cpu":
                    check_host_memory(compiled, len(mesh.local_devices))
            with step_compiles:
                state, metrics = train_step(state, batch, rng)
            step += 1
            if step % cfg.log_every_steps == 0 or step == total_steps:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.time()
                m["lr"] = float(schedule(step - 1))
                m["examples_per_s"] = (step - step_last) * cfg.batch_size / max(now - t_last, 1e-9)
                m["epoch"] = step / steps_per_epoch
                busy_now = prefetch.busy()
                frac = data_busy(busy_last, busy_now)
                if frac is not None:
                    m["data_busy"] = frac
                    if frac > DATA_BOUND and not warned_data_bound and step - first_step > cfg.log_every_steps:
                        warned_data_bound = True
                        rep.print(f"The input pipeline is the bottleneck: it was busy {100 * frac:.0f}% of the last "
                                  f"{step - step_last} steps, so the step waited for data. Raise "
                                  f"data.num_workers (now {cfg.data.num_workers}) or prepare the dataset once "
                                  "(python -m scripts.prepare_data; docs/scale-out.md).")
                t_last, step_last, busy_last = now, step, busy_now
                last_metrics = m
                rep.train_metrics(step, m)
                if progress is not None:
                    progress.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}",
                                         ex_s=f"{m['examples_per_s']:.1f}")
            if progress is not None:
                progress.update(1)
            epoch_end = step % steps_per_epoch == 0
            eval_now = cfg.eval.enabled and (step == total_steps or (
                cfg.eval_every_steps and step % cfg.eval_every_steps == 0) or (
                not cfg.eval_every_steps and epoch_end))
            ckpt_metrics = None
            if eval_now:
                res = do_eval(f"epoch {step / steps_per_epoch:.2f}")
                ckpt_metrics = {"score": res.score, "val_loss": res.val_loss}
                if best["score"] is None or res.score > best["score"]:
                    best = {"score": res.score, "step": step}
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
               "preempted": preempted, "data_counters": dict(getattr(iterator, "counters", {})),
               "train_step_compiles": step_compiles.compiles, "train_step_recompiles": step_compiles.recompiles,
               "data_busy": data_busy(busy_start, prefetch.busy())}
    if not preempted and step >= total_steps:
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
    ckpt.close()
    rep.close()
    if rep.enabled:

        from train.reporting import strict_json

        (workdir / "summary.json").write_text(strict_json(summary, indent=2, default=str))
    return summary


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
    stats = compiled.memory_analysis()
    if stats is None:
        return 0
    need = (stats.temp_size_in_bytes + max(stats.output_size_in_bytes - stats.alias_size_in_bytes, 0)) * devices
    available = _host_memory_available() if available is None else available
    if available is not None and need > 0.9 * available:
        raise ConfigError(f"the train step needs {need / 2**30:.1f} GiB of memory beyond the model and optimizer "
                          f"state ({devices} device(s)), and {available / 2**30:.1f} GiB is available: lower "
                          "batch_size or data.image_size, raise grad_accum_steps, or set model.remat_policy=full")
    return need


def check_lengths(cfg: TrainConfig, model, pipes: RunPipelines) -> None:
    """The static text lengths fit the model's learned positions (past them a position lookup has no row and
    the loss turns to NaN without a word)."""
    positions = model.config.text_config.max_position_embeddings
    encoder = pipes.train_pipes[0].encoder
    if encoder.prompt_length > positions:
        raise ConfigError(f"the encoder input is {encoder.image_seq_length} image tokens + data.max_prompt_tokens="
                         f"{cfg.data.max_prompt_tokens} = {encoder.prompt_length} positions, more than the model's "
                         f"{positions}: lower data.max_prompt_tokens to at most {positions - encoder.image_seq_length}")
    if cfg.data.max_target_tokens > positions:
        raise ConfigError(f"data.max_target_tokens={cfg.data.max_target_tokens} is more than the model's {positions} "
                         "decoder positions")


def check_export(cfg: TrainConfig, model) -> None:
    """Refuse before training an end-of-run export that could not be written: a native export of a model whose
    original-layout ``final_logits_bias`` is non-zero (the native class has no place for it)."""
    bias = getattr(model, "final_logits_bias", None)
    if cfg.export_at_end and cfg.export_layout == "native" and bias is not None:
        if bool(jax.numpy.any(bias.get_value() != 0)):
            raise ConfigError(f"{cfg.model.name_or_path} adds a non-zero final_logits_bias to its logits (original "
                             "layout), which a native export cannot keep: set --config.export_layout=original")


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


def evaluate_only(cfg: TrainConfig, workdir: str | None = None, model: str | None = None) -> dict[str, Any]:
    """Score a run's latest checkpoint or a model directory/Hub id on the config's validation split."""
    workdir_path = Path(workdir).absolute() if workdir else Path(os.getcwd()) / "eval_workdir"
    setup_runtime(cfg)
    if model:
        cfg.model.name_or_path = model
    processor = get_processor(cfg, workdir_path)
    pipes = build_pipelines(cfg, processor, get_datasets(cfg, workdir_path))
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    # An exported model already holds its added tokens' (trained) rows and merged adapters.
    model_cfg = dataclasses.replace(cfg.model, add_tokens=()) if model else cfg.model
    net = create_model(model_cfg, mesh, tokenizer=processor.tokenizer, seed=cfg.seed,
                       min_shard_size=cfg.mesh.fsdp_min_size, lora=None if model else cfg.lora)
    check_lengths(cfg, net, pipes)
    fns, state, _ = init_train_state(net, cfg.optim, 1, mesh, min_shard_size=cfg.mesh.fsdp_min_size,
                                     pixel_table=pipes.pixel_table)
    step = 0
    if workdir and not model:
        ckpt = Checkpointer(workdir_path / "checkpoints", keep=cfg.keep_checkpoints)
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {workdir_path / 'checkpoints'}")
        state, _, _ = ckpt.restore(step, abstract_like(state))
        ckpt.close()
    bsh = batch_sharding(mesh)
    eval_step = jit_eval_step(fns, state, bsh)
    evaluator = pipes.evaluator(lambda pipe, metric: Evaluator(
        pipe, net, processor.tokenizer, batch_sharding=bsh, eval_step=eval_step, num_beams=cfg.eval.num_beams,
        max_new_tokens=cfg.eval.max_new_tokens, threshold=cfg.eval.anls_threshold, metric=metric))
    from florence_jax.generation_config import describe_settings

    log.warning("evaluation generates with %s", describe_settings(net, cfg.eval.num_beams, cfg.eval.max_new_tokens))
    res = evaluator(state.params, state.rest, progress=True)
    return {**res.record(step, None), "samples": res.samples}
