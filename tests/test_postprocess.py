"""florence_jax.postprocess against transformers' Florence2Processor.post_process_generation.

Every crafted generation is written the way ``batch_decode(..., skip_special_tokens=False)``
returns it (decoder start ``</s>``, then ``<s>``, the answer, ``</s>``, padding), and is checked to
round-trip through the tokenizer, so it is a string a model could actually produce.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from florence_jax.postprocess import (
    DEFAULT_POST_PROCESSOR_CONFIG,
    PARSE_TYPES,
    TASKS,
    coordinates_to_loc_tokens,
    default_post_processor_config,
    dequantize,
    post_process_generation,
    quantize_coordinates,
)
from florence_jax.tiny_processor import build_tiny_processor


def _locs(*bins: int) -> str:
    return "".join(f"<loc_{b}>" for b in bins)


def _gen(answer: str, pad: int = 0) -> str:
    return "</s><s>" + answer + "</s>" + "<pad>" * pad


QUAD_A = _locs(100, 100, 200, 100, 200, 200, 100, 200)
QUAD_B = _locs(300, 310, 420, 305, 425, 380, 298, 385)
BOX_A = _locs(53, 334, 933, 775)
BOX_B = _locs(425, 504, 474, 516)
BOX_C = _locs(0, 0, 999, 999)
POLY_A = _locs(279, 379, 282, 379, 290, 373, 293, 373, 298, 369, 301, 369)
POLY_B = _locs(10, 20, 30, 20, 30, 40, 10, 40)

# (task, generation). Grouped by parser; each group mixes well-formed and malformed answers.
CASES: list[tuple[str, str]] = [
    # ---- OCR with regions (quad boxes) ----
    ("<OCR_WITH_REGION>", _gen("Hello" + QUAD_A + "World" + QUAD_B)),
    ("<OCR_WITH_REGION>", _gen("INVOICE No. 12345" + QUAD_A + " Total: $1,234.56 " + QUAD_B, pad=3)),
    ("<OCR_WITH_REGION>", _gen("Größe café" + QUAD_A)),  # non-ASCII OCR text is kept
    ("<OCR_WITH_REGION>", _gen("Hello" + QUAD_A + "World" + _locs(1, 2, 3, 4, 5, 6, 7))),  # truncated quad
    ("<OCR_WITH_REGION>", _gen("Hello" + QUAD_A + "trailing text with no region")),
    ("<OCR_WITH_REGION>", _gen(QUAD_A + "Hello" + QUAD_B)),  # quad first: consumed as the "text"
    ("<OCR_WITH_REGION>", _gen("edge" + _locs(999, 0, 1000, 0, 1000, 1000, 999, 1000))),  # <loc_1000>
    ("<OCR_WITH_REGION>", _gen("")),
    ("<OCR_WITH_REGION>", ""),
    # ---- object detection / dense captions (labelled boxes) ----
    ("<OD>", _gen("car" + BOX_A + "door handle" + BOX_B, pad=2)),
    ("<OD>", _gen("person" + BOX_A + BOX_B + "dog" + BOX_C)),  # two boxes for one label
    ("<OD>", _gen("car" + BOX_A + _locs(1))),  # 5 locations: one box, one stray
    ("<OD>", _gen("car" + BOX_A + "dog" + _locs(1, 2, 3))),  # truncated last box
    ("<OD>", _gen(BOX_A + "car" + BOX_B)),  # leading box without label is skipped
    ("<OD>", _gen("car" + BOX_A + "trailing words")),
    ("<OD>", _gen("café crème" + BOX_A)),  # labels lose non-ASCII characters
    ("<OD>", _gen("  spaced label  " + BOX_A)),
    ("<OD>", _gen("two\nlines" + BOX_A + "ok" + BOX_B)),  # a label across a newline is dropped
    ("<OD>", _gen("<od>car" + BOX_A + "</od>")),  # "od>car" becomes the label (reference quirk)
    ("<OD>", _gen("car")),
    ("<OD>", _gen("car<loc_0000000100>" + _locs(100, 200, 200))),  # a number as written: bin 100
    ("<OD>", _gen("car<loc_1234567890>" + _locs(1, 2, 3))),  # past 2**31: as transformers reads it
    ("<OD>", ""),
    (
        "<DENSE_REGION_CAPTION>",
        _gen("a red car parked on the street" + BOX_A + "a man in a blue shirt" + BOX_B),
    ),
    ("<DENSE_REGION_CAPTION>", _gen("a red car" + BOX_A + "a man in a" + _locs(3, 4))),
    # ---- region proposals (boxes, labels ignored) ----
    ("<REGION_PROPOSAL>", _gen(BOX_A + BOX_B + BOX_C, pad=4)),
    ("<REGION_PROPOSAL>", _gen(BOX_A + _locs(7, 8, 9))),  # 7 locations
    ("<REGION_PROPOSAL>", _gen("some text" + BOX_A + "more" + BOX_B)),
    ("<REGION_PROPOSAL>", _gen(_locs(1, 2, 3))),
    ("<REGION_PROPOSAL>", ""),
    # ---- phrase grounding (banned phrases) ----
    ("<CAPTION_TO_PHRASE_GROUNDING>", _gen("red car" + BOX_A + BOX_B + "sky" + _locs(0, 0, 1000, 300))),
    ("<CAPTION_TO_PHRASE_GROUNDING>", _gen("the image" + BOX_A + "a dog" + BOX_B)),  # banned
    ("<CAPTION_TO_PHRASE_GROUNDING>", _gen("it" + BOX_A + "The image" + BOX_B + "a" + BOX_C)),  # case matters
    ("<CAPTION_TO_PHRASE_GROUNDING>", _gen(" the image " + BOX_A)),  # banned after stripping
    ("<CAPTION_TO_PHRASE_GROUNDING>", _gen("a dog" + _locs(5, 6, 7) + "a cat" + BOX_A)),
    ("<CAPTION_TO_PHRASE_GROUNDING>", _gen("naïve person" + BOX_A)),
    ("<CAPTION_TO_PHRASE_GROUNDING>", _gen("no boxes at all")),
    ("<CAPTION_TO_PHRASE_GROUNDING>", ""),
    # ---- segmentation (polygons, labels optional) ----
    ("<REFERRING_EXPRESSION_SEGMENTATION>", _gen(POLY_A, pad=2)),
    ("<REFERRING_EXPRESSION_SEGMENTATION>", _gen(POLY_A + _locs(77))),  # odd count
    ("<REFERRING_EXPRESSION_SEGMENTATION>", _gen(POLY_A + "<sep>" + POLY_B)),
    ("<REFERRING_EXPRESSION_SEGMENTATION>", _gen("<poly>" + POLY_A + "</poly><poly>" + POLY_B + "</poly>")),
    ("<REFERRING_EXPRESSION_SEGMENTATION>", _gen("<poly>" + POLY_A + "<sep>" + POLY_B + "</poly>")),
    ("<REFERRING_EXPRESSION_SEGMENTATION>", _gen("person" + POLY_A)),
    ("<REFERRING_EXPRESSION_SEGMENTATION>", _gen(POLY_A + "trailing")),
    ("<REFERRING_EXPRESSION_SEGMENTATION>", _gen(_locs(1, 2, 3))),  # too short
    ("<REFERRING_EXPRESSION_SEGMENTATION>", _gen("<loc_5><sep><loc_6><sep><loc_7>")),  # 1-point polygons
    ("<REFERRING_EXPRESSION_SEGMENTATION>", _gen("<sep><sep><sep><sep>")),
    ("<REFERRING_EXPRESSION_SEGMENTATION>", _gen("<poly>" + POLY_A)),  # unclosed group
    ("<REFERRING_EXPRESSION_SEGMENTATION>", ""),
    ("<REGION_TO_SEGMENTATION>", _gen(POLY_B + "<sep>" + _locs(5, 6, 7))),
    ("<REGION_TO_SEGMENTATION>", _gen(POLY_B, pad=5)),
    # ---- open-vocabulary detection (boxes or polygons) ----
    ("<OPEN_VOCABULARY_DETECTION>", _gen("car" + BOX_A + "car" + BOX_B)),
    ("<OPEN_VOCABULARY_DETECTION>", _gen("car<poly>" + POLY_A + "</poly>")),
    ("<OPEN_VOCABULARY_DETECTION>", _gen("car<poly>" + POLY_A + "</poly>bus<poly>" + POLY_B + "</poly>")),
    ("<OPEN_VOCABULARY_DETECTION>", _gen("car" + BOX_A + "bus<poly>" + POLY_B + "</poly>")),  # mixed
    ("<OPEN_VOCABULARY_DETECTION>", _gen("car<poly>" + POLY_A)),  # unclosed
    ("<OPEN_VOCABULARY_DETECTION>", _gen("car" + _locs(1, 2))),
    ("<OPEN_VOCABULARY_DETECTION>", ""),
    # ---- free text ----
    ("<CAPTION>", _gen("A green car parked in front of a yellow building.")),
    ("<CAPTION>", _gen("A green car.", pad=3)),  # "<pad>" stays in the answer (reference quirk)
    ("<DETAILED_CAPTION>", _gen("  The image shows a red box on a white table.  ")),
    ("<MORE_DETAILED_CAPTION>", _gen("Line one.\nLine two.")),
    ("<OCR>", _gen("INVOICE\nTotal: $1,234.56\nDate: 2024-03-15")),
    ("<OCR>", ""),
    ("<REGION_TO_CATEGORY>", _gen("car" + BOX_A)),  # locations stay as text
    ("<REGION_TO_DESCRIPTION>", _gen("a red car parked on the street")),
    ("<REGION_TO_OCR>", _gen("Total: 47.20 EUR")),
    ("<DocVQA>", _gen("$1,234.56")),
    ("<DocVQA>", _gen("")),
    ("<SOMETHING_NEW>", _gen("unknown tasks answer in text")),
]

IMAGE_SIZES = [(1000, 1000), (640, 480), (333, 777)]

# Generations that make transformers raise: a confused model spelling a location out of text
# pieces with more digits than an int64 holds. Ours caps the bin and keeps the instance.
OVERFLOW_CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("<OD>", _gen("car<loc_1><loc_2><loc_3><loc_99999999999999999999999>"), {"labels": ["car"]}),
    (
        "<OCR_WITH_REGION>",
        _gen("text" + _locs(1, 2, 3, 4, 5, 6, 7) + "<loc_99999999999999999999>"),
        {"labels": ["text"]},
    ),
    ("<REGION_TO_SEGMENTATION>", _gen(_locs(1, 2, 3) + "<loc_99999999999999999999>"), {"labels": [""]}),
]


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor()


def assert_same(ours: Any, ref: Any, path: str = "result") -> None:
    """Equal values *and* types (``1 == 1.0`` would hide float coordinates)."""
    assert type(ours) is type(ref), f"{path}: {type(ours).__name__} != {type(ref).__name__}"
    if isinstance(ref, dict):
        assert list(ours) == list(ref), f"{path}: keys {list(ours)} != {list(ref)}"
        for key in ref:
            assert_same(ours[key], ref[key], f"{path}[{key!r}]")
    elif isinstance(ref, list):
        assert len(ours) == len(ref), f"{path}: length {len(ours)} != {len(ref)}: {ours} vs {ref}"
        for i, (a, b) in enumerate(zip(ours, ref)):
            assert_same(a, b, f"{path}[{i}]")
    else:
        assert ours == ref, f"{path}: {ours!r} != {ref!r}"


def test_crafted_generations_are_decodable(processor):
    """Each crafted string is exactly what batch_decode gives for its own token ids."""
    tokenizer = processor.tokenizer
    texts = [text for _, text in CASES + [(t, s) for t, s, _ in OVERFLOW_CASES]]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    assert tokenizer.batch_decode(ids, skip_special_tokens=False) == texts


@pytest.mark.parametrize("image_size", IMAGE_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_transformers(processor, image_size):
    non_empty = 0
    for task, text in CASES:
        ref = processor.post_process_generation(text=text, task=task, image_size=image_size)
        ours = post_process_generation(text, task, image_size, processor=processor)
        assert_same(ours, ref, f"{task} {text!r}")
        # The default settings are the published ones, so no processor gives the same answer.
        assert_same(post_process_generation(text, task, image_size), ref, f"{task} {text!r} (defaults)")
        answer = ref[task]
        non_empty += bool(answer) if isinstance(answer, str) else any(answer.values())
    assert non_empty >= 50  # the table exercises real parses, not just empty answers


def test_known_answers():
    """Hand-computed values, so a shared misunderstanding with the reference would still show."""
    size = (1000, 1000)
    assert post_process_generation(_gen("car" + BOX_A + "door handle" + BOX_B, 2), "<OD>", size) == {
        "<OD>": {"bboxes": [[53, 334, 933, 775], [425, 504, 474, 516]], "labels": ["car", "door handle"]}
    }
    grounding = post_process_generation(
        _gen("the image" + BOX_A + "red car" + BOX_A + BOX_B), "<CAPTION_TO_PHRASE_GROUNDING>", size
    )
    assert grounding == {
        "<CAPTION_TO_PHRASE_GROUNDING>": {
            "bboxes": [[53, 334, 933, 775], [425, 504, 474, 516]],
            "labels": ["red car", "red car"],
        }
    }
    # 640 px / 1000 bins: bin b covers [0.64 b, 0.64 (b + 1)), its centre truncated.
    ocr = post_process_generation(_gen("Hi" + QUAD_A), "<OCR_WITH_REGION>", (640, 480))
    assert ocr == {
        "<OCR_WITH_REGION>": {"quad_boxes": [[64, 48, 128, 48, 128, 96, 64, 96]], "labels": ["Hi"]}
    }
    polygons = post_process_generation(_gen(POLY_B + _locs(7)), "<REGION_TO_SEGMENTATION>", (100, 200))
    assert polygons == {
        "<REGION_TO_SEGMENTATION>": {"polygons": [[[1, 4, 3, 4, 3, 8, 1, 8]]], "labels": [""]}
    }
    ovd = post_process_generation(_gen("bus<poly>" + POLY_B + "</poly>"), "<OPEN_VOCABULARY_DETECTION>", size)
    assert ovd == {
        "<OPEN_VOCABULARY_DETECTION>": {
            "bboxes": [],
            "bboxes_labels": [],
            "polygons": [[[10, 20, 30, 20, 30, 40, 10, 40]]],
            "polygons_labels": ["bus"],
        }
    }
    assert post_process_generation(_gen("Hello world", 2), "<CAPTION>", None) == {
        "<CAPTION>": "Hello world<pad><pad>"
    }


@pytest.mark.parametrize(("task", "text", "expected"), OVERFLOW_CASES, ids=[c[0] for c in OVERFLOW_CASES])
def test_survives_where_transformers_crashes(processor, task, text, expected):
    with pytest.raises(ValueError, match="Overflow when unpacking long"):
        processor.post_process_generation(text=text, task=task, image_size=(640, 480))
    answer = post_process_generation(text, task, (640, 480), processor=processor)[task]
    for key, value in expected.items():
        assert answer[key] == value
    coords = _ints({k: v for k, v in answer.items() if k != "labels"})
    assert coords[:3] == [0, 1, 2]  # bins 1, 2, 3 at 0.64 / 0.48 px per bin
    assert 10**9 < max(coords) < 2**31  # the pixel is capped below 2**31, not wrapped to a negative


def _ints(obj: Any) -> list[int]:
    if isinstance(obj, dict):
        return [i for v in obj.values() for i in _ints(v)]
    if isinstance(obj, list):
        return [i for v in obj for i in _ints(v)]
    assert type(obj) is int
    return [obj]


def test_settings_come_from_the_processor(processor):
    """OCR area threshold and banned phrases are read from the processor's post_processor_config."""
    config = default_post_processor_config()
    config["ocr"]["AREA_THRESHOLD"] = 0.01  # the key transformers reads (upper case)
    config["phrase_grounding"]["banned_grounding_tokens"] = ["dog"]
    processor.post_processor_config = config
    processor.post_processor = type(processor.post_processor)(config=config, tokenizer=processor.tokenizer)
    try:
        small_and_big = _gen("small" + _locs(1, 1, 2, 1, 2, 2, 1, 2) + "big" + QUAD_B)
        grounding = _gen("the image" + BOX_A + "dog" + BOX_B)
        for task, text in [
            ("<OCR_WITH_REGION>", small_and_big),
            ("<CAPTION_TO_PHRASE_GROUNDING>", grounding),
        ]:
            ref = processor.post_process_generation(text=text, task=task, image_size=(640, 480))
            assert_same(post_process_generation(text, task, (640, 480), processor=processor), ref)
        assert post_process_generation(small_and_big, "<OCR_WITH_REGION>", (640, 480), processor)[
            "<OCR_WITH_REGION>"
        ]["labels"] == ["big"]
        assert post_process_generation(grounding, "<CAPTION_TO_PHRASE_GROUNDING>", (640, 480), processor)[
            "<CAPTION_TO_PHRASE_GROUNDING>"
        ]["labels"] == ["the image"]
        # Matches transformers: the published lower-case "area_threshold" is never read.
        config["ocr"] = {"area_threshold": 0.5}
        out = post_process_generation(small_and_big, "<OCR_WITH_REGION>", (640, 480), processor)
        assert out["<OCR_WITH_REGION>"]["labels"] == ["small", "big"]
        # A PATTERN of more than four corners: the area sums the first three edges, as transformers does
        # (here the first four corners lie on a line through the origin, so those edges add nothing; the
        # next two edges would add a quarter of the image).
        config["ocr"] = {"AREA_THRESHOLD": 0.01,
                         "PATTERN": r"(.+?)" + "".join([r"<loc_(\d+)>"] * 12)}
        processor.post_processor = type(processor.post_processor)(config=config, tokenizer=processor.tokenizer)
        hexagon = _gen("flat" + _locs(100, 100, 200, 200, 300, 300, 400, 400, 400, 100, 100, 100))
        ref = processor.post_process_generation(text=hexagon, task="<OCR_WITH_REGION>", image_size=(640, 480))
        assert ref["<OCR_WITH_REGION>"]["labels"] == []
        assert_same(post_process_generation(hexagon, "<OCR_WITH_REGION>", (640, 480), processor=processor), ref)
        # A config that lacks the parse type is an error, as in transformers.
        del config["ocr"]
        with pytest.raises(ValueError, match="Unsupported parse task"):
            post_process_generation(small_and_big, "<OCR_WITH_REGION>", (640, 480), processor)
    finally:
        processor.post_processor_config = default_post_processor_config()
        processor.post_processor = type(processor.post_processor)(
            config=processor.post_processor_config, tokenizer=processor.tokenizer
        )


