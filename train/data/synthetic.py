"""Synthetic DocVQA: rendered invoices, receipts, forms, letters and menus with coarse, visual answers.

Why this exists: the CPU demo trains a ~2-5M-parameter Florence-2 from scratch in ~10 minutes and must show
real learning (validation ANLS >= 0.6) on data where guessing from the question alone cannot pass 0.3. A model
that small, that fast, does not learn to read small print, so every answer is a big, coarse feature of the page:

==========  ==================================  =====================================================
template    question                            answer (5 values, each with probability 1/5)
==========  ==================================  =====================================================
colour      What colour is the header band?     red / cyan / blue / yellow / purple: the full-width
                                                band across the top
stamp       Which side has the stamp?           top / bottom / left / right / none: a big black disc
items       How many items are listed?          1 - 5: thick dark bars in the body
logo        What shape is the logo?             circle / star / diamond / plus / box: a big white
                                                shape on the band
doctype     What type of document is this?      invoice / receipt / form / letter / menu: each has its
                                                own body layout (frame, narrow paper, tint, border)
                                                and its name printed large under the band
==========  ==================================  =====================================================

House styles (``coupling``). Measured with a 1.9M-parameter transformers Florence-2 from scratch (DaViT
32-64-96-128, BART d=128, 2+2 layers, 128x128, AdamW 1e-3 cosine, batch 32, clip 1.0, one-token answers, 1 CPU
thread ~0.5 s/step): with all five attributes independent, validation accuracy stayed at chance for 1,800
steps (at init the logits hardly depend on the image: std across images 0.002 against 0.33 overall). So a
share ``coupling`` of documents (default 0.8) comes from one of 5 issuers' house styles (issuer k: the k-th
value of every template), the rest have independent attributes. With 0.8 and 300 warmup steps: accuracy 0.53
at step 300, 0.68 at 600, 0.87 at 900, above the 0.84 that recognising the issuer alone is worth
(``coupling + (1 - coupling) / 5``), so it also reads single attributes. With only 100 warmup steps the
post-LN BART often diverged around the LR peak into answering without the question (4 runs of 6, whatever the
coupling): that is an optimizer setting, not the data. Each template's answer stays uniform either way, so
the question-only bound does not depend on ``coupling``; ``coupling=0`` gives fully independent attributes.

The answer words were chosen so that no single string, however contrived, earns much ANLS against all of them
(``question_only_bound`` measures this; with these sets it is ~0.24). Short English words sharing letters
("red", "green", "blue") let a compromise string such as "bree" score >= 0.5 against several answers at once,
so the sets avoid such families.

Records follow the Hugging Face DocVQA schema (``questionId``, ``question``, ``question_types``, ``image``,
``docId``, ``ucsf_document_id``, ``ucsf_document_page_no``, ``answers``) and are written to parquet with the
``datasets`` Image feature, so ``datasets.load_dataset("parquet", ...)`` decodes ``image`` to PIL. Everything is
deterministic given the seed. ``BadRecords`` injects broken or unusual rows so the loaders' error handling can be
tested on the same files.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from train.metrics import best_constant_answer

__all__ = [
    "DOC_TYPES",
    "COLUMNS",
    "TEMPLATES",
    "BadRecords",
    "QuestionOnlyBound",
    "QuestionTemplate",
    "features",
    "generate",
    "inject_bad_records",
    "make_records",
    "question_only_bound",
    "render_document",
    "write_parquet",
]


@dataclasses.dataclass(frozen=True)
class QuestionTemplate:
    """One question and the answers it can have; the answer is uniform over ``values``."""

    name: str
    question: str
    values: tuple[str, ...]
    question_types: tuple[str, ...]


COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "cyan": (0, 200, 215),
    "blue": (31, 70, 220),
    "yellow": (250, 215, 20),
    "purple": (148, 60, 189),
}
STAMP_SIDES = ("top", "bottom", "left", "right", "none")
ITEM_COUNTS = ("1", "2", "3", "4", "5")
LOGO_SHAPES = ("circle", "star", "diamond", "plus", "box")
DOC_TYPES = ("invoice", "receipt", "form", "letter", "menu")

TEMPLATES: tuple[QuestionTemplate, ...] = (
    QuestionTemplate("colour", "What colour is the header band?", tuple(COLOURS), ("figure/diagram",)),
    QuestionTemplate("stamp", "Which side has the stamp?", STAMP_SIDES, ("layout",)),
    QuestionTemplate("items", "How many items are listed?", ITEM_COUNTS, ("table/list",)),
    QuestionTemplate("logo", "What shape is the logo?", LOGO_SHAPES, ("figure/diagram",)),
    QuestionTemplate("doctype", "What type of document is this?", DOC_TYPES, ("layout",)),
)
NUM_STYLES = 5  # house styles: style k uses the k-th value of every template
DEFAULT_COUPLING = 0.8
if any(len(t.values) != NUM_STYLES for t in TEMPLATES):
    raise RuntimeError("house styles need every template to have NUM_STYLES values")


def features() -> Any:
    """The ``datasets.Features`` of the DocVQA schema (imported lazily: ``datasets`` is slow to import)."""
    import datasets

    return datasets.Features(
        {
            "questionId": datasets.Value("int64"),
            "question": datasets.Value("string"),
            "question_types": datasets.List(datasets.Value("string")),
            "image": datasets.Image(),
            "docId": datasets.Value("int64"),
            "ucsf_document_id": datasets.Value("string"),
            "ucsf_document_page_no": datasets.Value("string"),
            "answers": datasets.List(datasets.Value("string")),
        }
    )


COLUMNS = tuple(
    ["questionId", "question", "question_types", "image", "docId", "ucsf_document_id"]
    + ["ucsf_document_page_no", "answers"]
)

# ---------------------------------------------------------------------------------------------------- rendering

_BODY_TINT = {"form": (185, 205, 245), "letter": (245, 228, 180)}
_INK = (40, 40, 40)
_UNIT = 128.0  # the layout is designed on a 128x128 grid and scaled


@functools.lru_cache(maxsize=32)
def _font(size: int, bold: bool = True) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    try:
        return ImageFont.truetype(name, size)
    except OSError:
        return ImageFont.load_default(size=size)


def _jitter_colour(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int = 10) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _logo(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float) -> None:
    white = (255, 255, 255)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=white)
    elif shape == "box":
        s = r * 0.82
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=white)
    elif shape == "diamond":
        draw.polygon(
            [(cx, cy - r * 1.1), (cx + r * 1.1, cy), (cx, cy + r * 1.1), (cx - r * 1.1, cy)], fill=white
        )
    elif shape == "plus":
        w = r * 0.34
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=white)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=white)
    elif shape == "star":
        points = []
        for k in range(10):
            rad = r * 1.15 if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + rad * math.cos(angle), cy + rad * math.sin(angle)))
        draw.polygon(points, fill=white)
    else:
        raise ValueError(f"unknown logo shape {shape!r}")


def render_document(attrs: dict[str, str], image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw one page for the attribute dict (keys = template names) as an RGB image of image_size^2 pixels."""
    k = image_size / _UNIT
    dx, dy = (float(v) for v in rng.integers(-2, 3, size=2))

    def box(x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
        return (x0 * k, y0 * k, x1 * k, y1 * k)

    doc_type = attrs["doctype"]
    img = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    # Body: the per-type layout signature.
    if doc_type in _BODY_TINT:
        draw.rectangle(box(0, 30, 128, 128), fill=_jitter_colour(_BODY_TINT[doc_type], rng, 6))
    elif doc_type == "receipt":
        grey = _jitter_colour((150, 150, 150), rng, 6)
        draw.rectangle(box(0, 30, 30 + dx, 128), fill=grey)
        draw.rectangle(box(98 + dx, 30, 128, 128), fill=grey)
    elif doc_type == "menu":
        draw.rectangle(box(2, 32, 126, 126), outline=(90, 50, 20), width=max(1, round(4 * k)))
    elif doc_type == "invoice":
        draw.rectangle(
            box(29 + dx, 46 + dy, 99 + dx, 100 + dy), outline=(0, 0, 0), width=max(1, round(2 * k))
        )
    # Header band with the logo on it.
    draw.rectangle(box(0, 0, 128, 30), fill=_jitter_colour(COLOURS[attrs["colour"]], rng))
    _logo(draw, attrs["logo"], (17 + dx) * k, 15 * k, 11 * k)
    # Title: the document type in large letters under the band.
    title_font = _font(max(6, round(11 * k)))
    draw.text(((64 + dx) * k, 39 * k), doc_type.upper(), fill=(0, 0, 0), font=title_font, anchor="mm")
    # Items: thick bars, one per listed item (ragged like text lines on letters).
    for i in range(int(attrs["items"])):
        right = 94 + dx if doc_type != "letter" else 70 + float(rng.integers(0, 25))
        y = 50 + dy + 10 * i
        draw.rectangle(box(34 + dx, y, right, y + 6), fill=_INK)
    # Small print for realism only: no question depends on it.
    small = _font(max(5, round(6 * k)), bold=False)
    draw.text((100 * k, 8 * k), f"No {rng.integers(1000, 9999)}", fill=(255, 255, 255), font=small)
    draw.text(
        (60 * k, 104 * k), f"{rng.integers(1, 99)}.{rng.integers(0, 99):02d}", fill=(90, 90, 90), font=small
    )
    # The stamp goes last so it covers whatever it lands on.
    stamp_centres = {"top": (64, 15), "bottom": (64, 113), "left": (16, 76), "right": (112, 76)}
    if attrs["stamp"] in stamp_centres:
        cx, cy = stamp_centres[attrs["stamp"]]
        draw.ellipse(box(cx - 12 + dx, cy - 12 + dy, cx + 12 + dx, cy + 12 + dy), fill=(0, 0, 0))
    return img


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------------ records


def make_records(
    num_records: int,
    image_size: int = 128,
    seed: int = 0,
    *,
    questions_per_doc: int = 2,
    coupling: float = DEFAULT_COUPLING,
    first_question_id: int = 0,
    first_doc_id: int = 0,
) -> list[dict[str, Any]]:
    """``num_records`` DocVQA rows: documents in a house style with probability ``coupling``, else with
    independent uniform attributes; ``questions_per_doc`` distinct templates each (uniformly chosen, so every
    template is asked equally often)."""
    if not 0.0 <= coupling <= 1.0:
        raise ValueError(f"coupling must be in [0, 1], got {coupling}")
    if not 1 <= questions_per_doc <= len(TEMPLATES):
        raise ValueError(f"questions_per_doc must be in [1, {len(TEMPLATES)}], got {questions_per_doc}")
    rng = np.random.default_rng(seed)
    records: list[dict[str, Any]] = []
    for doc in itertools.count(first_doc_id):
        if len(records) >= num_records:
            break
        if rng.random() < coupling:
            style = int(rng.integers(NUM_STYLES))
            attrs = {t.name: t.values[style] for t in TEMPLATES}
        else:
            attrs = {t.name: t.values[rng.integers(len(t.values))] for t in TEMPLATES}
        image = {"bytes": _png(render_document(attrs, image_size, rng)), "path": None}
        for t_index in rng.permutation(len(TEMPLATES))[:questions_per_doc]:
            if len(records) >= num_records:
                break
            template = TEMPLATES[t_index]
            records.append(
                {
                    "questionId": first_question_id + len(records),
                    "question": template.question,
                    "question_types": list(template.question_types),
                    "image": image,
                    "docId": doc,
                    "ucsf_document_id": f"syn{doc:06d}",
                    "ucsf_document_page_no": "1",
                    "answers": [attrs[template.name]],
                }
            )
    return records


@dataclasses.dataclass(frozen=True)
class BadRecords:
    """How many rows of each kind of trouble to inject (at distinct, seed-chosen positions).

    Skippable (loaders must drop and count them): ``corrupt_image`` (half garbage bytes, half a truncated PNG),
    ``missing_image`` (null image), ``empty_answers``. Truncatable: ``long_question``, ``long_answer`` (several
    hundred words). Valid but unusual image modes the loaders must convert: ``grayscale`` (L), ``rgba``,
    ``cmyk`` (JPEG), ``palette`` (P).
    """

    corrupt_image: int = 0
    missing_image: int = 0
    empty_answers: int = 0
    long_question: int = 0
    long_answer: int = 0
    grayscale: int = 0
    rgba: int = 0
    cmyk: int = 0
    palette: int = 0

    @property
    def num_skippable(self) -> int:
        return self.corrupt_image + self.missing_image + self.empty_answers

    @property
    def total(self) -> int:
        return sum(dataclasses.astuple(self))


def _reencode(image: dict[str, Any], mode: str) -> dict[str, Any]:
    img = Image.open(io.BytesIO(image["bytes"])).convert("RGB")
    buf = io.BytesIO()
    if mode == "CMYK":
        img.convert("CMYK").save(buf, format="JPEG", quality=95)
    elif mode == "P":
        img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(buf, format="PNG")
    else:
        img.convert(mode).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def inject_bad_records(
    records: Sequence[dict[str, Any]], bad: BadRecords, seed: int = 0
) -> tuple[list[dict[str, Any]], dict[str, list[int]]]:
    """Return a copy of ``records`` with ``bad`` applied, and {kind: [row positions]} of what was changed."""
    if bad.total > len(records):
        raise ValueError(f"cannot inject {bad.total} bad records into {len(records)} records")
    rng = np.random.default_rng(seed + 7919)
    positions = iter(rng.permutation(len(records))[: bad.total].tolist())
    out = [dict(r) for r in records]
    where: dict[str, list[int]] = {}
    filler = " ".join(["please"] * 400)
    for field in dataclasses.fields(bad):
        for j in range(getattr(bad, field.name)):
            pos = next(positions)
            where.setdefault(field.name, []).append(pos)
            rec = out[pos]
            if field.name == "corrupt_image":
                data = rec["image"]["bytes"]
                broken = data[: len(data) // 3] if j % 2 else b"this is not an image" + bytes(64)
                rec["image"] = {"bytes": broken, "path": None}
            elif field.name == "missing_image":
                rec["image"] = None
            elif field.name == "empty_answers":
                rec["answers"] = []
            elif field.name == "long_question":
                rec["question"] = f"{rec['question']} {filler}"
            elif field.name == "long_answer":
                rec["answers"] = [f"{rec['answers'][0]} {filler}"]
            else:
                mode = {"grayscale": "L", "rgba": "RGBA", "cmyk": "CMYK", "palette": "P"}[field.name]
                rec["image"] = _reencode(rec["image"], mode)
    return out, where


def write_parquet(records: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> str:
    """Write rows with the DocVQA features (the HF feature metadata goes in the parquet schema)."""
    import datasets

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    datasets.Dataset.from_list(list(records), features=features()).to_parquet(path)
    return path


def generate(
    out_dir: str | os.PathLike[str],
    num_train: int,
    num_val: int,
    image_size: int = 128,
    seed: int = 0,
    *,
    questions_per_doc: int = 2,
    coupling: float = DEFAULT_COUPLING,
    bad: BadRecords | None = None,
) -> dict[str, str]:
    """Write ``train.parquet`` (``num_train`` rows) and ``validation.parquet`` (``num_val`` rows) to ``out_dir``.

    Rows are questions; documents carry ``questions_per_doc`` questions each, so there are about
    ``num / questions_per_doc`` distinct images per split. Validation documents are fresh draws (another seed
    stream, disjoint ids). ``bad`` injects trouble into the training split only. Returns {split: path}.
    """
    train = make_records(num_train, image_size, seed, questions_per_doc=questions_per_doc, coupling=coupling)
    if bad is not None:
        train, _ = inject_bad_records(train, bad, seed)
    val = make_records(
        num_val,
        image_size,
        seed + 1_000_003,
        questions_per_doc=questions_per_doc,
        coupling=coupling,
        first_question_id=10_000_000,
        first_doc_id=10_000_000,
    )
    out_dir = os.fspath(out_dir)
    return {
        "train": write_parquet(train, os.path.join(out_dir, "train.parquet")),
        "validation": write_parquet(val, os.path.join(out_dir, "validation.parquet")),
    }


# ------------------------------------------------------------------------------------- question-only baseline


@dataclasses.dataclass(frozen=True)
class QuestionOnlyBound:
    """Best expected ANLS of a predictor that sees only the question: per template and mix-weighted overall."""

    per_template: dict[str, tuple[float, str]]  # name -> (expected ANLS, best constant answer)
    weights: dict[str, float]
    overall: float

    def __str__(self) -> str:
        lines = [
            f"question-only ANLS bound: {self.overall:.3f} (mix-weighted over {len(self.per_template)} templates)"
        ]
        for name, (score, best) in self.per_template.items():
            lines.append(
                f"  {name:<8} {score:.3f}  best constant answer {best!r}  weight {self.weights[name]:.2f}"
            )
        return "\n".join(lines)


def question_only_bound(
    templates: Sequence[QuestionTemplate] = TEMPLATES, threshold: float = 0.5
) -> QuestionOnlyBound:
    """Best expected ANLS from the question alone, from the generator's answer sets (uniform per template) and
    its question mix (every template equally often)."""
    per_template = {t.name: best_constant_answer(t.values, threshold) for t in templates}
    weights = {t.name: 1.0 / len(templates) for t in templates}
    overall = sum(weights[name] * score for name, (score, _) in per_template.items())
    return QuestionOnlyBound(per_template=per_template, weights=weights, overall=overall)


if __name__ == "__main__":  # pragma: no cover - manual preview
    import sys

    target = sys.argv[1] if len(sys.argv) > 1 else "/tmp/synthetic_docvqa"
    print(generate(target, 200, 50))
    print(question_only_bound())
