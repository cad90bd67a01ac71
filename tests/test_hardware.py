"""The hardware a program is built for is one explicit fact (florence_jax.hardware): resolved once into a
frozen set of formulations that lives in the model's static structure, so jit caches by it, every
formulation computes the same function as its alternative, and nothing process-wide decides it."""

import ast
import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_batch
from flax import nnx

from florence_jax import Florence2ForConditionalGeneration, hardware

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_specs_resolve_to_each_backends_defaults_with_single_changes():
    assert hardware.backend() == jax.default_backend() == "cpu"
    assert hardware.resolve() == hardware.resolve("auto") == hardware.resolve("") == hardware.DEFAULTS["cpu"]
    assert hardware.resolve("cuda") == hardware.DEFAULTS["gpu"]  # a GPU backend's own name means gpu
    h100 = hardware.resolve("h100")
    assert (h100.platform, h100.device) == ("gpu", "h100") and h100.spec() == "h100"
    assert hardware.resolve("v5e").pixel_normalize == "affine"
    assert hardware.resolve("v5e").window_attention == "fused"  # the Pallas kernel is the TPU's
    assert hardware.resolve("cpu").window_attention == "kernel"  # the CPU's own (florence_jax.cpu_kernels)
    assert hardware.resolve("gpu").window_attention == "flash"  # the GPU's Pallas kernels (Triton)
    assert hardware.resolve("v4").text_attention == "fused"  # so is the text encoder's
    assert hardware.resolve("v5e").depthwise_conv == "fused"  # and the depthwise convolution's
    assert hardware.resolve("cpu").text_attention == "einsum" and hardware.resolve("gpu").text_attention == "flash"
    assert hardware.resolve("v5e").layer_norm_stats == "matrix"  # LayerNorm's statistics on the matrix unit
    assert hardware.resolve("cpu").layer_norm_stats == hardware.resolve("gpu").layer_norm_stats == "vector"
    ab = hardware.resolve("gpu:depthwise_conv=grouped, store_vision_residuals=true")
    assert ab.depthwise_conv == "grouped" and ab.store_vision_residuals is True
    assert ab.beam_cache_copy == "gather"  # the rest stay the GPU's
    # Every set round-trips through its shortest spec, and a resolved set is returned as it is.
    for f in (ab, h100, hardware.DEFAULTS["tpu"], hardware.resolve("cpu:attention_layout=sequence_major")):
        assert hardware.resolve(f.spec()) == f and hardware.resolve(f) is f
    # Another platform keeps the single changes; an ahead-of-time compile names what "auto" means.
    assert hardware.resolve("cpu:beam_cache_copy=gather", platform="tpu") == dataclasses.replace(
        hardware.DEFAULTS["tpu"], beam_cache_copy="gather")
    assert hardware.resolve("", auto="tpu").platform == "tpu"
    assert hash(ab) != hash(hardware.DEFAULTS["gpu"])  # usable as a static jit key


def test_another_platforms_kernels_give_way_to_xlas_formulations_where_they_cannot_compile():
    """A GPU's flash kernels and a TPU's fused ones compile for their own platform only: built to run
    elsewhere (a GPU config tried on a CPU), the program takes the einsums and the grouped convolution in
    their place and says which; on its own platform, or where no kernel is chosen, nothing changes."""
    gpu = hardware.resolve("a100")
    runnable, note = hardware.kernels_for(gpu, "cpu")
    assert (runnable.window_attention, runnable.text_attention) == ("einsum", "einsum")
    assert runnable.spec() == "a100:window_attention=einsum,text_attention=einsum"
    assert dataclasses.replace(runnable, window_attention="flash", text_attention="flash") == gpu  # nothing else
    assert note == ("window attention as einsum, text attention as einsum: the GPU's Pallas kernels compile "
                    "only for a GPU target")
    assert hardware.kernels_for(gpu, "cuda") == (gpu, "")
    assert hardware.kernels_for(hardware.resolve("gpu:text_attention=einsum"), "tpu")[1].startswith(
        "window attention as einsum: ")
    tpu, note = hardware.kernels_for(hardware.resolve("v5e"), "cpu")
    assert (tpu.window_attention, tpu.text_attention, tpu.depthwise_conv) == ("einsum", "einsum", "grouped")
    assert note.endswith("the TPU's Pallas kernels compile only for a TPU target")
    cpu = hardware.resolve("cpu")  # the CPU's kernels are its own (florence_jax.cpu_kernels): refused elsewhere
    assert hardware.kernels_for(cpu, "gpu") == (cpu, "")


