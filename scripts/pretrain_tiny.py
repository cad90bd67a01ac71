"""Pretrain the tiny Florence-2 reader that the CPU demo fine-tunes (``florence_jax/assets/tiny_reader``).

    python -m scripts.pretrain_tiny [--workdir runs/pretrain_tiny] [--out florence_jax/assets/tiny_reader]

What it does, all on this machine, no download:

1. builds the reader's tokenizer (a byte-level BPE in BART's layout with Florence-2's added tokens, from
   ``florence_jax.tiny_processor``) over English text plus the words of the scenes and of the fine-tuning
   questions, as a real tokenizer's 50k merges know them;
2. writes generated scenes (``train/data/synthetic_scenes.py``) for three of Florence-2's pretraining tasks:
   ``<CAPTION>``, ``<OD>`` and ``<OCR>``;
3. trains a random-init tiny Florence-2 (``random:tiny``: DaViT 32-64-96-128, BART d=128 with 2+2 layers) on
   the three tasks mixed by weight with ``train.loop.run``: the fine-tuning path itself, so the run checkpoints,
   resumes when rerun, and reports each task's score;
4. writes the final model in bfloat16 with its processor files to ``--out``, in transformers' native layout (what
   ``from_pretrained(directory)`` reads from a Hub snapshot), with a model card (``README.md``) that records the
   scores and the command.

Rerunning the same command resumes an interrupted run; ``--export_only`` rewrites ``--out`` from a finished run.
Measured figures are in the model card and in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "florence_jax" / "assets" / "tiny_reader"
IMAGE_SIZE = 64
VOCAB_SIZE = 800  # merges; the corpus runs out at about this many
TASK_WEIGHTS = {"caption": 0.45, "od": 0.35, "ocr": 0.2}
TASK_MAX_TOKENS = 56  # the longest caption is ~50 tokens


def tokenizer_corpus() -> list[str]:
    """Text the reader's BPE merges are learned from: scene captions and the fine-tuning questions and answers
    (each answer alone too, as the start of a target has no leading space)."""
    from train.data import synthetic, synthetic_scenes

    lines = list(synthetic_scenes.corpus())
    for t in synthetic.TEMPLATES:
        lines += [t.question] * 5 + list(t.values) * 5
    lines += [w.lower() for w in synthetic_scenes.WORDS] + list(synthetic_scenes.WORDS)
    return lines


def build_processor(directory: Path):
    from florence_jax.tiny_processor import build_tiny_processor

    return build_tiny_processor(save_dir=directory, image_size=IMAGE_SIZE, vocab_size=VOCAB_SIZE,
                                corpus=tokenizer_corpus())


@dataclasses.dataclass(frozen=True)
class Phase:
    """One stage of pretraining: its own run directory (``workdir/name``), steps and trainable parts."""

    name: str
    steps: int
    freeze: tuple[str, ...]
    learning_rate: float
    vision_learning_rate: float | None
    warmup_steps: int


# Why two phases (measured on this machine, docs/benchmarks.md): trained end to end from random init, the
# tower's output drifts to a large image-independent constant while the language model learns the captions'
# prior (across-image std of the projected features 0.34 at init, 0.016 after 2,100 steps), and the captions
# stayed the same for every image. With the random tower frozen first, the language side learns to read its
# features (captions differ by image after ~800 steps); then the whole model trains, the tower at a lower rate.
PHASES = (
    Phase("align", 2000, (r"^model\.vision_tower\.",), 1e-3, None, 300),
    Phase("full", 6000, (), 1e-3, 3e-4, 200),
)


def pretrain_config(data_dir: Path, start: str, processor_dir: Path, phase: Phase, batch_size: int, seed: int):
    """One phase's run: ``start`` (``random:tiny`` or the previous phase's export) on the three scene tasks mixed
    by weight, AdamW with cosine decay."""
    from train.config import (
        DataConfig,
        EvalConfig,
        MixtureComponent,
        ModelConfig,
        OptimConfig,
        TrainConfig,
    )

    def component(task: str) -> MixtureComponent:
        if task == "od":
            return MixtureComponent(name=task, source=str(data_dir / "od_train.json"),
                                    eval_source=str(data_dir / "od_validation.json"), template="od",
                                    weight=TASK_WEIGHTS[task], metric="map", max_eval_examples=100)
        return MixtureComponent(name=task, source=str(data_dir / f"{task}_train.parquet"),
                                eval_source=str(data_dir / f"{task}_validation.parquet"), template="mapped",
                                weight=TASK_WEIGHTS[task], metric="anls", max_eval_examples=100)

    return TrainConfig(
        seed=seed,
        max_steps=phase.steps,
        batch_size=batch_size,
        checkpoint_every_steps=250,
        eval_every_steps=1000,
        eval_at_start=False,
        log_every_steps=25,
        keep_checkpoints=2,
        compilation_cache_dir=None,
        data=DataConfig(mixture=tuple(component(t) for t in TASK_WEIGHTS), image_size=IMAGE_SIZE,
                        max_prompt_tokens=24, max_target_tokens=TASK_MAX_TOKENS),
        model=ModelConfig(name_or_path=start, preset="tiny", processor=str(processor_dir), dtype="float32", param_dtype="float32"),
        optim=OptimConfig(learning_rate=phase.learning_rate, vision_learning_rate=phase.vision_learning_rate,
                          schedule="cosine", warmup_steps=phase.warmup_steps, weight_decay=0.05, max_grad_norm=1.0,
                          freeze=phase.freeze),
        eval=EvalConfig(num_beams=1, max_new_tokens=TASK_MAX_TOKENS, batch_size=50, num_print=3),
    )


MODEL_CARD = """\
---
library_name: transformers
tags: [florence-2, florence-jax, synthetic]
---
# florence-2 tiny reader

