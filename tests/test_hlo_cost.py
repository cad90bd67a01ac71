"""scripts/hlo_cost.py: the per-op, per-scope roofline estimate read from a compiled program's text."""

import jax
import jax.numpy as jnp

from scripts import hlo_cost


def _program():
    def f(a, b, q, k, ws):
        with jax.named_scope("encoder"):
            h = a @ b
        with jax.named_scope("decoder"):
            s = jnp.einsum("bqd,bkd->bqk", q, k)
        with jax.named_scope("vision_tower"), jax.named_scope("stage2"):
            x, _ = jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), a[:, :32], ws)
        return h, s, x

    args = (jnp.ones((64, 32)), jnp.ones((32, 16)), jnp.ones((4, 8, 16)), jnp.ones((4, 8, 16)),
            jnp.ones((5, 32, 32)))
    return jax.jit(f).lower(*args).compile().as_text()


def test_matrix_flops_per_scope_count_loop_trips():
    """Each product's FLOPs (2 x output x contracted size) land in the named scope it was traced in, and a
    scanned body's count is multiplied by its trip count (5 here)."""
    rows = {r["scope"]: r for r in hlo_cost.by_scope(hlo_cost.roofline(hlo_cost.ops(_program()), 1.0, 1.0))}
    assert rows["encoder"]["flops"] == 2 * 64 * 16 * 32
    assert rows["decoder"]["flops"] == 2 * 4 * 8 * 8 * 16
    assert rows["vision_tower/stage2"]["flops"] == 5 * 2 * 64 * 32 * 32
    assert rows["vision_tower/stage2"]["ops"] >= 5
    # roofline time: the larger of FLOPs at 1 TFLOP/s and bytes at 1 GB/s, per op
    assert rows["encoder"]["seconds"] >= rows["encoder"]["bytes"] / 1e9 > 0


def test_layernorm_statistics_products_take_time_but_no_mfu():
    """The matrix LayerNorm statistics' products (florence_jax.modeling.layers.matrix_moments, in its named
    scope) count for the roofline time, but not as the model's matrix work an MFU estimate counts."""
    from florence_jax.modeling.layers import STATS_SCOPE, matrix_moments

    def f(x, w):
        with jax.named_scope("vision_tower"), jax.named_scope("stage2"):
            mean, mean_sq = matrix_moments(x)
            return ((x - mean) * jax.lax.rsqrt(mean_sq - mean * mean + 1e-5)) @ w

    x, w = jnp.ones((64, 512), jnp.bfloat16), jnp.ones((512, 256), jnp.bfloat16)
    text = jax.jit(f).lower(x, w).compile().as_text()
    assert f"/{STATS_SCOPE}/" in text and any(s.strip("/") == STATS_SCOPE for s in hlo_cost._AUX_SCOPES)
    op_list = hlo_cost.ops(text)
    stats = 3 * 2 * 64 * 512 * 128  # three products with a (512, 128) matrix of ones
    assert sum(o.flops for o in op_list) == 2 * 64 * 512 * 256 + stats
    assert sum(o.aux_flops for o in op_list) == stats
    s = hlo_cost.summary(text, 1.0, 1.0)
    assert s["matrix_flops"] == 2 * 64 * 512 * 256 and s["aux_flops"] == stats
    assert "LayerNorm statistics as products, not counted" in hlo_cost.format_summary(s)


