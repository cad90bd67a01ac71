"""BART's encoder self-attention in kernels: the TPU's fused kernel (florence_jax.modeling.
text_attention_kernel, ``text_attention="fused"``) and the GPU's flash kernels (florence_jax.modeling.
flash_text, ``text_attention="flash"``), run by Pallas' interpreter: the einsum formulation's values and
gradients with padding masks and attention dropout (the same probabilities dropped), split over the batch
as a step splits it with no gather and the same mask, and the model's text encoder with each formulation.
That XLA:GPU compiles the flash kernels for a GPU is in tests/test_aot.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import collectives, on_step_mesh
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from florence_jax.modeling import flash_attention, flash_text
from florence_jax.modeling.dropout import AttentionDropout, attention_draws
from florence_jax.modeling.layers import attention
from florence_jax.modeling.text_attention_kernel import MAX_LENGTH, fused_text_attention, supported
from florence_jax.sharding import BATCH_AXES


def _einsum(q, k, v, mask, heads, scale, rate, key):
    """The einsum formulation (BartAttention's without the kernel) on the kernel's layout."""
    b, lq, c = q.shape
    hd = c // heads

    def heads_major(x):
        return x.reshape(x.shape[0], x.shape[1], heads, hd).transpose(0, 2, 1, 3)

    out = attention(heads_major(q), heads_major(k), heads_major(v), scale=scale,
                    mask=None if mask is None else mask.astype(bool)[:, None, None, :],
                    dropout=AttentionDropout(rate) if rate else None, rngs=key, heads_major=True)
    return out.transpose(0, 2, 1, 3).reshape(b, lq, c)


def _fused(q, k, v, mask, heads, scale, rate, key):
    return fused_text_attention(q, k, v, mask, heads, scale, rate=rate, key=key, interpret=True)


def _flash(q, k, v, mask, heads, scale, rate, key):
    return flash_text.flash_text_attention(q, k, v, mask, heads, scale, rate=rate, key=key, interpret=True)


KERNELS = {"fused": _fused, "flash": _flash}


def _value_and_grads(fn, q, k, v, mask, w, heads, rate, key):
    scale = (q.shape[-1] // heads) ** -0.5

    def loss(q, k, v):
        return jnp.sum(fn(q, k, v, mask, heads, scale, rate, key).astype(jnp.float32) * w)

    out = jax.jit(fn, static_argnums=(4, 5, 6))(q, k, v, mask, heads, scale, rate, key)
    return out, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def _inputs(seed, b, lq, lk, heads, hd, dtype):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, lq, heads * hd)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(b, lk, heads * hd)), dtype) for _ in range(2))
    mask = jnp.asarray(rng.random((b, lk)) > 0.3, jnp.int32).at[-1].set(0)  # the last example: every key masked
    w = jnp.asarray(rng.normal(size=(b, lq, heads * hd)), jnp.float32)
    return q, k, v, mask, w


# float32: the same products summed in another order (the flash kernels: over blocks of keys, the softmax's
# running maximum and sum rescaled per block, the rows divided after the product); a few float32 roundings
# of values of order 1. bfloat16: both round the probabilities (the flash kernels the unnormalized ones) and
# the result to bfloat16; the kernels also round the score gradients to bfloat16 before their products with
# q and k (as the TPU's default precision does with the einsum path's float32 products; this CPU's reference
# keeps them float32): a bfloat16 rounding (2**-8 relative) of each entry and of each summand.
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2**-7)])
@pytest.mark.parametrize("rate", [0.0, 0.3])
# 13 positions: not a tile multiple; 5 queries over 9 keys: the cross-attention shape (the TPU kernel's
# alone: the flash kernels take self-attention); 40 positions: two blocks of the flash kernels, the second
# padded, with heads of 16 channels
@pytest.mark.parametrize("kernel, b, lq, lk, heads, hd", [("fused", 3, 13, 13, 8, 32), ("fused", 2, 5, 9, 4, 32),
                                                          ("flash", 3, 13, 13, 8, 32), ("flash", 2, 40, 40, 4, 16)])
def test_the_kernel_computes_the_einsum_formulation_and_its_gradients(kernel, dtype, tol, rate, b, lq, lk, heads,
                                                                      hd):
    q, k, v, mask, w = _inputs(lq + lk, b, lq, lk, heads, hd, dtype)
    key = jax.random.key(5)
    out, grads = _value_and_grads(KERNELS[kernel], q, k, v, mask, w, heads, rate, key)
    ref_out, ref_grads = _value_and_grads(_einsum, q, k, v, mask, w, heads, rate, key)
    assert out.shape == ref_out.shape == q.shape and out.dtype == dtype
    for a, r in zip((out, *grads), (ref_out, *ref_grads)):
        a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
        np.testing.assert_allclose(a, r, rtol=0, atol=tol * float(np.max(np.abs(r))))
    # a fully masked row attends uniformly: the mean of the values
    if rate == 0.0:
        np.testing.assert_allclose(np.asarray(out[-1], np.float32),
                                   np.broadcast_to(np.asarray(v[-1], np.float32).mean(0), out[-1].shape),
                                   rtol=0, atol=4 * tol * float(np.max(np.abs(np.asarray(v[-1], np.float32)))))
    else:  # the dropout acted (so agreeing above means the same probabilities were dropped)
        undropped = KERNELS[kernel](q, k, v, mask, heads, (q.shape[-1] // heads) ** -0.5, 0.0, None)
        assert float(np.max(np.abs(np.asarray(out, np.float32) - np.asarray(undropped, np.float32)))) > 0.1


def test_heads_the_kernel_does_not_take_are_refused():
    assert supported(12, 768) and supported(16, 1024) and supported(4, 128)
    assert not supported(6, 768) and not supported(8, 128)  # heads not in fours; 4 heads of 16 lanes
    assert supported(12, 768, 641) and not supported(12, 768, 705) and not supported(4, 512)  # VMEM bounds
    with pytest.raises(ValueError, match="at most 704 positions"):
        x = jnp.zeros((1, 705, 128))
        _fused(x, x, x, None, 4, 1.0, 0.0, None)
    with pytest.raises(ValueError, match="four at a time"):
        _fused(jnp.zeros((1, 4, 128)), jnp.zeros((1, 4, 128)), jnp.zeros((1, 4, 128)), None, 8, 1.0, 0.0, None)
    with pytest.raises(ValueError, match="threefry key"):
        x = jnp.zeros((1, 4, 128))
        _fused(x, x, x, None, 4, 1.0, 0.1, jax.random.key(0, impl="rbg"))



def test_the_flash_kernels_refuse_what_they_do_not_take():
    supported = flash_text.supported
    assert supported(12, 768) and supported(16, 1024) and supported(4, 64)
    assert not supported(6, 768) and not supported(4, 96) and not supported(8, 64)  # threes; 24 and 8 channels
    with pytest.raises(ValueError, match="four at a time of a power-of-two head size"):
        x = jnp.zeros((1, 4, 96))
        _flash(x, x, x, None, 4, 1.0, 0.0, None)
    with pytest.raises(ValueError, match="of one shape"):  # self-attention only
        _flash(jnp.zeros((1, 4, 128)), jnp.zeros((1, 5, 128)), jnp.zeros((1, 5, 128)), None, 4, 1.0, 0.0, None)
    with pytest.raises(ValueError, match="threefry key"):
        x = jnp.zeros((1, 4, 128))
        _flash(x, x, x, None, 4, 1.0, 0.1, jax.random.key(0, impl="rbg"))


def test_the_flash_kernels_hash_as_jax_random_and_drop_as_the_einsum_formulation():
    """The kernels' Threefry (uint32 operations, which Pallas' Triton lowering takes) gives jax.random's
    bits for any counters, and the forward's keep bits are the einsum formulation's draws against the
    threshold: bit j of the byte at (example, group, query, key) is head 4 x group + j's decision."""
    from jax.extend.random import threefry2x32_p

    from florence_jax.modeling.dropout import keep_threshold, threefry_words

    rng = np.random.default_rng(0)
    k1, k2, x0, x1 = (jnp.asarray(rng.integers(0, 2**32, size=n, dtype=np.uint64), jnp.uint32) for n in (1, 1, 999, 999))
    for ours, theirs in zip(flash_attention.threefry2x32(k1[0], k2[0], x0, x1), threefry2x32_p.bind(k1[0], k2[0], x0, x1)):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    b, length, heads, rate, key = 2, 40, 8, 0.3, jax.random.key(11)
    x = jnp.asarray(rng.normal(size=(b, length, heads * 16)), jnp.float32)
    seed = jax.lax.bitcast_convert_type(jnp.stack(threefry_words(key)), jnp.int32)
    padded = -(-length // flash_text.BLOCK) * flash_text.BLOCK
    view = jnp.pad(x, ((0, 0), (0, padded - length), (0, 0))).reshape(b, padded, 1, heads, 16)
    mask = jnp.ones((b, padded), jnp.int32)
    seed = jnp.concatenate([seed, jnp.zeros((2,), jnp.int32)])
    *_, bits = flash_text.forward(view, view, view, mask, seed, 0.25, rate, length, True)
    bits = np.asarray(bits)[:, :, :length, :length]  # (b, heads / 4, queries, keys)
    keep = np.asarray(attention_draws(key, (b, heads, length, length))) >= keep_threshold(rate)[0]
    ours = np.stack([(bits[:, g] >> j) & 1 for g in range(heads // 4) for j in range(4)], axis=1).astype(bool)
    np.testing.assert_array_equal(ours, keep)
    assert 0.6 < keep.mean() < 0.8


@pytest.mark.parametrize("kernel", KERNELS)
def test_split_over_the_batch_without_a_gather_and_with_the_whole_batchs_dropout(kernel):
    """On a data x fsdp mesh with the batch split as a step splits it, each device runs the kernel on its
    own examples: the compiled forward and backward move no activations between devices, and give one
    device's values, dropout mask included (each device counts its examples from their global index)."""
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), BATCH_AXES)
    sh = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    q, k, v, mask, _ = _inputs(0, 8, 6, 6, 4, 32, jnp.float32)
    key = jax.random.key(3)

    def forward(q, k, v, mask, key):
        return KERNELS[kernel](q, k, v, mask, 4, 0.25, 0.3, key)

    def loss(q, k, v, mask, key):
        return jnp.sum(forward(q, k, v, mask, key) ** 2)

    backward = jax.grad(loss, argnums=(0, 1, 2))
    ref_out = np.asarray(_einsum(q, k, v, mask, 4, 0.25, 0.3, key))
    ref_grads = jax.grad(lambda q, k, v: jnp.sum(_einsum(q, k, v, mask, 4, 0.25, 0.3, key) ** 2),
                         argnums=(0, 1, 2))(q, k, v)
    sharded = [jax.device_put(x, sh) for x in (q, k, v, mask)]
    shardings = (sh, sh, sh, sh, None)
    for fwd, bwd, args in [(jax.jit(forward), jax.jit(backward), (*sharded, key)),
                           (jax.jit(on_step_mesh(forward, mesh), in_shardings=shardings, out_shardings=sh),
                            jax.jit(on_step_mesh(backward, mesh), in_shardings=shardings), (q, k, v, mask, key))]:
        assert collectives(fwd, *args) == [] and collectives(bwd, *args) == []
        np.testing.assert_allclose(np.asarray(fwd(*args)), ref_out, rtol=0, atol=2e-6 * np.abs(ref_out).max())
        for g, r in zip(bwd(*args), ref_grads):
            assert g.sharding.is_equivalent_to(sh, 3)
            r = np.asarray(r)
            np.testing.assert_allclose(np.asarray(g), r, rtol=0, atol=2e-6 * float(np.max(np.abs(r))))


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_text_encoder_is_the_same_with_either_formulation(kernel):
    """A Florence-2 text encoder (4 heads of 32 channels) in training mode, attention dropout on: the
    kernel's encoder gives the einsum encoder's output and parameter gradients for the same key."""
    from florence_jax.config import Florence2Config
    from florence_jax.modeling.bart import BartEncoder
    from train.state import tiny_config

    base = tiny_config(vocab_size=64, image_token_id=63)
    encoders = {}
    for spec in ("cpu", f"cpu:text_attention={kernel}"):
        cfg: Florence2Config = base.replace(hardware=spec, text_config=base.text_config.__class__(
            **{**base.text_config.__dict__, "attention_dropout": 0.2}))
        encoders[spec] = BartEncoder(cfg, rngs=nnx.Rngs(0))
    assert encoders[f"cpu:text_attention={kernel}"].layers[0].self_attn.fused
    assert not encoders["cpu"].layers[0].self_attn.fused
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 11, 128)), jnp.float32)
    mask = jnp.asarray(rng.random((2, 11)) > 0.2, jnp.int32)
    results = []
    for enc in encoders.values():
        gdef, params = nnx.split(enc)

        def loss(params, gdef=gdef):
            return jnp.sum(nnx.merge(gdef, params)(x, mask, rngs=nnx.Rngs(dropout=9)) ** 2)

        results.append(jax.jit(jax.value_and_grad(loss))(params))
    (la, ga), (lb, gb) = results
    np.testing.assert_allclose(float(la), float(lb), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * max(1.0, float(np.abs(b).max())))
    if kernel == "flash":
        return  # the flash kernels take any length
    # a sequence longer than the kernel holds takes the einsums: the same program as the einsum encoder's
    long = jnp.asarray(rng.normal(size=(1, MAX_LENGTH + 1, 128)), jnp.float32)
    for enc in encoders.values():
        enc.eval()
    outs = [enc(long) for enc in encoders.values()]
    np.testing.assert_array_equal(np.asarray(outs[0]), np.asarray(outs[1]))
