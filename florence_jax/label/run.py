"""The labelling loop: this process's shards of the input -> grain (decode + resize in workers) -> batches over
every local device -> post-processed records -> shard files.

Per batch, the devices run the vision tower once (:meth:`ShardedGenerator.image_features`) and then each task's
prompt against those features; while they work, the host post-processes the previous batch (decoding its
tokens, parsing boxes) and grain's workers decode the next images. A batch never spans two shards, so a shard is
written as soon as its last batch is parsed, and a stop request (SIGTERM) takes effect between shards.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from florence_jax.generation import Generator
from florence_jax.label.engine import Pending, ShardedGenerator
from florence_jax.label.inputs import Inputs, ItemReader, task_takes_text
from florence_jax.label.output import Layout, finalize
from florence_jax.postprocess import post_process_generation
from florence_jax.predict import (
    build_prompt,
    default_max_new_tokens,
    draw,
    drawing_path,
    load_image,
    pad_prompt,
    pad_rows,
    trim_after_eos,
)
from florence_jax.processing import ImageTransform, prompt_inputs

__all__ = ["LabelSettings", "Progress", "label_shards"]


@dataclass(frozen=True)
class LabelSettings:
    """How to label: tasks (each a task token or a free prompt), the text they take (``text`` for every item, or
    each item's ``text_column``), ``batch_size`` images per device and step, generation settings, grain workers
    (0: decode on threads of this process), ``draw`` (drawings of this process's first items), and further
    ``generation`` options (:class:`~florence_jax.generation.GenerationOptions` fields)."""

    tasks: tuple[str, ...]
    text: str | None = None
    text_column: str | None = None
    batch_size: int = 8
    num_beams: int | None = None
    max_new_tokens: int | None = None
    workers: int = 0
    read_threads: int = 4
    prompt_multiple: int = 16
    draw: int = 0
    categories: tuple[str, ...] | None = None
    generation: Mapping[str, Any] = field(default_factory=dict)


class Progress:
    """Images/s, generated tokens/s and the ETA: a tqdm bar on a terminal, else a line every ``every_s`` seconds
    (logs of batch jobs stay readable)."""

    def __init__(self, total: int, initial: int, enabled: bool = True, every_s: float = 30.0, stream=None):
        self.total, self.done, self.stream = total, initial, stream or sys.stderr
        self.enabled, self.every_s = enabled, every_s
        self.start = self.last = time.perf_counter()
        self.images = self.tokens = 0  # this launch's, for the rates
        self.bar = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="img", file=self.stream, dynamic_ncols=True)

    def rates(self) -> tuple[float, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return self.images / elapsed, self.tokens / elapsed

    def update(self, images: int, tokens: int) -> None:
        self.done += images
        self.images += images
        self.tokens += tokens
        if not self.enabled:
            return
        images_s, tokens_s = self.rates()
        if self.bar is not None:
            self.bar.set_postfix_str(f"{images_s:.1f} img/s, {tokens_s:.0f} tok/s", refresh=False)
            self.bar.update(images)
            return
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            left = (self.total - self.done) / images_s if images_s > 0 else float("inf")
            eta = time.strftime("%H:%M:%S", time.gmtime(left)) if left != float("inf") else "?"
            print(f"label: {self.done}/{self.total} images, {images_s:.2f} img/s, {tokens_s:.1f} tok/s, "
                  f"ETA {eta}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class _Batch:
    shard: int
    rows: list[dict[str, Any]]  # readable items, in order
    errors: list[dict[str, Any]]  # items that cannot be labelled, as their records
    pending: list[Pending] = field(default_factory=list)  # one per task


def _prompt(task: str, text: str | None) -> str:
    return build_prompt(task, text if task_takes_text(task) else None)


class _Tokens:
    """Prompt arrays per task: one tokenization for a prompt every item shares, a batched one for per-item text;
    padded to a multiple of ``multiple`` tokens (one compiled program per length bucket)."""

    def __init__(self, processor, multiple: int):
        self.processor, self.multiple = processor, multiple
        self.pad_id = getattr(processor.tokenizer, "pad_token_id", None) or 0
        self.cache: dict[str, dict[str, np.ndarray]] = {}

    def __call__(self, prompts: list[str], rows: int) -> dict[str, np.ndarray]:
        if len(set(prompts)) == 1:
            if prompts[0] not in self.cache:
                self.cache[prompts[0]] = pad_prompt(prompt_inputs(self.processor, prompts[:1]), self.multiple,
                                                    self.pad_id)
            one = self.cache[prompts[0]]
            return {k: np.repeat(v, rows, axis=0) for k, v in one.items()}
        arrays = pad_prompt(prompt_inputs(self.processor, prompts), self.multiple, self.pad_id)
        return pad_rows(arrays, rows)


def _element_stream(reader: ItemReader, indices: list[int], settings: LabelSettings, rows_per_batch: int):
    """Items ``indices`` read by ``reader`` in grain (worker processes with ``settings.workers``), in order."""
    import grain

    dataset = grain.MapDataset.source(indices).map(reader)
    stream = dataset.to_iter_dataset(grain.ReadOptions(num_threads=max(1, settings.read_threads),
                                                       prefetch_buffer_size=max(settings.read_threads, 2 * rows_per_batch)))
    if settings.workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags (their defaults will do)
            flags.FLAGS.mark_as_parsed()
        stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=settings.workers))
    return iter(stream)


def label_shards(model, processor, inputs: Inputs, layout: Layout, settings: LabelSettings, *,
                 shards: Sequence[int], progress: Progress | None = None,
                 stop: Callable[[], bool] = lambda: False, mesh=None,
                 on_shard: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Label ``shards`` (their unfinished ones) of ``inputs`` into ``layout``; returns counts of this launch and,
    when every shard of the run is done, the run's summary (``"complete"``).

    ``stop()`` is asked after each shard is written: True ends the launch there (the others stay for a rerun).
    """
    todo = [k for k in shards if not layout.is_done(k)]
    layout.remove_stale_temporaries(todo)
    stats: dict[str, Any] = {"shards_written": 0, "items": 0, "errors": 0, "tokens": 0, "stopped": False}
    if todo:
        _label(model, processor, inputs, layout, settings, todo, progress, stop, mesh, on_shard, stats)
        # A stop asked for while the last shard was written leaves nothing undone: merge as usual.
        stats["stopped"] = stats["stopped"] and not all(layout.is_done(k) for k in todo)
    if not stats["stopped"]:
        stats["complete"] = finalize(layout, settings.tasks, settings.categories, inputs.root)
    return stats


def _label(model, processor, inputs, layout, settings, todo, progress, stop, mesh, on_shard, stats) -> None:
    max_new_tokens = settings.max_new_tokens or default_max_new_tokens(model)
    generator = Generator(model, max_new_tokens=max_new_tokens, num_beams=settings.num_beams, **settings.generation)
    engine = ShardedGenerator(generator, mesh)
    rows_per_batch = settings.batch_size * engine.num_devices
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = model.config.text_config.eos_token_id if eos is None else eos
    tokens = _Tokens(processor, settings.prompt_multiple)
    reader = ItemReader(inputs, ImageTransform.from_processor(processor), settings.text_column)
    shard_of = {i: k for k in todo for i in layout.shard_items(k)}
    elements = _element_stream(reader, list(shard_of), settings, rows_per_batch)
    drawn = {"left": settings.draw, "used": set()}
    done_in_shard: dict[int, list[dict[str, Any]]] = {k: [] for k in todo}

    def dispatch(batch: _Batch) -> _Batch:
        if not batch.rows:
            return batch
        pixels = np.stack([row["pixels"] for row in batch.rows])
        pixels = pad_rows({"pixels": pixels}, rows_per_batch)["pixels"]
        features = engine.image_features(pixels)
        for task in settings.tasks:
            prompts = [_prompt(task, row.get("text") or settings.text) for row in batch.rows]
            arrays = pad_rows(tokens(prompts, len(batch.rows)), rows_per_batch)
            batch.pending.append(engine.generate(arrays["input_ids"], features, arrays["attention_mask"]))
        return batch

    def finish(batch: _Batch) -> bool:
        """Parse a dispatched batch; write its shard when it was the shard's last. Returns whether to stop."""
        records = list(batch.errors)
        results: list[dict[str, Any]] = [{} for _ in batch.rows]
        n_tokens = 0
        for task, pending in zip(settings.tasks, batch.pending):
            rows = trim_after_eos(pending.result()[: len(batch.rows)], eos)
            n_tokens += sum(len(r) - 1 for r in rows)
            for row, text, result in zip(batch.rows, processor.batch_decode(rows, skip_special_tokens=False), results):
                result.update(post_process_generation(text, task, row["size"], processor))
        for row, result in zip(batch.rows, results):
            record = {"index": row["index"], "image": row["image"], "size": list(row["size"])}
            for key in ("image_id", "annotation_id", "bbox"):
                if key in row:
                    record[key] = row[key]
            if row.get("text") is not None:
                record["text"] = row["text"]
            record["result"] = result
            records.append(record)
            _maybe_draw(row, result, settings, layout.out, drawn, inputs)
        done = done_in_shard[batch.shard]
        done.extend(records)
        stats["items"] += len(records)
        stats["errors"] += len(batch.errors)
        stats["tokens"] += n_tokens
        if progress is not None:
            progress.update(len(records), n_tokens)
        if len(done) < len(layout.shard_items(batch.shard)):
            return False
        layout.write_shard(batch.shard, done)
        del done_in_shard[batch.shard]
        stats["shards_written"] += 1
        if on_shard is not None:
            on_shard(batch.shard)
        return stop()

    in_flight: _Batch | None = None
    current: _Batch | None = None
    seen_in_shard: dict[int, int] = dict.fromkeys(todo, 0)
    for element in elements:
        shard = shard_of[element["index"]]
        if current is None:
            current = _Batch(shard, [], [])
        if "error" in element:
            current.errors.append({"index": element["index"], "image": element["image"], "error": element["error"]})
        else:
            current.rows.append(element)
        seen_in_shard[shard] += 1
        shard_complete = seen_in_shard[shard] == len(layout.shard_items(shard))
        if len(current.rows) < rows_per_batch and not shard_complete:
            continue
        dispatched = dispatch(current)
        current = None
        if in_flight is not None and finish(in_flight):
            stats["stopped"] = True
            return
        in_flight = dispatched
    if in_flight is not None and finish(in_flight):
        stats["stopped"] = True


def _maybe_draw(row: dict[str, Any], result: dict[str, Any], settings: LabelSettings, out: Path, drawn: dict,
                inputs: Inputs) -> None:
    """Drawings of the first ``settings.draw`` items this process labels, one per task (re-decoded here: only a
    handful of images)."""
    if drawn["left"] <= 0:
        return
    drawn["left"] -= 1
    directory = out / "draw"
    directory.mkdir(exist_ok=True)
    image = load_image(inputs.records[row["index"]][inputs.image_column])
    name = row["image"] or f"item-{row['index']}"
    for task, answer in result.items():
        target = drawing_path(directory, name, row["index"], drawn["used"], task)
        draw(image, answer, task).save(target)
