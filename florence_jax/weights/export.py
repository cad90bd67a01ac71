"""``save_pretrained`` / ``push_to_hub``: write the transformers-native layout from NNX parameters."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from florence_jax.weights import mapping
from florence_jax.weights.load import iter_flax_params

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def _to_numpy(x) -> np.ndarray:
    import jax
    from jax.experimental import multihost_utils

    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def export_state_dict(model, dtype=None) -> dict[str, np.ndarray]:
    """The native PyTorch state dict (numpy arrays, contiguous) of an NNX Florence-2 model."""
    out: dict[str, np.ndarray] = {}
    for path, value in iter_flax_params(model):
        target = mapping.flax_to_native(path)
        if target is None:
            raise KeyError(f"no mapping rule for parameter {path!r}")
        key, transform = target
        x = mapping.TRANSFORMS[transform].to_torch(_to_numpy(value))
        if dtype is not None:
            x = x.astype(dtype)
        out[key] = np.ascontiguousarray(x)
    return out


def save_pretrained(model, save_directory: str | os.PathLike, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                    dtype=None, is_main_process: bool | None = None) -> Path:
    """Write config.json, generation_config.json and (sharded) safetensors that transformers loads."""
    import jax
    from safetensors.numpy import save_file

    state = export_state_dict(model, dtype)  # every process joins the gather; only one writes
    if is_main_process is None:
        is_main_process = jax.process_index() == 0
    out = Path(save_directory)
    if not is_main_process:
        return out
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_hf_dict()
    if dtype is not None:
        cfg["dtype"] = np.dtype(dtype).name
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = getattr(model, "generation_config", None)
    if gen is None:
        from florence_jax.generation_config import GenerationConfig

        gen = GenerationConfig.from_model_config(model.config)
    (out / "generation_config.json").write_text(json.dumps(gen.to_dict(), indent=2) + "\n")

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    for old in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        old.unlink()
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata=meta)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(x.nbytes for x in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def push_to_hub(model, repo_id: str, *, processor=None, private: bool | None = None,
                commit_message: str = "Upload Florence-2 fine-tuned with florence-jax", token: str | None = None):
    """Save to a temporary directory (plus the processor, if given) and upload it with huggingface_hub."""
    import tempfile

    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        if processor is not None:
            processor.save_pretrained(tmp)
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)