def test_location_tasks_need_an_image_size():
    with pytest.raises(ValueError, match="image_size"):
        post_process_generation(_gen("car" + BOX_A), "<OD>", None)


def test_tasks_table_matches_transformers(processor):
    reference = processor.tasks_answer_post_processing_type
    assert {t: spec.parse_type for t, spec in TASKS.items() if t in reference} == reference
    with_input = set(processor.task_prompts_with_input)
    assert {t for t, spec in TASKS.items() if spec.takes_input and t in reference} == with_input
    assert {t for t in TASKS if t not in reference} == {"<DocVQA>"}
    assert {spec.parse_type for spec in TASKS.values()} <= PARSE_TYPES


def test_default_config_is_the_published_one(processor):
    assert processor.post_processor_config == default_post_processor_config()
    assert set(DEFAULT_POST_PROCESSOR_CONFIG) == PARSE_TYPES
    banned = DEFAULT_POST_PROCESSOR_CONFIG["phrase_grounding"]["banned_grounding_tokens"]
    assert len(banned) == 100 and {"the image", "it", "a set"} <= set(banned)
    copy = default_post_processor_config()
    copy["ocr"]["area_threshold"] = 1.0
    assert DEFAULT_POST_PROCESSOR_CONFIG["ocr"]["area_threshold"] == 0.0


