"""Answer-quality metrics: ANLS, exact match, relaxed accuracy, character error rate; and their registry.

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
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Callable, Sequence

from rapidfuzz.distance import Levenshtein

__all__ = [
    "METRICS",
    "Metric",
    "anls",
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
