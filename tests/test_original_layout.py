"""Checkpoints in the original remote-code layout (microsoft/Florence-2-*): processor, model, generation, export.

The reference for "what the original code does" is built here from its documented behaviour, never by running
it (the fixture's Python files raise if imported):
- the processor: the repo's own BART tokenizer with Florence-2's tokens added by ``add_special_tokens`` in the
  original's order, prompts made by the original's rule (task input kept as written), ``<s>`` + text + ``</s>``;
- the model: transformers' native class on the same weights, with the original's ``final_logits_bias`` added
  to its logits and the rows the original vocabulary lacks taken out of the softmax (a hook on ``lm_head``).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from florence_jax import Florence2ForConditionalGeneration
from florence_jax.postprocess import ADDED_TOKENS, post_process_generation
from florence_jax.processing import load_processor
from florence_jax.testing.original import write_original_checkpoint

# A prompt of every kind: task tokens with and without input (the input's leading space is kept by the
# original), free text, a DocVQA question, location tokens in the input.
PROMPTS = ("<OD>", "<CAPTION>", "<CAPTION_TO_PHRASE_GROUNDING> a red car", "<DocVQA>What is the total?",
           "<REGION_TO_DESCRIPTION><loc_10><loc_20><loc_300><loc_400>", "What colour is the box?")
TARGETS = ("a red car<loc_1><loc_2><loc_3><loc_4>", "The total is 47.20", "")

WITHOUT_INPUT = {"<OCR>": "What is the text in the image?", "<CAPTION>": "What does the image describe?",
                 "<OD>": "Locate the objects with category name in the image."}
WITH_INPUT = {"<CAPTION_TO_PHRASE_GROUNDING>": "Locate the phrases in the caption: {input}",
              "<REGION_TO_DESCRIPTION>": "What does the region {input} describe?"}


def _original_prompt(text: str) -> str:
    for token, prompt in WITHOUT_INPUT.items():
        if token in text:
            assert text == token
            return prompt
    for token, prompt in WITH_INPUT.items():
        if token in text:
            return prompt.format(input=text.replace(token, ""))
    return text


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_original_checkpoint(tmp_path_factory.mktemp("florence2_original"), sharpen=True)


@pytest.fixture(scope="module")
def reference_tokenizer(checkpoint):
    """The repo's tokenizer as the original processor leaves it."""
    from transformers import BartTokenizerFast

    tokenizer = BartTokenizerFast.from_pretrained(str(checkpoint.path))
    tokenizer.add_special_tokens({"additional_special_tokens": list(ADDED_TOKENS)})
    return tokenizer


@pytest.fixture(scope="module")
def processor(checkpoint):
    return load_processor(checkpoint.path)


# ------------------------------------------------------------------------------------------ processor
def test_processor_is_native_with_the_original_token_ids(checkpoint, processor, caplog):
    from transformers import BartTokenizerFast

    with caplog.at_level(logging.WARNING):
        load_processor(checkpoint.path)  # the fixture's .py files raise if anything imports them
    assert "processing_florence2.py" in caplog.text and "not run" in caplog.text
    assert type(processor).__name__ == "Florence2Processor" and processor.florence_layout == "original"
    shipped = len(BartTokenizerFast.from_pretrained(str(checkpoint.path)))
    ids = processor.tokenizer.convert_tokens_to_ids(list(ADDED_TOKENS))
    assert ids == list(range(shipped, shipped + len(ADDED_TOKENS)))  # appended in the original's order
    assert shipped + len(ADDED_TOKENS) == checkpoint.num_real == json.loads(
        (checkpoint.path / "config.json").read_text())["vocab_size"]
    assert processor.image_token == "<image>" and processor.image_token_id == checkpoint.num_real
    assert processor.num_image_tokens == 65


def test_prompt_and_target_ids_equal_the_original_processor(processor, reference_tokenizer):
    image = Image.new("RGB", (90, 40), (10, 200, 30))
    n_img = processor.num_image_tokens
    for prompt in PROMPTS:
        got = processor(text=[prompt], images=[image], return_tensors="np")["input_ids"][0]
        assert (got[:n_img] == processor.image_token_id).all()
        want = reference_tokenizer(_original_prompt(prompt))["input_ids"]
        assert got[n_img:].tolist() == want, prompt
    # The grounding input keeps its leading space, as the checkpoint was trained with it.
    assert processor._construct_prompts(["<CAPTION_TO_PHRASE_GROUNDING> a car"]) == [
        "Locate the phrases in the caption:  a car"]
    for target in TARGETS:
        assert processor.tokenizer(text_target=target)["input_ids"] == reference_tokenizer(target)["input_ids"]


