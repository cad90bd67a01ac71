"""``python -m florence_jax.predict`` end to end on a tiny checkpoint whose processor and model match.

The conftest model's vocabulary (1024, ``<image>`` = 1000) does not fit the tiny processor's tokenizer,
so this module saves a matching pair in one directory, as a real checkpoint ships them: the tiny
processor (64 px images -> ``1 + 2 * 2`` image tokens) and a random transformers Florence-2 with a
4-stage DaViT of total stride 32, a vocabulary covering the tokenizer and its ``<image>`` id. As in
``test_generation.py``, decoder positions and cross-attention are sharpened so greedy outputs depend on
the image (an untouched random model with a tied head answers ``</s>`` at once, which would prove nothing).

The CLI runs in-process (``main(argv)``); one error case runs as a subprocess to show that no traceback
reaches the user.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from florence_jax.predict import draw, main, predict

MAX_NEW = 12
VISION = dict(
    depths=[1, 1, 1, 1], embed_dim=[8, 16, 16, 16], num_heads=[1, 2, 2, 2], num_groups=[1, 2, 2, 2],
    patch_size=[7, 3, 3, 3], patch_stride=[4, 2, 2, 2], patch_padding=[3, 1, 1, 1],
    patch_prenorm=[False, True, True, True], window_size=2, projection_dim=24, max_position_embeddings=8,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from florence_jax.testing.models import TINY_TEXT, hf_config, make_hf_model
    from florence_jax.tiny_processor import IMAGE_TOKEN, build_tiny_processor

    directory = tmp_path_factory.mktemp("tiny_pair")
    tokenizer = build_tiny_processor(directory, image_size=64).tokenizer
    vocab = -(-len(tokenizer) // 64) * 64
    config = hf_config(VISION, dict(TINY_TEXT, vocab_size=vocab),
                       image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    model = make_hf_model(config, seed=1, weight_scale=2.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "decoder.embed_positions" in name or ("encoder_attn." in name and p.ndim >= 2):
                p.mul_(10.0)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory) -> list[str]:
    """Three PNGs of different sizes and modes (RGB, RGB, greyscale)."""
    directory = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (50, 70, 3), np.uint8), rng.integers(0, 256, (64, 96, 3), np.uint8),
              rng.integers(0, 256, (80, 40), np.uint8)]
    paths = []
    for i, array in enumerate(arrays):
        paths.append(str(directory / f"img{i}.png"))
        Image.fromarray(array).save(paths[-1])
    return paths


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prints_json_and_draws(model_dir, image_paths, tmp_path, capsys):
    draw_dir = tmp_path / "drawn"
    code, out, err = _run(["--model", str(model_dir), "--task", "<OD>", "--batch_size", "2",
                           "--max_new_tokens", str(MAX_NEW), "--num_beams", "1", "--draw", str(draw_dir),
                           *image_paths], capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["image"] for line in lines] == image_paths
    for line in lines:
        assert line.keys() == {"image", "task", "result"} and line["task"] == "<OD>"
        answer = line["result"]["<OD>"]
        assert answer.keys() == {"bboxes", "labels"} and len(answer["bboxes"]) == len(answer["labels"])
    assert "3/3" in err  # the progress bar went to stderr
    for path in image_paths:
        drawn = draw_dir / f"{Path(path).stem}.od.png"  # one drawing per image and task
        with Image.open(drawn) as image, Image.open(path) as original:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == original.size

    # Free-form task: "<DocVQA>" + question is the prompt, the answer is plain text. Its prompt pads to
    # the same 32 tokens as "<OD>"'s, so this run reuses the compiled program.
    code, out, err = _run(["--model", str(model_dir), "--task", "<DocVQA>", "--text", "What is the total?",
                           "--batch_size", "2", "--max_new_tokens", str(MAX_NEW), "--num_beams", "1",
                           image_paths[0]], capsys)
    assert code == 0, err
    (line,) = [json.loads(line) for line in out.splitlines()]
    assert isinstance(line["result"]["<DocVQA>"], str)


def test_generated_text_matches_transformers(model_dir, image_paths, monkeypatch):
    """predict()'s decoded text and parsed result equal transformers' generate() + batch_decode +
    post_process_generation, image by image (the last batch of two is padded with a copy)."""
    from flax import nnx
    from transformers import Florence2ForConditionalGeneration as HF

    from florence_jax import Florence2ForConditionalGeneration
    from florence_jax.processing import load_processor

    processor = load_processor(model_dir)
    model = Florence2ForConditionalGeneration.from_pretrained(model_dir)
    images = [Image.open(path).convert("RGB") for path in image_paths]
    splits = []  # of the whole model (tracing the tower also splits its blocks)
    real_split = nnx.split
    monkeypatch.setattr(nnx, "split", lambda *a, **k: splits.append(a[0] is model) or real_split(*a, **k))
    records = predict(model, processor, images, "<OD>", batch_size=2, max_new_tokens=MAX_NEW, num_beams=1)
    assert sum(splits) == 1  # two batches, one split
    monkeypatch.undo()
    assert [r["image"] for r in records] == [None] * 3

    hf = HF.from_pretrained(model_dir).eval()
    expected = []
    for image in images:
        inputs = processor(text="<OD>", images=image, return_tensors="pt")
        with torch.no_grad():
            ids = hf.generate(**inputs, max_new_tokens=MAX_NEW, num_beams=1, do_sample=False)
        expected.append(processor.batch_decode(ids, skip_special_tokens=False)[0])
    assert [r["text"] for r in records] == expected
    assert len(set(expected)) > 1  # the outputs depend on the image, so a row mix-up would show
    for record, text, image in zip(records, expected, images):
        assert record["result"] == processor.post_process_generation(text, task="<OD>", image_size=image.size)


def test_draw_shapes_and_text():
    blank = Image.new("RGB", (100, 80), (255, 255, 255))
    result = {"<OCR_WITH_REGION>": {"quad_boxes": [[10, 10, 40, 10, 40, 20, 10, 20]], "labels": ["hi"]}}
    drawn = np.asarray(draw(blank, result, "<OCR_WITH_REGION>"))
    assert (drawn[15, 10] != 255).any() and (drawn[15, 25] == 255).all()  # outline, empty inside

    answer = {"bboxes": [[50, 40, 90, 70]], "bboxes_labels": ["car"],
              "polygons": [[[5, 50, 30, 50, 30, 75, 5, 75]]], "polygons_labels": ["road"]}
    drawn = np.asarray(draw(blank, answer, "<OPEN_VOCABULARY_DETECTION>"))
    assert (drawn[55, 50] != 255).any() and (drawn[55, 70] == 255).all()  # box outline only
    assert (drawn[65, 15] != 255).any()  # polygon filled (translucent)
    assert blank.getpixel((50, 55)) == (255, 255, 255)  # the input is left alone
    # A text answer goes in a band below the image, which is left as it was.
    text = np.asarray(draw(blank, {"<CAPTION>": "a cat"}, "<CAPTION>"))
    assert text.shape[0] > 80 and (text[:80] == 255).all() and (text[80:] != 255).any()
    # Distinct labels get distinct colours.
    boxes = {"bboxes": [[5, 5, 20, 20], [30, 5, 45, 20], [60, 5, 75, 20]], "labels": ["a", "b", "a"]}
    drawn = np.asarray(draw(blank, {"<OD>": boxes}, "<OD>"))
    a, b, a2 = (tuple(drawn[12, x]) for x in (5, 30, 60))
    assert a == a2 and a != b


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("bad")
    (directory / "not_an_image.png").write_bytes(b"this is not a PNG")
    (directory / "empty_model").mkdir()
    return {"bad_image": directory / "not_an_image.png", "missing": directory / "missing",
            "empty_model": directory / "empty_model"}


@pytest.mark.parametrize(
    "case, needle, status",
    [
        ("unknown_task", "unknown task", 2),
        ("needs_text", "needs input text", 2),
        ("takes_no_text", "takes no input text", 2),
        ("missing_model_dir", "model directory not found", 2),
        ("model_dir_without_checkpoint", "cannot load", 1),
    ],
)
def test_cli_errors(case, needle, status, model_dir, image_paths, bad_inputs, capsys):
    model, task, text, images = str(model_dir), "<OD>", None, [image_paths[0]]
    if case == "unknown_task":
        task = "<OBJECT_DETECTION>"
    elif case == "needs_text":
        task = "<CAPTION_TO_PHRASE_GROUNDING>"
    elif case == "takes_no_text":
        text = "a cat"
    elif case == "missing_model_dir":
        model = str(bad_inputs["missing"])
    elif case == "model_dir_without_checkpoint":
        model = str(bad_inputs["empty_model"])
    argv = ["--model", model, "--task", task, *(["--text", text] if text else []), *images]
    code, out, err = _run(argv, capsys)
    assert code == status and out == ""
    assert err.startswith("error: ") and needle in err and len(err.strip().splitlines()) == 1, err


def test_a_bad_image_is_an_error_record_and_the_others_run(model_dir, image_paths, bad_inputs, tmp_path, capsys):
    missing, unreadable = str(bad_inputs["missing"] / "x.png"), str(bad_inputs["bad_image"])
    images = [image_paths[0], missing, image_paths[1], unreadable]
    code, out, err = _run(["--model", str(model_dir), "--task", "<OD>", "--batch_size", "2", "--max_new_tokens",
                           str(MAX_NEW), "--num_beams", "1", "--draw", str(tmp_path / "drawn"), *images], capsys)
    assert code == 1
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["image"] for line in lines] == images  # one line per input, in order
    assert "result" in lines[0] and "result" in lines[2]
    assert "image not found" in lines[1]["error"] and "cannot read image" in lines[3]["error"]
    assert "2 of 4 images could not be read" in err
    assert sorted(p.name for p in (tmp_path / "drawn").iterdir()) == ["img0.od.png", "img1.od.png"]


def test_cli_error_has_no_traceback(image_paths, bad_inputs):
    proc = subprocess.run(
        [sys.executable, "-m", "florence_jax.predict", "--model", str(bad_inputs["missing"]),
         "--task", "<OD>", image_paths[0]],
        capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert "Traceback" not in proc.stderr and "model directory not found" in proc.stderr, proc.stderr
