"""DaViT's window attention as flash-attention kernels for GPUs (``Formulations.window_attention="flash"``).

Written with einsums, XLA:GPU writes each window's float32 scores to HBM, reads them back for the softmax,
writes the probabilities and reads them again for the ``p v`` product (cuBLAS or Triton products around a
softmax fusion). Compiled for an H100 (``scripts.aot_compile --topology h100 --cost``), the window attention
was a fifth of the frozen base step's roofline estimate at batch 32, 17.8 of 88.6 ms, and 4.6 ms through a
flash kernel (docs/scale-out.md). Here each window goes through the project's flash-attention kernels
(:mod:`florence_jax.modeling.flash_attention`, Pallas' Triton dialect): scores and probabilities stay on
chip, blocks of 16 queries against blocks of 16 keys (a window's 144 tokens are nine of them; Triton's tiles
are powers of two). The kernels read q, k and v where the qkv projection wrote them, a
``(windows, tokens, 3, heads, head size)`` view of its output; the forward saves each row's softmax
statistics, and the backward's dk/dv and dq kernels write the gradient of that output as one buffer, with
no copy of q, k or v, no second forward and no concatenation of dq, dk and dv.

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
from florence_jax.modeling import flash_attention

# Query and key block of the kernels: a power of two (Triton's tiles), at least 16 (its products' smallest
# tile), dividing the window's tokens. 144 = 9 x 16.
BLOCK = 16


def supported(tokens: int, head_dim: int) -> bool:
    """Whether the kernels take windows of ``tokens`` tokens with heads of ``head_dim`` channels."""
    return tokens % BLOCK == 0 and flash_attention.head_dim_supported(head_dim)


def flash_window_attention(qkv: jax.Array, heads: int, scale: float, *, interpret: bool) -> jax.Array:
    """Softmax attention inside each window: ``qkv`` is ``(windows, tokens, 3 * C)`` in the qkv projection's
    order (q, k, v, each heads x head size), the result ``(windows, tokens, C)`` in heads x head size order.
    ``interpret`` runs Pallas' interpreter instead of compiling the GPU kernels."""
    w, n, c3 = qkv.shape
    if c3 % (3 * heads) or not supported(n, c3 // (3 * heads)):
        raise ValueError(f"flash window attention takes (windows, tokens, 3 * heads * head_dim) with tokens a "
                         f"multiple of {BLOCK} and head_dim a power of two >= 16; got {qkv.shape} with {heads} heads")
    # windows are image-major: split as the batch is, each device's windows are its own images'
    return sharding.per_batch_shard(lambda t: _attention(t, heads, scale, interpret), qkv)


def _attention(qkv, heads, scale, interpret):
    w, n, c3 = qkv.shape
    out = _flash(qkv.reshape(w, n, 3, heads, c3 // (3 * heads)), scale, interpret)
    return out.reshape(w, n, c3 // 3)


def _options(view, scale, interpret):
    return dict(scale=scale, rate=0.0, length=view.shape[1], block=BLOCK, name="window", interpret=interpret)


def _forward(view, scale, interpret):
    # a forward program per head (the text kernels take four, for their shared dropout hash)
    return flash_attention.forward((view, 0), (view, 1), (view, 2), None, None, group=1,
                                   **_options(view, scale, interpret))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _flash(view, scale, interpret):
    return _forward(view, scale, interpret)[0]


def _flash_fwd(view, scale, interpret):
    out, m, r, _ = _forward(view, scale, interpret)
    return out, (view, out, m, r)


def _flash_bwd(scale, interpret, saved, d_out):
    view, out, m, r = saved
    return (flash_attention.backward((view, 0), (view, 1), (view, 2), out, d_out, None, m, r, None,
                                     packed=True, **_options(view, scale, interpret)),)


_flash.defvjp(_flash_fwd, _flash_bwd)
