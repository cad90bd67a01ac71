"""The benchmark's bookkeeping: rows survive a run cut short, and the table is printed from them."""

import json

import pytest

from scripts import benchmark


def _row(ours: float, reference: float) -> dict:
    return {"ours": ours, "reference": reference, "unit": "examples/s", "ratio": ours / reference,
            "step_s": {"ours": 32 / ours, "reference": 32 / reference},
            "first_s": {"ours": 40.0, "reference": 5.0},
            "spread": {"ours": "0.1-0.2 s", "reference": "0.3-0.4 s"},
            "flops_per_step": 2.5e13, "mfu": 0.25, "peak_memory_gib": {"ours": 12.0, "reference": 30.0}}


def test_json_rewritten_after_every_row_and_table_reprints_it(tmp_path, capsys):
    path = tmp_path / "train.json"
    meta = benchmark._meta(benchmark.Settings(dtype="bfloat16", train_batch=32), "GPU test", "2.x", "5.x")
    results = benchmark._Results(str(path), meta)
    results["train_frozen"] = _row(300.0, 100.0)
    saved = json.loads(path.read_text())  # on disk before any later row: a time limit here keeps it
    assert saved["meta"]["device"] == "GPU test"
    assert saved["train_frozen"]["ratio"] == 3.0
    assert "train_full" not in saved

    results["train_full"] = _row(150.0, 100.0)
    assert set(json.loads(path.read_text())) == {"meta", "train_frozen", "train_full"}
    assert not (tmp_path / "train.json.tmp").exists()

    assert benchmark.main(["--table", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Device: GPU test; jax" in out and "bfloat16 compute, train batch 32" in out
    frozen = next(line for line in out.splitlines() if line.startswith("| train_frozen |"))
    assert "| 300 | 100 | examples/s | **3.00x** |" in frozen
    assert "MFU 25.0%" in frozen and "memory ours 12.0 GiB, reference 30.0 GiB" in frozen
    assert any(line.startswith("| train_full |") and "**1.50x**" in line for line in out.splitlines())


def test_jaxpr_flops_counts_matmuls_convs_scans_and_gradients():
    import jax
    import jax.numpy as jnp

    a = jnp.ones((4, 8, 16))
    w = jnp.ones((16, 32))
    assert benchmark.jaxpr_flops(jax.make_jaxpr(lambda a, w: a @ w)(a, w)) == 2 * 4 * 8 * 16 * 32
    # batched (heads) matmul: batch dims counted once
    q = jnp.ones((2, 3, 5, 7))
    assert benchmark.jaxpr_flops(jax.make_jaxpr(lambda q, k: jnp.einsum("bhqd,bhkd->bhqk", q, k))(q, q)) == (
        2 * 2 * 3 * 5 * 5 * 7)
    # convolution, grouped (depthwise) and dense: out elements x (in channels per group) x window x 2
    x = jnp.ones((2, 10, 10, 6))
    dense = jnp.ones((3, 3, 6, 4))
    conv = lambda x, k, g: jax.lax.conv_general_dilated(  # noqa: E731
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=g)
    assert benchmark.jaxpr_flops(jax.make_jaxpr(lambda x, k: conv(x, k, 1))(x, dense)) == 2 * (2 * 10 * 10 * 4) * 6 * 9
    depthwise = jnp.ones((3, 3, 1, 6))
    assert benchmark.jaxpr_flops(jax.make_jaxpr(lambda x, k: conv(x, k, 6))(x, depthwise)) == 2 * (2 * 10 * 10 * 6) * 9
    # a scan's body counts once per iteration, inside jit and remat too
    ws = jnp.ones((5, 16, 16))
    h = jnp.ones((8, 16))

    def stack(h, ws):
        return jax.lax.scan(jax.checkpoint(lambda c, w: (jnp.tanh(c @ w), None)), h, ws)[0].sum()

    one = 2 * 8 * 16 * 16
    assert benchmark.jaxpr_flops(jax.make_jaxpr(jax.jit(stack))(h, ws)) == 5 * one
    # the gradient w.r.t. both operands adds two matmuls per layer (recomputing the forward adds one)
    grad = benchmark.jaxpr_flops(jax.make_jaxpr(jax.grad(stack, argnums=(0, 1)))(h, ws))
    assert grad == 5 * one * 4


def test_grad_accumulation_setting_is_checked_and_shown(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--only", "train_full", "--train_batch", "6", "--grad_accum_steps", "4", "--memory_only"])
    assert "not a multiple of --grad_accum_steps" in capsys.readouterr().err
    s = benchmark.Settings(dtype="bfloat16", train_batch=64, grad_accum_steps=4, remat_policy="full")
    table = benchmark._table({"train_full": _row(300.0, 100.0)}, benchmark._meta(s, "GPU test", "2.x", "5.x"))
    assert "train batch 64 (prompt 16 + target 32 tokens; 4 micro-batches of 16; remat full)" in table


def test_label_row_is_images_per_second_over_the_same_folder(capsys):
    s = benchmark.Settings(label_images=8, label_beams=3)
    timing = benchmark.Timing(first_s=30.0, times_s=[4.0, 4.0, 5.0])
    reference = benchmark.Timing(first_s=21.0, times_s=[20.0, 21.0, 22.0])
    row = benchmark._label_row({"ours": timing, "reference": reference, "n": 8, "same_results": 0.875}, s)
    assert row["ours"] == 2.0 and row["reference"] == 8 / 21.0 and row["ratio"] == 21.0 / 4.0
    assert row["unit"] == "images/s" and row["latency_s"] == {"ours": 4.0, "reference": 21.0}
    table = benchmark._table({"label": row}, benchmark._meta(s, "CPU test", "2.x", "5.x"))
    line = next(line for line in table.splitlines() if line.startswith("| label |"))
    assert "| 2 | 0.381 | images/s | **5.25x** |" in line
    assert "8 images, <OD>, 3 beams" in line and "same results 88%" in line
    # Ours alone (--no_reference): no ratio.
    alone = benchmark._label_row({"ours": timing, "reference": None, "n": 8}, s)
    assert alone["reference"] is None and alone["ratio"] is None and "label" in benchmark.ROWS


def test_train_rows_hold_each_step_against_the_product_timed_right_before_it(capsys):
    calls = []
    readings = iter([100.0, 50.0, 25.0])

    def probe():
        calls.append("probe")
        return next(readings)

    timing = benchmark.measure(lambda: calls.append("step"), 3, probe)
    # the first call (compile, warm-up) has no reading; every timed call has one just before it
    assert calls == ["step", "probe", "step", "probe", "step", "probe", "step"]
    assert timing.probe == [100.0, 50.0, 25.0] and len(timing.times_s) == 3
    # A host slowing down 4x within the run: the step's times and the product's rates drift together, and
    # each step's share of the product measured beside it stays 80% (a median of the rates would say 40-160%).
    drifting = benchmark.Timing(first_s=90.0, times_s=[10.0, 20.0, 40.0], probe=[1e11, 5e10, 2.5e10])
    s = benchmark.Settings()
    row = benchmark._train_row({"timing": drifting, "flops": 8e11, "memory_bytes": None}, None, s, None)
    assert row["gemm_flops_per_s"] == 5e10 and row["gemm_share"] == pytest.approx(0.8, rel=1e-12)
    table = benchmark._table({"train_frozen": row}, benchmark._meta(s, "CPU test", "2.x", "5.x"))
    line = next(line for line in table.splitlines() if line.startswith("| train_frozen |"))
    assert "80% of the float32 GEMM measured beside each step (50 GFLOP/s)" in line
    # Without a probe (--no_gemm) or a FLOP count, no share is claimed.
    bare = benchmark._train_row({"timing": benchmark.Timing(90.0, [10.0, 20.0, 40.0]), "flops": 8e11,
                                 "memory_bytes": None}, None, s, None)
    assert "gemm_share" not in bare and "GEMM" not in benchmark._table({"train_frozen": bare}, benchmark._meta(
        s, "CPU test", "2.x", "5.x"))


def test_gemm_probe_is_the_products_flops_over_their_median_time():
    # a clock read before and after each product: they take 1, 3 and 2 s, so the median is 2 s
    ticks = iter([0.0, 1.0, 10.0, 13.0, 20.0, 22.0])
    probe = benchmark.gemm_probe("float32", "cpu", shape=(64, 96, 128), calls=3, clock=lambda: next(ticks))
    assert probe() == 2 * 64 * 96 * 128 / 2.0
    with pytest.raises(StopIteration):  # three products a reading, no more
        probe()
    assert benchmark.GEMM_SHAPES["cpu"] == (4096, 768, 3072)  # the product docs/benchmarks.md's shares use


def test_the_table_names_the_formulations_ours_ran_with():
    """``--hardware a100`` on this CPU runs the GPU's program less what cannot compile well here
    (``hardware.runnable_on``): the table's header names that, not the spec asked for."""
    meta = benchmark._meta(benchmark.Settings(hardware="a100"), "CPU test", "2.x", "5.x")
    assert meta["hardware"] == "a100:store_vision_residuals=true,window_attention=einsum,text_attention=einsum"
    assert benchmark._meta(benchmark.Settings(), "CPU test", "2.x", "5.x")["hardware"] == "cpu"
