"""Ours against the PyTorch reference, in one run, on one device: train steps, generation, data pipeline.

    python -m scripts.benchmark                       # the device's default settings (CPU: base, 768px, fp32)
    python -m scripts.benchmark --json bench.json     # also write the figures as JSON
    python -m scripts.benchmark --only train_frozen,decode_beam3 --repeats 5

The reference is transformers' ``Florence2ForConditionalGeneration`` run the way the reference fine-tuning
recipe runs it (``model(..., labels=...)``, ``loss.backward()``, ``torch.optim.AdamW``, a linear schedule;
``generate()`` for inference), on the same random base-size weights (saved once and loaded by both, so
nothing is downloaded), the same batch, resolution and precision. Compile / warm-up time is reported
separately; each figure is the median of ``--repeats`` timed runs, with the spread (min-max).

Rows (the ``--json`` keys): ``train_frozen`` / ``train_full`` (examples/s of a full optimizer step, vision
tower frozen or trained), ``train_frozen_cached`` (the frozen step on vision features computed once, as
``data.cache_vision_features`` trains; its one-time cost per example is reported beside it), ``generate_greedy`` / ``generate_beam3`` (sequences/s end to end: vision tower,
encoder, a fixed number of new tokens), ``decode_beam3`` (the decoding loop alone, from the same encoder
outputs), ``data`` (images/s of one worker turning encoded image bytes + text into a model-ready example),
``label`` (images/s of ``<OD>`` labelling from JPEG files to post-processed boxes: ``florence_jax.label`` against
transformers' processor + ``generate()`` + ``post_process_generation`` in a loop over the same files).
Each holds ``ours``, ``reference``, ``unit`` and ``ratio`` (ours / reference, higher is better).
MFU uses the step's FLOP count from the compiled XLA program and the device's peak (``--peak_tflops``;
known for A100/H100/H200/TPU, not for CPUs). Beside each timed train step a matrix product of the compute
dtype is timed too (``gemm_probe``; ``--no_gemm`` skips it), and the row gives the share of that product's
rate the step's counted FLOPs reach (``gemm_share``: per step against the product timed right before it, the
median): the device's attainable rate, measured in the same minute, where MFU takes a data-sheet peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from florence_jax import hardware

ROWS = ("train_frozen", "train_full", "generate_greedy", "generate_beam3", "decode_beam3", "data",
        "train_frozen_cached", "label")
VISION_FROZEN = r"^model\.vision_tower\."


@dataclasses.dataclass
class Settings:
    size: str = "base"
    image_size: int = 768
    dtype: str = "float32"
    train_batch: int = 2
    gen_batch: int = 4
    new_tokens: int = 256
    prompt_tokens: int = 16  # text tokens after the image tokens, padded
    target_tokens: int = 32
    no_repeat_ngram_size: int = 3  # what Florence-2's Hub generation configs set
    repeats: int = 3
    remat_policy: str = "none"
    attention_impl: str = "xla"
    torch_compile: bool = False
    data_images: int = 16
    memory_only: bool = False  # train rows: compile and report the program's memory, run nothing
    grad_accum_steps: int = 1  # train rows: the batch as this many micro-batches, one update (both sides)
    profile: str | None = None  # train rows: also profile one step of ours into this directory
    hardware: str = ""  # ours: the formulations' spec (florence_jax.hardware); "" for this backend's defaults
    label_images: int = 8  # label row: images labelled per timed run
    label_beams: int = 3  # label row: Florence-2's published setting
    gemm: bool = True  # train rows: measure the device's matrix-product rate beside each timed step


def defaults_for(platform_name: str) -> Settings:
    if platform_name == "cpu":
        return Settings()
    # One accelerator: bf16 compute (fp32 master weights), batches that keep it busy.
    return Settings(dtype="bfloat16", train_batch=32, gen_batch=32, repeats=5, attention_impl="dot_product",
                    data_images=64, label_images=256)


# ------------------------------------------------------------------------------------------ timing
@dataclasses.dataclass
class Timing:
    first_s: float  # first call: compile / warm-up included
    times_s: list[float]
    probe: list[float] = dataclasses.field(default_factory=list)  # a probe's reading before each timed run

    @property
    def median(self) -> float:
        return statistics.median(self.times_s)

    def spread(self) -> str:
        return f"{min(self.times_s):.3g}-{max(self.times_s):.3g} s"


def measure(fn: Callable[[], Any], repeats: int, probe: Callable[[], float] | None = None) -> Timing:
    """``fn``'s first call, then ``repeats`` timed calls; ``probe`` (if given) is read right before each timed
    call, untimed, so that each time has a reading of the same minute beside it."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times, readings = [], []
    for _ in range(repeats):
        if probe is not None:
            readings.append(probe())
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing(first, times, readings)


# The matrix product each train row is held against, (M, K, N) in the compute dtype: on the CPU the float32
# product docs/benchmarks.md has measured the host's peak with since 2026-12-05; on an accelerator a cube
# large enough to keep it busy for about a millisecond.
GEMM_SHAPES = {"cpu": (4096, 768, 3072)}
ACCELERATOR_GEMM = (8192, 8192, 8192)


