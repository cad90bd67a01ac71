"""DaViT's window attention as a flash-attention kernel for GPUs (``Formulations.window_attention="flash"``).

Written with einsums, XLA:GPU writes each window's float32 scores to HBM, reads them back for the softmax,
writes the probabilities and reads them again for the ``p v`` product (cuBLAS or Triton products around a
softmax fusion). Compiled for an H100 (``scripts.aot_compile --topology h100 --cost``), the window attention
was a fifth of the frozen base step's roofline estimate at batch 32, 17.8 of 88.6 ms, and 4.6 ms through this
kernel; the full step's estimate fell from 267 to 188 ms (docs/scale-out.md). Here each window's
queries, keys and values go through JAX's Pallas flash-attention kernel for GPUs
(``jax.experimental.pallas.ops.gpu.attention``, written in Pallas' Triton dialect): scores and probabilities
stay on chip, blocks of 16 queries against blocks of 16 keys (a window's 144 tokens are nine of them; the
kernel's blocks must be powers of two that divide the tokens). The forward runs the library's kernel under
our own ``pallas_call``, which hands it each head's q, k and v where the qkv projection wrote them (the
library's ``mha`` takes them as three arrays, which would be copies). The backward is the library's, on
slices of the saved qkv: its forward again, for the softmax's log-sum-exp it saves, then its dq and dk/dv
kernels.

Numerics follow the einsum path within rounding: scores and softmax in float32, products accumulated in
float32, the softmax's numerators rounded to the input dtype for the ``p v`` product and the rows divided
by their sums after it (``tests/test_flash_window.py`` bounds the difference, forward and gradient).

A Triton kernel cannot be split by XLA's partitioner, so on a mesh it runs under ``shard_map`` over the
batch axes, as the TPU's kernel does (:func:`florence_jax.sharding.per_batch_shard`). Off a GPU it runs in
Pallas' interpreter (slow; how the tests run it).
"""

from __future__ import annotations

import functools

import jax

from florence_jax import sharding
from florence_jax.modeling.layers import with_gradient_of

# Query and key block of the kernel: a power of two (Triton's tiles), at least 16 (its products' smallest
# tile), dividing the window's tokens. 144 = 9 x 16.
BLOCK = 16


def supported(tokens: int, head_dim: int) -> bool:
    """Whether the kernel takes windows of ``tokens`` tokens with heads of ``head_dim`` channels."""
    return tokens % BLOCK == 0 and head_dim >= 16 and head_dim & (head_dim - 1) == 0


def flash_window_attention(qkv: jax.Array, heads: int, scale: float, *, interpret: bool) -> jax.Array:
    """Softmax attention inside each window: ``qkv`` is ``(windows, tokens, 3 * C)`` in the qkv projection's
    order (q, k, v, each heads x head size), the result ``(windows, tokens, C)`` in heads x head size order.
    ``interpret`` runs Pallas' interpreter instead of compiling the GPU kernel."""
    w, n, c3 = qkv.shape
    if c3 % (3 * heads) or not supported(n, c3 // (3 * heads)):
        raise ValueError(f"flash window attention takes (windows, tokens, 3 * heads * head_dim) with tokens a "
                         f"multiple of {BLOCK} and head_dim a power of two >= 16; got {qkv.shape} with {heads} heads")
    # windows are image-major: split as the batch is, each device's windows are its own images'
    return sharding.per_batch_shard(lambda t: _attention(t, heads, scale, interpret), qkv)


def _sliced(qkv, heads, scale, interpret):
    """The library's ``mha`` on q, k and v sliced out of ``qkv`` (copies): its forward and backward kernels."""
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention

    w, n, c3 = qkv.shape
    blocks = pallas_attention.BlockSizes(block_q=BLOCK, block_k=BLOCK, block_q_dkv=BLOCK, block_kv_dkv=BLOCK,
                                         block_q_dq=BLOCK, block_kv_dq=BLOCK)
    q, k, v = (qkv.reshape(w, n, 3, heads, c3 // (3 * heads))[:, :, i] for i in range(3))
    out = pallas_attention.mha(q, k, v, None, sm_scale=scale, block_sizes=blocks, interpret=interpret)
    return out.reshape(w, n, c3 // 3)


def _in_place(qkv, heads, scale, interpret):
    """The library's forward kernel reading each head's q, k and v where the projection wrote them: ``qkv``
    viewed as (windows, tokens, 3 x heads, head size) and passed three times, each with its own block of
    heads, so no copy of q, k or v is made (the library's ``mha`` takes them as separate arrays)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention

    w, n, c3 = qkv.shape
    d = c3 // (3 * heads)
    view = qkv.reshape(w, n, 3 * heads, d)
    kernel = functools.partial(pallas_attention.mha_forward_kernel, sm_scale=scale, causal=False, block_q=BLOCK,
                               block_k=BLOCK, head_dim=d)
    out = pl.pallas_call(
        kernel,
        grid=(n // BLOCK, w, heads),
        in_specs=[pl.BlockSpec((None, BLOCK, None, d), lambda i, j, h: (j, i, h, 0)),
                  pl.BlockSpec((None, n, None, d), lambda i, j, h: (j, 0, heads + h, 0)),
                  pl.BlockSpec((None, n, None, d), lambda i, j, h: (j, 0, 2 * heads + h, 0)),
                  None],
        out_specs=pl.BlockSpec((None, BLOCK, None, d), lambda i, j, h: (j, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct((w, n, heads, d), qkv.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="window_flash_forward",
    )(view, view, view, None)
    return out.reshape(w, n, heads * d)


def _attention(qkv, heads, scale, interpret):
    """The forward reads qkv in place; the backward is the library's (its forward again, for the softmax's
    log-sum-exp it saves, then its dq and dk/dv kernels), on slices of the saved qkv."""
    return with_gradient_of(lambda t: _in_place(t, heads, scale, interpret),
                            lambda t: _sliced(t, heads, scale, interpret))(qkv)
