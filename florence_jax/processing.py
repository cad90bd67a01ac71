"""Model inputs for Florence-2: transformers' processor for text, a fast numpy path for images.

Text goes through transformers' ``Florence2Processor`` (task prompts, image placeholder tokens,
BOS/EOS); re-implementing the tokenizer would only create a second source of truth. Images in the
data pipeline go through :class:`ImageTransform` instead: the same PIL conversion and bicubic
resize as the processor's PIL backend, then one lookup table per channel for rescale + normalize,
bit-identical to the processor's ``pixel_values`` and cheap enough for grain workers.

transformers is imported lazily so this module (and the data pipeline) imports without torch and
without paying transformers' import time.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from florence_jax.postprocess import coordinates_to_loc_tokens, dequantize, quantize_coordinates

if TYPE_CHECKING:
    from transformers import ProcessorMixin

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_LAYOUTS",
    "S2D_BLOCK",
    "ImageTransform",
    "coordinates_to_loc_tokens",
    "dequantize",
    "load_processor",
    "normalize_pixels",
    "pixel_shape",
    "prepare_inputs",
    "processor_dir",
    "prompt_inputs",
    "quantize_coordinates",
    "space_to_depth",
    "to_rgb",
]

# The block space_to_depth uses for the vision tower's input: the first patch convolution's stride in every
# Florence-2 (7x7, stride 4).
S2D_BLOCK = 4
# Formulations.pixel_layout -> the image_layout pixel batches carry (and the model reads) for it.
IMAGE_LAYOUTS = {"image": "NHWC", "space_to_depth": "S2D"}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_processor(name_or_path: str | os.PathLike, revision: str | None = None) -> ProcessorMixin:
    """The checkpoint's Florence-2 processor, from a Hub id or a local directory, in either layout.

    A transformers-native repository loads with ``AutoProcessor``. A repository in the original remote-code
    layout (``microsoft/Florence-2-*``: a BART tokenizer, ``preprocessor_config.json`` and
    ``processing_florence2.py``) gets transformers' native processor built from its own files with the
    original's added tokens in the original's order (:mod:`florence_jax.original_layout`). No repository
    code is ever run.
    """
    from transformers import AutoProcessor

    from florence_jax.original_layout import build_processor, is_original_processor_dir

    directory = processor_dir(name_or_path, revision)
    if is_original_processor_dir(directory):
        return build_processor(directory)
    return AutoProcessor.from_pretrained(os.fspath(directory), trust_remote_code=False)


PROCESSOR_FILES = ("*.json", "*.txt", "*.model")


def processor_dir(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory as is; a Hub id as the snapshot of its processor files in huggingface_hub's cache
    (``HF_HUB_OFFLINE=1`` reads the cache only). Repository code (``*.py``) is never fetched."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(os.fspath(name_or_path), revision=revision, allow_patterns=list(PROCESSOR_FILES)))


def prepare_inputs(
    processor: ProcessorMixin,
    images: Image.Image | Sequence[Image.Image],
    texts: str | Sequence[str],
    max_length: int | None = None,
    padding: bool | str = "longest",
) -> dict[str, np.ndarray]:
    """Run the processor and return the arrays the JAX model takes.

    ``input_ids``/``attention_mask`` are int32 ``(B, L)`` and ``pixel_values`` float32 NCHW, with
    the same values as ``processor(text=texts, images=images, return_tensors="np")``.
    ``padding="max_length"`` with ``max_length`` gives static shapes for jit. Prompts are never
    truncated (cutting one would drop its ``</s>`` silently): a prompt longer than ``max_length``
    raises instead.
    """
    kwargs: dict[str, Any] = {"padding": padding}
    if max_length is not None:
        kwargs["max_length"] = max_length
    encoded = processor(text=texts, images=images, return_tensors="np", **kwargs)
    input_ids = np.asarray(encoded["input_ids"])
    if max_length is not None and input_ids.shape[-1] > max_length:
        raise ValueError(f"prompt needs {input_ids.shape[-1]} tokens, more than max_length={max_length}")
    return {
        "input_ids": input_ids.astype(np.int32),
        "attention_mask": np.asarray(encoded["attention_mask"]).astype(np.int32),
        "pixel_values": np.asarray(encoded["pixel_values"]).astype(np.float32),
    }


def prompt_inputs(processor: ProcessorMixin, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """``input_ids``/``attention_mask`` (int32, right-padded to the longest) for ``prompts`` without any image:
    what :func:`prepare_inputs` gives for them, built as the processor builds it (its task prompts, then
    ``num_image_tokens`` image placeholders, ``<s>``, the prompt, ``</s>``), so text can be tokenized apart from
    the pixels (the labeller encodes an image once and runs several prompts against it)."""
    construct = getattr(processor, "_construct_prompts", None)
    texts = construct(list(prompts)) if construct is not None else list(prompts)
    tok = processor.tokenizer
    placeholders = processor.image_token * int(processor.num_image_tokens)
    encoded = tok([placeholders + tok.bos_token + text + tok.eos_token for text in texts], add_special_tokens=False,
                  padding="longest", return_tensors="np")
    return {"input_ids": np.asarray(encoded["input_ids"]).astype(np.int32),
            "attention_mask": np.asarray(encoded["attention_mask"]).astype(np.int32)}


def _as_height_width(size: Any) -> tuple[int, int]:
    """``{"height": h, "width": w}`` (dict or transformers' SizeDict) -> ``(h, w)``."""
    get = size.get if isinstance(size, Mapping) else functools.partial(getattr, size)
    height, width = get("height", None), get("width", None)
    if height is None or width is None:
        raise ValueError(f"ImageTransform needs an exact height and width, got size={size!r}")
    return int(height), int(width)


def _triple(value: float | Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(v) for v in value) if isinstance(value, Sequence) else (float(value),) * 3
    if len(values) != 3:
        raise ValueError(f"expected one value or three (RGB), got {value!r}")
    return values  # type: ignore[return-value]


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB exactly as transformers does it: transparency (an alpha band, or a
    ``transparency`` entry as palette and L images carry) is composited onto white, other modes
    (L, CMYK, I;16, 1, ...) use PIL's own conversion."""
    # RGB images go through the check too: a PNG tRNS chunk marks one colour as transparent.
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "RGB":
        return image  # callers only read it (resize makes a new image): no copy
    return image.convert("RGB")


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> normalized float32 array, equal to the processor's ``pixel_values``.

    Picklable and stateless apart from a cached 256x3 lookup table, so it can be handed to data
    loader workers. ``size`` is ``(height, width)``; ``resample`` a PIL filter (3 = bicubic).

    Matches transformers' PIL backend (``CLIPImageProcessorPil``, what transformers uses without
    torchvision). With torchvision installed, ``AutoProcessor`` picks the torchvision backend,
    whose bicubic resize is torch's, not PIL's: expect small differences from this path there.
    """

    size: tuple[int, int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC
    do_rescale: bool = True
    do_normalize: bool = True

    @classmethod
    def from_processor(cls, processor: Any) -> ImageTransform:
        """Settings of a processor's (or directly an image processor's) resize/rescale/normalize."""
        image_processor = getattr(processor, "image_processor", processor)
        if getattr(image_processor, "do_center_crop", False):
            raise NotImplementedError("center cropping is not part of Florence-2's preprocessing")
        if not getattr(image_processor, "do_resize", True):
            raise NotImplementedError("ImageTransform always resizes; the processor does not")
        if not getattr(image_processor, "do_convert_rgb", True):
            raise NotImplementedError("ImageTransform always converts to RGB; the processor does not")
        return cls(
            size=_as_height_width(image_processor.size),
            mean=_triple(image_processor.image_mean),
            std=_triple(image_processor.image_std),
            rescale_factor=float(image_processor.rescale_factor),
            resample=int(image_processor.resample),
            do_rescale=bool(image_processor.do_rescale),
            do_normalize=bool(image_processor.do_normalize),
        )

    @functools.cached_property
    def _table(self) -> np.ndarray:
        """float32 ``(256, 3)``: the output for each uint8 value and channel.

        Same operations and dtypes as transformers (float64 rescale, cast to float32, then
        ``(x - mean) / std`` in float32), so the table reproduces it bit for bit.
        """
        values = np.arange(256, dtype=np.float64)[:, None].repeat(3, axis=1)
        if self.do_rescale:
            values = values * self.rescale_factor
        table = values.astype(np.float32)
        if self.do_normalize:
            table = (table - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return table

    @property
    def table(self) -> np.ndarray:
        """float32 ``(256, 3)``: what each uint8 value of each channel becomes (see :func:`normalize_pixels`)."""
        return self._table

    def resize(self, image: Image.Image) -> Image.Image:
        """RGB conversion and resize only, as uint8 PIL (for caching decoded, resized images)."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image, got {type(image).__name__}")
        height, width = self.size
        return to_rgb(image).resize((width, height), resample=self.resample)

    def __call__(self, image: Image.Image) -> np.ndarray:
        """float32 ``(H, W, 3)``: channels last, the model's internal layout."""
        return self._table[self.uint8(image), np.arange(3)]

    def uint8(self, image: Image.Image) -> np.ndarray:
        """uint8 ``(H, W, 3)``: the resized pixels before rescaling and normalization, a quarter of the float32
        bytes; ``normalize_pixels(pixels, self.table)`` on the device gives ``self(image)`` bit for bit."""
        return np.asarray(self.resize(image), dtype=np.uint8)

    def chw(self, image: Image.Image) -> np.ndarray:
        """float32 ``(3, H, W)``, the layout of transformers' ``pixel_values``."""
        return np.ascontiguousarray(self(image).transpose(2, 0, 1))

    def batch(self, images: Sequence[Image.Image], channels_first: bool = False) -> np.ndarray:
        """Stack images into ``(B, H, W, 3)``, or ``(B, 3, H, W)`` with ``channels_first``."""
        stacked = np.stack([self(image) for image in images])
        return np.ascontiguousarray(stacked.transpose(0, 3, 1, 2)) if channels_first else stacked


