"""DaViT's window attention as one Pallas kernel (``Formulations.window_attention="fused"``, the TPU's).

A window is 144 tokens (12 x 12) with heads of 32 channels. Written with einsums, XLA:TPU stores each
window's float32 scores in HBM and passes over them three times (the ``q k^T`` product writes them, the
softmax's max-subtraction reads and writes them, the ``p v`` product reads them), and it transposes the
projection's output into heads-major order and back. Compiled for a v5e chip, those passes were the
costliest ops of the vision tower (``docs/scale-out.md``). Here one kernel takes a block of windows
straight from the qkv projection's output, ``(windows, tokens, 3 * channels)`` as it lies in memory, and
computes every head's scores, softmax and product on chip; it writes ``(windows, tokens, channels)``,
the output projection's input, in the same order. HBM sees the inputs and the output once.

The backward pass is a second kernel that recomputes each head's probabilities from the saved qkv (only
qkv is kept for it) and writes the gradient of the whole qkv block: the same formulas as autodiff of the
einsum formulation (``florence_jax.modeling.layers.attention``), whose results it matches within rounding
(``tests/test_window_kernel.py``).

Numerics follow the einsum path within rounding: scores and softmax in float32 and products accumulated in
float32. The forward rounds the softmax's numerators to the input dtype for the ``p v`` product and divides
its rows by their sums after it (a product per output entry rather than per score); the backward rounds the
probabilities, as the einsum path does.

The kernel is bound by vector work, not by the matrix unit: a window's 144 keys fill 144 of 256 lanes.
Compiled for a v5e chip (Florence-2-base, 16 images, every stage), these changes took the forward's
schedule from 19.9 to 12.1 million cycles and the backward's from 50.7 to 34.0: whole 128-lane tiles of
heads in the products instead of each head's 32 lanes rotated out and back; one product with
``scale * log2(e)`` before ``exp2`` instead of two; the rows' reciprocals refined from the chip's estimate
instead of an exact division's special cases; in the backward, the scores made transposed (keys x
queries), so that only dq's product needs a transpose, once per tile (``docs/scale-out.md``).

On a platform other than the TPU the kernel runs in Pallas' interpreter (slow; it is how the tests run it).
A Mosaic kernel cannot be split by XLA's partitioner (it refuses to compile one on a sharded input), so
on a mesh the kernel runs under ``shard_map`` over the batch axes: each device attends over the windows of
its own images. The mesh is the input's (its type carries it when the program was called with sharded
arrays, as generation is) or else the step's (:func:`florence_jax.sharding.step_mesh`: the train and
evaluation steps, whose shardings are given to ``jit``). (``custom_partitioning``,
which would leave the choice to the partitioner, is not wired through to the TPU compiler.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from florence_jax import sharding

# Channels (heads x head size) of the windows one grid step holds; the forward block is then about
# 1.2 MB of bfloat16 inputs and outputs, the backward's 2.1 MB, and each head's float32 scores
# 83 KB per window: within the 16 MiB of VMEM a TPU kernel may use by default, double buffered.
_FORWARD_BLOCK_CHANNELS = 1024
_BACKWARD_BLOCK_CHANNELS = 512
# Blocks of windows are independent: on a chip with two TensorCores (v4, v5p megacore) the grid is split
# between them.
_PARALLEL = pltpu.CompilerParams(dimension_semantics=("parallel",))


def fused_window_attention(qkv: jax.Array, heads: int, scale: float, *, interpret: bool) -> jax.Array:
    """Softmax attention inside each window: ``qkv`` is ``(windows, tokens, 3 * C)`` in the qkv
    projection's order (q, k, v, each heads x head size), the result ``(windows, tokens, C)`` in heads x
    head size order. ``interpret`` runs Pallas' interpreter instead of compiling a TPU kernel."""
    if qkv.ndim != 3 or qkv.shape[-1] % (3 * heads):
        raise ValueError(f"qkv must be (windows, tokens, 3 * heads * head_dim) with {heads} heads, got {qkv.shape}")
    fn = functools.partial(_attention, heads=heads, scale=scale, interpret=interpret)
    # windows are image-major: split as the batch is, each device's windows are its own images'
    return sharding.per_batch_shard(fn, qkv)