# A TPU program writes a batched matmul as a convolution whose window spans the batch dimension with
# lhs_dilate equal to its size (one real element per tap): 128 windows x 2 heads of 16x16 scores over 16
# features. The line is from a libtpu compile of the tiny model, shortened.
_TPU_TEXT = """HloModule m

%fused (param_0: bf16[128,2,16,16], param_1: bf16[128,2,16,16]) -> f32[128,2,16,16] {
  %param_0 = bf16[128,2,16,16]{3,2,1,0:T(8,128)(2,1)} parameter(0)
  %param_1 = bf16[128,2,16,16]{3,2,1,0:T(8,128)(2,1)} parameter(1)
  ROOT %convolution-base-dilated.57 = f32[128,2,16,16]{2,3,1,0:T(8,128)} convolution(%param_0, %param_1), window={size=128x2 stride=127x1 lhs_dilate=128x2}, dim_labels=01bf_01oi->01bf, metadata={op_name="jit(train_step)/jvp(vision_tower)/stage0/spatial/window_attn/bhqd,bhkd->bhqk"}
}

ENTRY %main (p0: bf16[128,2,16,16], p1: bf16[128,2,16,16]) -> f32[128,2,16,16] {
  %p0 = bf16[128,2,16,16]{3,2,1,0:T(8,128)(2,1)} parameter(0)
  %p1 = bf16[128,2,16,16]{3,2,1,0:T(8,128)(2,1)S(1)} parameter(1)
  ROOT %fusion.1 = f32[128,2,16,16]{2,3,1,0:T(8,128)} fusion(%p0, %p1), kind=kOutput, calls=%fused, metadata={op_name="jit(train_step)/jvp(vision_tower)/stage0/spatial/window_attn/bhqd,bhkd->bhqk"}, backend_config={"window_config":{"estimated_cycles":"6005"}}
}
"""


def test_tpu_batched_matmul_as_convolution_and_on_chip_operands():
    (op,) = hlo_cost.ops(_TPU_TEXT)
    assert op.flops == 2 * (128 * 2 * 16 * 16) * 16  # not x 128 x 2 window "taps"
    assert (op.scope, op.direction) == ("vision_tower/stage0", "forward")
    assert op.cycles == 6005
    # p1 sits in on-chip memory (S(1)): only p0 and the result move through HBM
    assert op.bytes == 128 * 2 * 16 * 16 * (2 + 4)


def test_backward_and_optimizer_scopes():
    assert hlo_cost.scope_of('metadata={op_name="jit(train_step)/transpose(jvp(encoder))/ffn/dot"}') == (
        "encoder", "backward")
    assert hlo_cost.scope_of('metadata={op_name="jit(train_step)/optimizer/add"}') == ("optimizer", "")
    assert hlo_cost.scope_of("no metadata") == ("other", "")


# libtpu records no trip count on a scan's while loop: it is read from the condition, counter < 9.
_TPU_LOOP = """HloModule m

%body (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p = (s32[], f32[8,16]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,16]{1,0} get-tuple-element(%p), index=1
  %w = f32[16,16]{1,0} constant({...})
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %y = f32[8,16]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(train_step)/jvp(vision_tower)/stage2/while/body/dot_general"}
  ROOT %t = (s32[], f32[8,16]) tuple(%next, %y)
}

%cond (q: (s32[], f32[8,16])) -> pred[] {
  %bound = s32[] constant(9)
  %q = (s32[], f32[8,16]) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  ROOT %lt = pred[] compare(%j, %bound), direction=LT
}

ENTRY %main (a: f32[8,16]) -> (s32[], f32[8,16]) {
  %a = f32[8,16]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8,16]) tuple(%zero, %a)
  ROOT %loop = (s32[], f32[8,16]) while(%init), condition=%cond, body=%body
}
"""


def test_a_loop_without_a_recorded_trip_count_runs_its_condition_bound():
    (dot,) = [o for o in hlo_cost.ops(_TPU_LOOP) if o.flops]
    assert dot.count == 9 and dot.flops == 9 * 2 * 8 * 16 * 16
    assert dot.scope == "vision_tower/stage2"


# A Pallas kernel (DaViT's fused window attention) as libtpu compiles it, shortened: a tpu_custom_call with
# the FLOPs and bytes the kernel declares (its qkv input and its output) and no cycle estimate, next to a
# fusion that has one.
_TPU_KERNEL = """HloModule m

%fused (param_0: bf16[64,144,384]) -> bf16[64,144,384] {
  %param_0 = bf16[64,144,384]{2,1,0:T(8,128)(2,1)} parameter(0)
  ROOT %n = bf16[64,144,384]{2,1,0:T(8,128)(2,1)} negate(%param_0)
}

ENTRY %main (p0: bf16[64,144,384]) -> bf16[64,144,128] {
  %p0 = bf16[64,144,384]{2,1,0:T(8,128)(2,1)} parameter(0)
  %fusion.1 = bf16[64,144,384]{2,1,0:T(8,128)(2,1)} fusion(%p0), kind=kLoop, calls=%fused, metadata={op_name="jit(fwd)/vision_tower/stage0/spatial/window_attn/neg"}, backend_config={"window_config":{"estimated_cycles":"3000000"}}
  ROOT %window_attention_fwd.9 = bf16[64,144,128]{2,1,0:T(8,128)(2,1)} custom-call(%fusion.1), custom_call_target="tpu_custom_call", operand_layout_constraints={bf16[64,144,384]{2,1,0}}, metadata={op_name="jit(fwd)/vision_tower/stage0/spatial/window_attn/window_attention_fwd/pallas_call"}, backend_config={"flag_configs":[],"custom_call_config":{"body":"TUxJUgA=","cost_estimate":{"flops":"169869312","transcendentals":"5308416","bytes_accessed":"9437184","remote_bytes_transferred":"0"}}}
}
"""


