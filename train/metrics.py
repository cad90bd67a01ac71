"""Answer-quality metrics: ANLS, exact match, relaxed accuracy, character error rate; COCO box mAP
(detection); and the registry of metrics selectable by name.

Pure functions over strings, so the evaluation loop, the synthetic data's question-only bound and the tests all
score answers the same way. ``METRICS`` maps a name (``data.metric`` / a mixture component's ``metric``) to a
corpus-level function ``(predictions, references_list) -> float`` and its direction; ``register_metric`` adds one.

Normalization (``normalize_answer``): lower-case, collapse every run of whitespace to one space, strip. This is
what the DocVQA leaderboard does (its answers are compared case-insensitively and ignoring spacing); nothing
else (punctuation, articles) is removed.

ANLS follows the DocVQA definition: for each reference, similarity ``s = 1 - lev(pred, ref) / max(len(pred),
len(ref))``; the score is the best ``s`` over the references, and a best score below ``threshold`` counts as 0
(so a similarity of exactly 0.5 is kept, as in the common ``anls`` implementations). Two empty strings are
identical (score 1).

COCO mAP (``coco_map``) reimplements pycocotools' ``COCOeval`` for boxes in numpy (greedy matching per IoU
threshold in score order, crowd boxes as ignore regions, 101-point interpolated precision, area "all", at most
100 predictions per image and class); ``tests/test_detection.py`` checks it equals pycocotools.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from rapidfuzz.distance import Levenshtein

__all__ = [
    "METRICS",
    "Metric",
    "COCO_IOU_THRESHOLDS",
    "COCO_RECALL_THRESHOLDS",
    "DetectionScores",
    "anls",
    "box_iou",
    "coco_map",
    "best_constant_answer",
    "character_error_rate",
    "corpus_cer",
    "exact_match",
    "get_metric",
    "mean_anls",
    "mean_exact_match",
    "mean_relaxed_accuracy",
    "normalize_answer",
    "register_metric",
    "relaxed_accuracy",
    "similarity",
]

_WHITESPACE = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """Lower-case, collapse whitespace runs to single spaces, strip."""
    return _WHITESPACE.sub(" ", text).strip().lower()


def similarity(a: str, b: str) -> float:
    """Normalized Levenshtein similarity ``1 - lev(a, b) / max(len(a), len(b))`` of already-normalized strings.

    Two empty strings are identical (1.0).
    """
    longest = max(len(a), len(b))
    if longest == 0:
        return 1.0
    return 1.0 - Levenshtein.distance(a, b) / longest


def anls(prediction: str, references: Sequence[str], threshold: float = 0.5) -> float:
    """DocVQA ANLS of one prediction against its reference answers, in [0, 1].

    Takes the best similarity over references (any accepted answer is fine) and zeroes it when below
    ``threshold`` (a wrong answer gets no partial credit for sharing a few letters).

    An empty reference list scores 0.0: the question has no accepted answer, so no prediction can be right.
    Data loaders drop such records before evaluation; returning 0 instead of raising keeps a stray one from
    crashing a long evaluation while still not rewarding anything.
    """
    if isinstance(references, str):
        raise TypeError("references must be a sequence of strings, not a single string")
    pred = normalize_answer(prediction)
    best = max((similarity(pred, normalize_answer(ref)) for ref in references), default=0.0)
    return best if best >= threshold else 0.0


def mean_anls(
    predictions: Sequence[str], references_list: Sequence[Sequence[str]], threshold: float = 0.5
) -> float:
    """Mean ANLS over a set of questions (the DocVQA leaderboard number). Empty input scores 0.0."""
    if len(predictions) != len(references_list):
        raise ValueError(f"{len(predictions)} predictions but {len(references_list)} reference lists")
    if not predictions:
        return 0.0
    total = sum(anls(p, refs, threshold) for p, refs in zip(predictions, references_list))
    return total / len(predictions)


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalized prediction equals any normalized reference, else 0.0 (empty references: 0.0)."""
    if isinstance(references, str):
        raise TypeError("references must be a sequence of strings, not a single string")
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(ref) for ref in references))


