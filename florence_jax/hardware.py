"""The hardware a program is built for, as one explicit fact, and the formulations it selects.

A few computations in the model, in generation and in input normalization have more than one exact
formulation, and which is fastest depends on how a backend's compiler treats it. Each choice is a named
field of :class:`Formulations`; :func:`resolve` turns a hardware spec into a frozen set of them, once.
The set is part of the model's config (``Florence2Config.hardware``), so it lives in the model's static
structure like ``scan_vision_blocks``: jit caches by it, and a program traced for a GPU on this CPU (the
ahead-of-time check) is the GPU's program without touching any process-wide state.

A spec is a platform or accelerator name, optionally followed by formulation overrides::

    "cpu"                                   # the CPU defaults
    "h100"                                  # a GPU's defaults; the device names its memory and peak
    "gpu:depthwise_conv=grouped"            # the GPU defaults, one choice changed (an A/B run)
    None or "auto"                          # the backend JAX will run the program on

Every formulation computes the same function; the tests check each pair against each other. Which
defaults were measured on which hardware is in ``docs/benchmarks.md`` ("Formulations per backend").
"""

from __future__ import annotations

import dataclasses
import glob
import os
from dataclasses import dataclass
from typing import Any

PLATFORMS = ("cpu", "gpu", "tpu")
_ALIASES = {"cuda": "gpu", "rocm": "gpu"}


