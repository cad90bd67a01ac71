"""Synthetic scenes for pretraining a tiny Florence-2 to see: captions, ``<OD>`` boxes and ``<OCR>`` words.

Why this exists: the CPU demo fine-tunes a *pretrained* tiny Florence-2 (``florence_jax/assets/tiny_reader``),
as users fine-tune ``Florence-2-base-ft``. A model that small cannot be pretrained on real images on a CPU, so
``scripts/pretrain_tiny.py`` teaches it on generated scenes, with three of Florence-2's own pretraining tasks:

- ``<CAPTION>``: a short description of what is on the page, in a fixed order: the page's tint and decoration,
  a colour band and the side it is on, the shapes (kind, colour, where), bars, a word;
- ``<OD>``: ``label<loc_x1><loc_y1><loc_x2><loc_y2>...`` for the band, the shapes and the word, in raster order
  (Florence-2's 1000 bins per axis), written as a COCO detection JSON so the ``od`` template builds the targets
  and validation scores them by COCO mAP, as for real detection data;
- ``<OCR>``: the large word printed on the page (only scenes that have one).

Scenes are compositions of generic parts (tints, frames, side strips, outlines, bands in 8 colours on any side,
6 kinds of shapes in any colour anywhere, 1-5 bars, large words from a list of 64): no part is a document,
and no question is asked. The synthetic documents of the fine-tuning demo (``train/data/synthetic.py``) are
one arrangement of such parts among many (a band on top with a white shape on it, bars, a black disc), so a
reader of scenes has the features the document questions need, but never saw a question or a short answer:
fine-tuning has to teach it the task, and before fine-tuning it answers questions with captions (ANLS near 0).

Parts never overlap (they are placed on a free-pixel mask; a part that finds no room is left out), so every
caption and box list describes exactly what is drawn. Deterministic given the seed.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from florence_jax.postprocess import quantize_coordinates

__all__ = ["OD_LABELS", "TASKS", "Scene", "corpus", "generate", "make_scene", "render", "task_records", "write_split"]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "cyan": (0, 200, 215),
    "blue": (31, 70, 220),
    "yellow": (250, 215, 20),
    "purple": (148, 60, 189),
    "green": (40, 160, 60),
    "orange": (245, 130, 20),
    "black": (20, 20, 20),
}
TINTS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "pale blue": (185, 205, 245),
    "pale yellow": (245, 228, 180),
    "pale grey": (215, 215, 215),
    "pale green": (200, 235, 200),
}
DECORATIONS = ("none", "frame", "strips", "outline")
SHAPES = ("circle", "star", "diamond", "plus", "box", "triangle")
SIDES = ("top", "bottom", "left", "right")
WORDS = (
    "CAT", "DOG", "SUN", "MAP", "BOX", "CUP", "PEN", "KEY", "BUS", "CAR", "HAT", "BAG", "EGG", "ICE", "OWL",
    "JAM", "TEA", "FIG", "NUT", "RAY", "BEE", "ANT", "ART", "INK", "OAK", "TOY", "WEB", "ZOO", "SKY", "BED",
    "FISH", "BIRD", "TREE", "LAMP", "BOOK", "SHIP", "STAR", "MOON", "RAIN", "SNOW", "WIND", "FIRE", "GOLD",
    "SALT", "MILK", "ROSE", "LEAF", "SEED", "HILL", "LAKE", "ROAD", "DOOR", "BELL", "DRUM", "KITE", "NEST",
    "MENU", "FORM", "NOTE", "BILL", "CARD", "MAIL", "FILE", "PLAN",
)  # fmt: skip
POSITIONS = (("top left", "top", "top right"), ("left", "centre", "right"), ("bottom left", "bottom", "bottom right"))
TASKS = ("caption", "od", "ocr")
PROMPTS = {"caption": "<CAPTION>", "od": "<OD>", "ocr": "<OCR>"}
_NUMBERS = ("no", "one", "two", "three", "four", "five")
_UNIT = 64.0  # parts are laid out on a 64x64 grid and scaled


@dataclasses.dataclass(frozen=True)
class Part:
    """One drawn thing: ``kind`` (band, shape, bars, word), its words for the caption, its box for ``<OD>``."""

    kind: str
    label: str  # <OD> label: "band", the shape's name, "text"; "" for parts without a box (bars)
    phrase: str  # its words in the caption
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels (the drawn extent)
    text: str = ""  # the word of a word part


@dataclasses.dataclass(frozen=True)
class Scene:
    image: Image.Image
    page: str  # "pale blue page with a frame"
    parts: tuple[Part, ...]

    def caption(self) -> str:
        phrases = [self.page] + [p.phrase for p in self.parts]
        return ". ".join(phrases) + "."

    def od_target(self) -> str:
        boxed = sorted((p for p in self.parts if p.label), key=lambda p: (p.box[1], p.box[0], p.label))
        if not boxed:
            return ""
        bins = quantize_coordinates(np.asarray([p.box for p in boxed], np.float64), self.image.size)
        return "".join(p.label + "".join(f"<loc_{int(v)}>" for v in row) for p, row in zip(boxed, bins))

    def ocr_target(self) -> str:
        return " ".join(p.text for p in self.parts if p.text)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.truetype("DejaVuSans-Bold.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int = 12) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "box":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "plus":
        w = r * 0.34
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif shape == "star":
        points = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.42
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + rad * math.cos(angle), cy + rad * math.sin(angle)))
        draw.polygon(points, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _where(cx: float, cy: float, size: int) -> str:
    col = min(2, int(3 * cx / size))
    row = min(2, int(3 * cy / size))
    return POSITIONS[row][col]


class _Free:
    """Which pixels are still free; parts reserve their box plus a margin so they never touch."""

    def __init__(self, size: int):
        self.size = size
        self.used = np.zeros((size, size), bool)

    def fits(self, box: tuple[float, float, float, float], margin: int = 1) -> bool:
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        if x1 < 0 or y1 < 0 or x2 > self.size or y2 > self.size or x2 <= x1 or y2 <= y1:
            return False
        return not self.used[max(0, y1 - margin) : y2 + margin, max(0, x1 - margin) : x2 + margin].any()

    def take(self, box: tuple[float, float, float, float]) -> None:
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        self.used[max(0, y1) : y2, max(0, x1) : x2] = True


def make_scene(rng: np.random.Generator, image_size: int = 64) -> Scene:
    """One random scene and its parts (see the module docstring for what may appear)."""
    k = image_size / _UNIT
    tint = str(rng.choice(list(TINTS), p=[0.5, 0.125, 0.125, 0.125, 0.125]))
    img = Image.new("RGB", (image_size, image_size), _jitter(TINTS[tint], rng, 6))
    draw = ImageDraw.Draw(img)
    free = _Free(image_size)
    decoration = str(rng.choice(DECORATIONS, p=[0.45, 0.2, 0.15, 0.2]))
    page = f"{tint} page"
    if decoration == "frame":  # a border round the page: its pixels are taken, parts go inside it
        width = max(1, round(2 * k))
        draw.rectangle((0, 0, image_size - 1, image_size - 1), outline=_jitter((90, 50, 20), rng, 8), width=width)
        free.take((0, 0, image_size, width + 1))
        free.take((0, image_size - width - 1, image_size, image_size))
        free.take((0, 0, width + 1, image_size))
        free.take((image_size - width - 1, 0, image_size, image_size))
        page += " with a frame"
    elif decoration == "strips":  # grey strips down both sides
        w = round(float(rng.uniform(7, 12)) * k)
        grey = _jitter((150, 150, 150), rng, 8)
        draw.rectangle((0, 0, w - 1, image_size - 1), fill=grey)
        draw.rectangle((image_size - w, 0, image_size - 1, image_size - 1), fill=grey)
        free.take((0, 0, w, image_size))
        free.take((image_size - w, 0, image_size, image_size))
        page += " with grey strips"
    parts: list[Part] = []

    # A colour band along one side, sometimes with a white shape on it.
    if rng.random() < 0.65 and decoration != "frame":
        side = str(rng.choice(SIDES, p=[0.4, 0.2, 0.2, 0.2]))
        colour = str(rng.choice([c for c in COLOURS if c != "black"]))
        t = round(float(rng.uniform(11, 17)) * k)
        band = {"top": (0, 0, image_size, t), "bottom": (0, image_size - t, image_size, image_size),
                "left": (0, 0, t, image_size), "right": (image_size - t, 0, image_size, image_size)}[side]
        draw.rectangle((band[0], band[1], band[2] - 1, band[3] - 1), fill=_jitter(COLOURS[colour], rng))
        free.take(band)
        phrase = f"{_a(colour)} {colour} band at the {side}"
        if rng.random() < 0.6:
            shape = str(rng.choice(SHAPES))
            r = t * float(rng.uniform(0.3, 0.4))
            along = float(rng.uniform(0.12, 0.88)) * image_size
            cx, cy = {"top": (along, t / 2), "bottom": (along, image_size - t / 2),
                      "left": (t / 2, along), "right": (image_size - t / 2, along)}[side]
            _draw_shape(draw, shape, cx, cy, r, (255, 255, 255))
            phrase += f" with a white {shape}"
        parts.append(Part("band", "band", phrase, tuple(float(v) for v in band)))

    # Bars: a block of 1-5 thick dark lines, like text lines or list items.
    if rng.random() < 0.5:
        n = int(rng.integers(1, 6))
        h, gap = 3 * k, 5 * k
        width = float(rng.uniform(18, 34)) * k
        for _ in range(20):
            x1 = float(rng.uniform(2 * k, image_size - width - 2 * k))
            y1 = float(rng.uniform(2 * k, image_size - (n - 1) * gap - h - 2 * k))
            block = (x1, y1, x1 + width, y1 + (n - 1) * gap + h)
            if free.fits(block):
                ink = _jitter((40, 40, 40), rng, 10)
                for i in range(n):
                    draw.rectangle((x1, y1 + i * gap, x1 + width, y1 + i * gap + h - 1), fill=ink)
                free.take(block)
                cx, cy = (block[0] + block[2]) / 2, (block[1] + block[3]) / 2
                what = "bar" if n == 1 else "bars"
                parts.append(Part("bars", "", f"{_NUMBERS[n]} {what} {_at(_where(cx, cy, image_size))}", block))
                break

    # A large word.
    if rng.random() < 0.45:
        word = str(rng.choice(WORDS))
        font = _font(max(6, round(float(rng.uniform(10, 14)) * k)))
        left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
        w, h = right - left, bottom - top
        for _ in range(20):
            if w + 4 > image_size:
                break
            x = float(rng.uniform(2, image_size - w - 2))
            y = float(rng.uniform(2, image_size - h - 2))
            box = (x, y, x + w, y + h)
            if free.fits(box):
                draw.text((x - left, y - top), word, fill=_jitter((20, 20, 20), rng, 10), font=font)
                free.take(box)
                parts.append(Part("word", "text", f"the word {word}", box, text=word))
                break

    # Shapes in colour (black discs included), anywhere there is room.
    for _ in range(int(rng.choice([0, 1, 2, 3], p=[0.15, 0.4, 0.3, 0.15]))):
        shape = str(rng.choice(SHAPES))
        colour = str(rng.choice(list(COLOURS)))
        r = float(rng.uniform(4, 9)) * k
        for _ in range(20):
            cx = float(rng.uniform(r + 1, image_size - r - 1))
            cy = float(rng.uniform(r + 1, image_size - r - 1))
            box = (cx - r, cy - r, cx + r, cy + r)
            if free.fits(box):
                _draw_shape(draw, shape, cx, cy, r, _jitter(COLOURS[colour], rng))
                free.take(box)
                phrase = f"{_a(colour)} {colour} {shape} {_at(_where(cx, cy, image_size))}"
                parts.append(Part("shape", shape, phrase, box))
                break

    if decoration == "outline":  # a thin dark rectangle round an empty region, drawn last where there is room
        for _ in range(20):
            w, h = (float(v) * k for v in rng.uniform(20, 40, 2))
            x1 = float(rng.uniform(2, image_size - w - 2))
            y1 = float(rng.uniform(2, image_size - h - 2))
            box = (x1, y1, x1 + w, y1 + h)
            if free.fits(box):
                draw.rectangle(box, outline=_jitter((0, 0, 0), rng, 10), width=max(1, round(k)))
                free.take(box)
                page += " with an empty box"
                break
    # The caption lists parts top to bottom, then left to right.
    parts.sort(key=lambda p: (p.kind != "band", p.box[1], p.box[0]))
    return Scene(img, page, tuple(parts))


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _at(where: str) -> str:
    return "in the centre" if where == "centre" else f"at the {where}"


def render(scene: Scene) -> bytes:
    buf = io.BytesIO()
    scene.image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def task_records(scene: Scene, image: dict[str, Any], scene_id: int) -> dict[str, dict[str, Any]]:
    """The scene's ``caption`` and ``ocr`` records (``mapped`` template columns: prompt, target, image); a task
    without a target for this scene (no word to read) gives none."""
    targets = {"caption": scene.caption(), "ocr": scene.ocr_target()}
    return {task: {"prompt": PROMPTS[task], "target": target, "image": image, "scene_id": scene_id}
            for task, target in targets.items() if target}


def _features():
    import datasets

    return datasets.Features({"prompt": datasets.Value("string"), "target": datasets.Value("string"),
                              "image": datasets.Image(), "scene_id": datasets.Value("int64")})


OD_LABELS = ("band", *SHAPES, "text")


def write_split(out_dir: str, split: str, num_scenes: int, image_size: int, seed: int, first_id: int) -> dict[str, str]:
    """One split of every task: ``caption_{split}.parquet``, ``ocr_{split}.parquet`` and, for ``<OD>``, a COCO
    detection JSON ``od_{split}.json`` with its PNGs under ``od_{split}/`` (read by the ``od`` template, scored by
    COCO mAP). Returns ``{task: path}``."""
    import datasets

    rng = np.random.default_rng(seed)
    records: dict[str, list[dict[str, Any]]] = {"caption": [], "ocr": []}
    image_dir = os.path.join(out_dir, f"od_{split}")
    os.makedirs(image_dir, exist_ok=True)
    categories = {name: k + 1 for k, name in enumerate(OD_LABELS)}
    images, annotations = [], []
    for n in range(num_scenes):
        scene = make_scene(rng, image_size)
        png = render(scene)
        scene_id = first_id + n
        for task, record in task_records(scene, {"bytes": png, "path": None}, scene_id).items():
            records[task].append(record)
        file_name = f"od_{split}/{scene_id:08d}.png"
        with open(os.path.join(out_dir, file_name), "wb") as f:
            f.write(png)
        images.append({"id": scene_id + 1, "file_name": file_name, "width": image_size, "height": image_size})
        for part in scene.parts:
            if part.label:
                x1, y1, x2, y2 = part.box
                annotations.append({"id": len(annotations) + 1, "image_id": scene_id + 1,
                                    "category_id": categories[part.label], "bbox": [x1, y1, x2 - x1, y2 - y1],
                                    "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    paths = {}
    for task, rows in records.items():
        paths[task] = os.path.join(out_dir, f"{task}_{split}.parquet")
        datasets.Dataset.from_list(rows, features=_features()).to_parquet(paths[task])
    paths["od"] = os.path.join(out_dir, f"od_{split}.json")
    with open(paths["od"], "w") as f:
        json.dump({"images": images, "annotations": annotations,
                   "categories": [{"id": i, "name": name, "supercategory": "part"} for name, i in categories.items()]}, f)
    return paths


def generate(out_dir: str | os.PathLike[str], num_train: int, num_val: int, image_size: int = 64,
             seed: int = 0) -> dict[str, dict[str, str]]:
    """Write the train and validation splits of every task (``write_split``); returns ``{task: {split: path}}``.
    Validation scenes are fresh draws (another seed stream, disjoint ids)."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    train = write_split(out_dir, "train", num_train, image_size, seed, 0)
    val = write_split(out_dir, "validation", num_val, image_size, seed + 1_000_003, 10_000_000)
    return {task: {"train": train[task], "validation": val[task]} for task in TASKS}


def corpus(num_scenes: int = 400, seed: int = 12345) -> Sequence[str]:
    """Caption text of some scenes: the words a tokenizer for these tasks should know."""
    rng = np.random.default_rng(seed)
    return [make_scene(rng, 64).caption() for _ in range(num_scenes)]