def test_a_program_run_on_this_cpu_also_stores_the_stream_its_shifted_sums_read():
    """``runnable_on``: ``kernels_for``'s stand-ins and, compiled by XLA:CPU, the residual stream stored where
    the vision tower's shifted sums would read it unstored (the test of the compiled tower below); nothing
    more, nowhere else."""
    gpu = hardware.resolve("a100")
    here, note = hardware.runnable_on(gpu, "cpu")
    assert here == dataclasses.replace(hardware.kernels_for(gpu, "cpu")[0], store_vision_residuals=True)
    assert note == (hardware.kernels_for(gpu, "cpu")[1] + "; the vision blocks' residual stream stored: XLA:CPU "
                    "recomputes an unstored one inside the shifted sums' fusions")
    assert hardware.runnable_on(gpu, "cuda") == (gpu, "")
    grouped = hardware.resolve("gpu:depthwise_conv=grouped,window_attention=einsum,text_attention=einsum")
    assert hardware.runnable_on(grouped, "cpu") == (grouped, "")  # XLA's convolution reads the stream once
    tpu, note = hardware.runnable_on(hardware.resolve("v5e"), "cpu")  # its kernel's stand-in is the convolution
    assert (tpu, note) == hardware.kernels_for(hardware.resolve("v5e"), "cpu")
    cpu = hardware.resolve("cpu:depthwise_conv=shifted_sum,store_vision_residuals=false")  # an A/B asked for
    assert hardware.runnable_on(cpu, "cpu") == (cpu, "")


def test_loading_for_a_gpu_on_this_cpu_takes_the_einsums_and_says_so(caplog, tmp_path):
    """``from_pretrained(hardware="a100")`` here: the weights run on this CPU, so the GPU's flash kernels give
    way to the einsums and the warning says so. The demo's tiny model has windows the kernel takes: built
    whole for the GPU (``for_hardware``, for ahead-of-time compiles), its tower fails to compile here."""
    from train.state import tiny_config

    Florence2ForConditionalGeneration(tiny_config(128, 127), rngs=nnx.Rngs(0)).save_pretrained(tmp_path)
    with caplog.at_level("WARNING", logger="florence_jax.modeling.florence2"):
        model = Florence2ForConditionalGeneration.from_pretrained(tmp_path, hardware="a100")
    assert model.formulations == hardware.resolve(
        "a100:store_vision_residuals=true,window_attention=einsum,text_attention=einsum")
    assert "JAX runs them on the CPU here, so they change what would not compile well here (window attention " \
           "as einsum, text attention as einsum: the GPU's Pallas kernels compile only for a GPU target" in caplog.text
    x = jnp.asarray(np.random.default_rng(0).uniform(-2, 2, (1, 64, 64, 3)), jnp.float32)
    features = jax.jit(lambda t, x: t(x))(model.model.vision_tower, x)
    assert features.shape[0] == 1 and bool(jnp.all(jnp.isfinite(features)))
    whole = model.for_hardware("a100")
    assert whole.formulations == hardware.resolve("a100")
    with pytest.raises(Exception, match="Only interpret mode is supported on CPU backend"):
        jax.jit(lambda t, x: t(x))(whole.model.vision_tower, x)
    caplog.clear()
    with caplog.at_level("WARNING", logger="florence_jax.modeling.florence2"):  # nothing to stand in: as asked
        asked = Florence2ForConditionalGeneration.from_pretrained(
            tmp_path, hardware="gpu:window_attention=einsum,text_attention=einsum,store_vision_residuals=true")
    assert asked.formulations == hardware.resolve(
        "gpu:store_vision_residuals=true,window_attention=einsum,text_attention=einsum")
    assert caplog.text == ""


def test_a_gpu_config_built_on_this_cpu_takes_the_einsums_and_says_so(caplog, tiny_hf_dir):
    """train.state.create_model for a config naming a GPU, on this CPU: the GPU's program but for its flash
    kernels (which would not compile here), and the warning names what stands in for them."""
    from florence_jax.sharding import make_mesh
    from train.config import ModelConfig
    from train.state import create_model

    with caplog.at_level("WARNING", logger="train.state"):
        model = create_model(ModelConfig(name_or_path=str(tiny_hf_dir), dtype="float32", hardware="a100"),
                             make_mesh(1, 1, devices=jax.devices()[:1]))
    assert model.formulations == hardware.resolve(
        "a100:store_vision_residuals=true,window_attention=einsum,text_attention=einsum")
    assert model.formulations.vision_stages == "unrolled"  # the rest is the GPU's
    assert "window attention as einsum, text attention as einsum: the GPU's Pallas kernels compile only for a GPU" \
        in caplog.text