A {params:,}-parameter Florence-2 (DaViT 32-64-96-128 vision tower, BART with d_model 128 and 2 encoder + 2
decoder layers, {vocab:,}-row vocabulary) pretrained from random init on generated {size}x{size} scenes, stored
in {dtype}. It is the starting point of the florence-jax CPU demo (`configs/cpu_demo.py`), which fine-tunes it
on synthetic document questions as users fine-tune Florence-2-base-ft on DocVQA.

Tasks (Florence-2's own prompts): `<CAPTION>` (the page, a colour band and its side, shapes with colour and
place, bars, a large word), `<OD>` (band, shape and word boxes) and `<OCR>` (the large word), mixed
{weights}. It never saw a question.

Made by `python -m scripts.pretrain_tiny` (florence-jax) on {devices}, batch {batch}, {train_scenes:,}
training scenes, AdamW with cosine decay (times from the runs' logs, on a 2-core machine shared with other work):

{phases}

Validation at the end ({eval_examples} scenes per task, greedy decoding): {scores}. It describes pages well
enough to be fine-tuned on questions about them; it has not learned to read the words (OCR stays near zero
at this size and budget).
"""


def write_reader(workdir: Path, out: Path) -> None:
    """The finished run's export in bfloat16 with the processor files and a model card."""
    import jax.numpy as jnp

    from florence_jax import Florence2ForConditionalGeneration
    from florence_jax.processing import load_processor

    last = workdir / PHASES[-1].name
    export = last / "export"
    if not (export / "config.json").exists():
        raise SystemExit(f"error: {export} holds no finished run; run without --export_only first")
    model = Florence2ForConditionalGeneration.from_pretrained(export, dtype="float32")
    processor = load_processor(export)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        if old.is_file():
            old.unlink()
    model.save_pretrained(out, dtype=jnp.bfloat16)
    processor.save_pretrained(out)
    meta = json.loads((workdir / "pretrain.json").read_text())
    phases = []
    for phase in PHASES:
        m = meta["phases"][phase.name]
        frozen = "vision tower frozen" if phase.freeze else "everything trained"
        vision = f", vision tower {phase.vision_learning_rate:g}" if phase.vision_learning_rate else ""
        phases.append(f"- {phase.name}: {m['steps']:,} steps, {frozen}, learning rate {phase.learning_rate:g}{vision}, "
                      f"{_minutes(workdir / phase.name):.0f} minutes")
    final = [json.loads(x) for x in (last / "eval.jsonl").read_text().splitlines()][-1]
    scores = ", ".join(f"{task} {METRIC_NAMES[task]} {final[f'{METRICS[task]}/{task}']:.3f}" for task in TASK_WEIGHTS)
    (out / "README.md").write_text(MODEL_CARD.format(
        params=model.num_parameters() if hasattr(model, "num_parameters") else _count(model),
        vocab=model.config.text_config.vocab_size, size=IMAGE_SIZE, dtype="bfloat16",
        weights=", ".join(f"{t} {w:.0%}" for t, w in TASK_WEIGHTS.items()), devices=meta["devices"],
        batch=meta["batch_size"], train_scenes=meta["train_scenes"], phases="\n".join(phases), eval_examples=100,
        scores=scores))
    print(f"wrote {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.1f} MB)")
    print(scores)


def _minutes(run_dir: Path) -> float:
    """A phase's training time from its metrics.jsonl timestamps (whatever launches it took), extrapolated
    over the steps before the first record."""
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0], records[-1]
    per_step = (last["time"] - first["time"]) / max(last["step"] - first["step"], 1)
    return per_step * last["step"] / 60


