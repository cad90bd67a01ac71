"""Compile a config's real train step ahead of time, on this machine, and print per-device memory.

    python -m scripts.aot_compile --config gpu_a100.py                 # simulated CPU devices
    python -m scripts.aot_compile --config tpu_v4_32.py --topology v4:2x2x4   # a TPU pod slice (needs libtpu)
    python -m scripts.aot_compile --config gpu_a100.py --topology a100       # XLA:GPU's program for an A100

Nothing is downloaded and no weights are read: the model is abstract (shapes from the config's
``model.preset``: tiny, base or large), the batch is abstract at the config's
shapes, and the step is lowered with the config's mesh and shardings. With ``--topology`` the target is
a TPU slice described by libtpu (``jax.experimental.topologies``), so a user learns before renting the
pod whether the step compiles and fits its HBM. A GPU topology (``a100``, ``h100``, ``h200``; ``h100:8`` for
eight on one host) has XLA:GPU build the step for that GPU, described by its public figures
(``florence_jax.hardware.GPU_TARGETS``), through JAX's CUDA plugin, which compiles without a GPU (``pip install -e
".[gpu-aot]"``): the GPU compiler's own fusion and buffer assignment, where simulated CPU devices give the
CPU compiler's, an upper bound. Without a GPU it cannot measure its kernels (autotuning), so each product
takes the kernel its heuristics pick. Exit code 1 when the step does not fit. The step is traced for
the config's hardware (``config.model.hardware``: ``a100``, ``h100``, ``v4``, ...; a TPU with
``--topology``; ``--platform`` to choose), so the CPU's formulations (``florence_jax.hardware``) stay
out of a GPU or TPU program; the memory checked against is the named device's (``--hbm_gib`` to choose).
"""

from __future__ import annotations

import argparse
import os
import sys


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m scripts.aot_compile", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--topology", help="TPU topology, e.g. v5e:4x4, v4:2x2x4, v5p:2x2x2 (needs libtpu), or GPUs, "
                                      "e.g. a100, h100, h100:8 (needs the [gpu-aot] extra)")
    p.add_argument("--hbm_gib", type=float,
                   help="memory per device to check against (default: the topology's chip or the config's device)")
    p.add_argument("--cpu_devices", type=int, help="simulated CPU devices (default: the config's mesh size)")
    p.add_argument("--platform", choices=("cpu", "gpu", "tpu"),
                   help="platform whose program is traced (default: tpu with --topology, else the config's "
                        "model.hardware, else the devices')")
    p.add_argument("--cost", action="store_true",
                   help="also print the compiler's cost figures per step and a roofline estimate per model scope "
                        "(scripts/hlo_cost.py; estimates, not measurements)")
    p.add_argument("--dump", metavar="DIR", help="write the compiled program (hlo.txt), the cost report "
                                                 "(cost.json) and, for a TPU, the Pallas kernels' scheduled "
                                                 "bundles (kernels/) into DIR")
    return p.parse_known_args(argv)


def main(argv=None) -> int:
    args, rest = _parse(argv)
    overrides = [a[len("--config."):] for a in rest if a.startswith("--config.")]
    from train.config import load_config

    cfg = load_config(args.config, overrides)
    import jax  # XLA_FLAGS below still counts: it is read when the backend starts, not on import

    llo_dir = None
    from florence_jax.hardware import GPU_TARGETS

    gpu = bool(args.topology) and args.topology.split(":")[0].lower() in GPU_TARGETS
    if gpu:
        # the CUDA plugin compiles for the described GPU from here; as a backend it would look for one
        jax.config.update("jax_platforms", "cpu")
    elif args.topology:
        # libtpu looks for a TPU VM's worker list at start-up; compiling for a topology needs none.
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        if args.cost or args.dump:
            # the Pallas kernels' static schedules (their final VLIW bundles), which libtpu writes when asked
            # at start-up: the compiler's only figure for a kernel (scripts/hlo_cost.py)
            from scripts import hlo_cost

            llo_dir = hlo_cost.request_kernel_schedules()
    else:
        n = args.cpu_devices or _mesh_size(cfg)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}")
        # jax reads JAX_PLATFORMS only on import, so set it through jax.config: without it an installed
        # libtpu would still try (and noisily fail) to find a TPU.
        jax.config.update("jax_platforms", os.environ.get("JAX_PLATFORMS", "cpu"))

    from florence_jax import hardware
    from scripts.aot import target_devices

    devices, chip = target_devices(args.topology)
    platform = args.platform or (chip if args.topology else None)
    formulations = hardware.resolve(cfg.model.hardware, platform=platform, auto=devices[0].platform)
    spec = hardware.device_spec(chip if args.topology else formulations.device)
    hbm = args.hbm_gib or (spec.hbm_gib if spec else None)
    target = args.topology or f"{len(devices)} x {devices[0].platform}"
    header = (f"config       {args.config}  ({cfg.model.name_or_path}, batch {cfg.batch_size}, "
              f"{cfg.data.image_size}px, freeze={list(cfg.optim.freeze)})")
    try:
        return _compile_and_report(cfg, devices, platform, spec, hbm, target, header, args, llo_dir)
    finally:
        if llo_dir:  # libtpu's dump: up to 2 GB, read by the cost report
            import shutil

            shutil.rmtree(llo_dir, ignore_errors=True)