@pytest.mark.parametrize("spec, message", [
    ("metal", "unknown hardware 'metal'"),
    ("gpu:depthwise=grouped", "unknown hardware formulation 'depthwise'"),
    ("gpu:depthwise_conv=fft", "depthwise_conv='fft'"),
    ("gpu:store_vision_residuals=yes", "takes true or false"),
    ("gpu:depthwise_conv", "is not name=value"),
    ("gpu:window_attention=fused", "is a TPU kernel; on a GPU, use window_attention='einsum' or 'flash'"),
    ("gpu:text_attention=fused", "text_attention='fused' is a TPU kernel; on a GPU, use text_attention='einsum' "
                                 "or 'flash' \\(the GPU's kernel\\)"),
    ("v5e:text_attention=flash", "text_attention='flash' is a GPU kernel; on a TPU, use text_attention='fused'"),
    ("gpu:depthwise_conv=fused", "is a TPU kernel; on a GPU, use depthwise_conv='grouped'"),
    # the CPU's own kernels and options exist nowhere else: refused, with the platform's default named
    ("gpu:depthwise_conv=kernel", r"depthwise_conv='kernel' is a CPU kernel .*; on a GPU, use "
                                  r"depthwise_conv='shifted_sum' \(its default\)"),
    ("v5e:window_attention=kernel", r"window_attention='kernel' is a CPU kernel .*; on a TPU, use "
                                    r"window_attention='fused'"),
    ("h100:decode_dots=kernel", "decode_dots='kernel' is a CPU kernel"),
    ("tpu:decode_dots=eigen", "decode_dots='eigen' is an XLA:CPU option; on a TPU, use decode_dots='compiler'"),
    ("gpu:decode_attention=kernel", "decode_attention='kernel' is a CPU kernel"),
    ("gpu:decode_top_k=kernel", "decode_top_k='kernel' is a CPU kernel"),
])
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        hardware.resolve(spec)


def test_the_device_table_serves_kinds_chips_and_specs():
    assert hardware.device_spec("NVIDIA H100 80GB HBM3").hbm_gib == 80
    assert hardware.device_spec("TPU v5 lite").peak_tflops == 197.0
    assert hardware.device_spec("v4").platform == "tpu"
    assert hardware.device_spec("cpu") is None
    for key, row in hardware.DEVICE_SPECS.items():
        assert hardware.resolve(key).platform == row.platform


def _tower_program(model, x) -> str:
    return jax.jit(lambda t, x: t(x)).lower(model.model.vision_tower, x).as_text()


