"""Typed training configuration, config-file loading and type-checked ``--config.a.b=value`` overrides.

A config file is a Python module with ``get_config() -> TrainConfig``. ``load_config("gpu_a100.py")``
resolves a bare name against ``configs/``. Overrides are parsed against each field's declared type, so a
typo or a bad value fails before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class SyntheticConfig:
    """The locally generated document-question set (used when ``data.source == "synthetic"``)."""

    num_train: int = 2000
    num_val: int = 200
    image_size: int = 128
    seed: int = 0


@dataclass
class DataConfig:
    """Where examples come from and how they become static-shape batches."""

    # A Hub dataset id (e.g. "HuggingFaceM4/DocumentVQA"), a local parquet/arrow/JSONL file or glob,
    # a `datasets.save_to_disk` folder, a COCO detection JSON, "synthetic" or "synthetic_detection".
    source: str = "synthetic"
    # Validation data when it is another file/folder (local data); None: `source` at `eval_split`.
    eval_source: str | None = None
    format: str | None = None  # source kind (hub, parquet, arrow, disk, jsonl, coco); None: detected
    image_root: str | None = None  # folder of a COCO JSON's images (None: the JSON's folder)
    eval_image_root: str | None = None  # the same for eval_source
    train_split: str = "train"
    eval_split: str = "validation"
    template: str = "docvqa"  # record -> (prompt, target, references)
    image_size: int = 768
    max_prompt_tokens: int = 64  # text tokens after the image tokens (question), truncated and counted
    max_target_tokens: int = 64  # answer tokens incl. eos, truncated and counted
    num_workers: int = 0  # grain worker processes for decode + resize (0: in the main process)
    max_eval_examples: int = 0  # 0: the whole validation split
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    # A Hub id or local directory; or "random:<preset>" (tiny, base, large) for a randomly initialised model.
    name_or_path: str = "florence-community/Florence-2-base-ft"
    revision: str | None = None
    processor: str | None = None  # defaults to name_or_path
    dtype: str = "bfloat16"  # compute dtype
    param_dtype: str = "float32"  # master weights
    attention_impl: str = "xla"  # "xla" or "dot_product" (cuDNN flash attention on GPU)
    remat_policy: str = "none"  # "none", "full", "dots"
    dropout: float | None = None  # override the text model's dropout, attention and activation dropout
    drop_path_rate: float | None = None  # override the vision tower's stochastic depth


@dataclass
class OptimConfig:
    learning_rate: float = 1e-6
    vision_learning_rate: float | None = None  # None: same as learning_rate (when the tower trains)
    schedule: str = "linear"  # "linear" (to 0), "cosine", "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.01  # torch.optim.AdamW's default
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping
    # Regexes over parameter paths (dotted, e.g. "model.vision_tower.convs.0.conv.kernel") held frozen:
    # no gradient, no optimizer moments, bit-identical after training.
    freeze: tuple[str, ...] = (r"^model\.vision_tower\.",)


@dataclass
class MeshConfig:
    data: int = -1  # -1: all devices not used by the other axes
    fsdp: int = 1
    fsdp_min_size: int = 2**18  # parameters smaller than this stay replicated


@dataclass
class EvalConfig:
    num_beams: int = 3
    max_new_tokens: int = 64
    batch_size: int = 0  # 0: same as training batch_size
    num_print: int = 4  # validation answers printed before and after training
    anls_threshold: float = 0.5
    metric: str = "anls"  # "anls" (text answers) or "map" (COCO box mAP; templates od, phrase_grounding)


@dataclass
class DistributedConfig:
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


@dataclass
class TrainConfig:
    seed: int = 0
    max_steps: int = 0  # 0: run every epoch
    num_epochs: int = 7
    batch_size: int = 8  # global batch
    grad_accum_steps: int = 1
    checkpoint_every_steps: int = 500  # 0: only at epoch ends and at the end
    eval_every_steps: int = 0  # 0: at each epoch's end
    eval_at_start: bool = True
    log_every_steps: int = 10
    keep_checkpoints: int = 2  # the last K, plus the best by eval.metric
    export_at_end: bool = True
    push_to_hub: str | None = None
    compilation_cache_dir: str | None = "~/.cache/florence_jax/jax_cache"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# ------------------------------------------------------------------------------------------ loading
def resolve_config_path(name: str) -> Path:
    """``gpu_a100.py``, ``gpu_a100`` or a path; bare names resolve against ``configs/``."""
    p = Path(name)
    if p.exists():
        return p
    for cand in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.py"):
        if cand.exists():
            return cand
    known = sorted(x.name for x in CONFIG_DIR.glob("*.py") if not x.name.startswith("_"))
    raise FileNotFoundError(f"config {name!r} not found (looked in {CONFIG_DIR}); known configs: {known}")


def load_config(name: str, overrides: list[str] | None = None) -> TrainConfig:
    path = resolve_config_path(name)
    spec = importlib.util.spec_from_file_location(f"florence_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"{path} defines no get_config()")
    cfg = module.get_config()
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"{path}: get_config() returned {type(cfg).__name__}, expected TrainConfig")
    for item in overrides or []:
        apply_override(cfg, item)
    validate(cfg)
    return cfg


def apply_override(cfg: TrainConfig, item: str) -> None:
    """Apply ``a.b.c=value`` (the ``--config.`` prefix already stripped) with a type check."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like field.sub=value")
    dotted, raw = item.split("=", 1)
    obj: Any = cfg
    parts = dotted.split(".")
    for i, name in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(obj)}
        if name not in fields:
            where = ".".join(parts[:i]) or "config"
            raise ValueError(f"unknown config field {dotted!r}: {where} has no field {name!r}; "
                             f"known: {sorted(fields)}")
        if i == len(parts) - 1:
            hint = typing.get_type_hints(type(obj))[name]
            setattr(obj, name, parse_value(raw, hint, dotted))
        else:
            obj = getattr(obj, name)
            if not dataclasses.is_dataclass(obj):
                raise ValueError(f"config field {'.'.join(parts[: i + 1])!r} is not a section")