def gemm_probe(dtype: str, platform_name: str, shape: tuple[int, int, int] | None = None, calls: int = 3,
               clock: Callable[[], float] = time.perf_counter) -> Callable[[], float]:
    """A function that measures the device's matrix-product rate now (FLOP/s: the median of ``calls`` timed
    ``(M, K) @ (K, N)`` products, compiled by XLA). The train rows read it before each timed step
    (:func:`measure`), so the share of it a step reaches is taken in the same minute: a host whose speed
    drifts from hour to hour moves both alike."""
    import jax
    import jax.numpy as jnp

    m, k, n = shape or GEMM_SHAPES.get(platform_name, ACCELERATOR_GEMM)
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (m, k), jnp.dtype(dtype))
    b = jax.random.normal(kb, (k, n), jnp.dtype(dtype))
    product = jax.jit(jnp.dot)
    jax.block_until_ready(product(a, b))  # compiled and warm before the first reading
    flops = 2.0 * m * k * n

    def probe() -> float:
        times = []
        for _ in range(calls):
            t0 = clock()
            jax.block_until_ready(product(a, b))
            times.append(clock() - t0)
        return flops / statistics.median(times)

    return probe


def progress(msg: str) -> None:
    print(f"[benchmark {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ models
def build_reference(s: Settings, directory: str):
    """A random transformers Florence-2 of the chosen size, saved as safetensors for our loader."""
    import torch

    from florence_jax.reference import BASE_TEXT, BASE_VISION, LARGE_TEXT, LARGE_VISION, hf_config

    vision, text = (BASE_VISION, BASE_TEXT) if s.size == "base" else (LARGE_VISION, LARGE_TEXT)
    cfg = hf_config(vision, text)
    torch.manual_seed(0)
    from transformers import Florence2ForConditionalGeneration

    model = Florence2ForConditionalGeneration(cfg).eval()
    model.save_pretrained(directory)
    return model


def torch_device(platform_name: str | None = None):
    """The reference's device: CUDA where JAX runs on a GPU (and torch sees one), else the CPU."""
    import torch

    platform_name = platform_name or hardware.backend()
    return torch.device("cuda" if platform_name == "gpu" and torch.cuda.is_available() else "cpu")


def load_ours(directory: str, s: Settings, mesh):
    from train.config import ModelConfig
    from train.state import create_model

    cfg = ModelConfig(name_or_path=directory, dtype=s.dtype, param_dtype="float32",
                      attention_impl=s.attention_impl, remat_policy=s.remat_policy, hardware=s.hardware)
    return create_model(cfg, mesh)


def make_batch(fc, s: Settings, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A DocVQA-shaped batch: image tokens, ``<s>`` + question + ``</s>`` (right-padded), a short answer."""
    rng = np.random.default_rng(seed)
    t = fc.text_config
    n_img = fc.image_seq_length(s.image_size)
    lp = n_img + s.prompt_tokens
    input_ids = np.full((batch, lp), t.pad_token_id, np.int32)
    attention_mask = np.zeros((batch, lp), np.int32)
    labels = np.full((batch, s.target_tokens), t.pad_token_id, np.int32)
    label_mask = np.zeros((batch, s.target_tokens), np.float32)
    for i in range(batch):
        q = int(rng.integers(s.prompt_tokens // 2, s.prompt_tokens - 1))
        input_ids[i, :n_img] = fc.image_token_id
        input_ids[i, n_img] = t.bos_token_id
        input_ids[i, n_img + 1 : n_img + q] = rng.integers(10, 50000, q - 1)
        input_ids[i, n_img + q] = t.eos_token_id
        attention_mask[i, : n_img + q + 1] = 1
        a = int(rng.integers(s.target_tokens // 4, s.target_tokens - 1))
        labels[i, : a] = rng.integers(10, 50000, a)
        labels[i, a] = t.eos_token_id
        label_mask[i, : a + 1] = 1.0
    # An image as the data pipeline ships it (uint8, normalized in our step) and as the processor gives it.
    image = rng.integers(0, 256, (batch, s.image_size, s.image_size, 3), dtype=np.uint8)
    return {"pixel_values": _pixel_table(s)[image, np.arange(3)], "pixel_uint8": image,
            "input_ids": input_ids, "attention_mask": attention_mask,
            "labels": labels, "label_mask": label_mask}


def _pixel_table(s: Settings) -> np.ndarray:
    from florence_jax.processing import ImageTransform

    return ImageTransform(size=(s.image_size, s.image_size)).table  # Florence-2's processor settings


# ------------------------------------------------------------------------------------------ train
def bench_train_ours(directory: str, s: Settings, frozen: bool, cached: bool = False) -> dict[str, Any]:
    """Our jitted train step; with ``cached`` the batch carries vision features computed once
    (``data.cache_vision_features``) and the step skips the tower."""
    import jax

    from florence_jax.sharding import batch_sharding
    from train.config import OptimConfig
    from train.state import init_train_state
    from train.step import jit_train_step

    mesh = one_device_mesh()
    model = load_ours(directory, s, mesh)
    host = make_batch(_fc(directory, s), s, s.train_batch)
    # The step takes pixels as training ships them: uint8, normalized on the device with the processor's table.
    image = host.pop("pixel_uint8")
    feature_s = None
    if cached:
        fn = jax.jit(lambda m, x: m.vision_tower_features(x, image_layout="NHWC"))
        jax.block_until_ready(fn(model, host["pixel_values"]))
        t0 = time.perf_counter()
        host["vision_features"] = np.asarray(jax.block_until_ready(fn(model, host.pop("pixel_values"))))
        feature_s = time.perf_counter() - t0
    elif model.formulations.pixel_layout == "space_to_depth":  # as that hardware's pipeline ships them
        from florence_jax.processing import S2D_BLOCK, space_to_depth

        host["pixel_values"] = space_to_depth(image, S2D_BLOCK)
    else:
        host["pixel_values"] = image
    optim = OptimConfig(learning_rate=1e-6, schedule="linear", freeze=(VISION_FROZEN,) if frozen else ())
    bsh = batch_sharding(mesh)
    batch = jax.device_put(host, bsh)
    key = jax.random.key(0)
    fns, state, _ = init_train_state(model, optim, 1000, mesh, grad_accum_steps=s.grad_accum_steps,
                                     pixel_table=_pixel_table(s))
    del model
    step = jit_train_step(fns, state, bsh)
    flops = _step_flops(step, state, batch, key)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, key).compile()
    compile_s = time.perf_counter() - t0
    flops = flops or _flops(compiled)
    if s.memory_only:
        return {"timing": None, "compile_s": compile_s, "flops": flops,
                "memory_bytes": _program_memory(compiled), "feature_s": feature_s}
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], batch, key)
        jax.block_until_ready(metrics["loss"])

    probe = gemm_probe(s.dtype, hardware.backend()) if s.gemm else None
    timing = measure(run, s.repeats, probe)
    timing.first_s += compile_s
    mem = _peak_memory_ours(compiled)
    profile = _profile_step(run, compiled, s, frozen, cached) if s.profile else None
    return {"timing": timing, "flops": flops, "memory_bytes": mem, "feature_s": feature_s, "profile": profile}


def _profile_step(run, compiled, s: Settings, frozen: bool, cached: bool) -> str | None:
    """One more step under the profiler: device time per model scope and per op, as markdown (also
    written beside the trace). A profiler that fails is reported, never fatal: the timings stand."""
    from scripts.op_profile import format_profile, profile_compiled

    name = "train_frozen_cached" if cached else "train_frozen" if frozen else "train_full"
    directory = os.path.join(s.profile, name)
    hlo = compiled.as_text()
    try:
        prof = profile_compiled(run, hlo, directory)
    except Exception as e:  # noqa: BLE001 - a profiler problem must not cost the measured rows
        progress(f"{name}: profiling failed ({type(e).__name__}: {e})")
        return None
    with open(os.path.join(directory, "ops.md"), "w") as f:  # every scope, the 200 slowest ops
        f.write(format_profile(prof, top=200) + "\n")
    with gzip.open(os.path.join(directory, "hlo.txt.gz"), "wt") as f:  # to read the ops' fusions later
        f.write(hlo)
    progress(f"{name}: profile written to {directory} (trace, ops.md, hlo.txt.gz)")
    return format_profile(prof, top=20)


def _fc(directory: str, s: Settings):
    from florence_jax.config import Florence2Config

    return Florence2Config.from_json_file(os.path.join(directory, "config.json"))


def _step_flops(step, state, batch, key) -> float | None:
    """The step's matmul and convolution FLOPs, counted on its jaxpr (``jaxpr_flops``): the same figure on
    every backend, loops counted once per iteration."""
    try:
        return jaxpr_flops(step.trace(state, batch, key).jaxpr)
    except Exception:  # noqa: BLE001 - a figure for the notes column, never a reason to fail the row
        return None


def jaxpr_flops(jaxpr) -> float:
    """FLOPs of the ``dot_general`` and ``conv_general_dilated`` equations of a (closed) jaxpr, 2 per
    multiply-add, recursing into sub-jaxprs: a scan's body counts ``length`` times, a ``cond`` its
    costliest branch, a ``while`` once (its trip count is not static). Elementwise work is left out, as
    in the usual MFU accounting; recomputation under ``jax.checkpoint`` is counted, since it runs. The
    project's CPU kernels count the products they compute (``cpu_kernels.matmul_flops``)."""
    import math

    from florence_jax import cpu_kernels

    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
            rhs_free = [d for i, d in enumerate(rhs) if i not in rc and i not in rb]
            total += 2.0 * math.prod(lhs) * math.prod(rhs_free)
        elif name == "conv_general_dilated":
            out = eqn.outvars[0].aval.shape
            rhs = eqn.invars[1].aval.shape
            dn = eqn.params["dimension_numbers"]
            in_per_group = rhs[dn.rhs_spec[1]]
            window = math.prod(rhs[i] for i in dn.rhs_spec[2:])
            total += 2.0 * math.prod(out) * in_per_group * window
        elif name == "ffi_call":
            total += cpu_kernels.matmul_flops(eqn.params["target_name"], [v.aval.shape for v in eqn.invars],
                                              [v.aval.shape for v in eqn.outvars])
        else:
            subs = [v for v in eqn.params.values() if hasattr(v, "eqns") or hasattr(v, "jaxpr")]
            branches = eqn.params.get("branches")
            if branches:
                total += max(jaxpr_flops(b) for b in branches)
            for sub in subs:
                total += jaxpr_flops(sub) * (eqn.params.get("length", 1) if name == "scan" else 1)
    return total


def _flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, list):
            cost = cost[0]
        return float(cost["flops"]) if cost and "flops" in cost else None
    except Exception:  # noqa: BLE001 - not every backend reports costs
        return None


def _peak_memory_ours(compiled) -> int | None:
    import jax

    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return _program_memory(compiled)


def _program_memory(compiled) -> int | None:
    """Arguments + outputs + temporaries - donated (aliased) buffers: what the compiled step needs."""
    from florence_jax.devices import compiled_memory

    memory = compiled_memory(compiled)
    return None if memory is None else memory.total


def bench_train_reference(ref, s: Settings, frozen: bool, device) -> dict[str, Any]:
    import copy

    import torch
    from transformers import get_scheduler

    fc = _fc_from_torch(ref)
    b = make_batch(fc, s, s.train_batch)
    # Train a copy: the generation rows compare tokens against ours, which loads the untrained weights.
    model = copy.deepcopy(ref).to(device).train()
    for p in model.parameters():
        p.requires_grad_(True)
    if frozen:  # frozen for real (requires_grad=False), unlike the recipe's attribute that torch ignores
        for p in model.model.vision_tower.parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    sched = get_scheduler("linear", optimizer=opt, num_warmup_steps=0, num_training_steps=1000)
    labels = np.where(b["label_mask"] > 0, b["labels"], -100)
    inputs = {
        "input_ids": torch.from_numpy(b["input_ids"]).long().to(device),
        "attention_mask": torch.from_numpy(b["attention_mask"]).long().to(device),
        "pixel_values": torch.from_numpy(b["pixel_values"].transpose(0, 3, 1, 2).copy()).to(device),
        "labels": torch.from_numpy(labels).long().to(device),
    }
    autocast = _autocast(s, device)
    fwd = torch.compile(model) if s.torch_compile else model

    k = s.grad_accum_steps
    m = s.train_batch // k  # consecutive micro-batches, as ours splits them (the compute is the same; ours
    micro = [{name: x[i * m:(i + 1) * m] for name, x in inputs.items()} for i in range(k)]  # weights tokens)

    def run():
        for mb in micro:  # gradient accumulation: each micro-batch's mean loss / k, then one update
            with autocast:
                loss = fwd(**mb).loss / k
            loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timing = measure(run, s.repeats)
    mem = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return {"timing": timing, "memory_bytes": mem}


def _release_torch_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _fc_from_torch(ref):
    from florence_jax.config import Florence2Config

    return Florence2Config.from_dict(ref.config.to_dict())


def _autocast(s: Settings, device):
    import contextlib

    import torch

    if s.dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------ generation
def gen_kwargs(s: Settings, beams: int) -> dict[str, Any]:
    # A fixed number of new tokens: EOS is banned until the end, so both sides do the same work.
    return dict(num_beams=beams, max_new_tokens=s.new_tokens, min_new_tokens=s.new_tokens,
                no_repeat_ngram_size=s.no_repeat_ngram_size, early_stopping=True)


def bench_generate_ours(model, s: Settings, beams: int, decode_only: bool) -> dict[str, Any]:
    import jax

    from florence_jax.generation import Generator, generate

    b = make_batch(model.config, s, s.gen_batch, seed=1)
    ids, mask, pixels = b["input_ids"], b["attention_mask"], jax.device_put(b["pixel_values"])
    kw = gen_kwargs(s, beams)
    if decode_only:
        generator = Generator(model, image_layout="NHWC", **kw)
        enc = jax.block_until_ready(generator.encode(ids, pixels, mask))
        fn = generator.decode_fn()
        out = {}

        def run():
            out["seq"] = jax.block_until_ready(fn(enc, mask)).sequences

        timing = measure(run, s.repeats)
        return {"timing": timing, "sequences": np.asarray(out["seq"])}
    out = {}

    def run():
        out["seq"] = generate(model, ids, pixels, mask, image_layout="NHWC", **kw)

    timing = measure(run, s.repeats)
    return {"timing": timing, "sequences": out["seq"]}


def bench_generate_reference(ref, s: Settings, beams: int, decode_only: bool, device) -> dict[str, Any]:
    import torch
    from transformers.modeling_outputs import BaseModelOutput

    fc = _fc_from_torch(ref)
    b = make_batch(fc, s, s.gen_batch, seed=1)
    model = ref.to(device).eval()
    ids = torch.from_numpy(b["input_ids"]).long().to(device)
    mask = torch.from_numpy(b["attention_mask"]).long().to(device)
    pixels = torch.from_numpy(b["pixel_values"].transpose(0, 3, 1, 2).copy()).to(device)
    kw = gen_kwargs(s, beams)
    autocast = _autocast(s, device)
    out = {}
    if decode_only:
        with torch.inference_mode(), autocast:
            embeds = model.get_input_embeddings()(ids)
            feats = model.get_image_features(pixels)
            feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
            embeds = embeds.masked_scatter((ids == fc.image_token_id)[..., None].expand_as(embeds),
                                           feats.to(embeds.dtype))
            enc = model.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state

        def run():
            with torch.inference_mode(), autocast:
                out["seq"] = model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=enc),
                                            attention_mask=mask, **kw)
            _sync(device)
    else:
        def run():
            with torch.inference_mode(), autocast:
                out["seq"] = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, **kw)
            _sync(device)

    timing = measure(run, s.repeats)
    return {"timing": timing, "sequences": out["seq"].cpu().numpy()}