def test_the_formulations_are_part_of_the_model_so_jit_caches_by_them(tiny_hf_dir):
    """One jitted function traced with a CPU-built tower, then a GPU-built one, then the CPU one again:
    each trace is its hardware's program (the CPU's stores each block's residual stream through a division
    by 1.0, which survives XLA's optimizations; the GPU's does not; the CPU's runs a stage's blocks in a
    loop, the GPU's one after another), with no cache cleared in between. For the division count both keep
    their stages in loops (``vision_stages=scan``), so that each block's divisions appear once."""
    cpu = Florence2ForConditionalGeneration.from_pretrained(tiny_hf_dir)
    # for_hardware builds the GPU's program whole (from_pretrained would swap its flash kernels for the
    # einsums, below; this tiny tower's windows are too small for them anyway, so the GPU's program runs here)
    gpu_default, gpu = cpu.for_hardware("gpu"), cpu.for_hardware("gpu:vision_stages=scan")
    assert cpu.formulations == hardware.DEFAULTS["cpu"] and gpu_default.formulations == hardware.DEFAULTS["gpu"]
    x = jnp.asarray(tiny_batch(seed=1)["pixel_values"]).transpose(0, 2, 3, 1)
    fn = jax.jit(lambda t, x: t(x))
    loops = [fn.lower(m.model.vision_tower, x).as_text().count("stablehlo.while") for m in (cpu, gpu_default, cpu)]
    assert loops[0] == loops[2] > loops[1] == 0
    divides = [fn.lower(m.model.vision_tower, x).as_text().count("stablehlo.divide") for m in (cpu, gpu, cpu)]
    assert divides[0] == divides[2] > divides[1]
    compiled = [fn.lower(m.model.vision_tower, x).compile().as_text().count("divide(") for m in (cpu, gpu)]
    assert compiled[0] > compiled[1]  # not folded away: the stored stream is in the program that runs
    # Both run here and agree: a formulation is a way to compute, not a different function. The stores
    # change no bit (the CPU with the GPU's depthwise convolution); the CPU's depthwise kernel sums the
    # taps in another order (float32 rounding of the largest feature).
    shifted = cpu.for_hardware("cpu:depthwise_conv=shifted_sum")
    np.testing.assert_array_equal(np.asarray(fn(shifted.model.vision_tower, x)),
                                  np.asarray(fn(gpu.model.vision_tower, x)))
    ref = np.asarray(fn(gpu.model.vision_tower, x))
    np.testing.assert_allclose(np.asarray(fn(cpu.model.vision_tower, x)), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_no_fusion_of_the_compiled_tower_recomputes_the_stream(tiny_hf_dir):
    """The stored residual stream, read off XLA's optimized CPU program: every fusion slices at most one
    depthwise conv's worth of shifted inputs (8 shifted slices and the centre), in inference and in
    training (stochastic depth on). When a store is undone, XLA fuses the stream into its consumers and a
    fusion recomputes earlier convs from their padded inputs (Florence-2-base at 192 px: 33 slices in one
    fusion when the stores divided by a broadcast runtime scalar, which XLA turns into a product with its
    reciprocal; this tiny tower fails the bound the same way). No stores at all (the GPU's formulation) is
    the control. The shifted sum is what the CPU runs without its kernels; with the depthwise kernel (the
    CPU's default) no fusion slices more than once."""
    default = Florence2ForConditionalGeneration.from_pretrained(tiny_hf_dir)
    model = default.for_hardware("cpu:depthwise_conv=shifted_sum")
    x = jnp.asarray(tiny_batch(seed=1)["pixel_values"]).transpose(0, 2, 3, 1)
    for train in (False, True):
        assert _most_slices(model, x, train) <= 9, train
        assert _most_slices(default, x, train) <= 1, train
    assert _most_slices(model.for_hardware("cpu:depthwise_conv=shifted_sum,store_vision_residuals=false"), x) > 9


def test_the_gpus_program_run_on_this_cpu_stores_the_stream(caplog, tiny_hf_dir):
    """The GPU's vision tower (shifted sums, no stores, unrolled stages) compiled by XLA:CPU recomputes the
    residual stream in its fusions: in float32, base at 192 px outgrew 8 GiB in six minutes of compiling.
    Loaded to run here, its stream is stored (``hardware.runnable_on``; the stores change no value, test
    above) and no fusion slices more than one convolution's worth; the warning says so."""
    with caplog.at_level("WARNING", logger="florence_jax.modeling.florence2"):
        here = Florence2ForConditionalGeneration.from_pretrained(tiny_hf_dir, hardware="gpu")
    assert here.formulations == dataclasses.replace(hardware.DEFAULTS["gpu"], store_vision_residuals=True,
                                                    window_attention="einsum", text_attention="einsum")
    assert "the vision blocks' residual stream stored" in caplog.text
    x = jnp.asarray(tiny_batch(seed=1)["pixel_values"]).transpose(0, 2, 3, 1)
    assert _most_slices(here, x) <= 9
    assert _most_slices(here.for_hardware("gpu"), x) > 9  # the GPU's whole program: the recomputation


def _most_slices(m, x, train: bool = False) -> int:
    """The most slices of an image-batch-shaped array in one computation of ``m``'s compiled CPU tower."""
    tower = m.model.vision_tower
    tower.train() if train else tower.eval()
    text = jax.jit(lambda t, x, r: t(x, r)).lower(tower, x, nnx.Rngs(dropout=0) if train else None).compile().as_text()
    counts, current = [0], 0
    for line in text.splitlines():
        if line.startswith("%"):  # a new computation
            counts.append(current)
            current = 0
        elif " slice(" in line and line.split("=", 1)[1].lstrip().startswith(f"f32[{x.shape[0]},"):
            current += 1
    return max(counts + [current])


def test_the_stored_stream_is_exact_whatever_it_holds():
    """The division that stores the residual stream divides by exactly 1.0 everywhere, NaN and infinities
    included (a diverged run can fill the stream with them), and passes gradients through unchanged."""
    from florence_jax.modeling.davit import _residual_store

    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 3)).astype(np.float32)) * 1e30
    x = x.at[0, 0, 0].set(jnp.nan).at[0, 1, 0].set(jnp.inf).at[1, 2, 2].set(-jnp.inf).at[1, 3, 1].set(-3e38)
    out = jax.jit(_residual_store)(x)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))  # NaN where x has NaN
    finite = jnp.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0) * 1e-30
    grad = jax.jit(jax.grad(lambda v: jnp.sum(_residual_store(v) * jnp.arange(30.0).reshape(2, 5, 3))))(finite)
    np.testing.assert_array_equal(np.asarray(grad), np.arange(30.0, dtype=np.float32).reshape(2, 5, 3))


def _tower_and_grads(model, x):
    tower = model.model.vision_tower
    out = jax.jit(lambda t, x: t(x))(tower, x)
    grads = jax.jit(nnx.grad(lambda t, x: jnp.sum(t(x) ** 2)))(tower, x)
    return np.asarray(out), {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(grads, nnx.Param))}


