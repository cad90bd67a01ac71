"""Detection and grounding: COCO -> Florence-2 location targets -> decoded boxes; COCO mAP against pycocotools;
a COCO sample through training with mAP evaluation."""

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from florence_jax.postprocess import post_process_generation
from train.data import synthetic_detection
from train.data.sources import CocoRecords, SourceError, detect_kind, open_source
from train.data.templates import get_template
from train.metrics import coco_map

# Two images of odd, non-square sizes, float boxes, a crowd region, an annotation with an unknown category
# (dropped at load) and an image without objects.
SIZES = {1: (640, 480), 2: (333, 517), 3: (96, 64)}
ANNOTATIONS = [
    (1, 1, [10.3, 20.7, 100.0, 50.2], 0),
    (1, 2, [300.0, 10.0, 339.0, 200.0], 0),  # x + w = 639: the last column
    (1, 1, [500.5, 300.25, 80.0, 179.75], 0),  # reaches the bottom edge (480)
    (1, 3, [0.0, 0.0, 640.0, 480.0], 1),  # crowd: not a target, an ignore region for mAP
    (2, 3, [1.0, 2.0, 3.0, 4.0], 0),  # a tiny box: 1 bin = 0.333 x 0.517 px
    (2, 2, [100.0, 400.0, 232.9, 116.9], 0),
    (2, 99, [5.0, 5.0, 10.0, 10.0], 0),  # unknown category id: dropped
]
CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 2, "name": "traffic light"}, {"id": 3, "name": "person"}]


def _write_coco(root: Path, sizes=SIZES, annotations=ANNOTATIONS, image_dir="images") -> Path:
    (root / image_dir).mkdir(parents=True, exist_ok=True)
    images = []
    for image_id, (w, h) in sizes.items():
        Image.new("RGB", (w, h), (image_id * 40, 90, 160)).save(root / image_dir / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": w, "height": h})
    anns = [{"id": i + 1, "image_id": im, "category_id": c, "bbox": b, "iscrowd": crowd, "area": b[2] * b[3]}
            for i, (im, c, b, crowd) in enumerate(annotations)]
    path = root / "annotations" / "instances.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES}))
    return path


@pytest.fixture(scope="module")
def processor():
    from florence_jax.tiny_processor import build_tiny_processor

    return build_tiny_processor(image_size=64)


def _decode(processor, target: str) -> str:
    """What generation would give for a perfect answer: the target's token ids decoded with special tokens."""
    ids = processor.tokenizer(text_target=target)["input_ids"]
    return processor.tokenizer.decode(ids, skip_special_tokens=False)


def _xyxy(bbox):
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


# ------------------------------------------------------------------------------------------ COCO source
def test_coco_json_is_detected_by_content_and_loads_one_record_per_image(tmp_path):
    path = _write_coco(tmp_path)
    assert detect_kind(str(path)) == "coco"
    with pytest.raises(SourceError, match="image folder"):  # file_name is relative to images/, not annotations/
        open_source(str(path))
    from train.data.sources import SourceSpec

    records = open_source(SourceSpec(str(path), image_root=str(tmp_path / "images")))
    assert isinstance(records, CocoRecords) and len(records) == 3 and records.invalid_annotations == 1
    first = records[0]
    assert first["width"] == 640 and first["height"] == 480 and Path(first["image"]).exists()
    assert [a["category"] for a in first["annotations"]] == ["cat", "traffic light", "cat", "person"]
    assert records[2]["annotations"] == []
    # An explicit kind works for any name; a JSON that is not COCO is refused with the reason.
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"rows": []}))
    with pytest.raises(SourceError, match="not COCO"):
        detect_kind(str(other))
    with pytest.raises(SourceError, match="not a COCO"):
        open_source(SourceSpec(str(other), kind="coco"))