@dataclass(frozen=True)
class Formulations:
    """One choice per formulation that has a backend-dependent best. Hashable: a static model field."""

    platform: str
    # DaViT's 3x3 depthwise convolutions: nine shifted multiply-adds ("shifted_sum"), XLA's grouped
    # convolution ("grouped", ``feature_group_count`` = channels), which XLA:CPU computes as a dense
    # C x C convolution, or one Pallas kernel for the convolution and its residual that reads the
    # residual stream in the tokens' layout, where XLA:TPU copies it into the grouped convolution's and
    # back ("fused": a TPU kernel, its backward the grouped convolution's; on the CPU it runs in Pallas'
    # interpreter, for tests; florence_jax.modeling.dwconv_kernel), or the CPU kernel for the convolution
    # and its residual ("kernel": florence_jax.cpu_kernels, its backward the shifted sum's; the shifted sum
    # where the kernel cannot be built or take the input; refused off the CPU, as every CPU_ONLY choice).
    depthwise_conv: str
    # A vision block's residual stream stored once rather than recomputed by each consumer: XLA:CPU fuses
    # the cheap elementwise stream into every consumer, recomputing long chains of shifted slices.
    store_vision_residuals: bool
    # A stage scan's small parameters (biases, norms, depthwise kernels) passed to the next iteration
    # through the carry instead of sliced from the stack in place: XLA:CPU computes a slice fused into an
    # elementwise consumer once per element.
    carry_small_scan_params: bool
    # The einsum attention path's operand layout for (batch, length, heads, dim) inputs: transposed to
    # heads-major first ("heads_major", where XLA:CPU's batched matmuls are fastest) or contracted as they
    # are ("sequence_major", leaving the layout to the compiler).
    attention_layout: str
    # Beam search: each beam's cross-attention query on its own ("per_beam": matrix-vector products, which
    # XLA:CPU runs faster than a product with a few query rows) or a row's beams as one product ("batched").
    # Where decode_attention="kernel" runs a step's attention, this is what it falls back to.
    beam_cross_attention: str
    # Beam search's KV cache after a step: only the rows of extra children copied one by one ("row_by_row",
    # saving the CPU most of a step's cache traffic), or one gather of the whole cache as transformers does
    # ("gather": on an accelerator a loop of small copies costs a launch per row).
    beam_cache_copy: str
    # uint8 pixels to the model's input: a gather from the processor's table ("gather"), a one-hot product
    # with it ("one_hot": the gather's bits without a gather, which TPUs run element by element), or the
    # table's affine map computed ("affine": one elementwise pass, within float32 rounding of the table).
    pixel_normalize: str
    # The layout pixel batches travel in to the vision tower: the image, NHWC ("image"), or rearranged by the
    # data workers into 4x4 blocks of 48 channels ("space_to_depth", ``processing.space_to_depth``), which
    # the first convolution (7x7, stride 4, over 3 colors) takes as a 2x2 convolution over 48 channels.
    # XLA:TPU lays a 3-channel image out for that convolution with the batch in lanes, a copy the compiler
    # estimates at 4.0 ms of a v5e's step for 16 images, and does the same rearrangement on the device no
    # faster; the data workers do it in about a millisecond per 768 px image (docs/scale-out.md).
    pixel_layout: str = "image"
    # DaViT's channel attention where a stage has more tokens than channels: the projections q, k, v (n x 3C),
    # q^T k and the output projection as the reference computes them ("projected"), or the same function
    # from the tokens' (C, C) Gram matrix with the probabilities folded into one (C, C) matrix per example
    # ("folded": 4nC^2 + 4C^3 multiply-adds against 8nC^2, and no product over the tokens of q, k and v, which
    # XLA:TPU transposed first; florence_jax.modeling.davit._folded_channel_attention). Fewer products on
    # every backend: XLA:CPU ran the base tower's forward 9% faster (docs/benchmarks.md).
    channel_attention: str = "folded"
    # The tied LM head's product: hidden states against the embedding's transpose ("hidden_major", one row
    # per position) or the embedding against the hidden states' transpose, its (vocab, rows) output turned
    # back after an optimization barrier ("vocab_major": XLA:CPU runs a product of 12 decoding rows with
    # 51k vocabulary rows about twice as fast with the vocabulary as the product's rows).
    lm_head_product: str = "hidden_major"
    # The decoding loop's weight products: florence_jax's CPU kernel for a few rows times a large matrix,
    # on weights packed panel-major once per generation ("kernel": about twice XLA:CPU's speed at 12 rows,
    # built at first use with the host's C++ compiler; without one the loop keeps XLA's dots, with a
    # warning; florence_jax.cpu_kernels); whatever the compiler picks ("compiler": on XLA:CPU, YNNPACK's); or,
    # on XLA:CPU, its Eigen kernels with YNNPACK's fusions turned off for that program ("eigen"). Between
    # the last two the faster depends on the host (docs/benchmarks.md). Off the CPU only "compiler" is
    # accepted. The vision tower and the train step keep the compiler's choice either way.
    decode_dots: str = "compiler"
    # A decoding step's attention, cross- and self-: XLA's products ("compiler"), or florence_jax's CPU kernel
    # ("kernel": each prompt's encoder keys and values read once for all its beams, and each row's cache,
    # the (row, head) pairs split among threads, where XLA:CPU runs one matrix-vector product per beam and
    # head on one core; keys stored panel-major over positions; florence_jax.cpu_kernels). Where the kernel
    # cannot be built it changes nothing; off the CPU it is refused.
    decode_attention: str = "compiler"
    # Beam search's choice of each row's best 2 x beams continuations among beams x vocabulary scores: XLA's
    # TopK ("compiler": on XLA:CPU a partial sort, one row at a time) or florence_jax's CPU kernel
    # ("kernel": one pass against the running k-th best, rows split among threads; the same indices, ties
    # to the lower index). Refused off the CPU.
    decode_top_k: str = "compiler"
    # The decoding loop's self-attention cache: one buffer of every slot the generation may write, attended
    # whole at each step behind a mask ("preallocated"), or grown in segments of ``CACHE_SEGMENT`` slots, one
    # loop per size, so a step attends over the written segments only ("segments": XLA:CPU's batched
    # matrix-vector products read the cache on one core, and at 256 new tokens the whole buffer cost a
    # beam-3 step about as much as its cross-attention).
    decode_cache: str = "preallocated"
    # DaViT's window attention: einsums around a float32 softmax, which XLA:TPU passes through HBM three
    # times per window and XLA:CPU runs as small products on one core ("einsum"); one Pallas kernel per
    # block of windows taking the qkv projection's output as it lies and keeping each head's scores on chip
    # ("fused": a TPU kernel; on the CPU it runs in Pallas' interpreter, for tests;
    # florence_jax.modeling.window_kernel); or florence_jax's CPU kernel, every (window, head) pair from the
    # qkv projection's output, the pairs split among threads, its gradient through the einsums ("kernel":
    # about 3x XLA:CPU's speed at 768 px; float32 only: for other dtypes and where the kernel cannot be built
    # it changes nothing; refused off the CPU; florence_jax.cpu_kernels); or the project's Pallas
    # flash-attention kernels for GPUs, forward and backward, the scores never in HBM ("flash", the GPU's
    # default: florence_jax.modeling.flash_window; windows whose tokens are not a multiple of 16 or heads not a
    # power of two of at least 16 channels take the einsums; on the CPU in Pallas' interpreter, for tests;
    # refused on a TPU).
    window_attention: str = "einsum"
    # BART's encoder self-attention over the image tokens and the prompt: einsums around a float32 masked
    # softmax and its dropout, whose (batch, heads, length, length) scores and dropout draws XLA:TPU passes
    # through HBM several times ("einsum"), or one Pallas kernel per example and four heads that reads the
    # projections' outputs as they lie and keeps scores and dropout draws on chip ("fused": a TPU kernel; on
    # the CPU it runs in Pallas' interpreter, for tests; florence_jax.modeling.text_attention_kernel), or
    # flash-attention kernels for GPUs, forward and backward, with the same dropout draws computed on chip
    # and kept as a byte of four heads' bits per query and key for the backward ("flash", the GPU's default:
    # florence_jax.modeling.flash_text; heads not in fours of a power of two of at least 16 channels take the
    # einsums; on the CPU in Pallas' interpreter, for tests; refused on a TPU).
    text_attention: str = "einsum"
    # A vision stage's identical blocks (nine in the third stage of base and large): one lax.scan over their
    # stacked parameters ("scan": one block compiled; unrolled, XLA:CPU fused nine blocks' elementwise work
    # together and never finished compiling the float32 step), or one block after another ("unrolled":
    # XLA:GPU compiles the full base step so in 88 s here, and its program no longer copies each block's
    # saved activations into the scan's stacks and back; the full step's roofline estimate on an H100
    # 172.1 -> 144.4 ms, docs/scale-out.md). model.scan_vision_blocks=False unrolls on every platform.
    vision_stages: str = "scan"
    # DaViT blocks' LayerNorm statistics, for bfloat16 inputs of at least 512 channels: float32 reductions
    # over the channels ("vector"), or float32 sums of exact products with a matrix of ones on the matrix
    # unit, the square split into two exact bfloat16 parts ("matrix": XLA:TPU reduces over the lanes on the
    # vector unit and leaves the statistics across the lanes; florence_jax.modeling.layers.matrix_moments).
    # The statistics differ by the order of float32 sums; the backward pass is the same.
    layer_norm_stats: str = "vector"
    # The accelerator, when the spec named one ("a100", "v5e"): its memory and peak (DEVICE_SPECS) for
    # the ahead-of-time memory check and MFU. No formulation depends on it yet.
    device: str = ""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            allowed = _CHOICES.get(f.name)
            value = getattr(self, f.name)
            if allowed is not None and value not in allowed:
                raise ValueError(f"hardware formulation {f.name}={value!r}: expected one of "
                                 + ", ".join(map(repr, allowed)))
        for name, other in TPU_KERNELS.items():
            if getattr(self, name) == "fused" and self.platform == "gpu":
                hint = ("; model.attention_impl='dot_product' hands attention to jax.nn.dot_product_attention "
                        "(XLA's attention in this jax, not cuDNN's)" if name.endswith("attention") else "")
                flash = " or 'flash' (the GPU's kernel)" if name in GPU_KERNELS else ""
                raise ValueError(f"hardware formulation {name}='fused' is a TPU kernel; on a GPU, use "
                                 f"{name}={other!r}{flash}{hint}")
        for name in GPU_KERNELS:
            if getattr(self, name) == "flash" and self.platform == "tpu":
                raise ValueError(f"hardware formulation {name}='flash' is a GPU kernel; on a TPU, use "
                                 f"{name}={getattr(DEFAULTS['tpu'], name)!r} (its default)")
        for name, choices in CPU_ONLY.items():
            value = getattr(self, name)
            if value in choices and self.platform != "cpu":
                # elsewhere the choice would change nothing: say so rather than run something else silently
                what = "an XLA:CPU option" if value == "eigen" else "a CPU kernel (florence_jax.cpu_kernels)"
                other = getattr(DEFAULTS[self.platform], name)
                raise ValueError(f"hardware formulation {name}={value!r} is {what}; on a "
                                 f"{self.platform.upper()}, use {name}={other!r} (its default)")

    def spec(self) -> str:
        """The shortest spec that resolves to this set: the platform plus what differs from its defaults."""
        base = DEFAULTS[self.platform]
        changed = [f"{f.name}={_format(getattr(self, f.name))}" for f in dataclasses.fields(self)
                   if f.name not in ("platform", "device") and getattr(self, f.name) != getattr(base, f.name)]
        return (self.device or self.platform) + (":" + ",".join(changed) if changed else "")


