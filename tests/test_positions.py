"""More learned positions than the checkpoint has (florence_jax/positions.py): grown at load, bit-identical on
what fits the old tables, generation and transformers past the old limit, export, sharding and freezing.

The tiny transformers reference here has 32 positions (so transformers itself cannot run past 32) and ours is
grown to 64: the same checks as base at 1,024 -> 2,048, at a size the default suite runs in seconds. The slow
test runs the base size itself.
"""

import json

import jax
import numpy as np
import pytest
import torch

from florence_jax import Florence2ForConditionalGeneration
from florence_jax.generation import generate
from florence_jax.modeling.bart import POSITION_OFFSET
from florence_jax.positions import POSITION_INITS, POSITION_TABLES, grow_position_table, grow_positions
from florence_jax.weights.load import iter_flax_params

SHORT = 32  # the reference's positions
GROWN = 64
IMAGE = 32  # 1 + 4 * 4 = 17 image tokens: with a 7-token prompt the encoder fits 32 positions
IMAGE_TOKEN = 1000


def _tables(model) -> dict[str, np.ndarray]:
    params = dict(iter_flax_params(model))
    return {p: np.asarray(params[p]) for p in POSITION_TABLES}


@pytest.fixture(scope="module")
def short_dir(tmp_path_factory):
    """A transformers Florence-2 with 32 positions; decoder positions and cross-attention sharpened so greedy
    and beam outputs depend on the input and on the position (as in test_generation.py)."""
    from florence_jax.testing.models import make_hf_model, save_hf_model, tiny_hf_config

    hf = make_hf_model(tiny_hf_config(max_position_embeddings=SHORT), seed=3, weight_scale=2.0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "decoder.embed_positions" in name or ("encoder_attn." in name and p.ndim >= 2):
                p.mul_(10.0)
    return save_hf_model(hf, tmp_path_factory.mktemp("short"))


@pytest.fixture(scope="module")
def hf_short(short_dir):
    from transformers import Florence2ForConditionalGeneration as HF

    return HF.from_pretrained(short_dir).eval()


@pytest.fixture(scope="module")
def original(short_dir):
    return Florence2ForConditionalGeneration.from_pretrained(short_dir)


@pytest.fixture(scope="module")
def grown(short_dir):
    return Florence2ForConditionalGeneration.from_pretrained(short_dir, max_positions=GROWN)


def _batch(seed=0, batch=2, text_len=7, dec_len=SHORT):
    rng = np.random.default_rng(seed)
    n_img = 1 + (IMAGE // 8) ** 2
    ids = np.concatenate([np.full((batch, n_img), IMAGE_TOKEN), rng.integers(3, 900, (batch, text_len))], 1)
    mask = np.ones_like(ids)
    mask[1, -3:] = 0
    dec = rng.integers(3, 900, (batch, dec_len))
    dec_mask = np.ones_like(dec)
    dec_mask[1, -2:] = 0
    pixels = rng.normal(size=(batch, 3, IMAGE, IMAGE)).astype(np.float32)
    return dict(input_ids=ids, pixel_values=pixels, attention_mask=mask, decoder_input_ids=dec,
                decoder_attention_mask=dec_mask)


def _forward(model, batch):
    return jax.jit(lambda b: model(**b))(batch)


# ------------------------------------------------------------------------------------------ the rules
@pytest.mark.parametrize("init", POSITION_INITS)
def test_growing_keeps_every_row_and_makes_new_ones_by_the_rule(init):
    rng = np.random.default_rng(0)
    n, m = 10, 25
    table = rng.normal(size=(n + POSITION_OFFSET, 6)).astype(np.float32)
    out = grow_position_table(table, m, init)
    assert out.shape == (m + POSITION_OFFSET, 6) and out.dtype == table.dtype
    np.testing.assert_array_equal(out[: n + POSITION_OFFSET], table)
    learned, new = table[POSITION_OFFSET:], out[n + POSITION_OFFSET:]
    p = np.arange(n, m)
    if init == "tile":
        np.testing.assert_array_equal(new, learned[p % n])
    elif init == "copy":
        np.testing.assert_array_equal(new, np.repeat(learned[-1:], m - n, 0))
    elif init == "interpolate":
        at = p * (n - 1) / (m - 1)
        want = np.stack([np.interp(at, np.arange(n), learned[:, c]) for c in range(6)], axis=1)
        np.testing.assert_allclose(new, want, rtol=1e-6, atol=1e-6)
    else:  # random: seeded, the learned rows' statistics, no row a copy of a learned one
        np.testing.assert_array_equal(new, grow_position_table(table, m, init)[n + POSITION_OFFSET:])
        assert not any(np.allclose(r, row, atol=1e-3) for r in new for row in learned)
        assert np.abs(new.mean(0) - learned.mean(0)).max() < 2 * learned.std(0).max()
    assert grow_position_table(table, n, init) is table
    with pytest.raises(ValueError, match="cannot shrink"):
        grow_position_table(table, n - 1, init)
    with pytest.raises(ValueError, match="position_init"):
        grow_position_table(table, m, "nearest")


# ------------------------------------------------------------------------------------------ loading
def test_grown_at_load_keeps_the_checkpoint_rows_and_its_outputs_bit_for_bit(original, grown):
    assert grown.config.text_config.max_position_embeddings == GROWN
    before, after = _tables(original), _tables(grown)
    for path in POSITION_TABLES:
        assert after[path].shape == (GROWN + POSITION_OFFSET, 24)
        np.testing.assert_array_equal(after[path][: SHORT + POSITION_OFFSET], before[path])
    a, b = dict(iter_flax_params(original)), dict(iter_flax_params(grown))
    for path in a:  # every other parameter is the checkpoint's
        if path not in POSITION_TABLES:
            assert np.array_equal(np.asarray(a[path]), np.asarray(b[path])), path
    # The whole original length on both sides: 24 encoder positions (of 32) and all 32 decoder positions. The
    # image features are given (the vision tower is the checkpoint's in both), so only BART compiles.
    batch = _batch()
    features = np.random.default_rng(1).normal(size=(2, 17, 24)).astype(np.float32)
    batch = dict(batch, pixel_values=None, image_features=features)
    out_a, out_b = _forward(original, batch), _forward(grown, batch)
    assert np.array_equal(np.asarray(out_a.logits), np.asarray(out_b.logits))
    assert np.array_equal(np.asarray(out_a.encoder_last_hidden_state), np.asarray(out_b.encoder_last_hidden_state))


def test_fewer_positions_than_the_checkpoint_has_change_nothing(short_dir, original):
    same = Florence2ForConditionalGeneration.from_pretrained(short_dir, max_positions=SHORT - 8)
    assert same.config.text_config.max_position_embeddings == SHORT
    for path, table in _tables(same).items():
        np.testing.assert_array_equal(table, _tables(original)[path])
    assert grow_positions(original, SHORT - 8) is original


def test_growing_a_built_model_equals_growing_at_load_and_leaves_it_as_it_was(original, grown):
    before = _tables(original)
    again = grow_positions(original, GROWN)
    for path, table in _tables(again).items():
        np.testing.assert_array_equal(table, _tables(grown)[path])
        np.testing.assert_array_equal(_tables(original)[path], before[path])
    assert original.config.text_config.max_position_embeddings == SHORT
    assert again.config.text_config.max_position_embeddings == GROWN


def test_grown_tables_shard_and_freeze_like_any_parameter(grown):
    from jax.sharding import PartitionSpec

    from florence_jax.sharding import make_mesh, param_spec
    from train.config import OptimConfig
    from train.optim import FROZEN, TRAINABLE, param_labels, path_str

    mesh = make_mesh(data=1, fsdp=8)
    for path, table in _tables(grown).items():
        # d_model 24 divides by 8: the table is split over fsdp along it, as any large enough parameter.
        assert param_spec(path, table.shape, mesh, min_size=16) == PartitionSpec(None, "fsdp")
    from flax import nnx

    _, params, _ = nnx.split(grown, nnx.Param, ...)
    labels = param_labels(params, OptimConfig(freeze=(r"\.embed_positions\.",)).freeze)
    flat = {path_str(kp): lab for kp, lab in jax.tree_util.tree_leaves_with_path(labels)}
    assert {flat[p] for p in POSITION_TABLES} == {FROZEN}
    assert TRAINABLE in flat.values()


# ------------------------------------------------------------------------------------------ generation
def _prompts(seed=0):
    b = _batch(seed, batch=3)
    return b["input_ids"], b["pixel_values"], b["attention_mask"]


def _hf_generate(hf, prompts, **kw):
    ids, pixels, mask = prompts
    with torch.no_grad():
        return hf.generate(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
                           attention_mask=torch.tensor(mask), **kw).numpy()


# EOS suppressed and not forced, so every row runs to the length asked: the whole table is exercised.
NO_EOS = dict(suppress_tokens=[2], forced_eos_token_id=None)


def test_generation_past_the_old_limit_is_transformers_where_transformers_runs(hf_short, original, grown):
    """Greedy, 63 new tokens: its first 31 are transformers' 31 (greedy's prefix does not depend on the length
    asked; transformers cannot generate more with 32 positions). Beam search: the slow test below."""
    prompts = _prompts()
    ref = _hf_generate(hf_short, prompts, max_new_tokens=SHORT - 1, **NO_EOS)
    assert ref.shape == (3, SHORT) and all(len(set(r.tolist())) >= 4 for r in ref[:, 1:]), ref
    with pytest.raises(ValueError, match=f"needs {SHORT + 7} decoder positions; the model has {SHORT}"):
        generate(original, *prompts, max_new_tokens=SHORT + 7)
    long = generate(grown, *prompts, max_new_tokens=GROWN - 1, **NO_EOS)
    assert long.shape == (3, GROWN)
    np.testing.assert_array_equal(long[:, :SHORT], ref)
    assert all(len(set(r.tolist())) >= 4 for r in long[:, SHORT:]), long  # not a constant past the old limit


@pytest.mark.slow  # two more generation compiles
def test_beam_search_on_the_grown_model_is_transformers_within_the_old_limit(hf_short, grown):
    prompts = _prompts()
    ref = _hf_generate(hf_short, prompts, max_new_tokens=SHORT - 1, num_beams=3, **NO_EOS)
    np.testing.assert_array_equal(generate(grown, *prompts, max_new_tokens=SHORT - 1, num_beams=3, **NO_EOS), ref)


@pytest.mark.slow  # transformers' generate of 63 tokens takes ~15 s here
def test_the_export_generates_in_transformers_what_we_generate_past_the_old_limit(tmp_path, grown):
    from transformers import Florence2ForConditionalGeneration as HF

    grown.save_pretrained(tmp_path)
    hf = HF.from_pretrained(tmp_path).eval()
    prompts = _prompts(seed=1)
    long = generate(grown, *prompts, max_new_tokens=GROWN - 1, **NO_EOS)
    assert long.shape == (3, GROWN)
    np.testing.assert_array_equal(long, _hf_generate(hf, prompts, max_new_tokens=GROWN - 1, **NO_EOS))


# ------------------------------------------------------------------------------------------ export
def test_export_carries_the_positions_and_transformers_agrees_past_the_old_limit(tmp_path, grown):
    from transformers import Florence2ForConditionalGeneration as HF

    grown.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["text_config"]["max_position_embeddings"] == GROWN
    hf, info = HF.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    hf.eval()
    assert hf.model.language_model.decoder.embed_positions.weight.shape[0] == GROWN + POSITION_OFFSET
    batch = _batch(seed=5, dec_len=GROWN - 4)  # 60 decoder positions, 28 of them past the old limit
    with torch.no_grad():
        out = hf(**{k: torch.tensor(v) for k, v in batch.items()})
    ref = out.logits.numpy()
    # Our decoder on transformers' encoder output: the decoder's positions are what this is about (the encoder
    # and the vision tower have their own parity tests), and only the decoder compiles.
    enc = out.encoder_last_hidden_state.numpy()
    got = np.asarray(jax.jit(grown.decode)(batch["decoder_input_ids"], enc, batch["attention_mask"],
                                           batch["decoder_attention_mask"]))
    # float32 on two implementations: the tolerance of the other export round trips (test_weights.py).
    np.testing.assert_allclose(got[:, SHORT:], ref[:, SHORT:], atol=1e-4)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    # And back: the export loads here with its 64 positions, every parameter as written.
    again = Florence2ForConditionalGeneration.from_pretrained(tmp_path)
    for path, table in _tables(again).items():
        np.testing.assert_array_equal(table, _tables(grown)[path])


def test_the_original_layout_export_carries_the_positions_too(tmp_path, grown):
    """The original layout's text config has the same one max_position_embeddings for both tables (the
    republished Florence-2-large's 4,096 are written there), so it can express a grown model: the export
    writes it and reloads identically. (The original remote code itself is not run here: nothing is
    downloaded.)"""
    grown.save_pretrained(tmp_path, layout="original", code_repo="microsoft/Florence-2-base")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["text_config"]["max_position_embeddings"] == GROWN
    from safetensors.numpy import load_file

    written = load_file(str(tmp_path / "model.safetensors"))
    for side in ("encoder", "decoder"):
        assert written[f"language_model.model.{side}.embed_positions.weight"].shape[0] == GROWN + POSITION_OFFSET
    again = Florence2ForConditionalGeneration.from_pretrained(tmp_path)
    assert again.config.text_config.max_position_embeddings == GROWN
    for path, table in _tables(again).items():
        np.testing.assert_array_equal(table, _tables(grown)[path])


# ------------------------------------------------------------------------------------------ base size
@pytest.mark.slow  # base-size models in both frameworks, a 1,100-token decoder pass; about a minute
def test_base_grown_to_2048_is_the_original_up_to_1024_and_transformers_past_it(tmp_path):
    from transformers import Florence2ForConditionalGeneration as HF

    from florence_jax.testing.models import BASE_IMAGE_TOKEN, BASE_TEXT, BASE_VISION, hf_config, make_hf_model

    hf = make_hf_model(hf_config(BASE_VISION, BASE_TEXT, image_token_id=BASE_IMAGE_TOKEN), seed=0)
    hf.save_pretrained(tmp_path / "base")
    del hf
    original = Florence2ForConditionalGeneration.from_pretrained(tmp_path / "base")
    grown = Florence2ForConditionalGeneration.from_pretrained(tmp_path / "base", max_positions=2048)
    assert grown.config.text_config.max_position_embeddings == 2048
    rng = np.random.default_rng(0)
    image = 64  # 1 + 2 * 2 image tokens: the decoder's length is what this is about
    ids = np.concatenate([np.full((1, 5), BASE_IMAGE_TOKEN), rng.integers(3, 51000, (1, 12))], 1)
    pixels = rng.normal(size=(1, 3, image, image)).astype(np.float32)
    dec = rng.integers(3, 51000, (1, 1100))
    short = dict(input_ids=ids, pixel_values=pixels, decoder_input_ids=dec[:, :1024])
    assert np.array_equal(np.asarray(original(**short).logits), np.asarray(grown(**short).logits))
    del original
    grown.save_pretrained(tmp_path / "grown")
    hf = HF.from_pretrained(tmp_path / "grown").eval()
    assert hf.model.language_model.decoder.embed_positions.weight.shape[0] == 2048 + POSITION_OFFSET
    long = dict(input_ids=ids, pixel_values=pixels, decoder_input_ids=dec)
    with torch.no_grad():
        ref = hf(**{k: torch.tensor(v) for k, v in long.items()}).logits.numpy()
    got = np.asarray(grown(**long).logits)
    # The base-size parity tolerance of test_modeling.py's float32 check.
    np.testing.assert_allclose(got[:, 1024:], ref[:, 1024:], atol=2e-3, rtol=0)