def test_od_target_round_trips_within_half_a_bin_and_matches_transformers(tmp_path, processor):
    import torch

    from train.data.sources import SourceSpec

    records = open_source(SourceSpec(str(_write_coco(tmp_path)), image_root=str(tmp_path / "images")))
    od = get_template("od")
    for record in records:
        ex = od(record)
        w, h = ex.image_size
        assert ex.prompt == "<OD>" and (w, h) == SIZES[record["image_id"]]
        objects = sorted(
            [(_xyxy(a["bbox"]), a["category"]) for a in record["annotations"] if not a["iscrowd"]],
            key=lambda o: (o[0][1], o[0][0], o[1]),
        )
        assert re.fullmatch(r"([a-z ]+(<loc_\d+>){4})*", ex.target), ex.target
        # Quantization is transformers' own Florence2PostProcessor.quantize (floor(x / (size / 1000)), clamp).
        bins = [int(b) for b in re.findall(r"<loc_(\d+)>", ex.target)]
        if objects:
            ref = processor.post_processor.quantize(torch.tensor([b for b, _ in objects], dtype=torch.float64), (w, h))
            assert bins == ref.reshape(-1).tolist()
        # Generation text -> boxes, with our parser and transformers' (identical). A coordinate x in bin
        # b = floor(x / p) (p = size / 1000 pixels per bin) decodes to int((b + 0.5) * p): at most half a bin
        # above x, at most half a bin plus the 1 px integer truncation below it.
        text = _decode(processor, ex.target)
        ours = post_process_generation(text, "<OD>", (w, h))["<OD>"]
        theirs = processor.post_process_generation(text, task="<OD>", image_size=(w, h))["<OD>"]
        assert ours == theirs
        assert ours["labels"] == [label for _, label in objects]
        for decoded, (true, _) in zip(ours["bboxes"], objects):
            err = np.abs(np.asarray(decoded, float) - np.asarray(true))
            bound = np.asarray([w, h, w, h]) / 1000 / 2 + 1
            assert np.all(err <= bound + 1e-9), (decoded, true)
        # The crowd region stays in the ground truth (as an ignore region), not in the target.
        gt = ex.ground_truth
        assert gt["task"] == "<OD>" and len(gt["boxes"]) == len(record["annotations"])
        assert sum(gt["crowd"]) == sum(a["iscrowd"] for a in record["annotations"])
    assert od(records[2]).target == ""  # an image without objects teaches an empty answer


def test_grounding_and_region_templates(tmp_path, processor):
    from train.data.sources import SourceSpec
    from train.data.templates import BadRecordError

    records = open_source(SourceSpec(str(_write_coco(tmp_path)), image_root=str(tmp_path / "images")))
    for record in (records[0], records[1]):
        size = (record["width"], record["height"])
        ex = get_template("phrase_grounding")(record)
        phrase = ex.prompt.removeprefix("<CAPTION_TO_PHRASE_GROUNDING>")
        assert processor._construct_prompts([ex.prompt]) == [f"Locate the phrases in the caption: {phrase}"]
        parsed = post_process_generation(_decode(processor, ex.target), "<CAPTION_TO_PHRASE_GROUNDING>", size)
        boxes = parsed["<CAPTION_TO_PHRASE_GROUNDING>"]["bboxes"]
        true = [_xyxy(a["bbox"]) for a in record["annotations"] if a["category"] == phrase and not a["iscrowd"]]
        assert parsed["<CAPTION_TO_PHRASE_GROUNDING>"]["labels"] == [phrase] * len(true) and len(boxes) == len(true)
        assert set(ex.ground_truth["labels"]) == {phrase}

        region = get_template("region_to_description")(record)
        assert region.references == (region.target,) and region.ground_truth is None
        assert processor._construct_prompts([region.prompt])[0].startswith("What does the region <loc_")
        bins = [int(b) for b in re.findall(r"<loc_(\d+)>", region.prompt)]
        from florence_jax.postprocess import dequantize

        box = dequantize(np.asarray(bins).reshape(1, 4), size)[0]
        hits = [a for a in record["annotations"] if a["category"] == region.target and not a["iscrowd"]
                and np.all(np.abs(box - np.asarray(_xyxy(a["bbox"]))) <= np.tile(np.asarray(size) / 2000, 2) + 1)]
        assert hits, (region.prompt, region.target)
    with pytest.raises(BadRecordError) as e:
        get_template("phrase_grounding")(records[2])
    assert e.value.reason == "no_objects"


