"""``python -m florence_jax.label`` on the 8 simulated CPU devices, against ``predict`` on one device.

The model is the shipped tiny reader (``florence_jax/assets/tiny_reader``: 64 px images, trained on synthetic
pages, so its ``<OD>`` boxes and captions differ from image to image and a row mix-up would show). Results must
be *equal* to predict's, not close: both parse the same generated tokens, and each device runs the single-device
program on its rows.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from florence_jax.label import output
from florence_jax.label.cli import main
from florence_jax.label.engine import ShardedGenerator
from florence_jax.label.output import LabelOutputError, coco_json, prepare_output
from florence_jax.processing import prepare_inputs, prompt_inputs

ROOT = Path(__file__).resolve().parent.parent
READER = str(ROOT / "florence_jax" / "assets" / "tiny_reader")
MAX_NEW = "40"
# Every prompt here (image tokens included) fits 32 tokens: with prompts padded to 32, all tasks share one compiled
# program on each side (the labeller's and predict's), which keeps this module fast.
BUCKET = 32
TASKS = ("<OD>", "<CAPTION>")


@pytest.fixture(scope="module")
def reader():
    from florence_jax.predict import load_model_and_processor

    return load_model_and_processor(READER)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """11 synthetic pages (one 96x48, so boxes are scaled back to another size), a nested one, and a file that is
    not an image."""
    from train.data.synthetic_detection import make_image

    directory = tmp_path_factory.mktemp("pages")
    rng = np.random.default_rng(0)
    for i in range(11):
        image = make_image(rng)[0]
        if i == 4:
            image = image.resize((96, 48))
        image.save(directory / f"page{i:02d}.png")
    (directory / "more").mkdir()
    make_image(rng)[0].save(directory / "more" / "page99.png")
    (directory / "page05b.png").write_bytes(b"not a PNG")
    return directory


def _argv(source, out, *extra) -> list[str]:
    return [str(source), "--out", str(out), "--model", READER, "--max_new_tokens", MAX_NEW, "--workers", "0",
            "--batch_size", "1", "--shard_size", "5", "--prompt_multiple", str(BUCKET), "--no_progress", *extra]


def _task_args(tasks=TASKS) -> list[str]:
    return [a for t in tasks for a in ("--task", t)]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def labelled(image_dir, tmp_path_factory, reader):
    """One complete run over the folder, counting the vision passes and generations."""
    out = tmp_path_factory.mktemp("labelled") / "out"
    calls = {"features": 0, "generate": 0}
    features, generate = ShardedGenerator.image_features, ShardedGenerator.generate

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    mp = pytest.MonkeyPatch()
    mp.setattr(ShardedGenerator, "image_features", count("features", features))
    mp.setattr(ShardedGenerator, "generate", count("generate", generate))
    try:
        assert main(_argv(image_dir, out, *_task_args(), "--draw", "2")) == 0
    finally:
        mp.undo()
    return out, calls


def test_labels_on_8_devices_equal_predict_on_one_device(labelled, image_dir, reader):
    import jax

    from florence_jax.predict import predict

    assert len(jax.local_devices()) == 8
    out, calls = labelled
    records = _lines(out / "labels.jsonl")
    paths = sorted(str(p) for p in image_dir.rglob("*.png"))
    assert [r["index"] for r in records] == list(range(len(paths)))
    assert [r["image"] for r in records] == [os.path.relpath(p, image_dir) for p in paths]

    model, processor = reader
    expected = {task: predict(model, processor, paths, task, batch_size=8, max_new_tokens=int(MAX_NEW),
                            prompt_multiple=BUCKET)
                for task in TASKS}
    for i, record in enumerate(records):
        if paths[i].endswith("page05b.png"):
            assert record.keys() == {"index", "image", "error"}
            assert record["error"] == expected["<OD>"][i]["error"]  # the same one-line reason predict gives
            continue
        assert record["result"] == {task: expected[task][i]["result"][task] for task in TASKS}
        with Image.open(paths[i]) as image:
            assert record["size"] == list(image.size)
    answers = [json.dumps(r["result"]) for r in records if "result" in r]
    assert len(set(answers)) == len(answers)  # every page is labelled differently: a row mix-up would show
    assert any(r["result"]["<OD>"]["bboxes"] for r in records if "result" in r)

    # 12 readable images in 3 shards of 5 items (one unreadable): 3 batches of at most 8 rows, each one vision
    # pass for both tasks.
    assert calls == {"features": 3, "generate": 6}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"]["items"] == 13 and manifest["complete"]["errors"] == 1
    assert sorted(p.name for p in (out / "shards").iterdir()) == [f"shard-0000{k}-of-00003.jsonl" for k in range(3)]
    assert len(list((out / "draw").iterdir())) == 4  # two images, two tasks each


def test_coco_output_loads_in_pycocotools_and_in_our_detection_data(labelled, image_dir):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from florence_jax.sources import open_source
    from train.data.templates import get_template

    out, _ = labelled
    path = out / "coco.od.json"
    coco = COCO(str(path))
    records = [r for r in _lines(out / "labels.jsonl") if "result" in r]
    assert len(coco.getImgIds()) == len(records)
    boxes = sum(len(r["result"]["<OD>"]["bboxes"]) for r in records)
    assert len(coco.getAnnIds()) == boxes > 0
    names = {c["name"] for c in coco.loadCats(coco.getCatIds())}
    assert names == {label for r in records for label in r["result"]["<OD>"]["labels"]}
    # As detections (score 1.0 each) against themselves: every box found, AP 1.
    detections = coco.loadRes(coco.dataset["annotations"])
    evaluation = COCOeval(coco, detections, "bbox")
    evaluation.params.areaRng = [[0, 1e10]] * 4
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)

    # The detection training path reads it as is: COCO records (file names relative to the folder) and the od
    # template that fine-tuning uses, with no record rejected.
    source = open_source(str(path))
    template = get_template("od")
    assert len(source) == len(records)
    for record in source:
        assert os.path.exists(record["image"])
        template(record)


def test_sigterm_finishes_the_shard_and_processes_label_their_own_shards(labelled, image_dir, tmp_path, monkeypatch):
    """Process 0 of 2 (shards 0 and 2) gets SIGTERM while labelling: it writes shard 0 and exits 0. Process 1
    labels shard 1; process 0's rerun labels shard 2 and merges: the same output as one uninterrupted process."""
    out = tmp_path / "out"
    write_shard = output.Layout.write_shard

    def write_then_terminate(self, shard, records):
        write_shard(self, shard, records)
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the next shard's batch is in flight

    def shards() -> list[str]:
        return sorted(p.name[:11] for p in (out / "shards").iterdir())

    monkeypatch.setattr(output.Layout, "write_shard", write_then_terminate)
    assert main(_argv(image_dir, out, *_task_args(), "--process_index", "0", "--process_count", "2")) == 0
    monkeypatch.undo()
    assert shards() == ["shard-00000"]
    assert main(_argv(image_dir, out, *_task_args(), "--process_index", "1", "--process_count", "2")) == 0
    assert shards() == ["shard-00000", "shard-00001"]
    assert not (out / "labels.jsonl").exists() and "complete" not in json.loads((out / "manifest.json").read_text())
    assert main(_argv(image_dir, out, *_task_args(), "--process_index", "0", "--process_count", "2")) == 0
    assert (out / "labels.jsonl").read_text() == (labelled[0] / "labels.jsonl").read_text()


