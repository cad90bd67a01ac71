"""Device-time profiles: ops are attributed to model scopes, forward and backward, from one profiled call."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_batch

from scripts.op_profile import (
    by_part,
    by_scope,
    format_profile,
    hlo_ops,
    module_name,
    profile_compiled,
    scope_of,
)
from train.config import ModelConfig, OptimConfig
from train.state import create_model, init_train_state
from train.step import jit_train_step


def test_scope_of_unwraps_transformations_and_drops_call_plumbing():
    bwd = "jit(train_step)/transpose(jvp(vision_tower))/stage2/while/body/closed_call/spatial/mlp/dot_general"
    assert scope_of(bwd) == ("vision_tower/stage2/spatial/mlp", True)
    fwd = "jit(train_step)/jvp(vision_tower)/stage2/while/body/closed_call/channel/dwconv/jit(_pad)/pad"
    assert scope_of(fwd) == ("vision_tower/stage2/channel/dwconv", False)
    einsum = "jit(step)/jvp(decoder)/cross_attn/bqd,bkd->bqk/dot_general"
    assert scope_of(einsum) == ("decoder/cross_attn", False)
    assert scope_of("jit(f)/add") == ("(top)", False)
    # a checkpointed forward recomputed in the backward repeats its scopes; merged ops join names with ";"
    remat = "jit(step)/transpose(jvp(encoder))/ffn/encoder/ffn/rematted_computation/dot_general"
    assert scope_of(remat) == ("encoder/ffn", True)
    merged = "jit(step)/transpose(jvp(decoder))/cross_kv/transpose;jit(step)/transpose(jvp(decoder))/cross_attn/x"
    assert scope_of(merged) == ("decoder/cross_kv", True)


def test_profile_puts_the_big_matmul_first_forward_and_backward(tmp_path):
    # 1024^3 products take tens of milliseconds, so a stall of a millisecond or two in any one op (the other
    # test worker shares the two cores) cannot move the shares below; at 384 a 1 ms stall in the small
    # reduction once did.
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1024, 1024)), jnp.float32)

    def loss(w):
        with jax.named_scope("big"):
            y = jnp.tanh(x @ w)
        with jax.named_scope("small"):
            return y[:4, :4].sum() + y.sum()

    fn = jax.jit(jax.value_and_grad(loss))
    compiled = fn.lower(x).compile()
    text = compiled.as_text()
    assert module_name(text) and any("big" in op.op_name for op in hlo_ops(text).values())

    def run():
        jax.block_until_ready(compiled(x))

    run()
    prof = profile_compiled(run, text, str(tmp_path / "trace"), calls=2)
    assert prof.source == "host" and prof.calls == 2 and prof.total_ms > 0
    scopes = {k: ms for k, ms, _ in by_scope(prof)}
    # One 1024^3 matmul forward, two backward (x^T @ dy, and dy @ w^T fused or not): they dominate.
    assert scopes.get("big", 0) > 0 and scopes.get("big [bwd]", 0) > 0
    assert scopes["big"] + scopes["big [bwd]"] > 0.5 * prof.total_ms
    assert prof.ops[0].op is not None and "big" in prof.ops[0].op.op_name
    # The wall-time shares add up to the traced span, within the wall time measured around the calls.
    span = sum(r.wall_ms for r in prof.ops)
    assert 0 < span <= prof.wall_ms
    walls = {k: ms for k, ms, _ in by_scope(prof, wall=True)}
    assert walls["big"] + walls["big [bwd]"] > 0.5 * span
    table = format_profile(prof)
    assert "| big [bwd] |" in table and "call(s) profiled" in table and "By part, wall time" in table


def test_train_step_profile_names_model_parts_and_frozen_tower_has_no_backward(tiny_hf_dir, tmp_path):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
    from florence_jax.sharding import batch_sharding

    model = create_model(ModelConfig(name_or_path=str(tiny_hf_dir), dtype="float32", dropout=0.0,
                                     drop_path_rate=0.0), mesh)
    optim = OptimConfig(learning_rate=1e-3, freeze=(r"^model\.vision_tower\.",))
    fns, state, _ = init_train_state(model, optim, 10, mesh)
    step = jit_train_step(fns, state, batch_sharding(mesh))
    b = tiny_batch(batch=2, dec_len=6)
    labels = b["decoder_input_ids"].astype(np.int32)
    batch = jax.device_put({"pixel_values": b["pixel_values"].transpose(0, 2, 3, 1),
                            "input_ids": b["input_ids"].astype(np.int32),
                            "attention_mask": b["attention_mask"].astype(np.int32),
                            "labels": labels, "label_mask": np.ones_like(labels, np.float32)}, batch_sharding(mesh))
    key = jax.random.key(0)
    compiled = step.lower(state, batch, key).compile()
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], batch, key)
        jax.block_until_ready(metrics["loss"])

    run()
    prof = profile_compiled(run, compiled.as_text(), str(tmp_path / "trace"))
    scopes = {k for k, _, _ in by_scope(prof)}
    for part in ("vision_tower/stage0/spatial/window_attn", "vision_tower/stage1/channel/channel_attn",
                 "projector", "encoder/self_attn [bwd]", "decoder/cross_attn [bwd]", "decoder/ffn [bwd]",
                 "lm_head [bwd]", "optimizer"):
        assert any(s.startswith(part) for s in scopes), (part, sorted(scopes))
    # The frozen tower's gradient is never computed: no backward op of the tower ran.
    assert not [s for s in scopes if s.startswith("vision_tower") and s.endswith("[bwd]")]
    parts = dict(by_part(prof))
    assert {"vision_tower", "encoder", "encoder [bwd]", "decoder [bwd]", "optimizer"} <= set(parts)
    assert "vision_tower [bwd]" not in parts
    assert abs(sum(parts.values()) - prof.total_ms) < 1e-6 * max(prof.total_ms, 1.0)


def test_accelerator_traces_count_kernels_not_their_host_launches(tmp_path):
    """The shape of a GPU trace: kernels on a /device: process (or cat "kernel") carry hlo_op and
    hlo_module; the host thread's launch events for the same ops are not counted again."""
    import gzip
    import json

    from scripts.op_profile import trace_op_times

    events = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 7, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 30.0, "name": "fusion_1",
         "args": {"hlo_op": "fusion.1", "hlo_module": "jit_step"}},
        {"ph": "X", "pid": 1, "tid": 1, "ts": 40, "dur": 10.0, "name": "fusion_1",
         "args": {"hlo_op": "fusion.1", "hlo_module": "jit_step"}},
        {"ph": "X", "pid": 1001, "tid": 2, "ts": 60, "dur": 5.0, "name": "gemm", "cat": "kernel",
         "args": {"hlo_op": "dot.2", "hlo_module": "jit_step"}},
        {"ph": "X", "pid": 1, "tid": 1, "ts": 70, "dur": 99.0, "name": "other",
         "args": {"hlo_op": "fusion.9", "hlo_module": "jit_other"}},
        {"ph": "X", "pid": 7, "tid": 3, "ts": 0, "dur": 500.0, "name": "fusion.1",
         "args": {"hlo_op": "fusion.1", "hlo_module": "jit_step"}},
    ]
    d = tmp_path / "plugins" / "profile" / "run"
    d.mkdir(parents=True)
    with gzip.open(d / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    times, source = trace_op_times(str(tmp_path), "jit_step")
    assert source == "device"
    assert times == {"fusion.1": [40.0, 2], "dot.2": [5.0, 1]}


def test_wall_shares_split_side_by_side_ops_and_give_idle_time_to_the_op_before():
    """Two ops side by side share their instants; an idle instant goes to the op that ended last before it
    (its work handed to other threads); the shares add up to the span, where op time counts the side by
    side ops twice. Control ops (a loop enclosing its body) take no share."""
    from scripts.op_profile import wall_shares

    events = [("a", 0.0, 10.0), ("b", 0.0, 10.0), ("c", 6.0, 6.0),  # a, b, c side by side; c ends at 12
              ("d", 16.0, 4.0), ("e", 20.0, 0.0), ("loop", 0.0, 20.0)]  # idle 12-16: c's; e takes no time
    shares = wall_shares(events, skip=frozenset({"loop"}))
    assert shares == pytest.approx({"a": 6 / 2 + 4 / 3, "b": 6 / 2 + 4 / 3, "c": 4 / 3 + 2 + 4, "d": 4.0})
    assert sum(shares.values()) == pytest.approx(20.0)
    assert wall_shares([]) == {}
