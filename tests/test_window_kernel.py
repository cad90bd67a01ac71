"""DaViT's fused window attention (florence_jax.modeling.window_kernel), run by Pallas' interpreter: the
einsum formulation's values and gradients, and split over windows as the batch is split, with no gather."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import collectives, on_step_mesh
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from florence_jax.modeling.layers import attention
from florence_jax.modeling.window_kernel import fused_window_attention
from florence_jax.sharding import BATCH_AXES


def _einsum(qkv, heads, scale):
    """The einsum formulation (WindowAttention's without the kernel) on the kernel's layout."""
    n, t, c3 = qkv.shape
    x = qkv.reshape(n, t, 3, heads, c3 // 3 // heads)
    return attention(x[:, :, 0], x[:, :, 1], x[:, :, 2], scale=scale).reshape(n, t, c3 // 3)


def _fused(qkv, heads, scale):
    return fused_window_attention(qkv, heads, scale, interpret=True)


def _value_and_grad(fn, qkv, w, heads, scale):
    def loss(x):
        return jnp.sum(fn(x, heads, scale).astype(jnp.float32) * w)
    return jax.jit(fn, static_argnums=(1, 2))(qkv, heads, scale), jax.jit(jax.grad(loss))(qkv)


# float32: the same products summed in another order, and the softmax normalized by a reciprocal rather
# than a division; a few float32 roundings of values of order 1. bfloat16: both round the probabilities
# and the result to bfloat16, so they may differ by a bfloat16 rounding (2**-8 relative) of each entry.
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2**-7)])
# 7 windows: not a multiple of the windows a grid step holds, so the last block is partly outside. Heads
# of 32 channels: two 128-lane tiles of four heads (8 heads), tiles of three (6 heads: 192 channels).
@pytest.mark.parametrize("windows, tokens, heads, head_dim", [(7, 9, 2, 4), (3, 16, 4, 8), (2, 16, 8, 32),
                                                              (2, 9, 6, 32)])
def test_the_kernel_computes_the_einsum_formulation_and_its_gradient(dtype, tol, windows, tokens, heads, head_dim):
    rng = np.random.default_rng(windows)
    qkv = jnp.asarray(rng.normal(size=(windows, tokens, 3 * heads * head_dim)), dtype)
    w = jnp.asarray(rng.normal(size=(windows, tokens, heads * head_dim)), jnp.float32)
    scale = head_dim**-0.5
    out, grad = _value_and_grad(_fused, qkv, w, heads, scale)
    ref_out, ref_grad = _value_and_grad(_einsum, qkv, w, heads, scale)
    assert out.shape == ref_out.shape and out.dtype == dtype and grad.dtype == dtype
    for a, b in ((out, ref_out), (grad, ref_grad)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=0, atol=tol * float(np.max(np.abs(b))))
    # not trivially equal: the attention mixes tokens (its output is not v)
    assert float(np.max(np.abs(np.asarray(out, np.float32) - np.asarray(qkv[..., -heads * head_dim:], np.float32)))) > 0.1


def test_bad_qkv_shapes_are_refused():
    with pytest.raises(ValueError, match="3 \\* heads \\* head_dim"):
        _fused(jnp.zeros((2, 9, 20)), 3, 1.0)



def test_split_over_windows_as_the_batch_is_split_without_a_gather():
    """On a data x fsdp mesh with the windows split as a step splits its batch, each device runs the kernel
    on its own windows: the compiled forward and backward move no activations between devices, and give
    one device's values. The mesh comes from sharded arguments or, for a program given its shardings (the
    train and eval steps), from the step's mesh (fsdp_compute, as on_step_mesh does)."""
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), BATCH_AXES)
    sh = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    rng = np.random.default_rng(0)
    qkv = jnp.asarray(rng.normal(size=(16, 9, 24)), jnp.float32)

    def loss(x):
        return jnp.sum(_fused(x, 2, 0.5) ** 2)

    forward, backward = (lambda x: _fused(x, 2, 0.5)), jax.grad(loss)
    sharded = jax.device_put(qkv, sh)
    for fwd, bwd, arg in [(jax.jit(forward), jax.jit(backward), sharded),
                          (jax.jit(on_step_mesh(forward, mesh), in_shardings=sh, out_shardings=sh),
                           jax.jit(on_step_mesh(backward, mesh), in_shardings=sh, out_shardings=sh), qkv)]:
        assert collectives(fwd, arg) == [] and collectives(bwd, arg) == []
        np.testing.assert_allclose(np.asarray(fwd(arg)), np.asarray(_einsum(qkv, 2, 0.5)), rtol=0, atol=2e-6)
        grad = bwd(arg)
        assert grad.sharding.is_equivalent_to(sh, 3)
        ref = np.asarray(jax.grad(lambda x: jnp.sum(_einsum(x, 2, 0.5) ** 2))(qkv))
        np.testing.assert_allclose(np.asarray(grad), ref, rtol=0, atol=2e-6 * float(np.max(np.abs(ref))))
    # the same program with neither gathers the windows whole: the check above can fail
    assert collectives(jax.jit(forward, in_shardings=sh, out_shardings=sh), qkv)
