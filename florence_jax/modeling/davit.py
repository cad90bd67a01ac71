"""DaViT, Florence-2's vision tower, in Flax NNX with NHWC activations.

Attribute names mirror transformers' ``Florence2VisionBackbone`` so parameter paths map to PyTorch keys
by rule (``convs[i].conv``, ``blocks[i][j].spatial_block.window_attn.qkv``, ...).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from florence_jax import cpu_kernels, hardware, sharding
from florence_jax.config import Florence2Config
from florence_jax.lora import LoRALinear, dense, dense_of_activation
from florence_jax.modeling import flash_window
from florence_jax.modeling.dwconv_kernel import fused_depthwise_residual, grouped_conv3x3
from florence_jax.modeling.layers import (
    INIT_STD,
    activation,
    attention,
    kernel_output,
    layer_norm,
    linear,
    maybe_remat,
    named,
    recompute_in_backward,
    remat_function,
    softmax,
    with_gradient_of,
)
from florence_jax.modeling.window_kernel import fused_window_attention


def _conv(cfg: Florence2Config, din: int, dout: int, k: int, stride: int, pad: int, groups: int, rngs):
    return nnx.Conv(
        din, dout, kernel_size=(k, k), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
        feature_group_count=groups, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        kernel_init=nnx.initializers.normal(INIT_STD), rngs=rngs,
    )


class DepthwiseConv(nnx.Module):
    """3x3 depthwise conv (stride 1, padding 1), as nine shifted multiply-adds, XLA's grouped convolution
    or, with the block's residual, a Pallas TPU kernel or a CPU kernel.

    Same parameters as ``nnx.Conv(C, C, (3, 3), feature_group_count=C)`` (kernel (3, 3, 1, C), bias (C,)),
    so checkpoints map identically whichever formulation runs (``Formulations.depthwise_conv``). XLA:CPU
    computes the grouped convolution as a dense C x C one, so there the shifted sum is much faster forward
    and backward (docs/benchmarks.md). Being elementwise, it lets XLA fuse a block's residual stream into
    long chains; the scan over a stage's blocks (``DaViT``) keeps those chains within one block.
    """

    def __init__(self, cfg: Florence2Config, dim: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(INIT_STD)
        self.kernel = nnx.Param(init(rngs.params(), (3, 3, 1, dim), cfg.param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), cfg.param_dtype))
        self.dtype = cfg.dtype
        f = hardware.resolve(cfg.hardware)
        self.formulation = f.depthwise_conv
        self.interpret = f.platform != "tpu"  # the kernel runs in Pallas' interpreter off the TPU (tests)
        self.cpu_kernel = f.depthwise_conv == "kernel" and f.platform == "cpu"

    @named("dwconv")
    def __call__(self, x: jax.Array) -> jax.Array:
        fn = _depthwise_conv3x3 if self.formulation in ("shifted_sum", "kernel") else grouped_conv3x3
        return fn(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.bias[...].astype(self.dtype))

    def runs_cpu_kernel(self, x: jax.Array) -> bool:
        """Whether :meth:`residual` of ``x`` runs the CPU kernel (``depthwise_conv="kernel"``, float32, whole
        vectors of channels, the kernels built); else it takes the shifted sum."""
        return (self.cpu_kernel and jnp.dtype(self.dtype) == jnp.float32 and cpu_kernels.available()
                and cpu_kernels.depthwise_supported(x.shape[-1]))

    def residual(self, x: jax.Array, store=lambda t: t) -> jax.Array:
        """``store(self(x) + x)``, as the blocks use it: one Pallas kernel under ``depthwise_conv="fused"``
        (florence_jax.modeling.dwconv_kernel; the TPU's), one CPU kernel under ``"kernel"`` (the CPU's), the
        convolution and an add otherwise. ``store`` (the block's residual-stream store) is not applied to
        the CPU kernel's output: a kernel's output is stored as it is, nothing for XLA to recompute."""
        if self.runs_cpu_kernel(x):
            with jax.named_scope("dwconv"):
                # not named for remat, as the Pallas kernel: recomputing it costs about what saving it would
                return sharding.per_batch_shard(_cpu_depthwise_residual, x.astype(jnp.float32),
                                                self.kernel[...].astype(jnp.float32),
                                                self.bias[...].astype(jnp.float32))
        if self.formulation != "fused":
            return store(self(x) + x)
        with jax.named_scope("dwconv"):
            # not named for remat (kernel_output): under "dots" the backward runs it again, which costs
            # about what saving its output would (JAX copies a saved value once, rounding it to its dtype)
            out = fused_depthwise_residual(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                                           self.bias[...].astype(self.dtype), interpret=self.interpret)
        return store(out)


@recompute_in_backward  # keeps x, not the nine shifted copies each product's backward would keep
def _depthwise_conv3x3(x: jax.Array, k: jax.Array, b: jax.Array) -> jax.Array:
    h, w = x.shape[1], x.shape[2]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = b
    for i in range(3):
        for j in range(3):
            out = out + xp[:, i : i + h, j : j + w, :] * k[i, j, 0]
    return out


# The CPU kernel computes the forward; the backward is the shifted sum's, which is what the CPU computes
# without the kernel, so training takes the same gradient either way.
_cpu_depthwise_residual = with_gradient_of(lambda x, k, b: cpu_kernels.depthwise_residual(x, k, b),
                                           lambda x, k, b: _depthwise_conv3x3(x, k, b) + x)


def _residual_store(x: jax.Array) -> jax.Array:
    """``x`` itself, computed once and stored rather than recomputed by each consumer
    (``Formulations.store_vision_residuals``).

    XLA:CPU fuses cheap elementwise producers into every consumer, so it never stores the stream: the next
    depthwise conv's padded input, the LayerNorm and the next residual add each recompute it from earlier
    padded inputs, in the third stage dozens of shifted slices per element (docs/benchmarks.md gives the
    cost). XLA's documented fusion fence, ``lax.optimization_barrier``, does not help: XLA:CPU removes it
    before fusion, and the compiled program is the plain stream's (tests/test_hardware.py). A division is
    expensive to XLA, so it computes one once and stores the result; dividing by a 1.0 it cannot fold keeps
    every bit. The 1.0 is ``1 + 0 * float(isnan(x))``, element by element: XLA simplifies neither a float
    comparison of a value with itself nor a float product by 0, and it is exactly 1 whatever ``x`` holds
    (NaN and infinities included). The divisor has ``x``'s shape on purpose: a division by a broadcast
    scalar (a runtime scale entry, as before) is rewritten by XLA into a product with the scalar's
    reciprocal, which is cheap, so XLA fused it into every consumer again (in the train step under
    stochastic depth: the tower's forward took 7.9-8.2 s instead of 6.3-6.7 s for two 768 px images).
    """
    one = 1 + 0 * jnp.isnan(jax.lax.stop_gradient(x)).astype(x.dtype)  # a float product: not folded
    return x / one


def _drop_path(rate: float) -> nnx.Dropout | None:
    # Stochastic depth = dropout of whole samples: broadcast the mask over every non-batch axis.
    return nnx.Dropout(rate, broadcast_dims=(1, 2)) if rate > 0.0 else None


def _apply_drop_path(dp: nnx.Dropout | None, x: jax.Array, rngs, rate: jax.Array | None = None) -> jax.Array:
    """Stochastic depth; ``rate`` (traced) overrides the module's rate inside the scan over blocks."""
    if dp is None:
        return x
    if rate is None:
        return dp(x, rngs=rngs)
    if dp.deterministic:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rngs.dropout(), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jax.lax.select(jnp.broadcast_to(mask, x.shape), x / keep.astype(x.dtype), jnp.zeros_like(x))


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

    @named("patch_embed")
    def __call__(self, x: jax.Array, space_to_depth: bool = False) -> jax.Array:
        """``space_to_depth``: ``x`` is the image in blocks of the convolution's stride
        (``processing.space_to_depth``), which the convolution takes as a smaller one over more channels."""
        if self.pre_norm:
            if space_to_depth:
                raise ValueError("a space-to-depth input needs a patch embedding without a norm before it")
            x = self.norm(x)
        x = self._blocked_conv(x) if space_to_depth else self.conv(x)
        if not self.pre_norm:
            x = self.norm(x)
        return x

    def _blocked_conv(self, x: jax.Array) -> jax.Array:
        """The convolution (kernel k, stride s, padding p) on space-to-depth input: output position i reads
        pixels s*i - p .. s*i - p + k - 1, which lie in blocks i - ceil(p/s) .. i + floor((k-1-p)/s). The
        kernel, padded with zero taps to whole blocks and rearranged like the pixels, is a stride-1
        convolution over those blocks: the same sums of the same products (tests/test_modeling.py)."""
        conv = self.conv
        k = conv.kernel[...]
        kh, kw, cin, cout = k.shape
        s, p = conv.strides[0], conv.padding[0][0]
        if (kh, s, p) != (kw, conv.strides[1], conv.padding[1][0]) or any(a != b for a, b in conv.padding):
            raise ValueError("space-to-depth input needs a square, symmetric patch convolution")
        h, w = x.shape[1] * s, x.shape[2] * s
        if x.shape[3] != s * s * cin or not -s <= 2 * p - kh < 0:
            raise ValueError(f"space-to-depth input {x.shape} does not fit a {kh}x{kh} convolution with stride "
                             f"{s}, padding {p} over {cin} channels ({h}x{w} pixels)")
        front, back = -(-p // s), (kh - 1 - p) // s
        blocks = front + back + 1
        lead = s * front - p
        k = jnp.pad(k, ((lead, s * blocks - lead - kh), (lead, s * blocks - lead - kh), (0, 0), (0, 0)))
        k = k.reshape(blocks, s, blocks, s, cin, cout).transpose(0, 2, 1, 3, 4, 5).reshape(
            blocks, blocks, s * s * cin, cout)
        dtype = conv.dtype or x.dtype
        y = jax.lax.conv_general_dilated(x.astype(dtype), k.astype(dtype), (1, 1), ((front, back), (front, back)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=conv.precision)
        return y + conv.bias[...].astype(dtype)


class VisionMLP(nnx.Module):
    def __init__(self, cfg: Florence2Config, stage: int, *, rngs: nnx.Rngs):
        dim = cfg.vision_config.embed_dim[stage]
        hidden = int(dim * cfg.vision_config.mlp_ratio)
        self.act = activation(cfg.vision_config.activation_function)
        self.fc1 = linear(cfg, dim, hidden, rngs=rngs)
        self.fc2 = linear(cfg, hidden, dim, rngs=rngs)

    @named("mlp")
    def __call__(self, x, rngs=None):
        return dense_of_activation(self.fc2, self.act, dense(self.fc1, x, rngs), rngs)


class WindowAttention(nnx.Module):
    """Multi-head self-attention inside non-overlapping windows; the grid is padded to whole windows."""

    def __init__(self, cfg: Florence2Config, stage: int, *, rngs: nnx.Rngs):
        v = cfg.vision_config
        self.dim = v.embed_dim[stage]
        self.num_heads = v.num_heads[stage]
        self.window_size = v.window_size
        self.impl = cfg.attention_impl
        f = hardware.resolve(cfg.hardware)
        self.layout = f.attention_layout
        # the kernel compiles for the TPU and runs in Pallas' interpreter elsewhere (tests)
        self.fused = f.window_attention == "fused"
        self.interpret = f.platform != "tpu"
        # the CPU kernel (florence_jax.cpu_kernels) where it applies, the einsums elsewhere
        self.cpu_kernel = f.window_attention == "kernel" and f.platform == "cpu" and self.impl == "xla"
        # the GPU's flash kernel compiles for a GPU and runs in Pallas' interpreter elsewhere (tests)
        self.flash = f.window_attention == "flash"
        self.flash_interpret = f.platform != "gpu"
        self.qkv = linear(cfg, self.dim, 3 * self.dim, use_bias=v.qkv_bias, rngs=rngs)
        self.proj = linear(cfg, self.dim, self.dim, rngs=rngs)

    @named("window_attn")
    def __call__(self, x: jax.Array, rngs=None) -> jax.Array:
        b, h, w, c = x.shape
        ws = self.window_size
        pad_h, pad_w = (-h) % ws, (-w) % ws
        x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        hp, wp = h + pad_h, w + pad_w
        # (B, Hp, Wp, C) -> (B * nH * nW, ws*ws, C)
        x = x.reshape(b, hp // ws, ws, wp // ws, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
        heads, hd = self.num_heads, c // self.num_heads
        qkv = dense(self.qkv, x, rngs)
        if self.fused:
            out = kernel_output(fused_window_attention(qkv, heads, hd**-0.5, interpret=self.interpret))
        elif self.flash and flash_window.supported(ws * ws, hd):
            out = kernel_output(flash_window.flash_window_attention(qkv, heads, hd**-0.5,
                                                                    interpret=self.flash_interpret))
        elif (self.cpu_kernel and qkv.dtype == jnp.float32 and cpu_kernels.available()
              and cpu_kernels.window_attention_supported(hd)):
            # windows are image-major: on a mesh each device attends over its own images' windows
            out = kernel_output(
                sharding.per_batch_shard(lambda t: _window_kernel(t, heads, hd**-0.5, self.layout), qkv))
        else:
            out = _einsum_window_attention(qkv, heads, hd**-0.5, self.impl, self.layout)
        out = dense(self.proj, out.reshape(x.shape[0], ws * ws, c), rngs)
        out = out.reshape(b, hp // ws, wp // ws, ws, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        return out[:, :h, :w, :].reshape(b, h * w, c)


def _einsum_window_attention(qkv: jax.Array, heads: int, scale: float, impl: str, layout: str) -> jax.Array:
    """Attention inside each window of ``qkv`` (windows, tokens, 3 * C) by ``layers.attention``'s einsums;
    (windows, tokens, C)."""
    w, n, c3 = qkv.shape
    qkv = qkv.reshape(w, n, 3, heads, c3 // (3 * heads))
    out = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], scale=scale, impl=impl, layout=layout)
    return out.reshape(w, n, c3 // 3)


def _window_kernel(qkv, heads, scale, layout):
    """The CPU kernel's forward with the einsums' backward (recomputing the probabilities from the saved qkv),
    so training takes the same gradient either way."""
    return with_gradient_of(lambda t: cpu_kernels.window_attention(t, heads, scale),
                            lambda t: _einsum_window_attention(t, heads, scale, "xla", layout))(qkv)


class ChannelAttention(nnx.Module):
    """Grouped channel attention: channels attend to channels, scaled by tokens**-0.5.

    Where a stage has more tokens than channels, ``Formulations.channel_attention="folded"`` computes the
    same function from the tokens' (C, C) Gram matrix (``_folded_channel_attention``), with fewer products
    and none that contracts over the tokens of a projection's output."""

    def __init__(self, cfg: Florence2Config, stage: int, *, rngs: nnx.Rngs):
        v = cfg.vision_config
        self.dim = v.embed_dim[stage]
        self.groups = v.num_groups[stage]
        self.qkv = linear(cfg, self.dim, 3 * self.dim, use_bias=v.qkv_bias, rngs=rngs)
        self.proj = linear(cfg, self.dim, self.dim, rngs=rngs)
        self.folded = hardware.resolve(cfg.hardware).channel_attention == "folded"

    @named("channel_attn")
    def __call__(self, x: jax.Array, rngs=None) -> jax.Array:
        b, n, c = x.shape
        if self.folded and n > c and not any(isinstance(m, LoRALinear) for m in (self.qkv, self.proj)):
            return _folded_channel_attention(x, self.qkv, self.proj, self.groups)
        g, cg = self.groups, c // self.groups
        qkv = dense(self.qkv, x, rngs).reshape(b, n, 3, g, cg)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, G, Cg)
        scores = jnp.einsum("bngi,bngj->bgij", q, k, preferred_element_type=jnp.float32) * (n**-0.5)
        probs = softmax(scores, -1).astype(v.dtype)
        out = jnp.einsum("bgij,bngj->bngi", probs, v).reshape(b, n, c)
        return dense(self.proj, out, rngs)


def _folded_channel_attention(x: jax.Array, qkv: nnx.Linear, proj: nnx.Linear, groups: int) -> jax.Array:
    """Channel attention from the tokens' Gram matrix, the products regrouped.

    With ``q = x Wq + bq`` and ``k = x Wk + bk`` over the n tokens of ``x`` (n, C), the scores of a group
    are ``q_g^T k_g = Wq_g^T G Wk_g + (Wq_g^T s) bk_g^T + bq_g (s^T Wk_g) + n bq_g bk_g^T`` with
    ``G = x^T x`` and ``s`` the tokens' sum; and with P the groups' probabilities as one block-diagonal
    (C, C) matrix, the output ``proj(v P^T)`` is ``x (Wv P^T Wp) + (bv P^T Wp + bp)``. Products per
    example: 4nC^2 + 4C^3 multiply-adds against the projections' 8nC^2, fewer wherever n > C (every stage
    but the last at 768 px). The reference's q, k and v (n x 3C) are never formed: on a TPU, contracting them
    over the tokens made XLA transpose all three first. Float32 statistics and sums; products in the
    layers' compute dtype, as the projections compute theirs (but for the small probabilities-times-Wp)."""
    b, n, c = x.shape
    g, cg = groups, c // groups
    dt = qkv.dtype or x.dtype
    f32 = jnp.float32
    x = x.astype(dt)
    w = qkv.kernel[...].astype(dt)
    wq, wk, wv = w[:, :c], w[:, c : 2 * c], w[:, 2 * c :]
    bias = jnp.zeros((3 * c,), f32) if qkv.bias is None else qkv.bias[...].astype(f32)
    bq, bk, bv = bias[:c].reshape(g, cg), bias[c : 2 * c].reshape(g, cg), bias[2 * c :]
    gram = _gram(x)
    total = jnp.sum(x, axis=1, dtype=f32)
    gram_wk = jnp.einsum("bij,jd->bid", gram.astype(dt), wk, preferred_element_type=f32)
    scores = jnp.einsum("igx,bigy->bgxy", wq.reshape(c, g, cg), gram_wk.astype(dt).reshape(b, c, g, cg),
                        preferred_element_type=f32)
    sq = jnp.einsum("bi,id->bd", total, wq.astype(f32)).reshape(b, g, cg, 1)
    sk = jnp.einsum("bi,id->bd", total, wk.astype(f32)).reshape(b, g, 1, cg)
    scores = scores + sq * bk[None, :, None, :] + bq[None, :, :, None] * sk + n * (bq[:, :, None] * bk[:, None, :])
    probs = softmax(scores * (n**-0.5), -1)
    # Float32 operands: a small product (C x C x C/groups per example); XLA:CPU has no bfloat16 kernel for
    # this contraction (over the probabilities' rows).
    wp = proj.kernel[...].astype(dt).astype(f32)
    probs_wp = jnp.einsum("bgij,gic->bgjc", probs, wp.reshape(g, cg, c)).reshape(b, c, c)
    folded = jnp.einsum("dj,bjc->bdc", wv, probs_wp.astype(dt), preferred_element_type=f32)
    out_bias = jnp.einsum("j,bjc->bc", bv, probs_wp)
    if proj.bias is not None:
        out_bias = out_bias + proj.bias[...].astype(f32)
    # the product in the compute dtype (accumulated in float32), the bias added after it, as a projection
    # computes: in bfloat16 a float32 (n, C) result would be written, read back and rounded (and its
    # backward's products would write float32 too)
    return jnp.einsum("bnd,bdc->bnc", x, folded.astype(dt)) + out_bias.astype(dt)[:, None, :]


@jax.custom_vjp
def _gram(x: jax.Array) -> jax.Array:
    """``x^T x`` per example, (B, C, C) float32, from ``x`` (B, n, C)."""
    return jnp.einsum("bni,bnj->bij", x, x, preferred_element_type=jnp.float32)


def _gram_fwd(x):
    return _gram(x), x


def _gram_bwd(x, d_gram):
    # x (dG + dG^T): one product over the channels, in x's dtype (float32 accumulation). Differentiated as
    # an einsum, it is two products with float32 (n, C) results summed after (the float32 preference
    # carries into the transposed products).
    sym = (d_gram + jnp.swapaxes(d_gram, 1, 2)).astype(x.dtype)
    return (jnp.einsum("bnj,bji->bni", x, sym),)


_gram.defvjp(_gram_fwd, _gram_bwd)


class _DaViTBlockHalf(nnx.Module):
    """Shared structure of spatial and channel blocks: (dwconv + attention) then (dwconv + MLP)."""

    def _init_common(self, cfg: Florence2Config, stage: int, drop_path_rate: float, rngs: nnx.Rngs):
        dim = cfg.vision_config.embed_dim[stage]
        # the block's LayerNorms, which feed products, take Formulations.layer_norm_stats (the patch
        # embeddings', around strided convolutions, and the text model's gain nothing by it)
        f = hardware.resolve(cfg.hardware)
        stats = f.layer_norm_stats
        self.conv1 = DepthwiseConv(cfg, dim, rngs=rngs)
        self.norm1 = layer_norm(cfg, dim, rngs=rngs, stats=stats)
        self.drop_path1 = _drop_path(drop_path_rate)
        self.conv2 = DepthwiseConv(cfg, dim, rngs=rngs)
        self.norm2 = layer_norm(cfg, dim, rngs=rngs, stats=stats)
        self.ffn = VisionMLP(cfg, stage, rngs=rngs)
        self.drop_path2 = _drop_path(drop_path_rate)
        self.store_residuals = f.store_vision_residuals

    def _attend(self, tokens: jax.Array, hw: tuple[int, int], rngs=None) -> jax.Array:
        raise NotImplementedError

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None, drop_rate: jax.Array | None = None) -> jax.Array:
        with jax.named_scope(self.scope):
            return self._forward(x, rngs, drop_rate)

    def _forward(self, x: jax.Array, rngs, drop_rate) -> jax.Array:
        store = _residual_store if self.store_residuals else (lambda t: t)
        b, h, w, c = x.shape
        x = self.conv1.residual(x, store)
        tokens = x.reshape(b, h * w, c)
        attn = self._attend(self.norm1(tokens), (h, w), rngs)
        tokens = store(tokens + _apply_drop_path(self.drop_path1, attn, rngs, drop_rate))
        x = tokens.reshape(b, h, w, c)
        x = self.conv2.residual(x, store)
        tokens = x.reshape(b, h * w, c)
        tokens = tokens + _apply_drop_path(self.drop_path2, self.ffn(self.norm2(tokens), rngs), rngs, drop_rate)
        return store(tokens).reshape(b, h, w, c)


class SpatialBlock(_DaViTBlockHalf):
    scope = "spatial"

    def __init__(self, cfg: Florence2Config, stage: int, drop_path_rate: float, *, rngs: nnx.Rngs):
        self._init_common(cfg, stage, drop_path_rate, rngs)
        self.window_attn = WindowAttention(cfg, stage, rngs=rngs)

    def _attend(self, tokens, hw, rngs=None):
        b, _, c = tokens.shape
        return self.window_attn(tokens.reshape(b, hw[0], hw[1], c), rngs)


class ChannelBlock(_DaViTBlockHalf):
    scope = "channel"

    def __init__(self, cfg: Florence2Config, stage: int, drop_path_rate: float, *, rngs: nnx.Rngs):
        self._init_common(cfg, stage, drop_path_rate, rngs)
        self.channel_attn = ChannelAttention(cfg, stage, rngs=rngs)

    def _attend(self, tokens, hw, rngs=None):
        return self.channel_attn(tokens, rngs)


class VisionBlock(nnx.Module):
    def __init__(self, cfg: Florence2Config, stage: int, spatial_dpr: float, channel_dpr: float, *, rngs):
        self.spatial_block = SpatialBlock(cfg, stage, spatial_dpr, rngs=rngs)
        self.channel_block = ChannelBlock(cfg, stage, channel_dpr, rngs=rngs)

    def __call__(self, x, rngs=None, drop_rates: jax.Array | None = None):
        """``drop_rates`` (spatial, channel), traced, replace the blocks' own rates (scan over blocks)."""
        if drop_rates is None:
            return self.channel_block(self.spatial_block(x, rngs), rngs)
        return self.channel_block(self.spatial_block(x, rngs, drop_rates[0]), rngs, drop_rates[1])


_SMALL_PARAM = 1 << 16  # elements per block: carried through the stage scan rather than sliced in it


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
        # a stage's blocks as one lax.scan where the hardware's formulation scans (Formulations.vision_stages)
        # and the config does not unroll
        f = hardware.resolve(cfg.hardware)
        self.scan_blocks = cfg.scan_vision_blocks and f.vision_stages == "scan"
        self.carry_small = f.carry_small_scan_params
        # (spatial, channel) stochastic-depth rate of every block, per stage, for the scan.
        starts = np.cumsum([0, *v.depths[:-1]]) * 2
        self.drop_rates = tuple(tuple((dpr[o + 2 * j], dpr[o + 2 * j + 1]) for j in range(d))
                                for o, d in zip(starts.tolist(), v.depths))

    @named("vision_tower")
    def __call__(self, pixels_nhwc: jax.Array, rngs: nnx.Rngs | None = None, space_to_depth: bool = False) -> jax.Array:
        """``space_to_depth``: the pixels in blocks of the first patch stride (``processing.space_to_depth``)."""
        x = pixels_nhwc
        for stage, (conv, stage_blocks) in enumerate(zip(self.convs, self.blocks)):
            with jax.named_scope(f"stage{stage}"):
                x = conv(x, space_to_depth=space_to_depth and stage == 0)
                if self.scan_blocks and len(stage_blocks) > 1:
                    x = self._scan_stage(stage, x, rngs)
                    continue
                for block in stage_blocks:
                    x = maybe_remat(lambda blk, h, r: blk(h, r), self.remat_policy)(block, x, rngs)
        return x

    def _scan_stage(self, stage: int, x: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
        """A stage's identical blocks as one ``lax.scan`` over their stacked parameters.

        One block is traced and compiled instead of ``depth`` (9 in the third stage of base and large), and XLA
        cannot fuse across iterations: with the elementwise depthwise convs, an unrolled stage let XLA
        fuse the residual stream of all its blocks into thousands of ~2400-op fusions, whose CPU compile
        grew past 20 GB. Per-block stochastic-depth rates and dropout keys are scanned alongside.
        """
        stage_blocks = self.blocks[stage]
        graphdef, first = nnx.split(stage_blocks[0])
        states = [first] + [nnx.split(b)[1] for b in stage_blocks[1:]]
        treedef = jax.tree.structure(states[0])
        per_block = [jax.tree.leaves(st) for st in states]
        stacked = [jnp.stack(ls) for ls in zip(*per_block)]
        # Small parameters (biases, LayerNorm and depthwise-conv weights) feed elementwise fusions. Sliced
        # from the stack inside the loop, the slice fuses into them and XLA:CPU computes it per element
        # (docs/benchmarks.md: the depthwise convs ran several times slower); so there
        # (Formulations.carry_small_scan_params) each iteration receives the next block's small parameters
        # through the carry, sliced in the iteration before. Matmul weights are sliced in place: a dot does
        # not fuse its operands.
        small = [self.carry_small and x.size // x.shape[0] < _SMALL_PARAM for x in stacked]
        big_xs = [x for x, sm in zip(stacked, small) if not sm]
        small_now = [x[0] for x, sm in zip(stacked, small) if sm]
        small_next = [jnp.concatenate([x[1:], x[-1:]]) for x, sm in zip(stacked, small) if sm]
        depth = len(stage_blocks)
        keys = jax.random.split(rngs.dropout(), depth) if rngs is not None else jnp.zeros((depth,), jnp.uint32)
        rates = jnp.asarray(self.drop_rates[stage], jnp.float32)
        use_rngs = rngs is not None

        def body(carry, xs):
            h, small_params = carry
            big_params, next_small, key, rate = xs
            big_it, small_it = iter(big_params), iter(small_params)
            state = jax.tree.unflatten(treedef, [next(small_it) if sm else next(big_it) for sm in small])
            block = nnx.merge(graphdef, state)
            return (block(h, nnx.Rngs(dropout=key) if use_rngs else None, rate), next_small), None

        body = remat_function(body, self.remat_policy)
        (x, _), _ = jax.lax.scan(body, (x, small_now), (big_xs, small_next, keys, rates))
        return x
