"""Export in the original remote-code layout (``microsoft/Florence-2-*``): weights, config and processor files.

What the original code (``modeling_florence2.py``, ``processing_florence2.py`` in the Microsoft repositories)
loads with ``trust_remote_code=True``, so a fine-tune made here reaches the tools that still load that layout.
The code itself is not copied: the config's ``auto_map`` names it in the original Hub repository
(``"microsoft/Florence-2-base--modeling_florence2.Florence2ForConditionalGeneration"``), which transformers
fetches from there.

- Weights: the original key names (``florence_jax.weights.mapping.ORIGINAL_KEYS``, the table loading uses),
  ``image_projection`` as the raw ``(in, out)`` matrix, the shared embedding cut back to the original
  vocabulary (every token before ``<image>``, which the original has no id for) and stored once more under each
  of its tied names, and ``language_model.final_logits_bias`` (the model's own, or zeros).
- Config: ``model_type`` florence2 with a ``davit`` vision config and a ``florence2_language`` text config that
  carries the generation defaults the original ``generate()`` reads (num_beams, no_repeat_ngram_size, ...).
- Processor: the tokenizer without ``<image>`` (``tokenizer.json``, ``vocab.json``, ``merges.txt``), and
  ``preprocessor_config.json`` with the CLIP image settings and an ``auto_map`` to the original processor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from florence_jax.weights import mapping

__all__ = ["original_config", "original_state_dict", "save_original_processor"]


def _original_vocab(model) -> int:
    """Rows of the original vocabulary: every id before ``<image>``; refused when real tokens follow it."""
    from florence_jax.weights.common import ExportError

    cfg = model.config
    real = cfg.image_token_id
    if cfg.num_real_tokens is not None and cfg.num_real_tokens > real + 1:
        raise ExportError(
            f"this model has {cfg.num_real_tokens - real - 1} token(s) after <image> (id {real}), added after "
            "loading; the original layout has no <image> id and its processor adds Florence-2's tokens itself, so "
            "those ids cannot be kept. Export it in the native layout (the default)")
    v = cfg.vision_config
    if v.mlp_ratio != 4.0 or not v.qkv_bias or v.activation_function != "gelu":
        raise ExportError("the original DaViT has mlp_ratio 4, qkv_bias and GELU fixed; this model differs")
    return real


def original_state_dict(model, dtype=None) -> dict[str, np.ndarray]:
    """The original layout's state dict (numpy arrays) of an NNX Florence-2 model."""
    from florence_jax.devices import to_host
    from florence_jax.weights.load import LOGITS_BIAS, iter_flax_params

    real = _original_vocab(model)
    out: dict[str, np.ndarray] = {}
    bias = None
    for path, value in iter_flax_params(model):
        x = to_host(value)
        if path == LOGITS_BIAS:
            bias = x
            continue
        native = mapping.flax_to_native(path)
        if native is None:
            raise KeyError(f"no mapping rule for parameter {path!r}")
        key, transform = native
        x = mapping.TRANSFORMS[transform].to_torch(x)
        original = mapping.native_to_original(key)
        if original is None:
            raise KeyError(f"no original-layout name for {key!r}")
        key, transform = original
        x = mapping.TRANSFORMS[transform].to_torch(x)
        if key == "language_model.model.shared.weight":
            x = x[:real]
        out[key] = x
    shared = out["language_model.model.shared.weight"]
    for alias in mapping.ORIGINAL_TIED:
        out[alias] = shared
    out[mapping.ORIGINAL_LOGITS_BIAS] = (np.zeros((1, real), np.float32) if bias is None
                                         else bias[:, :real].astype(np.float32))
    if dtype is not None:
        out = {k: x.astype(dtype) for k, x in out.items()}
    # Each tied name gets its own contiguous copy: safetensors refuses shared memory.
    return {k: np.array(x, order="C", copy=True) for k, x in out.items()}


