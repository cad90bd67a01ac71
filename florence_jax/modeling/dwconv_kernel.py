"""DaViT's 3x3 depthwise convolution and its residual as one Pallas kernel
(``Formulations.depthwise_conv="fused"``, the TPU's).

Every DaViT block computes ``x + conv(x)`` twice, ``conv`` a 3x3 depthwise convolution with padding 1,
on the block's residual stream, which lies in memory as tokens: ``(batch, H * W, C)``, tiled over
(W, C) on the TPU. XLA:TPU's grouped convolution wants the batch in the sublanes, ``(H, W, batch, C)``,
so it copies the stream into that layout and back around every convolution, and the convolution itself
runs far from the memory bound (``docs/scale-out.md``). Here one kernel reads a block of rows of one image
as it lies, ``(rows, W, C block)``, plus the row above and the row below, computes the nine
multiply-adds in float32 (the shifts along H are whole rows, those along W products with a shift matrix
on the matrix unit) and writes ``x + conv(x) + bias`` in the input's dtype. HBM sees the input once (and 2 rows in
every ``rows`` twice) and the output once.

The residual is folded into the centre tap (1 added to it, in float32), so the kernel is a plain 3x3
depthwise convolution with a bias. The backward pass is XLA's: the gradient of the grouped convolution
and its residual, the same as the other formulations take (``tests/test_dwconv_kernel.py`` checks the
values and the three gradients against them).

On a platform other than the TPU the kernel runs in Pallas' interpreter (slow; it is how the tests run
it). On a mesh it runs under ``shard_map`` over the batch axes (:func:`florence_jax.sharding.per_batch_shard`):
each device convolves its own images.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from florence_jax import sharding

# Elements (rows x W x channels) of the block one grid step holds: its float32 sums take 1 MB of VMEM,
# well within the 16 MiB a TPU kernel may use by default next to the double-buffered input and output.
_BLOCK_ELEMENTS = 1 << 18
_BLOCK_CHANNELS = 512
# Blocks are independent: on a chip with two TensorCores (v4, v5p megacore) the grid is split between them.
_PARALLEL = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"))


def fused_depthwise_residual(x: jax.Array, kernel: jax.Array, bias: jax.Array, *, interpret: bool) -> jax.Array:
    """``x + conv(x) + bias`` for ``x`` of shape ``(batch, H, W, C)``, ``conv`` the 3x3 depthwise
    convolution with padding 1 and ``kernel`` of shape ``(3, 3, 1, C)`` (or ``(3, 3, C)``), in ``x``'s
    dtype with float32 sums. ``interpret`` runs Pallas' interpreter instead of compiling a TPU kernel."""
    if x.ndim != 4:
        raise ValueError(f"x must be (batch, H, W, C), got {x.shape}")
    c = x.shape[-1]
    if kernel.size != 9 * c or bias.shape != (c,):
        raise ValueError(f"kernel must be (3, 3, 1, {c}) and bias ({c},), got {kernel.shape} and {bias.shape}")
    # the residual is the centre tap's x: one convolution with 1 added to that tap (in float32, where the
    # sum of 1 and a bfloat16 tap is exact down to taps of 2**-16)
    k = kernel.reshape(9, c).astype(jnp.float32).at[4].add(1)
    return _conv_vjp(x, k, bias, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _conv_vjp(x, k, b, interpret):
    return _per_device(x, k, b, interpret)


def _conv_fwd(x, k, b, interpret):
    return _per_device(x, k, b, interpret), (x, k)


def _conv_bwd(interpret, saved, dy):
    # XLA's: the gradient of the grouped convolution and its residual, which is what the other
    # formulations compute (the kernel's own transpose, the same kernel with the taps flipped, was no
    # cheaper by the TPU compiler's estimates once the taps' gradient was added: docs/scale-out.md)
    x, k = saved
    taps = k.at[4].add(-1).reshape(3, 3, 1, -1)
    _, pullback = jax.vjp(lambda x_, k_, b_: x_ + grouped_conv3x3(x_, k_.astype(x_.dtype), b_.astype(x_.dtype)),
                          x, taps, jnp.zeros(k.shape[-1], k.dtype))
    dx, dk, db = pullback(dy.astype(x.dtype))
    return dx, dk.reshape(9, -1), db


_conv_vjp.defvjp(_conv_fwd, _conv_bwd)


def grouped_conv3x3(x: jax.Array, k: jax.Array, b: jax.Array) -> jax.Array:
    """The same convolution as XLA's grouped convolution (``Formulations.depthwise_conv="grouped"``):
    ``k`` of shape ``(3, 3, 1, C)``, no residual."""
    out = jax.lax.conv_general_dilated(x, k, window_strides=(1, 1), padding=((1, 1), (1, 1)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       feature_group_count=x.shape[-1])
    return out + b


def _per_device(x, k, b, interpret):
    """The kernel on ``x``; on a mesh, each device's own images (the parameters whole on every device)."""
    return sharding.per_batch_shard(functools.partial(_forward, interpret=interpret), x, k, b)


def _rows_per_block(h: int, w: int, cb: int) -> int:
    """The most rows (a divisor of ``h``) whose block holds at most ``_BLOCK_ELEMENTS``; at least one."""
    best = 1
    for r in range(1, h + 1):
        if h % r == 0 and r * w * cb <= _BLOCK_ELEMENTS:
            best = r
    return best


def _channels_per_block(c: int) -> int:
    if c <= _BLOCK_CHANNELS or c % 128:
        return c
    cb = _BLOCK_CHANNELS
    while c % cb:
        cb -= 128
    return cb


def _shift_matrix(w: int, by: int, dtype) -> jax.Array:
    """``(W, W)``: ``S @ row`` is the row moved by ``by`` along W, ``(S @ row)[v] = row[v + by]``, zero
    beyond the image. A product with one 1 per row is exact (each output is one input, summed in float32)."""
    out = jax.lax.broadcasted_iota(jnp.int32, (w, w), 0)
    src = jax.lax.broadcasted_iota(jnp.int32, (w, w), 1)
    return (src == out + by).astype(dtype)


def _kernel(x_ref, above_ref, below_ref, k_ref, b_ref, o_ref):
    i, last = pl.program_id(1), pl.num_programs(1) - 1
    rows, w, cb = x_ref.shape[1:]
    f32 = jnp.float32
    above = jnp.where(i > 0, above_ref[0], jnp.zeros_like(above_ref[0]))  # (1, W, Cb): the row before
    below = jnp.where(i < last, below_ref[0], jnp.zeros_like(below_ref[0]))  # and the row after the block
    xe = jnp.concatenate([above, x_ref[0], below], axis=0)  # (rows + 2, W, Cb)
    # The taps along W read a row moved by one column either way. Moving values along W (the sublanes)
    # on the vector unit takes rotations, which a v4 core emulates at several operations per register (the
    # kernel's schedule ran 2x longer there); as a product with a shift matrix it is the matrix unit's work,
    # idle otherwise here, and exact for the input's values.
    shifts = (_shift_matrix(w, -1, xe.dtype), None, _shift_matrix(w, 1, xe.dtype))
    k = k_ref[...].astype(f32)  # (9, Cb)
    acc = [jnp.broadcast_to(b_ref[...].astype(f32), (w, cb))] * rows
    for r in range(rows + 2):  # each input row feeds output rows r - 2 .. r through tap rows 2 .. 0
        row = xe[r]
        taps = [row.astype(f32) if s is None else jnp.dot(s, row, preferred_element_type=f32) for s in shifts]
        for di in range(3):
            if 0 <= r - di < rows:
                for dj in range(3):
                    acc[r - di] = acc[r - di] + taps[dj] * k[3 * di + dj]
    for r in range(rows):
        o_ref[0, r] = acc[r].astype(o_ref.dtype)


def _forward(x, k, b, interpret):
    n, h, w, c = x.shape
    cb = _channels_per_block(c)
    rows = _rows_per_block(h, w, cb)
    grid = (n, h // rows, c // cb)
    # the convolution's multiply-adds: the shift products are data movement, not the model's work
    cost = pl.CostEstimate(flops=18 * x.size, transcendentals=0,
                           bytes_accessed=int(x.dtype.itemsize * x.size * (2 + 2 / rows)))
    return pl.pallas_call(
        _kernel,
        grid=grid,
        in_specs=[
            pl.BlockSpec((1, rows, w, cb), lambda b_, i, j: (b_, i, 0, j)),
            # one-row blocks: the block index is the row (clamped at the edges, where the kernel zeroes it)
            pl.BlockSpec((1, 1, w, cb), lambda b_, i, j: (b_, jnp.maximum(i * rows - 1, 0), 0, j)),
            pl.BlockSpec((1, 1, w, cb), lambda b_, i, j: (b_, jnp.minimum((i + 1) * rows, h - 1), 0, j)),
            pl.BlockSpec((9, cb), lambda b_, i, j: (0, j)),
            pl.BlockSpec((1, cb), lambda b_, i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((1, rows, w, cb), lambda b_, i, j: (b_, i, 0, j)),
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        compiler_params=_PARALLEL, cost_estimate=cost, interpret=interpret, name="depthwise_residual",
    )(x, x, x, k, b.reshape(1, c))


__all__ = ["fused_depthwise_residual"]
