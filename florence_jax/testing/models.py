"""Tiny and base-size reference models built with transformers from random configs (tests only; needs torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

TINY_VISION = dict(
    depths=[1, 2], embed_dim=[16, 32], num_heads=[2, 4], num_groups=[2, 4], patch_size=[7, 3],
    patch_stride=[4, 2], patch_padding=[3, 1], patch_prenorm=[False, True], window_size=3, projection_dim=24,
    max_position_embeddings=20, drop_path_rate=0.1,
)
TINY_TEXT = dict(
    vocab_size=1024, d_model=24, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
    decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=128,
    dropout=0.1, attention_dropout=0.1, activation_dropout=0.1,
)
BASE_VISION = dict(
    depths=[1, 1, 9, 1], embed_dim=[128, 256, 512, 1024], num_heads=[4, 8, 16, 32], num_groups=[4, 8, 16, 32],
    window_size=12, projection_dim=768,
)
BASE_TEXT = dict(
    vocab_size=51328, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
    decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, max_position_embeddings=1024,
)
LARGE_VISION = dict(BASE_VISION, embed_dim=[256, 512, 1024, 2048], num_heads=[8, 16, 32, 64],
                    num_groups=[8, 16, 32, 64], projection_dim=1024)
LARGE_TEXT = dict(BASE_TEXT, d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                  decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096)


def hf_config(vision: dict[str, Any], text: dict[str, Any], image_token_id: int | None = None, **extra):
    from transformers import Florence2Config

    image_token_id = text["vocab_size"] - 1 if image_token_id is None else image_token_id
    return Florence2Config(vision_config=dict(vision), text_config=dict(text), image_token_id=image_token_id,
                           **extra)


def tiny_hf_config(**text_overrides):
    return hf_config(TINY_VISION, dict(TINY_TEXT, **text_overrides), image_token_id=1000)


def randomize_(model, seed: int = 0, weight_scale: float | None = None) -> None:
    """Give every LayerNorm weight and every bias non-default values, so a swapped weight/bias or a
    missed transpose cannot hide behind the default init. ``weight_scale`` rescales matrices too."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif p.ndim == 1:  # LayerNorm weights
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.2)
            elif weight_scale is not None:
                p.mul_(weight_scale)


def make_hf_model(config, seed: int = 0, weight_scale: float | None = None):
    import torch
    from transformers import Florence2ForConditionalGeneration

    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(config).eval()
    randomize_(model, seed, weight_scale)
    return model


def save_hf_model(model, directory: str | Path, **kwargs) -> Path:
    directory = Path(directory)
    model.save_pretrained(directory, **kwargs)
    return directory


