"""Typed training configuration, config-file loading and type-checked ``--config.a.b=value`` overrides.

A config file is a Python module with ``get_config() -> TrainConfig``. ``load_config("gpu_a100.py")``
resolves a bare name against ``configs/``. Overrides are parsed against each field's declared type, so a
typo or a bad value fails before anything is compiled.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from train.data import MAX_PROMPT_TOKENS, MAX_TARGET_TOKENS
from train.errors import ConfigError as ConfigError  # where users of the config look for it

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class SyntheticConfig:
    """The locally generated document-question set (used when ``data.source == "synthetic"``)."""

    num_train: int = 2000
    num_val: int = 200
    image_size: int = 128
    seed: int = 0


@dataclass
class MixtureComponent:
    """One dataset of a run: its source, template, metric and (in a mixture of several) sampling weight.

    Every run trains on ``data.mixture``; a single-dataset run is a mixture of one whose ``name`` is empty (its
    evaluation keys are then plain: ``anls``, not ``anls/<name>``). ``name`` labels the evaluation keys and
    counters of a named dataset; ``weight`` is relative (normalized over the mixture); ``eval_split`` None trains
    on it without evaluating it. Override a field from the command line by position or name:
    ``--config.data.mixture.chartqa.weight=0.3``; a run of one dataset also takes ``--config.data.source=...``
    (and each other field here) for its only dataset.
    """

    name: str = ""
    # A Hub dataset id (e.g. "HuggingFaceM4/DocumentVQA"), a local parquet/arrow/JSONL file or glob,
    # a `datasets.save_to_disk` folder, a COCO detection JSON, "synthetic", "synthetic_detection" or "synthetic_long".
    source: str = "synthetic"
    subset: str | None = None  # Hub config name (a subset such as "chartqa" of HuggingFaceM4/the_cauldron)
    # Validation data when it is another file/folder (local data); None: `source` at `eval_split`.
    eval_source: str | None = None
    format: str | None = None  # source kind (hub, parquet, arrow, disk, jsonl, coco, prepared); None: detected
    image_root: str | None = None  # folder of a COCO JSON's images (None: the JSON's folder)
    eval_image_root: str | None = None  # the same for eval_source
    # Splits may carry a slice, e.g. train_split="train[:-500]", eval_split="train[-500:]".
    train_split: str = "train"
    eval_split: str | None = "validation"
    template: str = "docvqa"  # record -> (prompt, target, references); see train/data/templates.py
    # "template_field=dataset_column" renames, e.g. ("question=query", "answers=label"); or with the `mapped`
    # template ("prompt=query", "target=label", "image=img").
    columns: tuple[str, ...] = ()
    prompt_prefix: str = ""  # put before every prompt, e.g. a task token "<VQA>"
    weight: float = 1.0
    # evaluation metric (train/metrics.py METRICS): anls, exact_match, relaxed_accuracy, cer, map (COCO box mAP
    # of the generations decoded into boxes; templates od, phrase_grounding)
    metric: str = "anls"
    max_eval_examples: int = 0  # 0: data.max_eval_examples


@dataclass
class DataConfig:
    """Where examples come from (``mixture``: one dataset or several) and how they become static-shape batches."""

    mixture: tuple[MixtureComponent, ...] = field(default_factory=lambda: (MixtureComponent(),))
    image_size: int = 768
    max_prompt_tokens: int = MAX_PROMPT_TOKENS
    max_target_tokens: int = MAX_TARGET_TOKENS
    num_workers: int = 0  # grain worker processes for decode + resize (0: in the main process)
    max_eval_examples: int = 0  # 0: the whole validation split (of each dataset without its own limit)
    # Frozen vision tower only: compute its features once per training record (cached in the workdir)
    # and train on them instead of pixels; no stochastic depth in the frozen tower, no image augmentation.
    cache_vision_features: bool = False
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    @property
    def mixed(self) -> bool:
        """Several datasets (or one named one): evaluation keys and counters carry each dataset's name."""
        return len(self.mixture) > 1 or bool(self.mixture and self.mixture[0].name)


# The dtype training's pixel batches travel in: the resized uint8 image, a quarter of float32's bytes through
# data workers, batching and host-to-device copies, and no normalization on the host (about 9 ms of a
# worker's time per 768 px image); the step normalizes it on the device with the processor's table, bit for
# bit the host's float32 pixels (florence_jax.processing.normalize_pixels), whatever the model's dtype.
PIXEL_DTYPE = "uint8"


