"""BART encoder-decoder (Florence-2's language model) in Flax NNX, with a preallocated KV cache.

Post-LayerNorm layers, learned positions with an offset of 2, ``layernorm_embedding``, optional
sqrt(d_model) embedding scale, exact GELU: what transformers' ``BartModel`` computes. The token
embedding lives once, in ``BartModel.shared``; encoder and decoder receive it at call time, so the
parameter tree holds it at one path (PyTorch's tied ``embed_tokens`` copies are aliases of it).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from florence_jax import cpu_kernels, hardware
from florence_jax.config import Florence2Config
from florence_jax.lora import dense
from florence_jax.modeling import flash_text, text_attention_kernel
from florence_jax.modeling.dropout import AttentionDropout, ElementDropout
from florence_jax.modeling.layers import (
    activation,
    attention,
    embed,
    kernel_output,
    layer_norm,
    linear,
    maybe_remat,
    named,
)
from florence_jax.positions import POSITION_OFFSET as POSITION_OFFSET  # indexed from 2 (a fairseq legacy)


class LayerCache(NamedTuple):
    """Self-attention keys/values of one decoder layer, heads-major: ``(batch, heads, max_length, head_dim)``."""

    key: jax.Array
    value: jax.Array

    def grown(self, slots: int) -> LayerCache:
        """With unwritten (zero) slots appended up to ``slots``; a step's mask hides them."""
        def grow(x):
            return jnp.pad(x, ((0, 0), (0, 0), (0, slots - x.shape[2]), (0, 0)))

        return LayerCache(grow(self.key), grow(self.value))

    def reordered(self, rows: jax.Array) -> LayerCache:
        """Row i's hypothesis continues row ``rows[i]``'s: its keys and values gathered."""
        return LayerCache(jnp.take(self.key, rows, axis=0), jnp.take(self.value, rows, axis=0))


class KernelLayerCache(NamedTuple):
    """The same for the CPU kernel (``Formulations.decode_attention="kernel"``,
    florence_jax.cpu_kernels.empty_cache): ``key``, ``value`` (batch, heads, max_length, head_dim'), head_dim'
    the head size zero padded to whole vectors, slot j of row r written by row r's step j; ``source``
    (batch, max_length) int32: the row whose slot j row r's hypothesis reads. Beam search reorders a
    cache by reordering ``source`` alone."""

    key: jax.Array
    value: jax.Array
    source: jax.Array

    def grown(self, slots: int) -> KernelLayerCache:
        grow = slots - self.key.shape[2]
        return KernelLayerCache(jnp.pad(self.key, ((0, 0), (0, 0), (0, grow), (0, 0))),
                                jnp.pad(self.value, ((0, 0), (0, 0), (0, grow), (0, 0))),
                                jnp.pad(self.source, ((0, 0), (0, grow))))

    def reordered(self, rows: jax.Array) -> KernelLayerCache:
        """Row i's hypothesis continues row ``rows[i]``'s."""
        return self._replace(source=jnp.take(self.source, rows, axis=0))


class _TextKernel(NamedTuple):
    module: Any  # supported(heads, channels)
    attend: Any  # (q, k, v, key_mask, heads, scale, *, rate, key, interpret) -> output
    platform: str  # where it compiles; elsewhere Pallas' interpreter runs it
    max_length: int | None  # the longest sequence it takes


# Formulations.text_attention's kernels for the encoder's self-attention.
_TEXT_KERNELS = {
    "fused": _TextKernel(text_attention_kernel, text_attention_kernel.fused_text_attention, "tpu",
                         text_attention_kernel.MAX_LENGTH),
    "flash": _TextKernel(flash_text, flash_text.flash_text_attention, "gpu", None),
}


