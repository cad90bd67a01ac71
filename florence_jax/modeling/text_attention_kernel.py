"""BART's encoder self-attention as one Pallas kernel, attention dropout included (the TPU's
``Formulations.text_attention="fused"``).

Florence-2's text encoder attends over the image tokens and the prompt: 577 + 64 = 641 positions at 768 px,
12 heads of 64 channels (base). Written with einsums, XLA:TPU keeps every head's float32 scores in HBM,
``(batch, heads, 641, 641)``, pads their last dimension to 768 lanes and passes over them several times in
the forward (the score product, the mask, the softmax, the dropout mask, the ``p v`` product) and more in
the backward; the dropout's Threefry hashes add a pass of their own. Compiled for a v5e chip (16 examples),
those passes were the text encoder's costliest ops: 55 of its 99 ms (``docs/scale-out.md``).

Here one kernel takes an example's queries, keys and values for four heads straight from the projections'
outputs, ``(batch, length, heads x head size)`` as they lie in memory, computes each head's scores, masked
softmax, dropout and product on chip, and writes ``(batch, length, heads x head size)``, the output
projection's input. A second kernel computes the backward from the saved inputs (the probabilities and the
dropout mask are recomputed; nothing of size length x length is stored).

The dropout mask is :mod:`florence_jax.modeling.dropout`'s, computed on chip from the same counters: the
kernel and the einsum formulation drop the same probabilities for a key, and their values and gradients
match within rounding (``tests/test_text_attention_kernel.py``). Numerics follow the einsum path: scores and
softmax in float32 (normalized by a reciprocal per row), probabilities rounded to the input dtype before dropout's scaling and the ``p v``
product, which accumulates in float32. A query row with every key masked attends uniformly, as there.

On a platform other than the TPU the kernel runs in Pallas' interpreter (slow; it is how the tests run it).
On a mesh it runs under ``shard_map`` over the batch axes (:func:`florence_jax.sharding.kernel_batch_split`),
each device on its own examples, with its examples' global indices in the dropout counters, so the mask
does not depend on the mesh.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec

from florence_jax import sharding
from florence_jax.modeling.dropout import HEADS_PER_HASH, hash_draws, keep_threshold, threefry_words

# A grid step holds one example's four heads (the heads whose dropout draws share hashes). The backward's
# blocks (7 of length x 4 x head size, double buffered) and its float32 temporaries (length x length, a few)
# are about 20 MB at 641 positions and 64-channel heads: above the 16 MiB a TPU kernel may use by default.
_VMEM_LIMIT = 48 * 2**20


# The longest sequence a grid step holds: a step keeps a few float32 (length x length) score matrices in
# VMEM, and a v4 core has 16 MiB of it. Compiled for v4 with four 64-channel heads per step, the backward
# fits at 704 positions and needs 17.4 MB at 768. Longer sequences take the einsums.
MAX_LENGTH = 704
_MAX_BLOCK = 256  # lanes per step (four heads of 64 channels): the width MAX_LENGTH was compiled at


def supported(heads: int, channels: int, length: int | None = None) -> bool:
    """Whether the kernel takes ``heads`` heads over ``channels`` channels (and sequences of ``length``): heads
    in fours whose channels fill whole 128-lane tiles (or all of them), at most 64 channels per head, at most
    ``MAX_LENGTH`` positions."""
    if channels % heads or heads % HEADS_PER_HASH:
        return False
    block = HEADS_PER_HASH * (channels // heads)
    fits = length is None or length <= MAX_LENGTH
    return (block % 128 == 0 or block == channels) and block <= _MAX_BLOCK and fits


def fused_text_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None, heads: int,
                         scale: float, *, rate: float = 0.0, key: jax.Array | None = None,
                         interpret: bool) -> jax.Array:
    """Softmax attention of ``q`` (batch, queries, heads x head size) over ``k``, ``v`` (batch, keys, heads x
    head size), keys allowed where ``key_mask`` (batch, keys) is nonzero, probabilities dropped with
    probability ``rate`` under ``key`` (a threefry key). The result has ``q``'s layout. ``interpret`` runs
    Pallas' interpreter instead of compiling a TPU kernel."""
    b, lq, c = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2] != c or not supported(heads, c):
        raise ValueError(f"fused text attention needs q (batch, queries, C), k and v (batch, keys, C) with C in "
                         f"{heads} heads taken four at a time in whole 128-lane tiles; got {q.shape}, {k.shape}, "
                         f"{v.shape}")
    lk = k.shape[1]
    if not supported(heads, c, max(lq, lk)):
        raise ValueError(f"fused text attention holds at most {MAX_LENGTH} positions in a TPU core's memory; "
                         f"got {lq} queries and {lk} keys (the einsum formulation takes any length)")
    fn = functools.partial(_attention, heads=heads, scale=scale, rate=rate, interpret=interpret)
    return run_per_device(fn, q, k, v, key_mask, rate, key)