@dataclass
class ModelConfig:
    # A Hub id or local directory; or "random:<preset>" (tiny, base, large) for a randomly initialised model.
    name_or_path: str = "florence-community/Florence-2-base-ft"
    # The architecture name_or_path holds (tiny, base, large): what a model built without reading its weights
    # has (scripts/aot.py compiles the step for it); a "random:<preset>" model's must be the same.
    preset: str = "base"
    revision: str | None = None
    processor: str | None = None  # defaults to name_or_path
    dtype: str = "bfloat16"  # compute dtype
    param_dtype: str = "float32"  # master weights
    # "xla" (einsums around a float32 softmax) or "dot_product" (jax.nn.dot_product_attention with its default
    # implementation, which in this jax is XLA's own attention on every backend: cuDNN's fused kernel only
    # when asked for by name, which nothing here does yet)
    attention_impl: str = "xla"
    remat_policy: str = "none"  # "none", "full", "dots"
    # a vision stage's blocks as one lax.scan where the hardware's formulation scans (the CPU's and TPU's;
    # hardware vision_stages=unrolled, the GPU's default, does not); False unrolls everywhere
    scan_vision_blocks: bool = True
    # The hardware the programs are built for: "cpu", "gpu", "tpu", or "" for the backend that runs them;
    # ":name=value,..." changes single formulations (florence_jax.hardware), e.g. "gpu:depthwise_conv=grouped".
    hardware: str = ""
    dropout: float | None = None  # override the text model's dropout, attention and activation dropout
    drop_path_rate: float | None = None  # override the vision tower's stochastic depth
    # New tokens (e.g. "<MY_TASK>") added to the tokenizer; the embedding grows, new rows start at the mean.
    add_tokens: tuple[str, ...] = ()
    # Learned positions of the BART encoder (image tokens + prompt) and decoder (target), both: config.json has
    # one max_position_embeddings for the two. 0 keeps the checkpoint's (1,024 for base); more grows both tables
    # at load, the checkpoint's rows kept bit for bit and the new ones made by position_init ("tile",
    # "interpolate", "copy", "random"; florence_jax/positions.py); fewer than the checkpoint's changes nothing.
    # A random:<preset> model is built with this many. The export's config.json carries the new count.
    max_positions: int = 0
    position_init: str = "random"  # florence_jax.positions.DEFAULT_POSITION_INIT (this module stays free of jax)


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


# Default LoRA targets: every attention projection and MLP of BART (encoder self-attention, decoder
# self- and cross-attention). Patterns are re.search'ed over module paths; end them with "$".
LORA_TEXT_TARGETS = (r"^model\.language_model\..*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)$",)


@dataclass
class LoRAConfig:
    """Low-rank adapters (y = xW + b + alpha/rank * dropout(x) A B); only adapters train when enabled."""

    enabled: bool = False
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    # Regexes over module paths such as "model.language_model.decoder.layers.0.self_attn.q_proj",
    # "model.vision_tower.blocks.0.0.spatial_block.window_attn.qkv", or "lm_head" (the tied LM head).
    targets: tuple[str, ...] = LORA_TEXT_TARGETS
    export: str = "merged"  # end-of-run export: "merged" (full model), "adapter" (peft directory), "both"


@dataclass
class MeshConfig:
    data: int = -1  # -1: all devices not used by the other axes
    fsdp: int = 1
    fsdp_min_size: int = 2**18  # parameters smaller than this stay replicated
    # ZeRO-1: Adam's moments and the update of each trained parameter (of at least fsdp_min_size) split over
    # `data` as well, the parameters kept as stored; each device updates its share and the updated
    # parameters are all-gathered. Divides the optimizer's work and moments by `data` (docs/scale-out.md).
    shard_optimizer: bool = False


