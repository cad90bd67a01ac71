"""Data sources, templates and the grain pipeline, on generator-written files and a tiny offline processor."""

import dataclasses
import json
import os

import numpy as np
import pytest
from PIL import Image

from train.config import ConfigError
from train.data import sources
from train.data.pipeline import DataPipeline, PipelineConfig, load_image
from train.data.sources import SourceError, SourceSpec, detect_kind, open_source
from train.data.synthetic import BadRecords, inject_bad_records, make_records, write_parquet
from train.data.templates import BadRecordError, docvqa, get_template, prefix_suffix

BAD = BadRecords(
    corrupt_image=2, missing_image=1, empty_answers=1, long_question=1, long_answer=1,
    grayscale=1, rgba=1, cmyk=1, palette=1,
)  # fmt: skip
NUM_RECORDS = 30
CFG = PipelineConfig(batch_size=4, max_prompt_tokens=32, max_target_tokens=8, read_threads=1, seed=0)


@pytest.fixture(scope="module")
def processor():
    from florence_jax.tiny_processor import build_tiny_processor

    return build_tiny_processor(image_size=64)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("docvqa")
    records, where = inject_bad_records(make_records(NUM_RECORDS, image_size=48, seed=0), BAD, seed=0)
    dirty = write_parquet(records, root / "dirty" / "train.parquet")
    clean = write_parquet(make_records(22, image_size=48, seed=1), root / "clean" / "train.parquet")
    skipped = {p for kind in ("corrupt_image", "missing_image", "empty_answers") for p in where[kind]}
    return {"root": root, "dirty": dirty, "clean": clean, "where": where, "skipped": skipped}


@pytest.fixture(scope="module")
def dirty(files, processor):
    return DataPipeline(open_source(files["dirty"]), processor, CFG)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


# ------------------------------------------------------------------------------------------------ sources


def test_parquet_source_kinds_and_schema(files):
    folder = os.path.dirname(files["clean"])
    assert detect_kind(files["clean"]) == "parquet"
    assert detect_kind(folder) == "parquet"
    assert detect_kind(os.path.join(folder, "*.parquet")) == "parquet"
    assert detect_kind("someone/docvqa") == "hub"
    for spec in (files["clean"], folder, SourceSpec(os.path.join(folder, "*.parquet"))):
        src = open_source(spec)
        assert len(src) == 22
        row = src[3]
        assert set(row) == {
            "questionId", "question", "question_types", "image", "docId",
            "ucsf_document_id", "ucsf_document_page_no", "answers",
        }  # fmt: skip
        # Images stay undecoded until a worker decodes them.
        assert isinstance(row["image"], dict) and row["image"]["bytes"][:4] == b"\x89PNG"
        assert load_image(row["image"]).size == (48, 48)


def test_disk_and_arrow_sources(files, tmp_path):
    import datasets

    ds = datasets.Dataset.from_parquet(files["clean"])
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(5))}).save_to_disk(tmp_path / "dd")
    ds.save_to_disk(tmp_path / "single")
    assert detect_kind(str(tmp_path / "dd")) == "disk"
    assert len(open_source(SourceSpec(str(tmp_path / "dd"), split="validation"))) == 5
    assert len(open_source(str(tmp_path / "single"))) == 22
    with pytest.raises(SourceError, match="no split 'test'"):
        open_source(SourceSpec(str(tmp_path / "dd"), split="test"))
    arrow = open_source(SourceSpec(str(tmp_path / "single" / "*.arrow")))
    assert len(arrow) == 22 and isinstance(arrow[0]["image"], dict)


