"""Run a Florence-2 task on images: ``python -m florence_jax.predict`` and :func:`predict`.

::

    python -m florence_jax.predict --model florence-community/Florence-2-base --task "<OD>" a.jpg b.png
    python -m florence_jax.predict --model runs/docvqa/export --task "<DocVQA>" \\
        --text "What is the total?" scan.png
    python -m florence_jax.predict --model DIR --task "<OCR_WITH_REGION>" --draw out/ --dtype bfloat16 *.jpg

Each image gives one JSON line ``{"image": path, "task": task, "result": {task: answer}}`` on stdout, in
input order, as soon as its batch is done; progress goes to stderr. ``result`` is exactly what
:func:`florence_jax.postprocess.post_process_generation` (= transformers' ``post_process_generation``)
returns. ``--draw DIR`` also writes every image as a PNG with its boxes, quad boxes, polygons and labels.

Design notes:

* *One compilation per run.* All images share one prompt, so every batch has the same token length;
  the last batch is padded to ``batch_size`` with copies of its last row (results dropped). Generation
  therefore compiles once, and the next batch's images are decoded on a worker thread while the
  accelerator works on the current one. Prompts are also right-padded (masked) to a multiple of 16
  tokens, so repeated :func:`predict` calls with different questions mostly reuse that program.
* *Same text as transformers.* Prompts go through the checkpoint's own processor, and each generated
  sequence is cut after its first EOS before ``batch_decode(skip_special_tokens=False)``, which is what
  ``generate()`` + ``batch_decode`` give for a single image (``<loc_N>`` tokens are special tokens, so
  they must not be skipped; the padding after EOS would otherwise leak into free-text answers).
* *Tasks.* A task from :data:`~florence_jax.postprocess.TASKS` is validated against ``--text`` (needed or
  forbidden). Anything that is not a lone ``<TOKEN>`` is a free-form prompt (``task + text``) answered as
  plain text; a lone token we do not know is almost always a typo (``<od>``), so it is an error.
* *Errors* the user can fix (task, text, options, model path) end with one ``error: ...`` line on stderr
  and exit status 2 (1 when loading or running the model fails), never a traceback; they are checked
  before the (slow) model load. An image that cannot be read gets its own ``error`` line (stderr and the
  JSON lines) while the others are answered, and the exit status is then 1.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import textwrap
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from florence_jax.generation import Generator
from florence_jax.generation_config import describe_settings
from florence_jax.postprocess import TASKS, post_process_generation
from florence_jax.processing import load_processor, prepare_inputs, to_rgb

__all__ = [
    "PredictError", "build_prompt", "check_image", "draw", "iter_predict", "load_image", "main", "predict",
]

DEFAULT_MAX_NEW_TOKENS = 1024
"""Florence-2's reference setting (its model card's example). Published generation configs leave the
length at transformers' default of 20 new tokens, which truncates detection and OCR answers."""

ImageInput = str | os.PathLike | Image.Image

_BARE_TOKEN = re.compile(r"<[^<>\s]+>")


class PredictError(ValueError):
    """A problem with the inputs (task, text, images, model path) that the user can fix; the CLI prints
    its message as one line instead of a traceback."""