@dataclass
class EvalConfig:
    enabled: bool = True  # false: no validation during training (checkpoints: the last K only)
    num_beams: int = 3
    max_new_tokens: int = 64
    # Bans any n-gram from occurring twice in a generation. None: the checkpoint's generation config (3 in the
    # published Florence-2, which breaks JSON, tables and other structured answers whose n-grams legitimately
    # repeat; a run evaluating a structured template with it on is warned at start). 0 turns it off.
    no_repeat_ngram_size: int | None = None
    batch_size: int = 0  # 0: same as training batch_size
    num_print: int = 4  # validation answers printed before and after training
    anls_threshold: float = 0.5


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
    keep_checkpoints: int = 2  # the last K, plus the best by the evaluation score (data.metric)
    export_at_end: bool = True
    # Layout of the end-of-run export: "native" (transformers' Florence2ForConditionalGeneration) or "original"
    # (the microsoft/Florence-2-* remote-code layout, for tools that still load it; see README).
    export_layout: str = "native"
    # The Hub repo whose remote code an "original" export's auto_map names; None: the checkpoint's own repo when
    # it is a microsoft/Florence-2-* id, else microsoft/Florence-2-base or -large by model size.
    export_code_repo: str | None = None
    push_to_hub: str | None = None
    compilation_cache_dir: str | None = "~/.cache/florence_jax/jax_cache"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
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
    dotted = _dataset_alias(cfg, dotted)
    obj: Any = cfg
    parts = dotted.split(".")
    i = 0
    while i < len(parts):
        name = parts[i]
        if isinstance(obj, tuple | list):  # a tuple of sections (data.mixture): pick one by position or name
            obj = _pick_element(obj, name, ".".join(parts[:i]))
            i += 1
            if i == len(parts):
                raise ValueError(f"override {dotted!r} names a whole entry; set one of its fields, e.g. "
                                 f"{dotted}.weight=...")
            continue
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
            if not dataclasses.is_dataclass(obj) and not (
                isinstance(obj, tuple | list) and obj and all(dataclasses.is_dataclass(x) for x in obj)
            ):
                raise ValueError(f"config field {'.'.join(parts[: i + 1])!r} is not a section")
        i += 1


_DATASET_FIELDS = tuple(f.name for f in dataclasses.fields(MixtureComponent))


def _dataset_alias(cfg: TrainConfig, dotted: str) -> str:
    """``data.source`` (any dataset field under ``data``) means the run's only dataset: ``data.mixture.0.source``.
    A run of several datasets is told to name the one it means."""
    parts = dotted.split(".")
    if len(parts) != 2 or parts[0] != "data" or parts[1] not in _DATASET_FIELDS or parts[1] == "max_eval_examples":
        return dotted
    mixture = cfg.data.mixture
    if len(mixture) == 1:
        return f"data.mixture.0.{parts[1]}"
    names = [c.name for c in mixture]
    raise ValueError(f"config.{dotted} names a field of one dataset, and this run mixes {len(mixture)} {names}: set "
                     f"it on the one you mean, e.g. --config.data.mixture.{names[0]}.{parts[1]}=...")


def _pick_element(items: tuple | list, key: str, where: str) -> Any:
    if key.isdigit() and int(key) < len(items):
        return items[int(key)]
    for item in items:
        if getattr(item, "name", None) == key:
            return item
    names = [getattr(x, "name", None) for x in items]
    raise ValueError(f"config.{where} has no entry {key!r}: use a position 0..{len(items) - 1} or a name in {names}")


def _literal(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return _NOT_A_LITERAL


_NOT_A_LITERAL = object()


def parse_value(raw: str, hint: Any, name: str = "value") -> Any:
    """A command-line value for a field of type ``hint``, read as a user means it.

    Python literals are read as Python reads them: ``("a", "b")`` or ``["a"]`` for a tuple field, ``'x'`` or
    ``"x"`` for a string (quotes removed), ``1e-3``, ``True``/``true``. A tuple field also takes bare
    comma-separated items (``question=query,answers=label``), and an empty value is the empty tuple; a regex
    with a comma or parentheses in it needs the literal form (``("^model\\.(a|b)",)``). A bare string is the
    string as typed. ``none``/``null``/``None`` is None where the field allows it.
    """
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    raw_stripped = raw.strip()
    if origin in (typing.Union, types.UnionType):
        if raw_stripped.lower() in ("none", "null") and type(None) in args:
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
        item_type = args[0] if args else str
        if raw_stripped.startswith(("(", "[")):
            value = _literal(raw_stripped)
            if not isinstance(value, tuple | list):
                raise ValueError(f"bad value {raw!r} for {name}: expected a Python tuple such as ('a', 'b') "
                                 "(quote each item; a one-item tuple needs its comma: ('a',))")
            return tuple(_check_item(v, item_type, name, raw) for v in value)
        if not raw_stripped:
            return ()
        return tuple(parse_value(x.strip(), item_type, name) for x in raw.split(","))
    if hint is bool:
        if raw_stripped.lower() in ("true", "1", "yes"):
            return True
        if raw_stripped.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"bad value {raw!r} for {name}: expected true or false")
    if hint is int:
        try:
            return int(raw_stripped)
        except ValueError:
            value = _literal(raw_stripped)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            raise ValueError(f"bad value {raw!r} for {name}: expected an integer") from None
    if hint is float:
        try:
            return float(raw_stripped)
        except ValueError:
            value = _literal(raw_stripped)
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            raise ValueError(f"bad value {raw!r} for {name}: expected a number") from None
    if hint is str:
        if len(raw_stripped) >= 2 and raw_stripped[0] == raw_stripped[-1] and raw_stripped[0] in "'\"":
            value = _literal(raw_stripped)
            if isinstance(value, str):
                return value
        return raw
    raise ValueError(f"cannot override {name} of type {hint}")


