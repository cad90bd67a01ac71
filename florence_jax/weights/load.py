"""``from_pretrained``: Hub id or directory -> NNX model, converting PyTorch tensors at load time.

Nothing from a checkpoint is executed: safetensors are read first, ``pytorch_model.bin`` only through
``torch.load(weights_only=True)``, and no remote code is ever imported. Tensors are read one at a time
(memory-mapped), transformed, cast to the parameter dtype on the host and placed straight into their
target sharding, so no full float32 copy of the model lands on one device.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from florence_jax.config import Florence2Config, is_original_layout, resolve_dtype
from florence_jax.weights import mapping

log = logging.getLogger(__name__)

LOGITS_BIAS = "final_logits_bias"  # the NNX path of the original layout's logits bias buffer
SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: lists every unmatched key and shape mismatch at once."""


# ------------------------------------------------------------------------------------------ files
def resolve_checkpoint_dir(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory as is; anything else is a Hub repo id fetched through huggingface_hub's cache."""
    p = Path(name_or_path)
    if p.is_dir():
        return p
    if p.exists():
        raise ValueError(f"{p} is a file; pass the checkpoint directory")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model"]
    local = snapshot_download(str(name_or_path), revision=revision, allow_patterns=patterns)
    path = Path(local)
    if not any(path.glob("*.safetensors")):
        # Older repos only ship pytorch_model.bin: fetch it on demand.
        local = snapshot_download(str(name_or_path), revision=revision, allow_patterns=patterns + ["*.bin"])
        path = Path(local)
    return path


class TensorReader:
    """Lazy access to a checkpoint's tensors as numpy arrays, whatever the file format."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._files: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        self._bin: dict[str, np.ndarray] | None = None
        if (directory / SAFE_INDEX).exists():
            index = json.loads((directory / SAFE_INDEX).read_text())
            self._files = {k: directory / f for k, f in index["weight_map"].items()}
        elif (directory / SAFE_SINGLE).exists():
            self._files = dict.fromkeys(self._open(directory / SAFE_SINGLE).keys(), directory / SAFE_SINGLE)
        elif (directory / BIN_INDEX).exists() or (directory / BIN_SINGLE).exists():
            self._bin = _load_torch_bin(directory)
        else:
            raise FileNotFoundError(
                f"no weights in {directory}: expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}"
            )

    def _open(self, path: Path):
        if path not in self._handles:
            from safetensors import safe_open

            if not path.exists():
                raise FileNotFoundError(f"checkpoint shard {path} listed in the index is missing")
            try:
                self._handles[path] = safe_open(str(path), framework="numpy")
            except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
                raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e
        return self._handles[path]

    def keys(self) -> list[str]:
        return list(self._bin) if self._bin is not None else list(self._files)

    def get(self, key: str) -> np.ndarray:
        if self._bin is not None:
            return self._bin[key]
        path = self._files[key]
        try:
            return self._open(path).get_tensor(key)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {key!r} from {path}: {e}") from e


def _load_torch_bin(directory: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"{directory} holds only pytorch_model.bin; reading it needs torch (pip install 'florence-jax[torch]'), "
            "or convert the checkpoint to safetensors"
        ) from e
    if (directory / BIN_INDEX).exists():
        files = sorted(set(json.loads((directory / BIN_INDEX).read_text())["weight_map"].values()))
    else:
        files = [BIN_SINGLE]
    out: dict[str, np.ndarray] = {}
    for f in files:
        # weights_only=True: never unpickle arbitrary objects from a downloaded file.
        state = torch.load(directory / f, map_location="cpu", weights_only=True, mmap=True)
        for k, t in state.items():
            out[k] = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    return out


# ------------------------------------------------------------------------------------------ mapping
def _flat_path(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def plan_conversion(
    keys: list[str], original: bool, get: Callable[[str], np.ndarray] | None = None) -> tuple[dict[str, tuple[str, list[tuple[str, str]]]], list[str]]:
    """Map checkpoint keys to NNX paths.

    Returns ``{nnx_path: (checkpoint_key, [(stage, transform), ...])}`` and a list of keys no rule
    matches. Tied aliases and dropped keys are consumed here and not returned.
    """
    plan: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    unmatched: list[str] = []
    for key in keys:
        steps: list[tuple[str, str]] = []
        native = key
        if original:
            if key == mapping.ORIGINAL_LOGITS_BIAS:
                plan[LOGITS_BIAS] = (key, [("original", "none")])
                continue
            renamed = mapping.original_to_native(key)
            if renamed is None:
                unmatched.append(key)
                continue
            native, t = renamed
            steps.append(("original", t))
        if native in mapping.TIED_ALIASES:
            continue  # tied to the shared embedding; the shared copy is the one loaded
        target = mapping.native_to_flax(native)
        if target is None:
            unmatched.append(key)
            continue
        path, t = target
        steps.append(("native", t))
        if path in plan:
            unmatched.append(f"{key} (duplicate of {plan[path][0]})")
            continue
        plan[path] = (key, steps)
    return plan, unmatched


def _pad_vocab(x: np.ndarray, rows: int) -> np.ndarray:
    """Append rows at the mean of the existing ones (new tokens start neutral; they are never generated)."""
    extra = rows - x.shape[0]
    mean = x.astype(np.float32).mean(axis=0, keepdims=True).astype(x.dtype)
    return np.concatenate([x, np.repeat(mean, extra, axis=0)], axis=0)


def _to_host_dtype(x: np.ndarray, dtype) -> np.ndarray:
    if x.dtype == np.float16 or x.dtype == np.float32 or x.dtype == np.float64 or str(x.dtype) == "bfloat16":
        return x.astype(jnp.dtype(dtype))
    return x


def load_pretrained(
    cls,
    name_or_path,
    revision: str | None = None,
    dtype: Any = "float32",
    param_dtype: Any = "float32",
    *,
    sharding_fn: Callable[[str, tuple[int, ...]], jax.sharding.Sharding] | None = None,
    config_overrides: dict[str, Any] | None = None,
    max_positions: int | None = None,
    position_init: str | None = None,
):
    """Build the model from a checkpoint directory or Hub id; see the module docstring.

    ``sharding_fn(path, shape)`` returns where each parameter goes (default: the first device).
    ``max_positions``: the BART encoder's and decoder's learned positions grow to this many when the checkpoint
    has fewer, the new rows made by ``position_init`` (:mod:`florence_jax.positions`); a checkpoint with as many
    or more keeps its own (no-op).
    """
    from florence_jax.positions import DEFAULT_POSITION_INIT, check_init

    position_init = check_init(position_init or DEFAULT_POSITION_INIT)
    directory = resolve_checkpoint_dir(name_or_path, revision)
    config_file = directory / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"no config.json in {directory}")
    raw = json.loads(config_file.read_text())
    original = is_original_layout(raw)
    cfg = Florence2Config.from_dict(raw, dtype=resolve_dtype(dtype), param_dtype=resolve_dtype(param_dtype),
                                    **(config_overrides or {}))
    grow_from = None
    have = cfg.text_config.max_position_embeddings
    if max_positions is not None and int(max_positions) > have:
        grow_from = have
        cfg = cfg.replace(text_config=dataclasses.replace(cfg.text_config, max_position_embeddings=int(max_positions)))
        log.info("growing the learned positions from %d to %d (new rows: %s)", have, max_positions, position_init)
    elif max_positions is not None and int(max_positions) < have:
        log.info("%s has %d learned positions, more than the %d asked: kept", name_or_path, have, max_positions)
    reader = TensorReader(directory)
    model = build_from_tensors(cls, cfg, reader.keys(), reader.get, original=original, sharding_fn=sharding_fn,
                               source=str(directory), grow_positions_from=grow_from, position_init=position_init)
    from florence_jax.generation_config import GenerationConfig

    model.generation_config = GenerationConfig.from_pretrained_dir(directory, cfg, original=original)
    model.checkpoint_layout = "original" if original else "native"
    model.name_or_path = str(name_or_path)
    return model


def _convert(cls, cfg: Florence2Config, keys: list[str], get: Callable[[str], np.ndarray], original: bool,
             source: str, grow_positions_from: int | None = None, position_init: str | None = None):
    """Plan, transform and validate every tensor against the abstract model; raise once with all problems.

    ``grow_positions_from``: the checkpoint's learned positions, when ``cfg`` asks for more; its position
    tables of that size are grown to the model's (:func:`florence_jax.positions.grow_position_table`).
    """
    from florence_jax.positions import POSITION_OFFSET, grow_position_table, is_position_table

    abstract = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    targets = {_flat_path(p): (p, v) for p, v in flat.items() if isinstance(v, nnx.Variable)}

    plan, unmatched = plan_conversion(keys, original, get)
    problems: list[str] = [f"unexpected checkpoint tensor {k!r} (no mapping rule)" for k in unmatched]
    for path in plan:
        if path not in targets:
            problems.append(f"checkpoint tensor {plan[path][0]!r} maps to {path!r}, which the model lacks")
    if original and LOGITS_BIAS in targets and LOGITS_BIAS not in plan:
        # Re-saved original checkpoints may leave the bias out (the original code ignores it when missing and
        # starts it at zero); so does this loader.
        plan[LOGITS_BIAS] = ("", [])
    for p in targets:
        if p not in plan:
            native = mapping.flax_to_native(p)
            where = f"checkpoint key {native[0]!r}" if native else "no mapping rule"
            problems.append(f"model parameter {p!r} ({where}) is missing from the checkpoint")

    values: dict[str, np.ndarray] = {}
    vocab = cfg.text_config.vocab_size
    for path, (key, steps) in plan.items():
        if path not in targets:
            continue
        x = get(key) if key else np.zeros(targets[path][1].get_value().shape, np.float32)
        for _, t in steps:
            x = mapping.TRANSFORMS[t].to_flax(x)
        want = tuple(targets[path][1].get_value().shape)
        if original and path.endswith("shared.embedding") and x.shape[0] < vocab and x.shape[1:] == want[1:]:
            x = _pad_vocab(x, vocab)
        if path == LOGITS_BIAS and x.ndim == 2 and x.shape[0] == 1 and x.shape[1] < vocab:
            x = np.pad(x, ((0, 0), (0, vocab - x.shape[1])))  # the added rows are masked out anyway
        if (grow_positions_from is not None and is_position_table(path)
                and x.shape[0] == grow_positions_from + POSITION_OFFSET and x.shape[1:] == want[1:]):
            x = grow_position_table(x, want[0] - POSITION_OFFSET, position_init)
        if tuple(x.shape) != want:
            problems.append(f"shape mismatch for {key!r} -> {path!r}: checkpoint {tuple(x.shape)} "
                            f"(after transform), model expects {want}")
            continue
        values[path] = x
    if problems:
        raise CheckpointError(f"{source} does not match the Florence-2 model ({len(problems)} problems):\n  "
                              + "\n  ".join(problems))
    return graphdef, flat, targets, values


def check_conversion(cls, cfg: Florence2Config, key_shapes: dict[str, tuple[int, ...]], *,
                     original: bool = False) -> int:
    """Validate names and shapes of a checkpoint without reading data (e.g. a large model's meta state
    dict). Returns the number of parameters checked; raises :class:`CheckpointError` otherwise."""

    def get(key):
        return np.broadcast_to(np.zeros((), np.float32), key_shapes[key])

    _, _, targets, _ = _convert(cls, cfg, list(key_shapes), get, original, "checkpoint")
    return len(targets)


def build_from_tensors(cls, cfg: Florence2Config, keys: list[str], get: Callable[[str], np.ndarray], *,
                       original: bool = False, sharding_fn=None, source: str = "checkpoint",
                       grow_positions_from: int | None = None, position_init: str | None = None):
    """Fill an abstract model with converted tensors; one error lists every problem found."""
    graphdef, flat, targets, values = _convert(cls, cfg, keys, get, original, source, grow_positions_from,
                                               position_init)
    device = jax.devices()[0]
    for path, (p, var) in targets.items():
        x = _to_host_dtype(np.asarray(values[path]), var.get_value().dtype)
        if sharding_fn is not None:
            sharding = sharding_fn(path, x.shape)
        else:
            sharding = jax.sharding.SingleDeviceSharding(device)
        var.set_value(jax.device_put(x, sharding))
        flat[p] = var
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def iter_flax_params(model) -> Iterator[tuple[str, jax.Array]]:
    """(dotted NNX path, array) for every parameter and buffer."""
    _, state = nnx.split(model)
    for p, v in nnx.to_flat_state(state):
        if isinstance(v, nnx.Variable):
            yield _flat_path(p), v.get_value()