def test_a_pallas_kernel_counts_its_declared_flops_and_its_roofline_apart():
    """The compiler gives a kernel no cycle estimate: its time is its roofline, reported apart and added to
    the compiler's step as a floor, never silently counted as zero."""
    ops = {o.name: o for o in hlo_cost.ops(_TPU_KERNEL)}
    kernel = ops["window_attention_fwd.9"]
    assert kernel.kernel and not ops["fusion.1"].kernel
    assert kernel.flops == 169869312 and kernel.cycles == 0
    assert kernel.bytes == 64 * 144 * (384 + 128) * 2
    assert kernel.scope == "vision_tower/stage0"
    # the bytes are the declared ones (a kernel may pass one array twice, as the depthwise convolution's
    # does for its halo rows, and read a part of it), else its operands and result
    (declared,) = [o for o in hlo_cost.ops(_TPU_KERNEL.replace('"9437184"', '"1000"')) if o.kernel]
    assert declared.bytes == 1000
    (counted,) = [o for o in hlo_cost.ops(_TPU_KERNEL.replace('"bytes_accessed":"9437184",', "")) if o.kernel]
    assert counted.bytes == kernel.bytes
    s = hlo_cost.summary(_TPU_KERNEL, 1.0, 1.0, clock_ghz=1.0)
    assert s["kernel_calls"] == 1
    floor = max(169869312 / 1e12, kernel.bytes / 1e9)
    assert abs(s["kernel_seconds"] - floor) < 1e-12
    assert abs(s["compiler_with_kernels_seconds"] - (3e6 / 1e9 + floor)) < 1e-12
    assert "Pallas kernel calls per step" in hlo_cost.format_summary(s)


# libtpu also writes a batched matmul's batch dimensions as a window over a dilated input whose dilation is
# one less than the window (size 256, lhs_dilate 255, padding 255 on each side, in the base tower's stage 2):
# each window still holds one real element. Shortened to 4 windows x 2 heads.
_TPU_DILATED = """HloModule m

ENTRY %main (p: f32[4,2,16,16], v: bf16[4,2,8,16]) -> bf16[4,2,8,16] {
  %p = f32[4,2,16,16]{2,3,1,0:T(8,128)} parameter(0)
  %v = bf16[4,2,8,16]{2,3,1,0:T(8,128)(2,1)} parameter(1)
  ROOT %convolution-base-dilated.49 = bf16[4,2,8,16]{2,3,1,0:T(8,128)(2,1)} convolution(%p, %v), window={size=4x2 stride=4x2 pad=3_3x1_1 lhs_dilate=3x1 rhs_reversal=1x1}, dim_labels=01fb_01oi->01fb, metadata={op_name="jit(fwd)/vision_tower/stage2/spatial/window_attn/bhqk,bhkd->bhqd/dot_general"}
}
"""


def test_a_batch_written_as_a_window_over_a_dilated_input_counts_one_element_per_window():
    (op,) = hlo_cost.ops(_TPU_DILATED)
    assert op.flops == 2 * (4 * 2 * 16 * 8) * 16  # windows x heads x queries x head size x keys, x 2


