"""Checkpoint conversion in both directions, both layouts, and its error messages."""

import json
import shutil

import jax
import numpy as np
import pytest
import torch
from conftest import tiny_batch
from safetensors.numpy import load_file, save_file

from florence_jax import CheckpointError, Florence2ForConditionalGeneration
from florence_jax.testing.models import original_config_dict, to_original_layout
from florence_jax.weights.export import export_state_dict
from florence_jax.weights.load import iter_flax_params

NUM_REAL = 1000  # tiny vocab 1024 = 1000 real tokens + <image> at 1000 + padding to a multiple of 64


@pytest.fixture(scope="module")
def ours(tiny_hf_dir):
    return Florence2ForConditionalGeneration.from_pretrained(tiny_hf_dir)


def _params(model):
    return {k: np.asarray(v) for k, v in iter_flax_params(model)}


def _write_original(tiny_hf_dir, out, num_real=NUM_REAL):
    state = load_file(str(tiny_hf_dir / "model.safetensors"))
    save_file(to_original_layout(state, num_real), str(out / "model.safetensors"))
    cfg = json.loads((tiny_hf_dir / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(original_config_dict(cfg, num_real)))
    return out


def test_round_trip_is_bit_identical(tiny_hf_dir, ours):
    ref = load_file(str(tiny_hf_dir / "model.safetensors"))
    exported = export_state_dict(ours)
    assert set(exported) == set(ref)
    for k in ref:
        assert exported[k].dtype == ref[k].dtype and np.array_equal(exported[k], ref[k]), k


def test_export_loads_in_transformers_with_same_logits(tmp_path, ours):
    from transformers import Florence2ForConditionalGeneration as HF

    ours.save_pretrained(tmp_path)
    hf, info = HF.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    b = tiny_batch(seed=7)
    with torch.no_grad():
        ref = hf.eval()(**{k: torch.tensor(v) for k, v in b.items()}).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(**b).logits), ref, atol=1e-4)


def test_sharded_export_and_load(tmp_path, ours):
    ours.save_pretrained(tmp_path, max_shard_bytes=200_000)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert (tmp_path / "model.safetensors.index.json").exists()
    again = Florence2ForConditionalGeneration.from_pretrained(tmp_path)
    a, b = _params(ours), _params(again)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_sharded_transformers_checkpoint_loads(tmp_path, tiny_hf_model, ours):
    tiny_hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    again = Florence2ForConditionalGeneration.from_pretrained(tmp_path)
    a, b = _params(ours), _params(again)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_pytorch_bin_loads(tmp_path, tiny_hf_dir, ours):
    state = {k: torch.tensor(v) for k, v in load_file(str(tiny_hf_dir / "model.safetensors")).items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    shutil.copy(tiny_hf_dir / "config.json", tmp_path / "config.json")
    again = Florence2ForConditionalGeneration.from_pretrained(tmp_path)
    a, b = _params(ours), _params(again)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_original_layout_loads_to_identical_parameters(tmp_path, tiny_hf_dir, ours):
    orig = Florence2ForConditionalGeneration.from_pretrained(_write_original(tiny_hf_dir, tmp_path))
    assert orig.config.image_token_id == NUM_REAL and orig.config.text_config.vocab_size == 1024
    a, b = _params(ours), _params(orig)
    # The original's logits bias loads into a buffer of its own (zeros here, as the fixture writes it).
    assert set(b) == set(a) | {"final_logits_bias"}
    np.testing.assert_array_equal(b["final_logits_bias"], np.zeros((1, 1024), np.float32))
    for k in a:
        if k.endswith("shared.embedding"):
            # Real rows identical; the <image> row and the padding start at the mean of the real rows.
            np.testing.assert_array_equal(b[k][:NUM_REAL], a[k][:NUM_REAL])
            np.testing.assert_allclose(b[k][NUM_REAL:], np.broadcast_to(a[k][:NUM_REAL].mean(0), b[k][NUM_REAL:].shape),
                                       atol=1e-6)
        else:
            assert np.array_equal(a[k], b[k]), k
    # Rows added at conversion are never generated.
    assert orig.generation_config.suppress_tokens == tuple(range(NUM_REAL, 1024))


def test_original_layout_vocab_is_padded_to_64():
    from florence_jax.config import Florence2Config

    d = original_config_dict(
        {"vision_config": {"embed_dim": [16, 32], "max_position_embeddings": 20, "max_temporal_embeddings": 100,
                           "depths": [1, 1], "patch_size": [7, 3], "patch_stride": [4, 2], "patch_padding": [3, 1],
                           "patch_prenorm": [False, True], "num_heads": [2, 4], "num_groups": [2, 4],
                           "projection_dim": 24},
         "text_config": {"d_model": 24}}, 51289)
    cfg = Florence2Config.from_dict(d)
    assert cfg.image_token_id == 51289 and cfg.text_config.vocab_size == 51328


def test_loads_straight_into_a_sharding(tiny_hf_dir):
    mesh = jax.make_mesh((8,), ("fsdp",))

    def sharding_fn(path, shape):
        spec = ("fsdp",) if shape and shape[0] % 8 == 0 else ()
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))

    m = Florence2ForConditionalGeneration.from_pretrained(tiny_hf_dir, sharding_fn=sharding_fn)
    emb = m.model.language_model.shared.embedding.get_value()
    assert len(emb.sharding.device_set) == 8 and emb.addressable_shards[0].data.shape[0] == 1024 // 8


