"""BART's dropouts with four 16-bit draws per hash (florence_jax.modeling.dropout), for attention
probabilities and for activations: their rate, their expectation, the independence of draws that share a
hash, the documented counters, a mask that does not depend on how the batch is split, and (activations) a
mask the "dots" remat policy keeps instead of hashing again."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend.random import threefry2x32_p
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from florence_jax.modeling.dropout import (
    AttentionDropout,
    ElementDropout,
    attention_draws,
    attention_dropout,
    element_draws,
    element_dropout,
    keep_threshold,
    lane_blocks,
)
from florence_jax.modeling.layers import remat_function
from florence_jax.sharding import BATCH_AXES

SHAPE = (4, 8, 64, 256)  # 524,288 probabilities


def test_the_rate_and_the_expectation_are_the_configured_ones():
    threshold, keep = keep_threshold(0.1)
    assert threshold == 6554 and abs(keep - 0.9) < 2**-17
    x = jnp.ones(SHAPE, jnp.float32)
    y = np.asarray(jax.jit(attention_dropout, static_argnums=1)(x, 0.1, jax.random.key(0)))
    n = y.size
    dropped = float(np.mean(y == 0))
    # a binomial count: 5 standard deviations (sqrt(p (1 - p) / n) = 4.1e-4) around the drop probability
    assert abs(dropped - (1 - keep)) < 5 * np.sqrt(keep * (1 - keep) / n)
    assert np.all((y == 0) | np.isclose(y, 1 / keep, rtol=1e-6))
    # the mean of the output is the input's (1) within 5 standard deviations of a mean of n scaled Bernoullis
    assert abs(float(y.mean()) - 1.0) < 5 * np.sqrt((1 - keep) / keep / n)


def test_the_four_heads_that_share_a_hash_draw_independently():
    keep = np.asarray(attention_draws(jax.random.key(1), SHAPE) >= keep_threshold(0.5)[0])
    n = keep[:, 0].size
    for a, b in [(0, 1), (0, 2), (0, 3), (1, 2), (2, 3), (3, 4)]:  # 0-3 share hashes, 4 does not
        corr = np.corrcoef(keep[:, a].ravel(), keep[:, b].ravel())[0, 1]
        assert abs(corr) < 5 / np.sqrt(n), (a, b, corr)
    # draws are 16-bit and cover the range
    draws = np.asarray(attention_draws(jax.random.key(1), SHAPE))
    assert draws.max() < 2**16 and draws.max() > 2**16 - 64 and draws.min() < 64


def test_the_draws_are_the_documented_counters_hashed():
    """Head 4g + p at (b, q, k) takes 16-bit part p of threefry2x32(key, (row, k)), row = (b G + g) Q + q: the
    definition the TPU kernel reproduces on chip."""
    key = jax.random.key(7)
    b, h, q, k = 3, 8, 5, 6
    draws = np.asarray(attention_draws(key, (b, h, q, k)))
    k1, k2 = (jnp.uint32(w) for w in np.asarray(jax.random.key_data(key)))
    groups = h // 4
    for bi, hi, qi, ki in [(0, 0, 0, 0), (2, 7, 4, 5), (1, 5, 3, 2), (2, 2, 0, 4)]:
        g, part = divmod(hi, 4)
        row = jnp.uint32((bi * groups + g) * q + qi)
        words = threefry2x32_p.bind(k1, k2, row, jnp.uint32(ki))
        word = int(words[part // 2])
        assert draws[bi, hi, qi, ki] == (word >> (16 * (part % 2))) & 0xFFFF


def test_other_keys_and_head_counts_fall_back_to_bernoulli_at_the_same_rate():
    x = jnp.ones((2, 6, 32, 64), jnp.float32)  # 6 heads: not in fours
    for key in (jax.random.key(0), jax.random.key(0, impl="rbg")):
        y = np.asarray(attention_dropout(x, 0.25, key))
        assert abs(float(np.mean(y == 0)) - 0.25) < 5 * np.sqrt(0.25 * 0.75 / y.size)
    with pytest.raises(ValueError, match="heads divisible by 4"):
        attention_draws(jax.random.key(0), (2, 6, 4, 4))


def test_the_module_follows_train_and_eval_and_draws_from_its_stream():
    drop = AttentionDropout(0.5, rngs=nnx.Rngs(dropout=3))
    x = jnp.ones((1, 4, 8, 8))
    a, b = drop(x), drop(x)  # the stream advances: two different masks
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    assert set(np.unique(np.asarray(a)).tolist()) == {0.0, 2.0}
    drop.eval()
    np.testing.assert_array_equal(np.asarray(drop(x)), np.asarray(x))
    drop.train()
    assert np.any(np.asarray(drop(x)) == 0)
    assert AttentionDropout(0.0)(x, rngs=jax.random.key(0)) is x


def test_a_mask_split_over_the_batch_is_computed_where_it_lies():
    """The probabilities split over a data x fsdp mesh: each device hashes its own rows (no collective in the
    compiled program) and the mask is the one of the whole batch on one device."""
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), BATCH_AXES)
    sh = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    x = jnp.ones((16, 4, 8, 32), jnp.float32)
    fn = jax.jit(lambda x, key: attention_dropout(x, 0.3, key), in_shardings=(sh, None), out_shardings=sh)
    key = jax.random.key(11)
    text = fn.lower(x, key).compile().as_text()
    assert re.findall(r"all-gather|all-to-all|collective-permute|all-reduce", text) == []
    np.testing.assert_array_equal(np.asarray(fn(x, key)), np.asarray(attention_dropout(x, 0.3, key)))



@pytest.mark.parametrize("width", [768, 3072, 1024, 96])
def test_element_dropout_rate_expectation_and_independent_blocks(width):
    """Rate and mean as for attention (5 standard deviations); the lane blocks that share hashes are
    uncorrelated with each other and with the next row's."""
    n_blocks = lane_blocks(width)
    assert n_blocks == {768: 3, 3072: 4, 1024: 4, 96: 4}[width]
    shape = (4, 160, width)
    x = jnp.ones(shape, jnp.float32)
    y = np.asarray(jax.jit(element_dropout, static_argnums=1)(x, 0.1, jax.random.key(2)))
    _, keep = keep_threshold(0.1)
    assert abs(float(np.mean(y == 0)) - (1 - keep)) < 5 * np.sqrt(keep * (1 - keep) / y.size)
    assert np.all((y == 0) | np.isclose(y, 1 / keep, rtol=1e-6))
    assert abs(float(y.mean()) - 1.0) < 5 * np.sqrt((1 - keep) / keep / y.size)

    kept = np.asarray(element_draws(jax.random.key(3), shape) >= keep_threshold(0.5)[0]).reshape(-1, width)
    w = width // n_blocks
    blocks = [kept[:, i * w:(i + 1) * w].ravel() for i in range(n_blocks)]
    pairs = [(blocks[i], blocks[j]) for i in range(n_blocks) for j in range(i + 1, n_blocks)]
    pairs.append((kept[:-1].ravel(), kept[1:].ravel()))  # neighbouring rows
    for a, b in pairs:
        assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(a.size)


