"""The platform a program is traced for (florence_jax.target) picks the backend-specific formulations."""

import jax
import jax.numpy as jnp
import pytest
from conftest import tiny_batch

from florence_jax import Florence2ForConditionalGeneration, generation, target
from florence_jax.modeling import bart, davit


def test_platform_defaults_to_the_backend_and_contexts_nest():
    assert target.platform() == jax.default_backend() == "cpu"
    with target.compiling_for("tpu"):
        assert target.platform() == "tpu"
        with target.compiling_for("cuda"):  # a GPU backend's own name means gpu
            assert target.platform() == "gpu"
        assert target.platform() == "tpu"
    assert target.platform() == "cpu"
    with pytest.raises(ValueError, match="unknown platform 'metal'"):
        with target.compiling_for("metal"):
            pass


def test_every_cpu_only_choice_follows_the_target():
    assert davit._store_residuals() and generation._copy_slots_row_by_row()
    assert bart._beam_queries_one_by_one("xla") and not bart._beam_queries_one_by_one("cudnn")
    for name in ("gpu", "tpu"):
        with target.compiling_for(name):
            assert not davit._store_residuals()
            assert not generation._copy_slots_row_by_row()
            assert not bart._beam_queries_one_by_one("xla")


def test_the_traced_program_is_the_targets(tiny_hf_dir):
    """Tracing the vision tower for a GPU from this CPU leaves out the CPU-only stored residual stream (one
    division per block), and tracing for the CPU again afterwards puts it back: no trace made for one
    platform is reused for the other, although the jitted function is the same object."""
    model = Florence2ForConditionalGeneration.from_pretrained(tiny_hf_dir)
    tower = model.model.vision_tower
    x = jnp.asarray(tiny_batch(seed=1)["pixel_values"]).transpose(0, 2, 3, 1)
    fn = jax.jit(lambda t, x: t(x))

    def divides() -> int:
        return fn.lower(tower, x).as_text().count("stablehlo.divide")

    cpu = divides()
    with target.compiling_for("gpu"):
        gpu = divides()
    again = divides()
    assert cpu == again > gpu


def test_tpu_pixel_normalization_is_the_gather_bit_for_bit():
    """On TPUs uint8 pixels are normalized by a one-hot product with the table instead of a gather (TPU
    gathers are slow): traced for a TPU and run here, it gives the gather's bits for every value and
    channel, and the lowered programs do differ (no gather for the TPU)."""
    import numpy as np

    from florence_jax.processing import ImageTransform, normalize_pixels

    table = ImageTransform(size=(16, 16)).table
    values = np.arange(256, dtype=np.uint8)
    pixels = np.stack([values, values[::-1], np.roll(values, 7)], -1).reshape(2, 8, 16, 3)
    fn = jax.jit(normalize_pixels)
    gather_text = fn.lower(pixels, table).as_text()
    gathered = np.asarray(fn(pixels, table))
    with target.compiling_for("tpu"):
        onehot_text = fn.lower(pixels, table).as_text()
        onehot = np.asarray(fn(pixels, table))
    assert "gather" in gather_text and "gather" not in onehot_text
    np.testing.assert_array_equal(gathered, table[pixels, np.arange(3)])
    np.testing.assert_array_equal(onehot, gathered)