_CHOICES: dict[str, tuple[Any, ...]] = {
    "platform": PLATFORMS,
    "depthwise_conv": ("shifted_sum", "grouped", "fused", "kernel"),
    "store_vision_residuals": (True, False),
    "carry_small_scan_params": (True, False),
    "attention_layout": ("heads_major", "sequence_major"),
    "beam_cross_attention": ("per_beam", "batched"),
    "beam_cache_copy": ("row_by_row", "gather"),
    "pixel_normalize": ("gather", "one_hot", "affine"),
    "pixel_layout": ("image", "space_to_depth"),
    "channel_attention": ("projected", "folded"),
    "lm_head_product": ("hidden_major", "vocab_major"),
    "decode_dots": ("compiler", "eigen", "kernel"),
    "decode_attention": ("compiler", "kernel"),
    "decode_top_k": ("compiler", "kernel"),
    "decode_cache": ("preallocated", "segments"),
    "window_attention": ("einsum", "fused", "kernel", "flash"),
    "text_attention": ("einsum", "fused", "flash"),
    "vision_stages": ("scan", "unrolled"),
    "layer_norm_stats": ("vector", "matrix"),
}
# The formulations whose "fused" choice is a Pallas TPU kernel, and what a program built for the TPU takes
# instead on other devices (kernels_for, runnable_on).
TPU_KERNELS = {"window_attention": "einsum", "text_attention": "einsum", "depthwise_conv": "grouped"}
# The formulations whose "flash" choice is a Pallas kernel for GPUs (Triton), and what a program built for a
# GPU takes instead on other devices (kernels_for).
GPU_KERNELS = {"window_attention": "einsum", "text_attention": "einsum"}
_PALLAS_KERNELS = {"tpu": ("fused", TPU_KERNELS), "gpu": ("flash", GPU_KERNELS)}
# The choices that exist on the CPU alone (florence_jax.cpu_kernels, XLA:CPU's options): refused elsewhere.
CPU_ONLY = {"depthwise_conv": ("kernel",), "window_attention": ("kernel",), "decode_dots": ("kernel", "eigen"),
            "decode_attention": ("kernel",), "decode_top_k": ("kernel",)}
