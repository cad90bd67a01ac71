"""Every shipped config resolves to the fields it had when tests/data/configs_resolved.json was written, and two of
them, made tiny, take the same first training steps as then (tests/data/first_losses.json).

The goldens were written from the code before the configs were rewritten to derive from one another; a refactor
of ``configs/`` or ``train/config.py`` that changes what any config means fails here. Regenerate them only for a
change that means to alter a config: ``python tests/data/make_config_goldens.py``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "data" / "configs_resolved.json"
LOSSES = ROOT / "tests" / "data" / "first_losses.json"
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.py") if not p.name.startswith("_"))

# Fields a config gained after the golden was written; each is checked by its own test below.
NEW_FIELDS = {"model.preset", "model.hardware", "model.max_positions", "model.position_init",
              "eval.no_repeat_ngram_size", "mesh.shard_optimizer"}


def _plain(value):
    """JSON's view of a value, with paths inside this checkout written relative to it (``<root>/...``)."""
    return json.loads(json.dumps(value).replace(json.dumps(str(ROOT))[1:-1], "<root>"))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def datasets_of(data) -> list[dict]:
    """The run's datasets as a list of components, each with the evaluation limit that applies to it."""
    out = []
    for c in data.mixture:
        d = dataclasses.asdict(c)
        d["max_eval_examples"] = c.max_eval_examples or data.max_eval_examples
        out.append(_plain(d))
    return out


DATASET_FIELDS = ("source", "eval_source", "subset", "format", "image_root", "eval_image_root", "train_split",
                  "eval_split", "template", "columns", "prompt_prefix", "metric", "mixture")  # before: under data


def resolved(name: str) -> dict:
    """A config's fields as train.main loads it: flattened, the dataset normalised to its list of components."""
    from train.config import load_config

    cfg = load_config(name)
    flat = _flat(_plain(cfg.to_dict()))
    for f in DATASET_FIELDS:
        flat.pop(f"data.{f}", None)
    flat["data.datasets"] = datasets_of(cfg.data)
    return flat


@pytest.mark.parametrize("name", CONFIGS)
def test_config_resolves_as_before(name):
    golden = json.loads(GOLDEN.read_text())
    assert name in golden, f"{name} is not in {GOLDEN.name}: a new config needs its golden entry"
    now = {k: v for k, v in resolved(name).items() if k not in NEW_FIELDS}
    want = golden[name]
    assert sorted(now) == sorted(want)
    diff = {k: (want[k], now[k]) for k in want if want[k] != now[k]}
    assert not diff, diff


@pytest.mark.parametrize("name", CONFIGS)
def test_the_model_preset_is_the_checkpoints_architecture(name):
    """model.preset (what scripts/aot.py compiles for) names the architecture of the config's checkpoint."""
    from train.config import load_config

    model = load_config(name).model
    if Path(model.name_or_path).is_dir():  # the shipped reader: the tiny preset's widths
        fc = json.loads((Path(model.name_or_path) / "config.json").read_text())
        assert model.preset == "tiny" and fc["text_config"]["d_model"] == 128
    else:
        assert model.preset == ("large" if "-large" in model.name_or_path else "base")


@pytest.mark.parametrize("name", CONFIGS)
def test_the_model_hardware_is_the_accelerator_the_config_is_for(name):
    """model.hardware (florence_jax.hardware) names the device a GPU or TPU config is written for, so its
    formulations and the ahead-of-time memory check are that device's; the CPU demos run on whatever runs them."""
    from florence_jax import hardware
    from train.config import load_config

    spec = load_config(name).model.hardware
    if name.startswith("cpu_"):
        assert spec == ""
        return
    chip = name.split("_")[1]  # gpu_a100..., gpu_h100x8..., tpu_v4_32..., tpu_v5e_16...
    formulations = hardware.resolve(spec)
    assert formulations.platform == name.split("_")[0] and chip.startswith(formulations.device), (name, spec)