def run_per_device(fn, q, k, v, key_mask, rate, key):
    """``fn(q, k, v, mask, seed)`` for a text attention kernel: ``mask`` (batch, 1, keys) int32, nonzero
    where a key is allowed; ``seed`` three int32 words, the threefry key's two and the index of ``q``'s first
    example in the batch (the dropout counters' offset). On a mesh, under ``shard_map`` over the batch axes
    (:func:`florence_jax.sharding.kernel_batch_split`), each device on its own examples with their global
    indices, so the dropout mask does not depend on the mesh."""
    b, lk = k.shape[0], k.shape[1]
    mask = (jnp.ones((b, 1, lk), jnp.int32) if key_mask is None
            else (key_mask != 0).astype(jnp.int32).reshape(b, 1, lk))
    words = threefry_words(key) if rate > 0.0 and key is not None else None
    if rate > 0.0 and words is None:
        raise ValueError("text attention kernels with dropout need a threefry key")
    seed = jax.lax.bitcast_convert_type(jnp.stack(words), jnp.int32) if words else jnp.zeros((2,), jnp.int32)
    mesh, axes = sharding.kernel_batch_split(q)
    if not axes:
        return fn(q, k, v, mask, jnp.concatenate([seed, jnp.zeros((1,), jnp.int32)]))

    def per_device(q, k, v, mask, seed):
        # the examples' global indices, as the dropout counters of the whole batch have them
        first = jax.lax.axis_index(axes) * q.shape[0]
        return fn(q, k, v, mask, jnp.concatenate([seed, first.astype(jnp.int32)[None]]))

    spec = PartitionSpec(axes)
    return jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec, spec, spec, PartitionSpec()),
                         out_specs=spec, check_vma=False)(q, k, v, mask, seed)


def _attention(q, k, v, mask, seed, *, heads, scale, rate, interpret):
    return _attention_vjp(q, k, v, mask, seed, heads, scale, rate, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _attention_vjp(q, k, v, mask, seed, heads, scale, rate, interpret):
    return _forward(q, k, v, mask, seed, heads, scale, rate, interpret)


def _attention_fwd(q, k, v, mask, seed, heads, scale, rate, interpret):
    return _forward(q, k, v, mask, seed, heads, scale, rate, interpret), (q, k, v, mask, seed)


def _attention_bwd(heads, scale, rate, interpret, saved, d_out):
    q, k, v, mask, seed = saved
    dq, dk, dv = _backward(q, k, v, d_out.astype(q.dtype), mask, seed, heads, scale, rate, interpret)
    return dq, dk, dv, None, None


_attention_vjp.defvjp(_attention_fwd, _attention_bwd)


def _keep_masks(seed_ref, lq, lk, groups, rate):
    """Per head of the step's four, the boolean keep mask (queries, keys), or None without dropout: the
    draws of :func:`florence_jax.modeling.dropout.attention_draws` for this example and head group."""
    if rate <= 0.0:
        return [None] * HEADS_PER_HASH
    threshold, _ = keep_threshold(rate)
    example = (seed_ref[2] + pl.program_id(0)).astype(jnp.uint32)
    group = pl.program_id(1).astype(jnp.uint32)
    query = jax.lax.broadcasted_iota(jnp.int32, (lq, lk), 0).astype(jnp.uint32)
    rows = (example * jnp.uint32(groups) + group) * jnp.uint32(lq) + query
    cols = jax.lax.broadcasted_iota(jnp.int32, (lq, lk), 1).astype(jnp.uint32)
    k1, k2 = (jax.lax.bitcast_convert_type(seed_ref[i], jnp.uint32) for i in range(2))
    draws = hash_draws(k1, k2, rows, cols)
    return [d >= jnp.uint32(threshold) for d in draws]


def _probabilities(q, k, valid, scale):
    """One head's masked softmax over keys, float32 (queries, keys)."""
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
    s = jnp.where(valid, s, jnp.finfo(jnp.float32).min)
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    return p * (1.0 / jnp.sum(p, axis=-1, keepdims=True))  # a reciprocal per row, a product per score


def _dropped(p, keep, keep_prob):
    """Probabilities rounded to the values' dtype, then dropout's mask and scaling, as the einsum path."""
    return p if keep is None else jnp.where(keep, p / jnp.asarray(keep_prob, p.dtype), jnp.zeros_like(p))


def _forward_kernel(seed_ref, mask_ref, q_ref, k_ref, v_ref, o_ref, *, scale, rate, groups):
    lq, lk, hd = q_ref.shape[1], k_ref.shape[1], q_ref.shape[2] // HEADS_PER_HASH
    valid = mask_ref[0] != 0  # (1, keys)
    keeps = _keep_masks(seed_ref, lq, lk, groups, rate)
    _, keep_prob = keep_threshold(rate)
    for h, keep in enumerate(keeps):
        lanes = slice(h * hd, (h + 1) * hd)
        q, k, v = q_ref[0, :, lanes], k_ref[0, :, lanes], v_ref[0, :, lanes]
        p = _dropped(_probabilities(q, k, valid, scale).astype(v.dtype), keep, keep_prob)
        o = jnp.dot(p, v, preferred_element_type=jnp.float32)
        o_ref[0, :, lanes] = o.astype(o_ref.dtype)


def _backward_kernel(seed_ref, mask_ref, q_ref, k_ref, v_ref, do_ref, dq_ref, dk_ref, dv_ref, *, scale, rate,
                     groups):
    lq, lk, hd = q_ref.shape[1], k_ref.shape[1], q_ref.shape[2] // HEADS_PER_HASH
    valid = mask_ref[0] != 0
    keeps = _keep_masks(seed_ref, lq, lk, groups, rate)
    _, keep_prob = keep_threshold(rate)
    t = (((0,), (0,)), ((), ()))  # contract the query axis: a^T b
    for h, keep in enumerate(keeps):
        lanes = slice(h * hd, (h + 1) * hd)
        q, k, v, do = q_ref[0, :, lanes], k_ref[0, :, lanes], v_ref[0, :, lanes], do_ref[0, :, lanes]
        p = _probabilities(q, k, valid, scale)
        # out = d v with d = dropout(p in the values' dtype): dv = d^T do, dd = do v^T
        d = _dropped(p.astype(v.dtype), keep, keep_prob)
        dv = jax.lax.dot_general(d, do, t, preferred_element_type=jnp.float32)
        dd = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        dp = _dropped(dd.astype(v.dtype), keep, keep_prob).astype(jnp.float32)
        # the softmax's backward; masked keys get no gradient (their scores are a constant)
        ds = jnp.where(valid, p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True)) * scale, 0.0).astype(q.dtype)
        dq = jnp.dot(ds, k, preferred_element_type=jnp.float32)
        dk = jax.lax.dot_general(ds, q, t, preferred_element_type=jnp.float32)
        for ref, grad in ((dq_ref, dq), (dk_ref, dk), (dv_ref, dv)):
            ref[0, :, lanes] = grad.astype(ref.dtype)