def test_jsonl_source_resolves_relative_images(tmp_path, processor):
    (tmp_path / "imgs").mkdir()
    lines = []
    for i, colour in enumerate(["red", "blue", "green", "white", "black"]):
        Image.new("RGB", (40, 30), colour).save(tmp_path / "imgs" / f"{i}.png")
        lines.append(json.dumps({"image": f"imgs/{i}.png", "prefix": "<OCR>", "suffix": f"a {colour} page"}))
    lines.insert(2, "{not json")
    lines.append(json.dumps({"image": "imgs/missing.png", "prefix": "<OCR>", "suffix": "x"}))
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n\n")
    assert detect_kind(str(path)) == "jsonl"
    src = open_source(str(path))
    assert len(src) == 6 and src.invalid_lines == 1
    assert src[0]["image"] == str(tmp_path / "imgs" / "0.png")
    cfg = dataclasses.replace(CFG, template="prefix_suffix", batch_size=2, num_epochs=1, shuffle=False)
    it = iter(DataPipeline(src, processor, cfg).train(0, 1))
    batches = list(it)
    assert len(batches) == 2 and it.counters["skipped_missing_image"] == 1


def test_all_bad_training_data_raises_instead_of_spinning(tmp_path, processor):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        "".join(json.dumps({"image": f"{i}.png", "prefix": "p", "suffix": "s"}) + "\n" for i in range(3))
    )
    cfg = dataclasses.replace(CFG, template="prefix_suffix")  # repeats forever
    it = iter(DataPipeline(open_source(str(path)), processor, cfg).train(0, 1))
    # One error line (a setting to change), naming a record and why it was skipped.
    with pytest.raises(ConfigError, match=r"unusable.*missing_image.*for example record 0: missing_image: .*0\.png"):
        next(it)


def test_a_run_whose_first_records_are_all_unusable_stops_before_compiling(tmp_path, capsys):
    """Image paths written relative to the wrong folder: the run names the records at start, exit status 2."""
    from train.main import main

    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps({"image": f"pages/{i}.png", "prefix": "p", "suffix": "s"}) + "\n"
                            for i in range(40)))
    argv = ["--config", "cpu_demo.py", "--workdir", str(tmp_path / "run"), f"--config.data.source={path}",
            "--config.data.template=prefix_suffix", "--config.data.train_split=train[:-8]",
            "--config.data.eval_split=train[-8:]"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config.data: none of the first 16 training records can be used "
                          "({'missing_image': 16}); for example record 0: missing_image") and "pages/0.png" in err, err
    assert len(err.splitlines()) == 1 and not (tmp_path / "run" / "checkpoints").exists()


def test_unreadable_sources_fail_at_start_naming_the_path(tmp_path):
    missing = str(tmp_path / "nope" / "train.parquet")
    with pytest.raises(SourceError, match="nope"):
        open_source(missing)
    with pytest.raises(SourceError, match="nope"):
        open_source(str(tmp_path / "nope"))
    with pytest.raises(SourceError, match="nobody/no-such-dataset"):
        open_source("nobody/no-such-dataset")  # offline (conftest): not in the cache
    garbage = tmp_path / "bad.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(SourceError, match="bad.parquet"):
        open_source(str(garbage))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SourceError, match="no records"):
        open_source(str(empty))


# ---------------------------------------------------------------------------------------------- templates


def test_templates():
    ex = docvqa({"question": "What is the total?", "answers": ["12", " 12.00 ", ""], "image": None})
    assert (ex.prompt, ex.target, ex.references) == ("<DocVQA>What is the total?", "12", ("12", "12.00"))
    with pytest.raises(BadRecordError) as info:
        docvqa({"question": "q", "answers": [], "image": None})
    assert info.value.reason == "empty_answers"
    ex = prefix_suffix({"prefix": "<OCR>", "suffix": "hello", "image": "x.png"})
    assert (ex.prompt, ex.target, ex.references, ex.image) == ("<OCR>", "hello", ("hello",), "x.png")
    assert get_template("docvqa") is docvqa
    with pytest.raises(KeyError, match="registered"):
        get_template("nope")


# ----------------------------------------------------------------------------------------------- pipeline