def _windows_per_block(channels: int, block_channels: int) -> int:
    return max(1, block_channels // channels)


def _attention(qkv, *, heads, scale, interpret):
    return _attention_vjp(qkv, heads, scale, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _attention_vjp(qkv, heads, scale, interpret):
    return _forward(qkv, heads, scale, interpret)


def _attention_fwd(qkv, heads, scale, interpret):
    return _forward(qkv, heads, scale, interpret), qkv


def _attention_bwd(heads, scale, interpret, qkv, d_out):
    return (_backward(qkv, d_out.astype(qkv.dtype), heads, scale, interpret),)


_attention_vjp.defvjp(_attention_fwd, _attention_bwd)


def _tile(part: int, t: int, channels: int, width: int) -> slice:
    """Tile ``t`` (``width`` lanes) of q (part 0), k (1), v (2) in a ``(..., 3 * channels)`` block, or of a
    ``(..., channels)`` one with part 0."""
    start = part * channels + t * width
    return slice(start, start + width)


_LOG2_E = 1.4426950408889634


def _exponentials(s, scale, axis):
    """Softmax numerators of float32 scores ``s`` over their keys' ``axis`` and the reciprocal of their sums
    (kept along that axis). The maximum is taken over the raw scores and the score scale is folded into one
    product with log2(e) before ``exp2`` (a TPU's exponential is ``exp2`` after a product with log2(e)): one
    product per score where ``exp(scale s - max)`` took two."""
    e = jnp.exp2((s - jnp.max(s, axis=axis, keepdims=True)) * (scale * _LOG2_E))
    return e, _reciprocal(jnp.sum(e, axis=axis, keepdims=True))


def _reciprocal(x):
    """``1 / x`` for sums of exponentials (at least 1: the row's maximum adds exp2(0)): the chip's
    approximate reciprocal and two Newton steps, each squaring the relative error (from bfloat16's 2**-9,
    as coarse as Pallas' interpreter makes the estimate, to below float32's rounding), without the special
    cases (zero, infinity, subnormals) of an exact division, which took about ten vector operations a row."""
    r = pl.reciprocal(x, approx=True)
    for _ in range(2):
        r = r * (2.0 - x * r)
    return r


def _tiles(channels: int, head_dim: int) -> tuple[int, int]:
    """Lanes per tile of heads and heads per tile: the most whole heads that fit a 128-lane register and
    tile the channels evenly (four of DaViT's 32-channel heads; one head where none fit)."""
    per_tile = max(n for n in range(1, max(1, 128 // head_dim) + 1) if (channels // head_dim) % n == 0)
    return per_tile * head_dim, per_tile


def _head_lanes(width: int, head_dim: int, h: int) -> jax.Array:
    """``(1, 1, width)``: True on head ``h``'s lanes of a tile."""
    lane = jax.lax.broadcasted_iota(jnp.int32, (1, 1, width), 2)
    return (lane >= h * head_dim) & (lane < (h + 1) * head_dim)


# A head's channels are a quarter of a tile of lanes (32 of 128). Sliced out, each head's q, k and v would
# be rotated across lanes to lane 0, and its result rotated back: cross-lane work, the units the softmax's
# row maxima and sums also need. Instead the products take whole tiles: the score product contracts q with
# every lane but head h's zeroed (the same sums: the other heads' lanes add exact zeros), the value product
# gives a full tile of which head h's lanes are kept. The matrix unit pads a 32-deep or 32-wide product to
# its 128 anyway.
def _forward_kernel(qkv_ref, o_ref, *, heads, scale):
    channels = o_ref.shape[-1]
    hd = channels // heads
    width, per_tile = _tiles(channels, hd)
    for t in range(channels // width):
        q, k, v = (qkv_ref[:, :, _tile(part, t, channels, width)] for part in range(3))
        out = jnp.zeros(o_ref.shape[:2] + (width,), jnp.float32)
        for h in range(per_tile):
            lanes = _head_lanes(width, hd, h)
            s = jnp.einsum("gqd,gkd->gqk", jnp.where(lanes, q, jnp.zeros_like(q)), k,
                           preferred_element_type=jnp.float32)
            e, r = _exponentials(s, scale, axis=-1)
            # normalized after the product: a product per output entry, not per score
            o = jnp.einsum("gqk,gkd->gqd", e.astype(v.dtype), v, preferred_element_type=jnp.float32) * r
            out = jnp.where(lanes, o, out)
        o_ref[:, :, _tile(0, t, channels, width)] = out.astype(o_ref.dtype)


def _backward_kernel(qkv_ref, do_ref, dqkv_ref, *, heads, scale):
    # Keys x queries: the probabilities' transpose is what dv = p^T do and dk = ds^T q take, so the scores
    # are made transposed (the softmax's sums then run down the sublanes, not across lanes), and only dq
    # needs a transpose: k's, and its own back, once per tile of heads instead of p's and ds's per head.
    channels = do_ref.shape[-1]
    hd = channels // heads
    width, per_tile = _tiles(channels, hd)
    for t in range(channels // width):
        tile = [_tile(part, t, channels, width) for part in range(3)]
        q, k, v = (qkv_ref[:, :, lanes] for lanes in tile)
        do = do_ref[:, :, tile[0]]
        k_t = jnp.swapaxes(k, 1, 2)  # (windows, lanes, keys)
        dq_t, dk, dv = (jnp.zeros(shape, jnp.float32) for shape in
                        (k_t.shape[:2] + (q.shape[1],), k.shape[:2] + (width,), k.shape[:2] + (width,)))
        for h in range(per_tile):
            lanes = _head_lanes(width, hd, h)
            s_t = jnp.einsum("gkd,gqd->gkq", k, jnp.where(lanes, q, jnp.zeros_like(q)),
                             preferred_element_type=jnp.float32)
            e_t, r = _exponentials(s_t, scale, axis=1)
            p_t = e_t * r
            # out = p' v with p' = p in the input dtype: dv = p'^T do, dp = do v^T
            dv = jnp.where(lanes, jnp.einsum("gkq,gqd->gkd", p_t.astype(do.dtype), do,
                                             preferred_element_type=jnp.float32), dv)
            dp_t = jnp.einsum("gkd,gqd->gkq", v, jnp.where(lanes, do, jnp.zeros_like(do)),
                              preferred_element_type=jnp.float32)
            # softmax's backward; the score scale is applied to dq and dk (per entry, not per score)
            ds_t = (p_t * (dp_t - jnp.sum(dp_t * p_t, axis=1, keepdims=True))).astype(q.dtype)
            dk = jnp.where(lanes, jnp.einsum("gkq,gqd->gkd", ds_t, q, preferred_element_type=jnp.float32), dk)
            rows = jnp.swapaxes(lanes, 1, 2)  # head h's rows of dq's transpose
            dq_t = jnp.where(rows, jnp.einsum("gdk,gkq->gdq", k_t, ds_t, preferred_element_type=jnp.float32), dq_t)
        for lanes, grad in zip(tile, (jnp.swapaxes(dq_t, 1, 2) * scale, dk * scale, dv), strict=True):
            dqkv_ref[:, :, lanes] = grad.astype(dqkv_ref.dtype)


def _forward(qkv, heads, scale, interpret):
    n, t, c3 = qkv.shape
    c = c3 // 3
    g = _windows_per_block(c, _FORWARD_BLOCK_CHANNELS)
    hd = c // heads
    cost = pl.CostEstimate(flops=4 * n * heads * t * t * hd, transcendentals=n * heads * t * t,
                           bytes_accessed=qkv.dtype.itemsize * n * t * (c3 + c))
    return pl.pallas_call(
        functools.partial(_forward_kernel, heads=heads, scale=scale),
        grid=(pl.cdiv(n, g),),
        in_specs=[pl.BlockSpec((g, t, c3), lambda i: (i, 0, 0))],
        out_specs=pl.BlockSpec((g, t, c), lambda i: (i, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((n, t, c), qkv.dtype),
        compiler_params=_PARALLEL, cost_estimate=cost, interpret=interpret, name="window_attention_fwd",
    )(qkv)


def _backward(qkv, d_out, heads, scale, interpret):
    n, t, c3 = qkv.shape
    c = c3 // 3
    g = _windows_per_block(c, _BACKWARD_BLOCK_CHANNELS)
    hd = c // heads
    cost = pl.CostEstimate(flops=10 * n * heads * t * t * hd, transcendentals=n * heads * t * t,
                           bytes_accessed=qkv.dtype.itemsize * n * t * (2 * c3 + c))
    return pl.pallas_call(
        functools.partial(_backward_kernel, heads=heads, scale=scale),
        grid=(pl.cdiv(n, g),),
        in_specs=[pl.BlockSpec((g, t, c3), lambda i: (i, 0, 0)), pl.BlockSpec((g, t, c), lambda i: (i, 0, 0))],
        out_specs=pl.BlockSpec((g, t, c3), lambda i: (i, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((n, t, c3), qkv.dtype),
        compiler_params=_PARALLEL, cost_estimate=cost, interpret=interpret, name="window_attention_bwd",
    )(qkv, d_out)


__all__ = ["fused_window_attention"]