def character_error_rate(prediction: str, reference: str) -> float:
    """Levenshtein distance / len(reference), on the raw strings (no normalization: OCR cares about case).

    Can exceed 1 when the prediction is longer than the reference. An empty reference gives 0.0 for an empty
    prediction and ``len(prediction)`` otherwise (every character is an insertion), so it never divides by zero.
    """
    distance = Levenshtein.distance(prediction, reference)
    if not reference:
        return float(distance)
    return distance / len(reference)


def _expected_anls(candidate: str, values: Sequence[str], threshold: float) -> float:
    return sum(anls(candidate, [v], threshold) for v in values) / len(values)


def best_constant_answer(values: Sequence[str], threshold: float = 0.5) -> tuple[float, str]:
    """The best fixed answer when the true one is uniform over ``values``: (max_c E_v[anls(c, v)], c).

    This is what a predictor that ignores the image can score on one question. Candidates: every value, the
    empty string and every string on an optimal edit path between two values (compromises within half an edit
    distance of both live there, e.g. "bree" for red/green/blue), then hill-climbing on single-character edits
    over the values' alphabet from the best few. The expectation is exact; the maximization is a thorough
    search, not a proof, so the score is the best such a trick was found to reach.
    """
    values = [normalize_answer(v) for v in values]
    if not values:
        raise ValueError("no values")
    candidates = set(values) | {""}
    for a, b in itertools.permutations(values, 2):
        ops = Levenshtein.editops(a, b)
        candidates.update(ops[:i].apply(a, b) for i in range(1, len(ops)))
    alphabet = sorted(set("".join(values)))
    ranked = sorted(
        ((_expected_anls(c, values, threshold), c) for c in candidates), key=lambda t: (-t[0], t[1])
    )
    best_score, best = ranked[0]
    for score, current in ranked[:8]:
        improved = True
        while improved:
            improved = False
            neighbours = {current[:i] + current[i + 1 :] for i in range(len(current))}
            for i in range(len(current) + 1):
                for ch in alphabet:
                    neighbours.add(current[:i] + ch + current[i:])
                    if i < len(current):
                        neighbours.add(current[:i] + ch + current[i + 1 :])
            for candidate in sorted(neighbours):
                value = _expected_anls(candidate, values, threshold)
                if value > score + 1e-12:
                    score, current, improved = value, candidate, True
        if score > best_score + 1e-12:
            best_score, best = score, current
    return best_score, best


# ------------------------------------------------------------------------------------------ corpus level
def _check_lengths(predictions: Sequence[str], references_list: Sequence[Sequence[str]]) -> None:
    if len(predictions) != len(references_list):
        raise ValueError(f"{len(predictions)} predictions but {len(references_list)} reference lists")


def mean_exact_match(predictions: Sequence[str], references_list: Sequence[Sequence[str]]) -> float:
    """Fraction of predictions equal (normalized) to one of their references. Empty input scores 0.0."""
    _check_lengths(predictions, references_list)
    if not predictions:
        return 0.0
    return sum(exact_match(p, refs) for p, refs in zip(predictions, references_list)) / len(predictions)


def corpus_cer(predictions: Sequence[str], references_list: Sequence[Sequence[str]]) -> float:
    """Character error rate over a corpus: total edits / total reference characters (lower is better).

    Per example the closest reference counts (fewest edits); raw strings, as ``character_error_rate``. Long
    references weigh more than short ones, as in the usual corpus CER. An example without references counts
    every predicted character as an error. No reference characters at all: the total edit count.
    """
    _check_lengths(predictions, references_list)
    edits = chars = 0
    for pred, refs in zip(predictions, references_list):
        if isinstance(refs, str):
            raise TypeError("references must be a sequence of strings, not a single string")
        if not refs:
            edits += len(pred)
            continue
        distance, ref = min((Levenshtein.distance(pred, r), r) for r in refs)
        edits += distance
        chars += len(ref)
    return edits / chars if chars else float(edits)


def _number(text: str) -> float | None:
    text = text.strip().rstrip("%").replace(",", "").strip()
    try:
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, references: Sequence[str], tolerance: float = 0.05) -> float:
    """ChartQA's relaxed accuracy: 1.0 when a numeric answer is within ``tolerance`` (relative) of a numeric
    reference, or the normalized strings are equal; else 0.0. ``"1,200"`` and ``"12%"`` read as numbers."""
    if isinstance(references, str):
        raise TypeError("references must be a sequence of strings, not a single string")
    pred = _number(prediction)
    for ref in references:
        target = _number(ref)
        if pred is not None and target is not None:
            if target == 0.0 and pred == 0.0 or target != 0.0 and abs(pred - target) / abs(target) <= tolerance:
                return 1.0
        elif normalize_answer(prediction) == normalize_answer(ref):
            return 1.0
    return 0.0