@pytest.mark.parametrize("name", CONFIGS)
def test_positions_and_the_ngram_ban_are_the_checkpoints_unless_a_config_says_otherwise(name):
    """model.max_positions, model.position_init and eval.no_repeat_ngram_size: a config that does not set them
    keeps the checkpoint's positions and generation defaults, as before these fields existed."""
    from florence_jax.positions import DEFAULT_POSITION_INIT
    from train.config import ModelConfig, load_config

    cfg = load_config(name)
    assert ModelConfig().position_init == DEFAULT_POSITION_INIT
    source = (ROOT / "configs" / name).read_text()
    if "max_positions" not in source:
        assert cfg.model.max_positions == 0 and cfg.model.position_init == DEFAULT_POSITION_INIT
    if "no_repeat_ngram_size" not in source:
        assert cfg.eval.no_repeat_ngram_size is None


@pytest.mark.parametrize("name", CONFIGS)
def test_no_config_splits_the_optimizer_yet(name):
    """mesh.shard_optimizer (ZeRO-1) is off in every shipped config: the all-gather it adds has no compiler
    estimate and has not been measured on a chip (docs/scale-out.md)."""
    assert resolved(name)["mesh.shard_optimizer"] is False


def test_every_golden_config_still_exists():
    assert sorted(json.loads(GOLDEN.read_text())) == CONFIGS


# ------------------------------------------------------------------------------------------ first losses
TINY = ["--config.max_steps=3", "--config.log_every_steps=1", "--config.eval.enabled=false",
        "--config.eval_at_start=false", "--config.export_at_end=false", "--config.checkpoint_every_steps=0",
        "--config.compilation_cache_dir=none", "--config.batch_size=8", "--config.data.num_workers=0",
        "--config.data.synthetic.num_train=48", "--config.data.synthetic.num_val=8",
        "--config.data.synthetic.image_size=64", "--config.data.image_size=64"]


def loss_runs() -> dict[str, list[str]]:
    from florence_jax.assets import TINY_READER

    # gpu_a100.py on the shipped reader and generated documents: its optimizer, schedule, frozen tower, template
    # and lengths at the reader's size, float32 and plain attention on the CPU.
    gpu = ["--config.data.source=synthetic", f"--config.model.name_or_path={TINY_READER}",
           "--config.model.dtype=float32", "--config.model.attention_impl=xla", "--config.data.max_prompt_tokens=24",
           "--config.data.max_target_tokens=8", "--config.optim.learning_rate=1e-3"]
    return {"cpu_demo.py": ["--config", "cpu_demo.py", *TINY],
            "gpu_a100.py": ["--config", "gpu_a100.py", *TINY, *gpu]}


def first_losses(argv: list[str], workdir: Path) -> list[float]:
    from train.main import main

    assert main([*argv, "--workdir", str(workdir)]) == 0
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in sorted(rows, key=lambda r: r["step"])]


@pytest.mark.parametrize("name", ["cpu_demo.py", "gpu_a100.py"])
def test_first_losses_as_before(name, tmp_path):
    want = json.loads(LOSSES.read_text())[name]
    got = first_losses(loss_runs()[name], tmp_path)
    assert len(got) == len(want) == 3
    assert got == pytest.approx(want, rel=1e-5, abs=0), (got, want)
    assert got[2] != pytest.approx(got[0], rel=1e-4)  # the steps moved the model: the later losses test the optimizer


@pytest.mark.parametrize("name", CONFIGS)
def test_no_config_restates_a_default(name):
    """A config section built in a file (TrainConfig(...), OptimConfig(...), ...) sets only what differs from the
    default; a variant states only what differs from the config it derives from (dataclasses.replace)."""
    import ast

    import train.config as C

    sections = {n: c for n, c in vars(C).items() if isinstance(c, type) and dataclasses.is_dataclass(c)}
    restated = []
    for node in ast.walk(ast.parse((ROOT / "configs" / name).read_text())):
        if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) in sections):
            continue
        defaults = {f.name: f.default for f in dataclasses.fields(sections[node.func.id])}
        for kw in node.keywords:
            try:
                value = ast.literal_eval(kw.value)
            except ValueError:
                continue
            if defaults.get(kw.arg, dataclasses.MISSING) == value:
                restated.append(f"{node.func.id}({kw.arg}={value!r})")
    assert not restated
