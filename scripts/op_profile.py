"""Where a compiled program spends its device time: one profiled call, summed per HLO op and per model scope.

    from scripts.op_profile import profile_compiled, format_profile
    prof = profile_compiled(lambda: run_step(), compiled.as_text(), "/tmp/trace")
    print(format_profile(prof))

    python -m scripts.op_profile PROFILE_DIR/train_frozen   # the tables again, from a saved trace + HLO

The program runs under ``jax.profiler.trace``; the trace's op events (GPU kernels, or XLA:CPU thunks) carry
the HLO instruction they ran, and the optimized HLO text maps each instruction to the JAX ``op_name`` it came
from. The model's modules open ``jax.named_scope``\\ s (``vision_tower/stage2/spatial/window_attn``,
``decoder/cross_attn``, ``lm_head``, ...), and autodiff wraps backward ops in ``transpose(...)``, so the
time can be read per model part, forward and backward. ``scripts.benchmark --profile DIR`` prints this for
its train rows. Op time counts two ops that run side by side twice; each op's share of the wall time
(:func:`wall_shares`) does not, and the parts are given both ways.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import time
from collections.abc import Callable
from typing import Any

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?\s([a-z][a-z0-9\-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_KIND = re.compile(r"kind=(k\w+)")
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_MODULE = re.compile(r"^HloModule\s+([\w.\-]+)")
# Ops that only run other ops: their events enclose their body's events, so they are not summed.
_CONTROL = {"while", "conditional", "call", "async-start", "async-done"}
# Name-stack parts that say how a scope was reached rather than where it is in the model.
_NOISE = re.compile(r"^(jit|pjit|jvp|checkpoint|remat|remat2|custom_jvp_call|custom_vjp_call|while|body|cond|"
                    r"scan|vmap|cond_fun|body_fun|closed_call|core_call|rematted_computation)(\(.*\))?$")


@dataclasses.dataclass(frozen=True)
class HloOp:
    opcode: str
    kind: str  # fusion kind (kLoop, kInput, kOutput, kCustom) or custom-call target; "" otherwise
    op_name: str  # the JAX op_name metadata ("" when XLA made the op up)


@dataclasses.dataclass
class OpTime:
    name: str  # HLO instruction (or, without HLO names in the trace, the kernel's name)
    ms: float  # per profiled call
    count: float  # launches per call
    op: HloOp | None
    wall_ms: float = 0.0  # its share of the wall time per call (wall_shares)


@dataclasses.dataclass
class Profile:
    ops: list[OpTime]  # slowest first
    wall_ms: float  # one call, as timed around the profiled calls
    calls: int
    source: str  # "device" (accelerator kernels) or "host" (XLA:CPU thunks)

    @property
    def total_ms(self) -> float:
        return sum(o.ms for o in self.ops)


def hlo_ops(hlo_text: str) -> dict[str, HloOp]:
    """Every instruction of an optimized HLO module (all computations): name -> opcode, kind, op_name."""
    ops = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, opcode = m.groups()
        kind = _KIND.search(line) if opcode == "fusion" else None
        target = _TARGET.search(line) if opcode == "custom-call" else None
        op_name = _OP_NAME.search(line)
        ops[name] = HloOp(opcode, (kind or target).group(1) if (kind or target) else "",
                          op_name.group(1) if op_name else "")
    return ops


def module_name(hlo_text: str) -> str | None:
    m = _MODULE.match(hlo_text.lstrip())
    return m.group(1) if m else None


def scope_of(op_name: str) -> tuple[str, bool]:
    """``(model scope, backward?)`` of an op_name: ``jit(step)/transpose(jvp(encoder))/self_attn/dot_general``
    -> ``("encoder/self_attn", True)``. Transformation wrappers are unwrapped into the path."""
    op_name = op_name.split(";")[0]  # XLA joins the names of ops it merged with ";": the first names the op
    backward = "transpose(" in op_name
    parts: list[str] = []
    for part in op_name.split("/")[:-1]:  # the last part is the primitive
        if re.fullmatch(r"p?jit\(.*\)", part) or "->" in part:
            continue  # a jitted function's or an einsum's own name: not a model scope
        while True:  # unwrap transpose(jvp(x)) -> x, keeping what was inside
            m = re.fullmatch(r"[\w\-]+\((.*)\)", part)
            if not m:
                break
            part = m.group(1)
        if part and not _NOISE.match(part):
            parts.append(part)
    return "/".join(_fold_repeats(parts)) or "(top)", backward


def _fold_repeats(parts: list[str]) -> list[str]:
    """A recomputed forward (jax.checkpoint) inside a backward repeats the scopes it was traced in:
    ``encoder/ffn/encoder/ffn`` -> ``encoder/ffn``."""
    for n in range(1, len(parts) // 2 + 1):
        for i in range(len(parts) - 2 * n + 1):
            if parts[i:i + n] == parts[i + n:i + 2 * n]:
                return _fold_repeats(parts[:i + n] + parts[i + 2 * n:])
    return parts


def trace_op_times(trace_dir: str, module: str | None) -> tuple[dict[str, list[float]], str]:
    """Summed duration (us) and count per HLO op of ``module`` in the newest perfetto trace under
    ``trace_dir``; accelerator events when there are any, else XLA:CPU's host events."""
    events, source = trace_op_events(trace_dir, module)
    return _totals(events), source


