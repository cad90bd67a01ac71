"""The TPU compiler's estimate of one DaViT block (a spatial and a channel half), compiled for one chip on
this machine through libtpu: an A/B of a vision formulation in seconds, where the whole train step takes
minutes (``scripts.aot_compile --cost``). Estimates, not measurements (``docs/scale-out.md`` says how
they are read).

    python -m scripts.block_cost --chip v5e --stage 2 --images 16
    python -m scripts.block_cost --chip v4 --preset large --stage 0 --images 8 --hardware v4:layer_norm_stats=vector
    python -m scripts.block_cost --chip v5e --stage 2 --images 8 --backward      # forward and backward

Prints the compiler's estimate of the XLA ops, the Pallas kernels by their schedules, the two together
and the roofline; then the costliest ops by model scope.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from collections import Counter

from florence_jax import hardware
from scripts import hlo_cost

# The smallest slice of each chip libtpu describes; the block compiles for its first chip, whose peak,
# bandwidth and clock are hardware.DEVICE_SPECS'.
_TOPOLOGIES = {"v5e": "v5e:2x2", "v4": "v4:2x2x1"}


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m scripts.block_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--chip", choices=sorted(_TOPOLOGIES), default="v5e")
    p.add_argument("--preset", choices=("base", "large"), default="base")
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--images", type=int, default=16, help="images per chip")
    p.add_argument("--image_size", type=int, default=768)
    p.add_argument("--hardware", help="formulations (florence_jax.hardware spec); default: the chip's")
    p.add_argument("--backward", action="store_true", help="the gradients of the input and the block's parameters too")
    p.add_argument("--top", type=int, default=12)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    llo_dir = hlo_cost.request_kernel_schedules()  # the Pallas kernels' schedules
    try:
        return _run(args, llo_dir)
    finally:
        shutil.rmtree(llo_dir, ignore_errors=True)


def _run(args, llo_dir) -> int:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from florence_jax.config import PRESETS
    from florence_jax.modeling.davit import VisionBlock
    from scripts.aot import target_devices

    spec = hardware.device_spec(args.chip)
    peak, hbm, clock = spec.peak_tflops, spec.hbm_gbps, spec.clock_ghz
    devices, _ = target_devices(_TOPOLOGIES[args.chip])
    one = jax.sharding.SingleDeviceSharding(devices[0])
    formulations = hardware.resolve(args.hardware or args.chip)
    if formulations.platform != "tpu":
        raise SystemExit(f"--hardware {args.hardware!r} is not a TPU's formulations")
    fc = PRESETS[args.preset]().replace(dtype=jnp.bfloat16, param_dtype=jnp.float32, hardware=formulations)
    block = nnx.eval_shape(lambda: VisionBlock(fc, args.stage, 0.0, 0.0, rngs=nnx.Rngs(0)))
    graph, params = nnx.split(block)
    side = args.image_size // (4 * 2**args.stage)
    channels = fc.vision_config.embed_dim[args.stage]
    x = jax.ShapeDtypeStruct((args.images, side, side, channels), jnp.bfloat16)

    def forward(params, x):
        m = nnx.merge(graph, params)
        m.eval()
        return m(x)

    def step(params, x):
        out, pullback = jax.vjp(forward, params, x)
        return pullback(jnp.ones_like(out))

    fn = step if args.backward else forward
    compiled = jax.jit(fn, in_shardings=(jax.tree.map(lambda _: one, params), one)).lower(params, x).compile()
    text = compiled.as_text()
    schedules = hlo_cost.kernel_schedules(llo_dir)
    s = hlo_cost.summary(text, peak, hbm, clock_ghz=clock, schedules=schedules)
    ms = 1e3
    xla = s["compiler_seconds"] or 0.0
    kernels = s["kernel_step_seconds"] or s["kernel_seconds"] or 0.0
    print(f"block        {args.preset} stage {args.stage} ({side}x{side}x{channels}), {args.images} images, "
          f"{'forward and backward' if args.backward else 'forward'}, one {args.chip} chip")
    print(f"hardware     {formulations.spec()}")
    print(f"estimate     XLA ops {xla * ms:.2f} ms + kernels {kernels * ms:.2f} ms = {(xla + kernels) * ms:.2f} ms "
          f"(roofline {s['roofline_seconds'] * ms:.2f} ms; compiler estimates, not measurements)")
    names = {}
    for line in text.splitlines():
        m = hlo_cost._INSTR.match(line)
        op = re.search(r'op_name="([^"]*)"', line)
        if m and op:
            names.setdefault(m.group(1), op.group(1))
    per_name = Counter()
    op_list = hlo_cost.roofline(hlo_cost.ops(text), peak, hbm)
    hlo_cost.schedule_kernels(op_list, schedules, clock)
    for o in op_list:
        label = re.sub(r"^.*?(spatial|channel)/", r"\1/", names.get(o.name, o.name)).replace("checkpoint/", "")
        per_name[label] += (o.cycles or o.seconds * clock * 1e9) / (clock * 1e6)
    print("  costliest (ms, by op name; kernels by their schedules):")
    for label, v in per_name.most_common(args.top):
        print(f"    {v:7.3f}  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
