"""Grain input pipeline: records -> static-shape numpy batches, checkpointable, robust to bad records.

Layout of one pipeline (``DataPipeline.train`` / ``.eval``)::

    MapDataset.range(len(source))            record indices, so eval can recover references by index
      .shuffle(seed).repeat(num_epochs)      training: a new permutation each epoch, fixed by seed
      [block shard per process]              training: process i reads block i of each global batch
      .map(ExampleEncoder)                   read record, template, decode + resize + normalize, tokenize, pad
      .to_iter_dataset(ReadOptions)          thread prefetch in whichever process runs it
      [.mp_prefetch(worker_count)]           the map above then runs in grain worker processes
      -> _CountingBatcher                    main process: drop + count bad records, count truncations, stack

Batching happens after the skip, in the main process, so a bad record never leaves a hole in a batch and the
counters live in one place (the iterator's ``counters``, also saved in its state). Everything is indexed and
seeded, so ``get_state``/``set_state`` on the returned iterator resumes the exact batch sequence.

Batches (numpy): ``pixel_values`` (B, H, W, 3) NHWC, float32, or with ``pixel_dtype`` bfloat16 or uint8 (the
resized image, normalized on the device with ``encoder.pixel_table``); ``input_ids``/``attention_mask``
int32 (B, Lp) with Lp = image_seq_length + max_prompt_tokens, laid out exactly as ``Florence2Processor``
does (image placeholders, ``<s>``, prompt, ``</s>``, right padding); ``labels`` int32 (B, Lt) = the tokenizer's
``text_target`` ids (``<s>`` ... ``</s>``), ``label_mask`` float32 (1 on real target tokens incl. ``</s>``).
Eval batches add ``example_mask`` int32 (1 real row, 0 padding) and ``index`` int32 (record index, -1 padding).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import grain
import ml_dtypes
import numpy as np
from PIL import Image

from florence_jax.processing import S2D_BLOCK, ImageTransform, pixel_shape, space_to_depth
from train.data import MAX_PROMPT_TOKENS, MAX_TARGET_TOKENS
from train.data.templates import BadRecordError, Example, get_template
from train.errors import ConfigError

__all__ = ["PipelineConfig", "DataPipeline", "ExampleEncoder", "load_image", "mixture_train"]

log = logging.getLogger(__name__)

_SKIP = "_skip"
# Pixel dtypes a batch can carry; the model casts pixels to its compute dtype first, so bfloat16 pixels give
# a bfloat16 model exactly the input float32 ones do (numpy and XLA both round to nearest even). uint8 pixels
# are the resized image before rescaling and normalization, which the step does on the device
# (``florence_jax.processing.normalize_pixels`` with the transform's table): exact for any model.
_PIXEL_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                 "uint8": np.dtype(np.uint8)}


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Input pipeline settings (a training run's come from its ``train.config.DataConfig``).

    ``batch_size`` is per process. ``max_prompt_tokens`` counts the text tokens after the image placeholders
    (``<s>`` and ``</s>`` included), so the encoder input length is ``image_seq_length + max_prompt_tokens``;
    ``max_target_tokens`` includes ``<s>``/``</s>``. Longer prompts/targets are cut (keeping the final ``</s>``)
    and counted. ``image_size`` None means the processor's size; another value must equal it (the number of
    image tokens is the processor's). ``num_epochs`` None repeats training data forever. ``worker_count`` 0
    decodes in the main process (threads only). ``drop_remainder`` applies to training; evaluation ignores
    ``shuffle``, ``num_epochs`` and ``drop_remainder`` (one ordered pass, last batch padded).
    ``pixel_dtype`` "bfloat16" ships pixels at half the bytes (workers, batching, host-to-device); exact for
    a model that computes in bfloat16, whose first step casts pixels to it. "uint8" ships the resized image
    (a quarter of the bytes, and no normalization on the host): the consumer normalizes on the device with
    ``encoder.pixel_table`` (``florence_jax.processing.normalize_pixels``), exact for any model; training
    uses it (``train.config.PIXEL_DTYPE``). ``image_layout`` "S2D" ships each image rearranged into 4x4
    blocks of 48 channels (``florence_jax.processing.space_to_depth``), what a TPU's first convolution takes
    without a relayout; the model reads it with ``image_layout="S2D"``.
    """

    batch_size: int = 8
    max_prompt_tokens: int = MAX_PROMPT_TOKENS
    max_target_tokens: int = MAX_TARGET_TOKENS
    image_size: int | None = None
    seed: int = 0
    num_epochs: int | None = None
    shuffle: bool = True
    worker_count: int = 0
    worker_buffer_size: int = 2
    read_threads: int = 4
    drop_remainder: bool = True
    template: str | Callable[[Any], Example] = "docvqa"  # a registered name or a template (ConfiguredTemplate)
    pixel_dtype: str = "float32"  # or "bfloat16", "uint8"
    # "S2D": pixels in 4x4 blocks, (H/4, W/4, 48) (florence_jax.processing.space_to_depth), the layout the
    # vision tower's first convolution takes fastest on a TPU (Formulations.pixel_layout, train/setup.py).
    image_layout: str = "NHWC"


