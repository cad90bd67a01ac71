"""Numerical parity of the NNX model with transformers' Florence2ForConditionalGeneration."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import tiny_batch
from flax import nnx

from florence_jax import Florence2ForConditionalGeneration
from florence_jax.losses import mean_token_loss, shift_tokens_right
from florence_jax.weights import mapping


def _torch(batch):
    return {k: torch.tensor(v) for k, v in batch.items()}


@pytest.fixture(scope="module")
def tiny_pair(tiny_hf_dir, tiny_hf_model):
    return tiny_hf_model, Florence2ForConditionalGeneration.from_pretrained(tiny_hf_dir)


def test_logits_parity_with_padding(tiny_pair):
    hf, ours = tiny_pair
    batch = tiny_batch()
    with torch.no_grad():
        ref = hf(**_torch(batch)).logits.numpy()
    out = np.asarray(ours(**batch).logits)
    assert out.shape == ref.shape == (2, 5, 1024)
    assert np.abs(ref).max() > 0.5  # the comparison is not between near-zero numbers
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)  # fp32, different op order


def test_stage_by_stage_parity(tiny_pair):
    hf, ours = tiny_pair
    b = tiny_batch(seed=1)
    t = _torch(b)
    with torch.no_grad():
        vis = hf.model.vision_tower(t["pixel_values"]).last_hidden_state.permute(0, 2, 3, 1).numpy()
        proj = hf.model.multi_modal_projector(torch.tensor(vis).permute(0, 3, 1, 2)).numpy()
        out = hf(**t, output_hidden_states=True)
        enc = out.encoder_last_hidden_state.numpy()
        dec = out.decoder_hidden_states[-1].numpy()
    our_vis = ours.model.vision_tower(jnp.asarray(b["pixel_values"]).transpose(0, 2, 3, 1))
    np.testing.assert_allclose(np.asarray(our_vis), vis, atol=1e-4)
    our_proj = ours.model.multi_modal_projector(jnp.asarray(vis))
    np.testing.assert_allclose(np.asarray(our_proj), proj, atol=1e-4)
    our_enc = ours.encode(b["input_ids"], b["pixel_values"], b["attention_mask"])
    np.testing.assert_allclose(np.asarray(our_enc), enc, atol=1e-4)
    lm = ours.model.language_model
    our_dec, _ = lm.decoder(lm.embed(jnp.asarray(b["decoder_input_ids"])), jnp.asarray(enc),
                            jnp.asarray(b["attention_mask"]), jnp.asarray(b["decoder_attention_mask"]))
    np.testing.assert_allclose(np.asarray(our_dec), dec, atol=1e-4)


def _labels(batch):
    labels = batch["decoder_input_ids"].copy()
    labels[1, -2:] = -100
    labels[0, 0] = -100
    return labels


def test_loss_parity_with_ignored_labels(tiny_pair):
    hf, ours = tiny_pair
    b = tiny_batch(seed=2)
    labels = _labels(b)
    t = _torch(b)
    with torch.no_grad():
        ref = hf(input_ids=t["input_ids"], pixel_values=t["pixel_values"], attention_mask=t["attention_mask"],
                 labels=torch.tensor(labels)).loss.item()
    dec_in = shift_tokens_right(labels, 1, 2)
    logits = ours(input_ids=b["input_ids"], pixel_values=b["pixel_values"], attention_mask=b["attention_mask"],
                  decoder_input_ids=dec_in).logits
    ours_loss = float(mean_token_loss(logits, labels))
    assert abs(ours_loss - ref) <= 1e-5, (ours_loss, ref)


def test_gradient_parity(tiny_pair):
    hf, ours = tiny_pair
    b = tiny_batch(seed=3)
    labels = _labels(b)
    t = _torch(b)
    hf.zero_grad()
    loss = hf(input_ids=t["input_ids"], pixel_values=t["pixel_values"], attention_mask=t["attention_mask"],
              labels=torch.tensor(labels)).loss
    loss.backward()
    ref_grads = {k: p.grad.numpy() for k, p in hf.named_parameters() if p.grad is not None}
    hf.zero_grad()

    graphdef, params, rest = nnx.split(ours, nnx.Param, ...)
    dec_in = shift_tokens_right(labels, 1, 2)

    def loss_fn(p):
        m = nnx.merge(graphdef, p, rest)
        logits = m(input_ids=b["input_ids"], pixel_values=b["pixel_values"], attention_mask=b["attention_mask"],
                   decoder_input_ids=dec_in).logits
        return mean_token_loss(logits, labels)

    grads = jax.jit(jax.grad(loss_fn))(params)
    flat = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
    checked = {"vision_tower": 0, "multi_modal_projector": 0, "encoder": 0, "decoder": 0}
    for path, g in flat.items():
        key, transform = mapping.flax_to_native(path)
        if key not in ref_grads:
            continue
        ref = mapping.TRANSFORMS[transform].to_flax(ref_grads[key])
        denom = np.linalg.norm(ref)
        if denom < 1e-8:
            continue
        rel = np.linalg.norm(g - ref) / denom
        assert rel <= 1e-4, (path, rel)
        for part in checked:
            if f".{part}." in f".{path}.":
                checked[part] += 1
    assert all(n > 0 for n in checked.values()), checked


def test_bf16_logits_close_to_fp32(tiny_hf_dir, tiny_pair):
    _, ours = tiny_pair
    b = tiny_batch(seed=4)
    ref = np.asarray(ours(**b).logits)
    bf = Florence2ForConditionalGeneration.from_pretrained(tiny_hf_dir, dtype="bfloat16", param_dtype="bfloat16")
    got = np.asarray(bf(**b).logits.astype(jnp.float32))
    # bf16 keeps 8 mantissa bits (~0.4% relative per op); across ~10 layers the error stays within
    # a few percent of the logits' scale. Argmax agreement is the user-visible property.
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() <= 0.05 * scale
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_train_mode_enables_dropout(tiny_pair):
    _, ours = tiny_pair
    b = tiny_batch(seed=5)
    ref = np.asarray(ours(**b).logits)
    ours.train()
    try:
        a = np.asarray(ours(**b, rngs=nnx.Rngs(dropout=0)).logits)
        c = np.asarray(ours(**b, rngs=nnx.Rngs(dropout=1)).logits)
    finally:
        ours.eval()
    assert not np.allclose(a, c)  # dropout and drop path are active and seeded
    np.testing.assert_allclose(np.asarray(ours(**b).logits), ref, atol=0)  # back in eval mode: deterministic


@pytest.mark.slow
def test_base_size_parity(tmp_path):
    """The real base-size shapes (DaViT 128-1024, depths 1-1-9-1, BART 6+6, 768x768, vocab 51328)."""
    from florence_jax.testing.models import (
        BASE_IMAGE_TOKEN,
        BASE_TEXT,
        BASE_VISION,
        base_parity_batch,
        hf_config,
        make_hf_model,
        save_hf_model,
    )

    hf = make_hf_model(hf_config(BASE_VISION, BASE_TEXT, image_token_id=BASE_IMAGE_TOKEN), seed=0)
    save_hf_model(hf, tmp_path)
    ours = Florence2ForConditionalGeneration.from_pretrained(tmp_path)
    batch = base_parity_batch(768)
    with torch.no_grad():
        ref = hf(**_torch(batch)).logits.numpy()
    out = np.asarray(jax.jit(lambda **kw: ours(**kw).logits)(**batch))
    np.testing.assert_allclose(out, ref, atol=5e-4, rtol=0)

    # The original remote-code layout of the same weights loads to the same parameters.
    import json

    from safetensors.numpy import load_file, save_file

    from florence_jax.testing.models import original_config_dict, to_original_layout
    from florence_jax.weights.load import iter_flax_params

    orig = tmp_path / "original"
    orig.mkdir()
    save_file(to_original_layout(load_file(str(tmp_path / "model.safetensors")), 51289), str(orig / "model.safetensors"))
    cfg = json.loads((tmp_path / "config.json").read_text())
    (orig / "config.json").write_text(json.dumps(original_config_dict(cfg, 51289)))
    a = dict(iter_flax_params(ours))
    b = dict(iter_flax_params(Florence2ForConditionalGeneration.from_pretrained(orig)))
    # The original layout's bias on every logit (zeros here, as the layout's writer gives it) is the one
    # parameter the native layout has no place for.
    assert set(b) - set(a) == {"final_logits_bias"} and not np.any(np.asarray(b.pop("final_logits_bias")))
    for k, v in b.items():
        n = 51289 if k.endswith("shared.embedding") else None
        assert np.array_equal(np.asarray(v)[:n], np.asarray(a[k])[:n]), k


@pytest.mark.slow  # about a minute; the scanned stage is what every parity test runs
def test_scanned_vision_stage_equals_unrolled(tiny_hf_dir):
    """The tiny tower's 2-block stage runs as one lax.scan by default; unrolled it gives the same features
    and the same gradients (train mode, stochastic depth off so both are deterministic)."""
    from florence_jax.modeling.davit import DaViT

    scanned = Florence2ForConditionalGeneration.from_pretrained(tiny_hf_dir)
    cfg = scanned.config.replace(vision_config=dataclasses.replace(scanned.config.vision_config, drop_path_rate=0.0))
    towers = {}
    for scan in (True, False):
        tower = DaViT(cfg.replace(scan_vision_blocks=scan), rngs=nnx.Rngs(0))
        nnx.update(tower, nnx.state(scanned.model.vision_tower, nnx.Param))
        towers[scan] = tower
    assert max(len(b) for b in towers[True].blocks) == 2  # a stage that is actually scanned
    x = jnp.asarray(tiny_batch(seed=3)["pixel_values"]).transpose(0, 2, 3, 1)

    def loss(tower):
        return jnp.sum(tower(x, nnx.Rngs(dropout=1)) ** 2)

    outs = {s: np.asarray(towers[s](x)) for s in towers}
    np.testing.assert_allclose(outs[True], outs[False], atol=1e-5, rtol=0)  # fp32, same ops in a loop
    grads = {s: nnx.grad(loss)(towers[s]) for s in towers}
    flat_s = dict(nnx.to_flat_state(nnx.state(grads[True], nnx.Param)))
    flat_u = dict(nnx.to_flat_state(nnx.state(grads[False], nnx.Param)))
    assert flat_s.keys() == flat_u.keys() and len(flat_s) > 20
    for k in flat_s:
        np.testing.assert_allclose(np.asarray(flat_s[k][...]), np.asarray(flat_u[k][...]), atol=1e-4, rtol=1e-4,
                                   err_msg=str(k))


def _scans_outside_kernels(jaxpr) -> int:
    """The scans of a jaxpr and its sub-jaxprs, those inside a Pallas kernel aside (the GPU's flash kernels
    loop over blocks of keys: the kernel's own loop, not a stage's)."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "scan"
        if eqn.primitive.name == "pallas_call":
            continue
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    n += _scans_outside_kernels(inner)
    return n