def test_a_fine_tune_with_saved_and_added_tokens_loads(tmp_path):
    # A fine-tune saved with the original processor carries Florence-2's tokens and its own "<MY_TASK>".
    ck = write_original_checkpoint(tmp_path / "ft", added=(*ADDED_TOKENS, "<MY_TASK>"))
    processor = load_processor(ck.path)
    assert processor.tokenizer.convert_tokens_to_ids("<MY_TASK>") == ck.num_real - 1
    assert processor.image_token_id == ck.num_real
    model = Florence2ForConditionalGeneration.from_pretrained(ck.path)
    assert model.config.image_token_id == ck.num_real


def test_a_tokenizer_that_does_not_fit_the_checkpoint_is_refused(tmp_path):
    from florence_jax.original_layout import ProcessorLayoutError

    ck = write_original_checkpoint(tmp_path / "bad")
    config = json.loads((ck.path / "config.json").read_text())
    config["vocab_size"] = config["text_config"]["vocab_size"] = ck.num_real + 7
    (ck.path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ProcessorLayoutError, match=f"{ck.num_real:,} tokens.*{ck.num_real + 7:,} rows"):
        load_processor(ck.path)


# ------------------------------------------------------------------------------------------ post-processing
def test_answers_post_process_as_the_original_does(processor):
    size = (640, 480)
    # The original dequantizes to the bin centre in float32 and returns floats: (bin + 0.5) * size / 1000.
    x = lambda b: float(np.float32(b + 0.5) * np.float32(640 / 1000))  # noqa: E731
    y = lambda b: float(np.float32(b + 0.5) * np.float32(480 / 1000))  # noqa: E731
    od = processor.post_process_generation("</s><s>car<loc_10><loc_20><loc_300><loc_400></s>", task="<OD>",
                                           image_size=size)
    assert od == {"<OD>": {"bboxes": [[x(10), y(20), x(300), y(400)]], "labels": ["car"]}}
    assert all(isinstance(v, float) for v in od["<OD>"]["bboxes"][0])
    # Free text keeps its spaces; OCR lines too, and only "<s>" is removed before reading them, so the first
    # line of a decoded generation keeps the "</s>" it starts with.
    assert processor.post_process_generation("</s><s> A cat.</s>", task="<CAPTION>", image_size=size) == {
        "<CAPTION>": " A cat."}
    ocr = processor.post_process_generation("</s><s> HELLO" + "".join(f"<loc_{i}>" for i in range(8)) + "</s>",
                                            task="<OCR_WITH_REGION>", image_size=size)
    assert ocr["<OCR_WITH_REGION>"]["labels"] == ["</s> HELLO"]
    # The native processor (and native checkpoints) keep transformers' integers and stripping.
    native = post_process_generation("</s><s>car<loc_10><loc_20><loc_300><loc_400></s>", "<OD>", size)
    assert native["<OD>"]["bboxes"] == [[int(x(10)), int(y(20)), int(x(300)), int(y(400))]]
    # A polygon answer that starts with a location: transformers skips that location and reads the label
    # after it ("<sep>", "</poly>"); the original's pattern for the skip lacks its "<" and skips nothing, so
    # the label is "" and a lone location before "<sep>" still makes an (empty) polygon.
    seg = "<REFERRING_EXPRESSION_SEGMENTATION>"
    for answer, native_label in [("<loc_5><sep><loc_6><sep><loc_7>", "<sep>"),
                                 ("<loc_1></poly><loc_2><loc_3><loc_4>", "</poly>")]:
        text = f"</s><s>{answer}</s>"
        assert processor.post_process_generation(text, task=seg, image_size=size)[seg]["labels"] == [""]
        assert post_process_generation(text, seg, size)[seg]["labels"] == [native_label]
    lone = processor.post_process_generation("</s><s><loc_1><sep><sep><sep></s>", task=seg, image_size=size)
    assert lone == {seg: {"polygons": [[[]]], "labels": [""]}}
    assert post_process_generation("</s><s><loc_1><sep><sep><sep></s>", seg, size) == {
        seg: {"polygons": [], "labels": []}}


# ------------------------------------------------------------------------------------------ model
def _reference_model(checkpoint):
    """transformers' native model on the same weights, with the original's logits bias and vocabulary."""
    hf = checkpoint.hf_model
    vocab = hf.config.text_config.vocab_size
    bias = torch.full((vocab,), float("-inf"))
    bias[: checkpoint.num_real] = torch.from_numpy(checkpoint.logits_bias[0].astype(np.float32))
    hf.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    return hf