def load_image(value: Any) -> Image.Image:
    """Decode whatever a record holds for its image into a fully loaded PIL image.

    Accepts a PIL image, a ``{"bytes", "path"}`` dict (the ``datasets`` Image storage), raw bytes, a path, or
    a uint8 ``(H, W, 3)`` array (a prepared dataset's ready pixels).
    Raises ``BadRecordError`` ("missing_image" / "bad_image"); ``load()`` forces the full decode here so a
    truncated file fails now rather than inside the transform.
    """
    if value is None:
        raise BadRecordError("missing_image")
    if isinstance(value, dict):
        if value.get("prepared_error"):
            raise BadRecordError(value["prepared_error"], "unusable when the dataset was prepared")
        data, path = value.get("bytes"), value.get("path")
        if data:
            value = data
        elif path:
            value = path
        else:
            raise BadRecordError("missing_image", "image dict has neither bytes nor path")
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, np.ndarray):  # ready pixels (train/data/prepared.py): (H, W, 3) uint8
            if value.dtype != np.uint8 or value.ndim != 3 or value.shape[2] != 3:
                raise BadRecordError("bad_image", f"pixel array {value.dtype}{value.shape}, want uint8 (H, W, 3)")
            image = Image.fromarray(value, "RGB")
        elif isinstance(value, bytes | bytearray | memoryview):
            image = Image.open(io.BytesIO(bytes(value)))
        elif isinstance(value, str | os.PathLike):
            if not os.path.exists(value):
                raise BadRecordError("missing_image", f"no file {os.fspath(value)!r}")
            image = Image.open(value)
        else:
            raise BadRecordError("bad_image", f"unsupported image value of type {type(value).__name__}")
        image.load()
    except BadRecordError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise BadRecordError("bad_image", f"{type(e).__name__}: {e}") from e
    return image