def _totals(events: list[tuple[str, float, float]]) -> dict[str, list[float]]:
    """``[summed duration, count]`` per op of ``(op, start, duration)`` events."""
    times: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for op, _, dur in events:
        times[op][0] += dur
        times[op][1] += 1
    return dict(times)


def wall_shares(events: list[tuple[str, float, float]], skip: frozenset[str] = frozenset()) -> dict[str, float]:
    """Each op's share (us) of the wall time its events ``(op, start, duration)`` span: every instant is
    shared equally among the ops running then, and an instant with none running (between the first start
    and the last end) goes to the op(s) that ended last before it. Op time counts two ops side by side twice
    (XLA:CPU runs independent ops on its threads at once), and misses work an op hands to other threads and
    does not wait for (the gap after it); the shares add up to the span. Ops in ``skip`` (control ops that
    enclose their body's events) take no share."""
    marks = []  # (time, 0 for a start and 1 for an end: an event starts before it ends, event, op)
    for i, (op, start, dur) in enumerate(e for e in events if e[0] not in skip):
        marks += [(start, 0, i, op), (start + dur, 1, i, op)]
    marks.sort()
    shares: dict[str, float] = collections.defaultdict(float)
    running: dict[int, str] = {}
    ended: list[str] = []  # the ops whose events ended last, at ended_at
    ended_at, last = None, marks[0][0] if marks else 0.0
    for t, end, i, op in marks:
        if t > last:
            owners = list(running.values()) or ended
            for who in owners:
                shares[who] += (t - last) / len(owners)
        if end:
            running.pop(i)
            ended = ended + [op] if ended_at == t else [op]
            ended_at = t
        else:
            running[i] = op
        last = t
    return dict(shares)


def trace_op_events(trace_dir: str, module: str | None) -> tuple[list[tuple[str, float, float]], str]:
    """``(HLO op, start us, duration us)`` of each op event of ``module`` in the newest perfetto trace under
    ``trace_dir``, and whether they are the accelerator's events (when there are any) or XLA:CPU's host
    events; accelerator kernels without HLO names are named by kernel."""
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
    with gzip.open(files[-1]) as f:
        events = json.load(f)["traceEvents"]
    device_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                   and str(e.get("args", {}).get("name", "")).startswith("/device:")}
    device_ops: list[tuple[str, float, float]] = []
    host_ops: list[tuple[str, float, float]] = []
    device_kernels: list[tuple[str, float, float]] = []
    for e in events:
        if e.get("ph") != "X":
            continue
        args = e.get("args") or {}
        op = args.get("hlo_op")
        on_device = e.get("pid") in device_pids or e.get("cat") == "kernel"
        event = (op, float(e.get("ts", 0.0)), float(e.get("dur", 0.0)))
        if op is None:
            if on_device and not e["name"].startswith("$"):
                device_kernels.append((e["name"], *event[1:]))
            continue
        if module is not None and args.get("hlo_module") not in (None, module):
            continue
        (device_ops if on_device else host_ops).append(event)
    if device_ops:
        return device_ops, "device"
    if device_kernels:  # kernels without HLO names: by kernel name
        return device_kernels, "device"
    return host_ops, "host"


def _check_profiler_safe() -> None:
    """Refuse, with the way out, where ``jax.profiler`` would crash the process: a PJRT plugin that is
    installed but failed to start (libtpu on a machine without a TPU) still gets its tracer started, and
    that tracer segfaults."""
    from jax._src import xla_bridge

    from florence_jax import hardware

    failed = dict(getattr(xla_bridge, "_backend_errors", {}) or {})
    if failed:
        names = ", ".join(sorted(failed))
        raise RuntimeError(
            f"jax.profiler cannot run in this process: the {names} plugin is installed but did not start "
            f"({str(next(iter(failed.values())))[:120]}), and starting its tracer crashes the process. Name "
            f"the platform to use, e.g. JAX_PLATFORMS={hardware.backend()} python -m "
            "scripts.benchmark ...")


def profile_compiled(run: Callable[[], Any], hlo_text: str, trace_dir: str, calls: int = 1) -> Profile:
    """Profile ``calls`` calls of ``run`` (which must block until the program finishes) and attribute the
    op time to the HLO in ``hlo_text`` (``compiled.as_text()`` of the program ``run`` executes)."""
    import jax

    _check_profiler_safe()
    ops = hlo_ops(hlo_text)
    os.makedirs(trace_dir, exist_ok=True)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        t0 = time.perf_counter()
        for _ in range(calls):
            run()
        wall = (time.perf_counter() - t0) / calls
    return summarize(trace_dir, hlo_text, calls, wall * 1e3, ops)


