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

Numerics follow the einsum path: scores and softmax in float32, probabilities rounded to the input dtype
before the ``p v`` product, which accumulates in float32.

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


def _lanes(part: int, h: int, channels: int, head_dim: int) -> slice:
    """Head ``h``'s channels of q (part 0), k (1), v (2) in a ``(..., 3 * channels)`` block, or of a
    ``(..., channels)`` one with part 0."""
    start = part * channels + h * head_dim
    return slice(start, start + head_dim)


def _probabilities(q, k, scale):
    """Softmax of one head's scores over keys, float32: ``(windows, tokens, tokens)``."""
    s = jnp.einsum("gqd,gkd->gqk", q, k, preferred_element_type=jnp.float32) * scale
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    return p * (1.0 / jnp.sum(p, axis=-1, keepdims=True))


def _forward_kernel(qkv_ref, o_ref, *, heads, scale):
    channels = o_ref.shape[-1]
    hd = channels // heads
    for h in range(heads):
        q, k, v = (qkv_ref[:, :, _lanes(part, h, channels, hd)] for part in range(3))
        p = _probabilities(q, k, scale)
        o = jnp.einsum("gqk,gkd->gqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        o_ref[:, :, _lanes(0, h, channels, hd)] = o.astype(o_ref.dtype)


def _backward_kernel(qkv_ref, do_ref, dqkv_ref, *, heads, scale):
    channels = do_ref.shape[-1]
    hd = channels // heads
    for h in range(heads):
        q, k, v = (qkv_ref[:, :, _lanes(part, h, channels, hd)] for part in range(3))
        do = do_ref[:, :, _lanes(0, h, channels, hd)]
        p = _probabilities(q, k, scale)
        # out = p' v with p' = p in the input dtype: dv = p'^T do, dp = do v^T
        dv = jnp.einsum("gqk,gqd->gkd", p.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp = jnp.einsum("gqd,gkd->gqk", do, v, preferred_element_type=jnp.float32)
        # softmax's backward, then the scaled score product's
        ds = (p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True)) * scale).astype(q.dtype)
        dq = jnp.einsum("gqk,gkd->gqd", ds, k, preferred_element_type=jnp.float32)
        dk = jnp.einsum("gqk,gqd->gkd", ds, q, preferred_element_type=jnp.float32)
        for part, grad in enumerate((dq, dk, dv)):
            dqkv_ref[:, :, _lanes(part, h, channels, hd)] = grad.astype(dqkv_ref.dtype)


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
