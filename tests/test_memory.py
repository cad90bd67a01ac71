"""What the backward pass keeps: the elementwise chains recompute instead of saving their intermediates.

The residuals of a ``jax.vjp`` are the leaves of the function it returns; each check below would fail if
an intermediate (a shifted copy, an ``exp``, a float32 normalised copy) were kept instead of recomputed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from florence_jax.modeling.davit import _depthwise_conv3x3
from florence_jax.modeling.layers import ACTIVATIONS, LayerNorm, _layer_norm, gelu_exact


def _residuals(fn, *args):
    _, vjp = jax.vjp(fn, *args)
    return [(leaf.shape, leaf.dtype) for leaf in jax.tree_util.tree_leaves(vjp)]


def _bytes(avals):
    return sum(int(np.prod(s)) * jnp.dtype(d).itemsize for s, d in avals)


X = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 16)), jnp.bfloat16)


def test_depthwise_conv_keeps_its_input_not_nine_shifted_copies():
    k = jnp.ones((3, 3, 1, 16), jnp.bfloat16)
    b = jnp.zeros((16,), jnp.bfloat16)
    kept = _residuals(_depthwise_conv3x3, X, k, b)
    assert _bytes(kept) <= _bytes([(X.shape, X.dtype), (k.shape, k.dtype), (b.shape, b.dtype)])
    # Without the recompute, autodiff keeps one shifted copy of the input per tap.
    plain = _residuals(_depthwise_conv3x3.__wrapped__, X, k, b)
    assert _bytes(plain) >= 9 * _bytes([(X.shape, X.dtype)])


@pytest.mark.parametrize("name", ["gelu", "gelu_new"])
def test_gelu_keeps_only_its_input(name):
    assert _bytes(_residuals(ACTIVATIONS[name], X)) == _bytes([(X.shape, X.dtype)])
    plain = gelu_exact if name == "gelu" else lambda x: jax.nn.gelu(x, approximate=True)
    exact = _residuals(plain, X)
    assert _bytes(exact) >= 2 * _bytes([(X.shape, X.dtype)])  # what it replaces


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm_matches_flax_and_keeps_only_its_input(dtype):
    rng = np.random.default_rng(1)
    ours = LayerNorm(16, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    ref = nnx.LayerNorm(16, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    for m in (ours, ref):
        m.scale[...] = jnp.asarray(rng.normal(size=16) if m is ours else ours.scale[...], jnp.float32)
        m.bias[...] = jnp.asarray(rng.normal(size=16) if m is ours else ours.bias[...], jnp.float32)
    x = (X * 3 + 1).astype(dtype)
    got, want = np.asarray(ours(x), np.float32), np.asarray(ref(x), np.float32)
    # The same arithmetic in the same order (XLA may still fuse it differently): float32 to 1e-6, bfloat16
    # to one rounding of its 8-bit mantissa.
    np.testing.assert_allclose(got, want, rtol=1e-6 if dtype == jnp.float32 else 2**-8, atol=1e-6)
    assert ours(x).dtype == ref(x).dtype == dtype

    kept = _residuals(lambda x, s, b: _layer_norm(x, s, b, 1e-5, dtype), x, ours.scale[...], ours.bias[...])
    assert _bytes(kept) <= _bytes([(x.shape, x.dtype), ((16,), jnp.float32), ((16,), jnp.float32)])
    flax_kept = _residuals(lambda x: ref(x), x)
    assert _bytes(flax_kept) >= 2 * x.size * 4  # float32 intermediates of the input's size


def test_mlp_keeps_its_hidden_activation_once():
    """fc2's weight gradient needs gelu(h); recomputing it keeps h alone (4x the width) instead of both."""
    from florence_jax.lora import dense_of_activation

    fc2 = nnx.Linear(64, 16, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(fc2)
    h = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, 64)), jnp.bfloat16)
    act = ACTIVATIONS["gelu"]

    def run(fn):
        return _residuals(lambda p, h: fn(nnx.merge(graphdef, p), h), params, h)

    hidden = [(h.shape, h.dtype)]
    weights = [(fc2.kernel.shape, jnp.float32), (fc2.bias.shape, jnp.float32)]
    recomputed = run(lambda layer, h: dense_of_activation(layer, act, h))
    assert _bytes(recomputed) <= _bytes(hidden + weights)
    assert _bytes(run(lambda layer, h: layer(act(h)))) >= 2 * _bytes(hidden)  # h and gelu(h)
    # and the gradients are those of the plain composition
    def grads(fn):
        def loss(p, h):
            return jnp.sum(fn(nnx.merge(graphdef, p), h).astype(jnp.float32) ** 2)

        return jax.tree_util.tree_leaves(jax.grad(loss, argnums=(0, 1))(params, h))

    got = grads(lambda layer, h: dense_of_activation(layer, act, h))
    want = grads(lambda layer, h: layer(act(h)))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