def test_the_gpu_unrolls_vision_stages_and_the_cpu_scans_them():
    """``Formulations.vision_stages``: the CPU's (and TPU's) tower runs a stage's blocks as one lax.scan, the
    GPU's one block after another; ``scan_vision_blocks=False`` unrolls on any platform. Read from the traced
    program (the values are the same either way: test_scanned_vision_stage_equals_unrolled, slow)."""
    from florence_jax import hardware
    from florence_jax.modeling.davit import DaViT
    from train.state import tiny_config

    x = jnp.zeros((1, 64, 64, 3), jnp.float32)

    def scans(spec, scan_blocks=True):
        cfg = tiny_config(128, 127).replace(hardware=spec, scan_vision_blocks=scan_blocks)
        cfg = cfg.replace(vision_config=dataclasses.replace(cfg.vision_config, depths=(1, 1, 2, 1)))
        tower = DaViT(cfg, rngs=nnx.Rngs(0))
        assert max(len(b) for b in tower.blocks) > 1  # a stage with several blocks
        return _scans_outside_kernels(jax.make_jaxpr(lambda x: tower(x))(x).jaxpr)

    assert hardware.resolve("gpu").vision_stages == "unrolled" and hardware.resolve("tpu").vision_stages == "scan"
    assert scans("cpu") >= 1 and scans("tpu") >= 1
    assert scans("gpu") == 0 and scans("cpu:vision_stages=unrolled") == 0 and scans("cpu", scan_blocks=False) == 0
    assert scans("gpu:vision_stages=scan") >= 1