# Formulations.decode_cache="segments": the cache grows by this many slots at a time.
CACHE_SEGMENT = 64
_FORMULATIONS = tuple(n for n in _CHOICES if n != "platform")  # the names a spec may change

# Each backend's defaults. docs/benchmarks.md ("Formulations per backend") gives the measurement behind
# each and lists the ones no run on that hardware has chosen yet: the GPU keeps the CPU's depthwise
# convolution and attention layout until scripts/device_bench.sh (MODE=ab) compares them there, and its
# unrolled vision stages and flash attention kernels follow XLA:GPU's program compiled here
# (docs/scale-out.md), no GPU having run them;
# the TPU's depthwise convolution, window attention, pixel normalization, pixel layout and LayerNorm
# statistics follow the TPU compiler's estimates (docs/scale-out.md), no chip having run them.
DEFAULTS: dict[str, Formulations] = {
    "cpu": Formulations("cpu", depthwise_conv="kernel", store_vision_residuals=True,
                        carry_small_scan_params=True, attention_layout="heads_major",
                        beam_cross_attention="per_beam", beam_cache_copy="row_by_row", pixel_normalize="gather",
                        lm_head_product="vocab_major", decode_dots="kernel", decode_attention="kernel",
                        decode_top_k="kernel", decode_cache="segments", window_attention="kernel"),
    "gpu": Formulations("gpu", depthwise_conv="shifted_sum", store_vision_residuals=False,
                        carry_small_scan_params=False, attention_layout="heads_major",
                        beam_cross_attention="batched", beam_cache_copy="gather", pixel_normalize="gather",
                        vision_stages="unrolled", window_attention="flash", text_attention="flash"),
    "tpu": Formulations("tpu", depthwise_conv="fused", store_vision_residuals=False,
                        carry_small_scan_params=False, attention_layout="heads_major",
                        beam_cross_attention="batched", beam_cache_copy="gather", pixel_normalize="affine",
                        pixel_layout="space_to_depth", window_attention="fused", text_attention="fused",
                        layer_norm_stats="matrix"),
}

