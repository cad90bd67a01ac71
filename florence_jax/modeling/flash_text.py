"""BART's encoder self-attention as flash-attention kernels for GPUs, attention dropout included
(``Formulations.text_attention="flash"``).

Florence-2's text encoder attends over the image tokens and the prompt: 577 + 64 = 641 positions at 768 px,
12 heads of 64 channels (base). Written with einsums, XLA:GPU writes each head's float32 scores, ``(batch,
heads, 641, 641)``, to HBM and passes over them and the dropout mask several times per layer, forward and
backward: compiled for an H100 (``scripts.aot_compile --topology h100 --cost``), 22.3 ms of the frozen base
step's 75.3 ms roofline estimate at batch 32 (``docs/scale-out.md``).

Here three Pallas kernels in Pallas' Triton dialect keep the scores on chip:

- the forward: a program per block of queries, example and group of four heads (the heads whose dropout
  draws share a hash, :mod:`florence_jax.modeling.dropout`) runs over the keys in blocks with an online
  softmax (FlashAttention's), computes the dropout draws of each block from the same counters as the einsum
  formulation (so both drop the same probabilities for a key), and writes the output, each row's maximum
  and the reciprocal of its sum, and the four heads' keep bits, one byte per query and key;
- the backward's dk/dv kernel (a program per block of keys, example and head) and dq kernel (per block of
  queries) recompute the probabilities from the row statistics and read the keep bits instead of hashing
  again: a byte per query, key and head group is 43 MB a layer at batch 32 (672 padded positions), where
  a second and third Threefry pass would cost about 130 integer operations per draw.

Numerics follow the einsum path within rounding: scores and softmax in float32 (base 2: ``exp2`` of the
scores times ``log2 e``), the numerators rounded to the values' dtype for the ``p v`` product, which
accumulates in float32, the rows divided by their sums and the keep probability after it. A query row with
every key masked attends uniformly, as there. ``tests/test_text_attention_kernel.py`` bounds the difference to the
einsum formulation, forward and gradient, with and without dropout.

Sequences are padded to whole blocks (``BLOCK``) inside the call; padded keys get no probability and
padded queries are dropped. A Triton kernel cannot be split by XLA's partitioner, so on a mesh the kernels
run under ``shard_map`` over the batch axes (each device on its own examples, their global indices in the
dropout counters, as the TPU kernel does). Off a GPU they run in Pallas' interpreter (slow; how the tests
run them).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from florence_jax.modeling import text_attention_kernel
from florence_jax.modeling.dropout import HEADS_PER_HASH, hash_draws, keep_threshold

# Query and key block of the kernels: a power of two (Triton's tiles), at least 16 (its products' smallest
# tile). 641 positions pad to 672.
BLOCK = 32
_LOG2E = math.log2(math.e)
# a masked key's score (base 2): the einsum formulation's floor, far below any real score, equal for all
_MASKED = float(jnp.finfo(jnp.float32).min)


def supported(heads: int, channels: int) -> bool:
    """Whether the kernels take ``heads`` heads over ``channels`` channels: heads in fours (the dropout
    draws' groups) of a power-of-two head size of at least 16 channels (Triton's tiles)."""
    if channels % heads or heads % HEADS_PER_HASH:
        return False
    d = channels // heads
    return d >= 16 and d & (d - 1) == 0


def _rotl(x, r):
    return (x << jnp.uint32(r)) | (x >> jnp.uint32(32 - r))


def threefry2x32(k1, k2, x0, x1):
    """Threefry-2x32 (20 rounds) of counters ``(x0, x1)`` under key ``(k1, k2)``, in uint32 array
    operations that Pallas' Triton lowering takes (it has no rule for ``threefry2x32_p``); the same bits as
    ``jax.random``'s hash (tested)."""
    ks = (k1, k2, k1 ^ k2 ^ jnp.uint32(0x1BD11BDA))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for i in range(5):
        for r in ((13, 15, 26, 6), (17, 29, 16, 24))[i % 2]:
            x0 = x0 + x1
            x1 = _rotl(x1, r) ^ x0
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
    return x0, x1


