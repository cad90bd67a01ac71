"""The sharded train step: 8 simulated devices equal 1, frozen means frozen, loss/AdamW equal PyTorch."""

import re

import jax
import numpy as np
import pytest
import torch
from conftest import tiny_batch
from flax import nnx
from jax.sharding import PartitionSpec as P

from florence_jax import Florence2ForConditionalGeneration
from florence_jax.sharding import batch_sharding, make_mesh, optimizer_spec
from train.checkpoint import Checkpointer, abstract_like
from train.config import ModelConfig, OptimConfig
from train.optim import path_str
from train.state import create_model, init_train_state
from train.step import jit_train_step, model_pixels


def _batch(seed=0, batch=8):
    b = tiny_batch(seed=seed, batch=batch, dec_len=6)
    labels = b["decoder_input_ids"].astype(np.int32)
    label_mask = np.ones_like(labels, np.float32)
    label_mask[1, -2:] = 0
    label_mask[3, -4:] = 0
    labels = np.where(label_mask > 0, labels, 1)
    return {
        "pixel_values": b["pixel_values"].transpose(0, 2, 3, 1),
        "input_ids": b["input_ids"].astype(np.int32),
        "attention_mask": b["attention_mask"].astype(np.int32),
        "labels": labels,
        "label_mask": label_mask,
    }


def _run(tiny_hf_dir, mesh, optim, steps=2, grad_accum=1, min_shard_size=1, shard_optimizer=False):
    model = create_model(ModelConfig(name_or_path=str(tiny_hf_dir), dtype="float32", dropout=0.0, drop_path_rate=0.0), mesh,
                         min_shard_size=min_shard_size)
    fns, state, _ = init_train_state(model, optim, 10, mesh, grad_accum_steps=grad_accum,
                                     min_shard_size=min_shard_size, shard_optimizer=shard_optimizer)
    _run.fns = fns
    step = jit_train_step(fns, state, batch_sharding(mesh))
    losses, compiled = [], None
    for i in range(steps):
        batch = jax.device_put(_batch(seed=i), batch_sharding(mesh))
        compiled = compiled or step.lower(state, batch, jax.random.key(0)).compile()
        state, metrics = compiled(state, batch, jax.random.key(0))
        losses.append(float(metrics["loss"]))
    _run.program = compiled.as_text()
    return state, losses


OPT = OptimConfig(learning_rate=1e-3, freeze=(r"^model\.vision_tower\.",), max_grad_norm=1.0)


def _flat(params):
    return {path_str(kp): np.asarray(v) for kp, v in jax.tree_util.tree_leaves_with_path(params)}


def test_eight_devices_equal_one(tiny_hf_dir):
    one, l1 = _run(tiny_hf_dir, make_mesh(devices=jax.devices()[:1]), OPT)
    many, l8 = _run(tiny_hf_dir, make_mesh(data=2, fsdp=4), OPT)
    np.testing.assert_allclose(l8, l1, atol=1e-5)
    # FSDP gathers weights, never activations: every all-gather in the program has a parameter's shape
    # (unconstrained, XLA ran layers on the fsdp group's whole batch with a slice of each weight's output
    # channels, gathering the activations: in the vision tower, encoder, decoder and LM head).
    gathered = {tuple(int(d) for d in dims.split(",") if d)
                for dims in re.findall(r"= \w+\[([\d,]*)\]\{[^}]*\} all-gather\(", _run.program)}
    shapes = {tuple(v.shape) for v in jax.tree.leaves((many.params, many.rest))}
    assert gathered and gathered <= shapes, sorted(gathered - shapes)
    a, b = _flat(one.params), _flat(many.params)
    sharded = [k for k, v in jax.tree_util.tree_leaves_with_path(many.params)
               if len(v.sharding.device_set) == 8 and not v.sharding.is_fully_replicated]
    assert sharded, "no parameter was actually sharded over fsdp"
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=1e-5, err_msg=k)