class ExampleEncoder:
    """Record index -> padded numpy example (or a skip marker). Picklable: runs in grain worker processes.

    Tokenization follows ``Florence2Processor``: its prompt construction (task tokens such as ``<OCR>`` become
    natural-language prompts), then ``<s>`` + prompt + ``</s>`` tokenized without extra special tokens, after
    ``image_seq_length`` image placeholders. Targets are ``tokenizer(text_target=...)`` ids.
    """

    def __init__(
        self,
        source: Sequence[dict[str, Any]],
        processor: Any,
        config: PipelineConfig,
        image_transform: Callable[[Image.Image], np.ndarray] | None = None,
    ):
        if config.max_prompt_tokens < 2 or config.max_target_tokens < 2:
            raise ValueError("max_prompt_tokens and max_target_tokens must leave room for <s> and </s>")
        self.source = source
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.template = get_template(config.template) if isinstance(config.template, str) else config.template
        self.image_transform = image_transform or ImageTransform.from_processor(processor)
        size = getattr(self.image_transform, "size", None)
        if size is None:
            if config.image_size is None:
                raise ValueError("an image_transform without a .size needs PipelineConfig.image_size")
            size = (config.image_size, config.image_size)
        elif config.image_size is not None and tuple(size) != (config.image_size,) * 2:
            from train.errors import ConfigError

            raise ConfigError(
                f"data.image_size={config.image_size} but the processor resizes to {tuple(size)}: set "
                f"--config.data.image_size={size[0]} or use a processor built at the size you train at (it also "
                "fixes the number of image tokens)"
            )
        self.image_shape = (*(int(v) for v in size), 3)  # what the transform gives
        self.image_layout = config.image_layout
        self.pixel_shape = pixel_shape(*self.image_shape[:2], self.image_layout)  # what batches carry
        if config.pixel_dtype not in _PIXEL_DTYPES:
            raise ValueError(f"pixel_dtype must be one of {sorted(_PIXEL_DTYPES)}, got {config.pixel_dtype!r}")
        self.pixel_dtype = _PIXEL_DTYPES[config.pixel_dtype]
        # uint8 batches: the table that turns them into the model's input on the device; None otherwise.
        self.pixel_table = None
        if self.pixel_dtype == np.uint8:
            if not (callable(getattr(self.image_transform, "uint8", None))
                    and getattr(self.image_transform, "table", None) is not None):
                raise ValueError("pixel_dtype 'uint8' needs an image transform with .uint8(image) and a (256, 3) "
                                 ".table, as florence_jax.processing.ImageTransform has")
            self.pixel_table = np.asarray(self.image_transform.table, np.float32)
        self.image_seq_length = int(processor.num_image_tokens)
        self.prompt_length = self.image_seq_length + config.max_prompt_tokens
        self.target_length = config.max_target_tokens
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.eos_id = int(self.tokenizer.eos_token_id)
        self.bos_id = int(self.tokenizer.bos_token_id)
        self.image_token_id = int(processor.image_token_id)
        # A FeatureStore (train/feature_cache.py): yield cached vision features instead of pixels.
        self.features = None

    # -- text

    def prompt_ids(self, prompt: str) -> tuple[list[int], bool]:
        """Text token ids after the image placeholders (``<s>`` ... ``</s>``), cut to fit; and whether cut."""
        construct = getattr(self.processor, "_construct_prompts", None)
        text = construct([prompt])[0] if construct is not None else prompt
        tok = self.tokenizer
        ids = list(tok(tok.bos_token + text + tok.eos_token, add_special_tokens=False)["input_ids"])
        limit = self.prompt_length - self.image_seq_length
        if len(ids) > limit:
            return ids[: limit - 1] + [self.eos_id], True
        return ids, False

    def target_ids(self, target: str) -> tuple[list[int], bool]:
        """``text_target`` token ids (``<s>`` ... ``</s>``), cut to fit keeping ``</s>``; and whether cut."""
        ids = list(self.tokenizer(text_target=target)["input_ids"])
        if len(ids) > self.target_length:
            return ids[: self.target_length - 1] + [self.eos_id], True
        return ids, False

    def _text_arrays(self, prompt_ids: list[int], target_ids: list[int]) -> dict[str, np.ndarray]:
        input_ids = np.full(self.prompt_length, self.pad_id, np.int32)
        attention_mask = np.zeros(self.prompt_length, np.int32)
        n = self.image_seq_length + len(prompt_ids)
        input_ids[: self.image_seq_length] = self.image_token_id
        input_ids[self.image_seq_length : n] = prompt_ids
        attention_mask[:n] = 1
        labels = np.full(self.target_length, self.pad_id, np.int32)
        label_mask = np.zeros(self.target_length, np.float32)
        labels[: len(target_ids)] = target_ids
        label_mask[: len(target_ids)] = 1.0
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "label_mask": label_mask,
        }

    # -- records

    def example(self, index: int) -> Example:
        return self.template(self.source[int(index)])

    def _read(self, index: int) -> Example:
        try:
            record = self.source[index]
        except Exception as e:  # noqa: BLE001 - an unreadable row is one bad record, not a dead run
            raise BadRecordError("unreadable_record", f"{type(e).__name__}: {e}") from e
        return self.template(record)

    def problem(self, index: int) -> BadRecordError | None:
        """Why record ``index`` cannot be trained on (its row, its template, its image decoded and resized), or
        None when it can. Reads the image even where a feature cache stands in for it."""
        try:
            self._pixels(self._read(int(index)))
        except BadRecordError as e:
            return e
        return None

    def __call__(self, index: int) -> dict[str, Any]:
        index = int(index)
        try:
            example = self._read(index)
            if self.features is not None:
                # Vision features computed once (train/feature_cache.py): no image decode at all.
                pixels = self.features[index]
                if pixels is None:
                    raise BadRecordError("bad_image", "no usable image when the feature cache was built")
            else:
                pixels = self._pixels(example)
        except BadRecordError as e:
            log.debug("skipping record %d: %s", index, e)
            return {_SKIP: e.reason, "detail": str(e)[:300], "index": index}
        prompt_ids, prompt_cut = self.prompt_ids(example.prompt)
        target_ids, target_cut = self.target_ids(example.target)
        return {
            "vision_features" if self.features is not None else "pixel_values": pixels,
            **self._text_arrays(prompt_ids, target_ids),
            "index": index,
            "truncated_prompt": prompt_cut,
            "truncated_target": target_cut,
        }

    def _pixels(self, example: Example) -> np.ndarray:
        image = load_image(example.image)
        if example.image_size is not None and tuple(image.size) != tuple(example.image_size):
            raise BadRecordError(
                "image_size_mismatch",
                f"image is {image.size[0]}x{image.size[1]}, the record says "
                f"{example.image_size[0]}x{example.image_size[1]} (its boxes are relative to that)",
            )
        try:
            if self.pixel_table is not None:
                pixels = np.asarray(self.image_transform.uint8(image), dtype=np.uint8)
            else:
                pixels = np.asarray(self.image_transform(image), dtype=np.float32)
        except Exception as e:  # noqa: BLE001
            raise BadRecordError("bad_image", f"transform failed: {type(e).__name__}: {e}") from e
        if pixels.shape != self.image_shape:
            raise BadRecordError("bad_image", f"transform gave shape {pixels.shape}, want {self.image_shape}")
        pixels = pixels if pixels.dtype == self.pixel_dtype else pixels.astype(self.pixel_dtype)
        return space_to_depth(pixels, S2D_BLOCK) if self.image_layout == "S2D" else pixels

    def padding_example(self) -> dict[str, Any]:
        """A filler row for padded eval batches: a valid minimal input (image tokens, ``<s></s>``) so no
        attention row is fully masked, with label_mask 0 and index -1."""
        arrays = self._text_arrays([self.bos_id, self.eos_id], [self.eos_id])
        arrays["label_mask"][:] = 0.0
        return {"pixel_values": np.zeros(self.pixel_shape, self.pixel_dtype), **arrays, "index": -1}