def test_drop_path_with_a_traced_rate():
    """Inside the scan each block's stochastic-depth rate is a traced value: whole samples are dropped at
    that rate and the kept ones scaled by 1 / (1 - rate)."""
    from florence_jax.modeling.davit import _apply_drop_path

    dp = nnx.Dropout(0.1, broadcast_dims=(1, 2))
    x = jnp.ones((4000, 3, 5))
    y = np.asarray(jax.jit(lambda r: _apply_drop_path(dp, x, nnx.Rngs(dropout=0), r))(jnp.float32(0.25)))
    per_sample = y.reshape(4000, -1)
    assert np.all(per_sample == per_sample[:, :1])  # one decision per sample
    kept = per_sample[:, 0] != 0
    np.testing.assert_allclose(per_sample[kept, 0], 1 / 0.75, rtol=1e-6)
    assert abs(kept.mean() - 0.75) < 0.03  # 4000 Bernoulli draws: 0.03 is > 4 standard deviations


# full: 46 s on a slow host, in the slow suite; dots by default
@pytest.mark.parametrize("policy", [pytest.param("full", marks=pytest.mark.slow), "dots"])
def test_remat_policies_keep_the_towers_gradients(tiny_hf_dir, policy):
    """Rematerialisation (inside the scan over a stage's blocks too) recomputes, it does not change results."""
    from florence_jax.modeling.davit import DaViT

    loaded = Florence2ForConditionalGeneration.from_pretrained(tiny_hf_dir)
    cfg = loaded.config.replace(vision_config=dataclasses.replace(loaded.config.vision_config, drop_path_rate=0.0))
    x = jnp.asarray(tiny_batch(seed=4)["pixel_values"]).transpose(0, 2, 3, 1)
    grads = {}
    for p in ("none", policy):
        tower = DaViT(cfg.replace(remat_policy=p), rngs=nnx.Rngs(0))
        nnx.update(tower, nnx.state(loaded.model.vision_tower, nnx.Param))
        g = nnx.grad(lambda t: jnp.sum(t(x) ** 2))(tower)
        grads[p] = dict(nnx.to_flat_state(nnx.state(g, nnx.Param)))
    assert grads["none"].keys() == grads[policy].keys()
    for k in grads["none"]:
        np.testing.assert_allclose(np.asarray(grads[policy][k][...]), np.asarray(grads["none"][k][...]),
                                   atol=1e-4, rtol=1e-4, err_msg=str(k))  # fp32: recompute re-fuses and reorders sums