# (8, 1) in the slow suite; (4, 2), both axes, by default
@pytest.mark.parametrize("data,fsdp", [pytest.param(8, 1, marks=pytest.mark.slow), (4, 2)])
def test_optimizer_split_over_data_equals_the_whole_update(tiny_hf_dir, data, fsdp):
    """ZeRO-1 (MeshConfig.shard_optimizer): each device keeps and updates its share of the moments, the
    parameters stay as stored; two steps give the losses and parameters of the unsplit update."""
    mesh = make_mesh(data=data, fsdp=fsdp)
    whole, lw = _run(tiny_hf_dir, mesh, OPT, min_shard_size=64)
    whole_program = _run.program
    split, ls = _run(tiny_hf_dir, mesh, OPT, min_shard_size=64, shard_optimizer=True)
    # the same sums, reduced in another order (a reduce-scatter, not an all-reduce): float32 rounding only
    np.testing.assert_allclose(ls, lw, rtol=1e-6)
    a, b = _flat(whole.params), _flat(split.params)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=1e-6, err_msg=k)
    for kp, v in jax.tree_util.tree_leaves_with_path(split.params):  # parameters keep their own sharding
        assert v.sharding.spec == _flat_sharding(whole.params)[path_str(kp)], path_str(kp)
    # every trained parameter of at least 64 elements with a dimension that divides has moments split `data`
    # ways more than the parameter is; frozen ones have none
    moments = {path_str(kp): v for kp, v in jax.tree_util.tree_leaves_with_path(split.opt_state) if v.ndim}
    split_ones = 0
    for k, p in a.items():
        if k.startswith("model.vision_tower."):
            assert not any(m.endswith(k) for m in moments)
            continue
        mu = [v for m, v in moments.items() if m.endswith("." + k) and ".mu." in f".{m}."]
        assert len(mu) == 1, k
        per_device = mu[0].addressable_shards[0].data.size
        stored = whole.params
        param_per_device = _flat_arrays(stored)[k].addressable_shards[0].data.size
        if p.size >= 64 and any(d % data == 0 for d in p.shape):
            assert per_device * data == param_per_device, (k, mu[0].sharding.spec)
            split_ones += 1
        else:
            assert per_device == param_per_device, k
    assert split_ones > 10
    # each device's optimizer works on its share: the elements its ops write fall by about `data` (the
    # parameters under 64 elements, or with no dimension that divides, are updated whole by every device)
    work_whole, work_split = _optimizer_elements(whole_program), _optimizer_elements(_run.program)
    assert work_split * data < 1.5 * work_whole, (work_whole, work_split)
    # the updated parameters come back whole: gathered from the shares (with fsdp the step gathers the
    # parameters for compute too)
    assert "all-gather" in _run.program
    # a share lies inside the fsdp shard its device holds: sliced in place, never sent between devices
    assert "collective-permute" not in _run.program
    if fsdp == 1:
        assert "all-gather" not in whole_program


def test_optimizer_spec_splits_one_more_dimension_over_data():
    mesh = make_mesh(data=4, fsdp=2)
    # a dimension already over fsdp takes data inside it, when it divides by both
    assert optimizer_spec(P(None, "fsdp"), (6, 16), mesh, min_size=1) == P(None, ("fsdp", "data"))
    # else the largest free dimension that data divides
    assert optimizer_spec(P(None, "fsdp"), (12, 2), mesh, min_size=1) == P("data", "fsdp")
    assert optimizer_spec(P(), (4, 12), mesh, min_size=1) == P(None, "data")
    # too small, or nothing divides: the parameter's own
    assert optimizer_spec(P(), (4, 12), mesh, min_size=64) == P()
    assert optimizer_spec(P(), (3, 5), mesh, min_size=1) == P()
    assert optimizer_spec(P(), (8,), make_mesh(data=1, fsdp=8), min_size=1) == P()


@pytest.mark.slow  # 43 s on a slow host; resuming is covered by default in tests/test_train_loop.py
def test_a_checkpoint_resumes_across_the_optimizer_split(tiny_hf_dir, tmp_path):
    """Saved with the whole update, restored into the split one's shardings (and back): same values."""
    mesh = make_mesh(data=8)
    whole, _ = _run(tiny_hf_dir, mesh, OPT, steps=1, min_shard_size=64)
    split, _ = _run(tiny_hf_dir, mesh, OPT, steps=1, min_shard_size=64, shard_optimizer=True)
    assert any(a.sharding != b.sharding for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(split)))
    for saved, target in ((whole, split), (split, whole)):
        ckpt = Checkpointer(tmp_path / f"c{id(saved)}", async_save=False)
        ckpt.save(1, saved, {}, {})
        got, _, _ = ckpt.restore(1, abstract_like(target))
        for a, b, t in zip(jax.tree.leaves(got), jax.tree.leaves(saved), jax.tree.leaves(target)):
            assert a.sharding == t.sharding
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _optimizer_elements(program: str) -> int:
    """Elements written by the ops of the step's optimizer scope in a compiled program's text."""
    total = 0
    for line in program.splitlines():
        if 'op_name="jit(train_step)/optimizer' not in line or " = " not in line:
            continue
        result = line.split(" = ", 1)[1].split(" ", 1)[0]
        for dims in re.findall(r"^\w+\[([\d,]*)\]", result):
            total += int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return total


