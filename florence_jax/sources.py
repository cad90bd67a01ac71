"""Open a data source as a random-access sequence of records (plain dicts).

Training (``train.data``) and the labeller (``florence_jax.label``) read their inputs here. Grain wants ``len()`` and ``[i]``; training wants the same code path for a Hub dataset, local parquet/arrow
files, a ``save_to_disk`` folder, a JSONL file of ``{"image": "relative/path.png", ...}`` lines and a COCO
detection JSON (one record per image, see ``CocoRecords``). Everything
except JSONL goes through ``datasets`` (so Hub ids honour ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` and the
cache like any ``load_dataset`` call).

Image columns are read *undecoded* (``{"bytes", "path"}`` dicts, or a path string for JSONL): decoding happens in
the grain workers, where a corrupt image is one skipped record instead of an exception raised while indexing
the dataset. A source that cannot be opened at all raises ``SourceError`` naming the path, at start.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

__all__ = [
    "KINDS",
    "CocoRecords",
    "DatasetRecords",
    "JsonlRecords",
    "SourceError",
    "SourceSpec",
    "detect_kind",
    "open_source",
    "slice_bounds",
    "split_name_and_slice",
]

log = logging.getLogger(__name__)

SourceKind = Literal["hub", "parquet", "arrow", "disk", "jsonl", "coco", "prepared"]
KINDS: tuple[str, ...] = ("hub", "parquet", "arrow", "disk", "jsonl", "coco", "prepared")


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class SourceError(RuntimeError):
    """A data source that cannot be read at all (missing, unreadable, empty, wrong split)."""


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """Where records come from.

    ``path``: a Hub dataset id (``"lmms-lab/DocVQA"``), a parquet/arrow file, glob or folder, a
    ``save_to_disk`` folder, or a ``.jsonl`` file. ``kind`` is detected from the path when None (see
    ``detect_kind``). ``split`` selects the split for Hub datasets, ``DatasetDict`` folders and folders whose
    parquet/arrow files name their splits as Hub repositories do (``train.parquet``, ``validation.parquet``,
    ``data/test-00000-of-00001.parquet``), and may carry a slice in ``datasets``' syntax (``"train[:-300]"``,
    ``"train[-300:]"``). A source with one split (JSONL, COCO, a parquet/arrow file or glob, a folder whose files
    name no split, a saved ``Dataset``) calls it ``"train"``: with ``split_must_exist`` another name is an error
    (training's validation split must not quietly be its training records); without, only the slice applies.
    ``name`` is the Hub config name (a subset, e.g. ``"chartqa"`` of ``HuggingFaceM4/the_cauldron``).
    ``image_column`` is the column holding images: it is read undecoded, and for JSONL relative paths in it are
    resolved against the JSONL file's folder. ``image_root`` is the folder a COCO JSON's ``file_name`` entries are
    relative to (None: the JSON's folder).
    """

    path: str
    kind: SourceKind | None = None
    split: str = "train"
    name: str | None = None
    revision: str | None = None
    cache_dir: str | None = None
    image_column: str = "image"
    image_root: str | None = None
    split_must_exist: bool = False


ONE_SPLIT = "train"
"""The name of a one-split source's split."""


def _one_split(spec: SourceSpec, what: str) -> None:
    """Check the split name asked of a source with one split (see :class:`SourceSpec`)."""
    name, _ = split_name_and_slice(spec.split)
    if spec.split_must_exist and name != ONE_SPLIT:
        raise SourceError(
            f"data source {spec.path!r}: {what} holds one split, {ONE_SPLIT!r}, and no {name!r} split; give the "
            f"{name} records as a source of their own, or hold out part of this one with slices "
            f"('{ONE_SPLIT}[:-N]' and '{ONE_SPLIT}[-N:]')")


def _named_split_files(path: str, suffix: str) -> dict[str, list[str]] | None:
    """A folder's ``suffix`` files by the split their names give, as ``datasets`` reads a Hub repository's
    files (``train.parquet``, ``data/validation-00000-of-00001.parquet``, ``test/x.parquet``); None when the
    names give no split (the folder is one split)."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        patterns = get_data_patterns(path)
    except Exception:  # noqa: BLE001 - datasets raises EmptyDatasetError and others: treat as one split
        return None
    if all(list(p) == ["**"] for p in patterns.values()):
        return None
    resolved = DataFilesDict.from_patterns(patterns, base_path=path)
    files = {str(name): sorted(f for f in found if f.endswith(suffix)) for name, found in resolved.items()}
    return {name: found for name, found in files.items() if found} or None


class _SlicedRecords(Sequence):
    """Records ``[start, stop)`` of another sequence; its other attributes (``categories``, ``path``) pass
    through. Picklable when the sequence is."""

    def __init__(self, records: Sequence[dict[str, Any]], start: int, stop: int):
        self.records, self.start, self.stop = records, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return self.records[self.start + index % len(self)]

    def __getattr__(self, name: str) -> Any:
        if name == "records":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.records, name)

    def __repr__(self) -> str:
        return f"{self.records!r}[{self.start}:{self.stop}]"


def _sliced(records: Sequence[dict[str, Any]], spec: SourceSpec) -> Sequence[dict[str, Any]]:
    """A one-split source's records within the slice of ``spec.split`` (its name checked by :func:`_one_split`)."""
    start, stop = slice_bounds(spec.split, len(records))
    return records if (start, stop) == (0, len(records)) else _SlicedRecords(records, start, stop)


def _expand(path: str, suffixes: tuple[str, ...]) -> list[str]:
    """Files for a file, a glob, or a folder (searched recursively for ``suffixes``), sorted for determinism."""
    if os.path.isdir(path):
        files = [
            f for suf in suffixes for f in glob.glob(os.path.join(path, "**", f"*{suf}"), recursive=True)
        ]
    else:
        files = glob.glob(path, recursive=True)
    return sorted(f for f in set(files) if os.path.isfile(f))


def detect_kind(path: str) -> SourceKind:
    """Guess the source kind from the path.

    ``*.jsonl`` -> jsonl; a ``*.json`` file whose top level has ``images``, ``annotations`` and
    ``categories`` -> coco; a folder with ``dataset_dict.json`` or ``state.json`` (what ``save_to_disk`` writes)
    -> disk; a parquet/arrow file, glob or folder of them -> parquet/arrow; anything else that does not exist
    locally and looks like ``name`` or ``owner/name`` -> hub. Missing local-looking paths are an error here,
    not a confusing Hub lookup.
    """
    lower = path.lower()
    if lower.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        return "jsonl"
    if lower.endswith(".array_record"):  # a dataset resized once by scripts/prepare_data.py
        return "prepared"
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_dict.json")) or os.path.exists(
            os.path.join(path, "state.json")
        ):
            return "disk"
        if _expand(path, (".parquet",)):
            return "parquet"
        if _expand(path, (".arrow",)):
            return "arrow"
        raise SourceError(
            f"data source {path!r}: folder holds no parquet/arrow files and is not a save_to_disk folder"
        )
    if lower.endswith(".json") and os.path.isfile(path):
        if _looks_like_coco(path):
            return "coco"
        raise SourceError(
            f"data source {path!r}: a JSON file that is not COCO detection data (no top-level 'images', "
            "'annotations' and 'categories'); JSON-lines data must be named *.jsonl"
        )
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith(".arrow"):
        return "arrow"
    if glob.has_magic(path) or os.path.exists(path):
        raise SourceError(f"data source {path!r}: cannot tell its kind from the name; pass kind= explicitly")
    if not _HUB_ID.fullmatch(path):
        raise SourceError(f"data source {path!r}: no such file or folder (and not a Hub dataset id)")
    return "hub"


class DatasetRecords(Sequence):
    """A ``datasets.Dataset`` as a sequence of dicts, with image columns left undecoded.

    Picklable (datasets pickles memory-mapped tables by file reference), so grain worker processes can index it.
    """

    def __init__(self, dataset: Any, description: str):
        import datasets

        nested = False
        for column, feature in dataset.features.items():
            if isinstance(feature, datasets.Image):
                if feature.decode:
                    dataset = dataset.cast_column(column, datasets.Image(decode=False))
            elif _holds_image(feature):
                nested = True
        self.dataset = dataset
        # Images inside lists (The Cauldron's ``images``): casting them to decode=False would rewrite the whole
        # table, so rows are read as Arrow and converted as stored (images stay {"bytes", "path"} dicts).
        self._arrow = dataset.with_format("arrow") if nested else None
        self.description = description

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        if not isinstance(index, int):
            index = int(index)
        if self._arrow is not None:
            return self._arrow[index].to_pylist()[0]
        return self.dataset[index]

    @property
    def column_names(self) -> list[str]:
        return list(self.dataset.column_names)

    def __repr__(self) -> str:
        return f"DatasetRecords({self.description}, {len(self)} records)"


def _holds_image(feature: Any) -> bool:
    """Whether a (nested) ``datasets`` feature contains an Image feature."""
    import datasets

    if isinstance(feature, datasets.Image):
        return True
    if isinstance(feature, dict):
        return any(_holds_image(f) for f in feature.values())
    if isinstance(feature, list | tuple):
        return any(_holds_image(f) for f in feature)
    inner = getattr(feature, "feature", None)
    return inner is not None and _holds_image(inner)


_SPLIT = re.compile(r"([\w.-]+)(\[[^\]]*\])?")


def split_name_and_slice(split: str) -> tuple[str, str | None]:
    """``"train[:-300]"`` -> ``("train", "[:-300]")``; ``"train"`` -> ``("train", None)``."""
    m = _SPLIT.fullmatch(split.strip())
    if m is None:
        raise SourceError(f"split {split!r}: expected a name with an optional slice, e.g. 'train' or 'train[:90%]'")
    return m.group(1), m.group(2)


def slice_bounds(split: str, n: int) -> tuple[int, int]:
    """Record range ``[start, stop)`` that the slice in ``split`` selects from ``n`` records (``datasets``'s
    slicing syntax: ``[:-300]``, ``[-300:]``, ``[10%:20%]``); the whole range when there is none."""
    import datasets

    _, bracket = split_name_and_slice(split)
    if bracket is None:
        return 0, n
    try:
        (instruction,) = datasets.ReadInstruction.from_spec("split" + bracket).to_absolute({"split": n})
    except Exception as e:  # noqa: BLE001 - datasets raises ValueError/AssertionError on bad specs
        raise SourceError(f"split {split!r}: bad slice ({type(e).__name__}: {e})") from e
    return int(instruction.from_), int(instruction.to)


class JsonlRecords(Sequence):
    """JSONL lines as dicts; relative image paths resolved against the file's folder.

    Lines that are not a JSON object are dropped at load with a warning and counted in ``invalid_lines``: one
    bad line should not stop a run, but it should be visible.
    """

    def __init__(self, path: str, image_column: str = "image"):
        self.path = path
        self.records: list[dict[str, Any]] = []
        self.invalid_lines = 0
        base = os.path.dirname(os.path.abspath(path))
        opener = _open_text_gz if path.endswith(".gz") else open
        with opener(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    log.warning("%s:%d: invalid JSON (%s); line skipped", path, lineno, e)
                    self.invalid_lines += 1
                    continue
                if not isinstance(record, dict):
                    log.warning("%s:%d: not a JSON object; line skipped", path, lineno)
                    self.invalid_lines += 1
                    continue
                image = record.get(image_column)
                if isinstance(image, str) and image and not os.path.isabs(image) and "://" not in image:
                    record[image_column] = os.path.join(base, image)
                self.records.append(record)

    def select(self, start: int, stop: int) -> JsonlRecords:
        """The records in ``[start, stop)`` (a split slice)."""
        out = object.__new__(JsonlRecords)
        out.path, out.invalid_lines, out.records = self.path, self.invalid_lines, self.records[start:stop]
        return out

    def __len__(self) -> int:
        return len(self.records)

    @property
    def column_names(self) -> list[str]:
        """Every key that occurs in some line (lines may differ)."""
        return sorted({key for record in self.records for key in record})

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        return dict(self.records[int(index)])

    def __repr__(self) -> str:
        return f"JsonlRecords({self.path!r}, {len(self)} records)"


def _looks_like_coco(path: str) -> bool:
    """Whether a JSON file is a COCO dataset, from its first 64 kB (COCO files are often hundreds of MB)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        head = f.read(1 << 16)
    if not head.lstrip().startswith("{"):
        return False
    if len(head) < 1 << 16:
        try:
            data = json.loads(head)
        except json.JSONDecodeError:
            return False
        return isinstance(data, dict) and {"images", "annotations", "categories"} <= set(data)
    # Large file: key order is free, but COCO writers put "images" (or "info"/"licenses") first.
    return bool(re.search(r'"(images|annotations|categories|info|licenses)"\s*:', head))


class CocoRecords(Sequence):
    """A COCO detection JSON as one record per image.

    Record: ``{"image": absolute path, "image_id", "file_name", "width", "height", "annotations": [{"id",
    "bbox": [x, y, w, h] (pixels, top-left origin), "category_id", "category" (its name), "iscrowd", "area"}]}``.
    Images without annotations are kept (an image with nothing to detect is a valid example). Annotations
    with an unknown ``category_id`` or a malformed ``bbox`` are dropped at load, with a warning and a count in
    ``invalid_annotations``; per-record checks (box inside the image, usable size) are the templates' job, so a
    bad record is skipped and counted by the pipeline like any other.
    """

    def __init__(self, path: str, image_root: str | None = None):
        self.path = path
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= set(data):
            raise SourceError(f"data source {path!r}: not a COCO detection JSON "
                              "(needs top-level 'images', 'annotations' and 'categories')")
        self.image_root = os.path.abspath(image_root or os.path.dirname(os.path.abspath(path)))
        self.categories = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        by_image: dict[Any, list[dict[str, Any]]] = {}
        self.invalid_annotations = 0
        for ann in data["annotations"]:
            bbox = ann.get("bbox")
            cat = ann.get("category_id")
            if (cat not in self.categories or not isinstance(bbox, list | tuple) or len(bbox) != 4
                    or not all(isinstance(v, int | float) for v in bbox)):
                self.invalid_annotations += 1
                continue
            by_image.setdefault(ann.get("image_id"), []).append({
                "id": ann.get("id"), "bbox": [float(v) for v in bbox], "category_id": int(cat),
                "category": self.categories[int(cat)], "iscrowd": int(ann.get("iscrowd", 0) or 0),
                "area": float(ann.get("area", bbox[2] * bbox[3])),
            })
        if self.invalid_annotations:
            log.warning("%s: %d annotations with an unknown category or a malformed bbox were dropped",
                        path, self.invalid_annotations)
        self.records: list[dict[str, Any]] = []
        for image in data["images"]:
            self.records.append({
                "image": os.path.join(self.image_root, str(image.get("file_name", ""))),
                "image_id": image.get("id"),
                "file_name": image.get("file_name"),
                "width": image.get("width"),
                "height": image.get("height"),
                "annotations": by_image.get(image.get("id"), []),
            })
        if self.records and not os.path.exists(self.records[0]["image"]):
            raise SourceError(
                f"data source {path!r}: image {self.records[0]['file_name']!r} is not in {self.image_root!r}; "
                "set the image folder (data.image_root / data.eval_image_root)"
            )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        record = self.records[int(index)]
        return {**record, "annotations": [dict(a) for a in record["annotations"]]}

    def __repr__(self) -> str:
        return f"CocoRecords({self.path!r}, {len(self)} images, {len(self.categories)} categories)"


def _open_text_gz(path: str, encoding: str) -> Any:
    import gzip

    return gzip.open(path, "rt", encoding=encoding)


def _open_datasets(spec: SourceSpec, kind: str) -> Any:
    import datasets

    if kind == "hub":
        ds = datasets.load_dataset(
            spec.path, spec.name, split=spec.split, revision=spec.revision, cache_dir=spec.cache_dir
        )
    elif kind in ("parquet", "arrow"):
        by_split = _named_split_files(spec.path, f".{kind}") if os.path.isdir(spec.path) else None
        if by_split is None:
            _one_split(spec, f"{kind} data whose file names give no split")
            files = _expand(spec.path, (f".{kind}",))
        else:
            name, _ = split_name_and_slice(spec.split)
            if name not in by_split:
                raise SourceError(f"data source {spec.path!r}: no split {name!r} (its files give {sorted(by_split)})")
            files = by_split[name]
        if not files:
            raise SourceError(f"data source {spec.path!r}: no {kind} files match")
        if kind == "parquet":
            ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=spec.cache_dir)
        else:
            parts = [datasets.Dataset.from_file(f) for f in files]
            ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    elif kind == "disk":
        ds = datasets.load_from_disk(spec.path)
        if isinstance(ds, datasets.DatasetDict):
            name, _ = split_name_and_slice(spec.split)
            if name not in ds:
                raise SourceError(
                    f"data source {spec.path!r}: no split {name!r} (has {sorted(ds.keys())})"
                )
            ds = ds[name]
        else:
            _one_split(spec, "a saved Dataset (not a DatasetDict)")
    else:
        raise SourceError(f"data source {spec.path!r}: unknown kind {kind!r} (expected one of {KINDS})")
    if not isinstance(ds, datasets.Dataset):
        raise SourceError(f"data source {spec.path!r}: expected one split, got {type(ds).__name__}")
    if kind != "hub":  # the Hub loader slices itself; local files have one split (or a chosen one): slice here
        start, stop = slice_bounds(spec.split, len(ds))
        if (start, stop) != (0, len(ds)):
            ds = ds.select(range(start, stop))
    return ds


def open_source(spec: SourceSpec | str,
                openers: Mapping[str, Callable[[SourceSpec], Sequence[dict[str, Any]]]] | None = None,
                ) -> Sequence[dict[str, Any]]:
    """Open ``spec`` (or a bare path) as a random-access sequence of record dicts.

    ``openers`` read further kinds (``{"prepared": ...}``: training's datasets resized once, read by
    ``train.data.sources``); a kind that none reads raises. Raises ``SourceError`` naming the path when it cannot
    be read at all or holds no records.
    """
    if isinstance(spec, str):
        spec = SourceSpec(spec)
    kind = spec.kind or detect_kind(spec.path)
    if kind not in KINDS:
        raise SourceError(f"data source {spec.path!r}: unknown kind {kind!r} (expected one of {KINDS})")
    try:
        if openers and kind in openers:
            _one_split(spec, f"{kind} data")
            records: Sequence[dict[str, Any]] = _sliced(openers[kind](spec), spec)
        elif kind == "jsonl":
            if not os.path.isfile(spec.path):
                raise SourceError(f"data source {spec.path!r}: no such JSONL file")
            _one_split(spec, "a JSONL file")
            jsonl = JsonlRecords(spec.path, spec.image_column)
            records = jsonl.select(*slice_bounds(spec.split, len(jsonl)))
        elif kind == "prepared":
            raise SourceError(f"data source {spec.path!r}: a prepared dataset (images resized once for training) "
                              "is read by training only")
        elif kind == "coco":
            if not os.path.isfile(spec.path):
                raise SourceError(f"data source {spec.path!r}: no such COCO JSON file")
            _one_split(spec, "a COCO JSON")
            records = _sliced(CocoRecords(spec.path, spec.image_root), spec)
        else:
            description = f"{kind}:{spec.path}" + (f"/{spec.name}" if spec.name else "") + f"[{spec.split}]"
            records = DatasetRecords(_open_datasets(spec, kind), description)
    except SourceError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to open is reported the same way, with its cause
        raise SourceError(
            f"cannot read data source {spec.path!r} (kind={kind}): {type(e).__name__}: {e}"
        ) from e
    if len(records) == 0:
        raise SourceError(f"data source {spec.path!r} (kind={kind}) holds no records")
    return records