def test_integer_pixels_are_refused_with_the_way_to_normalize_them(tiny_hf_dir):
    """uint8 images are not the model's input: a cast would feed it 0..255 instead of normalized values."""
    model = Florence2ForConditionalGeneration.from_pretrained(tiny_hf_dir)
    image = np.zeros((1, 64, 64, 3), np.uint8)
    with pytest.raises(TypeError, match="normalize_pixels"):
        model.vision_tower_features(image, image_layout="NHWC")


def test_exact_gelu_is_pytorchs_and_lowers_to_erf():
    """``gelu_exact`` computes PyTorch's formula, ``x / 2 * (1 + erf(x / sqrt(2)))``, in float32.

    Tolerance: both sides evaluate the same expression in float32 with different ``erf`` approximations,
    each within a few float32 ulps of 1 (2**-23); scaled by ``|x| / 2`` that bounds the difference by
    2**-21 * max(|x|, 1). The same holds for the derivative. The negative tail, where ``1 + erf`` cancels,
    is within the bound on both sides; ``jax.nn.gelu``'s ``erfc`` form is more precise there and so not
    PyTorch's function.
    """
    from florence_jax.modeling.layers import ACTIVATIONS, gelu_exact

    x = np.linspace(-10, 10, 40001, dtype=np.float32)
    bound = 2**-21 * np.maximum(np.abs(x), 1)
    ours = np.asarray(gelu_exact(jnp.asarray(x)))
    xt = torch.tensor(x, requires_grad=True)
    ref = torch.nn.functional.gelu(xt)
    ref.sum().backward()
    assert np.all(np.abs(ours - ref.detach().numpy()) <= bound)
    grad = np.asarray(jax.vmap(jax.grad(ACTIVATIONS["gelu"]))(jnp.asarray(x)))
    assert np.all(np.abs(grad - xt.grad.numpy()) <= bound)

    # bfloat16 in, float32 inside, rounded once (as PyTorch's half-precision GELU)
    xb = jnp.asarray(x).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(gelu_exact(xb), np.float32),
                                  np.asarray(gelu_exact(xb.astype(jnp.float32)).astype(jnp.bfloat16), np.float32))

    # erf, not erfc: the TPU expands erfc into two rational approximations per element, which made the
    # MLP's second matmul vector-bound (docs/scale-out.md)
    program = jax.jit(ACTIVATIONS["gelu"]).lower(xb).as_text()
    assert "chlo.erf " in program and "erfc" not in program


