"""Ahead-of-time compilation of the train step for a config, on abstract inputs (no weights, no data)."""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp

from florence_jax import hardware
from florence_jax.config import PRESETS, resolve_dtype
from florence_jax.devices import CompiledMemory, compiled_memory
from florence_jax.processing import IMAGE_LAYOUTS, ImageTransform, pixel_shape
from florence_jax.sharding import batch_sharding, make_mesh
from train.config import PIXEL_DTYPE, TrainConfig
from train.state import _apply_model_options, abstract_train_state, tiny_config
from train.step import jit_train_step


def target_devices(topology: str | None):
    """Devices to compile for: this machine's, a TPU slice described by libtpu (``v5e:4x4``), or GPUs described
    by :data:`florence_jax.hardware.GPU_TARGETS` (``h100``, ``a100:8``: that many on one host). Returns (devices, chip)."""
    if not topology:
        devs = jax.devices()
        return devs, devs[0].platform
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover
        raise SystemExit(f"jax.experimental.topologies unavailable: {e}") from e
    chip = topology.split(":")[0].lower()
    if chip in hardware.GPU_TARGETS:
        return gpu_devices(topology), chip
    try:
        # v4 and v5p chips hold two TensorCores that JAX drives as one device (megacore) with the chip's
        # whole HBM; without this libtpu describes each core as a device with half of it.
        extra = {"chip_config_name": "megacore"} if chip in ("v4", "v5p") else {}
        topo = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                            chips_per_host_bounds=_chips_per_host(topology), num_slices=1,
                                            **extra)
    except Exception as e:
        raise SystemExit(f"cannot describe TPU topology {topology!r} ({type(e).__name__}: {e}); "
                         "install libtpu: pip install 'florence-jax[tpu]'") from e
    return list(topo.devices), chip


def gpu_devices(topology: str):
    """Compile-only devices for ``chip[:count]`` (one host): XLA:GPU's, from the CUDA plugin, which needs no GPU
    and no CUDA libraries to compile (``pip install 'florence-jax[gpu-aot]'``)."""
    chip, _, count = topology.lower().partition(":")
    if not count.isdigit() or int(count) < 1:
        if count:
            raise SystemExit(f"GPU topology {topology!r}: expected {chip} or {chip}:N (N GPUs on one host)")
        count = "1"
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc("florence", platform="cuda", target_config=hardware.gpu_target_config(chip),
                                            topology=f"1x1x{int(count)}")
    except Exception as e:
        raise SystemExit(f"cannot describe {topology!r} for XLA:GPU ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0][:300]}); install JAX's CUDA plugin, which compiles "
                         "without a GPU: pip install -e '.[gpu-aot]'") from e
    return list(topo.devices)


def _chips_per_host(topology: str) -> tuple[int, int, int]:
    chip, shape = topology.split(":")
    dims = [int(x) for x in shape.split("x")]
    if chip in ("v4", "v5p"):  # 4 chips per host as 2x2x1
        return (2, 2, 1)
    if chip in ("v5e", "v5litepod", "v6e"):
        return (2, 2, 1) if len(dims) == 2 else (2, 2, 1)
    return (2, 2, 1)


def model_config_of(cfg: TrainConfig):
    """The abstract model of ``cfg.model.preset`` with the config's model options (no weights are read), its
    positions grown to ``cfg.model.max_positions`` when that is more."""
    if cfg.model.preset == "tiny":
        fc = tiny_config(vocab_size=1088, image_token_id=1024)  # random:tiny's vocabulary (the tiny processor)
    else:
        fc = PRESETS[cfg.model.preset]()
    n = cfg.model.max_positions  # a checkpoint's grow at load (florence_jax.positions); a random model is built so
    if n and (n > fc.text_config.max_position_embeddings or cfg.model.name_or_path.startswith("random:")):
        fc = fc.replace(text_config=dataclasses.replace(fc.text_config, max_position_embeddings=cfg.model.max_positions))
    return _apply_model_options(fc, cfg.model)


def abstract_batch(cfg: TrainConfig, fc, sharding):
    b = cfg.batch_size
    size = cfg.data.image_size
    seq = fc.image_seq_length(size) + cfg.data.max_prompt_tokens
    t = cfg.data.max_target_tokens

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    # The layout the data pipeline ships for this hardware (train.setup.pipeline_image_layout).
    layout = IMAGE_LAYOUTS[hardware.resolve(fc.hardware).pixel_layout]
    return {
        "pixel_values": spec((b, *pixel_shape(size, size, layout)), jnp.dtype(PIXEL_DTYPE)),
        "input_ids": spec((b, seq), jnp.int32),
        "attention_mask": spec((b, seq), jnp.int32),
        "labels": spec((b, t), jnp.int32),
        "label_mask": spec((b, t), jnp.float32),
    }