def test_element_draws_are_the_documented_counters_hashed():
    """Column i * w + j of row r takes 16-bit part i of threefry2x32(key, (r, j)), r the row-major index of
    the leading dimensions, w = width / lane_blocks(width)."""
    key = jax.random.key(5)
    shape = (2, 3, 384)  # 3 blocks of 128
    draws = np.asarray(element_draws(key, shape))
    k1, k2 = (jnp.uint32(w) for w in np.asarray(jax.random.key_data(key)))
    w = 128
    for b, pos, c in [(0, 0, 0), (1, 2, 383), (0, 2, 130), (1, 0, 257)]:
        part, j = divmod(c, w)
        words = threefry2x32_p.bind(k1, k2, jnp.uint32(b * 3 + pos), jnp.uint32(j))
        assert draws[b, pos, c] == (int(words[part // 2]) >> (16 * (part % 2))) & 0xFFFF


def test_element_dropout_split_over_the_batch_is_computed_where_it_lies():
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), BATCH_AXES)
    sh = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    x = jnp.ones((16, 12, 256), jnp.float32)
    fn = jax.jit(lambda x, key: element_dropout(x, 0.3, key), in_shardings=(sh, None), out_shardings=sh)
    key = jax.random.key(13)
    text = fn.lower(x, key).compile().as_text()
    assert re.findall(r"all-gather|all-to-all|collective-permute|all-reduce", text) == []
    np.testing.assert_array_equal(np.asarray(fn(x, key)), np.asarray(element_dropout(x, 0.3, key)))


def test_the_dots_remat_policy_keeps_the_mask_and_full_hashes_again():
    """Under ``dots`` the backward pass reads the kept mask (a bool residual; no Threefry hash in it);
    under ``full`` it hashes again. Either way the gradients are the plain function's."""
    w = jnp.asarray(np.random.default_rng(0).normal(size=(128, 128)), jnp.float32)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 8, 128)), jnp.float32)
    key = jax.random.key(17)

    def layer(x, w, key):
        return element_dropout(jnp.tanh(x @ w), 0.2, key) @ w

    def backward_hashes(policy):
        fn = remat_function(layer, policy)
        _, vjp = jax.vjp(lambda x, w: fn(x, w, key), x, w)
        residuals = [leaf for leaf in jax.tree_util.tree_leaves(vjp) if hasattr(leaf, "dtype")]
        jaxpr = jax.make_jaxpr(vjp)(jnp.ones((4, 8, 128), jnp.float32))
        return str(jaxpr).count("threefry2x32"), [r.dtype for r in residuals]

    hashes, dtypes = backward_hashes("dots")
    assert hashes == 0 and jnp.bool_ in dtypes
    hashes, dtypes = backward_hashes("full")
    assert hashes >= 1 and jnp.bool_ not in dtypes

    def grads(fn):
        return jax.grad(lambda x, w: jnp.sum(fn(x, w, key) ** 2), argnums=(0, 1))(x, w)

    for policy in ("dots", "full"):
        for a, b in zip(grads(remat_function(layer, policy)), grads(layer), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_element_dropout_module_and_its_fallbacks():
    drop = ElementDropout(0.5, rngs=nnx.Rngs(dropout=3))
    x = jnp.ones((2, 4, 128))
    a, b = drop(x), drop(x)
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    assert set(np.unique(np.asarray(a)).tolist()) == {0.0, 2.0}
    drop.eval()
    np.testing.assert_array_equal(np.asarray(drop(x)), np.asarray(x))
    # rbg keys and broadcast dimensions take nnx.Dropout's bernoulli, at the same rate
    y = np.asarray(element_dropout(jnp.ones((64, 256)), 0.25, jax.random.key(0, impl="rbg")))
    assert abs(float(np.mean(y == 0)) - 0.25) < 5 * np.sqrt(0.25 * 0.75 / y.size)
    rows = ElementDropout(0.5, broadcast_dims=(1,), rngs=nnx.Rngs(dropout=0))(jnp.ones((64, 8)))
    assert np.all(np.asarray(rows).min(axis=1) == np.asarray(rows).max(axis=1))