@pytest.mark.parametrize("image_size", [(1000, 1000), (640, 480), (333, 777), (4321, 17)])
def test_quantization_matches_transformers(processor, image_size):
    torch = pytest.importorskip("torch")
    post = processor.post_processor
    width, height = image_size
    rng = np.random.default_rng(sum(image_size))
    xs = rng.uniform(-5, width * 1.02, 600)
    ys = rng.uniform(-5, height * 1.02, 600)
    points = np.stack([xs, ys], -1).astype(np.float32)
    boxes = np.concatenate([points[:300], points[300:]], -1)
    int_boxes = np.round(boxes).astype(np.int32)
    for coords in (points, boxes, int_boxes):
        ref = post.quantize(torch.from_numpy(coords), image_size).numpy()
        ours = quantize_coordinates(coords, image_size)
        np.testing.assert_array_equal(ours, ref)
        assert ours.min() >= 0 and ours.max() <= 999
    # Python lists go through torch.tensor -> float32, like ours.
    as_list = boxes[:50].tolist()
    np.testing.assert_array_equal(
        quantize_coordinates(as_list, image_size), post.quantize(torch.tensor(as_list), image_size).numpy()
    )
    all_bins = np.arange(1001)
    pairs = np.stack([all_bins, all_bins[::-1]], -1)
    np.testing.assert_array_equal(
        dequantize(pairs, image_size), post.dequantize(torch.from_numpy(pairs), image_size)
    )
    quads = pairs[:1000].reshape(-1, 4)
    np.testing.assert_array_equal(
        dequantize(quads, image_size), post.dequantize(torch.from_numpy(quads), image_size)
    )


def test_loc_tokens_round_trip():
    size = (640, 480)
    text = coordinates_to_loc_tokens([[10, 20, 200, 180], [0, 0, 639.9, 479.9]], size)
    assert text == "<loc_15><loc_41><loc_312><loc_375><loc_0><loc_0><loc_999><loc_999>"
    assert coordinates_to_loc_tokens([5000, -3], size) == "<loc_999><loc_0>"  # clamped
    bins = quantize_coordinates([[10, 20, 200, 180]], size)
    centres = dequantize(bins, size)
    assert np.all(np.abs(centres - [[10, 20, 200, 180]]) <= 1)  # within one bin (0.64 / 0.48 px)
    with pytest.raises(ValueError, match="2 .* or 4"):
        quantize_coordinates([1, 2, 3], size)


def test_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import florence_jax.postprocess as p\n"
        "print(p.post_process_generation('</s><s>a<loc_1><loc_2><loc_3><loc_4></s>', '<OD>', (10, 10)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[1],
    )
    assert "'bboxes': [[0, 0, 0, 0]]" in result.stdout