@pytest.mark.slow  # a new process compiles its programs again (~25 s here)
def test_killed_mid_run_then_rerun_is_complete_without_duplicates(labelled, image_dir, tmp_path):
    """SIGKILL after the first shard (the child sleeps after each shard so the kill lands mid-run), then the same
    command again: the output equals an uninterrupted run's, one line per image."""
    out = tmp_path / "out"
    argv = _argv(image_dir, out, *_task_args())
    child = (
        "import sys, time\n"
        "from florence_jax.label import output\n"
        "write = output.Layout.write_shard\n"
        "def slow(self, shard, records):\n"
        "    write(self, shard, records)\n"
        "    time.sleep(60)\n"
        "output.Layout.write_shard = slow\n"
        "from florence_jax.label.cli import main\n"
        f"sys.exit(main({argv!r}))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    process = subprocess.Popen([sys.executable, "-c", child], env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "shards").exists() or not any(p.suffix == ".jsonl" for p in (out / "shards").iterdir()):
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        process.kill()
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    assert len([p for p in (out / "shards").iterdir() if p.suffix == ".jsonl"]) == 1
    assert not (out / "labels.jsonl").exists()

    assert main(argv) == 0
    records = _lines(out / "labels.jsonl")
    assert [r["index"] for r in records] == list(range(13))
    assert (out / "labels.jsonl").read_text() == (labelled[0] / "labels.jsonl").read_text()


@pytest.mark.parametrize("num_beams", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_per_image_text_from_a_parquet_column(num_beams, reader, image_dir, tmp_path):
    """Images stored as bytes in parquet, each with its own phrase; greedy and (slow: another compilation) beam
    search on 8 devices equal predict's on one."""
    import datasets

    from florence_jax.predict import predict

    paths = sorted(str(p) for p in image_dir.glob("page0[0-3].png"))
    phrases = ["a circle", "the band", None, "a box"]
    features = datasets.Features({"image": datasets.Image(), "phrase": datasets.Value("string")})
    table = datasets.Dataset.from_dict({"image": paths, "phrase": phrases}, features=features)
    table = table.cast_column("image", datasets.Image(decode=False))
    table = table.map(lambda row: {"image": {"bytes": Path(row["image"]["path"]).read_bytes(), "path": None}})
    table.to_parquet(str(tmp_path / "pages.parquet"))

    out = tmp_path / "out"
    task = "<CAPTION_TO_PHRASE_GROUNDING>"
    assert main(_argv(tmp_path / "pages.parquet", out, "--task", task, "--text_column", "phrase",
                      "--num_beams", str(num_beams))) == 0
    records = _lines(out / "labels.jsonl")
    assert records[2] == {"index": 2, "image": None, "error": "no text in column 'phrase'"}
    model, processor = reader
    for record, path, phrase in zip(records, paths, phrases):
        if phrase is None:
            continue
        (expected,) = predict(model, processor, [path], task, phrase, batch_size=8, max_new_tokens=int(MAX_NEW),
                              prompt_multiple=BUCKET, num_beams=num_beams)
        assert record["text"] == phrase and record["result"] == expected["result"]
    assert (out / "coco.caption_to_phrase_grounding.json").exists()


def test_region_tasks_read_a_coco_json_one_item_per_box(reader, tmp_path):
    from florence_jax.postprocess import coordinates_to_loc_tokens
    from florence_jax.predict import predict
    from train.data.synthetic_detection import make_split

    coco_path = make_split(tmp_path, "val", num_images=2, seed=3)
    data = json.loads(Path(coco_path).read_text())
    out = tmp_path / "out"
    assert main(_argv(coco_path, out, "--task", "<REGION_TO_CATEGORY>")) == 0
    records = _lines(out / "labels.jsonl")
    assert len(records) == len(data["annotations"]) >= 2
    model, processor = reader
    for record, annotation in zip(records, data["annotations"]):
        assert (record["annotation_id"], record["image_id"]) == (annotation["id"], annotation["image_id"])
        x, y, w, h = annotation["bbox"]
        image = tmp_path / next(i["file_name"] for i in data["images"] if i["id"] == annotation["image_id"])
        text = coordinates_to_loc_tokens([[x, y, x + w, y + h]], (64, 64))
        (expected,) = predict(model, processor, [image], "<REGION_TO_CATEGORY>", text, batch_size=8,
                              max_new_tokens=int(MAX_NEW), prompt_multiple=BUCKET)
        assert record["result"] == expected["result"] and record["text"] == text


def test_prompts_are_tokenized_as_the_processor_does(reader):
    _, processor = reader
    prompts = ["<OD>", "<CAPTION_TO_PHRASE_GROUNDING>a red circle", "What is in the image?",
               "<REGION_TO_CATEGORY><loc_1><loc_2><loc_300><loc_999>"]
    expected = prepare_inputs(processor, [Image.new("RGB", (8, 8))] * len(prompts), prompts)
    got = prompt_inputs(processor, prompts)
    for key in ("input_ids", "attention_mask"):
        np.testing.assert_array_equal(got[key], expected[key])


def test_coco_json_clips_boxes_names_empty_labels_and_filters_categories():
    records = [
        {"index": 0, "image": "a.png", "size": [100, 50],
         "result": {"<OD>": {"bboxes": [[-5, 10, 40, 60], [30, 20, 30, 40], [10, 10, 20, 20]],
                             "labels": ["cat", "dog", ""]}}},
        {"index": 1, "image": "b.png", "error": "cannot read image b.png"},
        {"index": 2, "image": None, "size": [10, 10], "result": {"<OD>": {"bboxes": [], "labels": []}}},
    ]
    coco, counts = coco_json(records, "<OD>")
    assert [c["name"] for c in coco["categories"]] == ["cat", "dog", "object"]  # every label found, sorted
    # Clipped to the 100x50 image; "dog"'s box is empty (x1 == x2) and left out.
    assert [a["bbox"] for a in coco["annotations"]] == [[0.0, 10.0, 40.0, 40.0], [10.0, 10.0, 10.0, 10.0]]
    assert [a["category_id"] for a in coco["annotations"]] == [1, 3]
    assert {a["score"] for a in coco["annotations"]} == {1.0}
    assert [(i["id"], i["file_name"]) for i in coco["images"]] == [(1, "a.png"), (3, "item-2")]
    assert counts == {"images": 2, "errors": 1, "empty_boxes": 1, "other_labels": 0, "annotations": 2}
    coco, counts = coco_json(records, "<OD>", categories=["dog", "cat"])
    assert [(c["id"], c["name"]) for c in coco["categories"]] == [(1, "dog"), (2, "cat")]
    assert counts["other_labels"] == 1 and [a["category_id"] for a in coco["annotations"]] == [2]


def test_an_output_folder_of_another_run_is_refused(tmp_path, image_dir, capsys):
    prepare_output(tmp_path / "out", {"tasks": ["<OD>"]}, 10, 5)
    prepare_output(tmp_path / "out", {"tasks": ["<OD>"]}, 10, 5)  # the same run continues
    with pytest.raises(LabelOutputError, match="differs in: tasks"):
        prepare_output(tmp_path / "out", {"tasks": ["<CAPTION>"]}, 10, 5)
    # The command checks before loading the model.
    assert main(_argv(image_dir, tmp_path / "out", "--task", "<OD>")) == 2
    err = capsys.readouterr().err
    assert "holds labels of another run" in err and "input" in err


@pytest.mark.parametrize("argv_extra, needle", [
    (["--task", "<CAPTION_TO_PHRASE_GROUNDING>"], "needs input text"),
    (["--task", "<od>"], "unknown task"),
    (["--task", "<OD>", "--task", "<OD>"], "given twice"),
    (["--task", "<REGION_TO_CATEGORY>"], "COCO JSON"),
    (["--task", "<CAPTION>", "--categories", "a,b"], "needs a box task"),
    (["--task", "<OD>", "--text", "a car"], "no task takes input text"),
    (["--task", "<OD>", "--task", "<CAPTION>", "--text_column", "q"], "--text_column is given but no task"),
])
def test_cli_errors_are_one_line_and_exit_2(argv_extra, needle, image_dir, tmp_path, capsys):
    assert main(_argv(image_dir, tmp_path / "out", *argv_extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and len(err.strip().splitlines()) == 1, err