def test_prompt_and_target_ids_match_the_processor(dirty, processor):
    enc = dirty.encoder
    image = Image.new("RGB", (64, 64))
    for prompt in (
        "<DocVQA>What colour is the header band?",
        "<OCR>",
        "<CAPTION_TO_PHRASE_GROUNDING>a red box",
    ):
        ids, cut = enc.prompt_ids(prompt)
        row = enc._text_arrays(ids, [2])["input_ids"]
        expected = processor(text=[prompt], images=[image], return_tensors="np")["input_ids"][0]
        assert not cut
        np.testing.assert_array_equal(row[: len(expected)], expected)
        assert (row[len(expected) :] == processor.tokenizer.pad_token_id).all()
    for target in ("red", "1,234.56", "bottom"):
        ids, _ = enc.target_ids(target)
        assert ids == processor.tokenizer(text_target=target)["input_ids"]
        assert ids[-1] == processor.tokenizer.eos_token_id


def test_batches_have_static_shapes_and_exact_masks(dirty, processor):
    spec = dirty.batch_spec()
    pad, eos = processor.tokenizer.pad_token_id, processor.tokenizer.eos_token_id
    for batch in _take(iter(dirty.train(0, 1)), 12):  # > one epoch
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == spec
        assert spec["pixel_values"][0] == (4, 64, 64, 3) and spec["input_ids"][0] == (4, 5 + 32)
        lengths = batch["label_mask"].sum(1).astype(int)
        positions = np.arange(batch["labels"].shape[1])
        np.testing.assert_array_equal(batch["label_mask"], (positions < lengths[:, None]).astype(np.float32))
        assert (batch["labels"][batch["label_mask"] == 0] == pad).all()
        assert (batch["labels"][np.arange(4), lengths - 1] == eos).all()
        assert (batch["input_ids"][:, :5] == processor.image_token_id).all()
        assert (batch["input_ids"][batch["attention_mask"] == 0] == pad).all()
        assert np.isfinite(batch["pixel_values"]).all()


def test_bad_records_are_skipped_and_counted_truncations_kept_valid(files, dirty, processor):
    cfg = dataclasses.replace(CFG, num_epochs=1, drop_remainder=False)
    pipeline = DataPipeline(dirty.source, processor, cfg)
    it = iter(pipeline.train(0, 1))
    batches = list(it)
    good = NUM_RECORDS - BAD.num_skippable
    assert it.counters["examples"] == good and it.counters["skipped"] == BAD.num_skippable
    assert it.counters["skipped_bad_image"] == 2
    assert it.counters["skipped_missing_image"] == 1 and it.counters["skipped_empty_answers"] == 1
    assert it.counters["truncated_prompt"] == 1 and it.counters["truncated_target"] == 1
    # Remainder is padded with label_mask 0 when not dropped: 26 real rows -> 7 batches.
    assert len(batches) == 7 and sum(int(b["label_mask"][:, 0].sum()) for b in batches) == good
    # The over-long question keeps its image tokens and ends in </s> at the last position.
    eos = processor.tokenizer.eos_token_id
    long_q = pipeline.encoder(files["where"]["long_question"][0])
    assert long_q["truncated_prompt"] and (long_q["input_ids"][:5] == processor.image_token_id).all()
    assert long_q["attention_mask"].all() and long_q["input_ids"][-1] == eos
    long_a = pipeline.encoder(files["where"]["long_answer"][0])
    assert long_a["truncated_target"] and long_a["label_mask"].all() and long_a["labels"][-1] == eos
    # Unusual image modes are converted, not skipped.
    for kind in ("grayscale", "rgba", "cmyk", "palette"):
        assert "_skip" not in pipeline.encoder(files["where"][kind][0])


