"""Record -> Example: what the model is asked (prompt), what it should answer (target), what counts as right.

A template is the only place that knows a dataset's column names, so the pipeline stays dataset-agnostic. A
record that cannot make an example (no answers, no image column) raises ``BadRecordError`` with a short reason
code; the pipeline skips it and counts the reason instead of crashing a long run.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from florence_jax.postprocess import quantize_coordinates

__all__ = [
    "BOX_TEMPLATES",
    "BadRecordError",
    "Example",
    "Template",
    "docvqa",
    "od",
    "phrase_grounding",
    "region_to_description",
    "get_template",
    "prefix_suffix",
    "register_template",
    "template_names",
]

DOCVQA_TASK = "<DocVQA>"
OD_TASK = "<OD>"
GROUNDING_TASK = "<CAPTION_TO_PHRASE_GROUNDING>"
REGION_TASK = "<REGION_TO_DESCRIPTION>"


@dataclasses.dataclass(frozen=True)
class Example:
    """One training/eval example before tokenization.

    ``image`` is whatever the record holds (PIL image, ``{"bytes", "path"}`` dict, path string, raw bytes or
    None): decoding is the pipeline's job, done in grain workers.

    Detection templates add ``image_size`` ``(width, height)``, the size the target's locations are relative
    to (the pipeline skips a record whose decoded image has another size), and ``ground_truth``
    ``{"task", "boxes" (x1 y1 x2 y2 pixels), "labels", "crowd"}``, what box metrics score the answer against.
    """

    prompt: str
    target: str
    references: tuple[str, ...]
    image: Any
    image_size: tuple[int, int] | None = None
    ground_truth: Mapping[str, Any] | None = None


class BadRecordError(ValueError):
    """A record that cannot become an Example; ``reason`` is a short code used as a counter key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


Template = Callable[[Mapping[str, Any]], Example]

_REGISTRY: dict[str, Template] = {}


def register_template(name: str) -> Callable[[Template], Template]:
    """Decorator: make a template available by name (``DataConfig.template``)."""

    def decorate(fn: Template) -> Template:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"template {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return decorate


def get_template(name: str) -> Template:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown template {name!r}; registered: {sorted(_REGISTRY)}") from None


def template_names() -> list[str]:
    return sorted(_REGISTRY)


def _require(record: Mapping[str, Any], key: str) -> Any:
    if key not in record:
        raise BadRecordError("missing_field", f"record has no {key!r} (has {sorted(record)})")
    return record[key]


@register_template("docvqa")
def docvqa(record: Mapping[str, Any]) -> Example:
    """DocVQA rows: prompt ``"<DocVQA>" + question``, target the first answer, references all answers.

    ``<DocVQA>`` is not one of Florence-2's built-in tasks, so the processor passes it through as plain text
    (the usual Florence-2 DocVQA fine-tuning prompt). Blank answers are dropped; a row left with none is bad
    (nothing to train on, and ANLS would be 0 for any prediction).
    """
    question = _require(record, "question")
    if not isinstance(question, str) or not question.strip():
        raise BadRecordError("empty_question")
    answers = _require(record, "answers")
    if isinstance(answers, str):
        answers = [answers]
    references = tuple(a.strip() for a in (answers or []) if isinstance(a, str) and a.strip())
    if not references:
        raise BadRecordError("empty_answers")
    return Example(
        prompt=DOCVQA_TASK + question.strip(),
        target=references[0],
        references=references,
        image=_require(record, "image"),
    )


@register_template("prefix_suffix")
def prefix_suffix(record: Mapping[str, Any]) -> Example:
    """Generic JSONL fine-tuning rows ``{"image": ..., "prefix": prompt, "suffix": answer}`` (the PaliGemma /
    Florence-2 community format). The suffix is the only reference."""
    prefix = _require(record, "prefix")
    suffix = _require(record, "suffix")
    if not isinstance(prefix, str) or not isinstance(suffix, str):
        raise BadRecordError("missing_field", "prefix and suffix must be strings")
    if not suffix.strip():
        raise BadRecordError("empty_answers")
    return Example(prompt=prefix, target=suffix, references=(suffix,), image=_require(record, "image"))


# ------------------------------------------------------------------------------------------ detection
BOX_TEMPLATES: frozenset[str] = frozenset({"od", "phrase_grounding"})
"""Templates whose examples carry ground-truth boxes (``eval.metric = "map"`` needs one of these)."""


@dataclasses.dataclass(frozen=True)
class _Object:
    label: str
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels
    crowd: bool


