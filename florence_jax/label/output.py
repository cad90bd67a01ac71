"""The labeller's output folder: a manifest, shards written atomically, and the merged JSONL and COCO files.

Layout of ``OUT``::

    manifest.json                   the run (input, tasks, model, generation settings, item count, shard size);
                                    after the last shard also "complete": counts and output files
    shards/shard-00000-of-00012.jsonl   one JSON line per item of the shard, in item order
    labels.jsonl                    every shard in order: exactly one line per item (written at the end)
    coco.<task>.json                for box tasks: COCO detection JSON of the results (written at the end)
    draw/                           with --draw: drawings of the first items

A shard file appears only complete: it is written to a temporary file, flushed to disk and renamed
(``os.replace``), so a run killed at any moment leaves whole shards or none. A rerun of the same command finds the
finished shards and labels only the others; a manifest from another run (other input, tasks, model or settings)
is an error rather than a silent mix.

COCO scores: Florence-2 writes boxes as text and gives no confidence, so every annotation has ``"score": 1.0``.
mAP computed from these files therefore ranks boxes by nothing; use them as ground truth (a detection training
set) or compare them as a fixed set of detections (precision/recall at an IoU), not as a ranked list.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from florence_jax.postprocess import TASKS
from florence_jax.predict import task_slug

__all__ = ["BOX_PARSE_TYPES", "LabelOutputError", "Layout", "atomic_write", "box_tasks", "coco_json", "finalize",
           "prepare_output", "read_jsonl"]

FORMAT = "florence-jax-labels/1"
MANIFEST = "manifest.json"
BOX_PARSE_TYPES = frozenset({"description_with_bboxes", "bboxes", "phrase_grounding",
                             "description_with_bboxes_or_polygons"})
UNLABELLED = "object"
"""The category of a box whose label is empty (``<REGION_PROPOSAL>`` boxes have none)."""
SCORE = 1.0
"""Every COCO annotation's score: Florence-2 gives no confidences (see the module docstring)."""


class LabelOutputError(RuntimeError):
    """The output folder cannot take this run (another run's manifest, a damaged shard)."""