def _compile_and_report(cfg, devices, platform, spec, hbm, target, header, args, llo_dir) -> int:
    from scripts.aot import compile_train_step

    try:
        report = compile_train_step(cfg, devices, platform)
    except Exception as e:  # noqa: BLE001 - the compiler's out-of-memory verdict is an answer, not a crash
        if "RESOURCE_EXHAUSTED" not in str(e) and "HbmOom" not in str(e):
            raise
        print(header)
        print(f"target       {target}")
        print("  DOES NOT FIT: the compiler ran out of device memory:")
        print("  " + str(e).strip().splitlines()[0][:400])
        print("  try a smaller per-device batch, --config.model.remat_policy=dots or full, or more fsdp")
        return 1
    print(header)
    print(f"target       {target}  mesh {report['mesh']}")
    print(f"program      traced for {report['platform']} (hardware {report['hardware']})")
    if report["note"]:
        print(f"  note       {report['note']}")
    print(f"compiled in  {report['compile_seconds']:.1f}s")
    gib = 1024**3
    for k in ("argument", "output", "temp", "alias", "total"):
        print(f"  {k:<9} {report[k] / gib:8.2f} GiB per device")
    if args.cost or args.dump:
        _cost(report["compiled"], spec, args, llo_dir)
    if hbm:
        ok = report["total"] <= hbm * gib
        print(f"  {'fits' if ok else 'DOES NOT FIT'} in {hbm:g} GiB per device "
              f"({100 * report['total'] / (hbm * gib):.0f}% used)")
        return 0 if ok else 1
    return 0


def _cost(compiled, spec, args, llo_dir: str | None = None) -> None:
    import shutil

    from scripts import aot, hlo_cost

    compiler = aot.compiler_cost(compiled)
    text = compiled.as_text()
    schedules = None
    if llo_dir:
        schedules = hlo_cost.kernel_schedules(llo_dir)
        if args.dump:  # the kernels' bundles, to read again (the rest of the dump is large)
            kernels = {o.name for o in hlo_cost.ops(text) if o.kernel}
            os.makedirs(os.path.join(args.dump, "kernels"), exist_ok=True)
            for name in os.listdir(llo_dir):
                m = hlo_cost.SCHEDULE_FILE.match(name)
                if m and m.group(1) in kernels:
                    shutil.copy(os.path.join(llo_dir, name), os.path.join(args.dump, "kernels", name))
    if args.dump:  # the program first: the analysis below reads it again from there if it fails
        os.makedirs(args.dump, exist_ok=True)
        with open(os.path.join(args.dump, "hlo.txt"), "w") as f:
            f.write(text)
    peak = spec.peak_tflops if spec else 1.0
    bandwidth = spec.hbm_gbps if spec and spec.hbm_gbps else 1.0
    summary = hlo_cost.summary(text, peak, bandwidth, compiler, clock_ghz=spec.clock_ghz if spec else 0.0,
                               schedules=schedules)
    if args.cost:
        if not spec:
            print("  (no device named: the roofline below uses 1 TFLOP/s and 1 GB/s, read its shares only)")
        print(hlo_cost.format_summary(summary))
    if args.dump:
        hlo_cost.dump(os.path.join(args.dump, "cost.json"), summary)
        print(f"wrote        {args.dump}/hlo.txt, {args.dump}/cost.json")


def _mesh_size(cfg) -> int:
    d, f = cfg.mesh.data, cfg.mesh.fsdp
    return (d if d > 0 else 1) * f


if __name__ == "__main__":
    sys.exit(main())
