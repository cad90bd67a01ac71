"""Datasets resized once into ArrayRecord: same batches as the original images, bad records kept as skips."""

import numpy as np

from florence_jax.processing import ImageTransform
from florence_jax.tiny_processor import build_tiny_processor
from train.data import synthetic
from train.data.pipeline import ExampleEncoder, PipelineConfig
from train.data.prepared import PreparedRecords, decode_record, encode_record, prepare
from train.data.sources import detect_kind, open_source


def test_record_round_trip_keeps_fields_and_pixels():
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    rec = {"question": "q?", "answers": ["a", "b"], "questionId": np.int64(3), "image": "ignored"}
    back = decode_record(encode_record(rec, pixels))
    assert back["question"] == "q?" and back["answers"] == ["a", "b"] and back["questionId"] == 3
    np.testing.assert_array_equal(back["image"], pixels)


def test_prepared_dataset_gives_identical_examples(tmp_path):
    paths = synthetic.generate(tmp_path / "data", 14, 2, image_size=48, seed=5,
                               bad=synthetic.BadRecords(corrupt_image=1, missing_image=1, grayscale=1, rgba=1,
                                                        cmyk=1, palette=1))
    processor = build_tiny_processor(image_size=64)
    original = open_source(paths["train"])
    out = tmp_path / "train.array_record"
    n = prepare(original, ImageTransform.from_processor(processor), out, workers=0, progress=False)
    assert n == len(original) and detect_kind(str(out)) == "prepared"
    prepared = open_source(str(out))
    assert isinstance(prepared, PreparedRecords) and len(prepared) == len(original)
    cfg = PipelineConfig(image_size=64, max_prompt_tokens=24, max_target_tokens=12)
    a, b = ExampleEncoder(original, processor, cfg), ExampleEncoder(prepared, processor, cfg)
    skipped = 0
    for i in range(len(original)):
        x, y = a(i), b(i)
        if "_skip" in x:  # unusable images stay unusable, under the same reason
            assert y.get("_skip") == x["_skip"]
            skipped += 1
            continue
        assert set(x) == set(y)
        for k in ("pixel_values", "input_ids", "attention_mask", "labels", "label_mask"):
            np.testing.assert_array_equal(x[k], y[k])  # bit-identical: the resize already happened
    assert skipped == 2
    # Workers give the same file contents.
    out2 = tmp_path / "train2.array_record"
    prepare(original, ImageTransform.from_processor(processor), out2, workers=2, progress=False)
    p2 = open_source(str(out2))
    for i in range(len(original)):
        r1, r2 = prepared[i], p2[i]
        assert r1.keys() == r2.keys()
        if isinstance(r1["image"], np.ndarray):
            np.testing.assert_array_equal(r1["image"], r2["image"])


def test_prepare_data_script_writes_both_splits(tmp_path, capsys):
    from scripts.prepare_data import main

    out = tmp_path / "prepared"
    assert main(["--config", "cpu_demo.py", "--out", str(out), "--config.data.synthetic.num_train=6",
                 "--config.data.synthetic.num_val=3"]) == 0
    assert len(open_source(str(out / "train.array_record"))) == 6
    assert len(open_source(str(out / "validation.array_record"))) == 3
    assert not list(out.glob("*.partial"))
    assert "--config.data.source=" in capsys.readouterr().out