# A scan that keeps each iteration's residual for the backward writes it into a stacked buffer in place:
# a fusion whose root is a dynamic-update-slice of its buffer parameter (libtpu's form, shortened), and the
# bare op. Only the update moves; counting the whole buffer made the full fine-tunes' roofline read up to
# 9 x the stack per step.
_TPU_STACK = """HloModule m

%fused_dus (param_0: bf16[9,64,128], param_1: bf16[64,128], param_2: s32[]) -> bf16[9,64,128] {
  %param_0 = bf16[9,64,128]{2,1,0:T(8,128)(2,1)} parameter(0)
  %param_1 = bf16[64,128]{1,0:T(8,128)(2,1)} parameter(1)
  %bitcast.1 = bf16[1,64,128]{2,1,0:T(8,128)(2,1)} bitcast(%param_1)
  %param_2 = s32[] parameter(2)
  %zero = s32[] constant(0)
  ROOT %dynamic-update-slice.1 = bf16[9,64,128]{2,1,0:T(8,128)(2,1)} dynamic-update-slice(%param_0, %bitcast.1, %param_2, %zero, %zero)
}

ENTRY %main (stack: bf16[9,64,128], x: bf16[64,128], i: s32[]) -> (bf16[9,64,128], bf16[9,64,128], bf16[64,128]) {
  %stack = bf16[9,64,128]{2,1,0:T(8,128)(2,1)} parameter(0)
  %x = bf16[64,128]{1,0:T(8,128)(2,1)} parameter(1)
  %i = s32[] parameter(2)
  %z = s32[] constant(0)
  %bitcast_dynamic-update-slice_fusion.1 = bf16[9,64,128]{2,1,0:T(8,128)(2,1)} fusion(%stack, %x, %i), kind=kLoop, calls=%fused_dus
  %x3 = bf16[1,64,128]{2,1,0:T(8,128)(2,1)} bitcast(%x)
  %dus = bf16[9,64,128]{2,1,0:T(8,128)(2,1)} dynamic-update-slice(%stack, %x3, %i, %z, %z)
  %ds = bf16[1,64,128]{2,1,0:T(8,128)(2,1)} dynamic-slice(%stack, %i, %z, %z), dynamic_slice_sizes={1,64,128}
  ROOT %t = (bf16[9,64,128], bf16[9,64,128], bf16[1,64,128]) tuple(%bitcast_dynamic-update-slice_fusion.1, %dus, %ds)
}
"""


def test_an_update_in_place_moves_the_update_not_the_buffer():
    ops = {o.name: o for o in hlo_cost.ops(_TPU_STACK)}
    update = 64 * 128 * 2
    # read and written once each; the two in-place forms also count their s32 index (4 bytes) twice
    assert ops["bitcast_dynamic-update-slice_fusion.1"].bytes == ops["dus"].bytes == 2 * update + 8
    assert ops["ds"].bytes == 2 * update


# libtpu's final VLIW bundles for a kernel (its LLO dump), shortened: a grid loop of 6 iterations whose body
# holds an inner loop of 4, a branch's empty delay slot inside the outer body (unmarked, like the dump's),
# and bundles before and after the loops.
_BUNDLES = """= control target key start
LB: loop body
= control target key end

     0   :  { %s1 = inlined_call_operand.hbm [shape: bf16[16,48,48,512], index: 0] }
   0x1   :  { %2 = vsyncpa [#allocation5], 0 }
   0x2 LB: > { %s3 = sadd.s32 1, %s9 }
   0x3   : > { %v4 = vld [vmem:[%s3]] }
   0x4 LB: > > { %v5 = vmul.f32 %v4, %v4 }
   0x5   : > > { %p6 = scmp.ge.s32.totalorder %s7, 4 /* loop exit test */ }
   0x6   : > > { %8 = sbr.rel (!%p6) target = $region9 }
   0x7   : > { %p10 = scmp.ge.s32.totalorder %s3, 6 /* loop exit test */ }
   0x8   :  {}
   0x9   : > { %11 = sbr.rel (!%p10) target = $region2 }
   0xa   :  { %12 = vsyncpa [#allocation5], 1 }
"""