def parse_value(raw: str, hint: Any, name: str = "value") -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return parse_value(raw, a, name)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"bad value {raw!r} for {name}: " + "; ".join(errors))
    if origin is tuple:
        items = [x for x in (raw.strip("()[] ").split(",") if raw.strip("()[] ") else [])]
        return tuple(parse_value(x.strip(), args[0] if args else str, name) for x in items)
    if hint is bool:
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"bad value {raw!r} for {name}: expected true or false")
    if hint is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"bad value {raw!r} for {name}: expected an integer") from None
    if hint is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"bad value {raw!r} for {name}: expected a number") from None
    if hint is str:
        return raw
    raise ValueError(f"cannot override {name} of type {hint}")


CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.attention_impl": ("xla", "dot_product"),
    "model.remat_policy": ("none", "full", "dots"),
    "optim.schedule": ("linear", "cosine", "constant"),
    "eval.metric": ("anls", "map"),
}


def validate(cfg: TrainConfig) -> None:
    """Cross-field checks with messages that say what to change."""
    for dotted, choices in CHOICES.items():
        section, name = dotted.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ValueError(f"config.{dotted}={value!r}; expected one of {choices}")
    positive = {"batch_size": cfg.batch_size, "grad_accum_steps": cfg.grad_accum_steps,
                "eval.num_beams": cfg.eval.num_beams, "eval.max_new_tokens": cfg.eval.max_new_tokens,
                "data.image_size": cfg.data.image_size, "data.max_target_tokens": cfg.data.max_target_tokens}
    for name, v in positive.items():
        if v <= 0:
            raise ValueError(f"config.{name} must be positive, got {v}")
    for name in ("max_steps", "checkpoint_every_steps", "eval_every_steps", "num_epochs"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"config.{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.max_steps == 0 and cfg.num_epochs == 0:
        raise ValueError("config.max_steps and config.num_epochs are both 0: nothing to train")
    if cfg.data.format is not None:
        from train.data.sources import KINDS

        if cfg.data.format not in KINDS:
            raise ValueError(f"config.data.format={cfg.data.format!r}; expected one of {KINDS} or None (detect)")
    if cfg.eval.metric == "map":
        from train.data.templates import BOX_TEMPLATES, template_names

        if cfg.data.template in template_names() and cfg.data.template not in BOX_TEMPLATES:
            raise ValueError(f"config.eval.metric='map' scores boxes, but template {cfg.data.template!r} gives "
                             f"none; use a box template ({sorted(BOX_TEMPLATES)}) or eval.metric='anls'")
    if cfg.optim.learning_rate <= 0:
        raise ValueError(f"config.optim.learning_rate must be positive, got {cfg.optim.learning_rate}")
