"""Validation: loss over the whole split and a metric (ANLS by default) from batched jit generation.

The metric is the dataset's (``data.metric``): a text metric from ``train.metrics.METRICS`` scores the
decoded answers against the template's references; ``map`` (COCO box mAP) decodes the generations with
``florence_jax.postprocess`` into boxes in the original image's pixels and scores them against the
template's ground truth with ``train.metrics.coco_map`` (mAP@.5, mAP@.75 and per-class AP are reported too).

Every validation example counts exactly once: the eval pipeline pads the last batch with rows whose
``example_mask`` is 0, and with several processes the generated tokens and record indices are gathered
so the score is computed over the union of the processes' shards. A mixture is evaluated dataset by dataset
(``MixtureEvaluator``): each with its own metric, reported as ``<metric>/<name>``, and an overall ``score``
(the weight-averaged metrics, each oriented so that higher is better) that selects the best checkpoint.

Standalone: ``python -m train.evaluate --model DIR_OR_HUB_ID --config gpu_a100.py`` (or ``--workdir``
to score the latest checkpoint of a run).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from florence_jax.devices import to_host
from florence_jax.generation import Generator
from florence_jax.postprocess import post_process_generation
from florence_jax.sharding import batch_sharding, make_mesh
from train.checkpoint import Checkpointer, abstract_like
from train.config import TrainConfig
from train.distributed import compile_then_wait
from train.metrics import Metric, coco_map, get_metric
from train.setup import (
    build_pipelines,
    check_lengths,
    get_datasets,
    get_processor,
    setup_runtime,
    structured_output_warnings,
)
from train.state import create_model, init_train_state
from train.step import jit_eval_step, model_pixels

log = logging.getLogger("train")


@dataclass
class EvalResult:
    """``metrics``: ``{"anls": 0.8}`` for one dataset, ``{"anls/docvqa": .., "exact_match/ai2d": ..}`` and
    per-dataset ``val_loss/<name>``, ``num_examples/<name>`` for a mixture. ``score``: what best-checkpoint
    selection maximizes (the metric itself, negated when lower is better; weight-averaged over a mixture)."""

    val_loss: float
    metrics: dict[str, float]
    score: float
    num_examples: int
    samples: list[dict[str, Any]] = field(default_factory=list)
    loss_sum: float = 0.0
    tokens: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # reported, not scored: mAP@.5, per-class AP, counts

    def record(self, step: int, epoch: float) -> dict[str, Any]:
        return {"step": step, "epoch": epoch, "val_loss": self.val_loss, **self.metrics, "score": self.score,
                "num_examples": self.num_examples, **self.extra}

    def summary(self) -> str:
        """``anls 0.8123 on 200 examples`` / ``score 0.61: anls/docvqa 0.8123 (200), exact_match/ai2d ...``."""
        main = {k: v for k, v in self.metrics.items() if not k.startswith(("val_loss/", "num_examples/"))}
        if len(main) == 1 and "/" not in next(iter(main)):
            (name, value), = main.items()
            more = "".join(f"  {k} {self.extra[k]:.4f}" for k in ("map50", "map75") if k in self.extra)
            return f"{name} {value:.4f}{more} on {self.num_examples} examples"
        parts = [f"{k} {v:.4f} ({int(self.metrics.get('num_examples/' + k.split('/', 1)[1], 0))})"
                 for k, v in main.items()]
        return f"score {self.score:.4f}: " + ", ".join(parts)


def _ascii_label(label: str) -> str:
    # The post-processor drops non-ASCII characters from box labels; ground truth is compared the same way.
    return label.encode("ascii", "ignore").decode("ascii").strip()


def score_detections(texts: list[str], examples: list[Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Decoded generations (``skip_special_tokens=False``) and their examples -> (mAP fields, parsed answers).

    Each example's ``ground_truth["task"]`` picks the parser and ``image_size`` the pixel scale. Predicted
    boxes all score 1.0 (Florence-2 gives no confidences), ranked in generation order.
    """
    gts, preds = [], []
    for text, ex in zip(texts, examples):
        gt = ex.ground_truth
        if gt is None or ex.image_size is None:
            raise ValueError(f"metric 'map' needs examples with ground-truth boxes; prompt {ex.prompt!r} has none "
                             "(use a box template such as 'od' or 'phrase_grounding', or another metric)")
        answer = post_process_generation(text, gt["task"], tuple(ex.image_size))[gt["task"]]
        preds.append({"boxes": answer["bboxes"], "labels": answer["labels"]})
        gts.append({"boxes": gt["boxes"], "labels": [_ascii_label(x) for x in gt["labels"]], "crowd": gt["crowd"]})
    return coco_map(gts, preds).as_dict(), preds