def mean_relaxed_accuracy(predictions: Sequence[str], references_list: Sequence[Sequence[str]]) -> float:
    """Mean ``relaxed_accuracy`` (5% tolerance). Empty input scores 0.0."""
    _check_lengths(predictions, references_list)
    if not predictions:
        return 0.0
    return sum(relaxed_accuracy(p, refs) for p, refs in zip(predictions, references_list)) / len(predictions)


# ------------------------------------------------------------------------------------------ registry
@dataclasses.dataclass(frozen=True)
class Metric:
    """A corpus-level score ``fn(predictions, references_list) -> float`` and whether higher is better.

    ``score(value)`` orients it for best-checkpoint selection: the value itself, or its negation.
    """

    name: str
    fn: Callable[[Sequence[str], Sequence[Sequence[str]]], float]
    higher_is_better: bool = True

    def __call__(self, predictions: Sequence[str], references_list: Sequence[Sequence[str]]) -> float:
        return float(self.fn(predictions, references_list))

    def score(self, value: float) -> float:
        return value if self.higher_is_better else -value


METRICS: dict[str, Metric] = {}


def register_metric(
    name: str, fn: Callable[[Sequence[str], Sequence[Sequence[str]]], float], higher_is_better: bool = True
) -> Metric:
    """Make ``fn(predictions, references_list) -> float`` selectable by ``name`` in configs."""
    if name in METRICS and METRICS[name].fn is not fn:
        raise ValueError(f"metric {name!r} is already registered")
    METRICS[name] = Metric(name, fn, higher_is_better)
    return METRICS[name]


def get_metric(name: str, anls_threshold: float | None = None) -> Metric:
    """The registered metric ``name``; ``anls_threshold`` (config ``eval.anls_threshold``) applies to ANLS."""
    if name not in METRICS:
        raise KeyError(f"unknown metric {name!r}; registered: {sorted(METRICS)}")
    if name == "anls" and anls_threshold is not None and anls_threshold != 0.5:
        t = anls_threshold
        return Metric("anls", lambda p, r: mean_anls(p, r, t), True)
    return METRICS[name]


register_metric("anls", mean_anls)
register_metric("exact_match", mean_exact_match)
register_metric("relaxed_accuracy", mean_relaxed_accuracy)
register_metric("cer", corpus_cer, higher_is_better=False)


# ------------------------------------------------------------------------------------------ detection
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
"""IoU thresholds of COCO's AP@[.5:.95] (as pycocotools builds them)."""
COCO_RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
"""The 101 recall points at which COCO samples the interpolated precision."""


@dataclasses.dataclass(frozen=True)
class DetectionScores:
    """COCO box AP (area "all", at most ``max_detections`` per image and class).

    ``map`` is AP averaged over the IoU thresholds .50:.05:.95 and over classes; ``map50``/``map75`` at one
    threshold; ``per_class`` AP@[.5:.95] of every class with at least one non-crowd ground-truth box. Classes
    without ground truth are left out of every mean (as in pycocotools), and with no such class at all every
    value is -1.0 (pycocotools' "undefined").
    """

    map: float
    map50: float
    map75: float
    per_class: dict[Any, float]
    num_ground_truth: int
    num_predictions: int

    def as_dict(self) -> dict[str, Any]:
        return {"map": self.map, "map50": self.map50, "map75": self.map75,
                "ap_per_class": {str(k): v for k, v in self.per_class.items()},
                "num_gt_boxes": self.num_ground_truth, "num_pred_boxes": self.num_predictions}