def test_bad_detection_records_are_skipped_with_a_reason(tmp_path, processor):
    from train.data.pipeline import DataPipeline, PipelineConfig
    from train.data.sources import SourceSpec

    sizes = {1: (64, 64), 2: (64, 64), 3: (64, 64), 4: (64, 64)}
    anns = [(1, 1, [4.0, 4.0, 20.0, 20.0], 0), (2, 1, [70.0, 4.0, 5.0, 5.0], 0), (3, 1, [4.0, 4.0, 0.0, 9.0], 0)]
    path = _write_coco(tmp_path, sizes, anns)
    data = json.loads(path.read_text())
    data["images"][3]["width"] = 100  # the file is 64 px wide: boxes would be relative to the wrong size
    path.write_text(json.dumps(data))
    src = open_source(SourceSpec(str(path), image_root=str(tmp_path / "images")))
    enc = DataPipeline(src, processor, PipelineConfig(batch_size=2, template="od", image_size=64, max_target_tokens=16)).encoder
    assert "pixel_values" in enc(0)
    assert [enc(i).get("_skip") for i in (1, 2, 3)] == ["bad_box", "bad_box", "image_size_mismatch"]


# ------------------------------------------------------------------------------------------ mAP
def _pycocotools(gts, preds, classes):
    """Reference: pycocotools COCOeval (bbox) on the same boxes; image ids follow list order."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images = [{"id": i + 1, "width": 1000, "height": 1000} for i in range(len(gts))]
    anns, dets = [], []
    for i, (g, p) in enumerate(zip(gts, preds)):
        for b, label, crowd in zip(g["boxes"], g["labels"], g.get("crowd", [False] * len(g["boxes"]))):
            w, h = b[2] - b[0], b[3] - b[1]
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": classes.index(label) + 1,
                         "bbox": [b[0], b[1], w, h], "area": w * h, "iscrowd": int(crowd)})
        for b, label, s in zip(p["boxes"], p["labels"], p.get("scores", [1.0] * len(p["boxes"]))):
            dets.append({"image_id": i + 1, "category_id": classes.index(label) + 1,
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": float(s)})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [
            {"id": k + 1, "name": c} for k, c in enumerate(classes)]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    per_class = {}
    for k, c in enumerate(classes):
        p = ev.eval["precision"][:, :, k, 0, -1]
        if (p > -1).any():
            per_class[c] = float(p[p > -1].mean())
    return ev.stats[:3], per_class


def _assert_equal_to_pycocotools(gts, preds, classes):
    ours = coco_map(gts, preds)
    (ref_map, ref_50, ref_75), ref_per_class = _pycocotools(gts, preds, classes)
    # Same arithmetic in float64, so equal up to summation order: 1e-12.
    assert ours.map == pytest.approx(ref_map, abs=1e-12)
    assert ours.map50 == pytest.approx(ref_50, abs=1e-12)
    assert ours.map75 == pytest.approx(ref_75, abs=1e-12)
    assert ours.per_class.keys() == ref_per_class.keys()
    for c in ref_per_class:
        assert ours.per_class[c] == pytest.approx(ref_per_class[c], abs=1e-12), c
    return ours


def test_map_equals_pycocotools_on_hand_made_predictions():
    classes = ["cat", "dog", "car", "kite"]
    gts = [
        {"boxes": [[10, 10, 60, 60], [100, 100, 180, 150], [200, 20, 260, 90]], "labels": ["cat", "dog", "cat"]},
        {"boxes": [[0, 0, 40, 40], [50, 50, 90, 95]], "labels": ["car", "car"]},
        {"boxes": [[30, 30, 130, 80]], "labels": ["dog"]},
        {"boxes": [[5, 5, 25, 25], [300, 300, 340, 360]], "labels": ["cat", "car"]},  # both missed
    ]
    preds = [
        # an exact hit, a loose hit (IoU 0.64), a duplicate of the exact hit, a box of a class with no
        # ground truth anywhere ("kite": not scored)
        {"boxes": [[10, 10, 60, 60], [100, 100, 170, 140], [12, 10, 60, 62], [0, 0, 10, 10]],
         "labels": ["cat", "dog", "cat", "kite"], "scores": [0.9, 0.8, 0.95, 0.7]},
        # one car found at IoU ~0.82, one wrong-class box on the other car, a false positive
        {"boxes": [[2, 0, 40, 42], [50, 50, 90, 95], [400, 400, 450, 450]],
         "labels": ["car", "dog", "car"], "scores": [0.6, 0.6, 0.6]},  # ties: generation order
        {"boxes": [[30, 30, 130, 80], [35, 30, 130, 85]], "labels": ["dog", "dog"], "scores": [0.5, 0.99]},
        {"boxes": [], "labels": []},
    ]
    ours = _assert_equal_to_pycocotools(gts, preds, classes)
    assert 0 < ours.map < ours.map50 < 1 and set(ours.per_class) == {"cat", "dog", "car"}
    assert ours.num_ground_truth == 8 and ours.num_predictions == 9
    # Hand-checkable ends: perfect answers score 1, answers of the wrong class score 0.
    assert coco_map(gts, [dict(g, scores=[1.0] * len(g["boxes"])) for g in gts]).map == 1.0
    wrong = [{"boxes": g["boxes"], "labels": ["kite"] * len(g["boxes"])} for g in gts]
    assert coco_map(gts, wrong).map == 0.0
    # No ground truth at all: undefined, -1 as in pycocotools.
    assert coco_map([{"boxes": [], "labels": []}], [{"boxes": [[0, 0, 1, 1]], "labels": ["cat"]}]).map == -1.0


@pytest.mark.parametrize("seed", range(12))
def test_map_equals_pycocotools_on_random_scenes_with_crowds_and_ties(seed):
    rng = np.random.default_rng(seed)
    classes = ["a", "b", "c"]
    gts, preds = [], []
    for _ in range(6):
        n = int(rng.integers(0, 6))
        xy = rng.integers(0, 80, (n, 2))
        boxes = np.concatenate([xy, xy + rng.integers(4, 40, (n, 2))], 1).astype(float)
        labels = [classes[k] for k in rng.integers(0, 3, n)]
        gts.append({"boxes": boxes.tolist(), "labels": labels, "crowd": (rng.random(n) < 0.15).tolist()})
        m = int(rng.integers(0, 8))
        src = boxes[rng.integers(0, n, m)] if n else np.tile([10.0, 10, 30, 30], (m, 1))
        p = src + rng.integers(-6, 7, (m, 4))
        p[:, 2:] = np.maximum(p[:, 2:], p[:, :2] + 1)  # proper boxes (pycocotools has no notion of inverted ones)
        plabels = ([labels[j] for j in rng.integers(0, n, m)] if n and seed % 2 else
                   [classes[k] for k in rng.integers(0, 3, m)])
        preds.append({"boxes": p.tolist(), "labels": plabels, "scores": np.round(rng.random(m), 1).tolist()})
    _assert_equal_to_pycocotools(gts, preds, classes)


# ------------------------------------------------------------------------------------------ evaluation path
def test_perfect_generations_on_synthetic_shapes_score_map_one(tmp_path, processor):
    """Targets decoded like generations and scored by the evaluator's path give mAP 1.0: the synthetic boxes
    lie on exact bins. Dropping one box per image lowers recall and the score matches pycocotools."""
    from train.evaluate import score_detections

    paths = synthetic_detection.generate(tmp_path, 2, 12, image_size=64, seed=1)
    src = open_source(paths["validation"])
    examples = [get_template("od")(r) for r in src]
    scores, preds = score_detections([_decode(processor, ex.target) for ex in examples], examples)
    assert scores["map"] == 1.0 and scores["map50"] == 1.0
    assert set(scores["ap_per_class"]) <= {"circle", "square", "triangle"} and scores["num_gt_boxes"] > 12
    for ex, pred in zip(examples, preds):
        assert pred["boxes"] == [[int(v) for v in b] for b in ex.ground_truth["boxes"]]
    texts = [_decode(processor, re.sub(r"^[a-z]+(<loc_\d+>){4}", "", ex.target)) for ex in examples]
    partial, preds = score_detections(texts, examples)
    gts = [{"boxes": ex.ground_truth["boxes"], "labels": ex.ground_truth["labels"]} for ex in examples]
    (ref_map, _, _), _ = _pycocotools(gts, preds, ["circle", "square", "triangle"])
    assert partial["map"] < 1.0 and partial["map"] == pytest.approx(ref_map, abs=1e-12)
    # Phrase grounding goes through the same path (its own parser, boxes of one category per image).
    grounding = [get_template("phrase_grounding")(r) for r in src]
    scores, _ = score_detections([_decode(processor, ex.target) for ex in grounding], grounding)
    assert scores["map"] == 1.0 and scores["num_gt_boxes"] == sum(len(ex.ground_truth["boxes"]) for ex in grounding)


def test_synthetic_shapes_are_tight_and_deterministic(tmp_path):
    a = synthetic_detection.generate(tmp_path / "a", 6, 2, image_size=64, seed=5)
    b = synthetic_detection.generate(tmp_path / "b", 6, 2, image_size=64, seed=5)
    assert Path(a["train"]).read_text() == Path(b["train"]).read_text()
    data = json.loads(Path(a["train"]).read_text())
    for image in data["images"]:
        pixels = np.asarray(Image.open(tmp_path / "a" / image["file_name"]).convert("RGB")).astype(int)
        background = pixels[-1, -1]  # the last row/column never holds an object
        drawn = np.abs(pixels - background).sum(-1) > 30
        mask = np.zeros_like(drawn)
        for ann in (x for x in data["annotations"] if x["image_id"] == image["id"]):
            x, y, w, h = ann["bbox"]
            assert x + w < 64 and y + h < 64 and x % 16 == 0 and y % 16 == 0 and w in (16, 32) and w == h
            box = drawn[y : y + h, x : x + w]
            # The shape touches all four sides of its box: the box is tight.
            assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()
            mask[y : y + h, x : x + w] = True
        assert not drawn[~mask].any()  # nothing drawn outside the boxes


def test_checkpointer_keeps_the_best_by_the_evaluation_score(tmp_path):
    import jax.numpy as jnp

    from train.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path, keep=1, async_save=False)
    for step, m in [(1, 0.9), (2, 0.1), (3, None), (4, 0.3), (5, None)]:
        metrics = None if m is None else {"map": m, "score": m}  # what the loop passes with metric map
        ckpt.save(step, {"w": jnp.full(3, step)}, {}, {}, metrics=metrics, force=True)
    ckpt.close()
    reopened = Checkpointer(tmp_path, keep=1)  # metrics are read back from disk
    assert sorted(reopened.manager.all_steps()) == [1, 5] and reopened.best_step() == 1
    reopened.close()


# ------------------------------------------------------------------------------------------ end to end
def test_coco_sample_trains_and_reports_map(tmp_path):
    from train.main import main

    paths = synthetic_detection.generate(tmp_path / "coco", 16, 8, image_size=64, seed=2)
    wd = tmp_path / "run"
    args = ["--config", "cpu_detection_demo.py", "--workdir", str(wd),
            f"--config.data.source={paths['train']}", f"--config.data.eval_source={paths['validation']}",
            "--config.data.format=coco", "--config.batch_size=8", "--config.eval.batch_size=8",
            "--config.max_steps=2", "--config.log_every_steps=1", "--config.eval_at_start=false",
            "--config.eval.max_new_tokens=6", "--config.export_at_end=false"]
    assert main(args) == 0
    evals = [json.loads(x) for x in (wd / "eval.jsonl").read_text().splitlines()]
    last = evals[-1]
    assert last["step"] == 2 and last["num_examples"] == 8 and "anls" not in last
    assert {"map", "map50", "map75", "ap_per_class", "num_gt_boxes", "num_pred_boxes"} <= set(last)
    assert 0.0 <= last["map"] <= last["map50"] <= 1.0
    summary = json.loads((wd / "summary.json").read_text())
    assert summary["best"] == {"score": last["map"], "step": 2} and last["score"] == last["map"]
    # The 16 examples of the 2 steps (not the batches the prefetcher read ahead), none skipped.
    assert summary["data_counters"]["examples"] == 16 and not summary["data_counters"].get("skipped")


def test_map_with_a_text_template_fails_before_compiling(capsys):
    from train.main import main

    assert main(["--config", "cpu_detection_demo.py", "--config.data.template=docvqa"]) == 2
    assert "metric='map' scores boxes" in capsys.readouterr().err
