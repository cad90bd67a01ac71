"""Florence-2: DaViT -> projector -> image features merged at ``<image>`` tokens -> BART -> tied LM head."""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from florence_jax import cpu_kernels, hardware
from florence_jax.config import Florence2Config
from florence_jax.lora import dense
from florence_jax.modeling.bart import BartModel
from florence_jax.modeling.davit import DaViT
from florence_jax.modeling.layers import embed, kernel_outputs_unsaved, layer_norm, linear, named

log = logging.getLogger(__name__)


class Buffer(nnx.Variable):
    """A constant carried with the parameters (saved and loaded) but never trained."""


def sinusoid_table(num_positions: int, dim: int) -> np.ndarray:
    """The reference's cosine temporal table: sin in even columns, cos in odd ones."""
    half = dim // 2
    freq = np.exp(np.arange(half, dtype=np.float32) * -(math.log(10000) / half))
    angles = np.arange(num_positions, dtype=np.float32)[:, None] * freq[None, :]
    table = np.empty((num_positions, dim), np.float32)
    table[:, 0::2] = np.sin(angles)
    table[:, 1::2] = np.cos(angles)
    return table


class LearnedPositionEmbedding2D(nnx.Module):
    def __init__(self, cfg: Florence2Config, *, rngs: nnx.Rngs):
        v = cfg.vision_config
        dim = v.embed_dim[-1]
        self.row_embeddings = embed(cfg, v.max_position_embeddings, dim // 2, rngs=rngs)
        self.column_embeddings = embed(cfg, v.max_position_embeddings, dim - dim // 2, rngs=rngs)

    def __call__(self, h: int, w: int) -> jax.Array:
        """(H, W, C): column embedding in the first half of the channels, row embedding in the second."""
        x = self.column_embeddings(jnp.arange(w))
        y = self.row_embeddings(jnp.arange(h))
        return jnp.concatenate(
            [jnp.broadcast_to(x[None], (h, w, x.shape[-1])), jnp.broadcast_to(y[:, None], (h, w, y.shape[-1]))],
            axis=-1,
        )


class CosineTemporalEmbedding(nnx.Module):
    def __init__(self, cfg: Florence2Config):
        v = cfg.vision_config
        table = sinusoid_table(v.max_temporal_embeddings, v.embed_dim[-1])
        self.pos_idx_to_embed = Buffer(jnp.asarray(table, dtype=cfg.param_dtype))


class MultiModalProjector(nnx.Module):
    """Adds 2-D and temporal positions, pools (1 mean token + H*W tokens), projects and normalises."""

    def __init__(self, cfg: Florence2Config, *, rngs: nnx.Rngs):
        v = cfg.vision_config
        self.image_projection = linear(cfg, v.embed_dim[-1], v.projection_dim, use_bias=False, rngs=rngs)
        self.image_proj_norm = layer_norm(cfg, v.projection_dim, rngs=rngs)
        self.image_position_embed = LearnedPositionEmbedding2D(cfg, rngs=rngs)
        self.visual_temporal_embed = CosineTemporalEmbedding(cfg)

    @named("projector")
    def __call__(self, features_nhwc: jax.Array, rngs=None) -> jax.Array:
        b, h, w, c = features_nhwc.shape
        x = features_nhwc + self.image_position_embed(h, w)[None].astype(features_nhwc.dtype)
        x = x.reshape(b, h * w, c)
        # One frame: the temporal embedding of frame 0 is added to every token.
        x = x + self.visual_temporal_embed.pos_idx_to_embed[0].astype(x.dtype)
        pooled = jnp.mean(x.astype(jnp.float32), axis=1, keepdims=True).astype(x.dtype)
        x = jnp.concatenate([pooled, x], axis=1)
        return self.image_proj_norm(dense(self.image_projection, x, rngs))


class Florence2Model(nnx.Module):
    def __init__(self, cfg: Florence2Config, *, rngs: nnx.Rngs):
        self.vision_tower = DaViT(cfg, rngs=rngs)
        self.multi_modal_projector = MultiModalProjector(cfg, rngs=rngs)
        self.language_model = BartModel(cfg, rngs=rngs)


@flax.struct.dataclass
class Seq2SeqLMOutput:
    logits: jax.Array
    encoder_last_hidden_state: jax.Array | None = None
    image_features: jax.Array | None = None


def merge_image_features(inputs_embeds: jax.Array, input_ids: jax.Array, image_features: jax.Array,
                         image_token_id: int) -> jax.Array:
    """Place row b's image features, in order, at row b's ``<image>`` positions.

    Equals transformers' ``masked_scatter`` when every row holds exactly ``image_features.shape[1]``
    image tokens, which is what the processor produces.
    """
    is_image = input_ids == image_token_id
    slot = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, image_features.shape[1] - 1)
    gathered = jnp.take_along_axis(image_features, slot[..., None], axis=1)
    return jnp.where(is_image[..., None], gathered.astype(inputs_embeds.dtype), inputs_embeds)


def _vocab_major_logits(hidden: jax.Array, shared: nnx.Embed) -> jax.Array:
    """``shared.attend(hidden)`` computed as ``embedding @ hidden.T`` (Formulations.lm_head_product).

    The product's output is (vocab, rows); the barrier keeps XLA from folding the transpose back into the
    product (which would give ``hidden @ embedding.T`` again). Same values up to float32 summation order.
    """
    query, embedding = shared.promote_dtype((hidden, shared.embedding[...]), dtype=shared.dtype)
    rows = query.reshape(-1, query.shape[-1])
    by_vocab = jax.lax.optimization_barrier(embedding @ rows.T)
    return by_vocab.T.reshape(*query.shape[:-1], embedding.shape[0])


def _runnable_here(spec) -> hardware.Formulations:
    """``spec``'s formulations for programs that run on this backend (:func:`florence_jax.hardware.runnable_on`:
    another platform's Pallas kernels replaced by XLA's formulations, ...), with a warning that names them."""
    built_for, runs_on = hardware.resolve(spec), hardware.backend()
    runnable, changed = hardware.runnable_on(built_for, runs_on)
    if changed:
        log.warning("hardware=%r builds the programs for a %s, but JAX runs them on the %s here, so they change "
                    "what would not compile well here (%s; the same values up to rounding); for_hardware(%r) "
                    "builds the %s's program whole, to compile ahead of time", spec, built_for.platform.upper(),
                    runs_on.upper(), changed, spec, built_for.platform.upper())
    return runnable


class Florence2ForConditionalGeneration(nnx.Module):
    """The whole model. ``model(input_ids=..., pixel_values=..., ...)`` returns ``.logits``.

    ``pixel_values`` are NCHW as transformers' processor returns them (``image_layout="NHWC"`` accepts
    the data pipeline's layout and skips the transpose; ``"S2D"`` takes NHWC pixels in blocks of the first
    patch stride, ``(batch, H/4, W/4, 48)`` from ``processing.space_to_depth``, as the pipeline ships them
    where ``Formulations.pixel_layout`` is "space_to_depth").
    """

    def __init__(self, config: Florence2Config, *, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        # Resolved once: every submodule reads the same frozen formulations from the static config.
        config = config.replace(hardware=hardware.resolve(config.hardware))
        self.config = config
        self.model = Florence2Model(config, rngs=rngs)
        if config.final_logits_bias:
            # The original remote code's bias on every logit: a buffer, so it is never trained.
            self.final_logits_bias = Buffer(jnp.zeros((1, config.text_config.vocab_size), config.param_dtype))
        self.eval()  # inference mode by default, as transformers' from_pretrained returns it

    @property
    def formulations(self) -> hardware.Formulations:
        """The formulations the model's programs use (:mod:`florence_jax.hardware`)."""
        return hardware.resolve(self.config.hardware)

    def for_hardware(self, spec) -> Florence2ForConditionalGeneration:
        """The same parameters (shared, not copied) in a model whose programs are built for ``spec``
        (``"gpu"``, ``"cpu:depthwise_conv=grouped"``, ...): an A/B of formulations, or a program traced
        here for another backend. Build it before wrapping LoRA adapters, whose structure it does not know.
        """
        config = self.config.replace(hardware=hardware.resolve(spec))
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: type(self)(config, rngs=nnx.Rngs(0))))
        new = nnx.merge(graphdef, nnx.state(self))
        for name in ("generation_config", "checkpoint_layout", "name_or_path"):
            if hasattr(self, name):
                setattr(new, name, getattr(self, name))
        return new

    # ------------------------------------------------------------------ pieces
    def get_image_features(self, pixel_values, *, image_layout: str = "NCHW", rngs=None,
                           freeze_vision: bool = False) -> jax.Array:
        """Vision tower + projector: ``(batch, 1 + H*W, projection_dim)``.

        ``freeze_vision`` stops gradients at the tower's output, so its backward pass is never computed, and
        leaves its kernels' outputs unnamed for remat policies (``layers.kernel_outputs_unsaved``): a
        differentiated step still linearizes the tower (its parameters are among the step's arguments),
        and a saved kernel output costs a copy (the rounding JAX inserts after a residual's producer) that
        no backward would read: compiled for a v4 chip (``tpu_v4_32_frozen.py``), 14.9 ms more a step.
        """
        with kernel_outputs_unsaved() if freeze_vision else contextlib.nullcontext():
            feats = self.vision_tower_features(pixel_values, image_layout=image_layout, rngs=rngs)
        if freeze_vision:
            feats = jax.lax.stop_gradient(feats)
        return self.model.multi_modal_projector(feats, rngs)

    def vision_tower_features(self, pixel_values, *, image_layout: str = "NCHW", rngs=None) -> jax.Array:
        """The vision tower alone: NHWC ``(batch, H/32, W/32, embed_dim[-1])``, the projector's input (what
        ``data.cache_vision_features`` stores, so the projector still trains on cached features)."""
        x = jnp.asarray(pixel_values)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"pixel_values must be normalized floats, got {x.dtype}: uint8 images become the model's "
                            "input with florence_jax.processing.normalize_pixels(pixels, ImageTransform.table)")
        if image_layout == "NCHW":
            x = x.transpose(0, 2, 3, 1)
        elif image_layout not in ("NHWC", "S2D"):
            raise ValueError(f"image_layout must be NCHW, NHWC or S2D, got {image_layout!r}")
        return self.model.vision_tower(x.astype(self.config.dtype), rngs, space_to_depth=image_layout == "S2D")

    @named("embed")
    def embed_inputs(self, input_ids, image_features=None) -> jax.Array:
        lm = self.model.language_model
        embeds = lm.embed(input_ids)
        if image_features is not None:
            embeds = merge_image_features(embeds, input_ids, image_features, self.config.image_token_id)
        return embeds

    def encode(self, input_ids, pixel_values=None, attention_mask=None, *, image_features=None,
               image_layout: str = "NCHW", rngs=None) -> jax.Array:
        input_ids = jnp.asarray(input_ids)
        if image_features is None and pixel_values is not None:
            image_features = self.get_image_features(pixel_values, image_layout=image_layout, rngs=rngs)
        embeds = self.embed_inputs(input_ids, image_features)
        mask = None if attention_mask is None else jnp.asarray(attention_mask)
        return self.model.language_model.encoder(embeds, mask, rngs)

    @named("lm_head")
    def logits_from_hidden(self, hidden: jax.Array, rngs=None) -> jax.Array:
        """The tied LM head: hidden states against the shared embedding (plus its LoRA adapter, if any); for
        an original-layout checkpoint plus its ``final_logits_bias``, with the padded rows masked out."""
        shared = self.model.language_model.shared
        logits = cpu_kernels.packed_product(shared, hidden)  # inside a CPU decoding loop, else None
        if logits is None:
            vocab_major = self.formulations.lm_head_product == "vocab_major"
            logits = _vocab_major_logits(hidden, shared) if vocab_major else shared.attend(hidden)
        head = getattr(self, "lm_head", None)  # florence_jax.lora.LoRAHead
        if head is not None:
            logits = logits + head(hidden, rngs).astype(logits.dtype)
        bias = getattr(self, "final_logits_bias", None)
        if bias is not None:
            logits = logits + bias.get_value()[0].astype(logits.dtype)
        cfg = self.config
        if cfg.mask_padded_vocab and cfg.num_real_tokens is not None and cfg.num_real_tokens < logits.shape[-1]:
            # The lowest finite value, not -inf: exp() gives exactly 0 (the rows take no mass) and no
            # inf - inf or 0 * inf can turn a loss or its gradient into NaN.
            real = jnp.arange(logits.shape[-1]) < cfg.num_real_tokens
            logits = jnp.where(real, logits, jnp.finfo(logits.dtype).min)
        return logits

    def decode(self, decoder_input_ids, encoder_hidden_states, attention_mask=None,
               decoder_attention_mask=None, rngs=None) -> jax.Array:
        lm = self.model.language_model
        embeds = lm.embed(jnp.asarray(decoder_input_ids))
        h, _ = lm.decoder(
            embeds, encoder_hidden_states,
            None if attention_mask is None else jnp.asarray(attention_mask),
            None if decoder_attention_mask is None else jnp.asarray(decoder_attention_mask),
            rngs=rngs,
        )
        return self.logits_from_hidden(h, rngs)

    # ------------------------------------------------------------------ forward
    def __call__(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        decoder_input_ids=None,
        decoder_attention_mask=None,
        *,
        image_features=None,
        vision_features=None,
        image_layout: str = "NCHW",
        rngs: nnx.Rngs | None = None,
        freeze_vision: bool = False,
    ) -> Seq2SeqLMOutput:
        """``image_features`` (projector output) or ``vision_features`` (the tower's output, e.g. cached)
        replace ``pixel_values`` when given."""
        if input_ids is None:
            raise ValueError("input_ids is required")
        input_ids = jnp.asarray(input_ids)
        if image_features is None and vision_features is not None:
            image_features = self.model.multi_modal_projector(
                jnp.asarray(vision_features).astype(self.config.dtype), rngs)
        if image_features is None and pixel_values is not None:
            image_features = self.get_image_features(pixel_values, image_layout=image_layout, rngs=rngs,
                                                     freeze_vision=freeze_vision)
        enc = self.encode(input_ids, attention_mask=attention_mask, image_features=image_features, rngs=rngs)
        if decoder_input_ids is None:
            start = self.config.text_config.decoder_start_token_id
            decoder_input_ids = jnp.full((input_ids.shape[0], 1), start, jnp.int32)
        logits = self.decode(decoder_input_ids, enc, attention_mask, decoder_attention_mask, rngs)
        return Seq2SeqLMOutput(logits=logits, encoder_last_hidden_state=enc, image_features=image_features)

    # ------------------------------------------------------------------ checkpoints and generation
    @classmethod
    def from_pretrained(cls, name_or_path, revision: str | None = None, dtype: Any = "float32",
                        param_dtype: Any = "float32", hardware: Any = None,
                        **kwargs) -> Florence2ForConditionalGeneration:
        """Load a Hub id or local directory (either checkpoint layout); see :mod:`florence_jax.weights`.

        ``hardware`` is what the programs are built for (:mod:`florence_jax.hardware`: ``"gpu"``,
        ``"tpu:pixel_normalize=gather"``, ...); by default the backend JAX runs on. The loaded weights run
        here, so another platform's Pallas kernels, which compile only for it, give way to XLA's formulations
        (:func:`florence_jax.hardware.runnable_on`; a warning names them); :meth:`for_hardware` builds that
        platform's program whole, to compile ahead of time. ``max_positions=N`` grows the BART encoder's and
        decoder's learned positions to ``N`` when the checkpoint has fewer (new rows by ``position_init``,
        :mod:`florence_jax.positions`; the checkpoint's rows are kept bit for bit).
        """
        from florence_jax.weights.load import load_pretrained

        if hardware is not None:
            hardware = _runnable_here(hardware)
            kwargs["config_overrides"] = {**(kwargs.get("config_overrides") or {}), "hardware": hardware}
        return load_pretrained(cls, name_or_path, revision=revision, dtype=dtype, param_dtype=param_dtype,
                               **kwargs)

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Write a transformers-native directory (config, generation config, safetensors)."""
        from florence_jax.weights.export import save_pretrained

        save_pretrained(self, save_directory, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs):
        from florence_jax.weights.export import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    def generate(self, input_ids, pixel_values=None, attention_mask=None, **kwargs):
        """Greedy or beam-search generation, options as :class:`florence_jax.generation.GenerationOptions`
        fields. Splits the model on every call: a loop over batches makes one
        :class:`florence_jax.generation.Generator` instead."""
        from florence_jax.generation import generate

        return generate(self, input_ids, pixel_values, attention_mask, **kwargs)
