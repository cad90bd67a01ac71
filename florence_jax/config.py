"""Model configuration: typed dataclasses that read both Florence-2 config.json layouts.

Two layouts exist on the Hub:

* transformers-native (``florence-community/Florence-2-*``): ``vision_config`` uses ``embed_dim`` and
  ``max_position_embeddings``; ``text_config`` is a BART config; ``image_token_id`` is set.
* the original remote-code layout (``microsoft/Florence-2-*``): ``vision_config`` uses ``dim_embed``,
  ``image_pos_embed.max_pos_embeddings`` and ``visual_temporal_embedding.max_temporal_embeddings``; there is
  no ``<image>`` token, so loading adds one (see :mod:`florence_jax.weights.load`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype: Any) -> Any:
    """Accept ``"bfloat16"``, ``jnp.bfloat16`` or ``np.dtype``; return a jnp dtype."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return jnp.dtype(dtype).type


@dataclass(frozen=True)
class VisionConfig:
    """DaViT vision tower + projector settings (names follow transformers' ``Florence2VisionConfig``)."""

    in_channels: int = 3
    depths: tuple[int, ...] = (1, 1, 9, 1)
    patch_size: tuple[int, ...] = (7, 3, 3, 3)
    patch_stride: tuple[int, ...] = (4, 2, 2, 2)
    patch_padding: tuple[int, ...] = (3, 1, 1, 1)
    patch_prenorm: tuple[bool, ...] = (False, True, True, True)
    embed_dim: tuple[int, ...] = (128, 256, 512, 1024)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    num_groups: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 12
    drop_path_rate: float = 0.1
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    activation_function: str = "gelu"
    projection_dim: int = 768
    max_temporal_embeddings: int = 100
    max_position_embeddings: int = 50

    def __post_init__(self):
        n = len(self.embed_dim)
        for name in ("depths", "patch_size", "patch_stride", "patch_padding", "patch_prenorm", "num_heads",
                     "num_groups"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"vision_config.{name} has {len(getattr(self, name))} entries, expected {n}")

    @property
    def total_stride(self) -> int:
        out = 1
        for s in self.patch_stride:
            out *= s
        return out


