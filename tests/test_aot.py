"""Ahead-of-time compilation of the train step on this CPU machine: for a TPU topology (needs libtpu) and for a
config's GPU."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu not installed (pip install -e '.[tpu]'); TPU topologies cannot be described")
def test_tiny_model_compiles_for_a_small_tpu_topology():
    cmd = [sys.executable, "-m", "scripts.aot_compile", "--config", "cpu_demo.py", "--topology", "v5e:2x2",
           "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.batch_size=8", "--config.data.image_size=64"]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "mesh {'data': 2, 'fsdp': 2}" in out.stdout and "fits in 16 GiB" in out.stdout
    assert "traced for tpu" in out.stdout  # not the CPU program of the machine compiling it


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu not installed (pip install -e '.[tpu]'); TPU chips cannot be described")
@pytest.mark.parametrize("hardware, matrix", [("v5e", True), ("v5e:layer_norm_stats=vector", False)])
def test_one_davit_block_compiles_for_a_tpu_chip(hardware, matrix):
    """scripts.block_cost: one block of the TPU's program (its Pallas kernels scheduled) with the compiler's
    estimate; the matrix LayerNorm statistics' products appear where the formulation asks for them."""
    cmd = [sys.executable, "-m", "scripts.block_cost", "--chip", "v5e", "--stage", "3", "--images", "2",
           "--hardware", hardware, "--top", "40"]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "base stage 3 (24x24x1024), 2 images" in out.stdout and "XLA ops" in out.stdout
    assert "window_attention_fwd/pallas_call" in out.stdout  # the kernels by their schedules
    assert ("layer_norm_stats/dot_general" in out.stdout) == matrix


