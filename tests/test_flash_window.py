"""DaViT's window attention through the project's flash-attention kernels for GPUs (florence_jax.modeling.
flash_window, ``Formulations.window_attention="flash"``), run here by Pallas' interpreter: the einsum
formulation's values and gradients, the gradient written as one buffer, per device on a mesh, and in the
tiny tower. That XLA:GPU compiles it for a GPU is in tests/test_aot.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_window_kernel_matches, assert_window_kernel_runs_per_device

from florence_jax import hardware
from florence_jax.modeling.davit import _einsum_window_attention
from florence_jax.modeling.flash_window import flash_window_attention


def _flash(qkv, heads, scale):
    return flash_window_attention(qkv, heads, scale, interpret=True)


def _einsum(qkv, heads, scale):
    return _einsum_window_attention(qkv, heads, scale, "xla", "heads_major")


# float32: the same products summed in another order (blocks of 16 keys, the softmax's running maximum
# and sum rescaled per block) and the rows divided after the product: a few float32 roundings of values of
# order 1. bfloat16: both round the probabilities (here the unnormalized ones) and the result to bfloat16,
# so they may differ by a bfloat16 rounding (2**-8 relative) of each entry.
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2**-7)])
# A base window (144 tokens: nine blocks of queries against nine of keys, heads of 32), the tiny model's
# (16 tokens, one block; heads of 16), and two blocks with one head.
@pytest.mark.parametrize("windows, tokens, heads, head_dim", [(3, 144, 2, 32), (2, 16, 4, 16), (2, 32, 1, 32)])
def test_the_kernel_computes_the_einsum_formulation_and_its_gradient(dtype, tol, windows, tokens, heads, head_dim):
    assert_window_kernel_matches(_flash, _einsum, dtype, tol, windows, tokens, heads, head_dim)


def test_the_backward_writes_the_projections_gradient_in_place_without_a_second_forward():
    """The gradient of qkv is the dq kernel's output, written into the dk/dv kernel's buffer (aliased), in
    qkv's layout: three kernels in all (the forward once), and no slice, copy or concatenation of q, k, v
    or of their gradients around them (the library's backward took slices of qkv, ran its forward again
    and concatenated dq, dk and dv)."""
    qkv = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 3 * 4 * 16)), jnp.float32)
    jaxpr = jax.make_jaxpr(jax.grad(lambda t: jnp.sum(_flash(t, 4, 0.25) ** 2)))(qkv)
    calls = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "pallas_call"]
    assert [str(e.params["name"]) for e in calls] == [
        "window_flash_forward", "window_flash_dkv", "window_flash_dq"]
    dkv, dq = calls[1], calls[2]
    assert dq.params["input_output_aliases"] == ((len(dq.invars) - 1, 0),)
    assert dq.invars[-1] is dkv.outvars[0] and dkv.outvars[0].aval.shape == (2, 32, 3, 4, 16)
    assert not {"slice", "dynamic_slice", "concatenate", "copy", "gather"} & {e.primitive.name for e in jaxpr.jaxpr.eqns}


def test_a_packed_backward_needs_the_parts_of_one_array():
    """``flash_attention.backward(packed=True)`` writes one buffer of q, k and v's layout: asked of three
    arrays (the text encoder's layout) it refuses instead of writing a buffer of the wrong shape."""
    from florence_jax.modeling import flash_attention

    q = jnp.zeros((2, 16, 1, 1, 16))
    with pytest.raises(ValueError, match=r"packed=True needs q, k and v as the parts 0, 1, 2 of one"):
        flash_attention.backward((q, 0), (q + 1, 0), (q + 2, 0), None, None, None, None, None, None, scale=1.0,
                                 rate=0.0, length=16, block=16, name="t", interpret=True, packed=True)


@pytest.mark.parametrize("shape, heads", [((2, 9, 96), 2), ((2, 16, 24), 1), ((2, 16, 72), 1), ((2, 16, 20), 3)])
def test_windows_the_kernel_cannot_take_are_refused(shape, heads):
    """Tokens not a multiple of the kernel's block of 16, heads of 8 or 24 channels (Triton's tiles are powers
    of two, its products' at least 16), channels not 3 x heads."""
    with pytest.raises(ValueError, match="tokens a multiple of 16 and head_dim a power of two >= 16"):
        _flash(jnp.zeros(shape), heads, 1.0)


def test_split_over_windows_as_the_batch_is_split_without_a_gather():
    """Each device runs the kernel on its own windows (conftest.assert_window_kernel_runs_per_device)."""
    qkv = jnp.asarray(np.random.default_rng(0).normal(size=(16, 16, 96)), jnp.float32)
    assert_window_kernel_runs_per_device(_flash, _einsum, qkv, 2, 0.25)


@pytest.mark.slow  # about a minute on a slow host; the kernel tests above cover values and gradients by default
def test_the_tiny_tower_runs_the_kernel_with_the_einsums_values_and_gradients():
    """The demo's tiny model (windows of 16 tokens, heads of 16 channels) with ``window_attention="flash"``
    against the einsums: one kernel per spatial block in the traced tower and none in the einsums'; the
    features and every parameter's gradient within float32 rounding of their largest entry (four stages of
    the same function, summed in another order)."""
    from flax import nnx

    from florence_jax import Florence2ForConditionalGeneration
    from train.state import tiny_config

    model = Florence2ForConditionalGeneration(tiny_config(128, 127).replace(hardware="cpu:window_attention=flash"),
                                              rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).uniform(-2, 2, (2, 64, 64, 3)), jnp.float32)

    def run(m):
        tower = m.model.vision_tower
        kernels = str(jax.make_jaxpr(lambda x: tower(x))(x)).count("pallas_call[")
        grads = nnx.to_flat_state(nnx.state(jax.jit(nnx.grad(lambda t, x: jnp.sum(t(x) ** 2)))(tower, x), nnx.Param))
        return kernels, np.asarray(jax.jit(lambda t, x: t(x))(tower, x)), {k: np.asarray(v[...]) for k, v in grads}

    (kernels, out, grads), (kernels0, out0, grads0) = run(model), run(model.for_hardware("cpu:window_attention=einsum"))
    assert kernels == sum(model.config.vision_config.depths) and kernels0 == 0
    np.testing.assert_allclose(out, out0, rtol=0, atol=1e-5 * np.abs(out0).max())
    assert grads.keys() == grads0.keys() and any("window_attn" in str(k) for k in grads)
    for k in grads:
        np.testing.assert_allclose(grads[k], grads0[k], rtol=0, atol=1e-5 * np.abs(grads0[k]).max() + 1e-30,
                                   err_msg=str(k))


def test_flash_is_a_gpu_kernel_refused_on_a_tpu():
    assert hardware.resolve("h100:window_attention=flash").window_attention == "flash"
    with pytest.raises(ValueError, match="window_attention='flash' is a GPU kernel; on a TPU, use "
                                         "window_attention='fused'"):
        hardware.resolve("v5e:window_attention=flash")
