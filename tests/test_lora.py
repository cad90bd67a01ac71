"""LoRA: only adapters train (base bit-identical, moments for adapters alone); merged and peft exports give
our LoRA model's logits in transformers; new task tokens keep existing logits and are never generated."""

import jax
import numpy as np
import pytest
import torch
from conftest import tiny_batch
from flax import nnx

from florence_jax import Florence2ForConditionalGeneration
from florence_jax.lora import LORA_PARAM_RE, apply_lora, lora_modules, merge_lora, save_peft_adapter
from florence_jax.sharding import batch_sharding, make_mesh
from train.config import LoRAConfig, ModelConfig, OptimConfig
from train.optim import path_str
from train.state import create_model, init_train_state
from train.step import jit_train_step


def _flat(params):
    return {path_str(kp): np.asarray(v) for kp, v in jax.tree_util.tree_leaves_with_path(params)}


def _train_batch(seed, batch=4):
    b = tiny_batch(seed=seed, batch=batch, dec_len=6)
    labels = b["decoder_input_ids"].astype(np.int32)
    return {"pixel_values": b["pixel_values"].transpose(0, 2, 3, 1), "input_ids": b["input_ids"].astype(np.int32),
            "attention_mask": b["attention_mask"].astype(np.int32), "labels": labels,
            "label_mask": np.ones_like(labels, np.float32)}


@nnx.jit
def _logits(model, batch):
    """Our logits, jitted (compiling the tiny model's forward is about twice as fast as running it eagerly)."""
    return model(**batch).logits


def _ours(model, batch):
    return np.asarray(_logits(model, {k: np.asarray(v) for k, v in batch.items()}))