@dataclass(frozen=True)
class TextConfig:
    """BART encoder-decoder settings (names follow transformers' ``BartConfig``)."""

    vocab_size: int = 51328
    d_model: int = 768
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_attention_heads: int = 12
    decoder_attention_heads: int = 12
    encoder_ffn_dim: int = 3072
    decoder_ffn_dim: int = 3072
    max_position_embeddings: int = 1024
    activation_function: str = "gelu"
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.1
    scale_embedding: bool = False
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    decoder_start_token_id: int = 2
    forced_eos_token_id: int | None = 2
    forced_bos_token_id: int | None = None
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class Florence2Config:
    """Whole-model configuration plus the numeric settings of this port.

    ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype of parameters. ``num_real_tokens``
    (when set) marks vocabulary rows at or above it as padding added at conversion: generation never
    emits them.

    Two settings reproduce the original remote-code model (``microsoft/Florence-2-*``), set when such a
    checkpoint loads: ``final_logits_bias`` gives the model a frozen ``(1, vocab)`` buffer added to every
    logit, as the original adds its ``final_logits_bias``; ``mask_padded_vocab`` takes the rows at or above
    ``num_real_tokens`` (``<image>`` and the padding to a multiple of 64, which the original's 51,289-row
    vocabulary does not have) out of the softmax, in training and generation alike, so losses and beam
    scores are the original's.
    """

    vision_config: VisionConfig = field(default_factory=VisionConfig)
    text_config: TextConfig = field(default_factory=TextConfig)
    image_token_id: int = 51289
    tie_word_embeddings: bool = True  # always: the LM head is the shared embedding
    num_real_tokens: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "xla"  # "xla" (einsum softmax), "dot_product" (jax.nn.dot_product_attention)
    remat_policy: str = "none"  # "none", "full", "dots": rematerialise vision blocks and BART layers
    # run a vision stage's blocks as one lax.scan (see DaViT._scan_stage) where the hardware's formulation
    # scans (Formulations.vision_stages: the CPU's and TPU's); False unrolls everywhere
    scan_vision_blocks: bool = True
    final_logits_bias: bool = False  # original layout: a frozen bias added to the logits
    mask_padded_vocab: bool = False  # original layout: rows >= num_real_tokens take no probability mass
    # The hardware the program is built for: a spec ("cpu", "gpu:depthwise_conv=grouped"; None for the
    # backend JAX runs on), resolved once by the model into florence_jax.hardware.Formulations.
    hardware: Any = None

    def replace(self, **kw) -> Florence2Config:
        if "dtype" in kw:
            kw["dtype"] = resolve_dtype(kw["dtype"])
        if "param_dtype" in kw:
            kw["param_dtype"] = resolve_dtype(kw["param_dtype"])
        return dataclasses.replace(self, **kw)

    def image_seq_length(self, image_size: int | tuple[int, int]) -> int:
        """Number of ``<image>`` tokens for an image of this size: 1 pooled + H*W grid tokens."""
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        s = self.vision_config.total_stride
        return 1 + (-(-h // s)) * (-(-w // s))

    # ----------------------------------------------------------------- (de)serialisation
    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides) -> Florence2Config:
        """Read a config.json dict in either the transformers-native or the original layout."""
        model_type = d.get("model_type")
        if model_type not in (None, "florence2"):
            raise ValueError(f"not a Florence-2 config: model_type={model_type!r}")
        archs = d.get("architectures") or []
        known = {"Florence2ForConditionalGeneration"}
        if archs and not set(archs) & known:
            raise ValueError(f"unsupported architecture {archs}; expected Florence2ForConditionalGeneration")
        if "vision_config" not in d or "text_config" not in d:
            raise ValueError("config.json lacks vision_config/text_config: not a Florence-2 checkpoint")
        tied = d.get("tie_word_embeddings", True) and (d.get("text_config") or {}).get("tie_word_embeddings", True)
        if not tied:
            # Untied BART keeps separate encoder, decoder and output embeddings; every Florence-2
            # checkpoint ties them, and so does this port.
            raise ValueError("tie_word_embeddings=false is not supported: Florence-2 ties its word embeddings")
        vision = _vision_from_dict(d["vision_config"] or {})
        text = _text_from_dict(d["text_config"] or {})
        original = is_original_layout(d)
        kw: dict[str, Any] = dict(
            vision_config=vision,
            text_config=text,
        )
        if original:
            # The original layout has no <image> token: it is appended right after the vocabulary and
            # the vocabulary padded to a multiple of 64, as transformers' own converter does.
            real = text.vocab_size
            kw["image_token_id"] = real
            kw["num_real_tokens"] = real
            kw["final_logits_bias"] = True
            kw["mask_padded_vocab"] = True
            padded = -(-(real + 1) // 64) * 64
            kw["text_config"] = dataclasses.replace(text, vocab_size=padded)
        else:
            kw["image_token_id"] = d.get("image_token_id", 51289)
            if "num_real_tokens" in d:
                kw["num_real_tokens"] = d["num_real_tokens"]
        cfg = cls(**kw)
        return cfg.replace(**overrides) if overrides else cfg

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides) -> Florence2Config:
        with open(path) as f:
            return cls.from_dict(json.load(f), **overrides)

    def to_hf_dict(self) -> dict[str, Any]:
        """The transformers-native config.json content."""
        v = dataclasses.asdict(self.vision_config)
        v = {k: list(x) if isinstance(x, tuple) else x for k, x in v.items()}
        v["model_type"] = "florence_vision"
        t = dataclasses.asdict(self.text_config)
        t.pop("layer_norm_eps")
        t["model_type"] = "bart"
        t["tie_word_embeddings"] = self.tie_word_embeddings
        t["is_encoder_decoder"] = True
        t["encoder_layerdrop"] = 0.0
        t["decoder_layerdrop"] = 0.0
        return {
            "architectures": ["Florence2ForConditionalGeneration"],
            "model_type": "florence2",
            "is_encoder_decoder": True,
            "image_token_id": self.image_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "vision_config": v,
            "text_config": t,
            "dtype": jnp.dtype(self.param_dtype).name,
        }


def is_original_layout(d: dict[str, Any]) -> bool:
    v = d.get("vision_config") or {}
    return "dim_embed" in v or "image_pos_embed" in v or v.get("model_type") == "davit"


def _vision_from_dict(v: dict[str, Any]) -> VisionConfig:
    kw: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(VisionConfig)}
    for k, val in v.items():
        if k in names:
            kw[k] = tuple(val) if isinstance(val, list) else val
    if "dim_embed" in v:
        kw["embed_dim"] = tuple(v["dim_embed"])
    if isinstance(v.get("image_pos_embed"), dict):
        kw["max_position_embeddings"] = v["image_pos_embed"].get("max_pos_embeddings", 50)
    if isinstance(v.get("visual_temporal_embedding"), dict):
        kw["max_temporal_embeddings"] = v["visual_temporal_embedding"].get("max_temporal_embeddings", 100)
    return VisionConfig(**kw)


def _text_from_dict(t: dict[str, Any]) -> TextConfig:
    names = {f.name for f in dataclasses.fields(TextConfig)}
    return TextConfig(**{k: val for k, val in t.items() if k in names})


# ------------------------------------------------------------------------------------------ presets
def base_config(**overrides) -> Florence2Config:
    """Florence-2-base (0.23B): DaViT 128-256-512-1024, BART 6+6 layers, d_model 768."""
    cfg = Florence2Config(
        vision_config=VisionConfig(projection_dim=768),
        text_config=TextConfig(),
        image_token_id=51289,
    )
    return cfg.replace(**overrides) if overrides else cfg


def large_config(**overrides) -> Florence2Config:
    """Florence-2-large (0.77B): DaViT 256-512-1024-2048, BART 12+12 layers, d_model 1024."""
    cfg = Florence2Config(
        vision_config=VisionConfig(
            embed_dim=(256, 512, 1024, 2048), num_heads=(8, 16, 32, 64), num_groups=(8, 16, 32, 64),
            projection_dim=1024,
        ),
        text_config=TextConfig(
            d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
            decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096,
        ),
        image_token_id=51289,
    )
    return cfg.replace(**overrides) if overrides else cfg


PRESETS = {"base": base_config, "large": large_config}