def _keep_bits(k1, k2, rows, cols, threshold):
    """The four heads' keep decisions of a group, packed as bits 0..3 of a uint8: the draws of
    :func:`florence_jax.modeling.dropout.hash_draws`, head ``4g + j`` kept when its draw >= ``threshold``."""
    t = jnp.uint32(threshold)
    bits = jnp.zeros(rows.shape, jnp.uint32)
    for j, draw in enumerate(hash_draws(k1, k2, rows, cols, threefry=threefry2x32)):
        bits = bits | jnp.where(draw >= t, jnp.uint32(1 << j), jnp.uint32(0))
    return bits.astype(jnp.uint8)


def _kept(bits, j):
    return ((bits.astype(jnp.int32) >> j) & 1) != 0


def _scores(q, k, valid, scale):
    """Base-2 scores of a (queries, keys) block: masked keys at the einsum formulation's floor, the padding
    past the sequence at -inf, so that it gets no probability even in a row whose keys are all masked.
    ``valid`` is (in the sequence, allowed by the mask), per key."""
    from jax.experimental.pallas import triton as plgpu

    s = plgpu.dot(q, k, trans_b=True) * (scale * _LOG2E)
    in_range, allowed = valid
    s = jnp.where(allowed[None, :], s, _MASKED)
    return jnp.where(in_range[None, :], s, -jnp.inf)


def _key_validity(valid_ref, start, length):
    cols = start + jnp.arange(BLOCK)
    return cols < length, valid_ref[pl.ds(start, BLOCK)] != 0