def to_original_layout(state: dict[str, np.ndarray], num_real_tokens: int) -> dict[str, np.ndarray]:
    """Rewrite a native state dict into the original remote-code layout (an independent, test-side
    inverse of transformers' converter): renamed keys, transposed raw ``image_projection``, the
    vocabulary cut back to the tokens that existed before ``<image>`` was appended."""
    import re

    out: dict[str, np.ndarray] = {}
    subs = [
        (r"^model\.vision_tower\.convs\.(\d+)\.conv\.", r"vision_tower.convs.\1.proj."),
        (r"^model\.vision_tower\.convs\.(\d+)\.norm\.", r"vision_tower.convs.\1.norm."),
        (r"^model\.vision_tower\.blocks\.(.*)\.(spatial|channel)_block\.(conv[12])\.", r"vision_tower.blocks.\1.\2_block.\3.fn.dw."),
        (r"^model\.vision_tower\.blocks\.(.*)\.spatial_block\.norm1\.", r"vision_tower.blocks.\1.spatial_block.window_attn.norm."),
        (r"^model\.vision_tower\.blocks\.(.*)\.channel_block\.norm1\.", r"vision_tower.blocks.\1.channel_block.channel_attn.norm."),
        (r"^model\.vision_tower\.blocks\.(.*)\.(spatial|channel)_block\.norm2\.", r"vision_tower.blocks.\1.\2_block.ffn.norm."),
        (r"^model\.vision_tower\.blocks\.(.*)\.(spatial|channel)_block\.(window|channel)_attn\.", r"vision_tower.blocks.\1.\2_block.\3_attn.fn."),
        (r"^model\.vision_tower\.blocks\.(.*)\.(spatial|channel)_block\.ffn\.(fc[12])\.", r"vision_tower.blocks.\1.\2_block.ffn.fn.net.\3."),
        (r"^model\.multi_modal_projector\.image_proj_norm\.", "image_proj_norm."),
        (r"^model\.multi_modal_projector\.image_position_embed\.", "image_pos_embed."),
        (r"^model\.multi_modal_projector\.visual_temporal_embed\.", "visual_temporal_embed."),
        (r"^model\.language_model\.", "language_model.model."),
    ]
    for key, x in state.items():
        if key == "model.multi_modal_projector.image_projection.weight":
            out["image_projection"] = np.ascontiguousarray(x.T)
            continue
        new = key
        for pat, rep in subs:
            new = re.sub(pat, rep, new)
        if key.endswith("shared.weight"):
            x = x[:num_real_tokens]
        out[new] = np.ascontiguousarray(x)
    shared = out["language_model.model.shared.weight"]
    out["language_model.model.encoder.embed_tokens.weight"] = shared.copy()
    out["language_model.model.decoder.embed_tokens.weight"] = shared.copy()
    out["language_model.lm_head.weight"] = shared.copy()
    out["language_model.final_logits_bias"] = np.zeros((1, num_real_tokens), np.float32)
    return out


def original_config_dict(hf_cfg_dict: dict[str, Any], num_real_tokens: int) -> dict[str, Any]:
    """The original layout's config.json for a native config dict."""
    v = dict(hf_cfg_dict["vision_config"])
    v["dim_embed"] = v.pop("embed_dim")
    v["image_pos_embed"] = {"type": "learned_abs_2d", "max_pos_embeddings": v.pop("max_position_embeddings")}
    v["visual_temporal_embedding"] = {"type": "COSINE", "max_temporal_embeddings": v.pop("max_temporal_embeddings")}
    v["image_feature_source"] = ["spatial_avg_pool", "temporal_avg_pool"]
    v["model_type"] = "davit"
    t = dict(hf_cfg_dict["text_config"], vocab_size=num_real_tokens, model_type="florence2_language")
    return {
        "architectures": ["Florence2ForConditionalGeneration"],
        "auto_map": {"AutoConfig": "configuration_florence2.Florence2Config"},
        "model_type": "florence2",
        "vocab_size": num_real_tokens,
        "projection_dim": v["projection_dim"],
        "vision_config": v,
        "text_config": t,
        "is_encoder_decoder": True,
    }


BASE_IMAGE_TOKEN = 51289


def base_parity_batch(image_size: int = 768, seed: int = 0) -> dict[str, np.ndarray]:
    """Two base-size examples with padding on both sides (row 1): image tokens + 12 text tokens, 6
    decoder tokens, NCHW pixels. The batch of the base-size parity checks (CPU test and GPU script)."""
    rng = np.random.default_rng(seed)
    n_img = 1 + (image_size // 32) ** 2
    ids = np.concatenate([np.full((2, n_img), BASE_IMAGE_TOKEN), rng.integers(3, 51000, (2, 12))], 1)
    am = np.ones_like(ids)
    am[1, -4:] = 0
    dec = rng.integers(3, 51000, (2, 6))
    dam = np.ones_like(dec)
    dam[1, -2:] = 0
    pix = rng.normal(size=(2, 3, image_size, image_size)).astype(np.float32)
    return dict(input_ids=ids, pixel_values=pix, attention_mask=am, decoder_input_ids=dec,
                decoder_attention_mask=dam)
