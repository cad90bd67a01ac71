"""Vision features computed once: for fine-tuning with a frozen vision tower and no image augmentation.

With the tower frozen, its output for a given image never changes, yet a plain train step recomputes it
every epoch (for Florence-2-base at 768x768 that is most of a frozen step's FLOPs). With
``data.cache_vision_features`` the run first passes every training record through the vision tower once
(inference mode: no stochastic depth), stores its NHWC output in a memory-mapped file in the workdir, and
the data pipeline then yields ``vision_features`` instead of ``pixel_values``; the train step runs the
projector (which trains) and the text model on them.

Each process caches the records it trains on (the same per-process stride as the training pipeline), in
its own file. A cache is reused when its key (model, image size, prompt layout, dtype, source length,
process shard) matches, and is written to a temporary name and renamed when complete, so a run killed
while building never reads a half-written cache. Records whose image cannot be read are marked and
skipped (and counted) in training as they would be without the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from train.step import image_layout_of, model_pixels

log = logging.getLogger("train")

_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


class FeatureStore:
    """Read side: ``store[index]`` -> features of record ``index`` (or None for a record that had no
    usable image). Picklable (opens its memory map lazily, so grain worker processes can use it)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta = json.loads((self.path / "meta.json").read_text())
        self.meta = meta
        self.shape = tuple(meta["shape"])
        self.dtype = _DTYPES[meta["dtype"]]
        self.indices = np.load(self.path / "indices.npy")
        self.valid = np.load(self.path / "valid.npy")
        self._row = {int(i): r for r, i in enumerate(self.indices.tolist())}
        self._mm = None

    def __getstate__(self):
        return {"path": str(self.path)}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def _map(self) -> np.ndarray:
        if self._mm is None:
            raw = np.memmap(self.path / "features.bin", dtype=np.uint16 if self.dtype.itemsize == 2 else np.float32,
                            mode="r", shape=self.shape)
            self._mm = raw.view(self.dtype) if self.dtype.itemsize == 2 else raw
        return self._mm

    def __contains__(self, index: int) -> bool:
        return int(index) in self._row

    def __getitem__(self, index: int) -> np.ndarray | None:
        row = self._row[int(index)]
        if not self.valid[row]:
            return None
        return np.asarray(self._map()[row])

    def __len__(self) -> int:
        return len(self.indices)


def cache_key(**parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_or_load(directory: str | os.PathLike, key_parts: dict[str, Any], pipeline, model, *,
                  dtype: str, progress: bool = True) -> FeatureStore:
    """The cache for this process's training records: reused when complete and its key matches, else
    computed with ``model`` (vision tower + projector, inference mode) over ``pipeline.eval`` batches of
    this process's shard, on its first local device, then published atomically."""
    key = cache_key(**key_parts, process=(jax.process_index(), jax.process_count()))
    final = Path(directory) / f"{key}.p{jax.process_index()}"
    if (final / "meta.json").exists():
        store = FeatureStore(final)
        log.info("reusing cached vision features %s (%d records)", final, len(store))
        return store
    tmp = final.with_name(final.name + ".partial")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)  # left by a run killed while building: never read, rebuilt
    tmp.mkdir(parents=True)
    previous, pipeline.encoder.features = pipeline.encoder.features, None  # build from pixels
    try:
        return _build(pipeline, model, tmp, final, key_parts, dtype, progress)
    finally:
        pipeline.encoder.features = previous


def _build(pipeline, model, tmp: Path, final: Path, key_parts, dtype: str, progress: bool) -> FeatureStore:
    ds = pipeline.eval(jax.process_index(), jax.process_count())
    index, count = jax.process_index(), jax.process_count()
    indices = np.arange(len(pipeline.source))[index::count]
    row_of = {int(i): r for r, i in enumerate(indices.tolist())}
    graphdef, state = nnx.split(model)
    # A process-local copy (params may be sharded). Put with a SingleDeviceSharding, not a bare device: an
    # array moved to a bare device keeps its old mesh in its type, and a kernel run per device under
    # shard_map (sharding.per_batch_shard) would then be split over devices this program does not run on.
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    state = jax.device_put(state, local)

    table = pipeline.encoder.pixel_table

    @jax.jit
    def features(state, pixels):
        m = nnx.merge(graphdef, state)
        m.eval()
        pixels = model_pixels(pixels, table, m.formulations.pixel_normalize)
        return m.vision_tower_features(pixels, image_layout=image_layout_of(pixels)).astype(jnp.float32)

    feature_shape = jax.eval_shape(features, state, jax.ShapeDtypeStruct(
        (1, *pipeline.encoder.pixel_shape), pipeline.encoder.pixel_dtype)).shape[1:]
    np_dtype = _DTYPES[dtype]
    store_dtype = np.uint16 if np_dtype.itemsize == 2 else np.float32
    mm = np.memmap(tmp / "features.bin", dtype=store_dtype, mode="w+", shape=(len(indices), *feature_shape))
    valid = np.zeros(len(indices), bool)

    iterator = iter(ds)
    bar = None
    if progress and jax.process_index() == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=pipeline.num_eval_batches(count), desc="vision features", dynamic_ncols=True)
    for batch in iterator:
        pixels = jax.device_put(batch["pixel_values"], local)
        out = np.asarray(jax.device_get(features(state, pixels))).astype(np_dtype)
        for j, i in enumerate(batch["index"].tolist()):
            if i < 0:
                continue
            r = row_of[i]
            mm[r] = out[j].view(store_dtype) if store_dtype is np.uint16 else out[j]
            valid[r] = True
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    mm.flush()
    del mm
    np.save(tmp / "indices.npy", indices)
    np.save(tmp / "valid.npy", valid)
    meta = {"shape": [len(indices), *feature_shape], "dtype": dtype, "key": key_parts,
            "valid": int(valid.sum()), "records": len(indices)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    os.replace(tmp, final)
    log.info("cached vision features for %d of %d records in %s", int(valid.sum()), len(indices), final)
    return FeatureStore(final)