_TRITON_TILING = "Couldn't find output tile sizes"


def compile_lowered(lowered, platform: str):
    """``lowered.compile()``, and what the report should say about how. Compiling for a described GPU, XLA:GPU
    cannot time its kernels, and its untimed choice of a Triton tiling for a product can fail where on the
    device it would time others: the program is then compiled with every product on cuBLAS, and said so.
    Any other failure, or one on another platform, is raised."""
    try:
        return lowered.compile(), ""
    except jax.errors.JaxRuntimeError as e:
        if platform not in ("gpu", "cuda") or _TRITON_TILING not in str(e):
            raise
    return (lowered.compile({"xla_gpu_enable_triton_gemm": False}),
            "products as cuBLAS calls: XLA:GPU found no Triton tiling for one without timing them on the device")


def compile_train_step(cfg: TrainConfig, devices, platform: str | None = None) -> dict:
    """Lower and compile the config's train step for ``devices``; return memory figures in bytes.

    The step is traced for the config's hardware (``cfg.model.hardware``, see :mod:`florence_jax.hardware`),
    or for ``platform`` when given (a topology's chip); with neither, for the devices'. A GPU config
    compiled on simulated CPU devices so traces the GPU's program: the formulations are part of the model.
    A TPU's or GPU's Pallas kernels compile for their own target only: elsewhere XLA's formulations stand in
    for them (and XLA:CPU gets the stored residual stream it needs: :func:`florence_jax.hardware.runnable_on`),
    and the report's note says so.
    """
    formulations = hardware.resolve(cfg.model.hardware, platform=platform, auto=devices[0].platform)
    # A Pallas kernel compiles for its own target only: on other devices the platform's program takes XLA's
    # formulations (the einsum attention holds its scores in memory: the figure is an upper bound).
    formulations, changed = hardware.runnable_on(formulations, devices[0].platform)
    where = {"tpu": "; --topology (with libtpu) compiles the TPU's own program",
             "gpu": "; --topology compiles the GPU's own program"}
    notes = [changed + where.get(formulations.platform, "")] if changed else []
    fc = model_config_of(cfg).replace(hardware=formulations)
    data = cfg.mesh.data if cfg.mesh.data > 0 else len(devices) // cfg.mesh.fsdp
    mesh = make_mesh(data, cfg.mesh.fsdp, devices=devices[: data * cfg.mesh.fsdp])
    table = ImageTransform(size=(cfg.data.image_size, cfg.data.image_size)).table  # Florence-2's processor
    fns, state = abstract_train_state(fc, cfg.optim, 1000, mesh, grad_accum_steps=cfg.grad_accum_steps,
                                      min_shard_size=cfg.mesh.fsdp_min_size, lora=cfg.lora, pixel_table=table,
                                      shard_optimizer=cfg.mesh.shard_optimizer)
    bsh = batch_sharding(mesh)
    batch = abstract_batch(cfg, fc, bsh)
    repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=repl)
    step = jit_train_step(fns, state, bsh)
    t0 = time.time()
    lowered = step.lower(state, batch, key)
    compiled, fallback = compile_lowered(lowered, devices[0].platform)
    note = "; ".join(filter(None, [*notes, fallback]))
    seconds = time.time() - t0
    mem = compiled_memory(compiled) or CompiledMemory(0, 0, 0, 0)
    return {"mesh": dict(mesh.shape), "compile_seconds": seconds, "dtype": str(resolve_dtype(cfg.model.dtype)),
            "platform": formulations.platform, "hardware": formulations.spec(), "note": note,
            **dataclasses.asdict(mem),
            "total": mem.total, "compiled": compiled}


def compiler_cost(compiled) -> dict[str, float]:
    """The compiler's own cost figures for one step of ``compiled`` (per device): ``flops``, ``bytes accessed``,
    ``transcendentals`` and, where the backend gives one (TPU), ``optimal_seconds``, its estimated time."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - a backend without a cost model
        return {}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    keep = ("flops", "bytes accessed", "transcendentals", "optimal_seconds")
    return {k: float(cost[k]) for k in keep if k in (cost or {})}