class _TextScores:
    """A text metric's side of an evaluation: the decoded answers (special tokens dropped) against the template's
    references, and the first few as printed samples."""

    skip_special_tokens = True

    def __init__(self, metric: Metric, pipeline, num_samples: int):
        self.metric, self.pipeline, self.num_samples = metric, pipeline, num_samples
        self.predictions: list[str] = []
        self.references: list[tuple[str, ...]] = []
        self.samples: list[dict[str, Any]] = []

    def add(self, indices: list[int], texts: list[str]) -> None:
        for i, text, ref in zip(indices, texts, self.pipeline.references(np.asarray(indices))):
            prediction, ref = text.strip(), tuple(ref)
            self.predictions.append(prediction)
            self.references.append(ref)
            if len(self.samples) < self.num_samples:
                self.samples.append({"question": self.pipeline.encoder.example(i).prompt, "prediction": prediction,
                                     "references": list(ref), "metric": self.metric.name,
                                     "score": self.metric([prediction], [ref])})

    def result(self, loss_sum: float, tokens: float) -> EvalResult:
        value = self.metric(self.predictions, self.references)
        return EvalResult(val_loss=loss_sum / max(tokens, 1.0), metrics={self.metric.name: value},
                          score=self.metric.score(value), num_examples=len(self.predictions), samples=self.samples,
                          loss_sum=loss_sum, tokens=tokens)


class _BoxScores:
    """COCO mAP's side: the generations, location tokens kept, parsed into boxes against each example's ground
    truth (``score_detections``) once every batch is in."""

    skip_special_tokens = False  # locations are special tokens; the parser drops <s>, </s> and <pad>

    def __init__(self, metric: Metric, pipeline, num_samples: int):
        self.metric, self.pipeline, self.num_samples = metric, pipeline, num_samples
        self.texts: list[str] = []
        self.examples: list[Any] = []

    def add(self, indices: list[int], texts: list[str]) -> None:
        self.texts += texts
        self.examples += [self.pipeline.encoder.example(i) for i in indices]

    def result(self, loss_sum: float, tokens: float) -> EvalResult:
        scores, preds = score_detections(self.texts, self.examples)
        samples = []
        for text, ex, pred in list(zip(self.texts, self.examples, preds))[: self.num_samples]:
            clean = text.replace("<s>", "").replace("</s>", "").replace("<pad>", "").strip()
            samples.append({"question": ex.prompt, "prediction": clean, "references": list(ex.references),
                            "metric": "boxes", "boxes": f"{len(pred['boxes'])} predicted, "
                                                        f"{len(ex.ground_truth['boxes'])} true"})
        extra = {k: v for k, v in scores.items() if k != "map"}
        return EvalResult(val_loss=loss_sum / max(tokens, 1.0), metrics={"map": scores["map"]},
                          score=self.metric.score(scores["map"]), num_examples=len(self.texts), samples=samples,
                          loss_sum=loss_sum, tokens=tokens, extra=extra)


