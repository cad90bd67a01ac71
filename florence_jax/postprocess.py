"""Florence-2 generations -> task results (text, boxes, quad boxes, polygons), in numpy.

The model writes locations as ``<loc_N>`` tokens: the image is cut into 1000 bins per axis and a
coordinate is the index of its bin. This module turns decoded generations back into pixel
coordinates with the same numbers, keys and types as transformers'
``Florence2Processor.post_process_generation`` (our ground truth), without importing torch, so
evaluation and the CLI can run in a JAX-only environment.

The parsing is regex based on purpose: the exact patterns decide which malformed generations
(odd loc counts, text between tokens, stray special tokens) produce which partial results, and
matching transformers on those cases is part of the contract. Quirks of the reference that we
reproduce on purpose are marked ``Matches transformers:``.

Image sizes are ``(width, height)`` in pixels throughout, as in transformers.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

__all__ = [
    "ADDED_TOKENS",
    "DEFAULT_POST_PROCESSOR_CONFIG",
    "NUM_BINS",
    "PARSE_TYPES",
    "TASKS",
    "Task",
    "coordinates_to_loc_tokens",
    "default_post_processor_config",
    "dequantize",
    "post_process_generation",
    "quantize_coordinates",
]

NUM_BINS: Final = 1000
"""Bins per image axis behind the ``<loc_0>`` ... ``<loc_999>`` tokens."""

ADDED_TOKENS: Final[tuple[str, ...]] = (
    ("<od>", "</od>", "<ocr>", "</ocr>")
    + tuple(f"<loc_{i}>" for i in range(NUM_BINS))
    + (
        "<cap>", "</cap>", "<ncap>", "</ncap>", "<dcap>", "</dcap>", "<grounding>", "</grounding>",
        "<seg>", "</seg>", "<sep>", "<region_cap>", "</region_cap>", "<region_to_desciption>",
        "</region_to_desciption>", "<proposal>", "</proposal>", "<poly>", "</poly>", "<and>",
    )
)  # fmt: skip
"""The tokens Florence-2's processor adds to BART's vocabulary, in its order (ids 50265.. in the published
checkpoints; "desciption" is misspelt in the original and kept so: the text is part of the vocabulary)."""

# Largest float32 below 2**31: pixel values are saturated here before the int32 cast.
_INT32_LIMIT: Final = np.float32(2**31 - 128)
_INT64_MAX: Final = 2**63 - 1

# --------------------------------------------------------------------------------------------------
# Published settings and the task table
# --------------------------------------------------------------------------------------------------

# Phrases that phrase grounding never reports (pronouns, "the image", ...). Copied verbatim from
# the post_processor_config that transformers' converter writes for microsoft/Florence-2-base,
# duplicates included, so a processor built from it serialises to the published file.
_BANNED_GROUNDING_TOKENS: Final = (
    "it", "I", "me", "mine", "you", "your", "yours", "he", "him", "his", "she", "her", "hers",
    "they", "them", "their", "theirs", "one", "oneself", "we", "us", "our", "ours", "you", "your",
    "yours", "they", "them", "their", "theirs", "mine", "yours", "his", "hers", "its", "ours",
    "yours", "theirs", "myself", "yourself", "himself", "herself", "itself", "ourselves",
    "yourselves", "themselves", "this", "that", "these", "those", "who", "whom", "whose", "which",
    "what", "who", "whom", "whose", "which", "that", "all", "another", "any", "anybody", "anyone",
    "anything", "each", "everybody", "everyone", "everything", "few", "many", "nobody", "none",
    "one", "several", "some", "somebody", "someone", "something", "each other", "one another",
    "myself", "yourself", "himself", "herself", "itself", "ourselves", "yourselves", "themselves",
    "the image", "image", "images", "the", "a", "an", "a group", "other objects", "lots", "a set",
)  # fmt: skip

_OCR_PATTERN: Final = r"(.+?)" + r"<loc_(\d+)>" * 8

DEFAULT_POST_PROCESSOR_CONFIG: Final[Mapping[str, Mapping[str, Any]]] = {
    "ocr": {"pattern": _OCR_PATTERN, "area_threshold": 0.0},
    "phrase_grounding": {"banned_grounding_tokens": list(_BANNED_GROUNDING_TOKENS)},
    "pure_text": {},
    "description_with_bboxes": {},
    "description_with_polygons": {},
    "polygons": {},
    "bboxes": {},
    "description_with_bboxes_or_polygons": {},
}
"""Florence-2's published ``post_processor_config`` (microsoft/Florence-2-base, as converted by
transformers). Read-only: use :func:`default_post_processor_config` for a copy to modify or save.

