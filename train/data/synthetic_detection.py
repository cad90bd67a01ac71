"""Synthetic detection data: a few coloured shapes on a plain background, written as COCO JSON + PNGs.

Why this exists: the detection CPU demo fine-tunes a ~2M-parameter Florence-2 (the shipped tiny reader) in
minutes and must show real learning measured by COCO mAP, through the same code path as real COCO data (``CocoRecords``,
the ``od`` template, box decoding, ``coco_map``). What makes it learnable that fast:

- three classes, each one shape in one colour (``CLASSES``), 1 to ``max_objects`` objects per image that
  never overlap;
- every box edge lies on a grid of ``GRID`` cells per side and objects are 1 or 2 cells wide, so each
  coordinate is one of four ``<loc_N>`` tokens (0, 250, 500, 750) instead of any of 1000. At 128 px a cell is
  32 px, the vision tower's token stride, so where an object is comes down to which image tokens it covers;
- a cell is exactly 250 of the 1000 bins, so an edge at cell k is bin 250k, which decodes to the pixel
  ``int((250k + 0.5) * size / 1000) = k * size / 4`` exactly (for sizes under 2000 px); and no box touches the
  right or bottom edge, whose bin (clamped to 999) decodes half a bin short. So a perfect answer decodes to
  exactly the drawn boxes and scores mAP 1.0.

From random init, a first design (64 px, 8 cells per side, objects of 2-3 cells, i.e. positions finer than
the 32 px tokens) left the tiny model at the answer prior for 600 steps (mAP 0.001); 128 px with 4 cells
learned, slowly. From the pretrained reader, 64 px with 4 cells (16 px, half a token) learns in minutes.

Layout written by ``generate(out_dir, ...)``: ``train.json`` and ``validation.json`` (COCO: ``images``,
``annotations`` with ``bbox`` ``[x, y, w, h]``, ``categories``), images under ``train/`` and
``validation/`` with ``file_name`` relative to ``out_dir``. Deterministic given the seed; validation images
come from another seed stream.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["CLASSES", "GRID", "generate", "make_image", "make_split"]

CLASSES: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("circle", (220, 50, 40)),
    ("square", (40, 80, 220)),
    ("triangle", (30, 160, 60)),
)
"""(category name, colour): each class is one shape in one colour."""

GRID = 4
"""Cells per image side; box edges lie on cell boundaries (the last row and column stay empty)."""

SIZES = (1, 2)
"""Object sizes in cells."""


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour: tuple[int, ...]) -> None:
    x1, y1, x2, y2 = box  # pixel extent [x1, x2) x [y1, y2): the drawn shape fills its box exactly
    if shape == "circle":
        draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=colour)
    elif shape == "square":
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=colour)
    elif shape == "triangle":
        draw.polygon([(x1, y2 - 1), (x2 - 1, y2 - 1), ((x1 + x2 - 1) / 2, y1)], fill=colour)
    else:  # pragma: no cover - CLASSES lists the shapes above
        raise ValueError(shape)


def make_image(
    rng: np.random.Generator, image_size: int = 64, max_objects: int = 3
) -> tuple[Image.Image, list[tuple[int, tuple[int, int, int, int]]]]:
    """One image and its objects ``[(class index, (x1, y1, x2, y2) pixels), ...]`` (1..max_objects)."""
    if image_size % GRID:
        raise ValueError(f"image_size must be a multiple of {GRID}, got {image_size}")
    cell = image_size // GRID
    background = tuple(int(v) for v in rng.integers(215, 250, 3))
    image = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(image)
    occupied = np.zeros((GRID, GRID), bool)
    objects: list[tuple[int, tuple[int, int, int, int]]] = []
    wanted = int(rng.integers(1, max_objects + 1))
    for _ in range(50):  # placement attempts; a crowded grid just gets fewer objects (at least one)
        if len(objects) == wanted:
            break
        size = int(rng.choice(SIZES))
        # The last row/column of cells stays free: no box ends on the image's far edge.
        cx, cy = (int(v) for v in rng.integers(0, GRID - size, 2))
        if occupied[cy : cy + size, cx : cx + size].any():
            continue
        occupied[cy : cy + size, cx : cx + size] = True
        k = int(rng.integers(len(CLASSES)))
        box = (cx * cell, cy * cell, (cx + size) * cell, (cy + size) * cell)
        colour = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in CLASSES[k][1])
        _draw(draw, CLASSES[k][0], box, colour)
        objects.append((k, box))
    return image, objects


def make_split(
    out_dir: str | os.PathLike[str], split: str, num_images: int, image_size: int = 64, seed: int = 0,
    max_objects: int = 3, first_id: int = 1,
) -> str:
    """Write ``{split}.json`` and ``{split}/NNNNNN.png`` under ``out_dir``; returns the JSON path."""
    out_dir = os.fspath(out_dir)
    os.makedirs(os.path.join(out_dir, split), exist_ok=True)
    rng = np.random.default_rng(seed)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for n in range(num_images):
        image, objects = make_image(rng, image_size, max_objects)
        image_id = first_id + n
        file_name = f"{split}/{image_id:06d}.png"
        image.save(os.path.join(out_dir, file_name), format="PNG", compress_level=1)
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
        for k, (x1, y1, x2, y2) in objects:
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": k + 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
            })
    categories = [{"id": k + 1, "name": name, "supercategory": "shape"} for k, (name, _) in enumerate(CLASSES)]
    path = os.path.join(out_dir, f"{split}.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return path


def generate(
    out_dir: str | os.PathLike[str], num_train: int, num_val: int, image_size: int = 64, seed: int = 0,
    max_objects: int = 3,
) -> dict[str, str]:
    """Write the train and validation splits; returns {split: COCO JSON path}."""
    return {
        "train": make_split(out_dir, "train", num_train, image_size, seed, max_objects),
        "validation": make_split(out_dir, "validation", num_val, image_size, seed + 1_000_003, max_objects,
                                 first_id=10_000_000),
    }
