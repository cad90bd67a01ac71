"""One declarative table between checkpoint keys and NNX parameter paths, used in both directions.

A rule pairs a transformers-native key template with an NNX path template (``{p}`` is the shared
prefix, matched by the rule's regex) and names the transform that turns the PyTorch tensor into the
Flax array. Loading reads the table left to right, export right to left; the transforms are inverses.

The original remote-code layout (``microsoft/Florence-2-*``) is renamed to and from native keys by
``ORIGINAL_KEYS`` (also declarative, also used both ways): loading reads either layout, export writes either.
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

# Original remote-code layout <-> native keys: (original template, native template, transform to native).
# ``{name}`` placeholders match ``_SLOTS[name]`` and carry over unchanged; the same rows serve both directions.
_SLOTS = {"i": r"\d+", "j": r"\d+", "kind": r"spatial|channel", "wb": r"weight|bias", "conv": r"conv[12]",
          "op": r"qkv|proj", "fc": r"fc[12]", "axis": r"row|column", "rest": r".+"}
_VB = "vision_tower.blocks.{i}.{j}"
ORIGINAL_KEYS: tuple[tuple[str, str, str], ...] = (
    ("vision_tower.convs.{i}.proj.{wb}", "model.vision_tower.convs.{i}.conv.{wb}", "none"),
    ("vision_tower.convs.{i}.norm.{wb}", "model.vision_tower.convs.{i}.norm.{wb}", "none"),
    (_VB + ".{kind}_block.{conv}.fn.dw.{wb}", "model." + _VB + ".{kind}_block.{conv}.{wb}", "none"),
    (_VB + ".spatial_block.window_attn.norm.{wb}", "model." + _VB + ".spatial_block.norm1.{wb}", "none"),
    (_VB + ".channel_block.channel_attn.norm.{wb}", "model." + _VB + ".channel_block.norm1.{wb}", "none"),
    (_VB + ".spatial_block.window_attn.fn.{op}.{wb}", "model." + _VB + ".spatial_block.window_attn.{op}.{wb}", "none"),
    (_VB + ".channel_block.channel_attn.fn.{op}.{wb}", "model." + _VB + ".channel_block.channel_attn.{op}.{wb}",
     "none"),
    (_VB + ".{kind}_block.ffn.norm.{wb}", "model." + _VB + ".{kind}_block.norm2.{wb}", "none"),
    (_VB + ".{kind}_block.ffn.fn.net.{fc}.{wb}", "model." + _VB + ".{kind}_block.ffn.{fc}.{wb}", "none"),
    # A raw parameter used as `x @ image_projection`: (in, out), the transpose of an nn.Linear weight.
    ("image_projection", "model.multi_modal_projector.image_projection.weight", "linear"),
    ("image_proj_norm.{wb}", "model.multi_modal_projector.image_proj_norm.{wb}", "none"),
    ("image_pos_embed.{axis}_embeddings.weight",
     "model.multi_modal_projector.image_position_embed.{axis}_embeddings.weight", "none"),
    ("visual_temporal_embed.pos_idx_to_embed", "model.multi_modal_projector.visual_temporal_embed.pos_idx_to_embed",
     "none"),
    ("language_model.lm_head.weight", "lm_head.weight", "none"),
    ("language_model.model.{rest}", "model.language_model.{rest}", "none"),
)
# The original model's bias on every logit: no native key; it loads into the model's ``final_logits_bias``
# buffer (see ``Florence2Config.final_logits_bias``) and is written back by the original-layout export.
ORIGINAL_LOGITS_BIAS = "language_model.final_logits_bias"
# Keys the original checkpoints also store for the tied embedding (the shared table is the one loaded).
ORIGINAL_TIED = ("language_model.model.encoder.embed_tokens.weight",
                 "language_model.model.decoder.embed_tokens.weight", "language_model.lm_head.weight")


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"(\{\w+\})", template)
    body = "".join(f"(?P<{p[1:-1]}>{_SLOTS[p[1:-1]]})" if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile("^" + body + "$")


_ORIGINAL_RULES = tuple((_template_regex(o), _template_regex(n), o, n, t) for o, n, t in ORIGINAL_KEYS)


def original_to_native(key: str) -> tuple[str, str] | None:
    """Native key and transform for an original-layout key, or None if no rule matches."""
    for original, _, _, native, transform in _ORIGINAL_RULES:
        m = original.match(key)
        if m:
            return native.format(**m.groupdict()), transform
    return None


def native_to_original(key: str) -> tuple[str, str] | None:
    """Original-layout key and the transform that made the native tensor from it (apply its ``to_torch`` to go
    back), or None if no rule matches."""
    for _, native, original, _, transform in _ORIGINAL_RULES:
        m = native.match(key)
        if m:
            return original.format(**m.groupdict()), transform
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