def _hf_logits(hf, batch):
    with torch.no_grad():
        return hf(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()


@pytest.fixture(scope="module")
def trained(tiny_hf_dir):
    """Three LoRA train steps (lr 1e-2, LoRA dropout on) through create_model / init_train_state / train_step,
    adapters on the default targets (BART attention + MLPs); the vision tower frozen (no backward pass)."""
    mesh = make_mesh(devices=jax.devices()[:1])
    lora = LoRAConfig(enabled=True, rank=4, alpha=8.0, dropout=0.1)
    model = create_model(ModelConfig(name_or_path=str(tiny_hf_dir), dtype="float32", dropout=0.0,
                                     drop_path_rate=0.0), mesh, lora=lora)
    before = _flat(nnx.split(model, nnx.Param, ...)[1])
    fns, state, _ = init_train_state(model, OptimConfig(learning_rate=1e-2, schedule="constant"), 10, mesh)
    step = jit_train_step(fns, state, batch_sharding(mesh))
    for i in range(3):
        state, metrics = step(state, _train_batch(i), jax.random.key(0))
        assert np.isfinite(float(metrics["loss"]))
    nnx.update(model, state.params, state.rest)
    return model, state, before


def test_only_adapters_train_and_only_adapters_have_moments(trained):
    model, state, before = trained
    after = _flat(state.params)
    adapters = [k for k in after if LORA_PARAM_RE.search(k)]
    # Tiny model: 2 encoder layers x 6 linears + 2 decoder layers x 10.
    assert len(lora_modules(model)) == 12 + 20 and len(adapters) == 2 * 32
    for k, v in before.items():
        if LORA_PARAM_RE.search(k):
            assert not np.array_equal(after[k], v), f"adapter {k} did not move"
        else:
            assert np.array_equal(after[k], v), f"base parameter {k} changed"
    moments = {path_str(kp) for kp, x in jax.tree_util.tree_leaves_with_path(state.opt_state) if np.ndim(x) > 0}
    assert moments and all(LORA_PARAM_RE.search(m) for m in moments), sorted(moments)[:5]
    # mu and nu of every adapter, nothing else.
    assert len(moments) == 2 * len(adapters)
    assert sum(np.ndim(x) > 0 for x in jax.tree.leaves(state.opt_state)) == 2 * len(adapters)


def test_merged_export_loads_in_transformers_with_lora_logits(trained, tiny_hf_dir, tmp_path):
    from transformers import Florence2ForConditionalGeneration as HF

    model, _, _ = trained
    b = tiny_batch(seed=7)
    ours = _ours(model, b)
    base = _hf_logits(HF.from_pretrained(tiny_hf_dir).eval(), b)
    assert np.abs(ours - base).max() > 1e-2  # the adapters matter, so the comparison below can fail
    merge_lora(model).save_pretrained(tmp_path)
    hf, info = HF.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    # fp32; W + s*A@B folded once vs computed per call: differences are rounding (~1e-6), 1e-4 as the
    # other transformers parity tests.
    np.testing.assert_allclose(_hf_logits(hf.eval(), b), ours, atol=1e-4)


def test_peft_adapter_loads_with_same_logits(trained, tiny_hf_dir, tmp_path):
    from peft import PeftModel
    from transformers import Florence2ForConditionalGeneration as HF

    model, _, _ = trained
    b = tiny_batch(seed=8)
    save_peft_adapter(model, tmp_path, base_model_name_or_path=str(tiny_hf_dir))
    peft_model = PeftModel.from_pretrained(HF.from_pretrained(tiny_hf_dir), tmp_path).eval()
    np.testing.assert_allclose(_hf_logits(peft_model, b), _ours(model, b), atol=1e-4)


@pytest.mark.slow  # 41 s on a slow host; the other peft exports are tested by default
def test_lm_head_adapter_in_peft_and_not_mergeable(tiny_hf_dir, tmp_path):
    """The tied LM head's adapter (a separate low-rank term on the logits) and vision-tower adapters match
    peft's LoRA on the same modules."""
    from peft import PeftModel
    from transformers import Florence2ForConditionalGeneration as HF

    model = Florence2ForConditionalGeneration.from_pretrained(tiny_hf_dir)  # eager: two graphs, each run once
    b = tiny_batch(seed=9)
    base = np.asarray(model(**b).logits)
    apply_lora(model, rank=2, alpha=4.0, dropout=0.0, targets=["^lm_head$", r"decoder\.layers\.1\.fc2$",
                                                          r"window_attn\.qkv$", r"channel_block\.ffn\.fc1$"])
    np.testing.assert_array_equal(np.asarray(model(**b).logits), base)  # B = 0: no change at init
    for i, m in enumerate(lora_modules(model).values()):
        b_ = m.lora.lora_b.get_value()
        m.lora.lora_b.set_value(jax.random.normal(jax.random.key(i), b_.shape) * 0.1)
    ours = np.asarray(model(**b).logits)
    assert np.abs(ours - base).max() > 1e-2
    save_peft_adapter(model, tmp_path, base_model_name_or_path=str(tiny_hf_dir))
    peft_model = PeftModel.from_pretrained(HF.from_pretrained(tiny_hf_dir), tmp_path).eval()
    np.testing.assert_allclose(_hf_logits(peft_model, b), ours, atol=1e-4)
    with pytest.raises(ValueError, match="cannot be merged"):
        merge_lora(model)


def test_bad_lora_target_is_a_clear_error(tiny_hf_dir):
    model = Florence2ForConditionalGeneration.from_pretrained(tiny_hf_dir)
    with pytest.raises(ValueError, match="matches no linear layer"):
        apply_lora(model, rank=2, alpha=2.0, dropout=0.0, targets=[r"\.query$"])


def test_export_model_merged_and_adapter_with_a_task_token(tmp_path):
    """train.setup.export_model for a LoRA model with a new token (random:tiny, as the CPU demo): the merged
    model and the peft adapter on its written base give our logits in transformers, tokenizer included."""
    import json

    from peft import PeftModel
    from PIL import Image
    from transformers import Florence2ForConditionalGeneration as HF

    from florence_jax.processing import load_processor
    from train.config import load_config
    from train.setup import export_model, get_processor

    cfg = load_config("cpu_demo.py", ["lora.enabled=true", "lora.rank=4", "lora.alpha=4", "lora.export=both",
                                      "model.add_tokens=('<MY_TASK>',)"])
    processor = get_processor(cfg, tmp_path)
    model = create_model(cfg.model, make_mesh(devices=jax.devices()[:1]), tokenizer=processor.tokenizer,
                         lora=cfg.lora)
    for i, m in enumerate(lora_modules(model).values()):
        b_ = m.lora.lora_b.get_value()
        m.lora.lora_b.set_value(jax.random.normal(jax.random.key(i), b_.shape) * 0.05)
    out = tmp_path / "export"
    assert export_model(cfg, model, processor, out) == [out, out / "adapter"]

    token = load_processor(out).tokenizer.convert_tokens_to_ids("<MY_TASK>")
    assert token == len(processor.tokenizer) - 1
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    inputs = processor(text=["<MY_TASK>What colour is the header?"], images=[image], return_tensors="np")
    assert (inputs["input_ids"] == token).sum() == 1
    batch = {k: np.asarray(inputs[k]) for k in ("input_ids", "pixel_values", "attention_mask")}
    batch["decoder_input_ids"] = np.array([[2, 0, 5, 7, token]])
    ours = _ours(model, batch)

    merged = HF.from_pretrained(out).eval()
    suppressed = json.loads((out / "generation_config.json").read_text())["suppress_tokens"]
    assert token not in suppressed and min(suppressed) == len(processor.tokenizer)
    config = json.loads((out / "adapter/adapter_config.json").read_text())
    # The base is named relative to the adapter directory, so the folder can move.
    assert config["r"] == 4 and config["base_model_name_or_path"] == "base"
    moved = tmp_path / "moved"
    (out / "adapter").rename(moved)
    peft_model = PeftModel.from_pretrained(HF.from_pretrained(moved / config["base_model_name_or_path"]),
                                           moved).eval()
    # Every file gets the mode a new file gets here (safetensors alone would write 0600).
    assert len({p.stat().st_mode & 0o777 for p in moved.iterdir() if p.is_file()}) == 1
    np.testing.assert_allclose(_hf_logits(merged, batch), ours, atol=1e-4)
    np.testing.assert_allclose(_hf_logits(peft_model, batch), ours, atol=1e-4)


@pytest.mark.slow
def test_train_main_with_lora_and_a_task_token(tmp_path):
    """The normal train path with LoRA and a new token: both exports load in transformers (+ peft) with equal
    logits, carry the tokenizer with the token, and scripts.export rebuilds the adapter from the checkpoint."""
    import json

    from peft import PeftModel
    from PIL import Image
    from safetensors.numpy import load_file
    from test_train_loop import SMALL
    from transformers import Florence2ForConditionalGeneration as HF

    from florence_jax.processing import load_processor
    from scripts.export import main as export_main
    from train.main import main

    wd = tmp_path / "run"
    assert main(["--config", "cpu_demo.py", "--workdir", str(wd), *SMALL, "--config.max_steps=2",
                 "--config.lora.enabled=true", "--config.lora.rank=4", "--config.lora.export=both",
                 "--config.model.add_tokens=('<MY_TASK>',)"]) == 0
    merged_dir, adapter_dir = wd / "export", wd / "export/adapter"
    processor = load_processor(merged_dir)
    token = processor.tokenizer.convert_tokens_to_ids("<MY_TASK>")
    assert token == len(processor.tokenizer) - 1
    merged = HF.from_pretrained(merged_dir).eval()
    assert token < merged.config.text_config.vocab_size
    suppressed = json.loads((merged_dir / "generation_config.json").read_text())["suppress_tokens"]
    assert token not in suppressed and min(suppressed) == len(processor.tokenizer)

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == "base"
    base = HF.from_pretrained(adapter_dir / config["base_model_name_or_path"]).eval()
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    inputs = processor(text=["<MY_TASK>What colour is the header?"], images=[image], return_tensors="pt")
    assert (inputs["input_ids"] == token).sum() == 1
    batch = {k: inputs[k] for k in ("input_ids", "pixel_values", "attention_mask")}
    batch["decoder_input_ids"] = torch.tensor([[2, 0, 5, 7]])
    with torch.no_grad():
        a, b = merged(**batch).logits.numpy(), peft_model(**batch).logits.numpy()
    np.testing.assert_allclose(b, a, atol=1e-4)

    out = tmp_path / "again"
    assert export_main(["--workdir", str(wd), "--out", str(out), "--lora", "adapter"]) == 0
    first, again = load_file(str(adapter_dir / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert set(first) == set(again) and all(np.array_equal(first[k], again[k]) for k in first)
    assert any(np.abs(v).max() > 0 for k, v in first.items() if "lora_B" in k)  # the adapters trained