def test_softmax_is_jaxs_values_and_keeps_only_the_probabilities_for_the_backward(capsys):
    """``layers.softmax`` gives ``jax.nn.softmax``'s values bit for bit (the same operations) and its
    gradient, differentiated through the probabilities rather than the quotient rule over the exponentials.

    Tolerance of the gradients: two formulas for the same derivative, each rounded in float32; the
    probabilities are at most 1 and the cotangents of order 1, so they agree within a few float32 ulps of
    the largest entry (1e-6 absolute)."""
    from jax.ad_checkpoint import print_saved_residuals

    from florence_jax.modeling import layers

    lowest = jnp.finfo(jnp.float32).min
    x = jax.random.normal(jax.random.key(0), (2, 3, 5, 7)) * 4
    x = x.at[0, 0, 1].set(lowest).at[1, 2, :, 3].set(lowest)  # a fully masked row; a masked key
    g = jax.random.normal(jax.random.key(1), x.shape)
    for axis in (-1, 1):
        np.testing.assert_array_equal(layers.softmax(x, axis), jax.nn.softmax(x, axis=axis))
        ours = jax.vjp(lambda x: layers.softmax(x, axis), x)[1](g)[0]  # noqa: B023
        theirs = jax.vjp(lambda x: jax.nn.softmax(x, axis=axis), x)[1](g)[0]  # noqa: B023
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    assert jax.hessian(lambda x: layers.softmax(x, -1)[0, 1, 2, 3])(x).shape == x.shape * 2

    # Attention keeps one (batch, heads, queries, keys) array for its backward: the probabilities, which the
    # value product's gradient needs anyway. With jax.nn.softmax it kept the exponentials too.
    q, k, v = (jax.random.normal(key, (2, 4, 9, 8)) for key in jax.random.split(jax.random.key(2), 3))

    def scores_kept():
        capsys.readouterr()
        print_saved_residuals(lambda q, k, v: layers.attention(q, k, v, scale=0.3, heads_major=True), q, k, v)
        return sum("[2,4,9,9]" in line for line in capsys.readouterr().out.splitlines())

    assert scores_kept() == 1
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(layers, "softmax", lambda x, axis=-1: jax.nn.softmax(x, axis=axis))
        assert scores_kept() == 2


def test_space_to_depth_pixels_give_the_towers_features_and_gradients(tiny_hf_dir):
    """The first convolution (7x7, stride 4, padding 3) on pixels in 4x4 blocks of 48 channels computes the
    same sums of the same products as on the image: features and the convolution's gradients agree."""
    from florence_jax.processing import space_to_depth

    model = Florence2ForConditionalGeneration.from_pretrained(tiny_hf_dir)
    stem = model.model.vision_tower.convs[0].conv
    assert (stem.kernel.shape[0], stem.strides[0], stem.padding[0]) == (7, 4, (3, 3))  # the real model's stem
    x = jnp.asarray(tiny_batch(seed=5)["pixel_values"]).transpose(0, 2, 3, 1)  # NHWC
    blocks = space_to_depth(x, 4)
    assert blocks.shape == (x.shape[0], x.shape[1] // 4, x.shape[2] // 4, 48)
    ref = model.vision_tower_features(x, image_layout="NHWC")
    out = model.vision_tower_features(blocks, image_layout="S2D")
    assert float(jnp.abs(ref).max()) > 0.5
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-4, rtol=0)  # fp32, sums reordered

    def stem_grad(layout, pixels):
        def loss(m):
            return jnp.sum(m.vision_tower_features(pixels, image_layout=layout) ** 2)
        g = nnx.grad(loss)(model)
        return np.asarray(g.model.vision_tower.convs[0].conv.kernel[...])

    g_ref, g_out = stem_grad("NHWC", x), stem_grad("S2D", blocks)
    np.testing.assert_allclose(g_out, g_ref, atol=1e-4 * np.abs(g_ref).max(), rtol=0)


def test_space_to_depth_input_is_checked(tiny_hf_dir):
    model = Florence2ForConditionalGeneration.from_pretrained(tiny_hf_dir)
    with pytest.raises(ValueError, match="does not fit"):
        model.vision_tower_features(np.zeros((1, 16, 16, 3), np.float32), image_layout="S2D")
    with pytest.raises(ValueError, match="NCHW, NHWC or S2D"):
        model.vision_tower_features(np.zeros((1, 16, 16, 3), np.float32), image_layout="NWHC")