def token_agreement(a: np.ndarray, b: np.ndarray) -> float:
    n = min(a.shape[1], b.shape[1])
    return float((a[:, :n] == b[:, :n]).mean())


# ------------------------------------------------------------------------------------------ data
def _document_bytes(n: int, seed: int = 0) -> list[bytes]:
    """Scanned-page-sized JPEGs (1700x2200, DocVQA's typical page) with text and boxes."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = Image.new("RGB", (1700, 2200), (250, 250, 245))
        d = ImageDraw.Draw(img)
        for _ in range(60):
            x, y = int(rng.integers(50, 1500)), int(rng.integers(50, 2100))
            d.text((x, y), f"Invoice {int(rng.integers(0, 10**6))}", fill=(20, 20, 20))
            d.rectangle([x, y + 20, x + int(rng.integers(50, 200)), y + 24], fill=tuple(int(v) for v in
                        rng.integers(0, 255, 3)))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def bench_data(s: Settings) -> dict[str, Any]:
    from florence_jax.tiny_processor import build_tiny_processor
    from train.config import PIXEL_DTYPE
    from train.data.pipeline import ExampleEncoder, PipelineConfig

    images = _document_bytes(s.data_images)
    records = [{"image": {"bytes": b, "path": None}, "question": "What is the invoice number?",
                "answers": ["123456"]} for b in images]
    processor = build_tiny_processor(image_size=s.image_size)
    # Pixels as training ships them (uint8: normalized in the step, on the device).
    enc_config = PipelineConfig(template="docvqa", image_size=s.image_size, max_prompt_tokens=s.prompt_tokens,
                            max_target_tokens=s.target_tokens, pixel_dtype=PIXEL_DTYPE)
    enc = ExampleEncoder(records, processor, enc_config)

    def ours():
        for i in range(len(records)):
            enc(i)

    def reference():  # the recipe's collate: PIL decode + processor(text, images) per batch
        from PIL import Image

        for i in range(0, len(images), s.train_batch):
            chunk = images[i : i + s.train_batch]
            pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in chunk]
            processor(text=["<DocVQA>What is the invoice number?"] * len(pil), images=pil,
                      return_tensors="np", padding=True)

    # The same records resized once (scripts/prepare_data.py): what epochs 2..N cost.
    from florence_jax.processing import ImageTransform
    from train.data.prepared import decode_record, prepare_one

    transform = ImageTransform.from_processor(processor)
    blobs = [prepare_one((r, transform, "image")) for r in records]

    class Prepared:
        def __len__(self):
            return len(blobs)

        def __getitem__(self, i):
            return decode_record(blobs[i])

    enc_prepared = ExampleEncoder(Prepared(), processor, enc_config)

    def ours_prepared():
        for i in range(len(blobs)):
            enc_prepared(i)

    return {"ours": measure(ours, s.repeats), "reference": measure(reference, s.repeats),
            "prepared": measure(ours_prepared, s.repeats), "n": len(records)}


# ------------------------------------------------------------------------------------------ labelling
LABEL_TASK = "<OD>"


def _photo_files(directory: str, n: int, seed: int = 0) -> list[str]:
    """``n`` 640x480 JPEGs of coloured shapes (photo-sized inputs for the labelling row)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        image = Image.new("RGB", (640, 480), tuple(int(v) for v in rng.integers(150, 255, 3)))
        pen = ImageDraw.Draw(image)
        for _ in range(8):
            x, y = int(rng.integers(0, 560)), int(rng.integers(0, 400))
            pen.rectangle([x, y, x + int(rng.integers(20, 80)), y + int(rng.integers(20, 80))],
                          fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        paths.append(os.path.join(directory, f"photo{i:04d}.jpg"))
        image.save(paths[-1], "JPEG", quality=90)
    return paths


def build_label_pair(s: Settings, directory: str):
    """A processor and a random base/large transformers Florence-2 whose image token is the processor's, saved
    together in ``directory`` (as a checkpoint ships them)."""
    import torch
    from transformers import Florence2ForConditionalGeneration

    from florence_jax.reference import BASE_TEXT, BASE_VISION, LARGE_TEXT, LARGE_VISION, hf_config
    from florence_jax.tiny_processor import build_tiny_processor

    processor = build_tiny_processor(directory, image_size=s.image_size)
    vision, text = (BASE_VISION, BASE_TEXT) if s.size == "base" else (LARGE_VISION, LARGE_TEXT)
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(hf_config(vision, text, image_token_id=processor.image_token_id)).eval()
    model.save_pretrained(directory)
    return processor, model


def bench_label(s: Settings, device, no_reference: bool) -> dict[str, Any]:
    """Ours: the labeller's loop (grain reads the files, the vision tower once per batch, generation, parsing,
    shard files), the whole folder per timed run. Reference: per batch of ``gen_batch`` files, PIL decode,
    ``processor(text, images)``, ``generate()``, ``batch_decode`` and ``post_process_generation``."""
    from florence_jax.label.inputs import open_inputs
    from florence_jax.label.output import prepare_output
    from florence_jax.label.run import LabelSettings, label_shards
    from florence_jax.modeling.florence2 import Florence2ForConditionalGeneration as Ours

    kw = gen_kwargs(s, s.label_beams)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, image_dir = os.path.join(tmp, "model"), os.path.join(tmp, "images")
        os.makedirs(image_dir)
        processor, ref = build_label_pair(s, model_dir)
        paths = _photo_files(image_dir, s.label_images)
        held = {"model": Ours.from_pretrained(model_dir, dtype=s.dtype, param_dtype=s.dtype,
                                              hardware=s.hardware or None)}
        inputs = open_inputs(image_dir)
        options = {k: v for k, v in kw.items() if k not in ("num_beams", "max_new_tokens")}
        settings = LabelSettings(tasks=(LABEL_TASK,), batch_size=s.gen_batch, num_beams=s.label_beams,
                                 max_new_tokens=s.new_tokens, workers=0, generation=options)
        runs = iter(range(1_000_000))

        def ours():
            out = os.path.join(tmp, f"out{next(runs)}")
            layout = prepare_output(out, {}, len(inputs), len(inputs))
            label_shards(held["model"], processor, inputs, layout, settings, shards=[0])
            return out

        ours_timing = measure(ours, s.repeats)
        from florence_jax.label.output import read_jsonl

        ours_results = [r["result"] for r in read_jsonl(os.path.join(tmp, "out0", "labels.jsonl"))]
        held.clear()  # our parameters' memory goes before the reference runs
        result: dict[str, Any] = {"ours": ours_timing, "n": len(paths), "reference": None}
        if no_reference:
            return result
        import torch
        from PIL import Image

        model = ref.to(device).eval()
        autocast = _autocast(s, device)
        ref_results: list[Any] = []

        def reference():
            ref_results.clear()
            for i in range(0, len(paths), s.gen_batch):
                images = [Image.open(p).convert("RGB") for p in paths[i : i + s.gen_batch]]
                inputs = processor(text=[LABEL_TASK] * len(images), images=images, return_tensors="pt")
                inputs = {k: v.to(device) for k, v in inputs.items()}
                with torch.inference_mode(), autocast:
                    ids = model.generate(**inputs, **kw)
                texts = processor.batch_decode(ids.cpu(), skip_special_tokens=False)
                ref_results.extend(processor.post_process_generation(t, task=LABEL_TASK, image_size=im.size)
                                   for t, im in zip(texts, images))

        result["reference"] = measure(reference, s.repeats)
        result["same_results"] = float(np.mean([a == b for a, b in zip(ours_results, ref_results)]))
        return result


def _label_row(d: dict[str, Any], s: Settings) -> dict[str, Any]:
    o, r, n = d["ours"], d["reference"], d["n"]
    row: dict[str, Any] = {"ours": n / o.median, "unit": "images/s", "latency_s": {"ours": o.median},
                           "first_s": {"ours": o.first_s}, "spread": {"ours": o.spread()}, "reference": None,
                           "ratio": None, "images": n, "task": LABEL_TASK, "num_beams": s.label_beams}
    if r is not None:
        row.update(reference=n / r.median, ratio=r.median / o.median, same_results=d["same_results"])
        row["latency_s"]["reference"] = r.median
        row["first_s"]["reference"] = r.first_s
        row["spread"]["reference"] = r.spread()
    return row


# ------------------------------------------------------------------------------------------ report
def device_name(platform_name: str) -> str:
    import jax

    d = jax.devices()[0]
    kind = getattr(d, "device_kind", platform_name)
    if platform_name == "cpu":
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        cpu = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        return f"CPU {cpu}, {os.cpu_count()} cores"
    return str(kind)


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    spec = hardware.device_spec(name)
    return spec.peak_tflops if spec else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--json", help="write the figures to this JSON file")
    p.add_argument("--repeats", type=int)
    p.add_argument("--size", choices=("base", "large"))
    p.add_argument("--dtype", choices=("float32", "bfloat16"))
    p.add_argument("--image_size", type=int)
    p.add_argument("--train_batch", type=int)
    p.add_argument("--gen_batch", type=int)
    p.add_argument("--new_tokens", type=int)
    p.add_argument("--data_images", type=int, help="images in the data-pipeline row")
    p.add_argument("--label_images", type=int, help="images labelled per timed run in the label row")
    p.add_argument("--label_beams", type=int, help="beam width of the label row (default 3)")
    p.add_argument("--remat_policy", choices=("none", "full", "dots"))
    p.add_argument("--attention_impl", choices=("xla", "dot_product"))
    p.add_argument("--hardware", help="ours: formulations to use, as florence_jax.hardware reads them (an A/B: "
                   "'gpu:depthwise_conv=grouped'); default: this backend's")
    # Flags that set a Settings field default to None, as the other options do: None is "not given".
    p.add_argument("--torch_compile", action="store_true", default=None, help="also wrap the reference's forward in torch.compile")
    p.add_argument("--no_reference", action="store_true", help="measure ours only")
    p.add_argument("--memory_only", action="store_true", default=None,
                   help="train rows only: compile the step and report its memory (arguments + outputs + "
                        "temporaries, from XLA), without running it or the reference; does a batch fit?")
    p.add_argument("--grad_accum_steps", type=int,
                   help="train rows: split the batch into this many micro-batches per update (ours and reference)")
    p.add_argument("--profile", metavar="DIR",
                   help="train rows: profile one more step of ours into DIR and print where its device time "
                        "goes, per model scope (forward and backward) and per op")
    p.add_argument("--peak_tflops", type=float, help="device peak for MFU (default: known accelerators)")
    p.add_argument("--no_gemm", dest="gemm", action="store_false", default=None,
                   help="train rows: do not measure a matrix product's rate beside each step (its arrays "
                        "take memory: 0.4 GiB in bfloat16 on an accelerator)")
    p.add_argument("--table", metavar="JSON", help="print the table of an earlier run's --json file (also one a "
                   "time limit cut short: it is rewritten after every row) and exit")
    args = p.parse_args(argv)
    if args.table:
        with open(args.table) as f:
            saved = json.load(f)
        meta = saved.pop("meta")
        print(_table(saved, meta), flush=True)
        return 0


    platform_name = hardware.backend()
    s = defaults_for(platform_name)
    for f in dataclasses.fields(Settings):
        v = getattr(args, f.name, None)
        if v is not None:
            setattr(s, f.name, v)
    rows = ROWS if not args.only else tuple(r.strip() for r in args.only.split(","))
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    if s.train_batch % s.grad_accum_steps:
        p.error(f"--train_batch {s.train_batch} is not a multiple of --grad_accum_steps {s.grad_accum_steps}")
    if s.memory_only:
        if not args.only or any(not r.startswith("train") for r in rows):
            p.error("--memory_only measures train rows: name them with --only (e.g. --only train_full)")
        args.no_reference = True
    dev_name = device_name(platform_name)
    peak = peak_tflops(dev_name, args.peak_tflops)
    progress(f"device {dev_name}; settings {dataclasses.asdict(s)}")

    import torch
    import transformers

    meta = _meta(s, dev_name, torch.__version__, transformers.__version__)
    results = _Results(args.json, meta)
    with tempfile.TemporaryDirectory() as tmp:
        need_models = any(r not in ("data", "label") for r in rows)
        ref = build_reference(s, tmp) if need_models else None
        tdev = torch_device(platform_name)
        ref_frozen = None
        for kind in [r for r in rows if r.startswith("train")]:  # in the order asked (a time limit keeps the first)
            frozen = kind != "train_full"
            # The reference first, its cached GPU memory released after: JAX's allocator keeps what it
            # grows to, so ours last lets both fit one card.
            r = None
            if not args.no_reference:
                if kind == "train_frozen_cached" and ref_frozen is not None:
                    r = ref_frozen  # the reference has no feature cache: its frozen step is the baseline
                else:
                    progress(f"{kind}: reference")
                    r = bench_train_reference(ref, s, frozen, tdev)
                    _release_torch_memory()
                if kind == "train_frozen":
                    ref_frozen = r
            progress(f"{kind}: ours (compiling)")
            o = bench_train_ours(tmp, s, frozen, cached=kind == "train_frozen_cached")
            results[kind] = _train_row(o, r, s, peak)
            if o.get("profile"):
                print(f"\n### {kind}: where one step of ours spends its time\n\n{o['profile']}\n", flush=True)
            if o.get("feature_s") is not None:
                results[kind]["feature_s_per_example"] = o["feature_s"] / s.train_batch
                results.save()
        gen_rows = [k for k in rows if k.startswith(("generate", "decode"))]
        if gen_rows:
            model = load_ours(tmp, s, one_device_mesh())
            for kind in gen_rows:
                beams = 1 if kind == "generate_greedy" else 3
                decode_only = kind.startswith("decode")
                progress(f"{kind}: ours (compiling)")
                o = bench_generate_ours(model, s, beams, decode_only)
                r = None
                if not args.no_reference:
                    progress(f"{kind}: reference")
                    r = bench_generate_reference(ref, s, beams, decode_only, tdev)
                results[kind] = _gen_row(o, r, s)
            del model
        if "label" in rows:
            progress("label: ours (compiling), then the reference loop")
            results["label"] = _label_row(bench_label(s, tdev, args.no_reference), s)
        if "data" in rows:
            progress("data: ours and reference")
            d = bench_data(s)
            ours_ips = d["n"] / d["ours"].median
            ref_ips = d["n"] / d["reference"].median
            results["data"] = {"ours": ours_ips, "reference": None if args.no_reference else ref_ips,
                               "unit": "images/s per worker",
                               "ratio": None if args.no_reference else ours_ips / ref_ips,
                               "spread": {"ours": d["ours"].spread(), "reference": d["reference"].spread()},
                               "first_s": {"ours": d["ours"].first_s, "reference": d["reference"].first_s},
                               "prepared_images_per_s": d["n"] / d["prepared"].median}
    print(_table(results, meta), flush=True)
    if args.json:
        progress(f"wrote {args.json}")
    return 0


class _Results(dict):
    """The rows measured so far; with a path, the JSON file is rewritten after every row, so a run stopped by
    a time limit keeps what it measured (``--table`` prints it)."""

    def __init__(self, path: str | None, meta: dict[str, Any]):
        super().__init__()
        self.path, self.meta = path, meta

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self.save()

    def save(self) -> None:
        if self.path:
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"meta": self.meta, **self}, f, indent=2)
            os.replace(tmp, self.path)