def _flat_arrays(params):
    return {path_str(kp): v for kp, v in jax.tree_util.tree_leaves_with_path(params)}


def _flat_sharding(params):
    return {k: v.sharding.spec for k, v in _flat_arrays(params).items()}


def test_grad_accumulation_equals_full_batch(tiny_hf_dir):
    mesh = make_mesh(devices=jax.devices()[:1])
    full, lf = _run(tiny_hf_dir, mesh, OPT, steps=1)
    acc, la = _run(tiny_hf_dir, mesh, OPT, steps=1, grad_accum=4)
    np.testing.assert_allclose(la, lf, atol=1e-5)
    a, b = _flat(full.params), _flat(acc.params)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=2e-5, err_msg=k)


def test_frozen_vision_is_bit_identical_and_has_no_moments(tiny_hf_dir):
    mesh = make_mesh(devices=jax.devices()[:1])
    model = Florence2ForConditionalGeneration.from_pretrained(tiny_hf_dir)
    before = _flat(nnx.split(model, nnx.Param, ...)[1])
    state, _ = _run(tiny_hf_dir, mesh, OPT, steps=3)
    after = _flat(state.params)
    for k, v in before.items():
        if k.startswith("model.vision_tower."):
            assert np.array_equal(after[k], v), f"frozen {k} changed"
        else:
            assert not np.array_equal(after[k], v), f"trainable {k} did not move"
    # Adam moments exist only for trainable parameters.
    moments = [path_str(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)]
    assert not any(".vision_tower." in m for m in moments)
    assert any(".language_model." in m for m in moments)


def test_adamw_follows_torch(tiny_hf_dir, tiny_hf_model):
    """Three steps of our AdamW + clipping follow transformers + torch.optim.AdamW on the same data."""
    from transformers import Florence2ForConditionalGeneration as HF

    hf = HF.from_pretrained(tiny_hf_dir)
    # Dropout and drop path off on both sides (eval mode still computes gradients) for a deterministic
    # comparison; the vision tower frozen on both sides, properly (requires_grad=False).
    hf.eval()
    for name, p in hf.named_parameters():
        p.requires_grad = not name.startswith("model.vision_tower.")
    opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
    mesh = make_mesh(devices=jax.devices()[:1])
    model = create_model(ModelConfig(name_or_path=str(tiny_hf_dir), dtype="float32", dropout=0.0, drop_path_rate=0.0), mesh)
    fns, state, _ = init_train_state(model, OptimConfig(learning_rate=1e-3, schedule="constant", max_grad_norm=1.0),
                                     10, mesh)
    step = jit_train_step(fns, state, batch_sharding(mesh))
    for i in range(3):
        b = _batch(seed=10 + i, batch=4)
        labels_t = torch.tensor(np.where(b["label_mask"] > 0, b["labels"], -100)).long()
        loss = hf(input_ids=torch.tensor(b["input_ids"]).long(),
                  pixel_values=torch.tensor(b["pixel_values"].transpose(0, 3, 1, 2)),
                  attention_mask=torch.tensor(b["attention_mask"]).long(), labels=labels_t).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in hf.parameters() if p.requires_grad], 1.0)
        opt.step()
        state, metrics = step(state, b, jax.random.key(0))
        assert abs(float(metrics["loss"]) - loss.item()) < 1e-4
    from florence_jax.weights import mapping

    ours = _flat(state.params)
    ref = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    for path, v in ours.items():
        key, t = mapping.flax_to_native(path)
        # fp32, different reduction orders; Adam divides by sqrt(v)+eps so tiny gradient differences
        # can move a weight by up to ~lr; 3 steps at lr 1e-3 bound the drift well below 1e-4.
        np.testing.assert_allclose(v, mapping.TRANSFORMS[t].to_flax(ref[key]), atol=1e-4, err_msg=path)