def _batch(processor, n=3, seed=0):
    """Image placeholders, then ``<s>`` + random text + ``</s>`` of one length for every row (the original attends
    to padding, so only unpadded rows compare), and random images."""
    rng = np.random.default_rng(seed)
    text = np.concatenate([np.zeros((n, 1)), rng.integers(3, 400, (n, 10)), np.full((n, 1), 2)], 1)
    ids = np.concatenate([np.full((n, processor.num_image_tokens), processor.image_token_id), text], 1)
    pixels = rng.normal(size=(n, 3, 64, 64)).astype(np.float32)
    return {"input_ids": ids.astype(np.int64), "pixel_values": pixels, "attention_mask": np.ones_like(ids)}


def test_logits_and_generation_equal_the_original_model(checkpoint, processor):
    model = Florence2ForConditionalGeneration.from_pretrained(checkpoint.path)
    assert model.checkpoint_layout == "original" and model.config.final_logits_bias
    reference = _reference_model(checkpoint)
    inputs = _batch(processor)
    ids, pixels, mask = inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"]
    dec = np.array([[2, 0, 57, 301, 1000, 44]] * len(ids))
    with torch.no_grad():
        ref = reference(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
                        attention_mask=torch.tensor(mask), decoder_input_ids=torch.tensor(dec)).logits.numpy()
    got = np.asarray(model(input_ids=ids, pixel_values=pixels, attention_mask=mask, decoder_input_ids=dec).logits)
    n = checkpoint.num_real
    # float32 noise of two implementations of the same graph (the bias moves logits by ~1, so a dropped or
    # misplaced bias fails by orders of magnitude); the rows the original lacks are out of the softmax.
    np.testing.assert_allclose(got[..., :n], ref[..., :n], atol=1e-4, rtol=0)
    assert (got[..., n:] == np.finfo(np.float32).min).all()
    # Generation with the checkpoint's own defaults (text config: 3 beams, no-repeat 3, early stopping).
    assert (model.generation_config.num_beams, model.generation_config.no_repeat_ngram_size,
            model.generation_config.early_stopping) == (3, 3, True)
    settings = dict(forced_bos_token_id=0, forced_eos_token_id=2)  # the text config's, as the original uses
    for kw in (dict(num_beams=1, no_repeat_ngram_size=0, **settings),
               dict(num_beams=3, no_repeat_ngram_size=3, early_stopping=True, **settings)):
        with torch.no_grad():
            out = reference.generate(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
                                     attention_mask=torch.tensor(mask), max_new_tokens=12, return_dict_in_generate=True,
                                     output_scores=True, **kw)
        seqs, scores = model.generate(ids, pixels, mask, max_new_tokens=12, return_scores=True, **kw)
        np.testing.assert_array_equal(seqs, out.sequences.numpy())
        assert len({tuple(r) for r in seqs.tolist()}) > 1  # input-dependent, not a constant
        if kw["num_beams"] > 1:
            np.testing.assert_allclose(scores, out.sequences_scores.numpy(), atol=1e-5, rtol=0)


def test_fp16_and_pytorch_bin_checkpoints_load_the_same(tmp_path, checkpoint):
    a = Florence2ForConditionalGeneration.from_pretrained(checkpoint.path)
    half = write_original_checkpoint(tmp_path / "bin16", sharpen=True, weights="bin", dtype="float16")
    b = Florence2ForConditionalGeneration.from_pretrained(half.path)
    emb_a = np.asarray(a.model.language_model.shared.embedding.get_value())[: checkpoint.num_real]
    emb_b = np.asarray(b.model.language_model.shared.embedding.get_value())[: checkpoint.num_real]
    np.testing.assert_array_equal(emb_b, emb_a.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(b.final_logits_bias.get_value())[0, : checkpoint.num_real],
                                  checkpoint.logits_bias[0].astype(np.float16).astype(np.float32))


def test_text_positions_come_from_the_text_config(tmp_path):
    ck = write_original_checkpoint(tmp_path / "long", max_position_embeddings=256)
    model = Florence2ForConditionalGeneration.from_pretrained(ck.path)
    assert model.config.text_config.max_position_embeddings == 256
    assert model.model.language_model.decoder.embed_positions.embedding.get_value().shape[0] == 256 + 2


