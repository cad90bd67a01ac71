"""DaViT's fused window attention (florence_jax.modeling.window_kernel), run by Pallas' interpreter: the
einsum formulation's values and gradients, and split over windows as the batch is split, with no gather."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_window_kernel_matches, assert_window_kernel_runs_per_device

from florence_jax.modeling.layers import attention
from florence_jax.modeling.window_kernel import fused_window_attention


def _einsum(qkv, heads, scale):
    """The einsum formulation (WindowAttention's without the kernel) on the kernel's layout."""
    n, t, c3 = qkv.shape
    x = qkv.reshape(n, t, 3, heads, c3 // 3 // heads)
    return attention(x[:, :, 0], x[:, :, 1], x[:, :, 2], scale=scale).reshape(n, t, c3 // 3)


def _fused(qkv, heads, scale):
    return fused_window_attention(qkv, heads, scale, interpret=True)


# float32: the same products summed in another order, and the softmax normalized by a reciprocal rather
# than a division; a few float32 roundings of values of order 1. bfloat16: both round the probabilities
# and the result to bfloat16, so they may differ by a bfloat16 rounding (2**-8 relative) of each entry.
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2**-7)])
# 7 windows: not a multiple of the windows a grid step holds, so the last block is partly outside. Heads
# of 32 channels: two 128-lane tiles of four heads (8 heads), tiles of three (6 heads: 192 channels).
@pytest.mark.parametrize("windows, tokens, heads, head_dim", [(7, 9, 2, 4), (3, 16, 4, 8), (2, 16, 8, 32),
                                                              (2, 9, 6, 32)])
def test_the_kernel_computes_the_einsum_formulation_and_its_gradient(dtype, tol, windows, tokens, heads, head_dim):
    assert_window_kernel_matches(_fused, _einsum, dtype, tol, windows, tokens, heads, head_dim)


def test_bad_qkv_shapes_are_refused():
    with pytest.raises(ValueError, match="3 \\* heads \\* head_dim"):
        _fused(jnp.zeros((2, 9, 20)), 3, 1.0)



def test_split_over_windows_as_the_batch_is_split_without_a_gather():
    """On a data x fsdp mesh with the windows split as a step splits its batch, each device runs the kernel
    on its own windows: the compiled forward and backward move no activations between devices, and give
    one device's values. The mesh comes from sharded arguments or, for a program given its shardings (the
    train and eval steps), from the step's mesh (fsdp_compute, as on_step_mesh does)."""
    qkv = jnp.asarray(np.random.default_rng(0).normal(size=(16, 9, 24)), jnp.float32)
    assert_window_kernel_runs_per_device(_fused, _einsum, qkv, 2, 0.5)