def test_a_kernels_static_schedule_counts_each_loops_bundles_times_its_trips(tmp_path):
    # outside the loops 3 bundles; the outer body 5 of its own (the delay slot included) and the inner
    # loop's 3 x 4: 3 + 6 x (5 + 12)
    assert hlo_cost.scheduled_cycles(_BUNDLES) == (3 + 6 * (5 + 3 * 4), True)
    # a loop whose exit test names no bound counts once, and says so
    assert hlo_cost.scheduled_cycles(_BUNDLES.replace(", 4 /* loop exit test */", ", %s8")) == (3 + 6 * (5 + 3), False)
    (tmp_path / "1796-window_attention_fwd.9-01-final_bundles.txt").write_text(_BUNDLES)
    (tmp_path / "1796-window_attention_fwd.9-00-schedule-analysis_final_bundles.txt").write_text("Schedule analysis:")
    schedules = hlo_cost.kernel_schedules(str(tmp_path))
    assert schedules == {"window_attention_fwd.9": 105.0}
    # the kernel's time is its schedule or its roofline, the longer, added to the compiler's step
    s = hlo_cost.summary(_TPU_KERNEL, 1.0, 1.0, clock_ghz=1.0, schedules={"window_attention_fwd.9": 3e7})
    assert s["kernels_scheduled"] == s["kernels"] == 1
    assert abs(s["kernel_scheduled_seconds"] - 3e7 / 1e9) < 1e-12
    assert abs(s["compiler_with_scheduled_kernels_seconds"] - (3e6 + 3e7) / 1e9) < 1e-12
    roofline_bound = hlo_cost.summary(_TPU_KERNEL, 1.0, 1.0, clock_ghz=1.0, schedules={"window_attention_fwd.9": 10})
    assert abs(roofline_bound["kernel_step_seconds"] - roofline_bound["kernel_seconds"]) < 1e-12
    assert "as scheduled" in hlo_cost.format_summary(s)
    # libtpu dumps one schedule for identical kernels (the same program and shapes): the others share it
    root = next(line for line in _TPU_KERNEL.splitlines() if "ROOT %window_attention_fwd.9" in line)
    twin = root.replace("ROOT %window_attention_fwd.9", "%window_attention_fwd.12")
    two = _TPU_KERNEL.replace(root, twin + "\n" + root)
    s2 = hlo_cost.summary(two, 1.0, 1.0, clock_ghz=1.0, schedules={"window_attention_fwd.9": 3e7})
    assert s2["kernels_scheduled"] == s2["kernels"] == 2
    assert abs(s2["kernel_scheduled_seconds"] - 2 * 3e7 / 1e9) < 1e-12
    other = two.replace('"body":"TUxJUgA="', '"body":"T1RIRVI="', 1)  # a different program: no schedule
    assert hlo_cost.summary(other, 1.0, 1.0, clock_ghz=1.0, schedules={"window_attention_fwd.9": 3e7})[
        "kernels_scheduled"] == 1


# XLA:GPU's program for a described GPU (scripts.aot_compile --topology h100), shortened: products as cuBLAS
# calls and convolutions as cuDNN calls, each a tuple of its result and a scratch workspace, and a Pallas
# kernel given one buffer three times (florence_jax.modeling.flash_window reads q, k and v in place), and one
# writing into a buffer it is given, aliased (the window kernels' dq into the dk/dv kernel's output).
_GPU_PROGRAM = """HloModule jit_step, entry_computation_layout={()->()}

ENTRY %main.1 (a: bf16[64,32], b: bf16[32,16], x: f32[4,8,8,64], w: f32[96,3,3,64], g: f32[4,4,4,96], qkv: bf16[8,16,6,16], dkv: bf16[8,16,6,16]) -> bf16[64,16] {
  %a = bf16[64,32]{1,0} parameter(0)
  %b = bf16[32,16]{1,0} parameter(1)
  %x = f32[4,8,8,64]{3,2,1,0} parameter(2)
  %w = f32[96,3,3,64]{3,2,1,0} parameter(3)
  %g = f32[4,4,4,96]{3,2,1,0} parameter(4)
  %qkv = bf16[8,16,6,16]{3,2,1,0} parameter(5)
  %dkv = bf16[8,16,6,16]{3,2,1,0} parameter(6)
  %cublas-lt-matmul.1 = (bf16[64,16]{1,0}, s8[4194304]{0}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(train_step)/jvp(encoder)/fc1/dot_general"}, backend_config={"operation_queue_id":"0","gemm_backend_config":{"selected_algorithm":"0","alpha_real":1,"beta":0,"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]},"epilogue":"DEFAULT"}}
  %cudnn-conv.1 = (f32[4,4,4,96]{3,2,1,0}, u8[0]{0}) custom-call(%x, %w), window={size=3x3 stride=2x2 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward", metadata={op_name="jit(train_step)/jvp(vision_tower)/stage2/patch_embed/conv_general_dilated"}
  %cudnn-conv-bw-input.2 = (f32[4,8,8,64]{3,2,1,0}, u8[0]{0}) custom-call(%g, %w), window={size=3x3 stride=2x2 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convBackwardInput", metadata={op_name="jit(train_step)/transpose(jvp(vision_tower))/stage2/patch_embed/conv_general_dilated"}
  %cudnn-conv-bw-filter.5 = (f32[96,3,3,64]{3,2,1,0}, u8[0]{0}) custom-call(%x, %g), window={size=3x3 stride=2x2 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convBackwardFilter", metadata={op_name="jit(train_step)/transpose(jvp(vision_tower))/stage2/patch_embed/conv_general_dilated"}
  %pallas_call.8 = bf16[8,16,2,16]{3,2,1,0} custom-call(%qkv, %qkv, %qkv), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(train_step)/jvp(vision_tower)/stage2/spatial/window_attn/window_flash_forward/pallas_call"}
  %pallas_call.9 = bf16[8,16,6,16]{3,2,1,0} custom-call(%qkv, %qkv, %dkv), custom_call_target="__gpu$xla.gpu.triton", output_to_operand_aliasing={{}: (2, {})}, metadata={op_name="jit(train_step)/transpose(jvp(vision_tower))/stage2/spatial/window_attn/window_flash_dq/pallas_call"}
  ROOT %r = bf16[64,16]{1,0} get-tuple-element(%cublas-lt-matmul.1), index=0
}
"""


