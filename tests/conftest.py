"""Test setup: simulate 8 CPU devices before jax is imported anywhere."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

TINY_IMAGE = 64
TINY_IMAGE_TOKEN = 1000


def tiny_batch(seed: int = 0, batch: int = 2, image: int = TINY_IMAGE, text_len: int = 7, dec_len: int = 5):
    """A batch with padding on both the encoder and the decoder side (row 1 is the padded one)."""
    rng = np.random.default_rng(seed)
    n_img = 1 + (image // 8) ** 2  # tiny DaViT has total stride 8
    pixel_values = rng.normal(size=(batch, 3, image, image)).astype(np.float32)
    input_ids = np.concatenate([np.full((batch, n_img), TINY_IMAGE_TOKEN), rng.integers(3, 900, (batch, text_len))], 1)
    attention_mask = np.ones_like(input_ids)
    attention_mask[1, -3:] = 0
    decoder_input_ids = rng.integers(3, 900, (batch, dec_len))
    decoder_attention_mask = np.ones_like(decoder_input_ids)
    decoder_attention_mask[1, -2:] = 0
    return dict(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A tiny random transformers Florence-2 (LayerNorms and biases randomised) saved to a directory."""
    from florence_jax.testing.models import make_hf_model, save_hf_model, tiny_hf_config

    model = make_hf_model(tiny_hf_config(), seed=0, weight_scale=2.0)
    return save_hf_model(model, tmp_path_factory.mktemp("tiny_hf"))


@pytest.fixture(scope="session")
def tiny_hf_model(tiny_hf_dir):
    from transformers import Florence2ForConditionalGeneration

    return Florence2ForConditionalGeneration.from_pretrained(tiny_hf_dir).eval()


def collectives(fn, *args) -> list[str]:
    """The collectives in ``fn``'s compiled program for ``args`` (a jitted function): how a kernel run per
    device under ``shard_map`` is told from one the partitioner gathers."""
    import re

    text = fn.lower(*args).compile().as_text()
    return re.findall(r"all-gather|all-to-all|collective-permute|all-reduce", text)


def on_step_mesh(fn, mesh):
    """``fn`` traced as the train and eval steps trace theirs: inside ``fsdp_compute(mesh)``, so a kernel
    finds the step's mesh when its arguments carry none."""
    from florence_jax.sharding import fsdp_compute

    def step(*args):
        with fsdp_compute(mesh):
            return fn(*args)
    return step


def assert_window_kernel_matches(kernel, reference, dtype, tol: float, windows: int, tokens: int, heads: int,
                                 head_dim: int):
    """A window-attention kernel ``kernel(qkv, heads, scale)`` against ``reference`` (the einsum formulation)
    on random ``(windows, tokens, 3 * heads * head_dim)`` inputs: the output and the gradient of a random
    projection of it, each within ``tol`` times its largest entry, in the input's dtype; and the output is
    not v (the attention mixes tokens, so the comparison can fail)."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(windows * 1000 + tokens)
    qkv = jnp.asarray(rng.normal(size=(windows, tokens, 3 * heads * head_dim)), dtype)
    w = jnp.asarray(rng.normal(size=(windows, tokens, heads * head_dim)), jnp.float32)
    scale = head_dim**-0.5

    def value_and_grad(fn):
        def loss(x):
            return jnp.sum(fn(x, heads, scale).astype(jnp.float32) * w)
        return jax.jit(fn, static_argnums=(1, 2))(qkv, heads, scale), jax.jit(jax.grad(loss))(qkv)

    (out, grad), (ref_out, ref_grad) = value_and_grad(kernel), value_and_grad(reference)
    assert out.shape == ref_out.shape and out.dtype == dtype and grad.dtype == dtype
    for a, b in ((out, ref_out), (grad, ref_grad)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=0, atol=tol * float(np.max(np.abs(b))))
    v = np.asarray(qkv[..., -heads * head_dim:], np.float32)
    assert float(np.max(np.abs(np.asarray(out, np.float32) - v))) > 0.1


def assert_window_kernel_runs_per_device(kernel, reference, qkv, heads: int, scale: float):
    """On a data x fsdp mesh with the windows split as a step splits its batch, ``kernel(qkv, heads, scale)``
    runs on each device's own windows: its compiled forward and backward move no activations between devices
    and give the reference's values (float32 rounding), with the mesh taken from sharded arguments or from the
    step's (as on_step_mesh traces). The same program with neither gathers the windows, so the check can fail."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from florence_jax.sharding import BATCH_AXES

    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), BATCH_AXES)
    sh = NamedSharding(mesh, PartitionSpec(BATCH_AXES))

    def loss(x):
        return jnp.sum(kernel(x, heads, scale) ** 2)

    forward, backward = (lambda x: kernel(x, heads, scale)), jax.grad(loss)
    ref = np.asarray(jax.grad(lambda x: jnp.sum(reference(x, heads, scale) ** 2))(qkv))
    for fwd, bwd, arg in [(jax.jit(forward), jax.jit(backward), jax.device_put(qkv, sh)),
                          (jax.jit(on_step_mesh(forward, mesh), in_shardings=sh, out_shardings=sh),
                           jax.jit(on_step_mesh(backward, mesh), in_shardings=sh, out_shardings=sh), qkv)]:
        assert collectives(fwd, arg) == [] and collectives(bwd, arg) == []
        np.testing.assert_allclose(np.asarray(fwd(arg)), np.asarray(reference(qkv, heads, scale)), rtol=0, atol=2e-6)
        grad = bwd(arg)
        assert grad.sharding.is_equivalent_to(sh, 3)
        np.testing.assert_allclose(np.asarray(grad), ref, rtol=0, atol=2e-6 * float(np.max(np.abs(ref))))
    assert collectives(jax.jit(forward, in_shardings=sh, out_shardings=sh), qkv)
