"""A run's setup: runtime, processor, datasets, input pipelines, the vision-feature cache, start-up checks of
the model against the data and config, and the end-of-run export.

``train.loop.run`` (training) and ``train.evaluate.evaluate_only`` (``python -m train.evaluate``) build their
run from these; ``scripts/export.py`` and ``scripts/prepare_data.py`` reuse them.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax

from train.config import PIXEL_DTYPE, ConfigError, MixtureComponent, TrainConfig


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
        from florence_jax.tiny_processor import build_tiny_processor

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


SYNTHETIC_SOURCES = ("synthetic", "synthetic_detection", "synthetic_long")


def _synthetic_sources(cfg: TrainConfig, workdir: Path, kind: str = "synthetic"):
    """The generated train/validation set (``synthetic`` documents and ``synthetic_long`` JSON forms as parquet,
    ``synthetic_detection`` shapes as COCO JSON), written once by process 0 into ``workdir/data``."""
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
    from florence_jax.sources import SourceError
    from train.data.sources import SourceSpec, open_source
    from train.data.templates import ConfiguredTemplate

    out = []
    for c in cfg.data.mixture:
        where = f"config.data.mixture[{c.name}]" if c.name else "config.data"
        template = ConfiguredTemplate(c.template, c.columns, c.prompt_prefix)
        if c.source in SYNTHETIC_SOURCES:
            train, val = _synthetic_sources(cfg, workdir, c.source)
        else:
            image = template.column("image")  # JSONL: relative image paths resolve in this column
            train = open_source(SourceSpec(path=c.source, kind=c.format, split=c.train_split, name=c.subset,
                                           image_column=image, image_root=c.image_root, split_must_exist=True))
            val = None
            if c.eval_split is not None:
                # Validation from the training source must be a split of its own (a one-split file's "validation"
                # would be its training records); a separate eval_source is its own split whatever the name.
                try:
                    val = open_source(SourceSpec(
                        path=c.eval_source or c.source, kind=c.format, split=c.eval_split, name=c.subset,
                        image_column=image, image_root=c.eval_image_root if c.eval_source else c.image_root,
                        split_must_exist=c.eval_source is None))
                except SourceError as e:
                    if c.eval_source is not None:
                        raise
                    raise ConfigError(
                        f"{where}.eval_split={c.eval_split!r}: {e}. Set {where}.eval_source to the validation "
                        f"data, or hold out part of the training data ({where}.train_split='train[:-500]' and "
                        f"{where}.eval_split='train[-500:]')") from None
        template.check_columns(train, where)
        if val is not None:
            template.check_columns(val, where)
        val = None if c.eval_split is None else template.prepare(val)
        out.append(RunDataset(c, template, template.prepare(train), val))
    return out


def check_training_records(pipes: RunPipelines, probe: int = 16) -> None:
    """Read the first ``probe`` training records of each dataset before anything compiles. When none of them
    can be used (image paths relative to another folder, the wrong image column), stop now and name them, rather
    than after the compile, when the training loop has skipped two epochs' worth. Raises ``ConfigError``."""
    import collections

    for d, pipe in zip(pipes.datasets, pipes.train_pipes, strict=True):
        n = min(probe, len(pipe.source))
        problems = []
        for i in range(n):
            problem = pipe.encoder.problem(i)
            if problem is None:
                break
            problems.append((i, problem))
        else:
            where = f"config.data.mixture[{d.name}]" if d.name else "config.data"
            reasons = collections.Counter(p.reason for _, p in problems)
            raise ConfigError(
                f"{where}: none of the first {n} training records can be used ({dict(reasons)}); for example "
                + "; ".join(f"record {i}: {p}" for i, p in problems[:3]))


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
        pixel_dtype=PIXEL_DTYPE, image_layout=pipeline_image_layout(cfg),
    ), eval_bs // n


