"""florence_jax.processing and the tiny offline processor against transformers' Florence2Processor."""

from __future__ import annotations

import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from florence_jax.processing import ImageTransform, load_processor, prepare_inputs, to_rgb
from florence_jax.tiny_processor import FLORENCE2_ADDED_TOKENS, build_tiny_processor

REPO_ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor()


def _noise(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _images() -> dict[str, Image.Image]:
    """Every mode a dataset is likely to hand us, at non-square sizes above and below 64."""
    rgb = Image.fromarray(_noise(45, 77))
    palette_transparent = rgb.convert("P")
    palette_transparent.info["transparency"] = palette_transparent.getpixel((0, 0))  # an index in use
    rgb_transparent = Image.fromarray(_noise(120, 33, seed=1))
    rgb_transparent.info["transparency"] = tuple(int(v) for v in np.asarray(rgb_transparent)[0, 0])
    return {
        "RGB": rgb,
        "RGB-large": Image.fromarray(_noise(300, 200, seed=2)),
        "RGB-exact-size": Image.fromarray(_noise(64, 64, seed=3)),
        "RGB-tRNS": rgb_transparent,
        "L": Image.fromarray(_noise(97, 31, channels=1, seed=4)),
        "LA": Image.merge("LA", [rgb.convert("L"), Image.fromarray(_noise(45, 77, channels=1, seed=8))]),
        "RGBA": Image.fromarray(_noise(50, 90, channels=4, seed=5)),
        "P": rgb.convert("P"),
        "P-transparency": palette_transparent,
        "CMYK": Image.fromarray(_noise(70, 40, seed=6)).convert("CMYK"),
        "I;16": Image.fromarray(np.random.default_rng(7).integers(0, 65535, (30, 41), dtype=np.uint16)),
        "1": rgb.convert("1"),
    }


IMAGES = _images()


# ---------------------------------------------------------------------------------------------
# The tiny processor
# ---------------------------------------------------------------------------------------------


def test_tiny_processor_layout(processor):
    tokenizer = processor.tokenizer
    vocab = len(tokenizer)
    assert tokenizer.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>"]) == [0, 1, 2, 3]
    assert tokenizer.mask_token_id == 499  # <mask> closes BART's vocabulary, as at id 50264
    added = tokenizer.convert_tokens_to_ids(list(FLORENCE2_ADDED_TOKENS))
    assert added == list(range(500, 500 + 1024))  # Florence-2's order, as from id 50265
    assert tokenizer.convert_tokens_to_ids(["<loc_0>", "<loc_999>", "<poly>"]) == [504, 1503, 1521]
    assert processor.image_token == tokenizer.image_token == "<image>"
    assert processor.image_token_id == tokenizer.image_token_id == vocab - 1 == 1524
    assert set(FLORENCE2_ADDED_TOKENS) <= set(tokenizer.all_special_tokens)
    # Task tokens are prompts, not vocabulary entries, as in the real tokenizer.
    assert len(tokenizer.tokenize("<OCR>")) > 1
    assert processor.num_image_tokens == processor.image_processor.image_seq_length == 1 + 2 * 2


def test_tiny_processor_prompt_layout(processor):
    """image tokens, then <s>, the task's prompt, </s>; padding on the right."""
    out = processor(text=["<OCR>", "<DocVQA>What is the total?"], images=[IMAGES["RGB"]] * 2, padding=True)
    tokenizer = processor.tokenizer
    for ids, prompt in zip(
        out["input_ids"], ["What is the text in the image?", "<DocVQA>What is the total?"]
    ):
        n = processor.num_image_tokens
        assert ids[:n] == [processor.image_token_id] * n
        assert ids[n] == tokenizer.bos_token_id
        end = ids.index(tokenizer.eos_token_id)
        assert tokenizer.decode(ids[n + 1 : end]) == prompt
        assert set(ids[end + 1 :]) <= {tokenizer.pad_token_id}


@pytest.mark.parametrize("image_size", [32, 96])
def test_tiny_processor_image_size(image_size):
    processor = build_tiny_processor(image_size=image_size)
    assert processor.num_image_tokens == 1 + (image_size // 32) ** 2
    pixels = processor.image_processor(IMAGES["RGB"], return_tensors="np")["pixel_values"]
    assert pixels.shape == (1, 3, image_size, image_size)
    with pytest.raises(ValueError, match="multiple of 32"):
        build_tiny_processor(image_size=50)


def test_tiny_processor_save_and_reload(processor, tmp_path):
    start = time.perf_counter()
    saved = build_tiny_processor(tmp_path)
    assert time.perf_counter() - start < 3.0
    for loaded in (load_processor(tmp_path), load_processor(str(tmp_path))):
        assert type(loaded).__name__ == "Florence2Processor"
        assert loaded.image_token == loaded.tokenizer.image_token == "<image>"
        assert loaded.image_token_id == saved.image_token_id
        assert loaded.tokenizer.get_vocab() == saved.tokenizer.get_vocab()
        assert loaded.tokenizer.all_special_tokens == saved.tokenizer.all_special_tokens
        assert loaded.num_image_tokens == saved.num_image_tokens
        assert loaded.post_processor_config == saved.post_processor_config
        assert ImageTransform.from_processor(loaded) == ImageTransform.from_processor(saved)
        texts = ["<CAPTION>", "<CAPTION_TO_PHRASE_GROUNDING> a red car<loc_1><loc_2>"]
        images = [IMAGES["RGB"], IMAGES["CMYK"]]
        a = prepare_inputs(saved, images, texts)
        b = prepare_inputs(loaded, images, texts)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
        ids = [saved.tokenizer.convert_tokens_to_ids(["<loc_7>", "<sep>", "</s>"])]
        assert loaded.batch_decode(ids, skip_special_tokens=True) == [""]
        assert loaded.batch_decode(ids, skip_special_tokens=False) == ["<loc_7><sep></s>"]


# ---------------------------------------------------------------------------------------------
# prepare_inputs
# ---------------------------------------------------------------------------------------------


def test_prepare_inputs_matches_processor(processor):
    images = [IMAGES["RGB"], IMAGES["L"], IMAGES["RGBA"]]
    texts = [
        "<OD>",
        "<DocVQA>What is the invoice total and the date?",
        "<REGION_TO_DESCRIPTION><loc_1><loc_2>",
    ]
    ours = prepare_inputs(processor, images, texts)
    ref = processor(text=texts, images=images, return_tensors="np", padding="longest")
    assert ours["input_ids"].dtype == np.int32 and ours["attention_mask"].dtype == np.int32
    assert ours["pixel_values"].dtype == np.float32 and ours["pixel_values"].shape == (3, 3, 64, 64)
    for key in ("input_ids", "attention_mask", "pixel_values"):
        np.testing.assert_array_equal(ours[key], ref[key])
    lengths = ours["attention_mask"].sum(-1)
    assert len(set(lengths.tolist())) == 3 and ours["input_ids"].shape[1] == lengths.max()


def test_prepare_inputs_static_length(processor):
    image = IMAGES["RGB"]
    ours = prepare_inputs(
        processor, [image, image], ["<OCR>", "<CAPTION>"], max_length=40, padding="max_length"
    )
    ref = processor(
        text=["<OCR>", "<CAPTION>"],
        images=[image, image],
        return_tensors="np",
        padding="max_length",
        max_length=40,
    )
    assert ours["input_ids"].shape == (2, 40)
    np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(ours["attention_mask"], ref["attention_mask"])
    single = prepare_inputs(processor, image, "<OCR>")
    assert single["input_ids"].shape[0] == 1 and single["pixel_values"].shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="max_length"):
        prepare_inputs(
            processor, image, "<DocVQA>" + "a long question " * 10, max_length=20, padding="max_length"
        )


# ---------------------------------------------------------------------------------------------
# ImageTransform
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(IMAGES))
def test_image_transform_matches_processor(processor, name):
    image = IMAGES[name]
    ref = processor.image_processor(image, return_tensors="np")["pixel_values"][0]
    transform = ImageTransform.from_processor(processor)
    hwc = transform(image)
    assert hwc.dtype == np.float32 and hwc.shape == (64, 64, 3)
    np.testing.assert_allclose(hwc.transpose(2, 0, 1), ref, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(transform.chw(image), ref)  # in fact bit for bit


def test_conversion_modes_are_exercised():
    """The special cases change pixels, so the comparisons above would catch a naive convert()."""
    for name in ("RGB-tRNS", "P-transparency", "RGBA", "LA"):
        image = IMAGES[name]
        assert not np.array_equal(np.asarray(to_rgb(image)), np.asarray(image.convert("RGB"))), name


def test_image_transform_non_square_target():
    from transformers import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"height": 48, "width": 80},
        do_center_crop=False,
        resample=3,
        image_mean=[0.5, 0.4, 0.3],
        image_std=[0.2, 0.25, 0.3],
    )
    transform = ImageTransform.from_processor(image_processor)
    assert transform.size == (48, 80)
    images = [IMAGES["RGB-large"], IMAGES["L"], IMAGES["CMYK"]]
    ref = image_processor(images, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(transform.batch(images, channels_first=True), ref, rtol=0, atol=1e-5)
    nhwc = transform.batch(images)
    assert nhwc.shape == (3, 48, 80, 3) and nhwc.flags.c_contiguous
    np.testing.assert_array_equal(nhwc, ref.transpose(0, 2, 3, 1))


def test_image_transform_settings(processor):
    transform = ImageTransform.from_processor(processor)
    assert transform == ImageTransform(size=(64, 64))  # Florence-2's defaults are the dataclass defaults
    assert ImageTransform.from_processor(processor.image_processor) == transform
    clone = pickle.loads(pickle.dumps(transform))
    np.testing.assert_array_equal(clone(IMAGES["P"]), transform(IMAGES["P"]))
    raw = ImageTransform(size=(64, 64), do_rescale=False, do_normalize=False)(IMAGES["RGB"])
    np.testing.assert_array_equal(raw, np.asarray(IMAGES["RGB"].resize((64, 64), Image.Resampling.BICUBIC)))
    with pytest.raises(TypeError):
        transform(np.zeros((8, 8, 3), np.uint8))


def test_processing_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from PIL import Image\n"
        "import florence_jax.processing as p\n"
        "print(p.ImageTransform(size=(32, 48))(Image.new('RGB', (10, 10))).shape)\n"
        "print(p.coordinates_to_loc_tokens([0, 0, 5, 5], (10, 10)))\n"
        "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT
    )
    assert result.stdout.split() == ["(32,", "48,", "3)", "<loc_0><loc_0><loc_500><loc_500>"]