def _specs(lq, lk, block):
    mask = pl.BlockSpec((1, 1, lk), lambda i, g, seed: (i, 0, 0))
    queries = pl.BlockSpec((1, lq, block), lambda i, g, seed: (i, 0, g))
    keys = pl.BlockSpec((1, lk, block), lambda i, g, seed: (i, 0, g))
    return mask, queries, keys


def _call(kernel, name, outs, ins, q, k, heads, cost, interpret):
    b, lq, c = q.shape
    lk = k.shape[1]
    block = HEADS_PER_HASH * (c // heads)
    groups = heads // HEADS_PER_HASH
    mask_spec, q_spec, k_spec = _specs(lq, lk, block)
    spec_of = {"q": q_spec, "k": k_spec}
    grid = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(b, c // block),
        in_specs=[mask_spec] + [spec_of[kind] for kind, _ in ins[2:]],
        out_specs=[spec_of[kind] for kind, _ in outs])
    return pl.pallas_call(
        functools.partial(kernel, groups=groups), grid_spec=grid,
        out_shape=[jax.ShapeDtypeStruct(shape.shape, shape.dtype) for _, shape in outs],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"),
                                             vmem_limit_bytes=_VMEM_LIMIT),
        cost_estimate=cost, interpret=interpret, name=name,
    )(*[x for _, x in ins])


def _cost(q, k, heads, matmuls, passes):
    b, lq, c = q.shape
    lk = k.shape[1]
    return pl.CostEstimate(flops=2 * matmuls * b * lq * lk * c, transcendentals=b * heads * lq * lk,
                           bytes_accessed=q.dtype.itemsize * passes * b * max(lq, lk) * c)


def _forward(q, k, v, mask, seed, heads, scale, rate, interpret):
    kernel = functools.partial(_forward_kernel, scale=scale, rate=rate)
    (out,) = _call(kernel, "text_attention_fwd", [("q", q)],
                   [("seed", seed), ("mask", mask), ("q", q), ("k", k), ("k", v)],
                   q, k, heads, _cost(q, k, heads, 2, 4), interpret)
    return out


def _backward(q, k, v, d_out, mask, seed, heads, scale, rate, interpret):
    kernel = functools.partial(_backward_kernel, scale=scale, rate=rate)
    return tuple(_call(kernel, "text_attention_bwd", [("q", q), ("k", k), ("k", v)],
                       [("seed", seed), ("mask", mask), ("q", q), ("k", k), ("k", v), ("q", d_out)],
                       q, k, heads, _cost(q, k, heads, 5, 7), interpret))


__all__ = ["fused_text_attention", "run_per_device", "supported"]