class Evaluator:
    """Runs validation for a model whose parameters are refreshed before each call."""

    def __init__(self, pipeline, model, tokenizer, *, batch_sharding, eval_step=None, num_beams: int = 3,
                 max_new_tokens: int = 64, threshold: float = 0.5, num_samples: int = 4, to_global=None,
                 metric: str | Metric = "anls", no_repeat_ngram_size: int | None = None):
        self.pipeline = pipeline
        self.model = model
        self.tokenizer = tokenizer
        self.batch_sharding = batch_sharding
        self.eval_step = eval_step
        self.num_beams = num_beams
        self.max_new_tokens = max_new_tokens
        self.no_repeat_ngram_size = no_repeat_ngram_size  # None: the checkpoint's generation config
        self.threshold = threshold
        self.num_samples = num_samples
        self.to_global = to_global or (lambda b: jax.device_put(b, batch_sharding))
        self.metric = metric if isinstance(metric, Metric) else get_metric(metric, anls_threshold=threshold)
        self._compiled = False
        # uint8 pixel batches become the model's input on the device (the data pipeline's table)
        table = getattr(getattr(pipeline, "encoder", None), "pixel_table", None)
        self._pixels = jax.jit(functools.partial(
            model_pixels, table=table, formulation=model.formulations.pixel_normalize))

    def __call__(self, params=None, rest=None, progress: bool = False) -> EvalResult:
        if params is not None:
            nnx.update(self.model, params, *(() if rest is None else (rest,)))
        self.model.eval()
        batches = iter(self.pipeline.eval())
        n_batches = self.pipeline.num_eval_batches(jax.process_count())
        if progress and jax.process_index() == 0:
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=n_batches, desc="eval", leave=False)
        # The model as it is now, split once for this evaluation. Made per call and dropped after it: a
        # generator kept between evaluations would hold the previous parameters' buffers.
        generator = Generator(self.model, num_beams=self.num_beams, max_new_tokens=self.max_new_tokens,
                              no_repeat_ngram_size=self.no_repeat_ngram_size,
                              image_layout=getattr(getattr(self.pipeline, "encoder", None), "image_layout", "NHWC"))
        return self._run(batches, params, rest, generator)

    def _run(self, batches, params, rest, generator: Generator) -> EvalResult:
        scores = (_BoxScores if self.metric.name == "map" else _TextScores)(self.metric, self.pipeline,
                                                                              self.num_samples)
        loss_sum = tokens = 0.0
        for host_batch in batches:
            index = host_batch.pop("index")
            batch = self.to_global(host_batch)
            if self.eval_step is not None and params is not None:
                if not self._compiled:
                    compile_then_wait(self.eval_step, "eval_step", params, rest, batch)
                    self._compiled = True
                out = self.eval_step(params, rest, batch)
                loss_sum += float(out["loss_sum"])
                tokens += float(out["tokens"])
            pixels = batch["pixel_values"]
            if pixels.dtype == np.uint8:
                pixels = self._pixels(pixels)
            seqs = generator(batch["input_ids"], pixels, batch["attention_mask"])
            texts = self.tokenizer.batch_decode(to_host(seqs), skip_special_tokens=scores.skip_special_tokens)
            real = [(i, t) for i, t in zip(to_host(self._global_index(index)).tolist(), texts) if i >= 0]  # no padding
            if real:
                scores.add([i for i, _ in real], [t for _, t in real])
        return scores.result(loss_sum, tokens)

    def _global_index(self, local_index: np.ndarray):
        if jax.process_count() == 1:
            return local_index
        return jax.make_array_from_process_local_data(self.batch_sharding, local_index)


class MixtureEvaluator:
    """Evaluates each dataset of a mixture with its own pipeline and metric; one combined ``EvalResult``.

    ``evaluators``: ``(name, weight, Evaluator)``. ``metrics`` gets ``<metric>/<name>``, ``val_loss/<name>``
    and ``num_examples/<name>``; ``val_loss`` is over all target tokens of all datasets; ``score`` is the
    weight-averaged oriented metric (``Metric.score``), so the best checkpoint balances the datasets as the
    training mixture does. Samples carry their dataset's name.
    """

    def __init__(self, evaluators):
        self.evaluators = list(evaluators)
        if not self.evaluators:
            raise ValueError("MixtureEvaluator needs at least one evaluator")

    def __call__(self, params=None, rest=None, progress: bool = False) -> EvalResult:
        metrics: dict[str, float] = {}
        samples: list[dict[str, Any]] = []
        loss_sum = tokens = weighted = total_weight = 0.0
        count = 0
        for name, weight, evaluator in self.evaluators:
            res = evaluator(params, rest, progress=progress)
            for key, value in res.metrics.items():
                metrics[f"{key}/{name}"] = value
            metrics[f"val_loss/{name}"] = res.val_loss
            metrics[f"num_examples/{name}"] = res.num_examples
            samples += [{**s, "dataset": name} for s in res.samples]
            loss_sum, tokens, count = loss_sum + res.loss_sum, tokens + res.tokens, count + res.num_examples
            weighted += weight * res.score
            total_weight += weight
        return EvalResult(val_loss=loss_sum / max(tokens, 1.0), metrics=metrics, score=weighted / total_weight,
                          num_examples=count, samples=samples, loss_sum=loss_sum, tokens=tokens)