def test_clipping_is_optaxs_rule_as_one_factor_and_reads_the_gradient_once():
    """``train.optim.clip_by_global_norm`` clips as optax does (same state, same values up to float32
    rounding, unclipped steps bit-identical), and an AdamW update after it keeps no clipped gradient of its
    own: per parameter, three parameter-sized fusions (the two moments and the parameter) where optax's
    clipping needs a fourth (the divided gradient, read by both moments)."""
    import optax

    from train.optim import clip_by_global_norm

    rng = np.random.default_rng(0)
    grads = {"w": jax.numpy.asarray(rng.normal(size=(256, 512)), np.float32),
             "b": jax.numpy.asarray(rng.normal(size=(512,)), np.float32)}
    ours, theirs = clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
    assert jax.tree.structure(ours.init(grads)) == jax.tree.structure(theirs.init(grads))
    clipped, _ = ours.update(grads, ours.init(grads))
    expected, _ = theirs.update(grads, theirs.init(grads))
    assert float(optax.tree.norm(grads)) > 300  # the clipping branch
    for k in grads:
        # g * (1/n) against g / n * 1: one rounding against two, within 2 float32 ulps of the value
        np.testing.assert_allclose(clipped[k], expected[k], rtol=2.5e-7, atol=0)
        assert not np.array_equal(clipped[k], grads[k])
    np.testing.assert_allclose(float(optax.tree.norm(clipped)), 1.0, rtol=1e-6)
    small = jax.tree.map(lambda g: g * 1e-4, grads)  # norm below 1: untouched, bit for bit
    kept, _ = ours.update(small, ours.init(small))
    for k in small:
        assert np.array_equal(kept[k], small[k])

    def fusions(clip) -> int:
        tx = optax.chain(clip(1.0), optax.adamw(1e-3, weight_decay=0.01))

        def update(p, g, st):
            u, st = tx.update(g, st, p)
            return optax.apply_updates(p, u), st

        params = jax.tree.map(jax.numpy.ones_like, grads)
        hlo = jax.jit(update, donate_argnums=(0, 2)).lower(params, grads, tx.init(params)).compile().as_text()
        return len(re.findall(r"= f32\[256,512\]\{[0-9,]*\} fusion\(", hlo[hlo.index("ENTRY"):]))

    if jax.default_backend() == "cpu":
        assert (fusions(clip_by_global_norm), fusions(optax.clip_by_global_norm)) == (3, 4)


@pytest.mark.parametrize("bad", ["model.vision_tower.nothing"])
def test_freeze_regex_matches_nothing_is_visible(bad, tiny_hf_dir):
    from train.optim import count_params, param_labels

    model = Florence2ForConditionalGeneration.from_pretrained(tiny_hf_dir)
    params = nnx.split(model, nnx.Param, ...)[1]
    counts = count_params(params, param_labels(params, (bad,)))
    assert counts["frozen"] == 0 and counts["trainable"] > 0


def _one_step(tiny_hf_dir, dtype: str, pixels, pixel_table):
    """One optimizer step of the tiny model (no dropout, lr 1e-3) on ``_batch(seed=0)`` with ``pixels``:
    the loss, the gradient norm and the updated parameters."""
    mesh = make_mesh(devices=jax.devices()[:1])
    model = create_model(ModelConfig(name_or_path=str(tiny_hf_dir), dtype=dtype, dropout=0.0, drop_path_rate=0.0),
                         mesh)
    fns, state, _ = init_train_state(model, OptimConfig(learning_rate=1e-3, freeze=()), 10, mesh,
                                     pixel_table=pixel_table)
    step = jit_train_step(fns, state, batch_sharding(mesh))
    host = {**_batch(seed=0), "pixel_values": pixels}
    state, metrics = step(state, jax.device_put(host, batch_sharding(mesh)), jax.random.key(0))
    return float(metrics["loss"]), float(metrics["grad_norm"]), _flat(state.params)


