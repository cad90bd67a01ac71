"""DaViT, Florence-2's vision tower, in Flax NNX with NHWC activations.

Attribute names mirror transformers' ``Florence2VisionBackbone`` so parameter paths map to PyTorch keys
by rule (``convs[i].conv``, ``blocks[i][j].spatial_block.window_attn.qkv``, ...).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from florence_jax.config import Florence2Config
from florence_jax.lora import dense
from florence_jax.modeling.layers import INIT_STD, activation, attention, layer_norm, linear, maybe_remat


def _conv(cfg: Florence2Config, din: int, dout: int, k: int, stride: int, pad: int, groups: int, rngs):
    return nnx.Conv(
        din, dout, kernel_size=(k, k), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
        feature_group_count=groups, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        kernel_init=nnx.initializers.normal(INIT_STD), rngs=rngs,
    )


class DepthwiseConv(nnx.Module):
    """3x3 depthwise conv (stride 1, padding 1): a grouped convolution with one group per channel.

    Same parameters as ``nnx.Conv(C, C, (3, 3), feature_group_count=C)`` (kernel (3, 3, 1, C), bias (C,)),
    so checkpoints map identically. It is deliberately a convolution op rather than nine shifted
    multiply-adds: the shifted sum is elementwise, so XLA fused it with the residual adds into chains
    spanning a whole stage and duplicated them in every consumer (fusions of ~2400 ops each). On CPU
    the float32 train step then never finished compiling (past 20 GB), and with the older emitter it
    compiled but ran 2.7x slower than with this op (base, 256 px, batch 2: 7.7 s vs 2.8 s per step).
    """

    def __init__(self, cfg: Florence2Config, dim: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(INIT_STD)
        self.kernel = nnx.Param(init(rngs.params(), (3, 3, 1, dim), cfg.param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), cfg.param_dtype))
        self.dtype = cfg.dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = jax.lax.conv_general_dilated(
            x, self.kernel[...].astype(self.dtype), window_strides=(1, 1), padding=((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])
        return y + self.bias[...].astype(self.dtype)


def _drop_path(rate: float) -> nnx.Dropout | None:
    # Stochastic depth = dropout of whole samples: broadcast the mask over every non-batch axis.
    return nnx.Dropout(rate, broadcast_dims=(1, 2)) if rate > 0.0 else None


def _apply_drop_path(dp: nnx.Dropout | None, x: jax.Array, rngs) -> jax.Array:
    return x if dp is None else dp(x, rngs=rngs)


class ConvEmbed(nnx.Module):
    """Patch embedding: strided conv with a LayerNorm before (stages 1..3) or after (stage 0)."""

    def __init__(self, cfg: Florence2Config, stage: int, *, rngs: nnx.Rngs):
        v = cfg.vision_config
        din = v.in_channels if stage == 0 else v.embed_dim[stage - 1]
        dout = v.embed_dim[stage]
        self.pre_norm = v.patch_prenorm[stage]
        self.conv = _conv(cfg, din, dout, v.patch_size[stage], v.patch_stride[stage], v.patch_padding[stage], 1,
                          rngs)
        self.norm = layer_norm(cfg, din if self.pre_norm else dout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.pre_norm:
            x = self.norm(x)
        x = self.conv(x)
        if not self.pre_norm:
            x = self.norm(x)
        return x


class VisionMLP(nnx.Module):
    def __init__(self, cfg: Florence2Config, stage: int, *, rngs: nnx.Rngs):
        dim = cfg.vision_config.embed_dim[stage]
        hidden = int(dim * cfg.vision_config.mlp_ratio)
        self.act = activation(cfg.vision_config.activation_function)
        self.fc1 = linear(cfg, dim, hidden, rngs=rngs)
        self.fc2 = linear(cfg, hidden, dim, rngs=rngs)

    def __call__(self, x, rngs=None):
        return dense(self.fc2, self.act(dense(self.fc1, x, rngs)), rngs)


class WindowAttention(nnx.Module):
    """Multi-head self-attention inside non-overlapping windows; the grid is padded to whole windows."""

    def __init__(self, cfg: Florence2Config, stage: int, *, rngs: nnx.Rngs):
        v = cfg.vision_config
        self.dim = v.embed_dim[stage]
        self.num_heads = v.num_heads[stage]
        self.window_size = v.window_size
        self.impl = cfg.attention_impl
        self.qkv = linear(cfg, self.dim, 3 * self.dim, use_bias=v.qkv_bias, rngs=rngs)
        self.proj = linear(cfg, self.dim, self.dim, rngs=rngs)

    def __call__(self, x: jax.Array, rngs=None) -> jax.Array:
        b, h, w, c = x.shape
        ws = self.window_size
        pad_h, pad_w = (-h) % ws, (-w) % ws
        x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        hp, wp = h + pad_h, w + pad_w
        # (B, Hp, Wp, C) -> (B * nH * nW, ws*ws, C)
        x = x.reshape(b, hp // ws, ws, wp // ws, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
        heads, hd = self.num_heads, c // self.num_heads
        qkv = dense(self.qkv, x, rngs).reshape(x.shape[0], ws * ws, 3, heads, hd)
        out = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], scale=hd**-0.5, impl=self.impl)
        out = dense(self.proj, out.reshape(x.shape[0], ws * ws, c), rngs)
        out = out.reshape(b, hp // ws, wp // ws, ws, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        return out[:, :h, :w, :].reshape(b, h * w, c)


class ChannelAttention(nnx.Module):
    """Grouped channel attention: channels attend to channels, scaled by tokens**-0.5."""

    def __init__(self, cfg: Florence2Config, stage: int, *, rngs: nnx.Rngs):
        v = cfg.vision_config
        self.dim = v.embed_dim[stage]
        self.groups = v.num_groups[stage]
        self.qkv = linear(cfg, self.dim, 3 * self.dim, use_bias=v.qkv_bias, rngs=rngs)
        self.proj = linear(cfg, self.dim, self.dim, rngs=rngs)

    def __call__(self, x: jax.Array, rngs=None) -> jax.Array:
        b, n, c = x.shape
        g, cg = self.groups, c // self.groups
        qkv = dense(self.qkv, x, rngs).reshape(b, n, 3, g, cg)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, G, Cg)
        scores = jnp.einsum("bngi,bngj->bgij", q, k, preferred_element_type=jnp.float32) * (n**-0.5)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bgij,bngj->bngi", probs, v).reshape(b, n, c)
        return dense(self.proj, out, rngs)


class _DaViTBlockHalf(nnx.Module):
    """Shared structure of spatial and channel blocks: (dwconv + attention) then (dwconv + MLP)."""

    def _init_common(self, cfg: Florence2Config, stage: int, drop_path_rate: float, rngs: nnx.Rngs):
        dim = cfg.vision_config.embed_dim[stage]
        self.conv1 = DepthwiseConv(cfg, dim, rngs=rngs)
        self.norm1 = layer_norm(cfg, dim, rngs=rngs)
        self.drop_path1 = _drop_path(drop_path_rate)
        self.conv2 = DepthwiseConv(cfg, dim, rngs=rngs)
        self.norm2 = layer_norm(cfg, dim, rngs=rngs)
        self.ffn = VisionMLP(cfg, stage, rngs=rngs)
        self.drop_path2 = _drop_path(drop_path_rate)

    def _attend(self, tokens: jax.Array, hw: tuple[int, int], rngs=None) -> jax.Array:
        raise NotImplementedError

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        b, h, w, c = x.shape
        x = self.conv1(x) + x
        tokens = x.reshape(b, h * w, c)
        tokens = tokens + _apply_drop_path(self.drop_path1, self._attend(self.norm1(tokens), (h, w), rngs), rngs)
        x = tokens.reshape(b, h, w, c)
        x = self.conv2(x) + x
        tokens = x.reshape(b, h * w, c)
        tokens = tokens + _apply_drop_path(self.drop_path2, self.ffn(self.norm2(tokens), rngs), rngs)
        return tokens.reshape(b, h, w, c)


class SpatialBlock(_DaViTBlockHalf):
    def __init__(self, cfg: Florence2Config, stage: int, drop_path_rate: float, *, rngs: nnx.Rngs):
        self._init_common(cfg, stage, drop_path_rate, rngs)
        self.window_attn = WindowAttention(cfg, stage, rngs=rngs)

    def _attend(self, tokens, hw, rngs=None):
        b, _, c = tokens.shape
        return self.window_attn(tokens.reshape(b, hw[0], hw[1], c), rngs)


class ChannelBlock(_DaViTBlockHalf):
    def __init__(self, cfg: Florence2Config, stage: int, drop_path_rate: float, *, rngs: nnx.Rngs):
        self._init_common(cfg, stage, drop_path_rate, rngs)
        self.channel_attn = ChannelAttention(cfg, stage, rngs=rngs)

    def _attend(self, tokens, hw, rngs=None):
        return self.channel_attn(tokens, rngs)


class VisionBlock(nnx.Module):
    def __init__(self, cfg: Florence2Config, stage: int, spatial_dpr: float, channel_dpr: float, *, rngs):
        self.spatial_block = SpatialBlock(cfg, stage, spatial_dpr, rngs=rngs)
        self.channel_block = ChannelBlock(cfg, stage, channel_dpr, rngs=rngs)

    def __call__(self, x, rngs=None):
        return self.channel_block(self.spatial_block(x, rngs), rngs)


class DaViT(nnx.Module):
    """The vision backbone: four stages of (patch embedding, blocks). Input and output NHWC."""

    def __init__(self, cfg: Florence2Config, *, rngs: nnx.Rngs):
        v = cfg.vision_config
        self.remat_policy = cfg.remat_policy
        # Stochastic depth grows linearly over all 2 * sum(depths) half-blocks, as in the reference.
        dpr = np.linspace(0.0, v.drop_path_rate, 2 * sum(v.depths)).tolist()
        offset = 0
        convs, blocks = [], []
        for stage, depth in enumerate(v.depths):
            convs.append(ConvEmbed(cfg, stage, rngs=rngs))
            blocks.append(nnx.List([
                VisionBlock(cfg, stage, dpr[offset + 2 * j], dpr[offset + 2 * j + 1], rngs=rngs)
                for j in range(depth)
            ]))
            offset += 2 * depth
        self.convs = nnx.List(convs)
        self.blocks = nnx.List(blocks)

    def __call__(self, pixels_nhwc: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        x = pixels_nhwc
        for conv, stage_blocks in zip(self.convs, self.blocks):
            x = conv(x)
            for block in stage_blocks:
                x = maybe_remat(lambda blk, h, r: blk(h, r), self.remat_policy)(block, x, rngs)
        return x
