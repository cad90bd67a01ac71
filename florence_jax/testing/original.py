"""Tiny checkpoints in the original remote-code layout, shaped like the ``microsoft/Florence-2-*`` repositories
(tests only; needs torch).

A repository of that layout holds a plain BART tokenizer (``tokenizer.json``, ``vocab.json``,
``tokenizer_config.json`` with only ``model_max_length``), ``preprocessor_config.json`` (CLIP settings,
``processor_class`` and an ``auto_map`` to its own ``processing_florence2.py``), that Python file, and weights
under the original names with a 51,289-row vocabulary and ``language_model.final_logits_bias``. Here the
vocabulary is a small BPE plus Florence-2's 1,024 added tokens, and the Python files raise when imported, so
a test fails if anything runs them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from florence_jax.testing.models import (
    TINY_TEXT,
    TINY_VISION,
    hf_config,
    make_hf_model,
    original_config_dict,
    to_original_layout,
)

__all__ = ["CODE_TRAP", "OriginalCheckpoint", "write_original_checkpoint", "write_original_processor_files"]

CODE_TRAP = 'raise RuntimeError("remote code was executed: florence-jax must never import this file")\n'
"""The content of the repository's Python files in these fixtures."""


def write_original_processor_files(out: str | Path, image_seq_length: int, image_size: int = 64,
                                   vocab_size: int = 500, added: tuple[str, ...] = ()) -> int:
    """The processor files of an original-layout repo; returns the tokenizer's length as written (BART's
    specials, the BPE merges and ``<mask>``, plus ``added``: a fine-tune's saved tokens)."""
    from transformers import BartTokenizerFast

    from florence_jax.processing import IMAGENET_MEAN, IMAGENET_STD
    from florence_jax.tiny_processor import _train_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = BartTokenizerFast(tokenizer_object=_train_tokenizer(vocab_size, florence_tokens=False))
    if added:
        tokenizer.add_special_tokens({"additional_special_tokens": list(added)})
    tokenizer.save_pretrained(out)
    state = json.loads((out / "tokenizer.json").read_text())
    (out / "vocab.json").write_text(json.dumps(state["model"]["vocab"]))
    if not added:  # Microsoft's repos: a 34-byte tokenizer_config.json
        (out / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1024}))
    size = {"height": image_size, "width": image_size}
    (out / "preprocessor_config.json").write_text(json.dumps({
        "_valid_processor_keys": ["images", "do_resize", "size", "resample", "do_rescale", "rescale_factor",
                                  "do_normalize", "image_mean", "image_std", "return_tensors", "data_format",
                                  "input_data_format", "do_convert_rgb"],
        "auto_map": {"AutoProcessor": "processing_florence2.Florence2Processor"},
        "crop_size": size, "do_center_crop": False, "do_convert_rgb": None, "do_normalize": True,
        "do_rescale": True, "do_resize": True, "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD),
        "image_processor_type": "CLIPImageProcessor", "image_seq_length": image_seq_length,
        "processor_class": "Florence2Processor", "resample": 3, "size": size,
    }, indent=2))
    for name in ("processing_florence2.py", "modeling_florence2.py", "configuration_florence2.py"):
        (out / name).write_text(CODE_TRAP)
    return len(tokenizer)


class OriginalCheckpoint:
    """What :func:`write_original_checkpoint` wrote: the directory, the real vocabulary, the native transformers
    model the weights came from, and the original state dict."""

    def __init__(self, path: Path, num_real: int, hf_model: Any, state: dict[str, np.ndarray]):
        self.path, self.num_real, self.hf_model, self.state = path, num_real, hf_model, state

    @property
    def logits_bias(self) -> np.ndarray:
        return self.state["language_model.final_logits_bias"]


def write_original_checkpoint(out: str | Path, *, image_size: int = 64, seed: int = 0, bias_scale: float = 0.5,
                              weights: str = "safetensors", dtype: str = "float32", added: tuple[str, ...] = (),
                              max_position_embeddings: int | None = None, sharpen: bool = False,
                              vision: dict[str, Any] | None = None, text: dict[str, Any] | None = None
                              ) -> OriginalCheckpoint:
    """A tiny random Florence-2 repo in the original layout: processor files (:func:`write_original_processor_files`),
    config.json with ``vocab_size`` = the tokenizer's length after Florence-2's tokens, weights under the original
    names with a random non-zero ``final_logits_bias`` (``bias_scale`` 0: zeros), as ``model.safetensors`` or
    ``pytorch_model.bin`` (``weights``) in ``dtype``; and Microsoft's text-config generation defaults.

    ``sharpen`` scales the decoder's positions and cross-attention by 10, so generations depend on the input and
    vary by token (a tiny random decoder otherwise repeats one token; see tests/test_generation.py).
    ``vision``/``text``: the model's sizes (default tiny; ``florence_jax.testing.models.BASE_VISION`` and
    ``BASE_TEXT`` for base size at 768 px); the vocabulary is always the small tokenizer's."""
    from florence_jax.postprocess import ADDED_TOKENS

    out = Path(out)
    vision = dict(TINY_VISION if vision is None else vision)
    stride = int(np.prod(vision.get("patch_stride", (4, 2, 2, 2))))
    seq = 1 + (image_size // stride) ** 2
    base = write_original_processor_files(out, seq, image_size, added=added)
    num_real = base + len([t for t in ADDED_TOKENS if t not in added])
    text = dict(TINY_TEXT if text is None else text, vocab_size=-(-(num_real + 1) // 64) * 64)
    if max_position_embeddings is not None:
        text["max_position_embeddings"] = max_position_embeddings
    cfg = hf_config(vision, text, image_token_id=num_real)
    hf_model = make_hf_model(cfg, seed=seed, weight_scale=2.0)
    if sharpen:
        import torch

        with torch.no_grad():
            for name, p in hf_model.named_parameters():
                if "decoder.embed_positions" in name or ("encoder_attn." in name and p.ndim >= 2):
                    p.mul_(10.0)
    native = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    native = {k: v for k, v in native.items() if k not in ("lm_head.weight",)
              and not k.endswith(("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"))}
    state = to_original_layout(native, num_real)
    rng = np.random.default_rng(seed + 1)
    state["language_model.final_logits_bias"] = (rng.normal(size=(1, num_real)) * bias_scale).astype(np.float32)
    state = {k: np.ascontiguousarray(v.astype(dtype)) for k, v in state.items()}
    if weights == "safetensors":
        from safetensors.numpy import save_file

        save_file(state, str(out / "model.safetensors"))
    else:
        import torch

        torch.save({k: torch.from_numpy(v.copy()) for k, v in state.items()}, out / "pytorch_model.bin")
    config = original_config_dict(cfg.to_dict(), num_real)
    config["torch_dtype"] = dtype
    config["text_config"].update(num_beams=3, no_repeat_ngram_size=3, early_stopping=True, forced_bos_token_id=0,
                                 forced_eos_token_id=2, decoder_start_token_id=2)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    # Large's repos also carry a generation_config.json that the original generate() never reads.
    (out / "generation_config.json").write_text(json.dumps({"num_beams": 3, "transformers_version": "4.42.0"}))
    return OriginalCheckpoint(out, num_real, hf_model, state)