def test_uint8_pixels_normalized_in_the_step_train_exactly_as_float32_ones(tiny_hf_dir):
    """Training ships the resized uint8 image (train.config.PIXEL_DTYPE) and the step normalizes it on the
    device with the processor's table: the loss and the update are bit for bit those of the float32 pixels
    the host transform computes (a bfloat16 model then casts them as it casts float32 pixels, see below).
    Without the table the step refuses."""
    dtype = "float32"
    from florence_jax.processing import ImageTransform
    from train.config import PIXEL_DTYPE

    assert PIXEL_DTYPE == "uint8"
    table = ImageTransform(size=(64, 64)).table
    image = np.random.default_rng(3).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    host_pixels = table[image, np.arange(3)]  # what ImageTransform.__call__ ships as float32
    assert host_pixels.dtype == np.float32 and len(np.unique(host_pixels)) > 500
    results = [_one_step(tiny_hf_dir, dtype, pixels, pixel_table)
               for pixels, pixel_table in ((host_pixels, None), (image, table))]
    (loss_f, _, p_f), (loss_u, _, p_u) = results
    assert loss_f == loss_u
    assert p_f.keys() == p_u.keys() and all(np.array_equal(p_f[k], p_u[k]) for k in p_f)
    with pytest.raises(ValueError, match="need the data pipeline's pixel table"):
        model_pixels(jax.numpy.asarray(image), None)  # what the step calls with StepFns.pixel_table None


def test_pixels_in_blocks_train_as_the_image_does(tiny_hf_dir):
    """A TPU's pipeline ships pixels in 4x4 blocks (Formulations.pixel_layout, train.setup): the step reads
    the layout from the batch and trains as on the image, up to float32 sums in another order."""
    from florence_jax.processing import ImageTransform, space_to_depth
    from train.config import TrainConfig
    from train.setup import pipeline_image_layout

    table = ImageTransform(size=(64, 64)).table
    image = np.random.default_rng(4).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    results = [_one_step(tiny_hf_dir, "float32", pixels, table) for pixels in (image, space_to_depth(image, 4))]
    (loss_i, norm_i, p_i), (loss_b, norm_b, p_b) = results
    assert loss_b == pytest.approx(loss_i, rel=1e-6) and norm_b == pytest.approx(norm_i, rel=1e-4)
    stem = next(k for k in p_i if "convs.0.conv.kernel" in k)
    np.testing.assert_allclose(p_b[stem], p_i[stem], atol=1e-6, rtol=0)  # Adam at 1e-3: one step moves 1e-3
    tpu = TrainConfig()
    tpu.model.hardware = "v5e"
    assert pipeline_image_layout(tpu) == "S2D" and pipeline_image_layout(TrainConfig()) == "NHWC"


@pytest.mark.slow  # about 40 s; the uint8 pixel test covers the step by default
def test_bfloat16_pixels_give_a_bfloat16_model_exactly_what_float32_ones_do(tiny_hf_dir):
    """A pipeline can ship bfloat16 pixels (PipelineConfig.pixel_dtype) to a bfloat16 model: the model's first
    op casts pixels to bfloat16, so the vision features, the only thing pixels reach in a step, are bit
    for bit those of float32 pixels, through the tower's forward and its gradient."""
    import ml_dtypes

    mesh = make_mesh(devices=jax.devices()[:1])
    model = create_model(ModelConfig(name_or_path=str(tiny_hf_dir), dtype="bfloat16", dropout=0.0,
                                     drop_path_rate=0.0), mesh)
    tower = jax.jit(lambda m, x: m.vision_tower_features(x, image_layout="NHWC"))
    grad = jax.jit(nnx.grad(lambda m, x: m.vision_tower_features(x, image_layout="NHWC").astype(
        jax.numpy.float32).sum()))
    px = _batch(seed=0)["pixel_values"]
    results = []
    for dtype in (np.float32, ml_dtypes.bfloat16):
        g = nnx.to_flat_state(nnx.state(grad(model, px.astype(dtype)), nnx.Param))
        results.append((np.asarray(tower(model, px.astype(dtype)).astype(np.float32)),
                        {k: np.asarray(v[...]) for k, v in g}))
    (f32, g32), (f16, g16) = results
    assert np.array_equal(f32, f16) and g32.keys() == g16.keys() and len(g32) > 20
    assert all(np.array_equal(g32[k], g16[k]) for k in g32)
    # and the pixels did differ as float32: the cast, not the data, made them equal
    px = _batch(seed=0)["pixel_values"]
    assert not np.array_equal(px, px.astype(ml_dtypes.bfloat16).astype(np.float32))
