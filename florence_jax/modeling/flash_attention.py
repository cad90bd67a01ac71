"""The project's flash-attention kernels for GPUs, in Pallas' Triton dialect: BART's encoder self-attention
with its dropout (:mod:`florence_jax.modeling.flash_text`) and DaViT's window attention
(:mod:`florence_jax.modeling.flash_window`).

Three kernels keep the scores on chip:

- the forward: a program per block of queries, example and group of heads runs over the keys in blocks
  with an online softmax (FlashAttention's) and writes the output, each row's maximum and the reciprocal of
  its sum; with dropout, the group is the four heads whose draws share a hash
  (:mod:`florence_jax.modeling.dropout`): it computes each block's draws from the same counters as the einsum
  formulation (so both drop the same probabilities for a key) and writes the four heads' keep decisions as
  one byte per query and key;
- the backward's dk/dv kernel (a program per block of keys, example and head) and dq kernel (per block of
  queries) recompute the probabilities from the row statistics and read the keep bits instead of hashing
  again (a second and third Threefry pass would cost about 130 integer operations per draw).

q, k and v are read where they lie: each is a ``part`` of a ``(batch, length, parts, heads, head size)``
array, so the window attention's one qkv projection output is handed over three times, uncopied, and its
backward writes dq, dk and dv into one buffer of that layout (the dq kernel writes into the dk/dv kernel's
output, aliased), the gradient of the projection's output as it is.

Numerics follow the einsum path within rounding: scores and softmax in float32 (base 2: ``exp2`` of the
scores times ``log2 e``), the numerators rounded to the values' dtype for the ``p v`` product, which
accumulates in float32, the rows divided by their sums and the keep probability after it. A query row with
every key masked attends uniformly, as there. Keys past ``length`` (padding to whole blocks) get no
probability, even in such a row. Off a GPU the kernels run in Pallas' interpreter (slow; how the tests run
them).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from florence_jax.modeling.dropout import HEADS_PER_HASH, hash_draws, keep_threshold

_LOG2E = math.log2(math.e)
# a masked key's score (base 2): the einsum formulation's floor, far below any real score, equal for all
_MASKED = float(jnp.finfo(jnp.float32).min)


def head_dim_supported(d: int) -> bool:
    """Triton's tiles: a power of two, its products' at least 16."""
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


class _Keys:
    """Which keys of a block count: those inside the sequence (``length``: the rest is padding to whole
    blocks) and, with a mask, those it allows."""

    def __init__(self, valid_ref, block, length, padded):
        self.valid_ref, self.block, self.length, self.padded = valid_ref, block, length, padded

    def at(self, start):
        """(in the sequence or None when nothing is padded, allowed by the mask or None without one)."""
        in_range = start + jnp.arange(self.block) < self.length if self.length < self.padded else None
        allowed = self.valid_ref[pl.ds(start, self.block)] != 0 if self.valid_ref is not None else None
        return in_range, allowed


def _scores(q, k, valid, scale):
    """Base-2 scores of a (queries, keys) block: masked keys at the einsum formulation's floor, the padding
    past the sequence at -inf, so that it gets no probability even in a row whose keys are all masked."""
    from jax.experimental.pallas import triton as plgpu

    s = plgpu.dot(q, k, trans_b=True) * (scale * _LOG2E)
    in_range, allowed = valid
    if allowed is not None:
        s = jnp.where(allowed[None, :], s, _MASKED)
    if in_range is not None:
        s = jnp.where(in_range[None, :], s, -jnp.inf)
    return s


def _forward_kernel(*refs, scale, threshold, keep_prob, length, block, groups, has_mask, dropout):
    from jax.experimental.pallas import triton as plgpu

    refs = list(refs)
    seed_ref = refs.pop(0) if dropout else None
    valid_ref = refs.pop(0) if has_mask else None
    q_ref, k_ref, v_ref, o_ref, m_ref, r_ref, *bits_ref = refs
    i, b, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    padded = k_ref.shape[0]
    group = q_ref.shape[1]
    qs = [q_ref[:, j, :] for j in range(group)]
    d = qs[0].shape[-1]
    keys = _Keys(valid_ref, block, length, padded)
    if dropout:
        k1, k2 = (jax.lax.bitcast_convert_type(seed_ref[n], jnp.uint32) for n in range(2))
        example = (seed_ref[2] + b).astype(jnp.uint32)
        query = (i * block + jnp.arange(block)).astype(jnp.uint32)
        rows = (example * jnp.uint32(groups) + g.astype(jnp.uint32)) * jnp.uint32(length) + query

    def body(n, carry):
        start = n * block
        valid = keys.at(start)
        if dropout:
            cols = (start + jnp.arange(block)).astype(jnp.uint32)
            bits = _keep_bits(k1, k2, jnp.broadcast_to(rows[:, None], (block, block)),
                              jnp.broadcast_to(cols[None, :], (block, block)), threshold)
            plgpu.store(bits_ref[0].at[:, pl.ds(start, block)], bits)
        out = []
        for j, (acc, m, s_sum) in enumerate(carry):
            k = k_ref[pl.ds(start, block), j, :]
            v = v_ref[pl.ds(start, block), j, :]
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

    init = tuple((jnp.zeros((block, d), jnp.float32), jnp.full((block,), -jnp.inf, jnp.float32),
                  jnp.zeros((block,), jnp.float32)) for _ in range(group))
    carry = jax.lax.fori_loop(0, padded // block, body, init)
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
    ds = p * (dp - delta[:, None]) * scale
    return ds if valid[1] is None else jnp.where(valid[1][None, :], ds, 0.0)


def _backward_inputs(refs, has_mask, dropout, outputs):
    """A backward kernel's refs: (mask or None, the seven inputs, keep bits or None, the ``outputs`` results);
    an aliased buffer passed between the bits and the results is not read."""
    refs = list(refs)
    valid_ref = refs.pop(0) if has_mask else None
    ins = refs[:7]
    bits_ref = refs[7] if dropout else None
    return valid_ref, ins, bits_ref, refs[len(refs) - outputs:]


def _dkv_kernel(*refs, scale, keep_prob, length, block, has_mask, dropout, packed):
    from jax.experimental.pallas import triton as plgpu

    valid_ref, (q_ref, k_ref, v_ref, do_ref, m_ref, r_ref, delta_ref), bits_ref, outs = _backward_inputs(
        refs, has_mask, dropout, 1 if packed else 2)
    j = pl.program_id(2) % HEADS_PER_HASH
    start_k = pl.program_id(0) * block
    k, v = k_ref[...], v_ref[...]
    valid = _Keys(valid_ref, block, length, q_ref.shape[0]).at(start_k)

    def body(n, carry):
        dk, dv = carry
        rows = pl.ds(n * block, block)
        q, do = q_ref[rows, :], do_ref[rows, :]
        p = _probabilities(q, k, m_ref[rows], r_ref[rows], valid, scale)
        bits = bits_ref[rows, :] if dropout else None
        a, dp = _dropped_grad(p, do, v, bits, j, keep_prob)
        dv = dv + plgpu.dot(a.astype(do.dtype), do, trans_a=True)
        ds = _score_grad(p, dp, delta_ref[rows], valid, scale)
        dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, q_ref.shape[0] // block, body, (zeros, zeros))
    if packed:  # the (block, q k v, head size) block of dqkv for this head; dq is the dq kernel's to write
        outs[0][:, 1, :] = dk.astype(outs[0].dtype)
        outs[0][:, 2, :] = dv.astype(outs[0].dtype)
    else:
        outs[0][...] = dk.astype(outs[0].dtype)
        outs[1][...] = dv.astype(outs[1].dtype)


def _dq_kernel(*refs, scale, keep_prob, length, block, has_mask, dropout, packed):
    from jax.experimental.pallas import triton as plgpu

    valid_ref, (q_ref, k_ref, v_ref, do_ref, m_ref, r_ref, delta_ref), bits_ref, outs = _backward_inputs(
        refs, has_mask, dropout, 1)
    dq_ref = outs[0]  # packed: part 0 of this head's block of dqkv
    j = pl.program_id(2) % HEADS_PER_HASH
    q, do, m, r, delta = q_ref[...], do_ref[...], m_ref[...], r_ref[...], delta_ref[...]
    keys = _Keys(valid_ref, block, length, k_ref.shape[0])

    def body(n, dq):
        start = n * block
        cols = pl.ds(start, block)
        k, v = k_ref[cols, :], v_ref[cols, :]
        valid = keys.at(start)
        p = _probabilities(q, k, m, r, valid, scale)
        bits = bits_ref[:, cols] if dropout else None
        _, dp = _dropped_grad(p, do, v, bits, j, keep_prob)
        ds = _score_grad(p, dp, delta, valid, scale)
        return dq + plgpu.dot(ds.astype(k.dtype), k)

    dq = jax.lax.fori_loop(0, k_ref.shape[0] // block, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _params(interpret):
    from jax.experimental.pallas import triton as plgpu

    return None if interpret else plgpu.CompilerParams(num_warps=4, num_stages=2)


def forward(q, k, v, mask, seed, *, scale, rate, length, block, group, name, interpret):
    """(out, each row's maximum, the reciprocal of its sum, keep bits or None).

    ``q``, ``k``, ``v``: ``(array, part)``, the array ``(batch, padded, parts, heads, head size)`` (one array may
    serve all three); ``padded`` a multiple of ``block``, ``length`` the sequence's real length. ``mask``:
    ``(batch, padded)`` int32, nonzero where a key is allowed, or None. ``seed``: four int32 words (the
    threefry key's two, the first example's index in the batch, 0), needed with ``rate > 0``, when ``group``
    must be the four heads of a dropout hash. ``name`` prefixes the kernels' names (``{name}_flash_forward``,
    ``_dkv``, ``_dq``). ``out`` is ``(batch, padded, heads, head size)``, the row
    statistics ``(batch, heads, padded)`` float32, the bits ``(batch, heads / 4, padded, padded)`` uint8."""
    (qa, qp), (ka, kp), (va, vp) = q, k, v
    b, padded, _, heads, d = qa.shape
    dropout = rate > 0.0
    if dropout and group != HEADS_PER_HASH:
        raise ValueError(f"dropout draws are shared by {HEADS_PER_HASH} heads; got groups of {group}")
    threshold, keep_prob = keep_threshold(rate)
    in_specs, args = [], []
    if dropout:
        in_specs.append(pl.BlockSpec((4,), lambda i, e, g: (0,)))
        args.append(seed)
    if mask is not None:
        in_specs.append(pl.BlockSpec((None, padded), lambda i, e, g: (e, 0)))
        args.append(mask)
    in_specs += [pl.BlockSpec((None, block, None, group, d), lambda i, e, g: (e, i, qp, g, 0)),
                 pl.BlockSpec((None, padded, None, group, d), lambda i, e, g: (e, 0, kp, g, 0)),
                 pl.BlockSpec((None, padded, None, group, d), lambda i, e, g: (e, 0, vp, g, 0))]
    rows = pl.BlockSpec((None, group, block), lambda i, e, g: (e, g, i))
    out_specs = [pl.BlockSpec((None, block, group, d), lambda i, e, g: (e, i, g, 0)), rows, rows]
    out_shape = ([jax.ShapeDtypeStruct((b, padded, heads, d), qa.dtype)]
                 + [jax.ShapeDtypeStruct((b, heads, padded), jnp.float32)] * 2)
    if dropout:
        out_specs.append(pl.BlockSpec((None, None, block, padded), lambda i, e, g: (e, g, i, 0)))
        out_shape.append(jax.ShapeDtypeStruct((b, heads // group, padded, padded), jnp.uint8))
    kernel = functools.partial(_forward_kernel, scale=scale, threshold=threshold, keep_prob=keep_prob,
                               length=length, block=block, groups=heads // group, has_mask=mask is not None,
                               dropout=dropout)
    outs = pl.pallas_call(
        kernel, grid=(padded // block, b, heads // group), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, compiler_params=_params(interpret), interpret=interpret,
        name=f"{name}_flash_forward",
    )(*args, qa, ka, va)
    return outs[0], outs[1], outs[2], outs[3] if dropout else None


def backward(q, k, v, out, d_out, mask, m, r, bits, *, scale, rate, length, block, name, interpret,
             packed=False):
    """(dq, dk, dv) for ``forward``'s arguments and results, ``d_out`` the output's cotangent. ``packed``: q, k
    and v are the parts 0, 1, 2 of one ``(batch, length, 3, heads, d)`` array, and the result is that array's
    cotangent, one buffer (the dk/dv kernel writes parts 1 and 2, the dq kernel part 0 into it, aliased)."""
    (qa, qp), (ka, kp), (va, vp) = q, k, v
    b, padded, _, heads, d = qa.shape
    _, keep_prob = keep_threshold(rate)
    if packed and not (qa is ka is va and (qp, kp, vp) == (0, 1, 2) and qa.shape[2] == 3):
        raise ValueError("packed=True needs q, k and v as the parts 0, 1, 2 of one (batch, length, 3, heads, d) "
                         f"array; got parts {(qp, kp, vp)} of arrays shaped {qa.shape}, {ka.shape}, {va.shape}")
    d_out = d_out.astype(qa.dtype)
    # each row's sum of dO * O: the softmax's backward term (the dropout's mask and scaling are in O)
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), d_out.astype(jnp.float32))

    def part(p, whole=False):
        # one head of part p: a block of positions, or all of them
        if whole:
            return pl.BlockSpec((None, padded, None, None, d), lambda i, e, h: (e, 0, p, h, 0))
        return pl.BlockSpec((None, block, None, None, d), lambda i, e, h: (e, i, p, h, 0))

    block4 = pl.BlockSpec((None, block, None, d), lambda i, e, h: (e, i, h, 0))
    whole4 = pl.BlockSpec((None, padded, None, d), lambda i, e, h: (e, 0, h, 0))
    rows = pl.BlockSpec((None, None, padded), lambda i, e, h: (e, h, 0))
    row_block = pl.BlockSpec((None, None, block), lambda i, e, h: (e, h, i))
    lead, extra = [], []
    if mask is not None:
        lead = [pl.BlockSpec((None, padded), lambda i, e, h: (e, 0))]
        extra = [mask]
    dropout = bits is not None
    grid = (padded // block, b, heads)
    options = dict(scale=scale, keep_prob=keep_prob, length=length, block=block, has_mask=mask is not None,
                   dropout=dropout, packed=packed)
    arrays = [*extra, qa, ka, va, d_out, m, r, delta] + ([bits] if dropout else [])
    if packed:
        dkv_specs = pl.BlockSpec((None, block, 3, None, d), lambda i, e, h: (e, i, 0, h, 0))
        dkv_shape = jax.ShapeDtypeStruct(qa.shape, qa.dtype)
    else:
        dkv_specs = [part(0), part(0)]
        dkv_shape = [jax.ShapeDtypeStruct(ka.shape[:2] + (1,) + ka.shape[3:], ka.dtype)] * 2
    dkv = pl.pallas_call(
        functools.partial(_dkv_kernel, **options), grid=grid,
        in_specs=lead + [part(qp, True), part(kp), part(vp), whole4, rows, rows, rows]
        + ([pl.BlockSpec((None, None, padded, block), lambda i, e, h: (e, h // HEADS_PER_HASH, 0, i))]
           if dropout else []),
        out_specs=dkv_specs, out_shape=dkv_shape, compiler_params=_params(interpret), interpret=interpret,
        name=f"{name}_flash_dkv",
    )(*arrays)
    dq_specs = lead + [part(qp), part(kp, True), part(vp, True), block4, row_block, row_block,
                       row_block] + ([pl.BlockSpec((None, None, block, padded),
                                                   lambda i, e, h: (e, h // HEADS_PER_HASH, i, 0))] if dropout else [])
    if packed:
        # dq into the dk/dv kernel's buffer (aliased: its k and v parts stay as written)
        dq_specs.append(part(0))
        return pl.pallas_call(
            functools.partial(_dq_kernel, **options), grid=grid, in_specs=dq_specs, out_specs=part(0),
            out_shape=dkv_shape, input_output_aliases={len(arrays): 0}, compiler_params=_params(interpret),
            interpret=interpret, name=f"{name}_flash_dq",
        )(*arrays, dkv)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **options), grid=grid, in_specs=dq_specs, out_specs=part(0),
        out_shape=jax.ShapeDtypeStruct(qa.shape[:2] + (1,) + qa.shape[3:], qa.dtype),
        compiler_params=_params(interpret), interpret=interpret, name=f"{name}_flash_dq",
    )(*arrays)
    return dq, dkv[0], dkv[1]