def summarize(trace_dir: str, hlo_text: str, calls: int, wall_ms: float, ops: dict[str, HloOp] | None = None
              ) -> Profile:
    """The :class:`Profile` of a trace already written under ``trace_dir`` (``calls`` calls profiled)."""
    ops = hlo_ops(hlo_text) if ops is None else ops
    events, source = trace_op_events(trace_dir, module_name(hlo_text))
    control = frozenset(name for name, op in ops.items() if op.opcode in _CONTROL)
    shares = wall_shares(events, control)
    rows = []
    for name, (us, count) in _totals(events).items():
        if name in control:
            continue
        rows.append(OpTime(name, us / 1e3 / calls, count / calls, ops.get(name), shares.get(name, 0.0) / 1e3 / calls))
    rows.sort(key=lambda r: -r.ms)
    return Profile(rows, wall_ms, calls, source)


def _key(r: OpTime, depth: int | None) -> str:
    """``scope [bwd]`` of an op, its scope cut to ``depth`` parts (None: whole)."""
    if r.op is None:
        return "(no HLO op)"
    scope, backward = scope_of(r.op.op_name)
    scope = "/".join(scope.split("/")[:depth])
    return f"{scope} [bwd]" if backward else scope


def by_scope(prof: Profile, depth: int | None = None, wall: bool = False) -> list[tuple[str, float, int]]:
    """``(scope [bwd], ms per call, ops)`` summed over the ops of each model scope (its first ``depth``
    parts), slowest first: op time, or with ``wall`` the ops' shares of the wall time (:func:`wall_shares`)."""
    acc: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for r in prof.ops:
        key = _key(r, depth)
        acc[key][0] += r.wall_ms if wall else r.ms
        acc[key][1] += 1
    return sorted(((k, v[0], int(v[1])) for k, v in acc.items()), key=lambda t: -t[1])


def by_part(prof: Profile, wall: bool = False) -> list[tuple[str, float]]:
    """``(top-level scope [bwd], ms per call)``: the model's parts (``vision_tower``, ``encoder``, ...)."""
    return [(k, ms) for k, ms, _ in by_scope(prof, depth=1, wall=wall)]


def format_profile(prof: Profile, top: int = 15) -> str:
    total = prof.total_ms or 1.0
    parts = ", ".join(f"{k} {ms:.1f} ms ({100 * ms / total:.0f}%)" for k, ms in by_part(prof))
    span = sum(r.wall_ms for r in prof.ops) or 1.0
    walls = ", ".join(f"{k} {ms:.1f} ms ({100 * ms / span:.0f}%)" for k, ms in by_part(prof, wall=True))
    lines = [f"op time {prof.total_ms:.2f} ms per call on the {prof.source} ({len(prof.ops)} ops), "
             f"wall {prof.wall_ms:.2f} ms per call, {prof.calls} call(s) profiled", "", f"By part: {parts}", "",
             f"By part, wall time ({span:.1f} ms: each instant shared among the ops running then, an idle one "
             f"given to the op before it): {walls}",
             "", "| scope | ms | % | ops |", "|---|---|---|---|"]
    scopes = by_scope(prof)
    lines += [f"| {k} | {ms:.2f} | {100 * ms / total:.1f} | {n} |" for k, ms, n in scopes[:max(top, 30)]]
    if len(scopes) > max(top, 30):
        rest = scopes[max(top, 30):]
        lines.append(f"| ({len(rest)} more scopes) | {sum(ms for _, ms, _ in rest):.2f} | "
                     f"{100 * sum(ms for _, ms, _ in rest) / total:.1f} | {sum(n for _, _, n in rest)} |")
    lines += ["", "| op | kind | ms | % | launches | from |", "|---|---|---|---|---|---|"]
    for r in prof.ops[:top]:
        kind = "" if r.op is None else (r.op.kind or r.op.opcode)
        origin = "" if r.op is None else r.op.op_name.split("/", 1)[-1][-90:]
        lines.append(f"| {r.name} | {kind} | {r.ms:.2f} | {100 * r.ms / total:.1f} | {r.count:g} | {origin} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the tables again from a directory ``scripts.benchmark --profile`` wrote (trace + hlo.txt.gz)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m scripts.op_profile", description=main.__doc__)
    p.add_argument("directory", help="e.g. PROFILE_DIR/train_frozen")
    p.add_argument("--top", type=int, default=30, help="ops (and at least as many scopes) to list")
    args = p.parse_args(argv)
    with gzip.open(os.path.join(args.directory, "hlo.txt.gz"), "rt") as f:
        hlo = f.read()
    print(format_profile(summarize(args.directory, hlo, calls=1, wall_ms=float("nan")), top=args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