def one_device_mesh():
    import jax

    from florence_jax.sharding import make_mesh

    return make_mesh(1, 1, devices=jax.devices()[:1])


def _train_row(o, r, s: Settings, peak: float | None) -> dict[str, Any]:
    if o["timing"] is None:  # --memory_only
        return {"ours": None, "unit": "examples/s", "step_s": {}, "first_s": {"ours": o["compile_s"]},
                "spread": {"ours": "not run; compile time"}, "flops_per_step": o["flops"], "mfu": None,
                "peak_memory_gib": {"ours": _gib(o["memory_bytes"])}, "reference": None, "ratio": None}
    ours = s.train_batch / o["timing"].median
    row: dict[str, Any] = {
        "ours": ours, "unit": "examples/s", "step_s": {"ours": o["timing"].median},
        "first_s": {"ours": o["timing"].first_s}, "spread": {"ours": o["timing"].spread()},
        "peak_memory_gib": {"ours": _gib(o["memory_bytes"])},
        "flops_per_step": o["flops"],
        "mfu": (o["flops"] / o["timing"].median / (peak * 1e12)) if (o["flops"] and peak) else None,
        "reference": None, "ratio": None,
    }
    rates = o["timing"].probe
    if rates:
        row["gemm_flops_per_s"] = statistics.median(rates)
        if o["flops"]:  # each step against the product measured right before it, then the median
            row["gemm_share"] = statistics.median(
                o["flops"] / t / g for t, g in zip(o["timing"].times_s, rates, strict=True))
    if r is not None:
        row["reference"] = s.train_batch / r["timing"].median
        row["ratio"] = row["ours"] / row["reference"]
        row["step_s"]["reference"] = r["timing"].median
        row["first_s"]["reference"] = r["timing"].first_s
        row["spread"]["reference"] = r["timing"].spread()
        row["peak_memory_gib"]["reference"] = _gib(r["memory_bytes"])
    return row


