"""The user's path on Hub ids, offline: microsoft/Florence-2-base-ft (original layout) from huggingface_hub's
cache and HuggingFaceM4/DocumentVQA from the datasets cache, through train.main, train.evaluate, predict and
export in both layouts. The caches are written in the libraries' own layouts (florence_jax.testing.hub) and
read by the real loaders with HF_HUB_OFFLINE=1 (set in conftest)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from florence_jax.testing.hub import populate_datasets_cache, populate_hub_cache
from florence_jax.testing.original import write_original_checkpoint

ROOT = Path(__file__).resolve().parents[1]
REPO = "microsoft/Florence-2-base-ft"
DATASET = "HuggingFaceM4/DocumentVQA"

# gpu_a100.py as is, shrunk to the tiny checkpoint and a few steps: its data source (the Hub dataset id), its
# template, its frozen vision tower; float32 on the CPU.
TINY_RUN = ["--config", "gpu_a100.py", f"--config.model.name_or_path={REPO}", "--config.model.dtype=float32",
            "--config.model.attention_impl=xla", "--config.data.image_size=64", "--config.data.num_workers=0",
            "--config.batch_size=8", "--config.max_steps=3", "--config.eval.batch_size=8", "--config.eval.num_beams=1",
            "--config.eval.max_new_tokens=6", "--config.data.max_target_tokens=8", "--config.data.max_eval_examples=8",
            "--config.data.max_prompt_tokens=32",
            "--config.log_every_steps=1", "--config.compilation_cache_dir=none", "--config.export_layout=original"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory, monkeypatch_module):
    import datasets
    from huggingface_hub import constants

    from train.data.synthetic import features, make_records

    root = tmp_path_factory.mktemp("hf")
    # A zero logits bias, so both export layouts apply (a non-zero one is refused natively: test_original_layout).
    ck = write_original_checkpoint(root / "src", bias_scale=0.0, sharpen=True)
    populate_hub_cache(root / "hub", REPO, ck.path)
    populate_datasets_cache(root / "datasets", DATASET, {"train": make_records(24, 64, 0),
                                                        "validation": make_records(8, 64, 1)}, features())
    monkeypatch_module.setattr(constants, "HF_HUB_CACHE", str(root / "hub"))
    monkeypatch_module.setattr(datasets.config, "HF_DATASETS_CACHE", root / "datasets")
    return root, ck


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_train_evaluate_predict_and_export_from_hub_ids(hub, tmp_path, capsys):
    from florence_jax import Florence2ForConditionalGeneration
    from florence_jax.predict import main as predict_main
    from scripts.export import main as export_main
    from train.evaluate import main as evaluate_main
    from train.main import main as train_main

    root, ck = hub
    workdir = tmp_path / "run"
    assert train_main([*TINY_RUN, "--workdir", str(workdir)]) == 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["step"] == 3 and np.isfinite(summary["last_train"]["loss"])
    out = capsys.readouterr().out
    assert "evaluation   num_beams=1, no_repeat_ngram_size=3, early_stopping=True" in out  # the text config's
    # The end-of-run export is in the original layout and names the code of the repo it came from.
    export = workdir / "export"
    config = json.loads((export / "config.json").read_text())
    assert config["vision_config"]["model_type"] == "davit" and config["vocab_size"] == ck.num_real
    assert config["auto_map"]["AutoConfig"] == f"{REPO}--configuration_florence2.Florence2Config"
    # Either layout from the checkpoint, with the same logits.
    assert export_main(["--workdir", str(workdir), "--out", str(tmp_path / "native"), "--layout", "native"]) == 0
    native = Florence2ForConditionalGeneration.from_pretrained(tmp_path / "native")
    original = Florence2ForConditionalGeneration.from_pretrained(export)
    assert native.checkpoint_layout == "native" and original.checkpoint_layout == "original"
    rng = np.random.default_rng(0)
    n_img = 65
    ids = np.concatenate([np.full((2, n_img), ck.num_real), rng.integers(3, 400, (2, 8))], 1)
    pixels = rng.normal(size=(2, 3, 64, 64)).astype(np.float32)
    dec = np.array([[2, 0, 57, 301]] * 2)
    a = np.asarray(native(input_ids=ids, pixel_values=pixels, decoder_input_ids=dec).logits)[..., : ck.num_real]
    b = np.asarray(original(input_ids=ids, pixel_values=pixels, decoder_input_ids=dec).logits)[..., : ck.num_real]
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    # Evaluation of the Hub checkpoint itself on the Hub dataset.
    capsys.readouterr()
    evaluate_main(["--config", "gpu_a100.py", "--model", REPO, *[a for a in TINY_RUN[4:] if "export" not in a]])
    result = json.loads(capsys.readouterr().out)
    assert result["num_examples"] == 8 and 0.0 <= result["anls"] <= 1.0
    # predict on the Hub id prints the effective settings and one JSON line per image.
    image = tmp_path / "page.png"
    Image.new("RGB", (80, 60), (200, 30, 30)).save(image)
    assert predict_main([str(image), "--model", REPO, "--task", "<OD>", "--max_new_tokens", "6"]) == 0
    captured = capsys.readouterr()
    assert "num_beams=3, no_repeat_ngram_size=3, early_stopping=True" in captured.err
    assert "original-layout" in captured.err
    record = json.loads(captured.out.strip().splitlines()[-1])
    assert record["task"] == "<OD>" and set(record["result"]["<OD>"]) == {"bboxes", "labels"}


@pytest.mark.slow  # about 5 minutes on 2 cores: a 0.23B model at 768 px through every entry point
def test_base_size_original_checkpoint_end_to_end(tmp_path, monkeypatch):
    """A base-size checkpoint in the original layout (a random model with Florence-2-base's sizes, a non-zero
    logits bias, fp16 weights, a small vocabulary) from a Hub-layout cache: logits and beam search equal the
    original model's, then train.main, train.evaluate, predict and the original-layout export run on it."""
    import datasets
    import torch
    from huggingface_hub import constants

    from florence_jax import Florence2ForConditionalGeneration
    from florence_jax.predict import main as predict_main
    from florence_jax.processing import load_processor
    from florence_jax.testing.models import BASE_TEXT, BASE_VISION
    from train.data.synthetic import features, make_records
    ck = write_original_checkpoint(tmp_path / "src", image_size=768, vision=BASE_VISION, text=BASE_TEXT,
                                   dtype="float16", bias_scale=0.5)
    populate_hub_cache(tmp_path / "hub", REPO, ck.path)
    populate_datasets_cache(tmp_path / "datasets", DATASET, {"train": make_records(4, 768, 0),
                                                            "validation": make_records(2, 768, 1)}, features())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")

    model = Florence2ForConditionalGeneration.from_pretrained(REPO)
    processor = load_processor(REPO)
    assert processor.num_image_tokens == 577 and model.config.final_logits_bias
    # The reference: the same fp16 weights in transformers' native class, with the original's bias and vocabulary.
    hf = ck.hf_model
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.half().float())
    vocab = hf.config.text_config.vocab_size
    bias = torch.full((vocab,), float("-inf"))
    bias[: ck.num_real] = torch.from_numpy(ck.logits_bias[0].astype(np.float32))
    hf.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    rng = np.random.default_rng(0)
    ids = np.concatenate([np.full((2, 577), ck.num_real), np.zeros((2, 1)), rng.integers(3, 400, (2, 8)),
                          np.full((2, 1), 2)], 1).astype(np.int64)
    pixels = rng.normal(size=(2, 3, 768, 768)).astype(np.float32)
    dec = np.array([[2, 0, 57, 301, 1000]] * 2)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
                 decoder_input_ids=torch.tensor(dec)).logits.numpy()
        ref_gen = hf.generate(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels), max_new_tokens=6,
                              num_beams=3, no_repeat_ngram_size=3, early_stopping=True, forced_bos_token_id=0,
                              return_dict_in_generate=True, output_scores=True)
    got = np.asarray(model(input_ids=ids, pixel_values=pixels, decoder_input_ids=dec).logits)
    # float32 noise of a 12-layer, 768-wide model at 577 + 10 tokens (the bias alone moves logits by ~0.5)
    np.testing.assert_allclose(got[..., : ck.num_real], ref[..., : ck.num_real], atol=2e-3, rtol=0)
    seqs, scores = model.generate(ids, pixels, max_new_tokens=6, return_scores=True)  # the text config's defaults
    np.testing.assert_array_equal(seqs, ref_gen.sequences.numpy())
    np.testing.assert_allclose(scores, ref_gen.sequences_scores.numpy(), atol=1e-4, rtol=0)
    del model, hf

    # The CPU's formulations: the GPU's unroll the vision stages (Formulations.vision_stages), and the run
    # was killed for memory here compiling the unrolled float32 base step (XLA:CPU; why the CPU scans).
    run = ["--config", "gpu_a100.py", f"--config.model.name_or_path={REPO}", "--config.model.dtype=float32",
           "--config.model.hardware=cpu",
           "--config.model.attention_impl=xla", "--config.data.num_workers=0", "--config.batch_size=2",
           "--config.max_steps=2", "--config.eval.batch_size=2", "--config.eval.max_new_tokens=4",
           "--config.data.max_target_tokens=8", "--config.data.max_prompt_tokens=32",
           "--config.compilation_cache_dir=none", "--config.export_layout=original"]
    # One CPU device, as a user runs it (batch 2 does not divide over the suite's 8 simulated devices).
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_DATASETS_CACHE=str(tmp_path / "datasets"), HF_HUB_OFFLINE="1")
    for command in (["train.main", *run, "--workdir", str(tmp_path / "run")],
                    ["train.evaluate", "--config", "gpu_a100.py", "--model", REPO, *run[3:-1]]):
        subprocess.run([sys.executable, "-m", *command], cwd=ROOT, env=env, check=True, timeout=1200)
    export = tmp_path / "run" / "export"
    assert json.loads((export / "config.json").read_text())["vocab_size"] == ck.num_real
    assert Florence2ForConditionalGeneration.from_pretrained(export).checkpoint_layout == "original"
    image = tmp_path / "page.png"
    Image.new("RGB", (300, 200), (20, 30, 200)).save(image)
    assert predict_main([str(image), "--model", REPO, "--task", "<CAPTION>", "--max_new_tokens", "4"]) == 0