def original_config(cfg, generation_config, code_repo: str, dtype=None) -> dict[str, Any]:
    """config.json of the original layout for a ``Florence2Config``; the text config carries the generation
    defaults the original ``generate()`` uses (it never reads generation_config.json)."""
    real = cfg.image_token_id
    v, t, g = cfg.vision_config, cfg.text_config, generation_config
    vision = {
        "model_type": "davit", "depths": list(v.depths), "dim_embed": list(v.embed_dim),
        "num_heads": list(v.num_heads), "num_groups": list(v.num_groups), "patch_size": list(v.patch_size),
        "patch_stride": list(v.patch_stride), "patch_padding": list(v.patch_padding),
        "patch_prenorm": list(v.patch_prenorm), "window_size": v.window_size, "drop_path_rate": v.drop_path_rate,
        "projection_dim": v.projection_dim, "enable_checkpoint": False,
        "image_feature_source": ["spatial_avg_pool", "temporal_avg_pool"],
        "image_pos_embed": {"type": "learned_abs_2d", "max_pos_embeddings": v.max_position_embeddings},
        "visual_temporal_embedding": {"type": "COSINE", "max_temporal_embeddings": v.max_temporal_embeddings},
    }
    text = {
        "model_type": "florence2_language", "vocab_size": real, "d_model": t.d_model,
        "encoder_layers": t.encoder_layers, "decoder_layers": t.decoder_layers,
        "encoder_attention_heads": t.encoder_attention_heads, "decoder_attention_heads": t.decoder_attention_heads,
        "encoder_ffn_dim": t.encoder_ffn_dim, "decoder_ffn_dim": t.decoder_ffn_dim,
        "max_position_embeddings": t.max_position_embeddings, "activation_function": t.activation_function,
        "dropout": t.dropout, "attention_dropout": t.attention_dropout, "activation_dropout": t.activation_dropout,
        "scale_embedding": t.scale_embedding, "init_std": 0.02, "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0,
        "classifier_dropout": 0.0, "num_hidden_layers": t.encoder_layers, "use_cache": True,
        "is_encoder_decoder": True, "pad_token_id": t.pad_token_id, "bos_token_id": t.bos_token_id,
        "eos_token_id": t.eos_token_id, "decoder_start_token_id": t.decoder_start_token_id,
        "forced_bos_token_id": g.forced_bos_token_id, "forced_eos_token_id": g.forced_eos_token_id,
        # What the original generate() takes as its defaults.
        "num_beams": g.num_beams, "no_repeat_ngram_size": g.no_repeat_ngram_size,
        "early_stopping": g.early_stopping, "length_penalty": g.length_penalty,
    }
    torch_dtype = np.dtype(dtype).name if dtype is not None else np.dtype(cfg.param_dtype).name
    return {
        "architectures": ["Florence2ForConditionalGeneration"],
        "auto_map": {
            "AutoConfig": f"{code_repo}--configuration_florence2.Florence2Config",
            "AutoModelForCausalLM": f"{code_repo}--modeling_florence2.Florence2ForConditionalGeneration",
        },
        "model_type": "florence2", "is_encoder_decoder": True, "ignore_index": -100,
        "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id,
        "projection_dim": v.projection_dim, "vocab_size": real, "torch_dtype": torch_dtype,
        "vision_config": vision, "text_config": text,
    }


def save_original_processor(processor, out: str | Path, code_repo: str) -> Path:
    """The processor files of the original layout: the tokenizer without ``<image>`` (Florence-2's other added
    tokens stay: the original processor adds them again, which changes nothing) and preprocessor_config.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = processor.tokenizer
    image_token = getattr(processor, "image_token", "<image>")
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    if image_id != len(tokenizer) - 1:
        from florence_jax.weights.common import ExportError

        raise ExportError(f"{image_token} (id {image_id}) is not the tokenizer's last token ({len(tokenizer) - 1}): "
                          "tokens were added after it, which the original layout cannot keep; export natively")
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    state["added_tokens"] = [t for t in state["added_tokens"] if t["content"] != image_token]
    (out / "tokenizer.json").write_text(json.dumps(state, ensure_ascii=False, indent=2) + "\n")
    model = state["model"]
    (out / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False) + "\n")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1024}) + "\n")
    ip = processor.image_processor
    size = {"height": int(ip.size["height"]), "width": int(ip.size["width"])}
    preprocessor = {
        "auto_map": {"AutoProcessor": f"{code_repo}--processing_florence2.Florence2Processor"},
        "processor_class": "Florence2Processor", "image_processor_type": "CLIPImageProcessor",
        "image_seq_length": int(processor.num_image_tokens), "size": size, "crop_size": size,
        "do_resize": bool(ip.do_resize), "resample": int(ip.resample), "do_center_crop": False,
        "do_rescale": bool(ip.do_rescale), "rescale_factor": float(ip.rescale_factor),
        "do_normalize": bool(ip.do_normalize), "image_mean": [float(x) for x in ip.image_mean],
        "image_std": [float(x) for x in ip.image_std], "do_convert_rgb": None,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    return out
