"""BART's dropouts with four 16-bit draws per Threefry hash, their masks defined for every formulation.

``nnx.Dropout`` draws a float32 uniform per element through ``jax.random.bernoulli``: one Threefry-2x32 hash
(20 rounds of 32-bit adds, rotations and xors, 64 bits out) per element, of which it keeps 23 bits. A
keep-or-drop decision needs far fewer bits: here each hash's 64 bits give four 16-bit draws. A draw ``d``
keeps its element when ``d >= round(rate * 65536)``: kept with probability ``1 - round(rate * 65536) /
65536`` (within 2**-17 of ``1 - rate``), and kept values are scaled by the inverse of that probability, so
the expectation is the input's exactly. The counters come from iotas over the mask's shape, as
``jax_threefry_partitionable`` does: a mask split across devices is computed where it lies, the same
whatever the sharding. Keys of another implementation (``rbg``) fall back to ``jax.random.bernoulli``.

**Attention probabilities** ``(batch, heads, queries, keys)`` (heads a multiple of 4; otherwise the
fallback): hash ``threefry2x32(key, (row, key_position))`` with ``row = (b * heads/4 + g) * queries +
query``; its two 32-bit words ``hi, lo`` give heads ``4g .. 4g+3`` the draws ``hi & 0xffff, hi >> 16, lo &
0xffff, lo >> 16``. A draw per attention probability is ``batch x heads x queries x keys`` of them: on a TPU
step of Florence-2-base (16 examples of 641 text positions per chip) ``bernoulli``'s draws and masks cost, by
the compiler's estimate, 40 of the text encoder's 99 ms (``docs/scale-out.md``). The einsum attention
(:func:`florence_jax.modeling.layers.attention`) applies this mask, and the TPU's fused text attention kernel
(:mod:`florence_jax.modeling.text_attention_kernel`) computes the same draws on chip from the same counters,
so both formulations drop the same probabilities for a key (tested). In XLA's einsum formulation on the TPU,
stacking the four heads' draws costs about what the hashes saved (the compiler's estimate for that text
encoder: 100.7 ms against 99.0); the saving is the kernel's.

**Activations** ``(..., width)`` (BART's residual and activation dropouts): the row is the flattened index
of the leading dimensions, and a row's hashes cover ``n = lane_blocks(width)`` blocks of whole 128-lane
tiles, ``n`` up to 4 (:func:`element_draws`). The mask is named ``dropout_keep`` so that the ``dots`` remat
policy keeps it (a byte per element) rather than hashing again in the backward pass. On a v4 chip, the
compiler's estimate for one text encoder MLP of Florence-2-large (8 examples) with its two dropouts,
forward and backward, rematerialised with the mask kept, is 2.48 ms against 4.18 with ``bernoulli`` and
1.75 without dropout; on a v5e (Florence-2-base, 16 examples, no remat) 2.87 against 3.31 and 1.75.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.extend.random import threefry2x32_p

_DRAWS = 65536  # 16-bit draws
_LOW16 = 0xFFFF
HEADS_PER_HASH = 4


def keep_threshold(rate: float) -> tuple[int, float]:
    """(threshold, keep probability): a 16-bit draw ``d`` keeps its element when ``d >= threshold``."""
    threshold = min(_DRAWS, max(0, round(rate * _DRAWS)))
    return threshold, 1.0 - threshold / _DRAWS


def threefry_words(key: jax.Array) -> tuple[jax.Array, jax.Array] | None:
    """The two uint32 words of a threefry key (typed or raw), or None for a key of another implementation."""
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)  # a raw uint32 key (jax.random.PRNGKey)
    if str(jax.random.key_impl(key)) != "threefry2x32":
        return None
    data = jax.random.key_data(key)
    return data[0], data[1]


def hash_draws(k1, k2, rows, cols, threefry=threefry2x32_p.bind):
    """The four 16-bit draws (uint32) of each hash of counters ``(rows, cols)``: heads 4g .. 4g+3.
    ``threefry`` computes the hash (another formulation of it where a kernel's lowering lacks the primitive)."""
    hi, lo = threefry(k1, k2, rows, cols)
    low = jnp.uint32(_LOW16)
    return hi & low, hi >> 16, lo & low, lo >> 16


def attention_draws(key: jax.Array, shape: tuple[int, int, int, int]) -> jax.Array:
    """The 16-bit draws (uint32) of attention probabilities of ``shape`` = (batch, heads, queries, keys),
    as the module's docstring defines them; ``key`` a threefry key, heads a multiple of 4."""
    b, h, q, k = shape
    g = h // HEADS_PER_HASH
    if h % HEADS_PER_HASH or b * g * q >= 2**32:
        raise ValueError(f"attention draws need heads divisible by 4 and fewer than 2**32 rows, got {shape}")
    k1, k2 = threefry_words(key)
    grid = (b, g, q, k)
    iota = [jax.lax.broadcasted_iota(jnp.uint32, grid, i) for i in range(4)]
    rows = (iota[0] * jnp.uint32(g) + iota[1]) * jnp.uint32(q) + iota[2]
    parts = hash_draws(k1, k2, rows, iota[3])
    return jnp.stack(parts, axis=2).reshape(shape)  # (b, g, 4, q, k): head 4g + part


def attention_dropout(probs: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """``probs`` (batch, heads, queries, keys) with each entry dropped with probability ``rate`` (to 2**-17)
    and the rest scaled to keep the expectation."""
    hashed = probs.ndim == 4 and probs.shape[1] % HEADS_PER_HASH == 0
    return _dropout(probs, rate, key, attention_draws if hashed else None)


def _dropout(x: jax.Array, rate: float, key: jax.Array, draws_of, name: str | None = None) -> jax.Array:
    """``x`` dropped at ``rate`` by the 16-bit draws ``draws_of(key, shape)`` (``jax.random.bernoulli`` where
    that is None or the key is not threefry), kept values scaled by the inverse keep probability; the mask
    named ``name`` for remat policies."""
    if rate <= 0.0:
        return x
    if rate >= 1.0:
        return jnp.zeros_like(x)
    threshold, keep_prob = keep_threshold(rate)
    if draws_of is None or threefry_words(key) is None:
        keep = jax.random.bernoulli(key, keep_prob, x.shape)
    else:
        keep = draws_of(key, x.shape) >= jnp.uint32(threshold)
    if name is not None:
        keep = checkpoint_name(keep, name)
    return jax.lax.select(keep, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros_like(x))


DROPOUT_KEEP = "dropout_keep"  # the name of an element dropout's mask, which the "dots" remat policy saves


def lane_blocks(width: int) -> int:
    """How many of a hash's four draws a row of ``width`` elements uses: the most (up to 4) that split the
    row into blocks of whole 128-lane tiles, or for widths that are not multiples of 128, into equal blocks."""
    if width % 128 == 0:
        return next(k for k in (4, 3, 2, 1) if width % (128 * k) == 0)
    return next(k for k in (4, 3, 2, 1) if width % k == 0)


def element_draws(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The 16-bit draws (uint32) of an elementwise dropout over ``shape`` = (..., width): a row is the
    flattened index of the leading dimensions; with ``n = lane_blocks(width)`` and ``w = width / n``, hash
    ``(row, j)`` for ``j < w`` gives columns ``j, w + j, ..`` its draws ``hi & 0xffff, hi >> 16, lo & 0xffff``
    and ``lo >> 16`` in that order."""
    *lead, width = shape
    n = lane_blocks(width)
    w = width // n
    rows = 1
    for d in lead:
        rows *= d
    if rows >= 2**32:
        raise ValueError(f"element draws need fewer than 2**32 rows, got {shape}")
    k1, k2 = threefry_words(key)
    grid = (*lead, w)
    row = jnp.zeros(grid, jnp.uint32)
    for axis, size in enumerate(lead):  # row-major index of the leading dimensions, as a global iota
        row = row * jnp.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, grid, axis)
    parts = hash_draws(k1, k2, row, jax.lax.broadcasted_iota(jnp.uint32, grid, len(lead)))
    return jnp.concatenate(parts[:n], axis=-1)


def element_dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """``x`` with each element dropped with probability ``rate`` (to 2**-17) and the rest scaled to keep
    the expectation; the mask is :func:`element_draws`'s, named :data:`DROPOUT_KEEP` for remat policies."""
    return _dropout(x, rate, key, element_draws if x.ndim else None, DROPOUT_KEEP)


class _KeyedDropout(nnx.Dropout):
    """``nnx.Dropout`` (same attributes; ``train()``/``eval()`` switch it the same way) whose key is drawn as
    ``nnx.Dropout`` draws it and whose mask a subclass defines."""

    def active(self, deterministic: bool | None = None) -> bool:
        deterministic = self.deterministic if deterministic is None else deterministic
        return self.rate > 0.0 and not deterministic

    def key(self, rngs=None) -> jax.Array:
        """This call's key, drawn from ``rngs`` (or the module's own) as ``nnx.Dropout`` draws it."""
        rngs = self.rngs if rngs is None else rngs
        if isinstance(rngs, nnx.Rngs):
            return rngs[self.rng_collection]()
        if isinstance(rngs, nnx.RngStream):
            return rngs()
        if isinstance(rngs, jax.Array):
            return rngs
        raise TypeError(f"dropout needs rngs (Rngs, RngStream or a key) when it is active, got "
                        f"{type(rngs).__name__}")


class AttentionDropout(_KeyedDropout):
    """Dropout of attention probabilities ``(batch, heads, queries, keys)``, drawing its mask as
    :func:`attention_dropout` does."""

    def __call__(self, inputs, *, deterministic: bool | None = None, rngs=None):
        if not self.active(deterministic) or self.rate >= 1.0:
            return super().__call__(inputs, deterministic=deterministic, rngs=rngs)
        return attention_dropout(inputs, self.rate, self.key(rngs))


class ElementDropout(_KeyedDropout):
    """Dropout of activations ``(..., width)``, drawing its mask as :func:`element_dropout` does (with
    ``broadcast_dims``, as ``nnx.Dropout``)."""

    def __call__(self, inputs, *, deterministic: bool | None = None, rngs=None):
        if not self.active(deterministic) or self.rate >= 1.0 or self.broadcast_dims:
            return super().__call__(inputs, deterministic=deterministic, rngs=rngs)
        return element_dropout(inputs, self.rate, self.key(rngs))


__all__ = ["DROPOUT_KEEP", "AttentionDropout", "ElementDropout", "attention_draws", "attention_dropout",
           "element_draws", "element_dropout", "hash_draws", "keep_threshold", "lane_blocks", "threefry_words"]