Matches transformers: the published file spells the OCR keys ``pattern``/``area_threshold`` but
transformers only reads ``PATTERN``/``AREA_THRESHOLD``, so the published values are inert (they
equal the built-in defaults anyway). We read the same upper-case keys."""

PARSE_TYPES: Final = frozenset(DEFAULT_POST_PROCESSOR_CONFIG)


def default_post_processor_config() -> dict[str, dict[str, Any]]:
    """A fresh, JSON-serialisable copy of :data:`DEFAULT_POST_PROCESSOR_CONFIG`."""
    return copy.deepcopy({k: dict(v) for k, v in DEFAULT_POST_PROCESSOR_CONFIG.items()})


@dataclass(frozen=True)
class Task:
    """A task token the model was trained on.

    ``takes_input``: the prompt carries user text after the token (a caption, a phrase, or a
    region as ``<loc_N>`` tokens). ``parse_type``: which parser reads the answer.
    """

    token: str
    parse_type: str
    takes_input: bool


TASKS: Final[Mapping[str, Task]] = {
    t.token: t
    for t in (
        Task("<OCR>", "pure_text", False),
        Task("<OCR_WITH_REGION>", "ocr", False),
        Task("<CAPTION>", "pure_text", False),
        Task("<DETAILED_CAPTION>", "pure_text", False),
        Task("<MORE_DETAILED_CAPTION>", "pure_text", False),
        Task("<OD>", "description_with_bboxes", False),
        Task("<DENSE_REGION_CAPTION>", "description_with_bboxes", False),
        Task("<REGION_PROPOSAL>", "bboxes", False),
        Task("<CAPTION_TO_PHRASE_GROUNDING>", "phrase_grounding", True),
        Task("<REFERRING_EXPRESSION_SEGMENTATION>", "polygons", True),
        Task("<REGION_TO_SEGMENTATION>", "polygons", True),
        Task("<OPEN_VOCABULARY_DETECTION>", "description_with_bboxes_or_polygons", True),
        Task("<REGION_TO_CATEGORY>", "pure_text", True),
        Task("<REGION_TO_DESCRIPTION>", "pure_text", True),
        Task("<REGION_TO_OCR>", "pure_text", True),
        # Not a transformers task: fine-tuned DocVQA checkpoints take "<DocVQA>" + question as
        # literal prompt text (the processor leaves unknown tokens alone) and answer in plain text.
        Task("<DocVQA>", "pure_text", True),
    )
}
"""Known task tokens. Any other task is answered as free text (``pure_text``), as in transformers."""


# --------------------------------------------------------------------------------------------------
# Coordinate quantization
# --------------------------------------------------------------------------------------------------


def _per_bin(
    coords: np.ndarray, image_size: tuple[float, float], num_bins: int, dtype: type = np.float32
) -> np.ndarray:
    """Pixels per bin for each entry of the last axis, which alternates x, y (boxes and points)."""
    if coords.shape[-1] not in (2, 4):
        raise ValueError(f"last axis must hold 2 (x, y) or 4 (x1, y1, x2, y2) values, got {coords.shape}")
    width, height = image_size
    # The Python division happens in float64 and is then rounded to the tensor's dtype, as torch
    # does when a float32 tensor meets a Python scalar.
    xy = np.array([width / num_bins, height / num_bins], dtype=dtype)
    return np.tile(xy, coords.shape[-1] // 2)


def quantize_coordinates(
    boxes_or_points: Sequence[Any] | np.ndarray, image_size: tuple[float, float], num_bins: int = NUM_BINS
) -> np.ndarray:
    """Pixel boxes ``(..., 4)`` or points ``(..., 2)`` -> bin indices (int32), floor mode.

    Same arithmetic as transformers' ``Florence2PostProcessor.quantize``: lists and integer arrays
    are divided in float32 (torch's default dtype); float64 arrays stay float64 as they would
    after ``torch.from_numpy``. Values outside the image clamp to the first/last bin.
    """
    coords = np.asarray(boxes_or_points)
    if not (isinstance(boxes_or_points, np.ndarray) and coords.dtype == np.float64):
        coords = coords.astype(np.float32)
    per_bin = _per_bin(coords, image_size, num_bins, coords.dtype.type)
    return np.clip(np.floor(coords / per_bin), 0, num_bins - 1).astype(np.int32)


def dequantize(
    bins: Sequence[Any] | np.ndarray, image_size: tuple[float, float], num_bins: int = NUM_BINS,
    integer: bool = True,
) -> np.ndarray:
    """Bin indices ``(..., 4)`` or ``(..., 2)`` -> pixel coordinates at the bin centres.

    Matches transformers: ``int((bin + 0.5) * pixels_per_bin)`` evaluated in float32 and truncated,
    with no clamping, so ``<loc_1000>`` (not a real token, but valid text) maps past the image.
    ``integer=False`` stops before the truncation (float32), as the original remote code answers.
    """
    coords = np.asarray(bins, dtype=np.int64)
    if coords.size == 0:
        return np.zeros(coords.shape, dtype=np.int32 if integer else np.float32)
    per_bin = _per_bin(coords, image_size, num_bins)
    pixels = (coords.astype(np.float32) + np.float32(0.5)) * per_bin
    if not integer:
        return pixels
    # Clipping only bites for absurd bins (pixels past 2**31), where torch's int cast is undefined.
    return np.clip(pixels, -_INT32_LIMIT, _INT32_LIMIT).astype(np.int32)


def coordinates_to_loc_tokens(
    boxes_or_points: Sequence[Any] | np.ndarray, image_size: tuple[float, float], num_bins: int = NUM_BINS
) -> str:
    """Pixel boxes/points -> ``"<loc_x1><loc_y1><loc_x2><loc_y2>..."``, the text a region task takes
    (e.g. ``"<REGION_TO_DESCRIPTION>" + coordinates_to_loc_tokens([[10, 20, 200, 180]], (640, 480))``)."""
    return "".join(
        f"<loc_{int(b)}>" for b in quantize_coordinates(boxes_or_points, image_size, num_bins).ravel()
    )


def _dequantize_flat(bins: Iterable[int], image_size: tuple[float, float], integer: bool = True) -> list:
    """Flat ``[x, y, x, y, ...]`` bins -> flat pixel list (python ints, as the reference returns; floats with
    ``integer=False``)."""
    flat = np.asarray(list(bins), dtype=np.int64).reshape(-1, 2)
    return dequantize(flat, image_size, integer=integer).ravel().tolist()


# --------------------------------------------------------------------------------------------------
# Parsers. Each takes the decoded text and returns the per-task answer.
# --------------------------------------------------------------------------------------------------

_LOC = r"<loc_\d+>"
_LOC_NUMBER = re.compile(r"<loc_(\d+)>")
# Text that precedes a location, up to the first structural token. No DOTALL: a label that spans a
# newline does not match and the instance is dropped (as in the reference).
_LABEL_BEFORE_BOX = re.compile(r"^\s*(.*?)(?=<od>|</od>|<box>|</box>|<bbox>|</bbox>|<loc_)")
_LABEL_BEFORE_POLYGON = re.compile(r"^\s*(.*?)(?=<od>|</od>|<box>|</box>|<bbox>|</bbox>|<loc_|<poly>)")
# A label (no "<" inside) followed by a run of at least 4 location tokens.
_LABELLED_BOXES = re.compile(rf"([^<]+(?:{_LOC}){{4,}})")
_UNLABELLED_BOXES = re.compile(rf"(?:{_LOC}){{4,}}")
_FOUR_LOCS = re.compile(r"<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>")
_POLYGON_TOKEN = r"(?:<loc_\d+>|<sep>|<poly>|</poly>)"
_LABELLED_POLYGONS = re.compile(rf"([^<]+{_POLYGON_TOKEN}{{4,}})")
_UNLABELLED_POLYGONS = re.compile(rf"{_POLYGON_TOKEN}{{4,}}")
_POLYGON_GROUP = re.compile(r"<poly>(.*?)</poly>")
# One polygon: a run of locations closed by <sep> or the end of the text.
_POLYGON_POINTS = re.compile(r"((?:<loc_\d+>)+)(?:<sep>|$)")


def _to_bin(digits: str) -> int:
    """A location number as written in the text.

    Real ``<loc_N>`` tokens stop at 999, but a confused model can spell ``<loc_123456789012...>``
    out of ordinary text pieces. Transformers reads any number an int64 holds (``<loc_0000000100>`` is
    bin 100) and raises past that; we cap such a number at the int64 limit instead, so the instance
    survives with a saturated coordinate.
    """
    digits = digits.lstrip("0") or "0"
    return _INT64_MAX if len(digits) > 19 else min(int(digits), _INT64_MAX)


def _strip_sequence_tokens(text: str) -> str:
    """Drop BOS/EOS/padding that ``batch_decode(..., skip_special_tokens=False)`` leaves around."""
    return text.replace("<s>", "").replace("</s>", "").replace("<pad>", "")


def _ascii(label: str) -> str:
    # Matches transformers: box labels (not OCR text, not polygon labels) lose non-ASCII characters.
    return label.encode("ascii", "ignore").decode("ascii")


def _labelled_boxes(
    text: str, image_size: tuple[float, float], allow_unlabelled: bool, banned: frozenset[str] = frozenset(),
    integer: bool = True,
) -> list[tuple[str, list[list[int]]]]:
    """``label<loc><loc><loc><loc>...`` runs -> ``[(label, [box, ...]), ...]``.

    A run of locations gives ``len // 4`` boxes (a trailing partial box is ignored). With
    ``allow_unlabelled`` any text is ignored and every label is ``""``.
    """
    pattern = _UNLABELLED_BOXES if allow_unlabelled else _LABELLED_BOXES
    found = []
    for chunk in pattern.findall(_strip_sequence_tokens(text)):
        # The reference also removes one "<ground>" and one "<obj>" here; neither can occur in a
        # chunk ([^<] excludes "<" from the label part), so there is nothing to do.
        label_match = _LABEL_BEFORE_BOX.search(chunk)
        if label_match is None:
            continue
        label = label_match.group().strip()
        if label in banned:
            continue
        bins = [[_to_bin(v) for v in m.groups()] for m in _FOUR_LOCS.finditer(chunk)]
        if not bins:
            continue
        boxes = dequantize(np.asarray(bins, dtype=np.int64), image_size, integer=integer).tolist()
        found.append((_ascii(label), boxes))
    return found


def _parse_bboxes(text: str, image_size: tuple[float, float], allow_unlabelled: bool,
                  integer: bool = True) -> dict[str, list]:
    bboxes, labels = [], []
    for label, boxes in _labelled_boxes(text, image_size, allow_unlabelled, integer=integer):
        bboxes.extend(boxes)
        labels.extend([label] * len(boxes))
    return {"bboxes": bboxes, "labels": labels}


def _parse_phrase_grounding(
    text: str, image_size: tuple[float, float], banned: frozenset[str], integer: bool = True
) -> dict[str, list]:
    # Banned phrases are compared before the ASCII filter and case-sensitively ("The image" passes).
    bboxes, labels = [], []
    for label, boxes in _labelled_boxes(text, image_size, allow_unlabelled=False, banned=banned, integer=integer):
        bboxes.extend(boxes)
        labels.extend([label] * len(boxes))
    return {"bboxes": bboxes, "labels": labels}


def _parse_ocr(
    text: str, image_size: tuple[float, float], pattern: str | None, area_threshold: float, original: bool = False
) -> dict[str, list]:
    quad_boxes, labels = [], []
    width, height = image_size
    # The original removes only "<s>": a generation decoded with special tokens starts "</s><s>", so its first
    # line keeps a leading "</s>"; and it does not strip the lines.
    text = text.replace("<s>", "") if original else _strip_sequence_tokens(text)
    for content, *quad_bins in re.findall(pattern or _OCR_PATTERN, text):
        quad = _dequantize_flat((_to_bin(b) for b in quad_bins), image_size, integer=not original)
        if area_threshold > 0:
            xs, ys = quad[0::2], quad[1::2]
            # Matches transformers and the original: the shoelace sum takes the first three edges only (the
            # closing edge from the last corner back to the first is left out, and so is every edge past
            # the fourth corner of a PATTERN with more), so this is not the true area.
            area = 0.5 * abs(sum(xs[i] * ys[i + 1] - xs[i + 1] * ys[i] for i in range(min(3, len(xs) - 1))))
            if area < width * height * area_threshold:
                continue
        quad_boxes.append(quad)
        labels.append(content if original else content.strip())
    return {"quad_boxes": quad_boxes, "labels": labels}


def _polygon_instances(
    text: str, image_size: tuple[float, float], allow_unlabelled: bool, integer: bool = True,
    original: bool = False,
) -> list[tuple[str, list[list[int]]]]:
    """``label<poly>locs<sep>locs</poly>...`` -> ``[(label, [polygon, ...]), ...]``.

    Without ``<poly>...</poly>`` groups the whole chunk is one instance. Each polygon is a run of
    locations closed by ``<sep>`` or the end; an odd count drops its last location.
    """
    pattern = _UNLABELLED_POLYGONS if allow_unlabelled else _LABELLED_POLYGONS
    found = []
    for chunk in pattern.findall(_strip_sequence_tokens(text)):
        # Matches transformers: one leading location is skipped before reading the label. The original's
        # pattern for it lacks the "<", so it skips nothing: a chunk that starts with a location is labelled
        # "" there, where transformers reads the label after that location ("<sep>", say).
        label_text = chunk if original else re.sub(r"^<loc_\d+>", "", chunk, count=1)
        if not label_text and not allow_unlabelled:
            continue
        label_match = _LABEL_BEFORE_POLYGON.search(label_text)
        if label_match is None:
            continue
        label = label_match.group().strip()
        if "<poly>" in chunk and "</poly>" in chunk:
            groups = [m.group(1) for m in _POLYGON_GROUP.finditer(chunk)]
        else:
            groups = [chunk]
        for group in groups:
            runs = [m.group(1) for m in _POLYGON_POINTS.finditer(group)]
            if not runs:
                continue
            polygons = []
            for run in runs:
                bins = [_to_bin(b) for b in _LOC_NUMBER.findall(run)]
                polygons.append(_dequantize_flat(bins[: len(bins) // 2 * 2], image_size, integer=integer))
            found.append((label, polygons))
    return found


def _parse_polygons(text: str, image_size: tuple[float, float], allow_unlabelled: bool,
                    original: bool = False) -> dict[str, list]:
    instances = _polygon_instances(text, image_size, allow_unlabelled, integer=not original, original=original)
    return {"polygons": [polys for _, polys in instances], "labels": [label for label, _ in instances]}


def _parse_boxes_or_polygons(text: str, image_size: tuple[float, float], original: bool = False) -> dict[str, list]:
    # One answer holds either kind; transformers picks the parser by whether "<poly>" occurs at all.
    integer = not original
    if "<poly>" in text:
        polygons = _parse_polygons(text, image_size, allow_unlabelled=False, original=original)
        bboxes = {"bboxes": [], "labels": []}
    else:
        polygons = {"polygons": [], "labels": []}
        bboxes = _parse_bboxes(text, image_size, allow_unlabelled=False, integer=integer)
    return {
        "bboxes": bboxes["bboxes"],
        "bboxes_labels": bboxes["labels"],
        "polygons": polygons["polygons"],
        "polygons_labels": polygons["labels"],
    }


def _pure_text(text: str, original: bool = False) -> str:
    # Matches transformers: only <s> and </s> are removed, "<pad>" stays in the answer. Decode with
    # the padding cut off (or skip_special_tokens=True) for free-text tasks. The original does not strip.
    text = text.replace("<s>", "").replace("</s>", "")
    return text if original else text.strip()


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def _settings(processor: Any | None) -> Mapping[str, Mapping[str, Any]]:
    """The parse settings: the processor's ``post_processor_config`` or the published defaults.

    A processor without any config (``None``) gets the defaults; transformers would raise for
    every task there.
    """
    config = getattr(processor, "post_processor_config", None) if processor is not None else None
    return DEFAULT_POST_PROCESSOR_CONFIG if config is None else config


STYLES: Final = ("native", "original")


def post_process_generation(
    text: str, task: str, image_size: tuple[float, float] | None, processor: Any | None = None,
    style: str | None = None,
) -> dict[str, Any]:
    """Parse one decoded generation for ``task``; same output as transformers'
    ``Florence2Processor.post_process_generation(text=text, task=task, image_size=image_size)``, or with
    ``style="original"`` as the original remote code's processor (``microsoft/Florence-2-*``) answers.

    Args:
        text: one sequence from ``batch_decode(..., skip_special_tokens=False)``; ``<s>``, ``</s>``
            and ``<pad>`` around it are fine.
        task: the task token, e.g. ``"<OD>"``. Unknown tasks (``"<DocVQA>"``) give free text.
        image_size: ``(width, height)`` of the original image; only needed for tasks with locations.
        processor: a Florence-2 processor whose ``post_processor_config`` supplies the settings
            (OCR ``PATTERN``/``AREA_THRESHOLD``, banned grounding phrases); defaults otherwise.
        style: ``"native"`` (transformers) or ``"original"``; None: the processor's ``florence_layout``
            (an original-layout checkpoint's processor says ``"original"``), else native. The original gives
            coordinates as floats (the bin centre, float32, not truncated), leaves free text and OCR lines
            unstripped, and removes only ``<s>`` before reading OCR lines.

    Returns:
        ``{task: answer}``: a string for text tasks; for the others a dict of lists with pixel coordinates:
        ``bboxes``/``labels``, ``quad_boxes``/``labels``, ``polygons``/``labels`` or, for
        ``<OPEN_VOCABULARY_DETECTION>``, ``bboxes``/``bboxes_labels``/``polygons``/``polygons_labels``.
        Malformed generations give partial or empty lists, never an exception.
    """
    if task is None:
        raise ValueError("`task` must be provided for post-processing.")
    style = style or getattr(processor, "florence_layout", None) or "native"
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    original = style == "original"
    integer = not original
    parse_type = TASKS[task].parse_type if task in TASKS else "pure_text"
    settings = _settings(processor)
    if parse_type not in settings:
        raise ValueError(f"Unsupported parse task: {parse_type} (missing from post_processor_config)")
    options = settings[parse_type] or {}
    if parse_type == "pure_text":
        return {task: _pure_text(text, original)}
    if image_size is None:
        raise ValueError(f"{task} answers with locations: pass image_size=(width, height)")

    if parse_type == "ocr":
        answer = _parse_ocr(text, image_size, options.get("PATTERN"), options.get("AREA_THRESHOLD", 0.0), original)
    elif parse_type == "phrase_grounding":
        banned = frozenset(options.get("banned_grounding_tokens", ()))
        answer = _parse_phrase_grounding(text, image_size, banned, integer)
    elif parse_type in ("description_with_bboxes", "bboxes"):
        answer = _parse_bboxes(text, image_size, allow_unlabelled=parse_type == "bboxes", integer=integer)
    elif parse_type in ("description_with_polygons", "polygons"):
        answer = _parse_polygons(text, image_size, allow_unlabelled=parse_type == "polygons", original=original)
    elif parse_type == "description_with_bboxes_or_polygons":
        answer = _parse_boxes_or_polygons(text, image_size, original)
    else:  # pragma: no cover - TASKS only names the types above
        raise ValueError(f"Unknown post-processing type: {parse_type}")
    return {task: answer}