def test_eval_counts_every_example_exactly_once(files, dirty):
    good = sorted(set(range(NUM_RECORDS)) - files["skipped"])
    batches = list(iter(dirty.eval(0, 1)))
    assert len(batches) == dirty.num_eval_batches(1) == 8
    seen = np.concatenate([b["index"][b["example_mask"] == 1] for b in batches])
    assert sorted(seen.tolist()) == good
    assert all((b["index"][b["example_mask"] == 0] == -1).all() for b in batches)
    assert all((b["label_mask"][b["example_mask"] == 0] == 0).all() for b in batches)
    refs = dirty.references(batches[0]["index"])
    assert refs[0] == tuple(dirty.source[int(batches[0]["index"][0])]["answers"])
    # Three processes: disjoint shards, together everything, the same number of batches each.
    shards = [list(iter(dirty.eval(i, 3))) for i in range(3)]
    assert {len(s) for s in shards} == {dirty.num_eval_batches(3)}
    per_shard = [np.concatenate([b["index"][b["example_mask"] == 1] for b in s]).tolist() for s in shards]
    assert sorted(sum(per_shard, [])) == good


def _row_keys(batches):
    """One hashable key per real row: (image, prompt) identifies a record here."""
    return [
        (b["pixel_values"][i].tobytes(), b["input_ids"][i].tobytes())
        for b in batches
        for i in range(len(b["input_ids"]))
        if b["label_mask"][i, 0] == 1
    ]