METRICS = {"caption": "anls", "od": "map", "ocr": "anls"}
METRIC_NAMES = {"caption": "ANLS", "od": "mAP", "ocr": "ANLS"}


def _count(model) -> int:
    import jax
    import numpy as np
    from flax import nnx

    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/pretrain_tiny")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="where the reader is written")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--train_scenes", type=int, default=40000)
    parser.add_argument("--val_scenes", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps_scale", type=float, default=1.0,
                        help="multiply every phase's steps (a quick trial: 0.05)")
    parser.add_argument("--export_only", action="store_true", help="only rewrite --out from a finished run")
    args = parser.parse_args(argv)

    workdir = Path(args.workdir).absolute()
    out = Path(args.out).absolute()
    if not args.export_only:
        import jax

        from train.data import synthetic_scenes
        from train.loop import run

        workdir.mkdir(parents=True, exist_ok=True)
        processor_dir, data_dir = workdir / "processor", workdir / "data"
        if not (processor_dir / "tokenizer.json").exists():
            build_processor(processor_dir)
        if not (data_dir / "od_validation.json").exists():
            t0 = time.time()
            synthetic_scenes.generate(data_dir, args.train_scenes, args.val_scenes, IMAGE_SIZE, seed=args.seed)
            print(f"generated {args.train_scenes:,} + {args.val_scenes:,} scenes in {time.time() - t0:.0f}s")
        meta_path = workdir / "pretrain.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"phases": {}}
        meta.update(batch_size=args.batch_size, train_scenes=args.train_scenes,
                    devices=f"{jax.device_count()} x {jax.devices()[0].device_kind}")
        start = "random:tiny"
        for phase in PHASES:
            phase = dataclasses.replace(phase, steps=max(1, round(phase.steps * args.steps_scale)))
            run_dir = workdir / phase.name
            record = meta["phases"].setdefault(phase.name, {"seconds": 0.0})
            if record.get("steps") != phase.steps or not (run_dir / "export" / "config.json").exists():
                cfg = pretrain_config(data_dir, start, processor_dir, phase, args.batch_size, args.seed)
                print(f"phase {phase.name}: {phase.steps} steps from {start}")
                t0 = time.time()
                summary = run(cfg, run_dir)
                record["seconds"] += time.time() - t0  # summed over resumed launches
                meta_path.write_text(json.dumps(meta, indent=2))
                if summary["step"] < phase.steps:
                    print("stopped early; rerun the same command to resume")
                    return 1
                record["steps"] = phase.steps
                meta_path.write_text(json.dumps(meta, indent=2))
            start = str(run_dir / "export")
    write_reader(workdir, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
