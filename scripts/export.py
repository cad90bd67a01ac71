"""Export a training run's checkpoint as a transformers-loadable directory (model + processor).

    python -m scripts.export --workdir runs/gpu_a100 --out exported/ [--step N | --best] [--push_to_hub REPO]
        [--lora merged|adapter|both] [--layout native|original [--code_repo microsoft/Florence-2-base-ft]]

The run's saved config rebuilds the model; the checkpoint restores into it; ``save_pretrained`` writes
config.json, generation_config.json and safetensors in the transformers-native layout, or with ``--layout
original`` the microsoft/Florence-2-* remote-code layout (its config's auto_map names the code in
``--code_repo``). A LoRA run exports the adapters merged into the weights, as a peft adapter directory, or both
(see ``train.setup.export_model``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="a training run's directory (holds config.json, checkpoints/)")
    p.add_argument("--out", required=True, help="where to write the exported model")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    g.add_argument("--best", action="store_true", help="the checkpoint with the best validation score")
    p.add_argument("--lora", choices=("merged", "adapter", "both"),
                   help="for a LoRA run: merged full model, peft adapter directory, or both (default: the "
                        "run's lora.export)")
    p.add_argument("--layout", choices=("native", "original"),
                   help="native (transformers' Florence2ForConditionalGeneration) or original (the "
                        "microsoft/Florence-2-* remote-code layout); default: the run's export_layout")
    p.add_argument("--code_repo", help="original layout: the Hub repo whose code the auto_map names (default: the "
                                       "run's export_code_repo, or the checkpoint's microsoft repo)")
    p.add_argument("--push_to_hub", help="also upload to this Hub repo id")
    args = p.parse_args(argv)

    workdir = Path(args.workdir)
    if not (workdir / "config.json").exists():
        print(f"error: {workdir} has no config.json: not a training run directory", file=sys.stderr)
        return 2
    from flax import nnx

    from florence_jax.sharding import make_mesh
    from train.checkpoint import Checkpointer, abstract_like
    from train.config import TrainConfig, apply_override
    from train.setup import export_model, get_processor
    from train.state import create_model, init_train_state

    cfg = _config_from_json(json.loads((workdir / "config.json").read_text()), TrainConfig, apply_override)
    if args.code_repo:
        cfg.export_code_repo = args.code_repo
    ckpt = Checkpointer(workdir / "checkpoints", keep=cfg.keep_checkpoints)
    step = ckpt.best_step() if args.best else (args.step if args.step is not None else ckpt.latest_step())
    if step is None:
        print(f"error: no {'best ' if args.best else ''}checkpoint in {workdir / 'checkpoints'}", file=sys.stderr)
        return 2
    processor = get_processor(cfg, workdir)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    model = create_model(cfg.model, mesh, tokenizer=processor.tokenizer, seed=cfg.seed,
                         min_shard_size=cfg.mesh.fsdp_min_size, lora=cfg.lora)
    _, state, _ = init_train_state(model, cfg.optim, 1, mesh, min_shard_size=cfg.mesh.fsdp_min_size)
    state, _, _ = ckpt.restore(step, abstract_like(state))
    ckpt.close()
    nnx.update(model, state.params, state.rest)
    written = export_model(cfg, model, processor, Path(args.out), args.lora, layout=args.layout)
    print(f"exported step {step} of {workdir} to {', '.join(str(p) for p in written)}")
    if args.push_to_hub:
        from florence_jax.lora import has_lora, merge_lora

        (merge_lora(model) if has_lora(model) else model).push_to_hub(args.push_to_hub, processor=processor)
        print(f"pushed to {args.push_to_hub}")
    return 0


def _config_from_json(d: dict, cls, apply_override):
    """Rebuild a TrainConfig from its saved JSON through the same type-checked override path (lists as Python
    tuples; a list of sections, such as data.mixture, as those sections)."""
    import dataclasses
    import typing

    cfg = cls()

    def walk(obj, prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(getattr(obj, k) if dataclasses.is_dataclass(getattr(obj, k, None)) else obj, f"{prefix}{k}.", v)
        elif isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
            name = prefix[:-1].rsplit(".", 1)[-1]
            (item_type,) = typing.get_args(typing.get_type_hints(type(obj))[name])[:1]
            setattr(obj, name, tuple(_section(item_type, x) for x in value))
        else:
            text = repr(tuple(value)) if isinstance(value, list) else ("none" if value is None else str(value))
            apply_override(cfg, f"{prefix[:-1]}={text}")

    walk(cfg, "", d)
    return cfg


def _section(cls, values: dict):
    """A config section (dataclass) from its saved dict, lists back to tuples."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


if __name__ == "__main__":
    sys.exit(main())