def _live_kernels(jaxpr, live_out=None) -> list[str]:
    """The names of the Pallas kernels whose results reach ``jaxpr``'s outputs (those marked in ``live_out``),
    sub-programs followed: a kernel whose result nothing reads is dead code, which the compiler drops (checked
    for the text attention on a v4 with libtpu: the named output takes the backward from three kernel calls to
    two). Loops count every output of their body as read; that can only keep more kernels."""
    live_out = [True] * len(jaxpr.outvars) if live_out is None else live_out
    live = {id(v) for v, keep in zip(jaxpr.outvars, live_out, strict=True) if keep}
    names = []
    for eqn in reversed(jaxpr.eqns):
        outs = [id(v) in live for v in eqn.outvars]
        if not any(outs):
            continue
        if eqn.primitive.name == "pallas_call":
            names.append(eqn.params["name"])
        else:
            loop = eqn.primitive.name in ("scan", "while")
            for sub in _subjaxprs(eqn):
                mask = outs if len(sub.outvars) == len(outs) and not loop else None
                names += _live_kernels(sub, mask)
        live.update(id(v) for v in eqn.invars)
    return names


def _subjaxprs(eqn):
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax.extend.core.Jaxpr):
                yield item


# dots: 55 s on a slow host, in the slow suite; full by default
@pytest.mark.parametrize("policy", [pytest.param("dots", marks=pytest.mark.slow), "full"])
def test_under_dots_the_backward_runs_no_forward_kernel(policy):
    """A kernel is not a matrix product to the ``dots`` policy: the attention kernels' outputs are named
    (``kernel_output``) so that the backward reads them instead of running the forward kernels again.
    ``full`` saves nothing and runs every forward kernel again: the check sees the difference."""
    from train.state import tiny_config

    spec = "cpu:window_attention=fused,depthwise_conv=fused,text_attention=fused"  # Pallas' interpreter
    cfg = tiny_config(vocab_size=64, image_token_id=63).replace(remat_policy=policy, hardware=spec)
    model = Florence2ForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
    graphdef = nnx.graphdef(model)
    rng = np.random.default_rng(0)
    batch = dict(pixel_values=jnp.asarray(rng.normal(size=(2, 3, 64, 64)), jnp.float32),
                 input_ids=jnp.concatenate([jnp.full((2, 5), 63), jnp.asarray(rng.integers(3, 60, (2, 6)))], 1),
                 decoder_input_ids=jnp.asarray(rng.integers(3, 60, (2, 4))))
    params = nnx.state(model, nnx.Param)

    def loss(p):
        m = nnx.merge(graphdef, p, nnx.state(model, nnx.Not(nnx.Param)))
        return jnp.sum(m(**batch).logits.astype(jnp.float32) ** 2)

    _, vjp = jax.vjp(loss, params)
    backward = _live_kernels(jax.make_jaxpr(vjp)(jnp.ones((), jnp.float32)).jaxpr)
    assert {"window_attention_bwd", "text_attention_bwd"} <= set(backward), backward  # the check sees kernels
    attention = {"window_attention_fwd", "text_attention_fwd"}
    assert attention & set(backward) == (set() if policy == "dots" else attention), backward
    assert "depthwise_residual" in backward  # rerun under either policy: saving it costs as much (layers.py)


@pytest.mark.parametrize("freeze", [True, False])
def test_a_frozen_towers_kernel_outputs_are_not_saved(freeze):
    """With ``freeze_vision`` the tower's kernel outputs are left unnamed, so the ``dots`` policy saves none
    of them (each would cost a copy no backward reads), and the tower has no backward; unfrozen both are
    there."""
    from train.state import tiny_config

    cfg = tiny_config(vocab_size=64, image_token_id=63).replace(
        remat_policy="dots", hardware="cpu:window_attention=fused")
    model = Florence2ForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
    graphdef = nnx.graphdef(model)
    pixels = jnp.asarray(np.random.default_rng(0).normal(size=(1, 3, 64, 64)), jnp.float32)

    def loss(params):
        m = nnx.merge(graphdef, params, nnx.state(model, nnx.Not(nnx.Param)))
        return jnp.sum(m.get_image_features(pixels, freeze_vision=freeze) ** 2)

    program = str(jax.make_jaxpr(jax.grad(loss))(nnx.state(model, nnx.Param)))  # traced, not run
    assert ("name=kernel_out" in program) == (not freeze)
    assert ("window_attention_bwd" in program) == (not freeze)
