"""Datasets resized once: ArrayRecord files of ready uint8 pixels, so epochs 2..N skip decode and resize.

``python -m scripts.prepare_data --config CONFIG --out DIR`` writes ``DIR/train.array_record`` and
``DIR/validation.array_record``; training then reads them with ``--config.data.source=DIR/train.array_record
--config.data.eval_source=DIR/validation.array_record``. Each record keeps every field of the original row
(the template still reads ``question``/``answers``/...) and holds the image already converted to RGB and
resized exactly as the processor does it (the same :class:`~florence_jax.processing.ImageTransform`), as
raw ``(H, W, 3)`` uint8. The pipeline's resize of an image already at the target size is the identity, so
batches are bit-identical to those made from the original images.

A record whose image could not be read is written without one (and skipped, counted, at training time),
so record indices stay those of the original dataset.

Record layout (no pickle: safe to read from anywhere): ``b"FJR1"``, a 4-byte little-endian header length,
a JSON header (the row's other fields, ``image_shape`` or null, ``image_error``), then the pixel bytes.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

MAGIC = b"FJR1"
SUFFIX = ".array_record"


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, bytes):
        raise TypeError("bytes fields other than the image cannot be stored in a prepared record")
    return str(value)


def encode_record(record: dict[str, Any], pixels: np.ndarray | None, image_column: str = "image",
                  error: str | None = None) -> bytes:
    fields = {k: _jsonable(v) for k, v in record.items() if k != image_column}
    header = {"fields": fields, "image_column": image_column, "image_error": error,
              "image_shape": None if pixels is None else list(pixels.shape)}
    blob = json.dumps(header).encode()
    body = b"" if pixels is None else np.ascontiguousarray(pixels, np.uint8).tobytes()
    return MAGIC + struct.pack("<I", len(blob)) + blob + body


def decode_record(data: bytes) -> dict[str, Any]:
    if data[:4] != MAGIC:
        raise ValueError("not a prepared florence-jax record (bad magic)")
    (n,) = struct.unpack("<I", data[4:8])
    header = json.loads(data[8 : 8 + n])
    record = dict(header["fields"])
    shape = header["image_shape"]
    if shape is None:
        # Keeps the reason it was unusable, so training skips and counts it under the same name.
        record[header["image_column"]] = {"bytes": None, "path": None, "prepared_error": header["image_error"]}
    else:
        record[header["image_column"]] = np.frombuffer(data, np.uint8, offset=8 + n).reshape(shape)
    return record


def write_prepared(records: Iterable[bytes], path: str | os.PathLike) -> int:
    """Write already-encoded records to one ArrayRecord file (written to a temporary name, then renamed,
    so an interrupted preparation never leaves a file that looks complete)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    path = os.fspath(path)
    tmp = path + ".partial"
    writer = ArrayRecordWriter(tmp, "group_size:1")
    n = 0
    try:
        for data in records:
            writer.write(data)
            n += 1
    finally:
        writer.close()
    os.replace(tmp, path)
    return n


def expand(path: str) -> list[str]:
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(path, f"*{SUFFIX}")))
    return sorted(glob.glob(path)) if glob.has_magic(path) else ([path] if os.path.exists(path) else [])


class PreparedRecords(Sequence):
    """Prepared ArrayRecord files as a random-access sequence of record dicts (picklable for workers)."""

    def __init__(self, path: str):
        self.path = path
        self.files = expand(path)
        if not self.files:
            raise FileNotFoundError(f"no {SUFFIX} files at {path!r}")
        self._source = None
        self._len = len(self._open())

    def _open(self):
        if self._source is None:
            from array_record.python.array_record_data_source import ArrayRecordDataSource

            self._source = ArrayRecordDataSource(self.files)
        return self._source

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        if not -self._len <= index < self._len:
            raise IndexError(index)
        return decode_record(self._open()[int(index) % self._len])

    def __repr__(self) -> str:
        return f"PreparedRecords({self.path!r}, {self._len} records)"


def prepare_one(args: tuple[dict[str, Any], Any, str]) -> bytes:
    """Record -> encoded prepared record: decode, RGB, resize (the processor's transform), keep the rest."""
    record, transform, image_column = args
    from train.data.pipeline import load_image
    from train.data.templates import BadRecordError

    try:
        image = load_image(record.get(image_column))
        pixels = np.asarray(transform.resize(image), np.uint8)
        error = None
    except BadRecordError as e:
        pixels, error = None, e.reason
    return encode_record(record, pixels, image_column, error)


def prepare(source: Sequence[dict[str, Any]], transform, path: str | os.PathLike, *, workers: int = 0,
            image_column: str = "image", progress: bool = True) -> int:
    """Resize every record of ``source`` once into the ArrayRecord file ``path``; returns the count."""
    jobs = ((source[i], transform, image_column) for i in range(len(source)))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(source), desc=os.path.basename(os.fspath(path)), dynamic_ncols=True)

    def tick(it):
        for x in it:
            if bar is not None:
                bar.update(1)
            yield x

    try:
        if workers > 0:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(workers) as pool:
                return write_prepared(tick(pool.imap(prepare_one, jobs, chunksize=8)), path)
        return write_prepared(tick(map(prepare_one, jobs)), path)
    finally:
        if bar is not None:
            bar.close()
