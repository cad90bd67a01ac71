"""Validation: loss over the whole split and the configured metric from batched jit generation.

``eval.metric`` picks the score: ``anls`` (text answers against the template's references) or ``map``
(COCO box mAP: generations are decoded with ``florence_jax.postprocess`` into boxes in the original image's
pixels and scored against the template's ground truth by ``train.metrics.coco_map``; mAP@.5, mAP@.75 and
per-class AP come along).

Every validation example counts exactly once: the eval pipeline pads the last batch with rows whose
``example_mask`` is 0, and with several processes the generated tokens and record indices are gathered
so the score is computed over the union of the processes' shards.

Standalone: ``python -m train.evaluate --model DIR_OR_HUB_ID --config gpu_a100.py`` (or ``--workdir``
to score the latest checkpoint of a run).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from florence_jax.postprocess import post_process_generation
from train.metrics import anls as anls_score
from train.metrics import coco_map

log = logging.getLogger("train")

METRICS = ("anls", "map")


@dataclass
class EvalResult:
    val_loss: float
    anls: float | None
    num_examples: int
    samples: list[dict[str, Any]] = field(default_factory=list)
    metric: str = "anls"
    extra: dict[str, Any] = field(default_factory=dict)  # map: map, map50, map75, ap_per_class, box counts

    @property
    def score(self) -> float:
        """The configured metric's value (what best-checkpoint selection compares)."""
        return float(self.anls if self.metric == "anls" else self.extra[self.metric])

    def record(self, step: int, epoch: float) -> dict[str, Any]:
        rec = {"step": step, "epoch": epoch, "val_loss": self.val_loss, "num_examples": self.num_examples}
        if self.anls is not None:
            rec["anls"] = self.anls
        return {**rec, **self.extra}

    def headline(self) -> str:
        """The metric for a console line: ``ANLS 0.8123`` or ``mAP 0.4123  mAP@.5 0.6234``."""
        if self.metric == "map":
            return f"mAP {self.extra['map']:.4f}  mAP@.5 {self.extra['map50']:.4f}"
        return f"ANLS {self.anls:.4f}"


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
            raise ValueError(f"eval.metric='map' needs examples with ground-truth boxes; prompt {ex.prompt!r} has "
                             "none (use a box template such as 'od' or 'phrase_grounding', or eval.metric='anls')")
        answer = post_process_generation(text, gt["task"], tuple(ex.image_size))[gt["task"]]
        preds.append({"boxes": answer["bboxes"], "labels": answer["labels"]})
        gts.append({"boxes": gt["boxes"], "labels": [_ascii_label(x) for x in gt["labels"]], "crowd": gt["crowd"]})
    return coco_map(gts, preds).as_dict(), preds


