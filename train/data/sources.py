"""Training's data sources: :mod:`florence_jax.sources` (Hub, parquet/arrow, ``save_to_disk``, JSONL, COCO), plus
datasets resized once for training (``train/data/prepared.py``, kind ``prepared``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from florence_jax.sources import (
    KINDS,
    CocoRecords,
    DatasetRecords,
    JsonlRecords,
    SourceError,
    SourceSpec,
    detect_kind,
    slice_bounds,
    split_name_and_slice,
)
from florence_jax.sources import open_source as _open_source

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


def _open_prepared(spec: SourceSpec) -> Sequence[dict[str, Any]]:
    from train.data.prepared import PreparedRecords

    return PreparedRecords(spec.path)


def open_source(spec: SourceSpec | str) -> Sequence[dict[str, Any]]:
    """:func:`florence_jax.sources.open_source`, which also reads prepared datasets."""
    return _open_source(spec, {"prepared": _open_prepared})
