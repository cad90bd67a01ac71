"""Structured answers and the no-repeat n-gram ban: a JSON target comes back intact with the ban off (and
broken with Florence-2's published setting, 3), and runs that evaluate a structured template with it on are
warned."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from florence_jax import Florence2ForConditionalGeneration
from florence_jax.assets import TINY_READER
from florence_jax.generation import generate
from florence_jax.generation_config import GenerationConfig, structured_output_warning
from florence_jax.losses import token_cross_entropy

# Every row repeats the n-grams '", "qty": 1}' and '{"item": "': what a form, a table or a list looks like.
FORM = {"rows": [{"item": "pen", "qty": 1}, {"item": "ink", "qty": 1}, {"item": "cap", "qty": 1}]}


@pytest.fixture(scope="module")
def memorised():
    """The tiny reader trained (its decoder side) to answer a text-only prompt with FORM as JSON."""
    from florence_jax.processing import load_processor

    tokenizer = load_processor(TINY_READER).tokenizer
    model = Florence2ForConditionalGeneration.from_pretrained(TINY_READER)
    target = tokenizer(json.dumps(FORM), add_special_tokens=False)["input_ids"]
    prompt = np.asarray([tokenizer("<FORM>")["input_ids"]], np.int32)
    t = model.config.text_config
    labels = np.asarray([target + [t.eos_token_id]], np.int32)
    decoder_in = np.concatenate([[[t.decoder_start_token_id]], labels[:, :-1]], axis=1)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(2e-3)

    @jax.jit
    def step(params, opt):
        def loss(p):
            logits = nnx.merge(graphdef, p, rest)(input_ids=prompt, decoder_input_ids=decoder_in).logits
            return token_cross_entropy(logits, labels, jnp.ones(labels.shape, jnp.float32))[0].sum()

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, value

    opt = tx.init(params)
    for _ in range(200):
        params, opt, value = step(params, opt)
    nnx.update(model, params)
    return model, tokenizer, prompt, len(target), float(value)


def _answer(model, tokenizer, prompt, n, **kw) -> str:
    out = generate(model, prompt, max_new_tokens=n + 4, num_beams=1, **kw)
    return tokenizer.decode(out[0], skip_special_tokens=True)


@pytest.mark.slow  # 200 training steps and two generation compiles of the tiny reader: about 30 s
def test_a_json_target_comes_back_intact_with_the_ngram_ban_off(memorised):
    model, tokenizer, prompt, n, loss = memorised
    assert loss < 0.05 * n, loss  # memorised: the greedy answer is the target, token for token
    off = _answer(model, tokenizer, prompt, n, no_repeat_ngram_size=0)
    assert json.loads(off) == FORM, off
    # Florence-2's published setting rewrites the second row's repeated n-grams: no longer the form.
    on = _answer(model, tokenizer, prompt, n, no_repeat_ngram_size=3)
    assert on != off
    try:
        assert json.loads(on) != FORM
    except json.JSONDecodeError:
        pass


def test_structured_output_warnings_follow_the_setting():
    from types import SimpleNamespace

    from florence_jax.config import Florence2Config
    from train.config import DataConfig, EvalConfig, MixtureComponent, TrainConfig
    from train.setup import structured_output_warnings

    # What the warnings read of a model: its config and generation defaults (the published Florence-2's here).
    model = SimpleNamespace(config=Florence2Config(),
                            generation_config=GenerationConfig(num_beams=3, no_repeat_ngram_size=3))
    assert "no_repeat_ngram_size=3 (the checkpoint's default)" in structured_output_warning(model, "x")
    assert structured_output_warning(model, "x", no_repeat_ngram_size=0) is None
    od = DataConfig(mixture=(MixtureComponent(template="od", metric="map"),))
    text = DataConfig(mixture=(MixtureComponent(template="docvqa"),))
    warned = structured_output_warnings(TrainConfig(data=od), model)
    assert len(warned) == 1 and "template 'od'" in warned[0] and "--config.eval.no_repeat_ngram_size=0" in warned[0]
    assert structured_output_warnings(TrainConfig(data=od, eval=EvalConfig(no_repeat_ngram_size=0)), model) == []
    assert structured_output_warnings(TrainConfig(data=text), model) == []
    model.generation_config = GenerationConfig(no_repeat_ngram_size=0)  # a checkpoint without the ban
    assert structured_output_warnings(TrainConfig(data=od), model) == []
