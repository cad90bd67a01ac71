"""Cached vision features: training on them equals training on pixels with the tower frozen, and the
cache is reused, published atomically, and refused when the tower trains."""

import json
from pathlib import Path

import numpy as np
import pytest

from train.main import main

SMALL = [
    "--config.data.synthetic.num_train=40", "--config.data.synthetic.num_val=8",
    "--config.data.synthetic.image_size=64", "--config.data.image_size=64", "--config.batch_size=8",
    "--config.eval.batch_size=8", "--config.max_steps=4", "--config.log_every_steps=1",
    "--config.eval_at_start=false", "--config.eval.max_new_tokens=2", "--config.export_at_end=false",
    # Deterministic steps (no dropout, no stochastic depth), so both runs compute the same function.
    "--config.model.dropout=0", "--config.model.drop_path_rate=0", "--config.optim.freeze=^model\\.vision_tower\\.",
    "--config.optim.eps=1.0", "--config.optim.learning_rate=1.0", "--config.optim.schedule=constant",
    "--config.optim.warmup_steps=0",
]


def _losses(workdir):
    rows = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return np.asarray([r["loss"] for r in rows if "loss" in r])


def test_cached_features_train_like_pixels(tmp_path):
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    assert main(["--config", "cpu_demo.py", "--workdir", str(plain), *SMALL]) == 0
    assert main(["--config", "cpu_demo.py", "--workdir", str(cached), *SMALL,
                 "--config.data.cache_vision_features=true"]) == 0
    a, b = _losses(plain), _losses(cached)
    assert len(a) == len(b) == 4 and abs(a[-1] - a[0]) > 1e-3  # training moved the loss
    # Same function on the same batches (the projector trains in both); the only difference is where the
    # tower's output was computed (a separate jit), so float32 reassociation bounds the gap. (Adam with a tiny eps would turn that noise
    # into full-size updates of parameters whose gradient is ~0, hence eps=1 below: updates stay
    # proportional to gradients.)
    np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-5)
    stores = [p for p in (cached / "vision_features").iterdir()]
    assert len(stores) == 1 and not stores[0].name.endswith(".partial")
    meta = json.loads((stores[0] / "meta.json").read_text())
    # The demo's tiny tower: total stride 32, 128 channels in its last stage (NHWC output).
    assert meta["records"] == 40 and meta["valid"] == 40 and meta["shape"][1:] == [64 // 32, 64 // 32, 128]


@pytest.mark.slow  # about a minute; test_cached_features_train_like_pixels covers the store by default
def test_feature_store_reuse_and_partial_rebuild(tmp_path):
    import jax

    from florence_jax.sharding import make_mesh
    from florence_jax.tiny_processor import build_tiny_processor
    from train.config import ModelConfig
    from train.data import synthetic
    from train.data.pipeline import DataPipeline, PipelineConfig
    from train.data.sources import open_source
    from train.feature_cache import build_or_load
    from train.state import create_model

    paths = synthetic.generate(tmp_path / "data", 10, 2, image_size=64, seed=1,
                               bad=synthetic.BadRecords(corrupt_image=1))
    processor = build_tiny_processor(image_size=64)
    src = open_source(paths["train"])
    pipe = DataPipeline(src, processor, PipelineConfig(batch_size=4, image_size=64, shuffle=False))
    model = create_model(ModelConfig(name_or_path="random:tiny", dtype="float32"), make_mesh(1, 1, devices=jax.devices()[:1]),
                         tokenizer=processor.tokenizer)
    key = {"model": "random:tiny"}
    store = build_or_load(tmp_path / "cache", key, pipe, model, dtype="float32", progress=False)
    n = len(src)
    assert len(store) == n and int(store.valid.sum()) == n - 1  # the corrupt image is marked, not cached
    bad = [i for i in range(n) if store[i] is None]
    assert len(bad) == 1
    # Each cached row equals the model's features for that record's pixels.
    i = next(i for i in range(n) if store[i] is not None)
    pixels = pipe.encoder(i)["pixel_values"][None]
    model.eval()
    want = np.asarray(jax.jit(lambda m, x: m.vision_tower_features(x, image_layout="NHWC"))(model, pixels))[0]
    np.testing.assert_allclose(store[i], want, rtol=1e-5, atol=1e-5)
    # A second call reuses the published cache (same key): nothing is recomputed.
    stamp = (store.path / "features.bin").stat().st_mtime_ns
    again = build_or_load(tmp_path / "cache", key, pipe, model, dtype="float32", progress=False)
    assert again.path == store.path and (again.path / "features.bin").stat().st_mtime_ns == stamp
    # The pipeline then yields features instead of pixels, and skips the bad record with a count.
    pipe.encoder.features = again
    example = pipe.encoder(i)
    assert "pixel_values" not in example and example["vision_features"].shape == want.shape
    assert "_skip" in pipe.encoder(bad[0])
    # A half-built cache (killed run) is never read: it is removed and rebuilt.
    other = {"model": "random:tiny", "v": 2}
    from train.feature_cache import cache_key

    partial = tmp_path / "cache" / f"{cache_key(**other, process=(0, 1))}.p0.partial"
    partial.mkdir()
    (partial / "features.bin").write_bytes(b"garbage")
    rebuilt = build_or_load(tmp_path / "cache", other, pipe, model, dtype="bfloat16", progress=False)
    assert not partial.exists() and rebuilt.dtype.name == "bfloat16"
    np.testing.assert_allclose(np.asarray(rebuilt[i], np.float32), want, rtol=1e-2, atol=1e-2)


def test_cache_refused_when_the_tower_trains(tmp_path):
    with pytest.raises(ValueError, match="frozen vision tower"):
        main(["--config", "cpu_demo.py", "--workdir", str(tmp_path / "w"), *[a for a in SMALL if "freeze" not in a],
              "--config.optim.freeze=", "--config.data.cache_vision_features=true"])
