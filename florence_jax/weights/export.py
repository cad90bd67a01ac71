"""``save_pretrained`` / ``push_to_hub``: write the transformers-native layout from NNX parameters."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from florence_jax.devices import to_host
from florence_jax.weights import mapping
from florence_jax.weights.common import ExportError as ExportError  # raised here; callers catch it from here
from florence_jax.weights.load import LOGITS_BIAS, iter_flax_params

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def export_state_dict(model, dtype=None) -> dict[str, np.ndarray]:
    """The native PyTorch state dict (numpy arrays, contiguous) of an NNX Florence-2 model.

    A model loaded from the original layout carries that layout's ``final_logits_bias``; the native class has
    no place for it, so a non-zero bias is refused (export with ``layout="original"``) and a zero one, which
    changes nothing, is left out.
    """
    out: dict[str, np.ndarray] = {}
    for path, value in iter_flax_params(model):
        if path == LOGITS_BIAS:
            if np.any(to_host(value) != 0):
                raise ExportError(
                    "this model adds a non-zero final_logits_bias to its logits (an original-layout checkpoint), "
                    "which transformers' native Florence2ForConditionalGeneration has no place for: exporting it "
                    "natively would change its outputs. Export with layout='original' (scripts.export --layout "
                    "original, config export_layout=original) instead")
            continue
        target = mapping.flax_to_native(path)
        if target is None:
            raise KeyError(f"no mapping rule for parameter {path!r}")
        key, transform = target
        x = mapping.TRANSFORMS[transform].to_torch(to_host(value))
        if dtype is not None:
            x = x.astype(dtype)
        out[key] = np.ascontiguousarray(x)
    return out


LAYOUTS = ("native", "original")
DEFAULT_CODE_REPO = "microsoft/Florence-2-base"


def _generation_config(model):
    gen = getattr(model, "generation_config", None)
    if gen is None:
        from florence_jax.generation_config import GenerationConfig

        gen = GenerationConfig.from_model_config(model.config)
    return gen


def save_pretrained(model, save_directory: str | os.PathLike, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                    dtype=None, is_main_process: bool | None = None, layout: str = "native",
                    code_repo: str = DEFAULT_CODE_REPO) -> Path:
    """Write config.json and (sharded) safetensors in the chosen layout.

    ``layout="native"`` (default): what ``transformers.Florence2ForConditionalGeneration`` loads, with
    generation_config.json. ``layout="original"``: what the original remote code loads with
    ``trust_remote_code=True`` (:mod:`florence_jax.weights.original`); its config's ``auto_map`` names the code
    in ``code_repo`` rather than copying it.
    """
    import jax
    from safetensors.numpy import save_file

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "original":
        from florence_jax.weights.original import original_config, original_state_dict

        state = original_state_dict(model, dtype)
    else:
        state = export_state_dict(model, dtype)  # every process joins the gather; only one writes
    if is_main_process is None:
        is_main_process = jax.process_index() == 0
    out = Path(save_directory)
    if not is_main_process:
        return out
    out.mkdir(parents=True, exist_ok=True)
    gen = _generation_config(model)
    if layout == "original":
        cfg = original_config(model.config, gen, code_repo, dtype)
        # The original code reads its generation defaults from text_config; a leftover native
        # generation_config.json would only mislead.
        (out / "generation_config.json").unlink(missing_ok=True)
    else:
        cfg = model.config.to_hf_dict()
        if dtype is not None:
            cfg["dtype"] = np.dtype(dtype).name
        (out / "generation_config.json").write_text(json.dumps(gen.to_dict(), indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

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
    _ordinary_permissions(out)
    return out


def _ordinary_permissions(directory: Path) -> None:
    """safetensors writes its files 0600; give every written file the mode a new file gets here (0644 under
    the usual umask), so an export can be shared and served like the processor files next to it."""
    umask = os.umask(0)
    os.umask(umask)
    for f in directory.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)


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