_BATCH_KEYS = ("pixel_values", "input_ids", "attention_mask", "labels", "label_mask")


class _CountingBatchIterator(grain.DatasetIterator):
    """Drops skip markers (counting reasons), counts truncations, stacks rows into batches.

    Pulls exactly the elements of the batch it returns, so the parent's state is always at a batch boundary
    and get_state/set_state round-trip precisely. In eval mode it pads the last batch and then emits empty
    (all padding) batches up to ``num_batches`` so every process runs the same number of eval steps.
    """

    def __init__(self, parent: grain.DatasetIterator, batcher: _CountingBatcher):
        super().__init__(parent)
        self._b = batcher
        self.counters: collections.Counter[str] = collections.Counter()
        self._emitted = 0
        self._exhausted = False
        self._skip_runs = [0] * len(batcher.max_skip_runs)
        # The first record of each dataset skipped for each reason (for the error below).
        self._skip_examples: dict[tuple[int, str], str] = {}

    def __next__(self) -> dict[str, np.ndarray]:
        b = self._b
        if b.num_batches is not None and self._emitted >= b.num_batches:
            raise StopIteration
        rows: list[dict[str, Any]] = []
        while len(rows) < b.batch_size and not self._exhausted:
            try:
                element = next(self._parent)
            except StopIteration:
                self._exhausted = True
                break
            k = int(element.get("dataset", 0))
            if _SKIP in element:
                self.counters["skipped"] += 1
                self.counters[f"skipped_{element[_SKIP]}"] += 1
                if b.names:
                    self.counters[f"skipped/{b.names[k]}"] += 1
                self._skip_runs[k] += 1
                self._skip_examples.setdefault(
                    (k, element[_SKIP]), f"record {element['index']}: {element.get('detail', element[_SKIP])}")
                limit = b.max_skip_runs[k]
                if limit is not None and self._skip_runs[k] >= limit:
                    which = f" of dataset {b.names[k]!r}" if b.names else ""
                    raise ConfigError(
                        f"{self._skip_runs[k]} records in a row{which} were unusable (two epochs of this "
                        f"process's share): nothing to train on. Counters: {dict(self.counters)}; for example "
                        + "; ".join(v for (d, _), v in self._skip_examples.items() if d == k))
                continue
            self._skip_runs[k] = 0
            self.counters["examples"] += 1
            if b.names:
                self.counters[f"examples/{b.names[k]}"] += 1
            for flag in ("truncated_prompt", "truncated_target"):
                self.counters[flag] += int(bool(element[flag]))
            rows.append(element)
        if len(rows) < b.batch_size:
            if b.num_batches is None and (not rows or b.drop_remainder):
                raise StopIteration
            rows += [b.padding] * (b.batch_size - len(rows))
        self._emitted += 1
        keys = _BATCH_KEYS if "pixel_values" in rows[0] else ("vision_features", *_BATCH_KEYS[1:])
        batch = {key: np.stack([r[key] for r in rows]) for key in keys}
        if b.eval_mode:
            batch["example_mask"] = np.asarray([r["index"] >= 0 for r in rows], np.int32)
            batch["index"] = np.asarray([r["index"] for r in rows], np.int32)
        return batch

    def get_state(self) -> dict[str, Any]:
        return {
            "parent": self._parent.get_state(),
            "counters": dict(self.counters),
            "emitted": self._emitted,
            "exhausted": self._exhausted,
            "skip_run": list(self._skip_runs),
            "workers": self._b.workers,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        # grain saves a worker pipeline's position per worker: it restores into the same number of workers only.
        saved = state.get("workers")  # absent in checkpoints written before it was saved
        hint = ("resume with the data.num_workers the checkpoint was written with" if saved is None else
                f"resume with --config.data.num_workers={saved}")
        if saved is not None and int(saved) != self._b.workers:
            raise ConfigError(f"the checkpoint's data position was saved with data.num_workers={saved} and this run "
                              f"has {self._b.workers}: a data position restores into as many workers only; {hint}")
        try:
            self._parent.set_state(state["parent"])
        except (KeyError, IndexError, ValueError, TypeError) as e:
            raise ConfigError(f"the checkpoint's data position does not restore into this pipeline "
                              f"({type(e).__name__}: {e}); {hint}") from e
        self.counters = collections.Counter(state["counters"])
        self._emitted = int(state["emitted"])
        self._exhausted = bool(state["exhausted"])
        runs = state["skip_run"]  # one per dataset (an int in checkpoints of single-dataset runs)
        self._skip_runs = [int(r) for r in runs] if isinstance(runs, list) else [int(runs)]


class _CountingBatcher(grain.IterDataset):
    def __init__(
        self,
        parent: grain.IterDataset,
        batch_size: int,
        drop_remainder: bool,
        padding: dict[str, Any],
        eval_mode: bool,
        num_batches: int | None,
        max_skip_run: int | None | Sequence[int | None],
        names: Sequence[str] = (),
        workers: int = 0,
    ):
        super().__init__(parent)
        self.workers = workers  # the parent's worker processes: its saved position depends on their number
        # One limit per mixed dataset (a single one otherwise); ``names`` label their counters.
        self.max_skip_runs = list(max_skip_run) if isinstance(max_skip_run, list | tuple) else [max_skip_run]
        self.names = tuple(names)
        self.batch_size = batch_size
        self.drop_remainder = drop_remainder
        self.padding = padding
        self.eval_mode = eval_mode
        self.num_batches = num_batches

    def __iter__(self) -> _CountingBatchIterator:
        return _CountingBatchIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return f"CountingBatcher(batch_size={self.batch_size}, eval={self.eval_mode})"


class _BlockShard(grain.MapDataset):
    """Process ``index`` of ``count``: blocks ``index``, ``index + count``, ... of ``block`` consecutive
    elements of the parent (the parent's global batch ``k`` is blocks ``k * count`` to ``k * count + count - 1``)."""

    _MUTATES_ELEMENT_SPEC = False

    def __init__(self, parent: grain.MapDataset, block: int, index: int, count: int):
        super().__init__(parent)
        self.block, self.index, self.count = block, index, count
        n = len(parent)
        self._length = n if n >= sys.maxsize else n // (block * count) * block

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.slice(i)
        b, r = divmod(int(i), self.block)
        return self._parent[(b * self.count + self.index) * self.block + r]

    def __str__(self) -> str:
        return f"BlockShard(block={self.block}, index={self.index}, count={self.count})"


def _ensure_absl_flags_parsed() -> None:
    """grain's mp_prefetch reads absl flags (worker profiling) and raises UnparsedFlagAccessError in programs
    that never parsed them (anything not started by ``absl.app.run``, e.g. pytest). Marking them parsed keeps
    every flag at its default; a later ``app.run``/``FLAGS(argv)`` still parses normally."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _process_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if shard_index is not None and shard_count is not None:
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
        return shard_index, shard_count
    if shard_index is not None or shard_count is not None:
        raise ValueError("pass both shard_index and shard_count, or neither (then jax decides)")
    import jax

    return jax.process_index(), jax.process_count()


class DataPipeline:
    """Source + processor + config -> grain datasets of batches for training and evaluation.

    ``iter(pipeline.train())`` yields training batches (shuffled, sharded per process, remainder dropped);
    ``iter(pipeline.eval())`` yields padded eval batches covering this process's records exactly once. The
    iterators have ``counters`` (examples, skipped[_reason], truncated_prompt/target) and checkpointable state.
    """

    def __init__(
        self,
        source: Sequence[dict[str, Any]],
        processor: Any,
        config: PipelineConfig,
        image_transform: Callable[[Image.Image], np.ndarray] | None = None,
    ):
        self.source = source
        self.config = config
        self.encoder = ExampleEncoder(source, processor, config, image_transform)

    def _to_batches(
        self,
        indices: grain.MapDataset,
        eval_mode: bool,
        num_batches: int | None,
        max_skip_run: int | None,
    ) -> grain.IterDataset:
        return _batched(indices.map(self.encoder), self.config, self.encoder.padding_example(), eval_mode,
                        num_batches, max_skip_run)

    def _train_indices(self, index: int, count: int) -> tuple[grain.MapDataset, int]:
        """This process's training record indices (its block of every global batch; see ``train``) and the
        longest run of unusable records tolerated before the data is declared untrainable."""
        n = len(self.source)
        if n == 0:
            raise ValueError("the training source has no records")
        indices = grain.MapDataset.range(n)
        if self.config.shuffle:
            indices = indices.shuffle(seed=self.config.seed)
        indices = indices.repeat(self.config.num_epochs)
        if count > 1:
            indices = _BlockShard(indices, self.config.batch_size, index, count)
        # A run of unusable records longer than this process's share of two epochs (the longest gap between
        # two reads of one good record) means there is nothing to train on; without a limit repeat would spin.
        return indices, 2 * math.ceil(n / count) + self.config.batch_size

    def train(self, shard_index: int | None = None, shard_count: int | None = None) -> grain.IterDataset:
        """Training batches for this process (defaults: jax.process_index()/process_count()).

        The record stream does not depend on the process count: one seeded permutation of all records per
        epoch, cut into global batches of ``batch_size * shard_count``; process ``i`` reads the ``i``-th
        block of ``batch_size`` records of each. N processes therefore train on exactly the batches one
        process with the same global batch sees, and every process has the same number of batches. Bad
        records are skipped after sharding (each process fills its block from its next records), so with
        bad records the global batches differ from a single-process run's, while staying deterministic.
        """
        indices, max_skip_run = self._train_indices(*_process_shard(shard_index, shard_count))
        return self._to_batches(indices, eval_mode=False, num_batches=None, max_skip_run=max_skip_run)

    def num_eval_batches(self, shard_count: int = 1) -> int:
        """Eval batches per process: the same on every process (the largest shard, rounded up)."""
        return math.ceil(math.ceil(len(self.source) / shard_count) / self.config.batch_size)

    def eval(self, shard_index: int | None = None, shard_count: int | None = None) -> grain.IterDataset:
        """Eval batches: this process's records in order, once, padded with ``example_mask`` 0 rows."""
        index, count = _process_shard(shard_index, shard_count)
        indices = grain.MapDataset.range(len(self.source))[index::count]
        return self._to_batches(
            indices, eval_mode=True, num_batches=self.num_eval_batches(count), max_skip_run=None
        )

    def references(self, indices: Sequence[int] | np.ndarray) -> list[tuple[str, ...]]:
        """Reference answers for record indices (as in an eval batch's ``index``; -1 gives ``()``)."""
        out = []
        for i in np.asarray(indices).reshape(-1).tolist():
            if i < 0:
                out.append(())
                continue
            try:
                out.append(self.encoder.example(i).references)
            except BadRecordError:
                out.append(())
        return out

    def batch_spec(self, eval_mode: bool = False) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Shape and dtype of every batch array (all static), e.g. for ahead-of-time compilation."""
        b, enc = self.config.batch_size, self.encoder
        spec = {
            "pixel_values": ((b, *enc.pixel_shape), enc.pixel_dtype),
            "input_ids": ((b, enc.prompt_length), np.dtype(np.int32)),
            "attention_mask": ((b, enc.prompt_length), np.dtype(np.int32)),
            "labels": ((b, enc.target_length), np.dtype(np.int32)),
            "label_mask": ((b, enc.target_length), np.dtype(np.float32)),
        }
        if eval_mode:
            spec["example_mask"] = ((b,), np.dtype(np.int32))
            spec["index"] = ((b,), np.dtype(np.int32))
        return spec


def _batched(
    elements: grain.MapDataset,
    cfg: PipelineConfig,
    padding: dict[str, Any],
    eval_mode: bool,
    num_batches: int | None,
    max_skip_run: int | None | Sequence[int | None],
    names: Sequence[str] = (),
) -> grain.IterDataset:
    """Encoded elements -> prefetched (optionally in worker processes) -> counted, stacked batches."""
    ds = elements.to_iter_dataset(
        grain.ReadOptions(num_threads=max(1, cfg.read_threads), prefetch_buffer_size=2 * cfg.batch_size)
    )
    if cfg.worker_count > 0:
        _ensure_absl_flags_parsed()
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=cfg.worker_count, per_worker_buffer_size=cfg.worker_buffer_size)
        )
    return _CountingBatcher(ds, cfg.batch_size, cfg.drop_remainder, padding, eval_mode, num_batches,
                            max_skip_run, names, workers=cfg.worker_count)


class _Tagged:
    """An encoder whose outputs say which mixed dataset they came from (``dataset``: its position)."""

    def __init__(self, encoder: ExampleEncoder, dataset: int):
        self.encoder, self.dataset = encoder, dataset

    def __call__(self, index: int) -> dict[str, Any]:
        out = self.encoder(index)
        out["dataset"] = self.dataset
        return out


def mixture_train(
    pipelines: Sequence[DataPipeline],
    weights: Sequence[float],
    names: Sequence[str],
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> grain.IterDataset:
    """Training batches drawn from several pipelines in proportion to ``weights`` (grain ``MapDataset.mix``).

    Each component is sharded, shuffled and repeated as in ``DataPipeline.train`` with its own encoder
    (template); ``mix`` then interleaves them deterministically by index, so the k-th training example, and
    hence resumption from iterator state, is fixed by the seed. Weights are relative (normalized) and rounded
    by grain to integer proportions with the smallest scaled to 100 (well under 1% off). Batching, prefetch
    and workers follow the first pipeline's config. The iterator's ``counters`` add ``examples/<name>`` and
    ``skipped/<name>``; a component whose whole epoch is unusable raises, naming it.
    """
    if not pipelines or len(pipelines) != len(weights) or len(weights) != len(names):
        raise ValueError("mixture_train needs one weight and one name per pipeline")
    if any(not w > 0 for w in weights):
        raise ValueError(f"mixture weights must be positive, got {list(weights)}")
    index, count = _process_shard(shard_index, shard_count)
    parts, limits = [], []
    for k, pipe in enumerate(pipelines):
        indices, per_epoch = pipe._train_indices(index, count)
        parts.append(indices.map(_Tagged(pipe.encoder, k)))
        limits.append(per_epoch)
    first = pipelines[0]
    mixed = grain.MapDataset.mix(parts, [float(w) for w in weights])
    return _batched(mixed, first.config, first.encoder.padding_example(), False, None, limits, names)
