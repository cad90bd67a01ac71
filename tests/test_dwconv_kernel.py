"""DaViT's depthwise convolution and residual as one kernel (florence_jax.modeling.dwconv_kernel), run by
Pallas' interpreter: the grouped convolution's values and gradients, with the image split into blocks of
rows and channels, and split over a mesh as the batch is, with no gather."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import collectives, on_step_mesh
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from florence_jax.modeling import dwconv_kernel
from florence_jax.modeling.davit import _depthwise_conv3x3
from florence_jax.modeling.dwconv_kernel import fused_depthwise_residual, grouped_conv3x3
from florence_jax.sharding import BATCH_AXES


def _grouped(x, k, b):
    return x + grouped_conv3x3(x, k.astype(x.dtype), b.astype(x.dtype))


def _fused(x, k, b):
    return fused_depthwise_residual(x, k.astype(x.dtype), b.astype(x.dtype), interpret=True)


def _value_and_grads(fn, x, k, b, w):
    def loss(*args):
        return jnp.sum(fn(*args).astype(jnp.float32) * w)
    return jax.jit(fn)(x, k, b), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, k, b)


def _inputs(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    return (jnp.asarray(rng.normal(size=shape), dtype), jnp.asarray(rng.normal(size=(3, 3, 1, c)) * 0.3, jnp.float32),
            jnp.asarray(rng.normal(size=(c,)), jnp.float32), jnp.asarray(rng.normal(size=shape), jnp.float32))


# float32: the same nine products and the residual summed in another order (the residual as 1 added to
# the centre tap), a few float32 roundings of values of order 1. bfloat16: the kernel sums in float32 and
# rounds once, the grouped convolution rounds its sum to bfloat16 before the residual add: up to a
# bfloat16 rounding (2**-8 relative) of each of the two, of the largest output. The gradients are the
# grouped convolution's own, computed from the same saved input: equal within the same roundings.
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2**-7)])
@pytest.mark.parametrize("shape, block_elements", [
    ((2, 8, 8, 4), None),  # one block per image: no halo rows
    ((2, 24, 16, 8), 16 * 8 * 4),  # blocks of 4 rows: halo rows from the blocks above and below
    ((1, 16, 8, 1024), 8 * 512),  # two blocks of 512 channels, one row each
])
def test_the_kernel_computes_the_grouped_convolution_and_its_gradients(dtype, tol, shape, block_elements, monkeypatch):
    if block_elements:
        monkeypatch.setattr(dwconv_kernel, "_BLOCK_ELEMENTS", block_elements)
    c = shape[-1]
    cb = dwconv_kernel._channels_per_block(c)
    rows = dwconv_kernel._rows_per_block(shape[1], shape[2], cb)
    assert (rows, cb) == {None: (shape[1], c), 16 * 8 * 4: (4, 8), 8 * 512: (1, 512)}[block_elements]
    x, k, b, w = _inputs(shape, dtype)
    out, grads = _value_and_grads(_fused, x, k, b, w)
    ref_out, ref_grads = _value_and_grads(_grouped, x, k, b, w)
    assert out.shape == x.shape and out.dtype == dtype
    assert [g.dtype for g in grads] == [dtype, jnp.float32, jnp.float32]
    for got, ref in zip((out, *grads), (ref_out, *ref_grads)):
        got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
        np.testing.assert_allclose(got, ref, rtol=0, atol=tol * float(np.max(np.abs(ref))))
    # not trivially equal: the convolution mixes neighbours into the residual, the edges included
    assert float(np.max(np.abs(np.asarray(out, np.float32) - np.asarray(x, np.float32)))) > 0.5
    shifted = x + _depthwise_conv3x3(x, k.astype(dtype), b.astype(dtype))  # the CPU's formulation too
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(shifted, np.float32), rtol=0,
                               atol=tol * float(np.max(np.abs(np.asarray(shifted, np.float32)))))


def test_bad_shapes_are_refused():
    x = jnp.zeros((1, 4, 4, 8))
    with pytest.raises(ValueError, match="batch, H, W, C"):
        _fused(x[0], jnp.zeros((3, 3, 1, 8)), jnp.zeros(8))
    with pytest.raises(ValueError, match="kernel must be"):
        _fused(x, jnp.zeros((3, 3, 1, 4)), jnp.zeros(8))



def test_split_over_images_as_the_batch_is_split_without_a_gather():
    """On a data x fsdp mesh with the images split as a step splits its batch, each device convolves its
    own images: the compiled forward moves nothing between devices (the backward sums the taps' and bias'
    gradients over devices, nothing more) and both give one device's values. The mesh comes from sharded
    arguments or, for a program given its shardings (the train and eval steps), from the step's mesh."""
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), BATCH_AXES)
    sh = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    x, k, b, _ = _inputs((16, 8, 8, 4), jnp.float32, seed=1)

    def loss(x_, k_, b_):
        return jnp.sum(_fused(x_, k_, b_) ** 2)

    backward = jax.grad(loss, argnums=(0, 1, 2))
    ref = _grouped(x, k, b)
    ref_grads = jax.grad(lambda *a: jnp.sum(_grouped(*a) ** 2), argnums=(0, 1, 2))(x, k, b)
    sharded = jax.device_put(x, sh)
    for fwd, bwd, arg in [(jax.jit(_fused), jax.jit(backward), sharded),
                          (jax.jit(on_step_mesh(_fused, mesh), in_shardings=(sh, None, None), out_shardings=sh),
                           jax.jit(on_step_mesh(backward, mesh), in_shardings=(sh, None, None), out_shardings=(sh, None, None)), x)]:
        assert collectives(fwd, arg, k, b) == []
        assert set(collectives(bwd, arg, k, b)) <= {"all-reduce"}
        np.testing.assert_allclose(np.asarray(fwd(arg, k, b)), np.asarray(ref), rtol=0, atol=2e-6 * 8)
        grads = bwd(arg, k, b)
        assert grads[0].sharding.is_equivalent_to(sh, 4)
        for got, want in zip(grads, ref_grads):
            want = np.asarray(want)
            np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-6 * float(np.max(np.abs(want))))
    # the same program with neither gathers the images whole: the check above can fail
    assert collectives(jax.jit(_fused, in_shardings=(sh, None, None), out_shardings=sh), x, k, b)
