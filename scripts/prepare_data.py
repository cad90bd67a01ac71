"""Resize a config's training and validation data once into ArrayRecord files of ready pixels.

    python -m scripts.prepare_data --config gpu_a100.py --out /data/docvqa_768 [--workers 8]
    python -m train.main --config gpu_a100.py \\
        --config.data.source=/data/docvqa_768/train.array_record \\
        --config.data.eval_source=/data/docvqa_768/validation.array_record

Every record keeps its fields; its image is decoded, converted to RGB and resized exactly as the config's
processor does it, and stored as raw uint8, so training batches are bit-identical to those made from the
original images while each epoch skips the decode and resize (see train/data/prepared.py). Costs
``H * W * 3`` bytes per record on disk (1.7 MB at 768x768).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.prepare_data", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True, help="folder for train.array_record and validation.array_record")
    p.add_argument("--workers", type=int, default=0, help="processes that decode and resize (0: this one)")
    args, rest = p.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")

    from florence_jax.processing import ImageTransform
    from train.config import load_config
    from train.data.prepared import prepare
    from train.setup import get_processor, get_sources

    cfg = load_config(args.config, [a[len("--config."):] for a in rest])
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    processor = get_processor(cfg, out)
    transform = ImageTransform.from_processor(processor)
    train_src, val_src = get_sources(cfg, out)
    for name, src in (("train", train_src), ("validation", val_src)):
        t0 = time.time()
        n = prepare(src, transform, out / f"{name}.array_record", workers=args.workers)
        dt = time.time() - t0
        print(f"{name}: {n} records from {src!r} in {dt:.1f}s ({n / max(dt, 1e-9):.1f} images/s, "
              f"{args.workers or 1} process(es)) -> {out / f'{name}.array_record'}")
    print("Train on them with:\n"
          f"  --config.data.source={out / 'train.array_record'} "
          f"--config.data.eval_source={out / 'validation.array_record'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