def _forward_kernel(seed_ref, valid_ref, q_ref, k_ref, v_ref, o_ref, m_ref, r_ref, *bits_ref, scale, threshold,
                    keep_prob, length, groups):
    from jax.experimental.pallas import triton as plgpu

    i, b, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    padded = k_ref.shape[0]
    qs = [q_ref[:, j, :] for j in range(HEADS_PER_HASH)]
    d = qs[0].shape[-1]
    dropout = bool(bits_ref)
    if dropout:
        k1, k2 = (jax.lax.bitcast_convert_type(seed_ref[n], jnp.uint32) for n in range(2))
        example = (seed_ref[2] + b).astype(jnp.uint32)
        query = (i * BLOCK + jnp.arange(BLOCK)).astype(jnp.uint32)
        rows = (example * jnp.uint32(groups) + g.astype(jnp.uint32)) * jnp.uint32(length) + query

    def body(n, carry):
        start = n * BLOCK
        valid = _key_validity(valid_ref, start, length)
        if dropout:
            cols = (start + jnp.arange(BLOCK)).astype(jnp.uint32)
            bits = _keep_bits(k1, k2, jnp.broadcast_to(rows[:, None], (BLOCK, BLOCK)),
                              jnp.broadcast_to(cols[None, :], (BLOCK, BLOCK)), threshold)
            plgpu.store(bits_ref[0].at[:, pl.ds(start, BLOCK)], bits)
        out = []
        for j, (acc, m, s_sum) in enumerate(carry):
            k = k_ref[pl.ds(start, BLOCK), j, :]
            v = v_ref[pl.ds(start, BLOCK), j, :]
            s = _scores(qs[j], k, valid, scale)
            m_next = jnp.maximum(m, jnp.max(s, axis=1))
            correction = jnp.exp2(m - m_next)
            p = jnp.exp2(s - m_next[:, None])
            s_sum = s_sum * correction + jnp.sum(p, axis=1)
            if dropout:
                p = jnp.where(_kept(bits, j), p, 0.0)
            acc = acc * correction[:, None] + plgpu.dot(p.astype(v.dtype), v)
            out.append((acc, m_next, s_sum))
        return tuple(out)

    init = tuple((jnp.zeros((BLOCK, d), jnp.float32), jnp.full((BLOCK,), -jnp.inf, jnp.float32),
                  jnp.zeros((BLOCK,), jnp.float32)) for _ in range(HEADS_PER_HASH))
    carry = jax.lax.fori_loop(0, padded // BLOCK, body, init)
    for j, (acc, m, s_sum) in enumerate(carry):
        o_ref[:, j, :] = (acc / (s_sum * keep_prob)[:, None]).astype(o_ref.dtype)
        # the row's maximum and the reciprocal of its sum, apart: m + log2(sum) rounds to m when every key is
        # masked (m is then the masked score, -3.4e38)
        m_ref[j, :] = m
        r_ref[j, :] = 1.0 / s_sum


def _probabilities(q, k, m, r, valid, scale):
    """A block's probabilities again, from the row's maximum ``m`` and the reciprocal ``r`` of its sum."""
    return jnp.exp2(_scores(q, k, valid, scale) - m[:, None]) * r[:, None]


def _dropped_grad(p, do, v, bits, j, keep_prob):
    """``a`` (the dropped, scaled probabilities) and ``da``'s part through the mask: ``dp = keep * do v^T /
    keep_prob``."""
    from jax.experimental.pallas import triton as plgpu

    dp = plgpu.dot(do, v, trans_b=True)
    if bits is None:
        return p, dp
    keep = _kept(bits, j)
    return jnp.where(keep, p, 0.0) / keep_prob, jnp.where(keep, dp, 0.0) / keep_prob


def _score_grad(p, dp, delta, valid, scale):
    """The softmax's backward, ``p (dp - delta)`` times the scale; masked keys get none (their scores are a
    constant), which matters in a row whose keys are all masked."""
    return jnp.where(valid[1][None, :], p * (dp - delta[:, None]) * scale, 0.0)


def _dkv_kernel(valid_ref, q_ref, k_ref, v_ref, do_ref, m_ref, r_ref, delta_ref, *refs, scale, keep_prob,
                length):
    from jax.experimental.pallas import triton as plgpu

    *bits_ref, dk_ref, dv_ref = refs
    j = pl.program_id(2) % HEADS_PER_HASH
    start_k = pl.program_id(0) * BLOCK
    k, v = k_ref[...], v_ref[...]
    valid = _key_validity(valid_ref, start_k, length)

    def body(n, carry):
        dk, dv = carry
        rows = pl.ds(n * BLOCK, BLOCK)
        q, do = q_ref[rows, :], do_ref[rows, :]
        p = _probabilities(q, k, m_ref[rows], r_ref[rows], valid, scale)
        bits = bits_ref[0][rows, :] if bits_ref else None
        a, dp = _dropped_grad(p, do, v, bits, j, keep_prob)
        dv = dv + plgpu.dot(a.astype(do.dtype), do, trans_a=True)
        ds = _score_grad(p, dp, delta_ref[rows], valid, scale)
        dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, q_ref.shape[0] // BLOCK, body, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(valid_ref, q_ref, k_ref, v_ref, do_ref, m_ref, r_ref, delta_ref, *refs, scale, keep_prob,
               length):
    from jax.experimental.pallas import triton as plgpu

    *bits_ref, dq_ref = refs
    j = pl.program_id(2) % HEADS_PER_HASH
    q, do, m, r, delta = q_ref[...], do_ref[...], m_ref[...], r_ref[...], delta_ref[...]

    def body(n, dq):
        start = n * BLOCK
        cols = pl.ds(start, BLOCK)
        k, v = k_ref[cols, :], v_ref[cols, :]
        valid = _key_validity(valid_ref, start, length)
        p = _probabilities(q, k, m, r, valid, scale)
        bits = bits_ref[0][:, cols] if bits_ref else None
        _, dp = _dropped_grad(p, do, v, bits, j, keep_prob)
        ds = _score_grad(p, dp, delta, valid, scale)
        return dq + plgpu.dot(ds.astype(k.dtype), k)

    dq = jax.lax.fori_loop(0, k_ref.shape[0] // BLOCK, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


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
    runs the kernels on (batch, padded, heads, head size) views."""
    b, length, c = q.shape
    padded = -(-length // BLOCK) * BLOCK
    pad = ((0, 0), (0, padded - length), (0, 0))
    views = [jnp.pad(x, pad).reshape(b, padded, heads, c // heads) for x in (q, k, v)]
    mask = jnp.pad(mask.reshape(b, length), ((0, 0), (0, padded - length)))
    seed = jnp.concatenate([seed, jnp.zeros((1,), jnp.int32)])  # four words: k1, k2, the first example, 0
    out = _flash(*views, mask, seed, scale, rate, length, interpret)
    return out.reshape(b, padded, c)[:, :length]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _flash(q, k, v, mask, seed, scale, rate, length, interpret):
    return _forward(q, k, v, mask, seed, scale, rate, length, interpret)[0]


def _flash_fwd(q, k, v, mask, seed, scale, rate, length, interpret):
    out, m, r, bits = _forward(q, k, v, mask, seed, scale, rate, length, interpret)
    return out, (q, k, v, mask, out, m, r, bits)


def _flash_bwd(scale, rate, length, interpret, saved, d_out):
    q, k, v, mask, out, m, r, bits = saved
    d_out = d_out.astype(q.dtype)
    # each row's sum of dO * O: the softmax's backward term (the dropout's mask and scaling are in O)
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), d_out.astype(jnp.float32))
    dq, dk, dv = _backward(q, k, v, d_out, mask, m, r, delta, bits, scale, rate, length, interpret)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _params(interpret):
    from jax.experimental.pallas import triton as plgpu

    return None if interpret else plgpu.CompilerParams(num_warps=4, num_stages=2)


def _forward(q, k, v, mask, seed, scale, rate, length, interpret):
    """(out, each row's maximum, the reciprocal of its sum, keep bits or None) of the padded views."""
    b, padded, heads, d = q.shape
    groups = heads // HEADS_PER_HASH
    threshold, keep_prob = keep_threshold(rate)
    dropout = rate > 0.0
    group = (None, BLOCK, HEADS_PER_HASH, d)
    whole = (None, padded, HEADS_PER_HASH, d)
    rows = pl.BlockSpec((None, HEADS_PER_HASH, BLOCK), lambda i, e, g: (e, g, i))
    out_specs = [pl.BlockSpec(group, lambda i, e, g: (e, i, g, 0)), rows, rows]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)] + [jax.ShapeDtypeStruct((b, heads, padded), jnp.float32)] * 2
    if dropout:
        out_specs.append(pl.BlockSpec((None, None, BLOCK, padded), lambda i, e, g: (e, g, i, 0)))
        out_shape.append(jax.ShapeDtypeStruct((b, groups, padded, padded), jnp.uint8))
    kernel = functools.partial(_forward_kernel, scale=scale, threshold=threshold, keep_prob=keep_prob,
                               length=length, groups=groups)
    outs = pl.pallas_call(
        kernel, grid=(padded // BLOCK, b, groups),
        in_specs=[pl.BlockSpec((4,), lambda i, e, g: (0,)),
                  pl.BlockSpec((None, padded), lambda i, e, g: (e, 0)),
                  pl.BlockSpec(group, lambda i, e, g: (e, i, g, 0)),
                  pl.BlockSpec(whole, lambda i, e, g: (e, 0, g, 0)),
                  pl.BlockSpec(whole, lambda i, e, g: (e, 0, g, 0))],
        out_specs=out_specs, out_shape=out_shape, compiler_params=_params(interpret), interpret=interpret,
        name="text_flash_forward",
    )(seed, mask, q, k, v)
    return outs[0], outs[1], outs[2], outs[3] if dropout else None


def _backward(q, k, v, d_out, mask, m, r, delta, bits, scale, rate, length, interpret):
    b, padded, heads, d = q.shape
    _, keep_prob = keep_threshold(rate)
    block = pl.BlockSpec((None, BLOCK, None, d), lambda i, e, h: (e, i, h, 0))
    whole = pl.BlockSpec((None, padded, None, d), lambda i, e, h: (e, 0, h, 0))
    rows = pl.BlockSpec((None, None, padded), lambda i, e, h: (e, h, 0))
    row_block = pl.BlockSpec((None, None, BLOCK), lambda i, e, h: (e, h, i))
    valid = pl.BlockSpec((None, padded), lambda i, e, h: (e, 0))
    grid = (padded // BLOCK, b, heads)
    options = dict(scale=scale, keep_prob=keep_prob, length=length)
    dropout = bits is not None
    extra = [bits] if dropout else []
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, **options), grid=grid,
        in_specs=[valid, whole, block, block, whole, rows, rows, rows]
        + ([pl.BlockSpec((None, None, padded, BLOCK), lambda i, e, h: (e, h // HEADS_PER_HASH, 0, i))]
           if dropout else []),
        out_specs=[block, block], out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
        compiler_params=_params(interpret), interpret=interpret, name="text_flash_dkv",
    )(mask, q, k, v, d_out, m, r, delta, *extra)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **options), grid=grid,
        in_specs=[valid, block, whole, whole, block, row_block, row_block, row_block]
        + ([pl.BlockSpec((None, None, BLOCK, padded), lambda i, e, h: (e, h // HEADS_PER_HASH, i, 0))]
           if dropout else []),
        out_specs=block, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(interpret), interpret=interpret, name="text_flash_dq",
    )(mask, q, k, v, d_out, m, r, delta, *extra)
    return dq, dk, dv


__all__ = ["BLOCK", "flash_text_attention", "supported", "threefry2x32"]