def _gather(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


class Evaluator:
    """Runs validation for a model whose parameters are refreshed before each call."""

    def __init__(self, pipeline, model, tokenizer, *, batch_sharding, eval_step=None, num_beams: int = 3,
                 max_new_tokens: int = 64, threshold: float = 0.5, max_examples: int = 0, num_samples: int = 4,
                 to_global=None, metric: str = "anls"):
        if metric not in METRICS:
            raise ValueError(f"unknown eval metric {metric!r}; expected one of {METRICS}")
        self.metric = metric
        self.pipeline = pipeline
        self.model = model
        self.tokenizer = tokenizer
        self.batch_sharding = batch_sharding
        self.eval_step = eval_step
        self.num_beams = num_beams
        self.max_new_tokens = max_new_tokens
        self.threshold = threshold
        self.max_examples = max_examples
        self.num_samples = num_samples
        self.to_global = to_global or (lambda b: jax.device_put(b, batch_sharding))

    def __call__(self, params=None, rest=None, progress: bool = False) -> EvalResult:
        if params is not None:
            nnx.update(self.model, params, *(() if rest is None else (rest,)))
        self.model.eval()
        loss_sum = tokens = 0.0
        anls_sum, count = 0.0, 0
        samples: list[dict[str, Any]] = []
        batches = iter(self.pipeline.eval())
        n_batches = self.pipeline.num_eval_batches(jax.process_count())
        if progress and jax.process_index() == 0:
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=n_batches, desc="eval", leave=False)
        seen = 0
        det_texts: list[str] = []
        det_examples: list[Any] = []
        for host_batch in batches:
            index = host_batch.pop("index")
            batch = self.to_global(host_batch)
            if self.eval_step is not None and params is not None:
                out = self.eval_step(params, rest, batch)
                loss_sum += float(out["loss_sum"])
                tokens += float(out["tokens"])
            seqs = self.model.generate(
                batch["input_ids"], batch["pixel_values"], batch["attention_mask"], num_beams=self.num_beams,
                max_new_tokens=self.max_new_tokens, image_layout="NHWC",
            )
            seqs = _gather(seqs)
            idx = _gather(self._global_index(index))
            if self.metric == "map":
                # Locations are special tokens: keep them; the parser drops <s>, </s> and <pad>.
                texts = self.tokenizer.batch_decode(seqs, skip_special_tokens=False)
                for i, text in zip(idx.tolist(), texts):
                    if i >= 0:
                        det_texts.append(text)
                        det_examples.append(self.pipeline.encoder.example(i))
                seen += int((idx >= 0).sum())
                if self.max_examples and seen >= self.max_examples:
                    break
                continue
            texts = self.tokenizer.batch_decode(seqs, skip_special_tokens=True)
            refs = self.pipeline.references(idx)
            for i, text, ref in zip(idx.tolist(), texts, refs):
                if i < 0:
                    continue
                score = anls_score(text.strip(), ref, self.threshold) if ref else 0.0
                anls_sum += score
                count += 1
                if len(samples) < self.num_samples:
                    question = self.pipeline.encoder.example(i).prompt
                    samples.append({"question": question, "prediction": text.strip(), "references": list(ref),
                                    "anls": score})
            seen += int((idx >= 0).sum())
            if self.max_examples and seen >= self.max_examples:
                break
        val_loss = loss_sum / max(tokens, 1.0)
        if self.metric == "map":
            extra, preds = score_detections(det_texts, det_examples)
            for text, ex, pred in list(zip(det_texts, det_examples, preds))[: self.num_samples]:
                clean = text.replace("<s>", "").replace("</s>", "").replace("<pad>", "").strip()
                samples.append({"question": ex.prompt, "prediction": clean, "references": list(ex.references),
                                "boxes": f"{len(pred['boxes'])} predicted, {len(ex.ground_truth['boxes'])} true"})
            return EvalResult(val_loss=val_loss, anls=None, num_examples=len(det_texts), samples=samples,
                              metric="map", extra=extra)
        return EvalResult(val_loss=val_loss, anls=anls_sum / max(count, 1), num_examples=count, samples=samples)

    def _global_index(self, local_index: np.ndarray):
        if jax.process_count() == 1:
            return local_index
        return jax.make_array_from_process_local_data(self.batch_sharding, local_index)


def format_samples(samples: list[dict[str, Any]]) -> str:
    lines = []
    for s in samples:
        score = f"   ANLS {s['anls']:.2f}" if "anls" in s else f"   boxes: {s['boxes']}" if "boxes" in s else ""
        lines.append(f"  Q: {s['question']}\n     predicted: {s['prediction']!r}   answer: {s['references'][0]!r}"
                     f"{score}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Score a Florence-2 checkpoint (eval.metric and loss) on a validation split.")
    parser.add_argument("--config", default="cpu_demo.py", help="config whose data section defines the split")
    parser.add_argument("--workdir", help="a training run: score its latest checkpoint")
    parser.add_argument("--model", help="a Hub id or exported directory to score instead")
    parser.add_argument("--num_beams", type=int)
    parser.add_argument("--max_examples", type=int)
    args, rest = parser.parse_known_args(argv)
    from train.config import load_config
    from train.loop import evaluate_only

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
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