def _check_item(value: Any, item_type: Any, name: str, raw: str) -> Any:
    if item_type is str and isinstance(value, str):
        return value
    if item_type in (int, float) and isinstance(value, int | float) and not isinstance(value, bool):
        return item_type(value)
    raise ValueError(f"bad value {raw!r} for {name}: {value!r} is not a {getattr(item_type, '__name__', item_type)}")


CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.preset": ("tiny", "base", "large"),
    "model.attention_impl": ("xla", "dot_product"),
    "model.remat_policy": ("none", "full", "dots"),
    "optim.schedule": ("linear", "cosine", "constant"),
    "lora.export": ("merged", "adapter", "both"),
}


def validate(cfg: TrainConfig) -> None:
    """Cross-field checks with messages that say what to change."""
    for dotted, choices in CHOICES.items():
        section, name = dotted.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ValueError(f"config.{dotted}={value!r}; expected one of {choices}")
    name = cfg.model.name_or_path
    if name.startswith("random:") and name.split(":", 1)[1] != cfg.model.preset:
        raise ValueError(f"config.model.name_or_path={name!r} initialises the {name.split(':', 1)[1]!r} preset, but "
                         f"config.model.preset={cfg.model.preset!r}: set --config.model.preset="
                         f"{name.split(':', 1)[1]}")
    if cfg.model.max_positions < 0:
        raise ValueError(f"config.model.max_positions must be >= 0 (0: the checkpoint's), got {cfg.model.max_positions}")
    from florence_jax.positions import POSITION_INITS

    if cfg.model.position_init not in POSITION_INITS:
        raise ValueError(f"config.model.position_init={cfg.model.position_init!r}; expected one of {POSITION_INITS}")
    if cfg.export_layout not in ("native", "original"):
        raise ValueError(f"config.export_layout={cfg.export_layout!r}; expected one of ('native', 'original')")
    if cfg.export_layout == "original" and cfg.lora.enabled and cfg.lora.export != "merged":
        raise ValueError("config.export_layout='original' writes a full model: set config.lora.export=merged "
                         "(a peft adapter has no original layout)")
    positive = {"batch_size": cfg.batch_size, "grad_accum_steps": cfg.grad_accum_steps,
                "eval.num_beams": cfg.eval.num_beams, "eval.max_new_tokens": cfg.eval.max_new_tokens,
                "data.image_size": cfg.data.image_size, "data.max_target_tokens": cfg.data.max_target_tokens}
    for name, v in positive.items():
        if v <= 0:
            raise ValueError(f"config.{name} must be positive, got {v}")
    if cfg.eval.no_repeat_ngram_size is not None and cfg.eval.no_repeat_ngram_size < 0:
        raise ValueError(f"config.eval.no_repeat_ngram_size must be >= 0 (0: off; None: the checkpoint's), got "
                         f"{cfg.eval.no_repeat_ngram_size}")
    for name in ("max_steps", "checkpoint_every_steps", "eval_every_steps", "num_epochs"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"config.{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.max_steps == 0 and cfg.num_epochs == 0:
        raise ValueError("config.max_steps and config.num_epochs are both 0: nothing to train")
    if cfg.optim.learning_rate <= 0:
        raise ValueError(f"config.optim.learning_rate must be positive, got {cfg.optim.learning_rate}")
    for name in ("warmup_steps", "max_grad_norm", "weight_decay", "eps"):
        if getattr(cfg.optim, name) < 0:
            raise ValueError(f"config.optim.{name} must be >= 0, got {getattr(cfg.optim, name)}"
                             + (" (0: no clipping)" if name == "max_grad_norm" else ""))
    for name in ("b1", "b2"):
        if not 0 <= getattr(cfg.optim, name) < 1:
            raise ValueError(f"config.optim.{name} must be in [0, 1), got {getattr(cfg.optim, name)}")
    for name in ("max_prompt_tokens", "max_target_tokens"):
        if getattr(cfg.data, name) < 2:
            raise ValueError(f"config.data.{name} must be at least 2 (room for <s> and </s>), got "
                             f"{getattr(cfg.data, name)}")
    for pattern in cfg.optim.freeze:
        check_regex(pattern, "config.optim.freeze")
    if cfg.lora.enabled:
        if cfg.lora.rank <= 0:
            raise ValueError(f"config.lora.rank must be positive, got {cfg.lora.rank}")
        if not 0.0 <= cfg.lora.dropout < 1.0:
            raise ValueError(f"config.lora.dropout must be in [0, 1), got {cfg.lora.dropout}")
        if not cfg.lora.targets:
            raise ValueError("config.lora.targets is empty: give regexes over module paths to adapt")
        for t in cfg.lora.targets:
            check_regex(t, "config.lora.targets")
        import re

        if cfg.lora.export != "adapter" and any(re.search(t, "lm_head") for t in cfg.lora.targets):
            raise ValueError("config.lora.targets adapts lm_head, whose adapter cannot be merged into the tied "
                             "embedding: set config.lora.export=adapter or drop lm_head from the targets")
    validate_data(cfg.data)


def check_regex(pattern: str, where: str) -> None:
    """A regex over parameter or module paths: it compiles and is not empty (an empty one matches every path)."""
    import re

    if not pattern:
        raise ValueError(f"{where}: an empty pattern matches every path; remove it (or give the paths to match)")
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{where}: bad regex {pattern!r}: {e}") from None


def validate_data(d: DataConfig) -> None:
    """Templates, metrics and column renames exist; datasets are complete and weighted, and named when several."""
    from train.data.sources import KINDS
    from train.data.templates import BOX_TEMPLATES, parse_columns, template_names
    from train.metrics import METRICS

    def check(where: str, template: str, metric: str, columns: tuple[str, ...], fmt: str | None = None) -> None:
        if template not in template_names():
            raise ValueError(f"config.{where}.template={template!r}; registered templates: {template_names()}")
        if metric not in METRICS:
            raise ValueError(f"config.{where}.metric={metric!r}; registered metrics: {sorted(METRICS)}")
        if metric == "map" and template not in BOX_TEMPLATES:
            raise ValueError(f"config.{where}.metric='map' scores boxes, but template {template!r} gives none; use a "
                             f"box template ({sorted(BOX_TEMPLATES)}) or another metric")
        if fmt is not None and fmt not in KINDS:
            raise ValueError(f"config.{where}.format={fmt!r}; expected one of {KINDS} or None (detect)")
        try:
            parse_columns(columns, template)
        except ValueError as e:
            raise ValueError(f"config.{where}.columns: {e}") from None

    if not d.mixture:
        raise ValueError("config.data.mixture is empty: give the run at least one dataset")
    names = [c.name for c in d.mixture]
    for i, c in enumerate(d.mixture):
        where = f"data.mixture[{i}]" if d.mixed else "data"
        if not isinstance(c, MixtureComponent):
            raise ValueError(f"config.{where} is a {type(c).__name__}, expected MixtureComponent")
        if not d.mixed:
            check(where, c.template, c.metric, c.columns, c.format)
            if c.eval_split is None:
                raise ValueError("config.data.eval_split is None: a run of one dataset evaluates it")
            continue
        if not c.name or not all(ch.isalnum() or ch in "_-." for ch in c.name):
            raise ValueError(f"config.{where}.name={c.name!r}: give it a name of letters, digits, _ - . "
                             "(it labels the evaluation keys, e.g. anls/<name>)")
        if names.count(c.name) > 1:
            raise ValueError(f"config.data.mixture: name {c.name!r} is used twice")
        if not c.source:
            raise ValueError(f"config.{where} ({c.name}): source is empty")
        if not c.weight > 0:
            raise ValueError(f"config.{where} ({c.name}): weight must be positive, got {c.weight}")
        if c.max_eval_examples < 0:
            raise ValueError(f"config.{where} ({c.name}): max_eval_examples must be >= 0")
        check(f"{where} ({c.name})", c.template, c.metric, c.columns, c.format)
    if all(c.eval_split is None for c in d.mixture):
        raise ValueError("config.data.mixture: every component has eval_split=None; evaluate at least one")
