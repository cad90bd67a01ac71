"""What the labeller reads: a folder or glob of images, or any :mod:`florence_jax.sources` kind (parquet/arrow
files, a ``save_to_disk`` folder, a JSONL file of image paths, a Hub dataset id, a COCO JSON), as one
random-access sequence of items; and :class:`ItemReader`, which turns an item into model input in grain workers.

An *item* is what gets one result line: an image, or for region tasks over a COCO JSON one annotation (its box
becomes the task's ``<loc_..>`` text, quantized against the decoded image's size).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from florence_jax.postprocess import TASKS, coordinates_to_loc_tokens
from florence_jax.predict import PredictError, load_image
from florence_jax.processing import ImageTransform
from florence_jax.sources import KINDS, CocoRecords, SourceError, SourceSpec, detect_kind, open_source

__all__ = ["IMAGE_SUFFIXES", "INPUT_KINDS", "REGION_TASKS", "Inputs", "ItemReader", "open_inputs"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
INPUT_KINDS = ("folder", "glob", *KINDS)
REGION_TASKS = frozenset({"<REGION_TO_CATEGORY>", "<REGION_TO_DESCRIPTION>", "<REGION_TO_OCR>",
                          "<REGION_TO_SEGMENTATION>"})
"""Tasks whose input is a box (``<loc_x1><loc_y1><loc_x2><loc_y2>``): over a COCO JSON, one item per annotation."""


@dataclass
class Inputs:
    """The items of one input. ``records[i]`` is a dict with the image under ``image_column``; ``root`` is the
    folder that names in the output are relative to (folder input), ``regions`` whether items are COCO
    annotations (``bbox`` in each record)."""

    records: Sequence[dict[str, Any]]
    kind: str
    image_column: str = "image"
    root: str | None = None
    regions: bool = False

    def __len__(self) -> int:
        return len(self.records)


def _is_image_file(path: str) -> bool:
    return path.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(path)


def _image_files(path: str) -> list[str]:
    """Image files in a folder (recursively) or matching a glob, sorted (a stable order is what makes shards
    resumable)."""
    if os.path.isdir(path):
        found = glob.glob(os.path.join(glob.escape(path), "**", "*"), recursive=True)
    else:
        found = glob.glob(path, recursive=True)
    return sorted(f for f in set(found) if _is_image_file(f))


def _kind(path: str) -> str:
    if os.path.isdir(path):
        if _image_files(path) and not (os.path.exists(os.path.join(path, "dataset_dict.json"))
                                       or os.path.exists(os.path.join(path, "state.json"))):
            return "folder"
        return detect_kind(path)
    if glob.has_magic(path) and any(_is_image_file(m) for m in glob.glob(path, recursive=True)):
        return "glob"
    return detect_kind(path)


class _RegionRecords(Sequence):
    """A COCO JSON's annotations, one record each: the image, its ids and the box."""

    def __init__(self, coco: CocoRecords):
        self.items = [(i, a) for i, record in enumerate(coco.records) for a in range(len(record["annotations"]))]
        self.coco = coco

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        image, ann = self.items[int(index)]
        record = self.coco.records[image]
        annotation = record["annotations"][ann]
        return {"image": record["image"], "file_name": record["file_name"], "image_id": record["image_id"],
                "annotation_id": annotation["id"], "bbox": list(annotation["bbox"]),
                "category": annotation["category"]}