def space_to_depth(pixels, block: int):
    """``(..., H, W, C)`` -> ``(..., H / block, W / block, block * block * C)``: each ``block x block`` patch
    of pixels as one position, its channels ordered (row in the patch, column, channel).

    The vision tower's first convolution (7x7, stride 4, over 3 colors) takes its input in this layout as
    a 2x2 convolution over 48 channels (``image_layout="S2D"``, ``Formulations.pixel_layout``). numpy in,
    numpy out (the data workers rearrange each image: a TPU relayouts a 3-channel image slowly); jax arrays
    work too."""
    *lead, h, w, c = pixels.shape
    if h % block or w % block:
        raise ValueError(f"space_to_depth: {h}x{w} pixels do not divide into {block}x{block} blocks")
    n = len(lead)
    x = pixels.reshape(*lead, h // block, block, w // block, block * c)
    x = x.transpose(*range(n), n, n + 2, n + 1, n + 3)
    if isinstance(x, np.ndarray):
        x = np.ascontiguousarray(x)
    return x.reshape(*lead, h // block, w // block, block * block * c)


def pixel_shape(height: int, width: int, image_layout: str = "NHWC") -> tuple[int, int, int]:
    """One example's pixels as batches carry them: ``(H, W, 3)`` for "NHWC", ``(H/4, W/4, 48)`` for "S2D"
    (:func:`space_to_depth` by :data:`S2D_BLOCK`)."""
    if image_layout not in ("NHWC", "S2D"):
        raise ValueError(f"image_layout must be 'NHWC' or 'S2D', got {image_layout!r}")
    if image_layout == "NHWC":
        return (height, width, 3)
    b = S2D_BLOCK
    if height % b or width % b:
        raise ValueError(f"image_layout 'S2D' needs an image size divisible by {b}, got {height}x{width}")
    return (height // b, width // b, b * b * 3)


def normalize_pixels(pixels, table, formulation: str | None = None):
    """uint8 ``(..., 3)`` pixels -> float32 model input, on the device: ``table[pixels[..., c], c]``.
    Space-to-depth pixels ``(..., 3k)`` (:func:`space_to_depth`) take the same table, color ``i % 3``.

    ``table`` is an :class:`ImageTransform`'s ``table``, so the result is bit for bit what the transform
    computes on the host: batches can travel as uint8 (a quarter of float32's bytes through data workers,
    batching and host-to-device copies) and become the model's input inside the jitted step.

    On CPUs and GPUs this is a gather from the table (``Formulations.pixel_normalize``, by default the
    backend's; ``formulation`` names it). TPUs gather element by element, which XLA's TPU cost model puts at
    four orders of magnitude slower. Two other formulations exist:

    - ``"one_hot"``: a product with the table, ``sum_v [pixel == v] * table[v, c]``, at full float32
      precision. Each output is one table entry times 1.0 plus zeros, which is exact (the float32 product
      splits the entry into three bfloat16 parts whose sum is the entry), so it gives the gather's bits; but
      it expands every pixel into 256 values, which the TPU compiler estimates at 48 ms of a v5e's step
      for 16 images of 768 px (docs/scale-out.md).
    - ``"affine"`` (the TPU's): ``pixel * scale + offset`` with the table's own ends, one elementwise pass.
      The table is affine in the value, so this is the table up to float32 rounding (within 1e-6,
      checked for every value), less than a TPU's default float32 matmul precision (bfloat16 passes)
      changes in the first convolution.
    """
    import jax
    import jax.numpy as jnp

    from florence_jax import hardware

    formulation = formulation or hardware.resolve().pixel_normalize
    table = jnp.asarray(table, jnp.float32)
    if table.shape != (256, 3):
        raise ValueError(f"a pixel table is (256, 3), got {table.shape}")
    if pixels.dtype != jnp.uint8:
        raise TypeError(f"normalize_pixels takes uint8 pixels, got {pixels.dtype}")
    if pixels.shape[-1] != 3:
        # Space-to-depth pixels (space_to_depth): channel i of the last axis is color i % 3.
        if pixels.shape[-1] % 3:
            raise ValueError(f"pixels' last axis holds colors in threes, got {pixels.shape}")
        flat = pixels.reshape(*pixels.shape[:-1], pixels.shape[-1] // 3, 3)
        return normalize_pixels(flat, table, formulation).reshape(pixels.shape)
    if formulation == "one_hot":
        onehot = (pixels[..., None] == jnp.arange(256, dtype=jnp.uint8)).astype(jnp.bfloat16)
        return jnp.einsum("...cv,vc->...c", onehot, table, precision=jax.lax.Precision.HIGHEST,
                          preferred_element_type=jnp.float32)
    if formulation == "affine":
        # The table is affine in the value (a rescale, then (x - mean) / std): its two ends define it.
        # Within 1e-6 of the table (a few float32 roundings of |values| < 3), not bit for bit.
        scale = (table[255] - table[0]) / 255.0
        return pixels.astype(jnp.float32) * scale + table[0]
    index = pixels.astype(jnp.int32) * 3 + jnp.arange(3, dtype=jnp.int32)
    return jnp.take(table.reshape(-1), index, mode="clip")
