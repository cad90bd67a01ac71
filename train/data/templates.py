"""Record -> Example: what the model is asked (prompt), what it should answer (target), what counts as right.

A template is the only place that knows a dataset's column names, so the pipeline stays dataset-agnostic. A
record that cannot make an example (no answers, no image column) raises ``BadRecordError`` with a short reason
code; the pipeline skips it and counts the reason instead of crashing a long run.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from florence_jax.postprocess import quantize_coordinates
from train.errors import ConfigError

__all__ = [
    "BOX_TEMPLATES",
    "STRUCTURED_TEMPLATES",
    "BadRecordError",
    "ConfiguredTemplate",
    "Example",
    "ExpandedRecords",
    "Template",
    "cauldron",
    "docvqa",
    "od",
    "phrase_grounding",
    "region_to_description",
    "get_template",
    "json_answer",
    "mapped",
    "parse_columns",
    "prefix_suffix",
    "register_template",
    "template_names",
]

log = logging.getLogger(__name__)

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


def register_template(
    name: str, fields: tuple[str, ...] = (), optional: tuple[str, ...] = (), expand: str | None = None
) -> Callable[[Template], Template]:
    """Decorator: make a template available by name (a dataset's ``template``: ``train.config.MixtureComponent``).

    ``fields``: the record keys it reads (checked against the source's columns at start, after the config's
    ``columns`` renames); ``optional``: keys it reads when present. ``expand``: a list column whose every
    element becomes one example (``ExpandedRecords``); the template then finds the element's position
    under ``TURN_KEY``.
    """

    def decorate(fn: Template) -> Template:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"template {name!r} is already registered")
        _REGISTRY[name] = fn
        _FIELDS[name] = (tuple(fields), tuple(optional), expand)
        return fn

    return decorate


_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str | None]] = {}


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


@register_template("docvqa", fields=("question", "answers", "image"))
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


@register_template("prefix_suffix", fields=("prefix", "suffix", "image"))
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


TURN_KEY = "_turn"


def _answers(value: Any) -> tuple[str, ...]:
    """A string or a list of strings -> the non-blank ones, stripped."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple):
        return ()
    return tuple(a.strip() for a in value if isinstance(a, str) and a.strip())


def _cauldron_turn(record: Mapping[str, Any]) -> Example:
    texts = _require(record, "texts")
    turn = int(record.get(TURN_KEY, 0))
    if not isinstance(texts, list | tuple) or len(texts) <= turn or not isinstance(texts[turn], Mapping):
        raise BadRecordError("missing_field", f"no turn {turn} in texts")
    user, assistant = texts[turn].get("user"), texts[turn].get("assistant")
    if not isinstance(user, str) or not user.strip():
        raise BadRecordError("empty_question")
    if not isinstance(assistant, str) or not assistant.strip():
        raise BadRecordError("empty_answers")
    images = _require(record, "images")
    if isinstance(images, list | tuple):
        if len(images) > 1:
            # Florence-2 sees one image; a question about a second one would teach the model to guess.
            raise BadRecordError("multiple_images", f"{len(images)} images")
        images = images[0] if images else None
    return Example(prompt=user.strip(), target=assistant.strip(), references=(assistant.strip(),), image=images)


@register_template("cauldron", fields=("images", "texts"), expand="texts")
def cauldron(record: Mapping[str, Any]) -> Example:
    """The Cauldron's rows (``images``: list of images, ``texts``: list of ``{user, assistant}`` turns).

    Every turn is one example (the source is expanded with ``ExpandedRecords``, so a 3-question document gives
    3 examples; none of the image's questions is wasted, and evaluation scores every question): prompt the
    turn's ``user`` text as written (The Cauldron's instructions such as "Answer briefly." included), target
    and only reference its ``assistant`` text. Rows with more than one image are skipped
    (``multiple_images``): Florence-2 takes one image. ``cauldron_first`` uses only the first turn of a row.
    """
    return _cauldron_turn(record)


@register_template("cauldron_first", fields=("images", "texts"))
def cauldron_first(record: Mapping[str, Any]) -> Example:
    """The Cauldron's rows, first turn only (one example per image)."""
    return _cauldron_turn({k: v for k, v in record.items() if k != TURN_KEY})


@register_template("mapped", fields=("prompt", "target", "image"), optional=("references",))
def mapped(record: Mapping[str, Any]) -> Example:
    """Any dataset through ``columns`` renames: ``prompt`` (text), ``target`` (a string, or a list whose first
    non-blank entry is the target and all are references), optional ``references`` (a string or list of accepted
    answers; default: the target's), ``image``. Put a task token before every prompt with ``prompt_prefix``."""
    prompt = _require(record, "prompt")
    if not isinstance(prompt, str):
        raise BadRecordError("missing_field", f"prompt must be a string, got {type(prompt).__name__}")
    targets = _answers(_require(record, "target"))
    if not targets:
        raise BadRecordError("empty_answers")
    references = _answers(record["references"]) if record.get("references") is not None else targets
    return Example(prompt=prompt, target=targets[0], references=references or targets,
                   image=_require(record, "image"))


@register_template("json", fields=("prompt", "target", "image"), optional=("references",))
def json_answer(record: Mapping[str, Any]) -> Example:
    """``mapped`` for answers that are JSON (a form, a table, a list of records): the same columns and renames,
    and a structured template, so evaluating it with a no-repeat n-gram ban is warned (``STRUCTURED_TEMPLATES``)."""
    return mapped(record)


def parse_columns(columns: Sequence[str], template: str) -> dict[str, str]:
    """``("question=query", "answers=label")`` -> ``{"question": "query", "answers": "label"}``, checked against
    the fields the template reads."""
    fields, optional, _ = _FIELDS.get(template, ((), (), None))
    known = (*fields, *optional)
    out: dict[str, str] = {}
    for item in columns:
        field, sep, column = item.partition("=")
        field, column = field.strip(), column.strip()
        if not sep or not field or not column:
            raise ValueError(f"columns entry {item!r}: expected TEMPLATE_FIELD=DATASET_COLUMN, e.g. question=query")
        if known and field not in known:
            raise ValueError(f"columns entry {item!r}: the {template!r} template reads {list(known)}, not {field!r}")
        if field in out:
            raise ValueError(f"columns entry {item!r}: {field!r} is mapped twice")
        out[field] = column
    return out


class ConfiguredTemplate:
    """A registered template plus the config's column renames and prompt prefix. Picklable (grain workers).

    ``columns`` maps the template's field names to the dataset's columns (``{"question": "query"}``: the
    template's ``question`` is read from column ``query``); ``prompt_prefix`` goes before every prompt (a task
    token such as ``<VQA>``).
    """

    def __init__(self, name: str, columns: Sequence[str] = (), prompt_prefix: str = ""):
        self.name = name
        self.fn = get_template(name)
        self.renames = parse_columns(columns, name)
        self.prompt_prefix = prompt_prefix
        self.fields, self.optional, self.expand = _FIELDS.get(name, ((), (), None))
        if self.expand is not None:
            self.expand = self.renames.get(self.expand, self.expand)

    def column(self, field: str) -> str:
        """The dataset column the template's ``field`` is read from."""
        return self.renames.get(field, field)

    def __call__(self, record: Mapping[str, Any]) -> Example:
        if self.renames:
            record = dict(record)
            for field, column in self.renames.items():
                if column in record:
                    record[field] = record[column]
        example = self.fn(record)
        if self.prompt_prefix:
            example = dataclasses.replace(example, prompt=self.prompt_prefix + example.prompt)
        return example

    def check_columns(self, source: Any, where: str) -> None:
        """Raise ``ConfigError`` naming the config entry when a column the template needs is not in ``source``.

        Sources without ``column_names`` (plain sequences) are not checked here; their records are checked one
        by one (``missing_field``).
        """
        names = getattr(source, "column_names", None)
        if names is None:
            return
        names = set(names)
        for field, column in self.renames.items():
            if column not in names:
                raise ConfigError(
                    f"{where}: column {column!r} (mapped to the {self.name!r} template's {field!r} by columns) is "
                    f"not in {source!r}; its columns: {sorted(names)}"
                )
        for field in self.fields:
            if self.column(field) not in names:
                raise ConfigError(
                    f"{where}: the {self.name!r} template reads {field!r}, which is not a column of {source!r} "
                    f"(columns: {sorted(names)}); map it with columns=(\"{field}=YOUR_COLUMN\",) or pick another "
                    f"template ({template_names()})"
                )

    def prepare(self, source: Sequence[dict[str, Any]]) -> Sequence[dict[str, Any]]:
        """The records this template reads: ``source`` itself, or one record per list element (``expand``)."""
        return ExpandedRecords(source, self.expand) if self.expand is not None else source

    def __repr__(self) -> str:
        return f"ConfiguredTemplate({self.name!r}, renames={self.renames}, prompt_prefix={self.prompt_prefix!r})"


def _list_lengths(source: Sequence[dict[str, Any]], column: str) -> np.ndarray:
    """Length of the list in ``column`` for every record; from Arrow without reading rows when possible."""
    dataset = getattr(source, "dataset", None)
    if dataset is not None and hasattr(dataset, "with_format") and column in dataset.column_names:
        import pyarrow as pa
        import pyarrow.compute as pc

        values = dataset.with_format("arrow")[column]
        if isinstance(values, pa.Table):
            values = values.column(0)
        return np.asarray(pc.fill_null(pc.list_value_length(values), 0), dtype=np.int64)
    lengths = []
    for i in range(len(source)):
        value = source[i].get(column)
        lengths.append(len(value) if isinstance(value, list | tuple) else 0)
    return np.asarray(lengths, dtype=np.int64)


class ExpandedRecords(Sequence):
    """One record per element of a list column (The Cauldron: one per question-answer turn).

    Record ``i`` is the source row holding the i-th element overall, with the element's position under
    ``TURN_KEY``. Rows with an empty or missing list give no record (counted in ``empty_rows``, logged).
    Picklable: holds the source and two index arrays.
    """

    def __init__(self, source: Sequence[dict[str, Any]], column: str):
        self.source, self.column = source, column
        lengths = _list_lengths(source, column)
        self.rows = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
        starts = np.cumsum(lengths) - lengths
        self.turns = np.arange(len(self.rows), dtype=np.int64) - np.repeat(starts, lengths)
        self.empty_rows = int((lengths == 0).sum())
        if self.empty_rows:
            log.warning("%s: %d rows have no %r entries and give no example", source, self.empty_rows, column)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        index = int(index)
        if not 0 <= index < len(self.rows):
            raise IndexError(index)
        record = dict(self.source[int(self.rows[index])])
        record[TURN_KEY] = int(self.turns[index])
        return record

    @property
    def column_names(self) -> list[str] | None:
        return getattr(self.source, "column_names", None)

    def __repr__(self) -> str:
        return f"ExpandedRecords({self.source!r} by {self.column!r}, {len(self)} records)"


# ------------------------------------------------------------------------------------------ detection
BOX_TEMPLATES: frozenset[str] = frozenset({"od", "phrase_grounding"})
"""Templates whose examples carry ground-truth boxes (``data.metric = "map"`` needs one of these)."""

STRUCTURED_TEMPLATES: frozenset[str] = BOX_TEMPLATES | {"json"}
"""Templates whose answers are structured (runs of location tokens, JSON), whose n-grams legitimately repeat: a
run that evaluates one with a no-repeat n-gram ban is warned (``train.setup.structured_output_warnings``)."""


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