def open_inputs(path: str, *, kind: str | None = None, split: str = "train", name: str | None = None,
                image_column: str = "image", image_root: str | None = None,
                tasks: Sequence[str] = ()) -> Inputs:
    """The items at ``path`` (see the module docstring); ``kind`` None detects it. Raises ``SourceError``."""
    kind = kind or _kind(path)
    if kind not in INPUT_KINDS:
        raise SourceError(f"input {path!r}: unknown kind {kind!r} (expected one of {INPUT_KINDS})")
    region_tasks = [t for t in tasks if t in REGION_TASKS]
    if region_tasks and kind != "coco":
        raise SourceError(f"{region_tasks[0]} takes a box: its input is a COCO JSON (one item per annotation)")
    if region_tasks and len(region_tasks) != len(tasks):
        raise SourceError("region tasks (one item per COCO annotation) and image tasks (one item per image) "
                          "cannot share a run; label them in two runs")
    if kind in ("folder", "glob"):
        files = _image_files(path)
        if not files:
            raise SourceError(f"input {path!r}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        root = os.path.abspath(path) if kind == "folder" else None
        return Inputs([{"image": f} for f in files], kind, "image", root)
    spec = SourceSpec(path, kind=kind, split=split, name=name, image_column=image_column, image_root=image_root)
    records = open_source(spec)
    if kind == "coco" and region_tasks:
        regions = _RegionRecords(records)  # type: ignore[arg-type]
        if not len(regions):
            raise SourceError(f"input {path!r}: a COCO JSON without annotations has no regions to label")
        return Inputs(regions, kind, "image", None, regions=True)
    if kind not in ("coco", "jsonl"):
        columns = getattr(records, "column_names", None)
        if columns is not None and image_column not in columns:
            raise SourceError(f"input {path!r}: no image column {image_column!r} (columns: {', '.join(columns)}); "
                              "pass --image_column")
    return Inputs(records, kind, "image" if kind == "coco" else image_column)


def image_name(record: dict[str, Any], image_column: str, root: str | None) -> str | None:
    """How an item's image is named in the output: its path (relative to a folder input), or None for an
    image stored as bytes without a path."""
    value = record.get(image_column)
    if isinstance(value, dict):
        value = value.get("path")
    if not isinstance(value, str | os.PathLike) or not value:
        return None
    value = os.fspath(value)
    return os.path.relpath(value, root) if root is not None else value


class ItemReader:
    """Item index -> ``{"index", "image" (name), "size" (width, height), "pixels" (float32 H, W, 3), "text"}``,
    or ``{"index", "image", "error"}`` for an item that cannot be labelled (unreadable image, missing text).
    Picklable: it runs in grain worker processes. ``text_column`` names the per-item text; for region items the
    text is the box as ``<loc_..>`` tokens of the decoded image."""

    def __init__(self, inputs: Inputs, transform: ImageTransform, text_column: str | None = None):
        self.records, self.image_column, self.root = inputs.records, inputs.image_column, inputs.root
        self.regions, self.transform, self.text_column = inputs.regions, transform, text_column

    def __call__(self, index: int) -> dict[str, Any]:
        index = int(index)
        out: dict[str, Any] = {"index": index, "image": None}
        try:
            record = self.records[index]
        except Exception as e:  # noqa: BLE001 - one unreadable row is one error line, not a dead run
            out["error"] = f"cannot read record {index}: {type(e).__name__}: {e}"
            return out
        out["image"] = image_name(record, self.image_column, self.root)
        if self.regions:
            out.update(image_id=record["image_id"], annotation_id=record["annotation_id"], bbox=record["bbox"])
        try:
            value = record.get(self.image_column)
            if value is None:
                raise PredictError(f"no image in column {self.image_column!r}")
            image = load_image(value)
            out["size"] = tuple(int(v) for v in image.size)
            out["pixels"] = np.asarray(self.transform(image), np.float32)
        except PredictError as e:
            out["error"] = str(e)
            return out
        except Exception as e:  # noqa: BLE001 - a transform failure on a strange image is that item's error
            out["error"] = f"cannot use image: {type(e).__name__}: {e}"
            return out
        if self.regions:
            x, y, w, h = record["bbox"]
            out["text"] = coordinates_to_loc_tokens([[x, y, x + w, y + h]], out["size"])
        elif self.text_column is not None:
            text = record.get(self.text_column)
            if not isinstance(text, str) or not text.strip():
                out.pop("pixels")
                out["error"] = f"no text in column {self.text_column!r}"
                return out
            out["text"] = text
        return out


def task_takes_text(task: str) -> bool:
    """Whether a task's prompt carries the item's text: a known task that takes input, or a free prompt."""
    return TASKS[task].takes_input if task in TASKS else True