def _aot(*extra: str) -> str:
    """``python -m scripts.aot_compile`` on the tiny demo config at 64 px, in its own process (it sets the
    device count and platform before JAX starts): what it prints."""
    cmd = [sys.executable, "-m", "scripts.aot_compile", "--config", "cpu_demo.py", "--cpu_devices", "2",
           "--config.batch_size=4", "--config.data.image_size=64", *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_a_config_for_a_tpu_compiles_here_without_the_tpu_kernel():
    """On simulated CPU devices a TPU config's program is the TPU's, but for its depthwise convolution and
    window and text attention: the Pallas kernels compile for a TPU target only, so XLA's grouped
    convolution and the einsums stand in for them, and the output says so."""
    out = _aot("--config.model.hardware=v5e")
    assert ("traced for tpu (hardware v5e:depthwise_conv=grouped,window_attention=einsum,text_attention=einsum)"
            in out)
    assert "compile only for a TPU target" in out and "fits in 16 GiB" in out


def test_a_config_for_a_gpu_compiles_the_gpus_program_here_and_checks_that_gpus_memory():
    """On simulated CPU devices, a config whose model.hardware names a GPU gets the GPU's program (its
    formulations, not this machine's) and the memory check of that GPU, the einsums standing in for its
    flash kernels, which compile for a GPU only: the output says so. (With no hardware named, the program is
    the CPU's and there is no device memory to check against: the slow test below.)"""
    out = _aot("--config.model.hardware=h100")
    assert ("traced for gpu (hardware h100:store_vision_residuals=true,window_attention=einsum,"
            "text_attention=einsum)") in out
    assert "fits in 80 GiB" in out
    assert ("window attention as einsum, text attention as einsum: the GPU's Pallas kernels compile only for a "
            "GPU target; the vision blocks' residual stream stored: XLA:CPU recomputes an unstored one inside "
            "the shifted sums' fusions; --topology compiles the GPU's own program") in out


@pytest.mark.slow  # another compile of the step, about a minute
def test_a_config_with_no_hardware_compiles_this_machines_program():
    out = _aot()
    assert "traced for cpu (hardware cpu)" in out and "fits in" not in out


_CUDA_PLUGIN = importlib.util.find_spec("jax_plugins") is not None and any(
    importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is not None for v in (12, 13))


def test_each_gpu_target_describes_its_gpu_to_the_compiler():
    """The target description XLA:GPU compiles against is the named GPU's: its compute capability and SMs, the
    DEVICE_SPECS row's memory and bandwidth, and a device kind that leads back to the same row (the memory
    check, MFU and roofline read that row by the kind)."""
    from florence_jax import hardware

    expected = {"a100": ((8, 0), 108, 40), "h100": ((9, 0), 132, 80), "h200": ((9, 0), 132, 141)}
    assert set(hardware.GPU_TARGETS) == set(expected)
    for chip, (capability, sms, gib) in expected.items():
        text = hardware.gpu_target_config(chip)
        fields = dict(line.strip().split(": ", 1) for line in text.splitlines()
                      if ": " in line and "{" not in line)
        assert f"cuda_compute_capability {{ major: {capability[0]} minor: {capability[1]} }}" in text
        assert int(fields["core_count"]) == sms
        assert int(fields["device_memory_size"]) == gib * 2**30
        spec = hardware.DEVICE_SPECS[chip]
        assert spec.platform == "gpu" and int(fields["memory_bandwidth"]) == int(spec.hbm_gbps * 1e9)
        kind = fields["device_description_str"].strip('"')
        assert hardware.device_spec(kind) is spec, kind


@pytest.mark.skipif(_CUDA_PLUGIN, reason="JAX's CUDA plugin is installed: the compile itself is tested below")
def test_a_gpu_topology_without_the_cuda_plugin_says_what_to_install():
    cmd = [sys.executable, "-m", "scripts.aot_compile", "--config", "cpu_demo.py", "--topology", "h100",
           "--config.data.image_size=64"]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode != 0
    assert "cannot describe 'h100' for XLA:GPU" in out.stderr and "pip install -e '.[gpu-aot]'" in out.stderr


@pytest.mark.skipif(not _CUDA_PLUGIN, reason="JAX's CUDA plugin not installed (pip install -e '.[gpu-aot]'); "
                                             "XLA:GPU cannot compile here")
def test_a_config_compiles_for_a_described_gpu_with_the_gpu_compiler(tmp_path):
    """With a GPU topology the step is XLA:GPU's program for that GPU, built on this machine without one: the
    GPU's formulations, its memory checked against the GPU's, and products in the GPU compiler's kernels
    (Triton fusions or cuBLAS calls), which no CPU program has."""
    out = _aot("--topology", "h100", "--dump", str(tmp_path))
    assert "target       h100  mesh {'data': 1, 'fsdp': 1}" in out
    assert "traced for gpu (hardware h100)" in out and "fits in 80 GiB" in out
    hlo = (tmp_path / "hlo.txt").read_text()
    assert '"kind":"__triton' in hlo or "__cublas$" in hlo
    # the GPU's default attentions are the flash kernels (the frozen tower's window attention: forward only)
    assert "window_flash_forward" in hlo and "window_flash_dkv" not in hlo and "text_flash_dkv" in hlo
    out = _aot("--topology", "a100:2", "--config.mesh.data=2")
    assert "target       a100:2  mesh {'data': 2, 'fsdp': 1}" in out and "fits in 40 GiB" in out


@pytest.mark.skipif(not _CUDA_PLUGIN, reason="JAX's CUDA plugin not installed (pip install -e '.[gpu-aot]'); "
                                             "XLA:GPU cannot compile here")
def test_the_flash_window_attention_compiles_for_a_gpu(tmp_path):
    """``window_attention="flash"`` with the tower trained: XLA:GPU compiles the three Triton kernels per
    spatial block (forward, dk/dv, and dq writing into dk/dv's buffer, aliased)."""
    out = _aot("--topology", "h100", "--config.model.hardware=h100:text_attention=einsum",
               "--config.optim.freeze=()", "--dump", str(tmp_path))
    assert "traced for gpu (hardware h100:text_attention=einsum)" in out  # the window kernels alone
    hlo = (tmp_path / "hlo.txt").read_text()
    calls = [line for line in hlo.splitlines() if 'custom_call_target="__gpu$xla.gpu.triton"' in line]
    blocks = 4  # the tiny reader's tower: one spatial block per stage
    for kernel in ("window_flash_forward", "window_flash_dkv", "window_flash_dq"):
        assert sum(kernel in line for line in calls) == blocks, kernel
    assert all("output_to_operand_aliasing" in line for line in calls if "window_flash_dq" in line)


@pytest.mark.skipif(not _CUDA_PLUGIN, reason="JAX's CUDA plugin not installed (pip install -e '.[gpu-aot]'); "
                                             "XLA:GPU cannot compile here")
def test_the_flash_text_attention_compiles_for_a_gpu_with_its_dropout(tmp_path):
    """``text_attention="flash"`` with attention dropout on: XLA:GPU compiles the three Triton kernels (forward
    with its on-chip draws, dk/dv and dq reading the keep bits) for each text encoder layer, and the
    encoder's attention no longer goes through XLA's scores."""
    out = _aot("--topology", "h100", "--config.model.hardware=h100:window_attention=einsum",
               "--config.model.dropout=0.1", "--config.optim.freeze=()", "--dump", str(tmp_path))
    assert "traced for gpu (hardware h100:window_attention=einsum)" in out  # the text kernels alone
    hlo = (tmp_path / "hlo.txt").read_text()
    calls = [line for line in hlo.splitlines() if 'custom_call_target="__gpu$xla.gpu.triton"' in line]
    layers = 2  # the tiny reader's encoder
    for kernel in ("text_flash_forward", "text_flash_dkv", "text_flash_dq"):
        assert sum(kernel in line for line in calls) == layers, kernel
    assert any("u8[" in line for line in calls if "text_flash_forward" in line)  # the keep bits: dropout is on


def test_a_gpu_kernel_compiled_on_simulated_cpu_devices_is_replaced_and_said_so():
    out = _aot("--config.model.hardware=h100:text_attention=einsum")
    assert ("traced for gpu (hardware h100:store_vision_residuals=true,window_attention=einsum,"
            "text_attention=einsum)") in out  # the einsums'
    assert "note       window attention as einsum: the GPU's Pallas kernels compile only for a GPU target" in out


@pytest.mark.parametrize("topology", ["h100:x", "a100:0", "h200:-1"])
def test_a_gpu_topology_is_a_gpu_and_a_count(topology):
    from scripts.aot import target_devices

    with pytest.raises(SystemExit, match=r"expected (h100|a100|h200) or \1:N \(N GPUs on one host\)"):
        target_devices(topology)


class _Lowered:
    """A lowered program whose first compile fails with ``error``; records the options of each compile."""

    def __init__(self, error: str):
        self.error, self.options = error, []

    def compile(self, options=None):
        import jax

        self.options.append(options)
        if len(self.options) == 1:
            raise jax.errors.JaxRuntimeError(self.error)
        return "compiled"


def test_a_gpu_compile_that_finds_no_triton_tiling_is_redone_on_cublas_and_said_so():
    """XLA:GPU without a device cannot time its kernels; where its untimed Triton tiling of a product fails,
    the step is compiled again with every product on cuBLAS and the report says so. Other failures, and the
    same message on another platform, are raised."""
    from scripts.aot import compile_lowered

    tiling = "INTERNAL: Couldn't find output tile sizes that satisfy hlo: %dot.1173 = bf16[41024,768]"
    lowered = _Lowered(tiling)
    compiled, note = compile_lowered(lowered, "gpu")
    assert compiled == "compiled" and lowered.options == [None, {"xla_gpu_enable_triton_gemm": False}]
    assert note.startswith("products as cuBLAS calls")
    import jax

    for error, platform in [(tiling, "cpu"), ("RESOURCE_EXHAUSTED: out of memory", "gpu")]:
        with pytest.raises(jax.errors.JaxRuntimeError):
            compile_lowered(_Lowered(error), platform)
