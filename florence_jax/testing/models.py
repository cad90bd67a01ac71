"""Tiny and base-size reference models built with transformers from random configs (tests only; needs torch).

The base and large sizes and the builders live in :mod:`florence_jax.reference` (the benchmark uses them too).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from florence_jax.reference import (  # noqa: F401 - re-exported for the tests
    BASE_IMAGE_TOKEN,
    BASE_TEXT,
    BASE_VISION,
    LARGE_TEXT,
    LARGE_VISION,
    base_parity_batch,
    hf_config,
    make_hf_model,
    randomize_,
    save_hf_model,
)

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
def tiny_hf_config(**text_overrides):
    return hf_config(TINY_VISION, dict(TINY_TEXT, **text_overrides), image_token_id=1000)


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