# ------------------------------------------------------------------------------------------ errors
def _copy(tiny_hf_dir, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_hf_dir, out)
    return out


def test_unknown_architecture(tmp_path, tiny_hf_dir):
    d = _copy(tiny_hf_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="llama"):
        Florence2ForConditionalGeneration.from_pretrained(d)


def test_missing_and_unexpected_tensors_listed_together(tmp_path, tiny_hf_dir):
    d = _copy(tiny_hf_dir, tmp_path)
    state = load_file(str(d / "model.safetensors"))
    del state["model.language_model.encoder.layers.1.fc1.weight"]
    state["model.language_model.encoder.layers.1.fc3.weight"] = np.zeros((2, 2), np.float32)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        Florence2ForConditionalGeneration.from_pretrained(d)
    msg = str(e.value)
    assert "model.language_model.encoder.layers.1.fc1.weight" in msg and "fc3.weight" in msg


def test_wrong_shape_names_the_key(tmp_path, tiny_hf_dir):
    d = _copy(tiny_hf_dir, tmp_path)
    state = load_file(str(d / "model.safetensors"))
    state["model.vision_tower.blocks.1.0.spatial_block.conv1.weight"] = np.zeros((32, 1, 5, 5), np.float32)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"spatial_block\.conv1\.weight.*\(5, 5, 1, 32\)"):
        Florence2ForConditionalGeneration.from_pretrained(d)


def test_truncated_safetensors_names_the_file(tmp_path, tiny_hf_dir):
    d = _copy(tiny_hf_dir, tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Florence2ForConditionalGeneration.from_pretrained(d)


def test_no_weights_is_a_clear_error(tmp_path, tiny_hf_dir):
    shutil.copy(tiny_hf_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="no weights"):
        Florence2ForConditionalGeneration.from_pretrained(tmp_path)


def test_large_config_converts_with_all_shapes_checked():
    from transformers import Florence2ForConditionalGeneration as HF

    from florence_jax.config import Florence2Config
    from florence_jax.testing.models import LARGE_TEXT, LARGE_VISION, hf_config
    from florence_jax.weights.load import check_conversion

    cfg = hf_config(LARGE_VISION, LARGE_TEXT, image_token_id=51289)
    with torch.device("meta"):
        hf = HF(cfg)
    shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    ours_cfg = Florence2Config.from_dict(cfg.to_dict())
    n = check_conversion(Florence2ForConditionalGeneration, ours_cfg, shapes)
    assert n == len([k for k in shapes if k not in ("lm_head.weight",) and "embed_tokens" not in k])
    # A wrong shape in the large model is caught the same way.
    shapes["model.language_model.decoder.layers.11.fc2.weight"] = (1024, 4095)
    with pytest.raises(CheckpointError, match="layers.11.fc2"):
        check_conversion(Florence2ForConditionalGeneration, ours_cfg, shapes)


def test_untied_embeddings_are_a_clear_error(tmp_path, tiny_hf_dir):
    d = _copy(tiny_hf_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        Florence2ForConditionalGeneration.from_pretrained(d)