def one_line(error: BaseException, limit: int = 400) -> str:
    """An exception message folded onto one line and shortened (checkpoint and Hub errors span many)."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------ prompts
def build_prompt(task: str, text: str | None = None) -> str:
    """The processor input for ``task`` (+ ``text``); raises :class:`PredictError` for bad combinations.

    Known tasks are passed as ``task + text``: the processor itself turns them into Florence-2's
    natural-language prompts (``<CAPTION_TO_PHRASE_GROUNDING>`` + caption, ...), and ``<DocVQA>`` + question
    is the literal prompt fine-tuned DocVQA checkpoints were trained on. Free-form prompts are
    ``task + text`` as well.
    """
    text, task = (text or "").strip(), task.strip()
    if not task:
        raise PredictError("the task is empty; pass a task token such as <OD> or a free-form prompt")
    if task in TASKS:
        spec = TASKS[task]
        if spec.takes_input and not text:
            raise PredictError(f"task {task} needs input text (--text): a caption, phrase, region, question")
        if not spec.takes_input and text:
            raise PredictError(f"task {task} takes no input text; drop --text")
        return task + text
    if _BARE_TOKEN.fullmatch(task):
        known = " ".join(TASKS)
        raise PredictError(f"unknown task {task!r}; known tasks: {known} (a custom prompt goes whole into "
                           f"--task, e.g. --task '{task}your question')")
    for token, spec in TASKS.items():
        if token in task:
            # transformers would rewrite (or reject) the prompt around the token; say what to do instead.
            fix = f"--task {token} --text '...'" if spec.takes_input else f"--task {token} alone"
            raise PredictError(f"prompt {task!r} contains the task token {token}; pass {fix}")
    return task + text


# ------------------------------------------------------------------------------------------ images
def _image_name(image: ImageInput) -> str | None:
    return None if isinstance(image, Image.Image) else os.fspath(image)


def _open_error(path: str, error: BaseException) -> PredictError:
    return PredictError(f"cannot read image {path}: {one_line(error)}")


_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _existing_file(image: str | os.PathLike) -> str:
    path = os.fspath(image)
    if not os.path.exists(path):
        raise PredictError(f"image not found: {path}")
    if os.path.isdir(path):
        raise PredictError(f"image path is a directory: {path}")
    return path


def check_image(image: str | os.PathLike) -> None:
    """Cheap up-front check (the file exists and its header is a known image format), so a typo in the
    last of many paths fails before the model loads rather than after the other images ran."""
    path = _existing_file(image)
    try:
        with Image.open(path):
            pass
    except _READ_ERRORS as e:
        raise _open_error(path, e) from e


def load_image(image: ImageInput | bytes | Mapping[str, Any]) -> Image.Image:
    """A path, encoded bytes or a ``{"bytes", "path"}`` dict (how ``datasets`` stores an image undecoded) -> a
    fully decoded PIL image, upright per its EXIF orientation (as transformers' ``load_image`` does); PIL
    images pass through untouched. Raises :class:`PredictError`."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, Mapping):
        data, path = image.get("bytes"), image.get("path")
        if not data and not path:
            raise PredictError("no image: the record's image has neither bytes nor a path")
        return load_image(data if data else path)
    if isinstance(image, bytes | bytearray | memoryview):
        name, source = f"<{len(image)} bytes>", io.BytesIO(bytes(image))
    else:
        name = source = _existing_file(image)
    try:
        with Image.open(source) as opened:
            opened.load()
            return ImageOps.exif_transpose(opened)  # a copy, detached from the file
    except _READ_ERRORS as e:
        raise _open_error(name, e) from e


# ------------------------------------------------------------------------------------------ prediction
def default_max_new_tokens(model) -> int:
    """:data:`DEFAULT_MAX_NEW_TOKENS`, capped at the decoder's learned positions."""
    return min(DEFAULT_MAX_NEW_TOKENS, int(model.config.text_config.max_position_embeddings))


def trim_after_eos(sequences: np.ndarray, eos_token_id: int) -> list[list[int]]:
    """Each row up to and including its first EOS after the decoder start token (which is EOS itself
    in Florence-2), dropping the padding ``generate`` writes after it."""
    rows = []
    for row in np.asarray(sequences):
        hits = np.flatnonzero(row[1:] == eos_token_id)
        rows.append(row[: hits[0] + 2].tolist() if hits.size else row.tolist())
    return rows


def pad_rows(arrays: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Pad the batch axis to ``rows`` with copies of the last row: static shapes, one compilation."""
    out = {}
    for key, x in arrays.items():
        missing = rows - x.shape[0]
        out[key] = np.concatenate([x, np.repeat(x[-1:], missing, axis=0)]) if missing > 0 else x
    return out


def pad_prompt(inputs: dict[str, np.ndarray], multiple: int, pad_token_id: int) -> dict[str, np.ndarray]:
    """Right-pad the prompt to a multiple of ``multiple`` tokens (masked out), so prompts of nearby
    lengths (DocVQA questions, captions to ground) share one compiled program across calls."""
    length = inputs["input_ids"].shape[1]
    extra = -length % multiple if multiple > 1 else 0
    if not extra:
        return inputs
    widths = ((0, 0), (0, extra))
    return dict(
        inputs,
        input_ids=np.pad(inputs["input_ids"], widths, constant_values=pad_token_id),
        attention_mask=np.pad(inputs["attention_mask"], widths, constant_values=0),
    )


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def iter_predict(
    model: Any,
    processor: Any,
    images: ImageInput | Iterable[ImageInput],
    task: str,
    text: str | None = None,
    *,
    batch_size: int = 8,
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
    progress: bool = False,
    prompt_multiple: int = 16,
    **generate_kwargs: Any,
) -> Iterator[tuple[dict[str, Any], Image.Image]]:
    """Like :func:`predict`, but yields ``(record, image)`` per image as each batch finishes, so callers
    can stream output and draw on the already decoded image. The model's parameters are read once, when
    iteration starts."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise PredictError(f"batch_size must be at least 1, got {batch_size}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise PredictError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if num_beams is not None and num_beams < 1:
        raise PredictError(f"num_beams must be at least 1, got {num_beams}")
    task = task.strip()
    prompt = build_prompt(task, text)
    items = [images] if isinstance(images, str | os.PathLike | Image.Image) else list(images)
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(model)
    positions = int(model.config.text_config.max_position_embeddings)
    if max_new_tokens > positions:
        # The decoder reads the start token and every new token but the last: max_new_tokens positions.
        raise PredictError(f"max_new_tokens={max_new_tokens} needs {max_new_tokens} decoder positions; the model has "
                           f"{positions}: ask for at most {positions}, or use a model whose positions were grown and "
                           "trained for longer outputs (config.model.max_positions, florence_jax/positions.py)")
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = model.config.text_config.eos_token_id if eos is None else eos
    pad_id = getattr(processor.tokenizer, "pad_token_id", None) or 0  # any id works: it is masked out

    def load_batch(batch: Sequence[ImageInput]) -> list[Image.Image | PredictError]:
        out: list[Image.Image | PredictError] = []
        for item in batch:
            try:
                out.append(load_image(item))
            except PredictError as e:  # one unreadable image is its own error record, not the end of the run
                out.append(e)
        return out

    batches = list(_chunks(items, batch_size))
    # The model as it is now, split once for all batches: a change to it while this iterates is not seen.
    generator = Generator(model, max_new_tokens=max_new_tokens, num_beams=num_beams, **generate_kwargs)
    with ThreadPoolExecutor(max_workers=1) as pool, tqdm(
        total=len(items), unit="img", file=sys.stderr, disable=not progress, dynamic_ncols=True
    ) as bar:
        pending: Future | None = pool.submit(load_batch, batches[0]) if batches else None
        for index, batch in enumerate(batches):
            loaded = pending.result()  # type: ignore[union-attr]
            pending = pool.submit(load_batch, batches[index + 1]) if index + 1 < len(batches) else None
            good = [image for image in loaded if isinstance(image, Image.Image)]
            texts: list[str] = []
            if good:
                try:
                    inputs = prepare_inputs(processor, good, [prompt] * len(good))
                except ValueError as e:  # e.g. a prompt transformers' processor rejects
                    raise PredictError(f"the processor rejected prompt {prompt!r}: {one_line(e)}") from e
                inputs = pad_rows(pad_prompt(inputs, prompt_multiple, pad_id), batch_size)
                sequences = generator(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"])
                rows = trim_after_eos(np.asarray(sequences)[: len(good)], eos)
                texts = processor.batch_decode(rows, skip_special_tokens=False)
            generated_texts = iter(texts)
            for item, image in zip(batch, loaded, strict=True):
                if not isinstance(image, Image.Image):
                    yield {"image": _image_name(item), "task": task, "error": str(image)}, None
                    continue
                generated = next(generated_texts)
                result = post_process_generation(generated, task, image.size, processor)
                record = {"image": _image_name(item), "task": task, "result": result, "text": generated}
                yield record, image
            bar.update(len(loaded))


def predict(
    model: Any,
    processor: Any,
    images: ImageInput | Iterable[ImageInput],
    task: str,
    text: str | None = None,
    *,
    batch_size: int = 8,
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
    progress: bool = False,
    prompt_multiple: int = 16,
    **generate_kwargs: Any,
) -> list[dict[str, Any]]:
    """Run ``task`` on each image; one record per image, in order.

    Args:
        model: a :class:`~florence_jax.Florence2ForConditionalGeneration`.
        processor: the checkpoint's processor (:func:`~florence_jax.processing.load_processor`).
        images: paths or PIL images (or one of them).
        task: a task token from :data:`~florence_jax.postprocess.TASKS` or a free-form prompt.
        text: the task's input (caption, phrase, question); required exactly for tasks that take one.
        batch_size: images per generate call; the last batch is padded, so all calls share one shape.
        num_beams: default: the checkpoint's generation config (3 in the published Florence-2).
        max_new_tokens: default :data:`DEFAULT_MAX_NEW_TOKENS`, capped at the decoder's positions; at most the
            decoder's positions, which a grown model raises (:mod:`florence_jax.positions`).
        progress: show a tqdm bar on stderr.
        prompt_multiple: prompts are right-padded (masked) to a multiple of this many tokens, so calls
            with different questions of similar length reuse one compiled program; 1 disables it.
        generate_kwargs: more generation options, fields of
            :class:`~florence_jax.generation.GenerationOptions` (``no_repeat_ngram_size``, ...).

    Returns:
        ``{"image": path or None for PIL input, "task": task, "result": {task: answer}, "text": raw}``
        per image: ``result`` as transformers' ``post_process_generation`` returns it, ``text`` the
        decoded generation it was parsed from; an image that cannot be read gets ``{"image", "task",
        "error"}`` instead and the others still run. Raises :class:`PredictError` for bad arguments.
    """
    return [
        record
        for record, _ in iter_predict(
            model, processor, images, task, text, batch_size=batch_size, num_beams=num_beams,
            max_new_tokens=max_new_tokens, progress=progress, prompt_multiple=prompt_multiple,
            **generate_kwargs,
        )
    ]


# ------------------------------------------------------------------------------------------ drawing
_PALETTE = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40), (128, 0, 0),
)  # fmt: skip


class _Colours:
    """A colour per distinct label of one image, in order of appearance (distinct up to the palette's 12);
    unlabelled shapes get one each."""

    def __init__(self):
        self.assigned: dict[str, int] = {}

    def __call__(self, label: str, index: int) -> tuple[int, int, int]:
        key = label if label else f"\0{index}"
        if key not in self.assigned:
            self.assigned[key] = len(self.assigned)
        return _PALETTE[self.assigned[key] % len(_PALETTE)]


def _font(size: tuple[int, int]) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    points = max(10, round(min(size) / 40))
    try:
        return ImageFont.load_default(size=points)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _points(flat: Sequence[float], size: tuple[int, int]) -> list[tuple[float, float]]:
    """Flat ``x0, y0, x1, y1, ...`` -> points, clipped near the image (a confused model can write
    coordinates far outside, which PIL cannot rasterise)."""
    width, height = size
    xs = np.clip(np.asarray(flat[0::2], np.float64), -width, 2 * width)
    ys = np.clip(np.asarray(flat[1::2], np.float64), -height, 2 * height)
    return list(zip(xs.tolist(), ys.tolist()))


def _label(canvas: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, colour: tuple[int, int, int],
           font: Any, size: tuple[int, int]) -> None:
    """Text on a filled box in the shape's colour, above the point if there is room (else below it),
    shifted left if it would run off the image."""
    if not text:
        return
    left, top, right, bottom = canvas.textbbox((0, 0), text, font=font)
    box_width, box_height = right - left + 4, bottom - top + 2
    x, y = xy
    x = max(0.0, min(x, size[0] - box_width))
    y = y - box_height if y - box_height >= 0 else max(0.0, y)
    canvas.rectangle((x, y, x + box_width, y + box_height), fill=colour)
    canvas.text((x + 2 - left, y + 1 - top), text, fill=(255, 255, 255), font=font)


def _caption_band(canvas: Image.Image, text: str, font: Any) -> Image.Image:
    """The image with a white band below it holding ``text``, wrapped to the image's width."""
    columns = max(8, int(canvas.width / (0.6 * getattr(font, "size", 10))))
    wrapped = "\n".join(textwrap.wrap(text, columns)) or text
    pen = ImageDraw.Draw(canvas)
    left, top, right, bottom = pen.multiline_textbbox((0, 0), wrapped, font=font)
    band = Image.new("RGB", (canvas.width, canvas.height + bottom - top + 8), (255, 255, 255))
    band.paste(canvas, (0, 0))
    ImageDraw.Draw(band).multiline_text((4 - left, canvas.height + 4 - top), wrapped, fill=(0, 0, 0), font=font)
    return band


def draw(image: Image.Image, result: Mapping[str, Any] | str, task: str) -> Image.Image:
    """A new RGB image with a result drawn on it: boxes, OCR quad boxes and polygons (translucent fill),
    each with its label (a colour per distinct label); a free-text answer goes in a caption band below the
    image (the drawing is taller than the image then).

    ``result`` is :func:`predict`'s ``result`` (``{task: answer}``) or the answer itself.
    """
    answer = result[task] if isinstance(result, Mapping) and task in result else result
    canvas = to_rgb(image)  # always a new image
    size = canvas.size
    font = _font(size)
    width = max(1, round(min(size) / 250))
    if isinstance(answer, str):
        return _caption_band(canvas, answer or "(empty answer)", font)
    if not isinstance(answer, Mapping):
        raise TypeError(f"cannot draw a result of type {type(answer).__name__}")

    _colour = _Colours()
    overlay = Image.new("RGBA", size, (0, 0, 0, 0))
    fill = ImageDraw.Draw(overlay)
    labels: list[tuple[tuple[float, float], str, tuple[int, int, int]]] = []
    outlines: list[tuple[str, Any, tuple[int, int, int]]] = []
    box_labels = answer.get("bboxes_labels", answer.get("labels", []))
    for i, (box, label) in enumerate(zip_longest(answer.get("bboxes", []), box_labels, fillvalue="")):
        if not box:
            continue
        (x0, y0), (x1, y1) = _points(box, size)
        corners = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
        colour = _colour(label, i)
        outlines.append(("rectangle", corners, colour))
        labels.append(((corners[0], corners[1]), label, colour))
    for i, (quad, label) in enumerate(zip_longest(answer.get("quad_boxes", []), answer.get("labels", []),
                                                  fillvalue="")):
        if not quad:
            continue
        points = _points(quad, size)
        colour = _colour(label, i)
        outlines.append(("polygon", points, colour))
        labels.append((min(points, key=lambda p: (p[1], p[0])), label, colour))
    polygon_labels = answer.get("polygons_labels", answer.get("labels", []))
    polygons = answer.get("polygons", [])
    for i, (instance, label) in enumerate(zip_longest(polygons, polygon_labels, fillvalue="")):
        colour = _colour(label, i)
        corners = []
        for polygon in instance or []:
            points = _points(polygon, size)
            if len(points) >= 3:
                fill.polygon(points, fill=(*colour, 80))
                outlines.append(("polygon", points, colour))
            elif points:
                outlines.append(("line", points, colour))
            corners.extend(points)
        if corners:
            labels.append((min(corners, key=lambda p: (p[1], p[0])), label, colour))

    canvas = Image.alpha_composite(canvas.convert("RGBA"), overlay).convert("RGB")
    pen = ImageDraw.Draw(canvas)
    for kind, shape, colour in outlines:
        if kind == "rectangle":
            pen.rectangle(shape, outline=colour, width=width)
        elif kind == "polygon":
            pen.polygon(shape, outline=colour, width=width)
        else:
            pen.line(shape, fill=colour, width=width)
    for xy, label, colour in labels:
        _label(pen, xy, label, colour, font, size)
    return canvas


def task_slug(task: str) -> str:
    """``<OD>`` -> ``od``, ``<DocVQA>`` -> ``docvqa``; a free prompt -> its first words, file-name safe."""
    slug = re.sub(r"[^a-z0-9]+", "_", task.lower()).strip("_")
    return slug[:40] or "task"


def drawing_path(out_dir: Path, item: ImageInput, index: int, used: set[Path], task: str = "") -> Path:
    """``OUT_DIR/<stem>.<task>.png`` (one file per image and task, so runs of several tasks over the same images
    keep each other's drawings), made unique (two inputs with one stem) and never an input file itself."""
    stem = Path(os.fspath(item)).stem if not isinstance(item, Image.Image) else f"image_{index}"
    if task:
        stem = f"{stem}.{task_slug(task)}"
    source = None if isinstance(item, Image.Image) else Path(os.fspath(item)).resolve()
    candidate, n = out_dir / f"{stem}.png", 1
    while candidate.resolve() in used or candidate.resolve() == source:
        candidate, n = out_dir / f"{stem}-{n}.png", n + 1
    used.add(candidate.resolve())
    return candidate


# ------------------------------------------------------------------------------------------ CLI
def print_line(line: str) -> None:
    """One JSON line to stdout; a reader that went away (``| head``) ends the run quietly."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0) from None


def check_model_source(name: str) -> None:
    """A missing local directory is reported as such instead of as a failed Hub lookup: anything that
    cannot be a Hub repo id (absolute, relative with ``./``, more than one ``/``) must exist locally."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise PredictError(f"{name} is a file; pass the model directory")
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise PredictError(f"model directory not found: {name}") from None


def load_model_and_processor(model: str, processor: str | None = None, dtype: str = "float32") -> tuple[Any, Any]:
    """Processor first (fast, and the usual thing missing from a training export), then the model; a failure
    is a ``RuntimeError`` whose message is one line."""
    from florence_jax.modeling.florence2 import Florence2ForConditionalGeneration

    processor_source = processor or model
    try:
        loaded_processor = load_processor(processor_source)
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one line for the user
        raise RuntimeError(f"cannot load the processor from {processor_source}: {one_line(e)}") from e
    try:
        loaded = Florence2ForConditionalGeneration.from_pretrained(model, dtype=dtype, param_dtype=dtype)
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"cannot load the model from {model}: {one_line(e)}") from e
    return loaded, loaded_processor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m florence_jax.predict",
        description="Run a Florence-2 task on images; prints one JSON line per image "
        '({"image", "task", "result"}).',
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--model", required=True, help="Hub id or local checkpoint directory")
    parser.add_argument("--task", required=True, help=f"one of {' '.join(TASKS)}, or a free-form prompt")
    parser.add_argument("--text", default=None, help="the task's input: caption, phrase, region or question")
    parser.add_argument("--processor", default=None, help="processor Hub id or directory (default: --model)")
    parser.add_argument("--draw", default=None, metavar="OUT_DIR", help="write annotated PNGs here")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="compute and parameter dtype (default float32)")
    parser.add_argument("--batch_size", type=int, default=8, help="images per generate call (default 8)")
    parser.add_argument("--num_beams", type=int, default=None,
                        help="beam width (default: the checkpoint's generation config)")
    parser.add_argument("--max_new_tokens", type=int, default=None,
                        help=f"default {DEFAULT_MAX_NEW_TOKENS}, capped at the decoder's positions; at most the "
                             "decoder's positions (more after growing them: florence_jax/positions.py)")
    parser.add_argument("--no_repeat_ngram_size", type=int, default=None,
                        help="ban repeating any n-gram of this size (default: the checkpoint's generation config, 3 "
                             "in the published Florence-2); 0 turns it off, which JSON and other structured "
                             "answers need")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input, 1 model load/run failure)."""
    args = parse_args(argv)
    try:
        build_prompt(args.task, args.text)
        for name, value in (("batch_size", args.batch_size), ("num_beams", args.num_beams),
                            ("max_new_tokens", args.max_new_tokens)):
            if value is not None and value < 1:
                raise PredictError(f"--{name} must be at least 1, got {value}")
        if args.no_repeat_ngram_size is not None and args.no_repeat_ngram_size < 0:
            raise PredictError(f"--no_repeat_ngram_size must be at least 0 (0: off), got {args.no_repeat_ngram_size}")
        if args.draw and Path(args.draw).exists() and not Path(args.draw).is_dir():
            raise PredictError(f"--draw {args.draw} is a file; pass a directory")
        check_model_source(args.model)
        if args.processor:
            check_model_source(args.processor)
    except PredictError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    try:
        model, processor = load_model_and_processor(args.model, args.processor, args.dtype)
        settings = describe_settings(model, args.num_beams, args.max_new_tokens or default_max_new_tokens(model),
                                     args.no_repeat_ngram_size)
        print(f"generation: {settings}", file=sys.stderr)
        out_dir = Path(args.draw) if args.draw else None
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
        used: set[Path] = set()
        records = iter_predict(
            model, processor, args.images, args.task, args.text, batch_size=args.batch_size,
            num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, progress=True,
            **({} if args.no_repeat_ngram_size is None else {"no_repeat_ngram_size": args.no_repeat_ngram_size}),
        )
        failed = 0
        for index, (record, image) in enumerate(records):
            if "error" in record:
                failed += 1
                print(f"error: {record['error']}", file=sys.stderr)
                print_line(json.dumps({key: record[key] for key in ("image", "task", "error")}))
                continue
            print_line(json.dumps({key: record[key] for key in ("image", "task", "result")}))
            if out_dir is not None:
                target = drawing_path(out_dir, args.images[index], index, used, record["task"])
                draw(image, record["result"], record["task"]).save(target)
        if failed:
            print(f"error: {failed} of {len(args.images)} images could not be read (their lines say why)",
                  file=sys.stderr)
            return 1
    except PredictError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError, ValueError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from florence_jax.host_memory import retain_freed_memory

    retain_freed_memory()  # on the CPU only, before JAX starts (see florence_jax.host_memory)
    sys.exit(main())