def _gen_row(o, r, s: Settings) -> dict[str, Any]:
    row: dict[str, Any] = {
        "ours": s.gen_batch / o["timing"].median, "unit": "sequences/s",
        "latency_s": {"ours": o["timing"].median}, "first_s": {"ours": o["timing"].first_s},
        "spread": {"ours": o["timing"].spread()}, "reference": None, "ratio": None,
    }
    if r is not None:
        row["reference"] = s.gen_batch / r["timing"].median
        row["ratio"] = row["ours"] / row["reference"]
        row["latency_s"]["reference"] = r["timing"].median
        row["first_s"]["reference"] = r["timing"].first_s
        row["spread"]["reference"] = r["timing"].spread()
        row["token_agreement"] = token_agreement(o["sequences"], r["sequences"])
    return row


def _gib(x) -> float | None:
    return None if x is None else x / 1024**3


def _rate(flops_per_s: float) -> str:
    return (f"{flops_per_s / 1e12:.3g} TFLOP/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:.3g} GFLOP/s")


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}g}"


def _meta(s: Settings, dev_name: str, torch_version: str, tf_version: str) -> dict[str, Any]:
    import jax

    return {"device": dev_name, "date": time.strftime("%Y-%m-%d"), "jax": jax.__version__,
            "torch": torch_version, "transformers": tf_version, "settings": dataclasses.asdict(s),
            # the formulations ours runs with here (another platform's program gives way where it must)
            "hardware": hardware.runnable_on(hardware.resolve(s.hardware), hardware.backend())[0].spec()}