@pytest.fixture(scope="module")
def cpu_tower(tiny_hf_dir):
    """The tiny model with the CPU's formulations, an input, and its tower's features and gradients."""
    model = Florence2ForConditionalGeneration.from_pretrained(tiny_hf_dir)
    x = jnp.asarray(tiny_batch(seed=4)["pixel_values"]).transpose(0, 2, 3, 1)
    return model, x, _tower_and_grads(model, x)


# Each formulation against its alternative on the CPU's defaults, with how close they must be:
#  - the stored residual stream and the carried small scan parameters change where values live, not the
#    arithmetic: the features are bit-identical; XLA orders the backward's sums differently around them.
#  - the grouped convolution and the sequence-major attention einsums sum the same products in another
#    order: float32 rounding of the features too. So does the fused window attention kernel (run by Pallas'
#    interpreter here), which also normalizes the softmax by a reciprocal, and the fused depthwise
#    convolution kernel, which adds the residual as 1 on the centre tap. The folded channel attention
#    regroups the products (a Gram matrix, the probabilities folded into the output projection).
# The GPU's defaults, the CPU's shifted sum and the projected channel attention in the default suite (the stores' exactness is proven above);
# each other formulation alone is slow.
@pytest.mark.parametrize("change, exact_features", [
    ("gpu", False),  # the stores change no bit (above); the CPU's depthwise kernel sums in another order
    ("cpu:depthwise_conv=shifted_sum", False),
    pytest.param("cpu:store_vision_residuals=false", True, marks=pytest.mark.slow),
    pytest.param("cpu:carry_small_scan_params=false", True, marks=pytest.mark.slow),
    pytest.param("cpu:depthwise_conv=grouped", False, marks=pytest.mark.slow),
    pytest.param("cpu:attention_layout=sequence_major", False, marks=pytest.mark.slow),
    pytest.param("cpu:window_attention=fused", False, marks=pytest.mark.slow),  # the TPU's kernels: their
    pytest.param("cpu:depthwise_conv=fused", False, marks=pytest.mark.slow),    # own tests run by default
    ("cpu:channel_attention=projected", False),
])
def test_every_vision_formulation_computes_the_same_tower(cpu_tower, change, exact_features):
    model, x, a = cpu_tower
    other = model.for_hardware(change)
    assert other.formulations != model.formulations
    b = _tower_and_grads(other, x)
    if exact_features:
        np.testing.assert_array_equal(a[0], b[0])
    else:
        np.testing.assert_allclose(a[0], b[0], rtol=0, atol=1e-5 * float(np.max(np.abs(a[0]))))
    assert a[1].keys() == b[1].keys() and len(a[1]) > 20
    for k in a[1]:  # float32 rounding of each tensor's largest entry
        scale = float(np.max(np.abs(a[1][k])))
        np.testing.assert_allclose(b[1][k], a[1][k], rtol=0, atol=1e-5 * scale, err_msg=str(k))


@pytest.mark.parametrize("dtype, tolerance", [("float32", 2e-6), ("bfloat16", 2**-7)])
def test_folded_channel_attention_is_the_projected_one(dtype, tolerance):
    """The Gram-matrix channel attention, biases included, against the reference's projections: outputs
    within float32 rounding (bfloat16: one ulp of the largest output, as the products round elsewhere),
    and in float32 the same gradients for every weight and the input. With no more tokens than channels,
    or a LoRA adapter on a projection, it computes the projections itself."""
    from florence_jax.config import PRESETS
    from florence_jax.lora import apply_lora
    from florence_jax.modeling.davit import ChannelAttention

    fc = PRESETS["base"]().replace(dtype=jnp.dtype(dtype))
    mods = {h: ChannelAttention(fc.replace(hardware=h), 1, rngs=nnx.Rngs(0))
            for h in ("cpu:channel_attention=projected", "cpu")}
    assert hardware.resolve("cpu").channel_attention == "folded"
    rng = np.random.default_rng(0)
    state = nnx.state(mods["cpu"], nnx.Param)
    state = jax.tree.map(lambda v: jnp.asarray(rng.normal(0, 0.05 if v.ndim == 2 else 0.5, v.shape), v.dtype), state)
    for m in mods.values():
        nnx.update(m, state)
    x = jnp.asarray(rng.normal(0.3, 1.0, (2, 600, 256)), jnp.dtype(dtype))  # 600 tokens > 256 channels
    ref, out = (np.asarray(nnx.jit(lambda m, x: m(x))(m, x).astype(jnp.float32)) for m in mods.values())
    assert np.abs(ref).max() > 0.5
    np.testing.assert_allclose(out, ref, rtol=0, atol=tolerance * np.abs(ref).max())
    if dtype == "float32":
        grad = nnx.jit(nnx.grad(lambda m, x: jnp.sum(jnp.sin(m(x))), argnums=(0, 1)))
        (ga, xa), (gb, xb) = grad(mods["cpu:channel_attention=projected"], x), grad(mods["cpu"], x)
        flat_a, flat_b = nnx.to_flat_state(nnx.state(ga, nnx.Param)), dict(nnx.to_flat_state(nnx.state(gb, nnx.Param)))
        for k, v in flat_a:
            scale = float(np.abs(np.asarray(v[...])).max())
            np.testing.assert_allclose(np.asarray(flat_b[k][...]), np.asarray(v[...]), rtol=0, atol=1e-5 * scale,
                                       err_msg=str(k))
        np.testing.assert_allclose(np.asarray(xb), np.asarray(xa), rtol=0, atol=1e-5 * float(np.abs(xa).max()))
    folded = mods["cpu"]

    def forms_qkv(n):  # whether the program computes the (2, n, 3 x 256) projection
        return f"tensor<2x{n}x768x" in nnx.jit(lambda m, x: m(x)).lower(folded, x[:, :n]).as_text()

    assert not forms_qkv(600) and forms_qkv(256)  # 256 tokens, 256 channels: the projections are cheaper
    apply_lora(folded, rank=2, alpha=4, dropout=0.0, targets=(r"qkv",))
    assert forms_qkv(600)
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, x: m(x))(folded, x).astype(jnp.float32)), ref, rtol=0,
                               atol=tolerance * np.abs(ref).max())  # LoRA's B starts at zero: the same function


