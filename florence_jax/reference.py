"""The PyTorch reference: transformers' Florence-2 at the base and large sizes, built from random weights.

What the benchmark (``scripts/benchmark.py``) and the GPU parity check (``scripts/device_parity.py``) compare
ours against, and what the parity tests load; nothing is downloaded. Needs torch and transformers, imported
only when a model is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

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