class BartAttention(nnx.Module):
    def __init__(self, cfg: Florence2Config, num_heads: int, *, self_attention_kernel: bool = False,
                 rngs: nnx.Rngs):
        d = cfg.text_config.d_model
        self.num_heads = num_heads
        self.head_dim = d // num_heads
        self.impl = cfg.attention_impl
        f = hardware.resolve(cfg.hardware)
        # The encoder's self-attention as one TPU kernel or as the GPU's flash kernels (Formulations.
        # text_attention; they run in Pallas' interpreter off their platform, for tests); the einsums where
        # the kernel does not take the heads or, at call time, the length (text_attention_kernel.MAX_LENGTH;
        # the flash kernels take any length).
        kernel = _TEXT_KERNELS.get(f.text_attention)
        self.fused = self_attention_kernel and kernel is not None and kernel.module.supported(num_heads, d)
        if self.fused:
            self.attend, self.max_length = kernel.attend, kernel.max_length
            self.interpret = f.platform != kernel.platform
        # Beam search's cross-attention: a matrix-vector product per beam (XLA:CPU runs those faster than one
        # product with a row's beams as query rows, though each reads the keys) or one product per row
        # (Formulations.beam_cross_attention; figures in docs/benchmarks.md).
        self.beam_queries_one_by_one = self.impl == "xla" and f.beam_cross_attention == "per_beam"
        # A decoding step's attention in the CPU kernel (Formulations.decode_attention): the decoding loop
        # then hands the layers cpu_kernels.CrossKV and KernelLayerCache (BartDecoder.step_kernel).
        self.step_kernel = self.impl == "xla" and f.platform == "cpu" and f.decode_attention == "kernel"
        self.k_proj = linear(cfg, d, d, rngs=rngs)
        self.v_proj = linear(cfg, d, d, rngs=rngs)
        self.q_proj = linear(cfg, d, d, rngs=rngs)
        self.out_proj = linear(cfg, d, d, rngs=rngs)
        self.dropout = AttentionDropout(cfg.text_config.attention_dropout)

    def _heads(self, x):
        """``(batch, length, d_model)`` -> heads-major ``(batch, heads, length, head_dim)``."""
        return x.reshape(*x.shape[:-1], self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

    def project_kv(self, x: jax.Array, rngs=None) -> tuple[jax.Array, jax.Array]:
        return self._heads(dense(self.k_proj, x, rngs)), self._heads(dense(self.v_proj, x, rngs))

    def fused_self_attention(self, x, mask, rngs=None):
        """``x`` (batch, length, d_model) attends to itself through the TPU kernel or the GPU's flash kernels;
        ``mask`` (batch, 1, 1, length) allows keys, as for ``__call__``."""
        q, k, v = (dense(p, x, rngs) for p in (self.q_proj, self.k_proj, self.v_proj))
        active = self.dropout.active()
        out = self.attend(
            q, k, v, None if mask is None else mask.reshape(x.shape[0], -1), self.num_heads, self.head_dim**-0.5,
            rate=self.dropout.rate if active else 0.0, key=self.dropout.key(rngs) if active else None,
            interpret=self.interpret)
        return dense(self.out_proj, kernel_output(out), rngs)

    def kernel_cross_attention(self, x, kv: cpu_kernels.CrossKV, rngs=None):
        """One decoding step's ``x`` (rows, 1, d_model) attends to the encoder's keys and values packed by
        ``cpu_kernels.pack_cross_kv``, through the CPU kernel (inference only: no attention dropout)."""
        q = dense(self.q_proj, x, rngs)
        return dense(self.out_proj, cpu_kernels.cross_attention(q, kv, self.head_dim**-0.5), rngs)

    def kernel_self_attention(self, x, cache: KernelLayerCache, index, rngs=None):
        """One decoding step's ``x`` (rows, 1, d_model) written at slot ``index`` of the cache and attending
        to its hypothesis' slots 0 .. ``index`` through the CPU kernel; returns (output, new cache)."""
        q, k, v = (dense(p, x, rngs) for p in (self.q_proj, self.k_proj, self.v_proj))
        cache = KernelLayerCache(*cpu_kernels.write_cache(*cache, k, v, index))
        out = cpu_kernels.cached_attention(q, *cache, index, self.head_dim**-0.5)
        return dense(self.out_proj, out, rngs), cache

    def __call__(self, x, key, value, mask, rngs=None):
        """``x`` (rows, q_len, d_model) attends to heads-major ``key``/``value``."""
        q = self._heads(dense(self.q_proj, x, rngs))  # (rows, heads, q_len, head_dim)
        rows, q_len, groups = x.shape[0], x.shape[1], x.shape[0] // key.shape[0]
        if groups > 1 and q_len == 1 and self.beam_queries_one_by_one:
            q = q.reshape(key.shape[0], groups, self.num_heads, 1, self.head_dim)
            out = jnp.concatenate([attention(q[:, g], key, value, scale=self.head_dim**-0.5, mask=mask,
                                             impl=self.impl, dropout=self.dropout, rngs=rngs, heads_major=True)
                                   for g in range(groups)], axis=2)  # (batch, heads, groups, head_dim)
            out = out.transpose(0, 2, 1, 3).reshape(rows, q_len, -1)
            return dense(self.out_proj, out, rngs)
        if groups > 1:
            # Beam search: the beams of a row (consecutive rows of x) share one encoder output, so their
            # queries attend to the row's keys/values as extra query positions; nothing is repeated.
            q = q.reshape(key.shape[0], groups, self.num_heads, q_len, self.head_dim).transpose(0, 2, 1, 3, 4)
            q = q.reshape(key.shape[0], self.num_heads, groups * q_len, self.head_dim)
        out = attention(q, key, value, scale=self.head_dim**-0.5, mask=mask, impl=self.impl,
                        dropout=self.dropout, rngs=rngs, heads_major=True)
        if groups > 1:
            out = out.reshape(key.shape[0], self.num_heads, groups, q_len, self.head_dim).transpose(0, 2, 1, 3, 4)
            out = out.reshape(rows, self.num_heads, q_len, self.head_dim)
        out = out.transpose(0, 2, 1, 3).reshape(rows, q_len, -1)
        return dense(self.out_proj, out, rngs)


class _FFN(nnx.Module):
    def _init_ffn(self, cfg: Florence2Config, ffn_dim: int, rngs):
        t = cfg.text_config
        self.act = activation(t.activation_function)
        self.fc1 = linear(cfg, t.d_model, ffn_dim, rngs=rngs)
        self.fc2 = linear(cfg, ffn_dim, t.d_model, rngs=rngs)
        self.final_layer_norm = layer_norm(cfg, t.d_model, eps=t.layer_norm_eps, rngs=rngs)
        self.dropout = ElementDropout(t.dropout)
        self.activation_dropout = ElementDropout(t.activation_dropout)

    @named("ffn")
    def _ffn(self, h, rngs):
        r = h
        h = self.activation_dropout(self.act(dense(self.fc1, h, rngs)), rngs=rngs)
        h = self.dropout(dense(self.fc2, h, rngs), rngs=rngs)
        return self.final_layer_norm(r + h)


class EncoderLayer(_FFN):
    def __init__(self, cfg: Florence2Config, *, rngs: nnx.Rngs):
        t = cfg.text_config
        self.self_attn = BartAttention(cfg, t.encoder_attention_heads, self_attention_kernel=True, rngs=rngs)
        self.self_attn_layer_norm = layer_norm(cfg, t.d_model, eps=t.layer_norm_eps, rngs=rngs)
        self._init_ffn(cfg, t.encoder_ffn_dim, rngs)

    def __call__(self, h, mask, rngs=None):
        with jax.named_scope("self_attn"):
            if self.self_attn.fused and h.shape[1] <= (self.self_attn.max_length or h.shape[1]):
                a = self.self_attn.fused_self_attention(h, mask, rngs)
            else:
                k, v = self.self_attn.project_kv(h, rngs)
                a = self.self_attn(h, k, v, mask, rngs)
            a = self.dropout(a, rngs=rngs)
            h = self.self_attn_layer_norm(h + a)
        return self._ffn(h, rngs)


class DecoderLayer(_FFN):
    def __init__(self, cfg: Florence2Config, *, rngs: nnx.Rngs):
        t = cfg.text_config
        self.self_attn = BartAttention(cfg, t.decoder_attention_heads, rngs=rngs)
        self.self_attn_layer_norm = layer_norm(cfg, t.d_model, eps=t.layer_norm_eps, rngs=rngs)
        self.encoder_attn = BartAttention(cfg, t.decoder_attention_heads, rngs=rngs)
        self.encoder_attn_layer_norm = layer_norm(cfg, t.d_model, eps=t.layer_norm_eps, rngs=rngs)
        self._init_ffn(cfg, t.decoder_ffn_dim, rngs)

    def __call__(self, h, self_mask, cross_kv, cross_mask, cache: LayerCache | None = None, index=None,
                 rngs=None):
        with jax.named_scope("self_attn"):
            if isinstance(cache, KernelLayerCache):  # a CPU decoding step (BartDecoder.step_kernel)
                a, cache = self.self_attn.kernel_self_attention(h, cache, index, rngs)
                h = self.self_attn_layer_norm(h + self.dropout(a, rngs=rngs))
            else:
                h, cache = self._self_attention(h, self_mask, cache, index, rngs)
        with jax.named_scope("cross_attn"):
            if isinstance(cross_kv, cpu_kernels.CrossKV):  # a CPU decoding step (BartDecoder.step_kernel)
                a = self.encoder_attn.kernel_cross_attention(h, cross_kv, rngs)
            else:
                a = self.encoder_attn(h, cross_kv[0], cross_kv[1], cross_mask, rngs)
            a = self.dropout(a, rngs=rngs)
            h = self.encoder_attn_layer_norm(h + a)
        return self._ffn(h, rngs), cache

    def _self_attention(self, h, self_mask, cache: LayerCache | None, index, rngs):
        k, v = self.self_attn.project_kv(h, rngs)
        if cache is not None:
            # Write this step's keys/values at `index` and attend over the whole preallocated buffer; the
            # caller's mask hides positions not yet written.
            k = jax.lax.dynamic_update_slice_in_dim(cache.key, k.astype(cache.key.dtype), index, axis=2)
            v = jax.lax.dynamic_update_slice_in_dim(cache.value, v.astype(cache.value.dtype), index, axis=2)
            cache = LayerCache(k, v)
        a = self.dropout(self.self_attn(h, k, v, self_mask, rngs), rngs=rngs)
        return self.self_attn_layer_norm(h + a), cache


class _Stack(nnx.Module):
    def _init_stack(self, cfg: Florence2Config, rngs):
        t = cfg.text_config
        self.embed_positions = embed(cfg, t.max_position_embeddings + POSITION_OFFSET, t.d_model, rngs=rngs)
        self.layernorm_embedding = layer_norm(cfg, t.d_model, eps=t.layer_norm_eps, rngs=rngs)
        self.dropout = ElementDropout(t.dropout)
        self.remat_policy = cfg.remat_policy

    def _embed(self, inputs_embeds, start, rngs):
        length = inputs_embeds.shape[1]
        positions = start + jnp.arange(length) + POSITION_OFFSET
        h = inputs_embeds + self.embed_positions(positions)[None].astype(inputs_embeds.dtype)
        return self.dropout(self.layernorm_embedding(h), rngs=rngs)


class BartEncoder(_Stack):
    def __init__(self, cfg: Florence2Config, *, rngs: nnx.Rngs):
        self._init_stack(cfg, rngs)
        self.layers = nnx.List([EncoderLayer(cfg, rngs=rngs) for _ in range(cfg.text_config.encoder_layers)])

    @named("encoder")
    def __call__(self, inputs_embeds, attention_mask=None, rngs=None):
        """``inputs_embeds`` already hold the (scaled) token embeddings with image features merged in."""
        h = self._embed(inputs_embeds, 0, rngs)
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        for layer in self.layers:
            h = maybe_remat(lambda lyr, x, m, r: lyr(x, m, r), self.remat_policy)(layer, h, mask, rngs)
        return h


class BartDecoder(_Stack):
    def __init__(self, cfg: Florence2Config, *, rngs: nnx.Rngs):
        self._init_stack(cfg, rngs)
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.text_config.decoder_layers)])

    @named("cross_kv")
    def cross_kv(self, encoder_hidden_states, rngs=None) -> list[tuple[jax.Array, jax.Array]]:
        """Cross-attention keys/values of every layer, computed once per generation."""
        return [layer.encoder_attn.project_kv(encoder_hidden_states, rngs) for layer in self.layers]

    def step_kernel(self, dtype) -> bool:
        """Whether incremental steps computing in ``dtype`` run their attention in the CPU kernel:
        ``Formulations.decode_attention="kernel"`` on the CPU, float32, the kernel built (the first call
        builds it) and heads it takes. Then :meth:`step_cross_kv` packs the encoder's keys and
        :meth:`init_cache` makes :class:`KernelLayerCache`\\ s."""
        attn = self.layers[0].self_attn
        return (attn.step_kernel and jnp.dtype(dtype) == jnp.float32 and cpu_kernels.available()
                and cpu_kernels.cross_attention_supported(attn.head_dim))

    @named("cross_kv")
    def step_cross_kv(self, encoder_hidden_states, encoder_attention_mask=None) -> list:
        """What incremental steps attend to, computed once per generation: :meth:`cross_kv`, or, where
        :meth:`step_kernel`, each layer's keys and values packed for the kernel (``cpu_kernels.CrossKV``, the
        mask included: a step then needs no ``encoder_attention_mask``)."""
        kv = self.cross_kv(encoder_hidden_states)
        if not self.step_kernel(kv[0][0].dtype):
            return kv
        return [cpu_kernels.pack_cross_kv(k, v, encoder_attention_mask) for k, v in kv]

    @named("decoder")
    def __call__(
        self,
        inputs_embeds,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        decoder_attention_mask=None,
        *,
        cross_kv=None,
        cache: list[LayerCache] | None = None,
        index=None,
        rngs=None,
    ):
        """Teacher forcing (``cache=None``) or one incremental step writing at ``index`` of ``cache``.

        Returns ``(hidden_states, new_cache)``.
        """
        length = inputs_embeds.shape[1]
        if cross_kv is None:
            cross_kv = self.cross_kv(encoder_hidden_states, rngs)
        cross_mask = (
            None if encoder_attention_mask is None else encoder_attention_mask.astype(bool)[:, None, None, :]
        )
        if cache is None:
            start = 0
            self_mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
            if decoder_attention_mask is not None:
                self_mask = self_mask & decoder_attention_mask.astype(bool)[:, None, None, :]
        elif isinstance(cache[0], KernelLayerCache):
            start, self_mask = index, None  # the kernel masks the unwritten slots itself
        else:
            start = index
            max_len = cache[0].key.shape[2]
            q_pos = index + jnp.arange(length)
            self_mask = (jnp.arange(max_len)[None, :] <= q_pos[:, None])[None, None]
            if decoder_attention_mask is not None:  # (B, max_len) padding over the cache positions
                self_mask = self_mask & decoder_attention_mask.astype(bool)[:, None, None, :]
        h = self._embed(inputs_embeds, start, rngs)
        new_cache = []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache[i]

            def run(lyr, x, sm, ckv, cm, lc, r, _index=index):
                return lyr(x, sm, ckv, cm, lc, _index, r)

            h, layer_cache = maybe_remat(run, self.remat_policy if cache is None else "none")(
                layer, h, self_mask, cross_kv[i], cross_mask, layer_cache, rngs
            )
            new_cache.append(layer_cache)
        return h, (None if cache is None else new_cache)

    def step_linears(self) -> list[nnx.Module]:
        """The linear layers an incremental step multiplies its few rows by: each layer's self-attention
        projections, cross-attention query and output projections and MLP (cross-attention's keys and
        values are projected once per generation, from the encoder's states)."""
        return [m for layer in self.layers
                for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                          layer.self_attn.out_proj, layer.encoder_attn.q_proj, layer.encoder_attn.out_proj,
                          layer.fc1, layer.fc2)]

    def init_cache(self, batch: int, max_length: int, dtype) -> list[LayerCache] | list[KernelLayerCache]:
        """An empty self-attention cache of ``max_length`` slots per layer (:class:`KernelLayerCache`
        where :meth:`step_kernel`)."""
        layer = self.layers[0].self_attn
        if self.step_kernel(dtype):
            return [KernelLayerCache(*cpu_kernels.empty_cache(batch, layer.num_heads, max_length, layer.head_dim))
                    for _ in self.layers]
        shape = (batch, layer.num_heads, max_length, layer.head_dim)
        return [LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in self.layers]


class BartModel(nnx.Module):
    def __init__(self, cfg: Florence2Config, *, rngs: nnx.Rngs):
        t = cfg.text_config
        self.shared = embed(cfg, t.vocab_size, t.d_model, rngs=rngs)
        self.encoder = BartEncoder(cfg, rngs=rngs)
        self.decoder = BartDecoder(cfg, rngs=rngs)
        self.embed_scale = math.sqrt(t.d_model) if t.scale_embedding else 1.0
        self.pad_token_id = t.pad_token_id

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings as transformers' ``get_input_embeddings()`` returns them (scale included)."""
        e = self.shared(input_ids)
        # nn.Embedding(padding_idx=pad) never sends gradient to the padding row; neither do we.
        e = jnp.where((input_ids == self.pad_token_id)[..., None], jax.lax.stop_gradient(e), e)
        return e * self.embed_scale if self.embed_scale != 1.0 else e
