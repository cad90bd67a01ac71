"""BART's encoder self-attention as flash-attention kernels for GPUs, attention dropout included
(``Formulations.text_attention="flash"``).

Florence-2's text encoder attends over the image tokens and the prompt: 577 + 64 = 641 positions at 768 px,
12 heads of 64 channels (base). Written with einsums, XLA:GPU writes each head's float32 scores, ``(batch,
heads, 641, 641)``, to HBM and passes over them and the dropout mask several times per layer, forward and
backward: compiled for an H100 (``scripts.aot_compile --topology h100 --cost``), 22.3 ms of the frozen base
step's 75.3 ms roofline estimate at batch 32 (``docs/scale-out.md``).

Here the project's flash-attention kernels (:mod:`florence_jax.modeling.flash_attention`, Pallas' Triton
dialect) keep the scores on chip: the forward runs a block of queries of one example against blocks of keys
for the four heads whose dropout draws share a hash (:mod:`florence_jax.modeling.dropout`), draws the same
probabilities as the einsum formulation and keeps its decisions as a byte per query and key (43 MB a layer
at batch 32, 672 padded positions); the backward's dk/dv and dq kernels read those bytes instead of hashing
again.

Numerics follow the einsum path within rounding (``flash_attention``'s account);
``tests/test_text_attention_kernel.py`` bounds the difference to the einsum formulation, forward and
gradient, with and without dropout.

Sequences are padded to whole blocks (``BLOCK``) inside the call; padded keys get no probability and
padded queries are dropped. A Triton kernel cannot be split by XLA's partitioner, so on a mesh the kernels
run under ``shard_map`` over the batch axes (each device on its own examples, their global indices in the
dropout counters, as the TPU kernel does). Off a GPU they run in Pallas' interpreter (slow; how the tests
run them).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from florence_jax.modeling import flash_attention, text_attention_kernel
from florence_jax.modeling.dropout import HEADS_PER_HASH

# Query and key block of the kernels: a power of two (Triton's tiles), at least 16 (its products' smallest
# tile). 641 positions pad to 672.
BLOCK = 32


def supported(heads: int, channels: int) -> bool:
    """Whether the kernels take ``heads`` heads over ``channels`` channels: heads in fours (the dropout
    draws' groups) of a power-of-two head size of at least 16 channels (Triton's tiles)."""
    if channels % heads or heads % HEADS_PER_HASH:
        return False
    return flash_attention.head_dim_supported(channels // heads)


def flash_text_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None, heads: int,
                         scale: float, *, rate: float = 0.0, key: jax.Array | None = None,
                         interpret: bool) -> jax.Array:
    """Softmax attention of ``q`` (batch, length, heads x head size) over ``k``, ``v`` (the same shape), keys
    allowed where ``key_mask`` (batch, length) is nonzero, probabilities dropped with probability ``rate``
    under ``key`` (a threefry key). The result has ``q``'s layout. ``interpret`` runs Pallas' interpreter
    instead of compiling the GPU kernels."""
    if q.shape != k.shape or k.shape != v.shape or not supported(heads, q.shape[2]):
        raise ValueError(f"flash text attention needs q, k and v of one shape (batch, length, C), C in heads "
                         f"taken four at a time of a power-of-two head size >= 16; got {q.shape}, {k.shape}, "
                         f"{v.shape} with {heads} heads")
    fn = functools.partial(_attention, heads=heads, scale=scale, rate=rate, interpret=interpret)
    return text_attention_kernel.run_per_device(fn, q, k, v, key_mask, rate, key)


def _attention(q, k, v, mask, seed, *, heads, scale, rate, interpret):
    """Pads the sequence to whole blocks (padded keys masked off by position, padded queries dropped) and
    runs the kernels on (batch, padded, 1, heads, head size) views."""
    b, length, c = q.shape
    padded = -(-length // BLOCK) * BLOCK
    pad = ((0, 0), (0, padded - length), (0, 0))
    views = [jnp.pad(x, pad).reshape(b, padded, 1, heads, c // heads) for x in (q, k, v)]
    mask = jnp.pad(mask.reshape(b, length), ((0, 0), (0, padded - length)))
    seed = jnp.concatenate([seed, jnp.zeros((1,), jnp.int32)])  # four words: k1, k2, the first example, 0
    out = _flash(*views, mask, seed, scale, rate, length, interpret)
    return out.reshape(b, padded, c)[:, :length]


def _options(scale, rate, length, interpret):
    return dict(scale=scale, rate=rate, length=length, block=BLOCK, name="text", interpret=interpret)


def forward(q, k, v, mask, seed, scale, rate, length, interpret):
    """The forward kernel on (batch, padded, 1, heads, head size) views: (out, row maxima, reciprocal sums,
    keep bits or None)."""
    return flash_attention.forward((q, 0), (k, 0), (v, 0), mask, seed, group=HEADS_PER_HASH,
                                   **_options(scale, rate, length, interpret))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _flash(q, k, v, mask, seed, scale, rate, length, interpret):
    return forward(q, k, v, mask, seed, scale, rate, length, interpret)[0]


def _flash_fwd(q, k, v, mask, seed, scale, rate, length, interpret):
    out, m, r, bits = forward(q, k, v, mask, seed, scale, rate, length, interpret)
    return out, (q, k, v, mask, out, m, r, bits)


def _flash_bwd(scale, rate, length, interpret, saved, d_out):
    q, k, v, mask, out, m, r, bits = saved
    dq, dk, dv = flash_attention.backward((q, 0), (k, 0), (v, 0), out, d_out, mask, m, r, bits,
                                          **_options(scale, rate, length, interpret))
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


__all__ = ["BLOCK", "flash_text_attention", "forward", "supported"]
