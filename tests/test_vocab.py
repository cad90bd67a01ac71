"""New task tokens: existing logits unchanged, new rows at the mean, never generated (ours and transformers')."""

import numpy as np
import pytest
import torch
from conftest import tiny_batch
from flax import nnx

from florence_jax import Florence2ForConditionalGeneration
from florence_jax.generation import generate
from florence_jax.vocab import add_tokens, resize_for_tokens


@nnx.jit
def _logits(model, batch):
    return model(**batch).logits


OLD = 1001  # tiny model: 1000 text tokens + <image> at 1000; rows up to 1024
NEW_IDS = list(range(OLD, OLD + 40))  # past row 1024: the table grows to 1088 (a multiple of 64)
NUM_TOKENS = OLD + len(NEW_IDS)


@pytest.fixture(scope="module")
def grown(tiny_hf_dir):
    base = Florence2ForConditionalGeneration.from_pretrained(tiny_hf_dir)
    b = tiny_batch(seed=3)
    before = np.asarray(_logits(base, b))
    return resize_for_tokens(base, NEW_IDS, NUM_TOKENS), b, before


def test_existing_logits_unchanged_and_new_rows_at_the_mean(grown):
    model, b, before = grown
    assert model.config.text_config.vocab_size == 1088
    assert set(model.generation_config.suppress_tokens) == set(range(NUM_TOKENS, 1088))
    after = np.asarray(_logits(model, b))
    assert after.shape[-1] == 1088
    # Same rows, same hidden states: only the column count of the head's matmul differs (fp32 rounding).
    np.testing.assert_allclose(after[..., :OLD], before[..., :OLD], atol=1e-6, rtol=0)
    emb = np.asarray(model.model.language_model.shared.embedding.get_value())
    np.testing.assert_allclose(emb[NEW_IDS], np.broadcast_to(emb[:OLD].mean(0), (len(NEW_IDS), emb.shape[1])),
                               atol=1e-6)
    # A new token's logit is the mean of the existing ones, so it is below their maximum: greedy never picks it.
    np.testing.assert_allclose(after[..., OLD], before[..., :OLD].mean(-1), atol=1e-4)
    assert (after[..., NEW_IDS].max(-1) < before[..., :OLD].max(-1)).all()


@pytest.mark.parametrize("num_beams", [1, 3])
def test_new_tokens_never_generated_ours_and_transformers(grown, num_beams, tmp_path):
    from transformers import Florence2ForConditionalGeneration as HF

    model, b, _ = grown
    banned = NEW_IDS + list(range(NUM_TOKENS, 1088))
    ids, pix, mask = b["input_ids"], b["pixel_values"], b["attention_mask"]
    ours = np.asarray(generate(model, ids, pix, mask, num_beams=num_beams, max_new_tokens=12))
    assert not np.isin(ours, banned).any(), ours
    model.save_pretrained(tmp_path)
    hf = HF.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pix),
                          attention_mask=torch.tensor(mask), num_beams=num_beams, max_new_tokens=12).numpy()
    assert not np.isin(ref, banned).any(), ref
    np.testing.assert_array_equal(ours, ref)


def test_tokenizer_takes_the_task_token(tmp_path):
    from florence_jax.processing import load_processor
    from florence_jax.tiny_processor import build_tiny_processor

    processor = build_tiny_processor()
    tok = processor.tokenizer
    n = len(tok)
    (new,) = add_tokens(tok, ["<MY_TASK>"])
    assert new == n and len(tok) == n + 1
    assert add_tokens(tok, ["<MY_TASK>"]) == [new] and len(tok) == n + 1  # idempotent (resume)
    ids = tok("<MY_TASK>What is the total?")["input_ids"]
    assert ids.count(new) == 1 and tok.decode(ids, skip_special_tokens=True) == "What is the total?"
    processor.save_pretrained(tmp_path)
    assert load_processor(tmp_path).tokenizer.convert_tokens_to_ids("<MY_TASK>") == new
    with pytest.raises(ValueError, match="non-empty"):
        add_tokens(tok, [" <X>"])