def _table(results: dict[str, Any], meta: dict[str, Any]) -> str:
    """The markdown table of ``docs/benchmarks.md`` (with the device, versions and settings above it)."""
    s = Settings(**meta["settings"])
    lines = [
        f"Device: {meta['device']}; jax {meta['jax']}, torch {meta['torch']}, transformers {meta['transformers']}; "
        f"{meta['date']}",
        f"Settings: Florence-2-{s.size} (random weights), {s.image_size}x{s.image_size}, {s.dtype} compute, "
        f"train batch {s.train_batch} (prompt {s.prompt_tokens} + target {s.target_tokens} tokens"
        + (f"; {s.grad_accum_steps} micro-batches of {s.train_batch // s.grad_accum_steps}"
           if s.grad_accum_steps > 1 else "")
        + (f"; remat {s.remat_policy}" if s.remat_policy != "none" else "") + "), "
        f"generation batch {s.gen_batch} x {s.new_tokens} new tokens (no_repeat_ngram_size "
        f"{s.no_repeat_ngram_size}), median of {s.repeats}"
        + (", reference under torch.compile" if s.torch_compile else "")
        + (f"; formulations {meta['hardware']}" if meta.get("hardware") else ""),
        "",
        "| row | ours | reference | unit | ratio | ours: median step (spread), first call | "
        "reference: median (spread), first call | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind in ROWS:
        row = results.get(kind)
        if row is None:
            continue
        t = row.get("step_s") or row.get("latency_s")
        notes = []
        if row.get("mfu") is not None:
            notes.append(f"MFU {100 * row['mfu']:.1f}%")
        if row.get("flops_per_step"):
            notes.append(f"{row['flops_per_step'] / 1e12:.2f} TFLOP/step")
        if row.get("gemm_share") is not None:
            notes.append(f"{100 * row['gemm_share']:.0f}% of the {s.dtype} GEMM measured beside each step "
                         f"({_rate(row['gemm_flops_per_s'])})")
        mem = row.get("peak_memory_gib") or {}
        if mem.get("ours") is not None:
            notes.append(f"memory ours {mem['ours']:.1f} GiB"
                         + (f", reference {mem['reference']:.1f} GiB" if mem.get("reference") else ""))
        if "token_agreement" in row:
            notes.append(f"same tokens {100 * row['token_agreement']:.0f}%")
        if "images" in row:
            notes.append(f"{row['images']} images, {row['task']}, {row['num_beams']} beams; times per folder")
        if row.get("same_results") is not None:
            notes.append(f"same results {100 * row['same_results']:.0f}%")
        if row.get("prepared_images_per_s") is not None:
            notes.append(f"prepared dataset (resized once): {row['prepared_images_per_s']:.0f} images/s")
        if row.get("feature_s_per_example") is not None:
            notes.append(f"features computed once: {row['feature_s_per_example']:.2f} s/example, not in the step; "
                         "reference: its frozen step")
        sp, fs = row["spread"], row["first_s"]
        ours_t = f"{_fmt(t['ours'])} s ({sp['ours']}), {fs['ours']:.1f} s" if t else f"({sp['ours']}), {fs['ours']:.1f} s"
        ref_t = "-"
        if row.get("reference") is not None:
            ref_t = (f"{_fmt(t['reference'])} s ({sp['reference']}), {fs['reference']:.1f} s" if t
                     else f"({sp['reference']}), {fs['reference']:.1f} s")
        ratio = f"**{row['ratio']:.2f}x**" if row.get("ratio") is not None else "-"
        lines.append(f"| {kind} | {_fmt(row['ours'])} | {_fmt(row['reference'])} | {row['unit']} | {ratio} | "
                     f"{ours_t} | {ref_t} | {'; '.join(notes)} |")
    return "\n".join(lines)




if __name__ == "__main__":
    from florence_jax.host_memory import retain_freed_memory

    retain_freed_memory()  # on the CPU: before JAX starts; the reference in this process gets it too
    sys.exit(main())