# XLA:CPU compiler options for Formulations.decode_dots="eigen": no library fusion for YNNPACK, so every
# dot goes to XLA's own (Eigen) kernels.
_EIGEN_DOTS = (("xla_cpu_experimental_ynn_fusion_type", ""),)


def decode_compiler_options(f: Formulations) -> tuple[tuple[str, str], ...]:
    """The compiler options of a program that runs the decoding loop built for ``f`` (hashable, for a jit
    cache key): YNNPACK's dots off on the CPU under ``decode_dots="eigen"``, else none."""
    return _EIGEN_DOTS if f.platform == "cpu" and f.decode_dots == "eigen" else ()


def _format(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _parse_value(name: str, text: str) -> Any:
    if name not in _FORMULATIONS:
        known = ", ".join(_FORMULATIONS)
        raise ValueError(f"unknown hardware formulation {name!r}: expected one of {known}")
    if _CHOICES[name] == (True, False):
        if text.lower() not in ("true", "false"):
            raise ValueError(f"hardware formulation {name} takes true or false, got {text!r}")
        return text.lower() == "true"
    return text


def kernels_for(f: Formulations, runs_on: str) -> tuple[Formulations, str]:
    """``f`` for a program that compiles for ``runs_on`` (a platform): a TPU's or GPU's Pallas kernels compile
    for their own platform only, so where the formulations are another platform's, XLA's formulations stand
    in for its kernels (the einsum attention, the grouped convolution: the same values, rounded differently).
    Returns the formulations and a note naming what stands in ("" where nothing does)."""
    runs_on = platform_name(runs_on)
    choice, stand_ins = _PALLAS_KERNELS.get(f.platform, ("", {}))
    kernels = [n for n in stand_ins if getattr(f, n) == choice] if runs_on != f.platform else []
    if not kernels:
        return f, ""
    note = (", ".join(f"{n.replace('_', ' ')} as {stand_ins[n]}" for n in kernels)
            + f": the {f.platform.upper()}'s Pallas kernels compile only for a {f.platform.upper()} target")
    return dataclasses.replace(f, **{n: stand_ins[n] for n in kernels}), note


def runnable_on(f: Formulations, runs_on: str) -> tuple[Formulations, str]:
    """``f`` for a program that XLA compiles for ``runs_on`` (a platform) and that may run there: what
    :func:`kernels_for` replaces and, on the CPU, the vision blocks' residual stream stored where shifted sums
    would read it unstored (XLA:CPU fuses the sums' slices with an unstored stream and recomputes it block
    after block: the GPU's float32 vision tower, base at 192 px, outgrew 8 GiB in six minutes of compiling;
    with the stores, which change no value, it compiles in seconds). Returns the formulations and a note
    naming each change ("" where nothing changes)."""
    runs_on = platform_name(runs_on)
    f, note = kernels_for(f, runs_on)
    notes = [note] if note else []
    if (runs_on == "cpu" and f.platform != "cpu" and f.depthwise_conv == "shifted_sum"
            and not f.store_vision_residuals):
        f = dataclasses.replace(f, store_vision_residuals=True)
        notes.append("the vision blocks' residual stream stored: XLA:CPU recomputes an unstored one inside "
                     "the shifted sums' fusions")
    return f, "; ".join(notes)


def backend() -> str:
    """The platform JAX runs programs on here (``cpu``, ``gpu`` or ``tpu``): the one answer to that question.

    Read from JAX's default backend once JAX has started one; before that (deciding how to set up the
    process without starting a backend), from ``JAX_PLATFORMS`` or the machine's accelerator device nodes.
    """
    import jax

    try:
        from jax._src import xla_bridge

        started = bool(getattr(xla_bridge, "_backends", None))
    except ImportError:  # pragma: no cover - a future jax without the private module
        started = True
    if started:
        return platform_name(jax.default_backend())
    return predicted_backend()


def predicted_backend() -> str:
    """The platform JAX will pick, decided without starting a backend: the first of ``JAX_PLATFORMS``, else
    ``gpu`` or ``tpu`` when the machine has such a device node, else ``cpu``."""
    wanted = os.environ.get("JAX_PLATFORMS", "").strip()
    if wanted:
        first = wanted.split(",")[0].strip().lower()
        return _ALIASES.get(first, first)
    if any(glob.glob(p) for p in ("/dev/nvidia[0-9]*", "/dev/kfd")):
        return "gpu"
    if any(glob.glob(p) for p in ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*")):
        return "tpu"
    return "cpu"


def platform_name(name: str) -> str:
    """A backend's name as one of :data:`PLATFORMS` (``cuda`` and ``rocm`` are ``gpu``)."""
    name = _ALIASES.get(name.lower(), name.lower())
    if name not in PLATFORMS:
        raise ValueError(f"unknown platform {name!r}: expected one of {', '.join(PLATFORMS)}")
    return name


def resolve(spec: str | Formulations | None = None, *, platform: str | None = None,
            auto: str | None = None) -> Formulations:
    """The formulations for ``spec``: a :class:`Formulations` (returned as is), or a spec string
    ``platform[:name=value,...]``; None, ``""`` or ``"auto"`` as the platform mean the backend that runs
    the program (or ``auto`` when given: the devices a program is compiled for ahead of time).
    ``platform`` replaces the spec's platform and keeps its single changes."""
    if isinstance(spec, Formulations) and platform is None:
        return spec
    if isinstance(spec, Formulations):
        spec = spec.spec()
    if spec is not None and not isinstance(spec, str):
        raise TypeError(f"hardware must be a spec string or Formulations, got {type(spec).__name__}")
    text = (spec or "").strip()
    head, _, rest = text.partition(":")
    head = (platform or head).strip().lower()
    if head in ("", "auto"):
        head = auto or backend()
    device = ""
    if head not in PLATFORMS and head not in _ALIASES:
        spec_row = DEVICE_SPECS.get(head)
        if spec_row is None:
            raise ValueError(f"unknown hardware {head!r}: expected one of {', '.join(PLATFORMS)} or an "
                             f"accelerator ({', '.join(DEVICE_SPECS)})")
        device, head = head, spec_row.platform
    overrides: dict[str, Any] = {"device": device}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"hardware spec {text!r}: {item!r} is not name=value")
        overrides[key.strip()] = _parse_value(key.strip(), value.strip())
    return dataclasses.replace(DEFAULTS[platform_name(head)], **overrides)


# --------------------------------------------------------------------------- device facts
@dataclass(frozen=True)
class DeviceSpec:
    """Public figures of an accelerator: its platform, memory per device, dense bf16 peak (for MFU), memory
    bandwidth (for roofline estimates) and, for TPUs, the clock the peak implies (4 or 8 128x128 matrix
    units per chip), which turns the TPU compiler's per-op cycle estimates into time."""

    platform: str
    hbm_gib: float
    peak_tflops: float
    hbm_gbps: float = 0.0
    clock_ghz: float = 0.0


# Keys are matched as substrings of a device's lower-cased kind ("NVIDIA H100 80GB HBM3", "TPU v5 lite")
# or of a topology's chip name ("v5e"); the longest matching key wins.
DEVICE_SPECS: dict[str, DeviceSpec] = {
    "a100": DeviceSpec("gpu", 40, 312.0, 1555.0),
    "h100": DeviceSpec("gpu", 80, 989.0, 3350.0),
    "h200": DeviceSpec("gpu", 141, 989.0, 4800.0),
    "v4": DeviceSpec("tpu", 32, 275.0, 1228.0, 1.05),
    "v5 lite": DeviceSpec("tpu", 16, 197.0, 819.0, 1.5),
    "v5litepod": DeviceSpec("tpu", 16, 197.0, 819.0, 1.5),
    "v5e": DeviceSpec("tpu", 16, 197.0, 819.0, 1.5),
    "v5p": DeviceSpec("tpu", 95, 459.0, 2765.0, 1.75),
    "v6e": DeviceSpec("tpu", 32, 918.0, 1640.0),
    "v6 lite": DeviceSpec("tpu", 32, 918.0, 1640.0),
}


@dataclass(frozen=True)
class GpuTarget:
    """What XLA:GPU reads from a GPU to build its program, from the GPU's public data sheet: the device kind
    the driver reports, compute capability, SMs, FP32 units per SM, shared memory per block (opt-in) and per
    SM, L2 and boost clock (scripts.aot_compile compiles for it without a GPU). Memory size and bandwidth
    are the :data:`DEVICE_SPECS` row's."""

    kind: str
    capability: tuple[int, int]
    sms: int
    fp32_per_sm: int
    smem_per_block_optin: int
    smem_per_sm: int
    l2_mib: int
    clock_ghz: float


GPU_TARGETS: dict[str, GpuTarget] = {
    "a100": GpuTarget("NVIDIA A100-SXM4-40GB", (8, 0), 108, 64, 166912, 167936, 40, 1.41),
    "h100": GpuTarget("NVIDIA H100 80GB HBM3", (9, 0), 132, 128, 232448, 233472, 50, 1.98),
    "h200": GpuTarget("NVIDIA H200", (9, 0), 132, 128, 232448, 233472, 50, 1.98),
}


def gpu_target_config(chip: str) -> str:
    """XLA:GPU's target description (a ``GpuTargetConfigProto`` in text form) of :data:`GPU_TARGETS`
    ``chip``: with it the GPU compiler builds a program for that GPU on a machine without one."""
    t, spec = GPU_TARGETS[chip], DEVICE_SPECS[chip]
    info = {"threads_per_block_limit": 1024, "threads_per_warp": 32, "shared_memory_per_block": 49152,
            "shared_memory_per_block_optin": t.smem_per_block_optin, "shared_memory_per_core": t.smem_per_sm,
            "threads_per_core_limit": 2048, "core_count": t.sms, "fpus_per_core": t.fp32_per_sm,
            "block_dim_limit_x": 2**31 - 1, "block_dim_limit_y": 65535, "block_dim_limit_z": 65535,
            "memory_bandwidth": int(spec.hbm_gbps * 1e9), "l2_cache_size": t.l2_mib * 2**20,
            "clock_rate_ghz": t.clock_ghz, "device_memory_size": int(spec.hbm_gib * 2**30),
            "registers_per_core_limit": 65536, "registers_per_block_limit": 65536}
    lines = [f"  {k}: {v}" for k, v in info.items()]
    major, minor = t.capability
    lines.append(f"  cuda_compute_capability {{ major: {major} minor: {minor} }}")
    return ("gpu_device_info {\n" + "\n".join(lines) + "\n}\n"
            f'platform_name: "CUDA"\ndevice_description_str: "{t.kind}"\n')


def device_spec(kind: str) -> DeviceSpec | None:
    """The :data:`DEVICE_SPECS` row whose key occurs in ``kind`` (a device kind, chip or config name)."""
    kind = kind.lower()
    for key in sorted(DEVICE_SPECS, key=len, reverse=True):
        if key in kind:
            return DEVICE_SPECS[key]
    return None
