"""A roofline estimate of a compiled program, op by op and per model scope, from its optimized HLO text.

The compiler's ``cost_analysis()`` gives one figure per program (FLOPs, bytes accessed and, on TPU, its own
estimated time). To see where a step's time would go, this walks the program the compiler produced (after
fusion and SPMD partitioning, so per device): every top-level op of the entry computation and of the loop
bodies it runs (times the loop's known trip count), with

- ``flops``: 2 x output elements x contracted size of each ``dot`` and ``convolution`` inside the op (the
  matrix work; elementwise work is not counted, as in MFU);
- ``bytes``: the op's operands plus its result, what it moves through HBM (a fusion's intermediates stay on
  chip, which is what fusion is for);
- ``seconds``: ``max(flops / peak, bytes / bandwidth)``, the op's roofline time on the device;
- ``scope``: the model part from the op's metadata (the named scopes of the model and the step:
  ``vision_tower/stage2``, ``encoder``, ``optimizer``, ...), ``forward`` or ``backward``.

These are estimates from the program's shapes and the chip's public peak figures, not measurements: an op
that is latency-bound, or that the compiler overlaps with another, takes a different time on the chip.

A Pallas kernel (a ``tpu_custom_call``) is opaque to both: its FLOPs and bytes are the ones the kernel
declares (``pl.CostEstimate``), and the compiler attaches no cycle estimate to it. Such ops are marked
``kernel``. What the compiler does produce for a kernel is its static schedule: the VLIW bundles libtpu
emits, one per cycle, with the grid as a loop whose trip count the exit test names. Given the bundles
(:func:`kernel_schedules` reads libtpu's LLO dump, which ``scripts.aot_compile --cost`` asks for), a
kernel's time is its scheduled cycles or its roofline, whichever is longer (the schedule assumes no wait
for memory); without them, its roofline alone, a floor. The summary gives the kernels apart and adds them
to the compiler's step.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import defaultdict

_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
          "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|f8e4m3fn|f8e5m2|c64|c128)\[([\d,]*)\](\{[^}]*\})?")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s+=\s+")
# Ops that move no data of their own (views, bookkeeping) or whose cost is counted elsewhere (a loop's body).
_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "after-all", "partition-id",
         "replica-id", "iota", "copy-done", "all-reduce-done", "all-gather-done", "collective-permute-done",
         "send-done", "recv-done", "opt-barrier", "add-dependency", "conditional", "call"}
_COLLECTIVE = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_SCOPES = ("vision_tower", "projector", "embed", "encoder", "decoder", "lm_head", "loss", "optimizer")
# Named scopes whose products are bookkeeping on the matrix unit, not the model's work: LayerNorm statistics
# as products with ones (florence_jax.modeling.layers.STATS_SCOPE). They take the matrix unit's time, so the
# roofline counts them, but an MFU does not.
_AUX_SCOPES = ("/layer_norm_stats/",)
_SUBSCOPES = re.compile(r"^(stage\d+|spatial|channel|ffn|self_attn|cross_attn|encoder_attn|fc\d|downsample)$")


@dataclasses.dataclass
class Op:
    name: str
    opcode: str
    scope: str
    direction: str  # forward | backward | "" (optimizer, other)
    flops: float
    bytes: float
    count: int  # times the op runs per step (a loop body's trip count)
    aux_flops: float = 0.0  # of flops, products that are not the model's work (_AUX_SCOPES): no MFU counts them
    cycles: float = 0.0  # the compiler's own estimate for the op (TPU fusions carry one), times count
    seconds: float = 0.0
    kernel: bool = False  # a Pallas kernel: FLOPs as it declares them, no compiler estimate
    scheduled: float = 0.0  # a kernel's cycles by its static schedule (kernel_schedules), times count
    program: str = ""  # a kernel's identity: its Mosaic program and shapes (libtpu compiles each once)


# One VLIW bundle of libtpu's LLO dump: its address, an optional region marker (LB: a loop body starts),
# then one ">" per enclosing loop before the bundle's braces.
_BUNDLE = re.compile(r"^\s*(?:0x[0-9a-f]+|\d+)\s+(?:([A-Z]{2}):|:)\s*((?:>\s*)*)\{")
_EXIT_TEST = re.compile(r"scmp\.\w+\.s32\.totalorder %\w+, (\d+) /\* loop exit test \*/")
SCHEDULE_FILE = re.compile(r"^\d+-(.+)-\d+-final_bundles\.txt$")


def scheduled_cycles(bundles_text: str) -> tuple[float, bool]:
    """Cycles of one program by its final bundles (libtpu's ``final_bundles`` LLO dump): a bundle issues
    per cycle, and a loop's bundles run as many times as its exit test's bound. Returns the cycles and
    whether every loop named its trip count (a loop that does not counts once)."""
    marks = []
    for line in bundles_text.splitlines():
        if m := _BUNDLE.match(line):
            depth = m.group(2).count(">")
            if marks and line.rstrip().endswith("{}"):  # an empty bundle (a branch's delay slot) is unmarked
                depth = marks[-1][1]
            marks.append((m.group(1) == "LB", depth, line))
    known = True

    def loop(i: int, depth: int) -> tuple[float, int]:
        nonlocal known
        own, inner, trips, j = 0, 0.0, None, i
        while j < len(marks) and marks[j][1] >= depth:
            if marks[j][1] > depth:
                cycles, j = loop(j, marks[j][1])
                inner += cycles
                continue
            if j > i and marks[j][0]:  # the next loop at this depth
                break
            if trips is None and (t := _EXIT_TEST.search(marks[j][2])):
                trips = int(t.group(1))
            own += 1
            j += 1
        known = known and trips is not None
        return (trips or 1) * (own + inner), j

    total, i = 0.0, 0
    while i < len(marks):
        if marks[i][1] == 0:
            total, i = total + 1, i + 1
        else:
            cycles, i = loop(i, marks[i][1])
            total += cycles
    return total, known


def request_kernel_schedules(prefix: str = "florence-llo-") -> str:
    """Ask libtpu to dump its final bundles (what :func:`kernel_schedules` reads) into a new temporary
    directory, and return it. Only before the TPU backend starts: libtpu reads ``LIBTPU_INIT_ARGS`` then.
    The dump may reach 2 GB; the caller removes the directory."""
    import os
    import tempfile

    dump_dir = tempfile.mkdtemp(prefix=prefix)
    os.environ["LIBTPU_INIT_ARGS"] = " ".join(filter(None, [
        os.environ.get("LIBTPU_INIT_ARGS", ""), f"--xla_jf_dump_to={dump_dir}", "--xla_jf_dump_llo_text=true",
        "--xla_jf_dump_llo_pass_label_regex=final_bundles"]))
    return dump_dir


def kernel_schedules(dump_dir: str) -> dict[str, float]:
    """Scheduled cycles per program name from a libtpu LLO dump directory (``--xla_jf_dump_to`` with
    ``--xla_jf_dump_llo_text`` and the ``final_bundles`` pass): ``{"window_attention_fwd.3": 123456.0}``."""
    import os

    out = {}
    for name in sorted(os.listdir(dump_dir)):
        m = SCHEDULE_FILE.match(name)
        if m:
            with open(os.path.join(dump_dir, name)) as f:
                out[m.group(1)] = scheduled_cycles(f.read())[0]
    return out


def _split_shape(rest: str) -> tuple[str, str]:
    """``rest`` starts with the result shape (an array or a parenthesised tuple); return (shape, remainder)."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 1:].lstrip()
    shape, _, tail = rest.partition(" ")
    return shape, tail


def _arrays(shape: str, hbm_only: bool = False) -> list[tuple[str, list[int]]]:
    """(dtype, dims) of each array in a shape; with ``hbm_only``, not those a TPU layout places in on-chip
    memory (memory space ``S(1)``: a prefetched copy in VMEM)."""
    return [(d, [int(x) for x in dims.split(",") if x]) for d, dims, layout in _ARRAY.findall(shape)
            if not (hbm_only and "S(1)" in layout)]


def shape_bytes(shape: str, hbm_only: bool = True) -> float:
    """Bytes of the arrays in ``shape`` (by default those in HBM only)."""
    total = 0.0
    for dtype, dims in _arrays(shape, hbm_only):
        n = 1
        for x in dims:
            n *= x
        total += n * _BYTES.get(dtype, 4)
    return total


def _operands(args: str) -> list[str]:
    depth, end = 1, len(args)
    for i, ch in enumerate(args):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            end = i
            break
    return re.findall(r"%([\w.\-]+)", args[:end])


@dataclasses.dataclass
class _Instr:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    line: str


def parse(text: str) -> tuple[dict[str, list[_Instr]], str]:
    """Computations of an HLO module's text: name -> instructions, and the entry computation's name."""
    comps: dict[str, list[_Instr]] = {}
    entry, current = "", None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        shape, tail = _split_shape(line[m.end():])
        opcode, _, args = tail.partition("(")
        comps[current].append(_Instr(m.group(1), shape, opcode.strip(), _operands(args), line))
    return comps, entry


def _attr(line: str, key: str) -> str | None:
    m = re.search(rf"\b{key}=%?([\w.\-]+)", line)
    return m.group(1) if m else None


def _attr_block(line: str, key: str) -> str:
    """The braced value of ``key={...}`` (nested braces included), or ''."""
    start = line.find(f"{key}={{")
    if start < 0:
        return ""
    depth, i = 0, start + len(key) + 1
    for j in range(i, len(line)):
        depth += {"{": 1, "}": -1}.get(line[j], 0)
        if depth == 0:
            return line[i:j + 1]
    return ""


# output_to_operand_aliasing={{}: (8, {})}: the operand number of each aliased output
_ALIASED = re.compile(r":\s*\((\d+),")


def _dims(line: str, key: str) -> list[int]:
    m = re.search(rf"\b{key}=\{{([\d,]*)\}}", line)
    return [int(x) for x in m.group(1).split(",") if x] if m else []


def _trip_count(line: str) -> int:
    """The loop's trip count where the compiler recorded it (XLA:CPU does), else 0."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
    return int(m.group(1)) if m else 0


def _condition_bound(cond: list[_Instr]) -> int:
    """A scan's trip count from its condition, ``counter < N`` with N a constant (libtpu records no count);
    1 when the condition has another form."""
    constants = {i.name: int(m.group(1)) for i in cond for m in [re.search(r"constant\((\d+)\)", i.line)] if m}
    for i in cond:
        if i.opcode == "compare" and "direction=LT" in i.line and len(i.operands) == 2 and i.operands[1] in constants:
            return constants[i.operands[1]]
    return 1


# XLA:GPU's calls into NVIDIA's libraries for products (cuBLAS) and convolutions (cuDNN): custom calls whose
# result is a tuple of the product and a scratch workspace, their dimensions in the backend config (cuBLAS)
# or in the instruction as a convolution's (cuDNN, labelled as the forward convolution).
_LIBRARY_CALL = re.compile(r'custom_call_target="(__cublas\$[\w$]*|__cudnn\$conv\w*)"')


def _product(dims) -> int:
    n = 1
    for x in dims:
        n *= x
    return n


def _matrix_flops(instr: _Instr, shapes: dict[str, str]) -> float:
    out = _arrays(instr.shape)
    if not out:
        return 0.0
    n_out = _product(out[0][1])
    if instr.opcode == "dot":
        lhs = _arrays(shapes.get(instr.operands[0], ""))
        if not lhs:
            return 0.0
        return 2.0 * n_out * _product(lhs[0][1][d] for d in _dims(instr.line, "lhs_contracting_dims"))
    if instr.opcode == "convolution":
        return _conv_flops(instr.line, *(shapes.get(o, "") for o in instr.operands[:2]), instr.shape)
    library = _LIBRARY_CALL.search(instr.line) if instr.opcode == "custom-call" else None
    if not library or len(instr.operands) < 2:
        return 0.0
    target = library.group(1)
    if target.startswith("__cublas"):
        lhs = _arrays(shapes.get(instr.operands[0], ""))
        contracting = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', instr.line)
        if not lhs or not contracting:
            return 0.0
        return 2.0 * n_out * _product(lhs[0][1][int(d.strip(' "'))] for d in contracting.group(1).split(",") if d)
    # cuDNN: the forward convolution's FLOPs (its dimension labels are the forward's), whichever the call
    # computes: the forward (input, kernel) -> output, the input's gradient (output gradient, kernel) ->
    # input gradient, the kernel's (input, output gradient) -> kernel gradient
    first, second = (shapes.get(o, "") for o in instr.operands[:2])
    if "BackwardInput" in target:
        return _conv_flops(instr.line, instr.shape, second, first)
    if "BackwardFilter" in target:
        return _conv_flops(instr.line, first, instr.shape, second)
    return _conv_flops(instr.line, first, second, instr.shape)


def _conv_flops(line: str, lhs_shape: str, kernel_shape: str, out_shape: str) -> float:
    """2 x output elements x the real input elements each output's window reads x input features per
    group. A TPU program writes batched matmuls as convolutions whose "window" spans a batch dimension of a
    dilated input (lhs_dilate), so a window of 256 positions may hold one real element: the count is taken
    per window dimension, averaged over the output positions (_real_taps)."""
    kernel, lhs, out = _arrays(kernel_shape), _arrays(lhs_shape), _arrays(out_shape)
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", line)
    if not kernel or not labels or not out:
        return 0.0
    kdims = kernel[0][1]
    features = kdims[labels.group(2).find("i")]
    window = re.search(r"window=\{([^}]*)\}", line)
    taps = 1.0
    size_field = re.search(r"size=([\dx]+)", window.group(1)) if window else None
    if size_field:
        sizes = [int(x) for x in size_field.group(1).split("x")]

        def field(key, default):
            m = re.search(key + r"=([\d_x]+)", window.group(1))
            return m.group(1).split("x") if m else [default] * len(sizes)
        stride, dilate = [int(x) for x in field("stride", "1")], [int(x) for x in field("lhs_dilate", "1")]
        pads = [int(x.split("_")[0]) for x in field("pad", "0_0")]
        for d, size in enumerate(sizes):
            n_in = lhs[0][1][labels.group(1).find(str(d))] if lhs else None
            n_o = out[0][1][labels.group(3).find(str(d))]
            taps *= (_real_taps(n_in, size, stride[d], dilate[d], pads[d], n_o) if n_in
                     else -(-size // dilate[d]))
    return 2.0 * _product(out[0][1]) * taps * features


def _real_taps(n_in: int, size: int, stride: int, dilate: int, pad: int, n_out: int) -> float:
    """Real input elements (not dilation holes or padding) in a convolution window along one dimension,
    averaged over the ``n_out`` output positions: input ``i`` sits at ``i * dilate + pad``."""
    total = 0
    for k in range(n_out):
        lo, hi = k * stride - pad, k * stride - pad + size - 1  # the window, in dilated-input positions
        first = max(0, -(-lo // dilate))
        last = min(n_in - 1, hi // dilate)
        total += max(0, last - first + 1)
    return total / n_out


def _sliced_parameters(fused: list[_Instr]) -> dict[int, float]:
    """The parameters of a fused computation that it reads only through dynamic slices (a scan's stacked
    residuals, of which each iteration takes its own): parameter number -> bytes of the slices it reads."""
    users: dict[str, list[_Instr]] = defaultdict(list)
    for i in fused:
        for o in i.operands:
            users[o].append(i)
    out: dict[int, float] = {}
    for i in fused:
        number = re.search(r"parameter\((\d+)\)", i.line) if i.opcode == "parameter" else None
        readers = users.get(i.name, [])
        if number and readers and all(r.opcode == "dynamic-slice" and r.operands[0] == i.name for r in readers):
            out[int(number.group(1))] = sum(shape_bytes(r.shape) for r in readers)
    return out


def _updates_in_place(fused: list[_Instr]) -> bool:
    """A fused computation whose result is a dynamic-update-slice of one of its parameters (through
    bitcasts): XLA writes the update into the operand's buffer."""
    by_name = {i.name: i for i in fused}

    def through_bitcasts(instr: _Instr | None) -> _Instr | None:
        while instr is not None and instr.opcode == "bitcast" and instr.operands:
            instr = by_name.get(instr.operands[0])
        return instr

    root = through_bitcasts(next((i for i in fused if re.match(r"\s*ROOT\s", i.line)), None))
    if root is None or root.opcode != "dynamic-update-slice" or not root.operands:
        return False
    buffer = through_bitcasts(by_name.get(root.operands[0]))
    return buffer is not None and buffer.opcode == "parameter"


def scope_of(line: str) -> tuple[str, str]:
    """(scope, direction) of an op from its metadata ``op_name``: the model part it was traced in."""
    m = re.search(r'op_name="([^"]*)"', line)
    if not m:
        return "other", ""
    path = m.group(1)
    path = path.split("/", 1)[1] if path.startswith("jit(") and "/" in path else path
    words = re.findall(r"[A-Za-z_]\w*", path)
    direction = "backward" if "transpose" in words[:3] else "forward"
    for i, w in enumerate(words):
        if w in _SCOPES:
            sub = next((x for x in words[i + 1: i + 4] if _SUBSCOPES.match(x)), None)
            scope = f"{w}/{sub}" if w == "vision_tower" and sub and sub.startswith("stage") else w
            return scope, ("" if w == "optimizer" else direction)
    return "other", direction


def ops(text: str) -> list[Op]:
    """Every op the program runs per step, with its FLOPs, bytes and scope (see the module's docstring)."""
    comps, entry = parse(text)
    # names are unique within a computation, not across them (fused computations reuse param_0 ...)
    local = {c: {i.name: i for i in instrs} for c, instrs in comps.items()}
    flops_of: dict[str, tuple[float, float]] = {}

    def comp_flops(name: str) -> tuple[float, float]:
        """(matrix FLOPs, of which not the model's) of a called computation."""
        if name not in flops_of:
            flops_of[name] = (0.0, 0.0)  # recursion guard
            total = aux = 0.0
            shapes = {k: v.shape for k, v in local.get(name, {}).items()}
            for i in comps.get(name, []):
                f = _matrix_flops(i, shapes)
                total += f
                aux += f if _is_aux(i.line) else 0.0
                for key in ("calls", "to_apply"):
                    sub = _attr(i.line, key)
                    if sub and i.opcode in ("fusion", "call", "custom-call"):
                        t, a = comp_flops(sub)
                        total, aux = total + t, aux + a
            flops_of[name] = (total, aux)
        return flops_of[name]

    out: list[Op] = []

    def walk(name: str, count: int, seen: tuple[str, ...] = ()):
        if name in seen:
            return
        by_name = local.get(name, {})
        shapes = {k: v.shape for k, v in by_name.items()}
        for i in comps.get(name, []):
            if i.opcode == "while":
                body = _attr(i.line, "body")
                if body:
                    trips = _trip_count(i.line) or _condition_bound(comps.get(_attr(i.line, "condition") or "", []))
                    walk(body, count * trips, seen + (name,))
                continue
            if i.opcode in ("call", "conditional"):
                for key in ("to_apply", "true_computation", "false_computation"):
                    sub = _attr(i.line, key)
                    if sub:
                        walk(sub, count, seen + (name,))
                continue
            if i.opcode in _FREE or i.opcode.endswith("-done"):  # an async op's cost is at its start
                continue
            if i.opcode == "custom-call" and re.search(r'custom_call_target="(ConcatBitcast|AllocateBuffer|Assume)',
                                                       i.line):
                continue  # views and compiler bookkeeping on TPU, no data moved
            flops = _matrix_flops(i, shapes)
            aux = flops if _is_aux(i.line) else 0.0
            kernel = i.opcode == "custom-call" and 'custom_call_target="tpu_custom_call"' in i.line
            declared = re.search(r'"cost_estimate":\{"flops":"(\d+)"', i.line) if kernel else None
            if declared:
                flops += float(declared.group(1))
            sub = _attr(i.line, "calls")
            if sub and i.opcode in ("fusion", "custom-call"):
                t, a = comp_flops(sub)
                flops, aux = flops + t, aux + a
            # an array passed several times is read once (a kernel given one buffer for q, k and v reads
            # each head's block of it); one a fusion reads through dynamic slices only, as far as the slices
            sliced = _sliced_parameters(comps.get(sub, [])) if sub and i.opcode == "fusion" else {}
            first = {o: k for k, o in reversed(list(enumerate(i.operands)))}
            # an operand aliased to the result is the buffer the call writes in place (a kernel writing its
            # part of a buffer another kernel filled): counted once, as the result
            aliased = {i.operands[int(n)] for n in _ALIASED.findall(_attr_block(i.line, "output_to_operand_aliasing"))}
            moved = shape_bytes(i.shape) + sum(sliced.get(k, shape_bytes(shapes.get(o, ""))) for o, k in first.items()
                                                if (by_name.get(o) is None or by_name[o].opcode != "constant")
                                                and o not in aliased)
            if i.opcode == "dynamic-update-slice" or (i.opcode == "fusion" and _updates_in_place(comps.get(sub, []))):
                # written in place: the buffer operand (the result's shape) is not read, only the update is
                # read and written into it (a scan stacking each iteration's residuals does this)
                result = _arrays(i.shape)
                update = sum(shape_bytes(shapes.get(o, "")) for o in i.operands
                             if _arrays(shapes.get(o, "")) != result
                             and (by_name.get(o) is None or by_name[o].opcode != "constant"))
                moved = 2 * update
            elif i.opcode == "dynamic-slice":  # reads the slice only
                moved = 2 * shape_bytes(i.shape)
            elif i.opcode == "slice-start":  # ((operand), slice, status): reads and writes the slice only
                arrays = _ARRAY.findall(i.shape)
                moved = 2 * shape_bytes("".join(f"{d}[{dims}]" for d, dims, _ in arrays[1:2]), False)
            elif kernel and (stated := re.search(r'"cost_estimate":\{[^}]*"bytes_accessed":"(\d+)"', i.line)):
                # what the kernel declares it reads and writes: its blocks may cover part of an operand (the
                # depthwise convolution passes its input a second and third time for the rows around a block)
                moved = float(stated.group(1))
            elif i.opcode == "custom-call" and _LIBRARY_CALL.search(i.line) and i.shape.startswith("("):
                # a library call's scratch workspace (the result tuple's last array) stays in its call
                moved -= shape_bytes(_ARRAY.findall(i.shape)[-1][0] + "[" + _ARRAY.findall(i.shape)[-1][1] + "]")
            elif i.opcode.endswith("-start"):  # async: the result tuple repeats the operand (and its status word)
                moved = sum(shape_bytes(shapes.get(o, "")) for o in i.operands)
                if i.opcode == "copy-start" and "S(1)" not in i.shape:
                    moved *= 2  # HBM to HBM
            scope, direction = scope_of(i.line)
            if i.opcode.startswith(_COLLECTIVE):
                scope, direction = "collectives", ""
            cycles = re.search(r'"estimated_cycles":"(\d+)"', i.line)
            body = re.search(r'"body":"([^"]*)"', i.line) if kernel else None
            program = f"{i.shape}|{','.join(shapes.get(o, '') for o in i.operands)}|{body.group(1)}" if body else ""
            out.append(Op(i.name, i.opcode, scope, direction, flops * count, moved * count, count, aux * count,
                          cycles=float(cycles.group(1)) * count if cycles else 0.0, kernel=kernel,
                          program=program))

    walk(entry, 1)
    return out


def _is_aux(line: str) -> bool:
    name = re.search(r'op_name="([^"]*)"', line)
    return bool(name) and any(s in name.group(1) for s in _AUX_SCOPES)


def roofline(op_list: list[Op], peak_tflops: float, hbm_gbps: float) -> list[Op]:
    """Set each op's roofline time on a chip of ``peak_tflops`` (dense bf16) and ``hbm_gbps``."""
    for op in op_list:
        op.seconds = max(op.flops / (peak_tflops * 1e12), op.bytes / (hbm_gbps * 1e9))
    return op_list


def by_scope(op_list: list[Op]) -> list[dict]:
    """Totals per (scope, direction), largest estimated time first."""
    acc: dict[tuple[str, str], dict] = defaultdict(
        lambda: {"flops": 0.0, "bytes": 0.0, "seconds": 0.0, "cycles": 0.0, "ops": 0})
    for op in op_list:
        row = acc[(op.scope, op.direction)]
        row["cycles"] += op.cycles
        row["flops"] += op.flops
        row["bytes"] += op.bytes
        row["seconds"] += op.seconds
        row["ops"] += op.count
    rows = [{"scope": s, "direction": d, **v} for (s, d), v in acc.items()]
    return sorted(rows, key=lambda r: -r["seconds"])


def schedule_kernels(op_list: list[Op], schedules: dict[str, float] | None, clock_ghz: float) -> list[Op]:
    """Give each Pallas kernel of ``op_list`` (with its roofline set) its scheduled cycles per step
    (``scheduled``) and, as its ``cycles``, the longer of those and its roofline; return the kernels that
    have a schedule."""
    kernels = [o for o in op_list if o.kernel]
    # libtpu compiles identical kernels once and dumps the first one's bundles: the rest share its schedule
    by_program = {o.program: schedules[o.name] for o in kernels if schedules and o.name in schedules and o.program}
    per_call = {o.name: schedules[o.name] if schedules and o.name in schedules else by_program.get(o.program)
                for o in kernels}
    scheduled = [o for o in kernels if per_call[o.name] is not None]
    if not clock_ghz:
        return []
    for o in scheduled:
        o.scheduled = per_call[o.name] * o.count
        # the scope table's "compiler" figure: the kernel at its schedule or its roofline, the longer
        o.cycles = max(o.scheduled, o.seconds * clock_ghz * 1e9)
    return scheduled


def summary(text: str, peak_tflops: float, hbm_gbps: float, compiler: dict | None = None, top: int = 12,
            clock_ghz: float = 0.0, schedules: dict[str, float] | None = None) -> dict:
    """The roofline estimate of a program: totals, per scope, and its costliest ops (JSON-ready). With the
    chip's ``clock_ghz``, the compiler's own per-op cycle estimates (TPU) are summed into a step time too,
    and with ``schedules`` (:func:`kernel_schedules`) the Pallas kernels' scheduled cycles."""
    op_list = roofline(ops(text), peak_tflops, hbm_gbps)
    aux = sum(o.aux_flops for o in op_list)
    flops = sum(o.flops for o in op_list) - aux  # the model's matrix work, which the MFU estimates count
    seconds = sum(o.seconds for o in op_list)
    matrix = flops / (peak_tflops * 1e12)
    cycles = sum(o.cycles for o in op_list)
    cycle_seconds = cycles / (clock_ghz * 1e9) if clock_ghz and cycles else None
    kernels = [o for o in op_list if o.kernel]
    kernel_seconds = sum(o.seconds for o in kernels)
    scheduled = schedule_kernels(op_list, schedules, clock_ghz)
    kernel_step = None
    if clock_ghz and scheduled:
        kernel_step = sum(o.cycles for o in scheduled) / (clock_ghz * 1e9) + sum(
            o.seconds for o in kernels if o not in scheduled)
    costly = sorted(op_list, key=lambda o: -(o.cycles or o.seconds))[:top]
    return {
        "peak_tflops": peak_tflops, "hbm_gbps": hbm_gbps, "clock_ghz": clock_ghz,
        "matrix_flops": flops, "aux_flops": aux, "bytes": sum(o.bytes for o in op_list), "roofline_seconds": seconds,
        # the share of the estimated step the matrix units would be busy: an MFU estimate per chip
        "roofline_mfu": matrix / seconds if seconds else 0.0,
        "compiler": compiler or {},
        "compiler_cycles": cycles, "compiler_seconds": cycle_seconds,
        "compiler_mfu": matrix / cycle_seconds if cycle_seconds else None,
        # Pallas kernels, which the compiler does not estimate: how many run per step, their roofline time,
        # and the compiler's step with them at that time (a floor for the step)
        "kernel_calls": sum(o.count for o in kernels), "kernel_seconds": kernel_seconds,
        "kernel_bytes": sum(o.bytes for o in kernels), "kernel_flops": sum(o.flops for o in kernels),
        "compiler_with_kernels_seconds": cycle_seconds + kernel_seconds if cycle_seconds and kernels else None,
        # the kernels by their static schedule (or roofline, the longer), and the step with them so
        "kernels_scheduled": len({o.name for o in scheduled}), "kernels": len({o.name for o in kernels}),
        "kernel_scheduled_seconds": sum(o.scheduled for o in scheduled) / (clock_ghz * 1e9) if kernel_step else None,
        "kernel_step_seconds": kernel_step,
        "compiler_with_scheduled_kernels_seconds": cycle_seconds + kernel_step if cycle_seconds and kernel_step
        else None,
        "scopes": by_scope(op_list),
        "top_ops": [dataclasses.asdict(o) for o in costly],
    }


def format_summary(s: dict) -> str:
    lines = []
    c = s["compiler"]
    if c:
        lines.append(f"compiler     {c.get('flops', 0) / 1e12:.2f} TFLOP, {c.get('bytes accessed', 0) / 1e9:.1f} GB "
                     "accessed per device (its cost analysis: a loop body counted once)")
    if s.get("compiler_seconds"):
        lines.append(f"compiler     per-op estimates sum to {s['compiler_cycles'] / 1e6:.0f}M cycles, "
                     f"{s['compiler_seconds'] * 1e3:.1f} ms at {s['clock_ghz']:g} GHz: "
                     f"MFU {100 * s['compiler_mfu']:.0f}% (estimate)")
    if s.get("kernel_calls"):
        lines.append(f"kernels      {s['kernel_calls']} Pallas kernel calls per step, which the compiler does not "
                     f"estimate: {s['kernel_flops'] / 1e12:.2f} TFLOP (declared), {s['kernel_bytes'] / 1e9:.1f} GB, "
                     f"roofline {s['kernel_seconds'] * 1e3:.1f} ms")
        if s.get("compiler_with_kernels_seconds"):
            with_k = s["compiler_with_kernels_seconds"]
            lines.append(f"compiler     + kernels at their roofline: {with_k * 1e3:.1f} ms: MFU "
                         f"{100 * s['matrix_flops'] / (s['peak_tflops'] * 1e12) / with_k:.0f}% (a floor on the "
                         "step, the kernels' vector work not counted)")
        if s.get("compiler_with_scheduled_kernels_seconds"):
            with_k = s["compiler_with_scheduled_kernels_seconds"]
            lines.append(f"kernels      by their static schedule ({s['kernels_scheduled']} of {s['kernels']} kernels): "
                         f"{s['kernel_scheduled_seconds'] * 1e3:.1f} ms, {s['kernel_step_seconds'] * 1e3:.1f} ms "
                         "with each at least its roofline")
            lines.append(f"compiler     + kernels as scheduled: {with_k * 1e3:.1f} ms: MFU "
                         f"{100 * s['matrix_flops'] / (s['peak_tflops'] * 1e12) / with_k:.0f}% (estimate)")
    aux = (f" (and {s['aux_flops'] / 1e12:.2f} TFLOP of LayerNorm statistics as products, not counted)"
           if s.get("aux_flops") else "")
    lines.append(f"roofline     {s['matrix_flops'] / 1e12:.2f} TFLOP of matrix work{aux}, {s['bytes'] / 1e9:.1f} GB moved, "
                 f"{s['roofline_seconds'] * 1e3:.1f} ms at {s['peak_tflops']:g} TFLOP/s and {s['hbm_gbps']:g} GB/s: "
                 f"MFU {100 * s['roofline_mfu']:.0f}% (estimate)")
    clock = s.get("clock_ghz") or 0.0
    lines.append(f"  {'scope':<24} {'dir':<9} {'compiler ms':>11} {'roofline ms':>11} {'TFLOP':>7} {'GB':>7}")
    key = (lambda r: -r["cycles"]) if clock else (lambda r: -r["seconds"])
    for r in sorted(s["scopes"], key=key)[:14]:
        est = f"{r['cycles'] / (clock * 1e6):11.2f}" if clock else f"{'-':>11}"
        lines.append(f"  {r['scope']:<24} {r['direction']:<9} {est} {r['seconds'] * 1e3:11.2f} "
                     f"{r['flops'] / 1e12:7.3f} {r['bytes'] / 1e9:7.2f}")
    lines.append("  costliest ops (compiler ms, roofline ms):")
    for o in s["top_ops"][:8]:
        est = f"{o['cycles'] / (clock * 1e6):7.2f}" if clock else f"{'-':>7}"
        lines.append(f"    {est} {o['seconds'] * 1e3:7.2f}  {o['opcode']:<12} {o['scope']}/{o['direction'] or '-'} "
                     f"x{o['count']}  {o['flops'] / 1e9:.1f} GFLOP {o['bytes'] / 1e9:.2f} GB  {o['name']}")
    return "\n".join(lines)


def dump(path: str, s: dict) -> None:
    with open(path, "w") as f:
        json.dump(s, f, indent=1)