def box_iou(pred: np.ndarray, gt: np.ndarray, crowd: np.ndarray | None = None) -> np.ndarray:
    """IoU of ``(D, 4)`` and ``(G, 4)`` ``x1, y1, x2, y2`` boxes -> ``(D, G)``, in float64.

    Against a crowd box the "IoU" is intersection / area of the prediction (COCO: a prediction inside a crowd
    region is covered by it). Inverted boxes (x2 < x1) have no area and overlap nothing.
    """
    pred = np.asarray(pred, np.float64).reshape(-1, 4)
    gt = np.asarray(gt, np.float64).reshape(-1, 4)
    w = np.minimum(pred[:, None, 2], gt[None, :, 2]) - np.maximum(pred[:, None, 0], gt[None, :, 0])
    h = np.minimum(pred[:, None, 3], gt[None, :, 3]) - np.maximum(pred[:, None, 1], gt[None, :, 1])
    inter = np.where((w > 0) & (h > 0), w * h, 0.0)
    area_p = np.clip(pred[:, 2] - pred[:, 0], 0, None) * np.clip(pred[:, 3] - pred[:, 1], 0, None)
    area_g = np.clip(gt[:, 2] - gt[:, 0], 0, None) * np.clip(gt[:, 3] - gt[:, 1], 0, None)
    union = area_p[:, None] + area_g[None, :] - inter
    if crowd is not None:
        union = np.where(np.asarray(crowd, bool)[None, :], area_p[:, None], union)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(inter > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _match_image(ious: np.ndarray, ignore: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Greedy COCO matching of score-sorted predictions to (non-ignored first) ground truth, per threshold.

    Returns ``matched`` and ``ignored`` (T, D) booleans: a prediction matched to a crowd/ignored box is ignored,
    not a true positive. A crowd box can absorb any number of predictions; a normal box only one.
    """
    n_t, (n_d, n_g) = len(thresholds), ious.shape
    matched = np.zeros((n_t, n_d), bool)
    ignored = np.zeros((n_t, n_d), bool)
    for t, threshold in enumerate(thresholds):
        taken = np.zeros(n_g, bool)
        for d in range(n_d):
            best, m = min(threshold, 1 - 1e-10), -1
            for g in range(n_g):
                if taken[g] and not ignore[g]:
                    continue
                if m > -1 and not ignore[m] and ignore[g]:
                    break  # a match on a real box beats any ignored one
                if ious[d, g] < best:
                    continue
                best, m = ious[d, g], g
            if m >= 0:
                matched[t, d], ignored[t, d], taken[m] = True, ignore[m], True
    return matched, ignored


def _average_precision(scores: np.ndarray, matched: np.ndarray, ignored: np.ndarray, num_gt: int) -> np.ndarray:
    """COCO's 101-point interpolated AP per threshold from the pooled predictions of one class."""
    order = np.argsort(-scores, kind="mergesort")  # stable: ties keep image order, then generation order
    matched, ignored = matched[:, order], ignored[:, order]
    tp = np.cumsum(matched & ~ignored, axis=1, dtype=np.float64)
    fp = np.cumsum(~matched & ~ignored, axis=1, dtype=np.float64)
    ap = np.zeros(len(tp))
    for t in range(len(tp)):
        if tp.shape[1] == 0:
            continue
        recall = tp[t] / num_gt
        precision = tp[t] / (fp[t] + tp[t] + np.spacing(1))
        precision = np.maximum.accumulate(precision[::-1])[::-1]  # precision envelope
        idx = np.searchsorted(recall, COCO_RECALL_THRESHOLDS, side="left")
        sampled = np.where(idx < len(precision), precision[np.minimum(idx, len(precision) - 1)], 0.0)
        ap[t] = sampled.mean()
    return ap


def coco_map(
    ground_truth: Sequence[Mapping[str, Any]],
    predictions: Sequence[Mapping[str, Any]],
    max_detections: int = 100,
    iou_thresholds: np.ndarray = COCO_IOU_THRESHOLDS,
) -> DetectionScores:
    """COCO box mAP of per-image predictions, equal to pycocotools' ``COCOeval`` (``iouType="bbox"``).

    ``ground_truth[i]``: ``{"boxes": (N, 4) x1 y1 x2 y2 pixels, "labels": N class keys, "crowd": N bools
    (optional)}``; ``predictions[i]`` for the same image: ``{"boxes", "labels", "scores" (optional, default
    1.0)}``. Labels are any hashable class keys (names or ids). Predictions of a class that has no ground
    truth anywhere are not scored (pycocotools scores only the ground truth's categories).

    Images are taken in the given order: equal scores rank by image order, then by position within the image,
    as pycocotools does with images sorted by id. Florence-2 gives no confidences, so its boxes all score 1.0
    and rank in generation order.
    """
    if len(ground_truth) != len(predictions):
        raise ValueError(f"{len(ground_truth)} ground-truth images but {len(predictions)} prediction images")
    thresholds = np.asarray(iou_thresholds, np.float64)
    per_class: dict[Any, dict[str, list]] = {}
    num_gt_boxes = num_pred_boxes = 0

    def arrays(item: Mapping[str, Any], kind: str) -> tuple[np.ndarray, list, np.ndarray]:
        boxes = np.asarray(item.get("boxes", []), np.float64).reshape(-1, 4)
        labels = list(item.get("labels", []))
        if len(labels) != len(boxes):
            raise ValueError(f"{kind}: {len(boxes)} boxes but {len(labels)} labels")
        key, default = ("crowd", False) if kind == "ground truth" else ("scores", 1.0)
        extra = item.get(key)
        extra = np.full(len(boxes), default) if extra is None else np.asarray(extra).reshape(-1)
        if len(extra) != len(boxes):
            raise ValueError(f"{kind}: {len(boxes)} boxes but {len(extra)} {key}")
        return boxes, labels, extra

    gt_classes = set()
    for gt in ground_truth:
        _, labels, crowd = arrays(gt, "ground truth")
        gt_classes.update(label for label, c in zip(labels, crowd) if not c)
    for gt, pred in zip(ground_truth, predictions):
        g_boxes, g_labels, g_crowd = arrays(gt, "ground truth")
        p_boxes, p_labels, p_scores = arrays(pred, "prediction")
        num_gt_boxes += int((~g_crowd.astype(bool)).sum())
        num_pred_boxes += len(p_boxes)
        for cls in set(g_labels) | set(p_labels):
            gi = np.asarray([i for i, x in enumerate(g_labels) if x == cls], np.int64)
            pi = np.asarray([i for i, x in enumerate(p_labels) if x == cls], np.int64)
            ignore = g_crowd[gi].astype(bool)
            g_order = np.argsort(ignore, kind="mergesort")  # non-ignored boxes first
            gi, ignore = gi[g_order], ignore[g_order]
            scores = p_scores[pi].astype(np.float64)
            p_order = np.argsort(-scores, kind="mergesort")[:max_detections]
            pi, scores = pi[p_order], scores[p_order]
            ious = box_iou(p_boxes[pi], g_boxes[gi], ignore)
            matched, ignored = _match_image(ious, ignore, thresholds)
            acc = per_class.setdefault(cls, {"scores": [], "matched": [], "ignored": [], "num_gt": [0]})
            acc["scores"].append(scores)
            acc["matched"].append(matched)
            acc["ignored"].append(ignored)
            acc["num_gt"][0] += int((~ignore).sum())

    aps: dict[Any, np.ndarray] = {}
    for cls, acc in per_class.items():
        if cls not in gt_classes or acc["num_gt"][0] == 0:
            continue
        aps[cls] = _average_precision(np.concatenate(acc["scores"]), np.concatenate(acc["matched"], axis=1),
                                      np.concatenate(acc["ignored"], axis=1), acc["num_gt"][0])
    if not aps:
        return DetectionScores(-1.0, -1.0, -1.0, {}, num_gt_boxes, num_pred_boxes)
    table = np.stack(list(aps.values()))  # (classes, thresholds)

    def at(iou: float) -> float:
        hit = np.flatnonzero(np.isclose(thresholds, iou))
        return float(table[:, hit[0]].mean()) if len(hit) else float("nan")

    return DetectionScores(
        map=float(table.mean()), map50=at(0.5), map75=at(0.75),
        per_class={cls: float(ap.mean()) for cls, ap in aps.items()},
        num_ground_truth=num_gt_boxes, num_predictions=num_pred_boxes,
    )


def _scores_boxes(predictions: Sequence[str], references_list: Sequence[Sequence[str]]) -> float:
    raise TypeError("metric 'map' scores boxes, not strings: the evaluator decodes generations into boxes and "
                    "calls coco_map with the template's ground truth")


# Selectable by name like the others (data.metric / a mixture component's metric); the evaluator routes it.
register_metric("map", _scores_boxes)