def _dot_outputs(jaxpr, shape):
    """The dtypes of every dot_general result of ``shape`` in ``jaxpr`` and the jaxprs inside it."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general" and eqn.outvars[0].aval.shape == shape:
            found.append(eqn.outvars[0].aval.dtype)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _dot_outputs(inner, shape)
    return found


def test_folded_channel_attention_writes_token_sized_products_in_the_compute_dtype():
    """In bfloat16 every product of the folded channel attention with a (tokens x channels) result, forward
    and backward, writes bfloat16 (float32 accumulation): the output product, and the Gram matrix's
    backward as one product, x (dG + dG^T). Differentiated as einsums with a float32 preference, the Gram
    matrix's backward was two products with float32 (n, C) results, summed after, and the output product
    wrote float32 forward and backward (XLA:GPU's program for an H100: 10.8 GB of the base full step's
    stage 2, docs/scale-out.md)."""
    from florence_jax.config import PRESETS
    from florence_jax.modeling.davit import ChannelAttention

    fc = PRESETS["base"]().replace(dtype=jnp.dtype("bfloat16"), hardware="gpu")
    assert hardware.resolve("gpu").channel_attention == "folded"
    mod = ChannelAttention(fc, 1, rngs=nnx.Rngs(0))
    x = jnp.ones((2, 600, 256), jnp.bfloat16)
    graph, state = nnx.split(mod)
    jaxpr = jax.make_jaxpr(jax.grad(lambda s, x: jnp.sum(nnx.merge(graph, s)(x).astype(jnp.float32)),
                                    argnums=(0, 1)))(state, x)
    outputs = _dot_outputs(jaxpr.jaxpr, (2, 600, 256))
    assert outputs == [jnp.dtype("bfloat16")] * 3  # y = x M; dx from y; dx from the Gram matrix


def test_bfloat16_squares_split_into_two_exact_parts():
    """The matrix statistics' split of a square (layers.square_parts): for every finite bfloat16 whose
    square's rest is a normal float32 (squares from 2**-111 up), both parts are bfloat16 and they sum to the square exactly."""
    from florence_jax.modeling.layers import square_parts

    x = np.arange(2**16, dtype=np.uint16).view(jnp.bfloat16)
    with np.errstate(invalid="ignore"):  # the NaN patterns
        mag = np.abs(x.astype(np.float64))
    x = x[np.isfinite(mag) & (mag >= 2.0**-55) & (mag < 2.0**63)]
    assert x.size == 2 * 118 * 128  # both signs, 118 binades of 128 values
    hi, lo = jax.jit(square_parts)(jnp.asarray(x))
    assert hi.dtype == lo.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(hi, np.float64) + np.asarray(lo, np.float64), x.astype(np.float64) ** 2)
    assert np.count_nonzero(np.asarray(lo)) > x.size // 2  # the rest is not nothing: one part would not do


