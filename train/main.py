"""``python -m train.main --config CONFIG [--workdir DIR] [--config.FIELD=VALUE ...]``"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(
        prog="python -m train.main",
        description="Fine-tune Florence-2. Rerunning the same command resumes from the workdir.",
        epilog="Override any config field with --config.SECTION.FIELD=VALUE, e.g. --config.optim.learning_rate=1e-5",
    )
    parser.add_argument("--config", default="cpu_demo.py", help="config file or a name in configs/ (default cpu_demo.py)")
    parser.add_argument("--workdir", default=None, help="checkpoints, metrics, plots and export go here "
                        "(default runs/<config name>)")
    parser.add_argument("--coordinator_address", default=None, help="multi-process: host:port of process 0")
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)
    parser.add_argument("--allow_config_change", action="store_true",
                        help="resume a run with settings that change its trajectory (the old config is kept)")
    args, rest = parser.parse_known_args(argv)
    overrides, unknown = [], []
    for item in rest:
        (overrides if item.startswith("--config.") else unknown).append(item)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (config fields take the form --config.a.b=value)")
    return args, [o[len("--config."):] for o in overrides]


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    from train.config import load_config

    try:
        cfg = load_config(args.config, overrides)
    except (ValueError, FileNotFoundError, AttributeError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name in ("coordinator_address", "num_processes", "process_id"):
        if getattr(args, name) is not None:
            setattr(cfg.distributed, name, getattr(args, name))
    workdir = Path(args.workdir or Path("runs") / Path(args.config).stem)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from train.checkpoint import CheckpointRestoreError
    from train.config import ConfigError
    from train.data.sources import SourceError
    from train.loop import run

    try:
        run(cfg, workdir, allow_config_change=args.allow_config_change)
    except (ConfigError, CheckpointRestoreError, SourceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from florence_jax.host_memory import retain_freed_memory

    retain_freed_memory()  # on the CPU only, before JAX starts (see florence_jax.host_memory)
    sys.exit(main())