def pipeline_image_layout(cfg: TrainConfig) -> str:
    """The layout pixel batches travel in: the model's hardware formulation (``Formulations.pixel_layout``),
    4x4 blocks of 48 channels on a TPU, the image elsewhere."""
    from florence_jax import hardware
    from florence_jax.processing import IMAGE_LAYOUTS

    return IMAGE_LAYOUTS[hardware.resolve(cfg.model.hardware).pixel_layout]


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



def build_pipelines(cfg: TrainConfig, processor, datasets: list[RunDataset]) -> RunPipelines:
    trains, vals = [], []
    for d in datasets:
        if d.component.max_eval_examples:
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


def _template_id(template) -> str:
    if isinstance(template, str):
        return template
    return f"{getattr(template, 'name', type(template).__name__)}:{getattr(template, 'renames', '')}"


def use_feature_cache(cfg: TrainConfig, fns, pipes, model, workdir: Path) -> None:
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


def check_lengths(cfg: TrainConfig, model, pipes: RunPipelines) -> None:
    """The static text lengths fit the model's learned positions (past them a position lookup has no row and
    the loss turns to NaN without a word)."""
    positions = model.config.text_config.max_position_embeddings
    encoder = pipes.train_pipes[0].encoder
    if encoder.prompt_length > positions:
        raise ConfigError(f"the encoder input is {encoder.image_seq_length} image tokens + data.max_prompt_tokens="
                         f"{cfg.data.max_prompt_tokens} = {encoder.prompt_length} positions, more than the model's "
                         f"{positions}: lower data.max_prompt_tokens to at most {positions - encoder.image_seq_length}, "
                         f"or grow the positions with --config.model.max_positions={encoder.prompt_length}")
    if cfg.data.max_target_tokens > positions:
        raise ConfigError(f"data.max_target_tokens={cfg.data.max_target_tokens} is more than the model's {positions} "
                         "decoder positions: grow them with --config.model.max_positions="
                         f"{cfg.data.max_target_tokens} (florence_jax/positions.py) or lower data.max_target_tokens")


def structured_output_warnings(cfg: TrainConfig, model) -> list[str]:
    """One warning per evaluated dataset whose template gives structured answers (boxes, JSON: the templates of
    ``train.data.templates.STRUCTURED_TEMPLATES``) while evaluation bans repeated n-grams
    (``config.eval.no_repeat_ngram_size``, by default the checkpoint's: 3 in the published Florence-2)."""
    from florence_jax.generation_config import structured_output_warning
    from train.data.templates import STRUCTURED_TEMPLATES

    if not cfg.eval.enabled:
        return []
    out = []
    for c in cfg.data.mixture:
        if c.template not in STRUCTURED_TEMPLATES or c.eval_split is None:
            continue
        name = f"dataset {c.name!r}" if c.name else "the dataset"
        what = f"evaluation of {name} (template {c.template!r}, structured answers)"
        warning = structured_output_warning(model, what, cfg.eval.no_repeat_ngram_size)
        if warning:
            out.append(warning.replace("no_repeat_ngram_size=0", "--config.eval.no_repeat_ngram_size=0"))
    return out


def check_export(cfg: TrainConfig, model) -> None:
    """Refuse before training an end-of-run export that could not be written: a native export of a model whose
    original-layout ``final_logits_bias`` is non-zero (the native class has no place for it)."""
    bias = getattr(model, "final_logits_bias", None)
    if cfg.export_at_end and cfg.export_layout == "native" and bias is not None:
        if bool(jax.numpy.any(bias.get_value() != 0)):
            raise ConfigError(f"{cfg.model.name_or_path} adds a non-zero final_logits_bias to its logits (original "
                             "layout), which a native export cannot keep: set --config.export_layout=original")


def check_batch_sizes(cfg: TrainConfig, mesh) -> None:
    """The global batch (each micro-batch) and the evaluation batch split evenly over the mesh's devices."""
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