@pytest.mark.parametrize("channels", [512, 1024])
def test_matrix_layernorm_statistics_are_the_reductions(channels):
    """Formulations.layer_norm_stats="matrix" (the TPU's): the mean and mean square as products with ones
    equal the float32 reductions up to the order of float32 additions (bounded by 2 n 2**-24 times the sum
    of magnitudes: each order's worst case); the normalised bfloat16 outputs within one bfloat16 ulp of
    the vector formulation's (near zero, 1e-6 of the largest); and the gradients of the input and both parameters are the same bits (the
    backward pass is the vector formulation's, given the same cotangent)."""
    from florence_jax.config import PRESETS
    from florence_jax.modeling.layers import layer_norm, matrix_moments, vector_moments

    rng = np.random.default_rng(channels)
    # a residual stream's rows: a mean well off zero, and a few large channels
    x = rng.normal(2.0, 1.5, (3, 37, channels)) * np.where(rng.random(channels) < 0.02, 20.0, 1.0)
    x = jnp.asarray(x, jnp.bfloat16)
    (mv, sv), (mm, sm) = jax.jit(vector_moments)(x), jax.jit(matrix_moments)(x)
    x32 = np.abs(np.asarray(x, np.float64))
    bound = 2 * channels * 2.0**-24
    np.testing.assert_array_less(np.abs(np.asarray(mm) - np.asarray(mv)), bound * x32.mean(-1, keepdims=True))
    np.testing.assert_array_less(np.abs(np.asarray(sm) - np.asarray(sv)), bound * (x32**2).mean(-1, keepdims=True))

    fc = PRESETS["base"]().replace(dtype=jnp.bfloat16)
    norms = {h: layer_norm(fc, channels, rngs=nnx.Rngs(0), stats=h) for h in ("vector", "matrix")}
    params = {"scale": rng.normal(1.0, 0.2, channels), "bias": rng.normal(0.0, 0.2, channels)}
    for n in norms.values():
        n.scale.value, n.bias.value = (jnp.asarray(params[k], jnp.float32) for k in ("scale", "bias"))
    w = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    def run(n):
        out = nnx.jit(lambda m, x: m(x))(n, x)
        loss = lambda m, x: jnp.sum(m(x).astype(jnp.float32) * w)  # noqa: E731 (cotangent w, whatever the output)
        g, gx = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(n, x)
        return (np.asarray(out, np.float32), np.asarray(g.scale.value), np.asarray(g.bias.value),
                np.asarray(gx, np.float32))

    (a, *ga), (b, *gb) = run(norms["vector"]), run(norms["matrix"])
    assert a.dtype == b.dtype and np.abs(a).max() > 3
    ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(a), 2.0**-20))) - 7)  # a bfloat16 ulp of each output
    # one bfloat16 ulp of each output, plus 1e-6 of the largest: the statistics' float32 differences carried
    # into outputs that cancel to near zero, where the rounding step is finer than the difference
    np.testing.assert_array_less(np.abs(a - b), ulp * 1.0001 + 1e-6 * np.abs(a).max())
    assert np.mean(a != b) < 0.01  # rounded the same almost everywhere
    for u, v in zip(ga, gb):
        np.testing.assert_array_equal(u, v)


def test_matrix_layernorm_statistics_apply_to_davit_blocks_wide_bfloat16_inputs():
    """The products replace the reductions in DaViT blocks' LayerNorms (the patch embeddings' and the text
    model's keep theirs: no gain by the compiler's estimates), for bfloat16 inputs of at least 512 channels;
    a narrower input (at 128 and, for Florence-2-large's first stage, 256 channels the compiler's estimate
    was slower) or a float32 one keeps the reductions."""
    from florence_jax.config import PRESETS
    from florence_jax.modeling.layers import LayerNorm, layer_norm

    fc = PRESETS["base"]().replace(dtype=jnp.bfloat16, hardware="tpu")
    model = nnx.eval_shape(lambda: Florence2ForConditionalGeneration(fc, rngs=nnx.Rngs(0)))
    stats = {"/".join(map(str, path)): m.stats for path, m in nnx.iter_graph(model) if isinstance(m, LayerNorm)}
    blocks = {p: v for p, v in stats.items() if "vision_tower/blocks/" in p}
    assert len(blocks) == 2 * 2 * sum(fc.vision_config.depths) and set(blocks.values()) == {"matrix"}
    others = {p: v for p, v in stats.items() if p not in blocks}
    assert set(others.values()) == {"vector"}
    assert any(p.startswith("model/vision_tower/convs") for p in others)  # the patch embeddings'
    assert any(p.startswith("model/language_model/encoder") for p in others)

    cases = ((jnp.bfloat16, 512, True), (jnp.bfloat16, 256, False), (jnp.float32, 512, False))
    for dtype, channels, products in cases:
        norm = layer_norm(fc.replace(dtype=dtype), channels, rngs=nnx.Rngs(0), stats="matrix")
        graph, state = nnx.split(norm)
        jaxpr = str(jax.make_jaxpr(lambda s, x, g=graph: nnx.merge(g, s)(x))(state, jnp.ones((2, 16, channels), dtype)))
        assert ("dot_general" in jaxpr) == products, (dtype, channels)