# ------------------------------------------------------------------------------------------ export
def test_original_export_is_the_original_checkpoint_and_reloads_identically(tmp_path, checkpoint, processor):
    from florence_jax.weights.original import save_original_processor

    model = Florence2ForConditionalGeneration.from_pretrained(checkpoint.path)
    out = tmp_path / "export"
    model.save_pretrained(out, layout="original", code_repo="microsoft/Florence-2-base-ft")
    save_original_processor(processor, out, "microsoft/Florence-2-base-ft")
    from safetensors.numpy import load_file

    written = load_file(str(out / "model.safetensors"))
    # The original's names, shapes and values (tied copies and the bias included).
    assert set(written) == set(checkpoint.state)
    for key, value in checkpoint.state.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "florence2" and config["vision_config"]["model_type"] == "davit"
    assert config["text_config"]["model_type"] == "florence2_language"
    assert config["vocab_size"] == config["text_config"]["vocab_size"] == checkpoint.num_real
    assert config["auto_map"]["AutoModelForCausalLM"] == (
        "microsoft/Florence-2-base-ft--modeling_florence2.Florence2ForConditionalGeneration")
    assert (config["text_config"]["num_beams"], config["text_config"]["no_repeat_ngram_size"]) == (3, 3)
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["auto_map"]["AutoProcessor"] == "microsoft/Florence-2-base-ft--processing_florence2.Florence2Processor"
    assert "<image>" not in (out / "tokenizer.json").read_text()
    assert not list(out.glob("*.py"))  # the code is referenced, never copied
    # It reloads here (both layouts are ours to read) with identical logits and the same token ids.
    again = Florence2ForConditionalGeneration.from_pretrained(out)
    inputs = _batch(processor)
    again_processor = load_processor(out)
    np.testing.assert_array_equal(again_processor(text=["<OD>"], images=[Image.new("RGB", (9, 9))],
                                                  return_tensors="np")["input_ids"],
                                  processor(text=["<OD>"], images=[Image.new("RGB", (9, 9))],
                                            return_tensors="np")["input_ids"])
    dec = np.array([[2, 0, 57, 301]] * 3)
    a = model(**{k: inputs[k] for k in ("input_ids", "pixel_values", "attention_mask")}, decoder_input_ids=dec)
    b = again(**{k: inputs[k] for k in ("input_ids", "pixel_values", "attention_mask")}, decoder_input_ids=dec)
    np.testing.assert_array_equal(np.asarray(a.logits), np.asarray(b.logits))


def test_native_export_refuses_a_non_zero_logits_bias(tmp_path, checkpoint):
    from florence_jax.weights.export import ExportError

    model = Florence2ForConditionalGeneration.from_pretrained(checkpoint.path)
    with pytest.raises(ExportError, match="final_logits_bias.*layout='original'"):
        model.save_pretrained(tmp_path / "native")
    zero = write_original_checkpoint(tmp_path / "zero", bias_scale=0.0)
    model = Florence2ForConditionalGeneration.from_pretrained(zero.path)
    model.save_pretrained(tmp_path / "native_ok")  # a zero bias changes nothing: the native class loads it
    from transformers import Florence2ForConditionalGeneration as HF

    _, info = HF.from_pretrained(tmp_path / "native_ok", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert oct((tmp_path / "native_ok" / "model.safetensors").stat().st_mode & 0o777) == oct(
        (tmp_path / "native_ok" / "config.json").stat().st_mode & 0o777)


def test_sharded_bin_and_a_revision_from_the_hub_cache_load_the_same(tmp_path, checkpoint, monkeypatch):
    """Original checkpoints ship as (sharded) pytorch_model.bin; Hub users pin revisions such as refs/pr/6."""
    import shutil

    from huggingface_hub import constants

    from florence_jax.testing.hub import populate_hub_cache

    sharded = tmp_path / "sharded"
    shutil.copytree(checkpoint.path, sharded, ignore=shutil.ignore_patterns("model.safetensors"))
    keys = sorted(checkpoint.state)
    index = {"metadata": {}, "weight_map": {}}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: torch.from_numpy(checkpoint.state[k].copy()) for k in part}, sharded / name)
        index["weight_map"].update(dict.fromkeys(part, name))
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    populate_hub_cache(tmp_path / "hub", "someone/florence2-ft", sharded, revision="refs/pr/6")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    a = Florence2ForConditionalGeneration.from_pretrained(checkpoint.path)
    b = Florence2ForConditionalGeneration.from_pretrained("someone/florence2-ft", revision="refs/pr/6")
    processor = load_processor("someone/florence2-ft", revision="refs/pr/6")
    assert processor.image_token_id == checkpoint.num_real
    from florence_jax.weights.load import iter_flax_params

    pa, pb = dict(iter_flax_params(a)), dict(iter_flax_params(b))
    assert set(pa) == set(pb) and all(np.array_equal(np.asarray(pa[k]), np.asarray(pb[k])) for k in pa)
