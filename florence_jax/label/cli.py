"""``python -m florence_jax.label``: the command line of the labeller (see :mod:`florence_jax.label`)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

from florence_jax.label.inputs import INPUT_KINDS, REGION_TASKS, open_inputs, task_takes_text
from florence_jax.label.output import LabelOutputError, box_tasks, prepare_output
from florence_jax.label.run import LabelSettings, Progress, label_shards
from florence_jax.postprocess import TASKS
from florence_jax.predict import (
    PredictError,
    build_prompt,
    check_model_source,
    load_model_and_processor,
    one_line,
)
from florence_jax.sources import SourceError

__all__ = ["main", "parse_args"]

DEFAULT_SHARD_SIZE = 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m florence_jax.label",
        description="Label a dataset with Florence-2 on every local device: JSONL (and COCO for box tasks) "
        "written in shards to --out, resumable by rerunning the same command.",
    )
    p.add_argument("input", help="a folder or glob of images, a parquet/arrow file or folder, a save_to_disk "
                   "folder, a .jsonl of image paths, a COCO JSON, or a Hub dataset id")
    p.add_argument("--out", required=True, help="output folder (manifest, shards, labels.jsonl, coco.*.json)")
    p.add_argument("--model", required=True, help="Hub id or local checkpoint directory")
    p.add_argument("--task", action="append", required=True, dest="tasks", metavar="TASK",
                   help=f"a task ({' '.join(TASKS)}) or a free prompt; repeat for several tasks per image "
                   "(the image is encoded once for all of them)")
    text = p.add_mutually_exclusive_group()
    text.add_argument("--text", help="the input of tasks that take one (caption, phrase, question), for every image")
    text.add_argument("--text_column", help="the column (JSONL key) holding each image's input text")
    p.add_argument("--kind", choices=INPUT_KINDS, help="input kind (default: detected from the path)")
    p.add_argument("--split", default="train", help="split of a Hub dataset or save_to_disk folder, with an "
                   "optional slice ('train[:1000]'); default train")
    p.add_argument("--subset", help="Hub dataset config name")
    p.add_argument("--image_column", default="image", help="column holding the image (default image)")
    p.add_argument("--image_root", help="folder a COCO JSON's file_name entries are relative to")
    p.add_argument("--categories", help="COCO output: comma-separated category names, in id order (default: "
                   "every label found, sorted); boxes with other labels are left out and counted")
    p.add_argument("--processor", help="processor Hub id or directory (default: --model)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--batch_size", type=int, default=8, help="images per device per step (default 8)")
    p.add_argument("--shard_size", type=int, default=DEFAULT_SHARD_SIZE,
                   help=f"items per output shard, the unit of resumption (default {DEFAULT_SHARD_SIZE})")
    p.add_argument("--workers", type=int, default=min(8, max(1, (os.cpu_count() or 2) // 2)),
                   help="grain worker processes decoding and resizing images (0: threads of this process)")
    p.add_argument("--num_beams", type=int, help="beam width (default: the checkpoint's generation config)")
    p.add_argument("--max_new_tokens", type=int, help="default 1024, capped at the decoder's positions")
    p.add_argument("--prompt_multiple", type=int, default=16, help="prompts are padded (masked) to a multiple of "
                   "this many tokens: one compiled program per length bucket (default 16; larger: fewer programs "
                   "for tasks of different prompt lengths)")
    p.add_argument("--draw", type=int, default=0, metavar="N", help="also draw the first N images (per process) "
                   "with their results into OUT/draw")
    p.add_argument("--process_index", type=int, help="this process's part of the input when several label it "
                   "(default: jax.process_index())")
    p.add_argument("--process_count", type=int, help="how many processes label the input (default: "
                   "jax.process_count())")
    p.add_argument("--coordinator_address", help="jax.distributed: the coordinator's host:port (Cloud TPU and "
                   "SLURM are detected without it)")
    p.add_argument("--num_processes", type=int, help="jax.distributed: number of processes")
    p.add_argument("--process_id", type=int, help="jax.distributed: this process's id")
    p.add_argument("--no_progress", action="store_true", help="no progress bar or progress lines")
    return p.parse_args(argv)


def _check(args: argparse.Namespace) -> None:
    """Mistakes found before the model loads; raises PredictError."""
    tasks = [t.strip() for t in args.tasks]
    if len(set(tasks)) != len(tasks):
        raise PredictError("a task is given twice")
    region = [t for t in tasks if t in REGION_TASKS]
    has_text = args.text is not None or args.text_column is not None
    for task in tasks:
        if task in REGION_TASKS:
            build_prompt(task, "<loc_0><loc_0><loc_1><loc_1>")
        elif task in TASKS and TASKS[task].takes_input and not has_text:
            raise PredictError(f"task {task} needs input text: --text for every image or --text_column")
        else:
            build_prompt(task, "x" if has_text and task_takes_text(task) else None)
    if region and has_text:
        raise PredictError(f"{region[0]} takes its text from the COCO boxes; drop --text/--text_column")
    if has_text and not any(task_takes_text(task) for task in tasks):
        given = "--text" if args.text is not None else "--text_column"
        raise PredictError(f"{given} is given but no task takes input text ({', '.join(tasks)}); drop it or add "
                           "a task that does, such as <DocVQA> or <CAPTION_TO_PHRASE_GROUNDING>")
    for name in ("batch_size", "shard_size", "num_beams", "max_new_tokens", "prompt_multiple"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise PredictError(f"--{name} must be at least 1, got {value}")
    if args.workers < 0 or args.draw < 0:
        raise PredictError("--workers and --draw cannot be negative")
    if (args.process_index is None) != (args.process_count is None):
        raise PredictError("pass both --process_index and --process_count, or neither")
    if args.process_count is not None and not 0 <= args.process_index < args.process_count:
        raise PredictError(f"--process_index {args.process_index} not in [0, {args.process_count})")
    if args.categories is not None and not box_tasks(tasks):
        raise PredictError("--categories names the COCO output's categories: it needs a box task such as <OD>")
    check_model_source(args.model)
    if args.processor:
        check_model_source(args.processor)


def _run_identity(args: argparse.Namespace, tasks: list[str]) -> dict[str, Any]:
    """What must match for a rerun to continue an output folder (batching, workers and processes may change)."""
    return {"input": args.input, "kind": args.kind, "split": args.split, "subset": args.subset,
            "image_column": args.image_column, "tasks": tasks, "text": args.text, "text_column": args.text_column,
            "model": args.model, "processor": args.processor, "dtype": args.dtype, "num_beams": args.num_beams,
            "max_new_tokens": args.max_new_tokens, "categories": args.categories}


class _StopFlag:
    """SIGTERM asks the run to stop after the shard it is writing (and exit 0); a rerun continues."""

    def __init__(self):
        self.requested = False

    def __call__(self, *_: Any) -> bool:
        return self.requested

    def install(self) -> Any:
        def handler(signum, frame):
            self.requested = True
            print("label: SIGTERM: stopping after the current shard", file=sys.stderr, flush=True)

        return signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    """Returns the exit status: 0 done or stopped by SIGTERM (items that could not be labelled are error lines,
    not failures), 2 bad arguments or input, 1 the model cannot be loaded or run."""
    args = parse_args(argv)
    tasks = [t.strip() for t in args.tasks]
    try:
        _check(args)
        from florence_jax import distributed

        distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
        import jax

        index = jax.process_index() if args.process_index is None else args.process_index
        count = jax.process_count() if args.process_count is None else args.process_count
        inputs = open_inputs(args.input, kind=args.kind, split=args.split, name=args.subset,
                             image_column=args.image_column, image_root=args.image_root, tasks=tasks)
        layout = prepare_output(args.out, _run_identity(args, tasks), len(inputs), args.shard_size)
    except (PredictError, SourceError, LabelOutputError, ValueError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2

    categories = tuple(c.strip() for c in args.categories.split(",") if c.strip()) if args.categories else None
    settings = LabelSettings(tasks=tuple(tasks), text=args.text, text_column=args.text_column,
                             batch_size=args.batch_size, num_beams=args.num_beams,
                             max_new_tokens=args.max_new_tokens, workers=args.workers, draw=args.draw,
                             prompt_multiple=args.prompt_multiple,
                             categories=categories)
    shards = layout.owned(index, count)
    stop = _StopFlag()
    previous = stop.install()
    progress = None
    try:
        model, processor = load_model_and_processor(args.model, args.processor, args.dtype)
        todo_items = sum(len(layout.shard_items(k)) for k in shards)
        done_items = sum(len(layout.shard_items(k)) for k in shards if layout.is_done(k))
        print(f"label: {len(inputs)} items ({inputs.kind}) in {layout.num_shards} shards; process {index} of "
              f"{count}: {len(shards)} shards, {todo_items - done_items} items to label, on "
              f"{len(jax.local_devices())} devices", file=sys.stderr, flush=True)
        progress = Progress(todo_items, done_items, enabled=not args.no_progress)
        stats = label_shards(model, processor, inputs, layout, settings, shards=shards, progress=progress,
                             stop=stop)
    except LabelOutputError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError, ValueError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    finally:
        if progress is not None:
            progress.close()
        signal.signal(signal.SIGTERM, previous)
    images_s, tokens_s = progress.rates()
    print(f"label: this launch labelled {stats['items']} items ({stats['errors']} unreadable) in "
          f"{stats['shards_written']} shards, {images_s:.2f} img/s, {tokens_s:.1f} tok/s", file=sys.stderr)
    if stats["stopped"]:
        print("label: stopped by SIGTERM; rerun the same command to continue", file=sys.stderr)
    elif stats.get("complete") is not None:
        done = stats["complete"]
        coco = ", ".join(v["file"] for v in done["coco"].values())
        print(f"label: complete: {done['items']} items, {done['errors']} errors -> {layout.out / done['labels']}"
              + (f"; COCO: {coco}" if coco else ""), file=sys.stderr)
    else:
        print("label: this process's shards are done; others are still being labelled", file=sys.stderr)
    return 0