def atomic_write(path: str | os.PathLike, lines: Iterable[str]) -> None:
    """Write ``lines`` to ``path`` all or nothing: a temporary file beside it, flushed to disk, then renamed."""
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_jsonl(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def box_tasks(tasks: Sequence[str]) -> list[str]:
    """The tasks whose answers are labelled boxes (a COCO file each)."""
    return [t for t in tasks if t in TASKS and TASKS[t].parse_type in BOX_PARSE_TYPES]


@dataclass(frozen=True)
class Layout:
    """Where the shards of a run of ``num_items`` items in shards of ``shard_size`` go."""

    out: Path
    num_items: int
    shard_size: int

    @property
    def num_shards(self) -> int:
        return -(-self.num_items // self.shard_size)

    def shard_path(self, shard: int) -> Path:
        return self.out / "shards" / f"shard-{shard:05d}-of-{self.num_shards:05d}.jsonl"

    def shard_items(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_items))

    def is_done(self, shard: int) -> bool:
        """The shard's file exists (it is only ever renamed into place whole) with one line per item."""
        path = self.shard_path(shard)
        if not path.exists():
            return False
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip()) == len(self.shard_items(shard))

    def owned(self, process_index: int, process_count: int) -> list[int]:
        """The shards process ``process_index`` of ``process_count`` labels: every ``process_count``-th."""
        return list(range(process_index, self.num_shards, process_count))

    def write_shard(self, shard: int, records: Iterable[dict[str, Any]]) -> None:
        rows = sorted(records, key=lambda r: r["index"])
        if [r["index"] for r in rows] != list(self.shard_items(shard)):
            raise LabelOutputError(f"shard {shard}: the records do not cover its items exactly")
        atomic_write(self.shard_path(shard), (json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    def remove_stale_temporaries(self, shards: Iterable[int]) -> None:
        """Temporary files a killed run left for ``shards`` (only this process's shards: another process may be
        writing its own)."""
        for shard in shards:
            for tmp in glob.glob(glob.escape(str(self.shard_path(shard))) + ".tmp.*"):
                os.remove(tmp)


def prepare_output(out: str | os.PathLike, run: dict[str, Any], num_items: int, shard_size: int) -> Layout:
    """Create ``out`` for ``run`` or check that it holds the same run (then its finished shards count)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LabelOutputError(f"--out {out} is a file; pass a folder")
    (out / "shards").mkdir(parents=True, exist_ok=True)
    identity = {"format": FORMAT, "run": run, "num_items": num_items, "shard_size": shard_size}
    manifest = out / MANIFEST
    if manifest.exists():
        with open(manifest, encoding="utf-8") as f:
            saved = json.load(f)
        saved_identity = {key: saved.get(key) for key in identity}
        if saved_identity != json.loads(json.dumps(identity)):
            differ = sorted({k for k in run if saved.get("run", {}).get(k) != json.loads(json.dumps(run))[k]}
                            | {k for k in ("format", "num_items", "shard_size") if saved.get(k) != identity[k]})
            raise LabelOutputError(f"{out} holds labels of another run (it differs in: {', '.join(differ)}); pass "
                                   "another --out, or delete the folder to start over")
    else:
        atomic_write(manifest, [json.dumps(identity, indent=2) + "\n"])
    return Layout(out, num_items, shard_size)


# ------------------------------------------------------------------------------------------ merged outputs
def _boxes(answer: dict[str, Any]) -> list[tuple[list[float], str]]:
    labels = answer.get("bboxes_labels", answer.get("labels", []))
    return [(list(box), str(label)) for box, label in zip(answer.get("bboxes", []), labels)]


def coco_json(records: Iterable[dict[str, Any]], task: str, categories: Sequence[str] | None = None,
              image_root: str | None = None) -> tuple[dict[str, Any], dict[str, int]]:
    """One box task's results as a COCO detection dataset, and counts of what was left out.

    ``images``: every item with a result (``id`` = item index + 1, ``file_name`` its image name, joined to
    ``image_root`` when given (a folder input's names are relative to it: the file then opens from anywhere),
    ``width``, ``height``); ``categories``: ``categories`` in order if given (boxes with another label are left out and
    counted), else every label found, sorted (ids from 1); ``annotations``: ``bbox`` ``[x, y, w, h]`` clipped to
    the image (boxes empty after clipping are left out and counted), ``area``, ``iscrowd`` 0, ``score``
    :data:`SCORE`. An empty label becomes :data:`UNLABELLED`. ``records`` is iterated twice when categories are
    discovered (pass a list or a re-iterable)."""
    records = records if isinstance(records, list) else list(records)
    if categories is None:
        found = {(label.strip() or UNLABELLED) for r in records if "result" in r
                 for _, label in _boxes(r["result"].get(task) or {})}
        categories = sorted(found)
    category_id = {name: i + 1 for i, name in enumerate(categories)}
    images, annotations = [], []
    counts = {"images": 0, "errors": 0, "empty_boxes": 0, "other_labels": 0}
    for r in records:
        if "result" not in r:
            counts["errors"] += 1
            continue
        width, height = r["size"]
        image_id = r["index"] + 1
        name = r.get("image")
        if name is None:
            name = f"item-{r['index']}"  # an image stored as bytes, without a path
        elif image_root is not None:
            name = os.path.join(image_root, name)
        images.append({"id": image_id, "file_name": name,
                       "width": width, "height": height})
        for box, label in _boxes(r["result"].get(task) or {}):
            label = label.strip() or UNLABELLED
            if label not in category_id:
                counts["other_labels"] += 1
                continue
            x1, y1 = max(0.0, float(min(box[0], box[2]))), max(0.0, float(min(box[1], box[3])))
            x2, y2 = min(float(width), float(max(box[0], box[2]))), min(float(height), float(max(box[1], box[3])))
            if not (x2 > x1 and y2 > y1):
                counts["empty_boxes"] += 1
                continue
            w, h = x2 - x1, y2 - y1
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id[label],
                                "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": 0, "score": SCORE})
    counts["images"] = len(images)
    counts["annotations"] = len(annotations)
    info = {"description": f"{task} labels by florence-jax; Florence-2 gives no confidences: every score is {SCORE}"}
    return {"info": info, "images": images, "annotations": annotations,
            "categories": [{"id": category_id[n], "name": n} for n in categories]}, counts


def finalize(layout: Layout, tasks: Sequence[str], categories: Sequence[str] | None = None,
             image_root: str | None = None) -> dict[str, Any] | None:
    """When every shard is done: ``labels.jsonl`` (all shards in order, checked to hold each item exactly once),
    a COCO file per box task, and the manifest's "complete" entry, which is returned. None while shards are
    missing (another process may still be labelling them)."""
    if not all(layout.is_done(k) for k in range(layout.num_shards)):
        return None

    def lines() -> Iterator[str]:
        expected = 0
        for k in range(layout.num_shards):
            for record in read_jsonl(layout.shard_path(k)):
                if record["index"] != expected:
                    raise LabelOutputError(f"shard {k}: item {record['index']} where item {expected} belongs")
                expected += 1
                yield json.dumps(record, ensure_ascii=False) + "\n"
        if expected != layout.num_items:
            raise LabelOutputError(f"the shards hold {expected} items, not {layout.num_items}")

    atomic_write(layout.out / "labels.jsonl", lines())
    records = list(read_jsonl(layout.out / "labels.jsonl"))
    errors = sum(1 for r in records if "error" in r)
    summary: dict[str, Any] = {"items": len(records), "labelled": len(records) - errors, "errors": errors,
                               "labels": "labels.jsonl", "coco": {}}
    for task in box_tasks(tasks):
        coco, counts = coco_json(records, task, categories, image_root)
        name = f"coco.{task_slug(task)}.json"
        atomic_write(layout.out / name, [json.dumps(coco) + "\n"])
        summary["coco"][task] = {"file": name, **counts, "categories": len(coco["categories"])}
    manifest = layout.out / MANIFEST
    with open(manifest, encoding="utf-8") as f:
        saved = json.load(f)
    saved["complete"] = summary
    atomic_write(manifest, [json.dumps(saved, indent=2) + "\n"])
    return summary