def test_training_shards_and_shuffle_are_deterministic(dirty, processor):
    cfg = dataclasses.replace(CFG, num_epochs=2, batch_size=1)
    pipe = DataPipeline(dirty.source, processor, cfg)
    a = [b["input_ids"] for b in iter(pipe.train(0, 1))]
    b = [b["input_ids"] for b in iter(pipe.train(0, 1))]
    assert len(a) == 2 * (NUM_RECORDS - BAD.num_skippable)
    assert all((x == y).all() for x, y in zip(a, b))
    first, second = np.stack(a[: len(a) // 2]), np.stack(a[len(a) // 2 :])
    assert not np.array_equal(first, second)  # reshuffled each epoch
    other_seed = DataPipeline(dirty.source, processor, dataclasses.replace(cfg, seed=1))
    c = [b["input_ids"] for b in iter(other_seed.train(0, 1))]
    assert not all((x == y).all() for x, y in zip(a, c))
    # Two processes: the same number of batches, disjoint records within the epoch.
    cfg2 = dataclasses.replace(CFG, num_epochs=1, drop_remainder=False)
    shards = [list(iter(DataPipeline(dirty.source, processor, cfg2).train(i, 2))) for i in range(2)]
    keys = [_row_keys(s) for s in shards]
    assert len(shards[0]) == len(shards[1]) == NUM_RECORDS // 8
    assert not set(keys[0]) & set(keys[1])


def test_process_shards_split_the_single_process_batches(files, processor):
    # 3 processes x batch 2 read, in process order, exactly the batches of 1 process x batch 6, across
    # an epoch boundary (22 records, 2 epochs): a multi-process run trains on the same global batches.
    clean = open_source(files["clean"])
    cfg = dataclasses.replace(CFG, num_epochs=2, batch_size=2)
    shards = [list(iter(DataPipeline(clean, processor, cfg).train(i, 3))) for i in range(3)]
    single = list(iter(DataPipeline(clean, processor, dataclasses.replace(cfg, batch_size=6)).train(0, 1)))
    assert len(single) == 44 // 6 and all(len(s) == len(single) for s in shards)
    for k, batch in enumerate(single):
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([s[k][key] for s in shards]), batch[key])
    # Resuming one process from its iterator state continues its own block sequence.
    it = iter(DataPipeline(clean, processor, cfg).train(1, 3))
    _take(it, 3)
    resumed = iter(DataPipeline(clean, processor, cfg).train(1, 3))
    resumed.set_state(it.get_state())
    np.testing.assert_array_equal(next(resumed)["input_ids"], shards[1][3]["input_ids"])


def test_training_shards_are_even(files, processor):
    # 22 clean records over 3 processes x batch 3: 2 global batches of 9, so every process runs 2 steps.
    clean = open_source(files["clean"])
    cfg = dataclasses.replace(CFG, num_epochs=1, batch_size=3)
    counts = [len(list(iter(DataPipeline(clean, processor, cfg).train(i, 3)))) for i in range(3)]
    assert counts == [2, 2, 2]


def test_a_data_position_of_another_worker_count_is_refused_with_what_to_set(dirty):
    """grain keeps a worker pipeline's position per worker: a resume with another data.num_workers cannot use it
    (before: a KeyError from inside grain). The error names the count to resume with."""
    it = iter(dirty.train(0, 1))
    _take(it, 1)
    state = it.get_state()
    assert state["workers"] == 0
    with pytest.raises(ConfigError, match=r"saved with data.num_workers=2 and this run has 0.*num_workers=2"):
        iter(dirty.train(0, 1)).set_state({**state, "workers": 2})
    # A checkpoint from before the count was saved: a position that does not fit is the same kind of error.
    legacy = {k: v for k, v in state.items() if k != "workers"}
    with pytest.raises(ConfigError, match="does not restore into this pipeline.*num_workers the checkpoint"):
        iter(dirty.train(0, 1)).set_state({**legacy, "parent": {"workers_state": {}}})
    iter(dirty.train(0, 1)).set_state(legacy)  # one that fits still restores


def test_iterator_state_restores_the_batch_sequence(dirty):
    it = iter(dirty.train(0, 1))
    _take(it, 3)
    state = it.get_state()
    json.dumps(state)  # checkpointable as JSON (what grain's orbax handler writes)
    expected = _take(it, 9)  # crosses the epoch boundary (26 good records / 4 per batch)
    restored = iter(dirty.train(0, 1))
    restored.set_state(state)
    got = _take(restored, 9)
    for e, g in zip(expected, got):
        assert e.keys() == g.keys()
        for key in e:
            np.testing.assert_array_equal(e[key], g[key])
    assert restored.counters == it.counters


def test_image_size_must_match_processor(files, processor):
    with pytest.raises(ValueError, match="image_size"):
        DataPipeline(open_source(files["clean"]), processor, dataclasses.replace(CFG, image_size=128))


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(dirty, processor):
    cfg = dataclasses.replace(CFG, worker_count=2)
    expected = _take(iter(dirty.train(0, 1)), 5)
    it = iter(DataPipeline(dirty.source, processor, cfg).train(0, 1))
    got = _take(it, 2)
    state = it.get_state()
    got += _take(it, 3)
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(e["input_ids"], g["input_ids"])
        np.testing.assert_array_equal(e["pixel_values"], g["pixel_values"])
    resumed = iter(DataPipeline(dirty.source, processor, cfg).train(0, 1))
    resumed.set_state(state)
    for e, g in zip(expected[2:], _take(resumed, 3)):
        np.testing.assert_array_equal(e["input_ids"], g["input_ids"])


def test_sources_module_exports():
    assert set(sources.KINDS) == {"hub", "parquet", "arrow", "disk", "jsonl", "coco", "prepared"}


def test_uint8_pixels_normalize_on_the_device_to_the_float32_ones_in_workers_too(dirty, processor):
    """uint8 batches (what training ships) are the resized image: normalize_pixels with the encoder's table
    gives, on the device, bit for bit the float32 pixels of the host transform; the text is unchanged."""
    import jax

    from florence_jax.processing import normalize_pixels

    cfg = dataclasses.replace(CFG, pixel_dtype="uint8", worker_count=2)
    pipe = DataPipeline(dirty.source, processor, cfg)
    assert pipe.batch_spec()["pixel_values"] == ((4, 64, 64, 3), np.dtype(np.uint8))
    assert dirty.encoder.pixel_table is None and pipe.encoder.pixel_table.shape == (256, 3)
    normalize = jax.jit(normalize_pixels)
    expected = _take(iter(dirty.train(0, 1)), 3)
    got = _take(iter(pipe.train(0, 1)), 3)
    for e, g in zip(expected, got):
        assert g["pixel_values"].dtype == np.uint8 and e["pixel_values"].dtype == np.float32
        np.testing.assert_array_equal(np.asarray(normalize(g["pixel_values"], pipe.encoder.pixel_table)),
                                      e["pixel_values"])
        for key in ("input_ids", "attention_mask", "labels", "label_mask"):
            np.testing.assert_array_equal(e[key], g[key])
    assert pipe.encoder.padding_example()["pixel_values"].dtype == np.uint8
    with pytest.raises(TypeError, match="takes uint8 pixels"):
        normalize_pixels(expected[0]["pixel_values"], pipe.encoder.pixel_table)
    with pytest.raises(ValueError, match="needs an image transform with .uint8"):
        DataPipeline(dirty.source, processor, dataclasses.replace(cfg, image_size=64),
                     image_transform=lambda image: np.zeros((64, 64, 3), np.float32))


def test_pixels_in_blocks_are_the_image_rearranged(files, processor):
    """image_layout "S2D" ships each image in 4x4 blocks of 48 channels (a TPU's first convolution's input
    layout), the same pixels and text as "NHWC"; the batch spec and the padding row say so."""
    from florence_jax.processing import space_to_depth

    cfg = dataclasses.replace(CFG, pixel_dtype="uint8")
    images = DataPipeline(open_source(files["dirty"]), processor, cfg)
    blocks = DataPipeline(open_source(files["dirty"]), processor, dataclasses.replace(cfg, image_layout="S2D"))
    assert blocks.batch_spec()["pixel_values"] == ((4, 16, 16, 48), np.dtype(np.uint8))
    assert blocks.encoder.padding_example()["pixel_values"].shape == (16, 16, 48)
    for e, g in zip(_take(iter(images.train(0, 1)), 2), _take(iter(blocks.train(0, 1)), 2)):
        assert g["pixel_values"].shape == (4, 16, 16, 48)
        np.testing.assert_array_equal(g["pixel_values"], space_to_depth(e["pixel_values"], 4))
        for key in ("input_ids", "labels", "label_mask"):
            np.testing.assert_array_equal(e[key], g[key])
    with pytest.raises(ValueError, match="image_layout must be"):
        DataPipeline(open_source(files["dirty"]), processor, dataclasses.replace(cfg, image_layout="NCHW"))


@pytest.mark.slow  # about 30 s; the uint8 workers test stays in the default suite
def test_bfloat16_pixels_are_the_float32_ones_rounded_in_workers_too(dirty, processor):
    import ml_dtypes

    cfg = dataclasses.replace(CFG, pixel_dtype="bfloat16", worker_count=2)
    pipe = DataPipeline(dirty.source, processor, cfg)
    assert pipe.batch_spec()["pixel_values"] == ((4, 64, 64, 3), np.dtype(ml_dtypes.bfloat16))
    expected = _take(iter(dirty.train(0, 1)), 3)
    got = _take(iter(pipe.train(0, 1)), 3)
    for e, g in zip(expected, got):
        assert g["pixel_values"].dtype == ml_dtypes.bfloat16
        # the same bits a bfloat16 model's first cast gives (round to nearest even), and nothing else changed
        np.testing.assert_array_equal(g["pixel_values"].view(np.uint16),
                                      e["pixel_values"].astype(ml_dtypes.bfloat16).view(np.uint16))
        np.testing.assert_array_equal(e["input_ids"], g["input_ids"])
    assert pipe.encoder.padding_example()["pixel_values"].dtype == ml_dtypes.bfloat16
    with pytest.raises(ValueError, match="pixel_dtype must be one of"):
        DataPipeline(dirty.source, processor, dataclasses.replace(CFG, pixel_dtype="float16"))