def _coco_objects(record: Mapping[str, Any]) -> tuple[tuple[int, int], list[_Object]]:
    """A COCO record's image size and objects in raster order (top to bottom, then left to right).

    Boxes are COCO ``[x, y, w, h]``; they are clipped to the image (COCO boxes often overhang by a fraction of a
    pixel). A record is bad when its size is unusable, or a box is empty or lies outside the image.
    """
    width, height = _require(record, "width"), _require(record, "height")
    if not all(isinstance(v, int | float) and v > 0 for v in (width, height)):
        raise BadRecordError("bad_image_size", f"width={width!r} height={height!r}")
    objects = []
    for ann in _require(record, "annotations") or []:
        x, y, w, h = (float(v) for v in ann["bbox"])
        x1, y1 = max(x, 0.0), max(y, 0.0)
        x2, y2 = min(x + w, float(width)), min(y + h, float(height))
        if not (w > 0 and h > 0 and x2 > x1 and y2 > y1):
            raise BadRecordError("bad_box", f"bbox {ann['bbox']} in a {width}x{height} image")
        label = str(ann.get("category", "")).strip()
        if not label or "<" in label:
            raise BadRecordError("bad_label", f"category name {label!r} (empty or with '<')")
        objects.append(_Object(label, (x1, y1, x2, y2), bool(ann.get("iscrowd", 0))))
    objects.sort(key=lambda o: (o.box[1], o.box[0], o.label))
    return (int(width), int(height)), objects


def _locs(boxes: list[tuple[float, float, float, float]], size: tuple[int, int]) -> list[str]:
    """Each box as ``<loc_x1><loc_y1><loc_x2><loc_y2>``: Florence-2's 1000 bins per axis, relative to the
    image's width and height, ``floor(x / (width / 1000))`` clamped to 999 (transformers' ``quantize``)."""
    bins = quantize_coordinates(np.asarray(boxes, np.float64).reshape(-1, 4), size)
    return ["".join(f"<loc_{int(v)}>" for v in row) for row in bins]


def _ground_truth(task: str, objects: list[_Object]) -> dict[str, Any]:
    return {"task": task, "boxes": [list(o.box) for o in objects], "labels": [o.label for o in objects],
            "crowd": [o.crowd for o in objects]}


def _pick(record: Mapping[str, Any], n: int) -> int:
    """A fixed choice among ``n`` per image (by image id), so every image asks about something different
    while the example stays a pure function of the record."""
    key = record.get("image_id", record.get("file_name", ""))
    return zlib.crc32(str(key).encode()) % n


@register_template("od")
def od(record: Mapping[str, Any]) -> Example:
    """COCO records -> ``<OD>``: target ``label<loc_x1><loc_y1><loc_x2><loc_y2>label<loc_...>...``, one
    label per box, in raster order. Crowd regions are not targets (they are ignore regions for mAP). An image
    without objects has an empty target: it teaches the model to answer nothing."""
    size, objects = _coco_objects(record)
    plain = [o for o in objects if not o.crowd]
    target = "".join(o.label + loc for o, loc in zip(plain, _locs([o.box for o in plain], size)))
    return Example(prompt=OD_TASK, target=target, references=(target,), image=_require(record, "image"),
                   image_size=size, ground_truth=_ground_truth(OD_TASK, objects))


@register_template("phrase_grounding")
def phrase_grounding(record: Mapping[str, Any]) -> Example:
    """COCO records -> ``<CAPTION_TO_PHRASE_GROUNDING>`` + a category present in the image; target the
    phrase followed by every box of that category (``phrase<loc..><loc..><loc..><loc..><loc..>...``, as
    Florence-2 answers). The category is a fixed choice per image. Images without objects are bad."""
    size, objects = _coco_objects(record)
    names = sorted({o.label for o in objects if not o.crowd})
    if not names:
        raise BadRecordError("no_objects")
    phrase = names[_pick(record, len(names))]
    mine = [o for o in objects if o.label == phrase]
    target = phrase + "".join(_locs([o.box for o in mine if not o.crowd], size))
    return Example(prompt=GROUNDING_TASK + phrase, target=target, references=(target,),
                   image=_require(record, "image"), image_size=size, ground_truth=_ground_truth(GROUNDING_TASK, mine))


@register_template("region_to_description")
def region_to_description(record: Mapping[str, Any]) -> Example:
    """COCO records -> ``<REGION_TO_DESCRIPTION><loc_x1><loc_y1><loc_x2><loc_y2>``; target the object's
    category name (also the reference, scored by ANLS). One object per image, a fixed choice."""
    size, objects = _coco_objects(record)
    plain = [o for o in objects if not o.crowd]
    if not plain:
        raise BadRecordError("no_objects")
    obj = plain[_pick(record, len(plain))]
    return Example(prompt=REGION_TASK + _locs([obj.box], size)[0], target=obj.label, references=(obj.label,),
                   image=_require(record, "image"), image_size=size)