def test_a_gpu_programs_library_calls_count_as_products_without_their_workspace():
    """cuBLAS products count 2 x output x contracted size; a cuDNN convolution its forward's FLOPs, in the
    forward and both backward calls: 2 x the forward output's elements x 64 input features x the real taps
    (stride 2, padding 1 over 8 rows: the first output row reads 2 real rows, the other three 3, so 2.75 per
    dimension on average); no call moves its scratch workspace; a buffer passed three times is read once; a
    buffer aliased to the result is the result, written, not read as well."""
    by_name = {o.name: o for o in hlo_cost.ops(_GPU_PROGRAM)}
    conv = 2 * (4 * 4 * 4 * 96) * 2.75**2 * 64
    assert by_name["cublas-lt-matmul.1"].flops == 2 * 64 * 16 * 32
    assert by_name["cudnn-conv.1"].flops == by_name["cudnn-conv-bw-input.2"].flops == conv
    assert by_name["cudnn-conv-bw-filter.5"].flops == conv
    assert by_name["cublas-lt-matmul.1"].bytes == 2 * (64 * 32 + 32 * 16 + 64 * 16)  # not the 4 MiB workspace
    assert by_name["cudnn-conv-bw-input.2"].bytes == 4 * (4 * 4 * 4 * 96 + 96 * 9 * 64 + 4 * 8 * 8 * 64)
    assert by_name["pallas_call.8"].bytes == 2 * (8 * 16 * 6 * 16 + 8 * 16 * 2 * 16)
    assert by_name["pallas_call.9"].bytes == 2 * (8 * 16 * 6 * 16 + 8 * 16 * 6 * 16)  # qkv once, dkv as the result
    assert by_name["pallas_call.9"].direction == "backward"
    assert by_name["cudnn-conv-bw-filter.5"].direction == "backward"
    assert by_name["pallas_call.8"].scope == "vision_tower/stage2"


def test_a_fusion_reading_one_iterations_slice_moves_the_slice_not_the_stack():
    """A fusion that takes one iteration's slice of a stacked array (a scan's residuals in its backward pass)
    reads that slice, not the stack: 9 x 64 x 128 floats stacked, one 64 x 128 slice read and written."""
    f = jax.jit(lambda xs, i: jnp.tanh(jax.lax.dynamic_index_in_dim(xs, i, keepdims=False)) * 2)
    op_list = [o for o in hlo_cost.ops(f.lower(jnp.ones((9, 64, 128)), 3).compile().as_text())
               if o.opcode == "fusion"]
    assert len(op_list) == 1 and op_list[0].bytes == 2 * 4 * 64 * 128 + 4  # the slice in and out, the index