def test_pixel_normalizations_against_the_table():
    """The one-hot product (no gather) gives the gather's bits for every value and channel; the TPU's affine
    formulation (one elementwise pass) is within 1e-6 of them (a few float32 roundings of values below 3) and
    rounds to the same bfloat16 for all 768 entries of Florence-2's processor; neither lowers to a gather."""
    from florence_jax.processing import ImageTransform, normalize_pixels

    table = ImageTransform(size=(16, 16)).table
    values = np.arange(256, dtype=np.uint8)
    pixels = np.stack([values, values[::-1], np.roll(values, 7)], -1).reshape(2, 8, 16, 3)
    run = {f: jax.jit(lambda p, t, f=f: normalize_pixels(p, t, f)) for f in ("gather", "one_hot", "affine")}
    assert "gather" in run["gather"].lower(pixels, table).as_text()
    for f in ("one_hot", "affine"):
        assert "gather" not in run[f].lower(pixels, table).as_text()
    expected = table[pixels, np.arange(3)]
    np.testing.assert_array_equal(np.asarray(run["gather"](pixels, table)), expected)
    np.testing.assert_array_equal(np.asarray(run["one_hot"](pixels, table)), expected)
    affine = np.asarray(run["affine"](pixels, table))
    assert np.abs(affine - expected).max() <= 1e-6  # 4 float32 ulps at |x| < 4
    np.testing.assert_array_equal(np.asarray(jnp.asarray(affine, jnp.bfloat16)),
                                  np.asarray(jnp.asarray(expected, jnp.bfloat16)))
    assert hardware.resolve("tpu").pixel_normalize == "affine"


def test_pixels_in_blocks_normalize_color_by_color():
    """Space-to-depth pixels (4x4 blocks, 48 channels: row, column, color) take the same (256, 3) table as
    the image, color i % 3, in every formulation; the blocks hold each pixel once, where it belongs."""
    from florence_jax.processing import ImageTransform, normalize_pixels, space_to_depth

    table = ImageTransform(size=(16, 16)).table
    pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 16, 3), dtype=np.uint8)
    blocks = space_to_depth(pixels, 4)
    assert blocks.shape == (2, 2, 4, 48) and blocks.flags.c_contiguous
    for i, j, dy, dx, c in ((0, 0, 0, 0, 0), (1, 3, 2, 1, 2), (0, 2, 3, 3, 1)):
        assert blocks[1, i, j, (dy * 4 + dx) * 3 + c] == pixels[1, 4 * i + dy, 4 * j + dx, c]
    np.testing.assert_array_equal(np.sort(blocks, axis=None), np.sort(pixels, axis=None))
    for f in ("gather", "one_hot", "affine"):
        np.testing.assert_array_equal(np.asarray(normalize_pixels(blocks, table, f)),
                                      space_to_depth(np.asarray(normalize_pixels(pixels, table, f)), 4))
    with pytest.raises(ValueError, match="do not divide"):
        space_to_depth(pixels[:, :6], 4)
    with pytest.raises(ValueError, match="in threes"):
        normalize_pixels(blocks[..., :47], table)
    assert hardware.resolve("tpu").pixel_layout == "space_to_depth"
    assert hardware.resolve("cpu").pixel_layout == hardware.resolve("gpu").pixel_layout == "image"


def _python_files():
    for top in ("florence_jax", "train", "scripts"):
        yield from sorted((ROOT / top).rglob("*.py"))


def test_no_library_code_clears_jits_caches_or_reads_a_platform_while_tracing():
    """The old way (a context variable read while tracing, with every compiled program thrown away on
    entry and exit) is gone: no project module calls jax.clear_caches or asks the default backend inside
    the model; the one answer to "which platform" is florence_jax.hardware."""
    offenders = []
    for path in _python_files():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "clear_caches":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} clear_caches")
            if (isinstance(node, ast.Attribute) and node.attr == "default_backend"
                    and path.relative_to(ROOT).as_posix() != "florence_jax/hardware.py"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} default_backend")
    assert not offenders, offenders


def test_no_test_patches_a_private_switch_to_choose_a_formulation():
    offenders = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "setattr"
                    and len(node.args) >= 2 and isinstance(node.args[0], ast.Name)
                    and node.args[0].id in ("davit", "bart", "generation", "layers", "processing")
                    and isinstance(node.args[1], ast.Constant) and str(node.args[1].value).startswith("_")):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders
