"""One declarative table between checkpoint keys and NNX parameter paths, used in both directions.

A rule pairs a transformers-native key template with an NNX path template (``{p}`` is the shared
prefix, matched by the rule's regex) and names the transform that turns the PyTorch tensor into the
Flax array. Loading reads the table left to right, export right to left; the transforms are inverses.

The original remote-code layout (``microsoft/Florence-2-*``) is first renamed to native keys by
``ORIGINAL_RENAMES`` (also declarative); export always writes the native layout.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Transform:
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


TRANSFORMS: dict[str, Transform] = {
    "none": Transform(lambda x: x, lambda x: x),
    # nn.Linear stores (out, in); nnx.Linear's kernel is (in, out).
    "linear": Transform(lambda x: x.T, lambda x: x.T),
    # nn.Conv2d stores (out, in/groups, kh, kw); nnx.Conv's kernel is (kh, kw, in/groups, out). The same
    # rule holds for DaViT's depthwise convs ((C, 1, 3, 3) -> (3, 3, 1, C)): it is never guessed from rank.
    "conv": Transform(lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1)),
}


@dataclass(frozen=True)
class Rule:
    hf: str  # e.g. "{p}.weight"
    flax: str  # e.g. "{p}.kernel" (NNX path with dots)
    prefix: str  # regex the {p} group must match
    transform: str

    def _regex(self, template: str) -> re.Pattern:
        head, tail = template.split("{p}")
        return re.compile("^" + re.escape(head) + f"(?P<p>{self.prefix})" + re.escape(tail) + "$")

    def forward(self, key: str) -> str | None:
        m = self._regex(self.hf).match(key)
        return self.flax.format(p=m["p"]) if m else None

    def backward(self, path: str) -> str | None:
        m = self._regex(self.flax).match(path)
        return self.hf.format(p=m["p"]) if m else None


_VT = r"model\.vision_tower"
_LM = r"model\.language_model"

# First match wins; every native key of Florence2ForConditionalGeneration matches exactly one rule.
RULES: tuple[Rule, ...] = (
    # DaViT: patch-embedding convs and the depthwise convs inside blocks.
    Rule("{p}.weight", "{p}.kernel", _VT + r"\.convs\.\d+\.conv", "conv"),
    Rule("{p}.weight", "{p}.kernel", _VT + r"\.blocks\.\d+\.\d+\.(spatial|channel)_block\.conv[12]", "conv"),
    # LayerNorms: weight -> scale.
    Rule("{p}.weight", "{p}.scale", r".*(\.norm|\.norm[12]|_layer_norm|\.layernorm_embedding|\.image_proj_norm)",
         "none"),
    # Embedding tables.
    Rule("{p}.weight", "{p}.embedding", _LM + r"\.(shared|encoder\.embed_positions|decoder\.embed_positions)",
         "none"),
    Rule("{p}.weight", "{p}.embedding",
         r"model\.multi_modal_projector\.image_position_embed\.(row|column)_embeddings", "none"),
    # The constant cosine table is stored as a buffer in both worlds.
    Rule("{p}", "{p}", r"model\.multi_modal_projector\.visual_temporal_embed\.pos_idx_to_embed", "none"),
    # Every other weight belongs to an nn.Linear; every bias is copied as is.
    Rule("{p}.weight", "{p}.kernel", r"model\..*", "linear"),
    Rule("{p}.bias", "{p}.bias", r"model\..*", "none"),
)

# Keys PyTorch writes for tied weights: aliases of the shared embedding, consumed without a copy.
TIED_ALIASES = (
    "model.language_model.encoder.embed_tokens.weight",
    "model.language_model.decoder.embed_tokens.weight",
    "lm_head.weight",
)

# Original remote-code layout -> native keys: (regex, replacement, transform applied on the way).
ORIGINAL_RENAMES: tuple[tuple[str, str, str], ...] = (
    (r"^vision_tower\.convs\.(\d+)\.proj\.(weight|bias)$", r"model.vision_tower.convs.\1.conv.\2", "none"),
    (r"^vision_tower\.convs\.(\d+)\.norm\.(weight|bias)$", r"model.vision_tower.convs.\1.norm.\2", "none"),
    (r"^vision_tower\.blocks\.(\d+)\.(\d+)\.(spatial|channel)_block\.(conv[12])\.fn\.dw\.(weight|bias)$",
     r"model.vision_tower.blocks.\1.\2.\3_block.\4.\5", "none"),
    (r"^vision_tower\.blocks\.(\d+)\.(\d+)\.(spatial|channel)_block\.(window|channel)_attn\.norm\.(weight|bias)$",
     r"model.vision_tower.blocks.\1.\2.\3_block.norm1.\5", "none"),
    (r"^vision_tower\.blocks\.(\d+)\.(\d+)\.(spatial|channel)_block\.(window|channel)_attn\.fn\.(qkv|proj)\.(weight|bias)$",
     r"model.vision_tower.blocks.\1.\2.\3_block.\4_attn.\5.\6", "none"),
    (r"^vision_tower\.blocks\.(\d+)\.(\d+)\.(spatial|channel)_block\.ffn\.norm\.(weight|bias)$",
     r"model.vision_tower.blocks.\1.\2.\3_block.norm2.\4", "none"),
    (r"^vision_tower\.blocks\.(\d+)\.(\d+)\.(spatial|channel)_block\.ffn\.fn\.net\.(fc[12])\.(weight|bias)$",
     r"model.vision_tower.blocks.\1.\2.\3_block.ffn.\4.\5", "none"),
    # A raw parameter used as `x @ image_projection`: (in, out), the transpose of an nn.Linear weight.
    (r"^image_projection$", "model.multi_modal_projector.image_projection.weight", "linear"),
    (r"^image_proj_norm\.(weight|bias)$", r"model.multi_modal_projector.image_proj_norm.\1", "none"),
    (r"^image_pos_embed\.(row|column)_embeddings\.weight$",
     r"model.multi_modal_projector.image_position_embed.\1_embeddings.weight", "none"),
    (r"^visual_temporal_embed\.pos_idx_to_embed$",
     "model.multi_modal_projector.visual_temporal_embed.pos_idx_to_embed", "none"),
    (r"^language_model\.model\.(.*)$", r"model.language_model.\1", "none"),
    (r"^language_model\.lm_head\.weight$", "lm_head.weight", "none"),
)
# Present in the original checkpoints, absent from the native model (transformers' converter drops it).
ORIGINAL_DROPPED = (r"^language_model\.final_logits_bias$",)


def original_to_native(key: str) -> tuple[str, str] | None:
    """Native key and transform for an original-layout key, or None if no rule matches."""
    for pattern, repl, transform in ORIGINAL_RENAMES:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key), transform
    return None


def native_to_flax(key: str) -> tuple[str, str] | None:
    """NNX path (dotted) and transform name for a native key, or None if no rule matches."""
    for rule in RULES:
        path = rule.forward(key)
        if path is not None:
            return path, rule.transform
    return None


def flax_to_native(path: str) -> tuple[str, str] | None:
    """Native key and transform name for an NNX path (dotted), or None if no rule matches."""
    for rule in RULES:
        key = rule.backward(path)
        if key is not None:
            return key, rule.transform
    return None