def evaluator_for(pipes, make):
    """The run's evaluator: ``make(val_pipeline, metric)`` -> Evaluator for its one dataset, or one per evaluated
    dataset of a mixture combined into a ``MixtureEvaluator`` (``pipes``: ``train.setup.RunPipelines``)."""
    if not pipes.mixture:
        return make(pipes.val_pipes[0], pipes.datasets[0].component.metric)
    return MixtureEvaluator([(d.name, d.component.weight, make(p, d.component.metric))
                             for d, p in zip(pipes.datasets, pipes.val_pipes) if p is not None])


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
    evaluator = evaluator_for(pipes, lambda pipe, metric: Evaluator(
        pipe, net, processor.tokenizer, batch_sharding=bsh, eval_step=eval_step, num_beams=cfg.eval.num_beams,
        max_new_tokens=cfg.eval.max_new_tokens, threshold=cfg.eval.anls_threshold, metric=metric,
        no_repeat_ngram_size=cfg.eval.no_repeat_ngram_size))
    from florence_jax.generation_config import describe_settings

    log.warning("evaluation generates with %s", describe_settings(net, cfg.eval.num_beams, cfg.eval.max_new_tokens,
                                                                  cfg.eval.no_repeat_ngram_size))
    for warning in structured_output_warnings(cfg, net):
        log.warning("%s", warning)
    res = evaluator(state.params, state.rest, progress=True)
    return {**res.record(step, None), "samples": res.samples}


def format_samples(samples: list[dict[str, Any]]) -> str:
    lines = []
    for s in samples:
        where = f"[{s['dataset']}] " if s.get("dataset") else ""
        answer = s["references"][0] if s["references"] else ""
        score = f"boxes: {s['boxes']}" if "boxes" in s else f"{s.get('metric', 'anls')} {s['score']:.2f}"
        lines.append(f"  {where}Q: {s['question']}\n     predicted: {s['prediction']!r}   answer: {answer!r}"
                     f"   {score}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Score a Florence-2 checkpoint (ANLS and loss) on a validation split.")
    parser.add_argument("--config", default="cpu_demo.py", help="config whose data section defines the split")
    parser.add_argument("--workdir", help="a training run: score its latest checkpoint")
    parser.add_argument("--model", help="a Hub id or exported directory to score instead")
    parser.add_argument("--num_beams", type=int)
    parser.add_argument("--max_examples", type=int)
    args, rest = parser.parse_known_args(argv)
    from train.config import load_config

    overrides = [a[len("--config."):] for a in rest if a.startswith("--config.")]
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    cfg = load_config(args.config, overrides)
    if args.num_beams:
        cfg.eval.num_beams = args.num_beams
    if args.max_examples is not None:
        cfg.data.max_eval_examples = args.max_examples
    if not args.workdir and not args.model:
        parser.error("pass --workdir (a run's latest checkpoint) or --model (a Hub id or directory)")
    result = evaluate_only(cfg, workdir=args.workdir, model=args.model)
    from train.reporting import print_quietly, strict_json

    print_quietly(strict_json(result, indent=2))


if __name__ == "__main__":
    from florence_jax.host_memory import retain_freed_memory

    retain_freed_memory()  # on the CPU only, before JAX starts (see florence_jax.host_memory)
    main()
