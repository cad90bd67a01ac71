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
