"""Generation parity with transformers' ``generate()`` (greedy and beam search) on a tiny random model.

The conftest model is too flat for generation tests: every prompt yields the same one or two repeated
tokens (a random post-LN decoder with a tied head mostly copies its input token, and the encoder's
influence is lost). A copy with sharper decoder positions and cross-attention gives diverse
input-dependent outputs, so the comparison exercises n-gram bans, beam reordering and finished
hypotheses; ``_assert_diverse`` fails the test if the references ever degenerate again.
"""

import dataclasses

import jax
import numpy as np
import pytest
import torch
from conftest import TINY_IMAGE, TINY_IMAGE_TOKEN
from flax import nnx

from florence_jax import Florence2ForConditionalGeneration
from florence_jax.generation import GenerationOptions, Generator, generate

N_IMG = 1 + (TINY_IMAGE // 8) ** 2
PROMPT_LENGTHS = (7, 4, 2)  # right padding on rows 1 and 2
MAX_NEW = 20  # transformers' default: the no-argument call below reuses the greedy executable


@pytest.fixture(scope="module")
def gen_pair(tiny_hf_dir, tmp_path_factory):
    from transformers import Florence2ForConditionalGeneration as HF

    from florence_jax.testing.models import save_hf_model

    hf = HF.from_pretrained(tiny_hf_dir).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "decoder.embed_positions" in name or ("encoder_attn." in name and p.ndim >= 2):
                p.mul_(10.0)
    directory = save_hf_model(hf, tmp_path_factory.mktemp("tiny_gen"))
    return hf, Florence2ForConditionalGeneration.from_pretrained(directory)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    width = N_IMG + max(PROMPT_LENGTHS)
    ids = np.full((len(PROMPT_LENGTHS), width), 1, np.int64)  # pad_token_id = 1
    mask = np.zeros_like(ids)
    for i, n in enumerate(PROMPT_LENGTHS):
        ids[i, :N_IMG] = TINY_IMAGE_TOKEN
        ids[i, N_IMG:N_IMG + n] = rng.integers(3, 900, n)
        mask[i, :N_IMG + n] = 1
    pixels = rng.normal(size=(len(PROMPT_LENGTHS), 3, TINY_IMAGE, TINY_IMAGE)).astype(np.float32)
    return ids, pixels, mask


def _reference(hf, prompts, **kw):
    ids, pixels, mask = prompts
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
                          attention_mask=torch.tensor(mask), return_dict_in_generate=True, output_scores=True, **kw)
    scores = getattr(out, "sequences_scores", None)
    return out.sequences.numpy(), None if scores is None else scores.numpy()


def _assert_diverse(seqs: np.ndarray):
    """Each row uses several distinct tokens and the rows differ: the model is not a constant."""
    gen = seqs[:, 1:]
    assert all(len(set(row.tolist())) >= 4 for row in gen), seqs
    assert len({tuple(row.tolist()) for row in gen}) == len(gen), seqs


# A frequent token of the references used as EOS, so hypotheses finish at different steps and the
# finished-beam bookkeeping, length penalty and padding after EOS are exercised.
EARLY_EOS = dict(eos_token_id=229, forced_eos_token_id=229)

CASES = {
    "greedy": dict(num_beams=1),
    "greedy_ngram3_early_eos": dict(num_beams=1, no_repeat_ngram_size=3, **EARLY_EOS),
    "beam3": dict(num_beams=3, early_stopping=False),
    "beam3_early_eos_lp2": dict(num_beams=3, early_stopping=False, length_penalty=2.0, **EARLY_EOS),
    "beam3_ngram3_es_true": dict(num_beams=3, no_repeat_ngram_size=3, early_stopping=True),
    "beam3_ngram3_es_true_early_eos_lp07": dict(num_beams=3, no_repeat_ngram_size=3, early_stopping=True,
                                                length_penalty=0.7, **EARLY_EOS),
    "beam3_ngram3_es_false_early_eos_lp15": dict(num_beams=3, no_repeat_ngram_size=3, early_stopping=False,
                                                 length_penalty=1.5, **EARLY_EOS),
    "beam3_es_never_early_eos_lp05": dict(num_beams=3, early_stopping="never", length_penalty=0.5, **EARLY_EOS),
    # Every row fills its beams before max length: the loop must stop early and crop like transformers.
    "beam3_es_true_all_rows_stop_early": dict(num_beams=3, early_stopping=True, eos_token_id=623,
                                              forced_eos_token_id=623),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(gen_pair, prompts, case):
    hf, ours = gen_pair
    kw = dict(CASES[case], max_new_tokens=MAX_NEW)
    ref, ref_scores = _reference(hf, prompts, **kw)
    if "eos_token_id" in kw:  # some hypotheses really end early (else the case tests nothing new)
        lengths = [int(np.argmax(row == kw["eos_token_id"])) if (row == kw["eos_token_id"]).any() else 0
                   for row in ref[:, 1:]]
        assert min(lengths) < MAX_NEW - 1 and len(set(lengths)) > 1, ref
    else:
        _assert_diverse(ref)
    got, scores = generate(ours, *prompts, return_scores=True, **kw)
    assert got.dtype == np.int32 and got.shape[1] <= 1 + MAX_NEW
    np.testing.assert_array_equal(got, ref)
    if case.endswith("stop_early"):
        assert ref.shape[1] < 1 + MAX_NEW
    if kw["num_beams"] > 1:
        np.testing.assert_allclose(scores, ref_scores, atol=1e-5, rtol=0)
    else:
        assert scores is None


def test_default_and_max_length_conventions(gen_pair, prompts):
    """No length argument: transformers' default 20 new tokens; ``max_length`` counts the start token."""
    hf, ours = gen_pair
    ref, _ = _reference(hf, prompts)
    np.testing.assert_array_equal(generate(ours, *prompts), ref)
    assert ref.shape[1] == 21
    ref, _ = _reference(hf, prompts, max_length=21, num_beams=3)
    np.testing.assert_array_equal(generate(ours, *prompts, max_length=21, num_beams=3), ref)
    assert ref.shape[1] == 21


def test_suppress_tokens_never_generated(gen_pair, prompts):
    hf, ours = gen_pair
    plain = generate(ours, *prompts, max_new_tokens=MAX_NEW, num_beams=3)
    banned = sorted({int(t) for t in np.unique(plain[:, 1:]) if t not in (1, 2)})[:6]
    assert banned
    for beams in (1, 3):
        kw = dict(max_new_tokens=MAX_NEW, num_beams=beams, suppress_tokens=banned)
        got = generate(ours, *prompts, **kw)
        assert not np.isin(got, banned).any(), got
        np.testing.assert_array_equal(got, _reference(hf, prompts, **kw)[0])


def test_forced_eos_at_max_length(gen_pair, prompts):
    _, ours = gen_pair
    for beams in (1, 3):
        got = generate(ours, *prompts, max_new_tokens=MAX_NEW, num_beams=beams, forced_eos_token_id=2)
        assert got.shape == (len(PROMPT_LENGTHS), 1 + MAX_NEW)
        assert (got[:, -1] == 2).all() and (got[:, 0] == 2).all()
        got = generate(ours, *prompts, max_new_tokens=MAX_NEW, num_beams=beams, forced_eos_token_id=None)
        assert (got[:, -1] != 2).any()  # without the processor nothing forces it


def test_second_call_does_not_compile(gen_pair, prompts):
    _, ours = gen_pair
    kw = dict(max_new_tokens=MAX_NEW, num_beams=3, no_repeat_ngram_size=3)
    first = generate(ours, *prompts, early_stopping=True, **kw)
    events: list[str] = []

    def listener(event: str, duration: float, **_):
        if event.startswith("/jax/core/compile"):
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        again = generate(ours, *prompts, early_stopping=True, **kw)
        # Length penalty, early-stopping mode and special ids are traced, not compiled in.
        generate(ours, *prompts, early_stopping="never", length_penalty=0.3, **EARLY_EOS, **kw)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert events == []
    np.testing.assert_array_equal(first, again)


def test_generator_splits_once_and_all_entry_points_agree(gen_pair, prompts, monkeypatch):
    """A generator splits the model once, at construction, and every entry point (generate, encode +
    generate_from_encoder, decode_fn, a per-call override of its default options) gives what the one-off
    ``generate`` gives."""
    _, ours = gen_pair
    ids, pixels, mask = prompts
    kw = dict(max_new_tokens=MAX_NEW, num_beams=3, no_repeat_ngram_size=3, early_stopping=True)
    expected, expected_scores = generate(ours, *prompts, return_scores=True, **kw)
    greedy = ours.generate(*prompts, **dict(kw, num_beams=1))  # the model's method
    splits = []  # splits of the whole model (tracing the tower also splits its blocks)
    real_split = nnx.split
    monkeypatch.setattr(nnx, "split", lambda *a, **k: splits.append(a[0] is ours) or real_split(*a, **k))
    generator = Generator(ours, GenerationOptions(**kw))
    got = [generator(*prompts) for _ in range(2)]
    enc = generator.encode(ids, pixels, mask)
    seqs, scores = generator.generate_from_encoder(enc, mask, return_scores=True)
    out = jax.block_until_ready(generator.decode_fn()(enc, mask))
    got_greedy = generator(*prompts, num_beams=1)
    assert sum(splits) == 1
    for g in [*got, seqs, np.asarray(out.sequences)[:, :int(out.length)]]:
        np.testing.assert_array_equal(g, expected)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-6)
    np.testing.assert_array_equal(got_greedy, greedy)
    assert not np.array_equal(greedy, expected)  # the override really changed the search
    assert generator.options == GenerationOptions(**kw)  # a call's options are its own


def test_generation_options_are_one_frozen_checked_set(gen_pair, prompts):
    _, ours = gen_pair
    options = GenerationOptions(num_beams=3, suppress_tokens=[5, 7])
    assert options.suppress_tokens == (5, 7)
    assert hash(options) == hash(GenerationOptions(num_beams=3, suppress_tokens=(5, 7)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.num_beams = 1
    with pytest.raises(TypeError, match="num_beam"):
        options.replace(num_beam=1)
    with pytest.raises(TypeError, match="num_beam"):
        Generator(ours, num_beam=1)
    with pytest.raises(TypeError, match="num_beam"):
        Generator(ours)(*prompts, num_beam=1)


def test_a_changed_model_is_never_served_from_an_old_split(gen_pair, prompts):
    """A generator generates with the split it made until it is told about a change (``update``, or new
    ``state``); nothing outside it keeps a split, so a model changed while a generator exists is served
    as it is now by every other call."""
    _, ours = gen_pair
    model = nnx.clone(ours)  # changed below; the shared fixture stays as it is
    kw = dict(max_new_tokens=MAX_NEW, num_beams=3, no_repeat_ngram_size=3, early_stopping=True)
    generator = Generator(model, **kw)
    before = generator(*prompts)
    old_state = generator.state

    params = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(params))))
    nnx.update(model, jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape, x.dtype), params))

    after = generate(model, *prompts, **kw)  # a one-off call while the generator lives: the model as it is now
    assert not np.array_equal(after, before)  # the change matters to the output
    np.testing.assert_array_equal(model.generate(*prompts, **kw), after)
    np.testing.assert_array_equal(Generator(model, **kw)(*prompts), after)
    np.testing.assert_array_equal(generator(*prompts), before)  # not told yet: its own split
    generator.update(model)
    np.testing.assert_array_equal(generator(*prompts), after)
    generator.state = old_state  # explicit new values for the same variables
    np.testing.assert_array_equal(generator(*prompts), before)
    generator.state = nnx.state(model)
    np.testing.assert_array_equal(generator(*prompts), after)

    with pytest.raises(ValueError, match="shape"):
        generator.state = jax.tree.map(lambda x: x[..., :1] if x.ndim else x, nnx.state(model))
    with pytest.raises(ValueError, match="update"):
        generator.state = nnx.state(model, nnx.Param)  # other variables: not the generator's tree
    np.testing.assert_array_equal(generator(*prompts), after)  # a refused state changes nothing

    # update takes the model's generation config too: unset options now come from the new one
    beams = 2 if model.generation_config.num_beams != 2 else 4
    model.generation_config = dataclasses.replace(model.generation_config, num_beams=beams)
    assert generator.resolve(num_beams=None)[0].num_beams != beams
    generator.update(model)
    assert generator.resolve(num_beams=None)[0].num_beams == beams
    np.testing.assert_array_equal(generator(*prompts, num_beams=None),
                                  generate(model, *prompts, **dict(kw, num_beams=beams)))


def test_cache_slots_follow_parents_and_copy_only_extra_children():
    """``_inherit_slots`` against transformers' way (gather every cache row by parent, each step): after
    random selections the slot of each beam holds exactly what the gathered cache holds for it, and the
    only rows written are one per second-or-later child of a parent."""
    import jax.numpy as jnp

    from florence_jax.generation import _inherit_slots
    from florence_jax.modeling.bart import LayerCache

    rng = np.random.default_rng(0)
    batch, nb, length = 3, 4, 6
    offset = jnp.arange(batch, dtype=jnp.int32)[:, None] * nb
    gathered = np.zeros((batch * nb, 1, length, 1), np.float32)  # rank order, gathered by parent
    cache = [LayerCache(jnp.asarray(gathered), jnp.asarray(gathered))]
    slot_of = jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32), (batch, nb))
    copies_seen = 0
    for step in range(3 * length):
        t = step % length
        written = rng.standard_normal((batch, nb)).astype(np.float32)  # what each beam writes at t
        gathered[:, 0, t, 0] = written.reshape(-1)
        rows = np.asarray(slot_of + offset).reshape(-1)
        key = np.asarray(cache[0].key).copy()
        key[rows, 0, t, 0] = written.reshape(-1)
        cache = [LayerCache(jnp.asarray(key), jnp.asarray(-key))]

        parent = rng.integers(0, nb, (batch, nb)).astype(np.int32)
        before = np.asarray(cache[0].key)
        cache, slot_of = _inherit_slots(cache, slot_of, jnp.asarray(parent), offset)
        gathered = gathered[(parent + np.asarray(offset)).reshape(-1)]

        after = np.asarray(cache[0].key)
        assert sorted(np.asarray(slot_of)[0].tolist()) == list(range(nb))  # still a permutation per row
        rows = np.asarray(slot_of + offset).reshape(-1)
        np.testing.assert_array_equal(after[rows], gathered)
        np.testing.assert_array_equal(np.asarray(cache[0].value), -after)
        extra_children = sum(nb - len(set(p.tolist())) for p in parent)
        changed = int(np.any(after != before, axis=(1, 2, 3)).sum())
        assert changed == extra_children
        copies_seen += changed
    assert copies_seen > 0


def test_cpu_and_accelerator_beam_paths_agree(gen_pair, prompts):
    """The CPU's beam-search step (cross-attention in florence_jax's CPU kernel; cache rows copied only for
    extra children; the LM head's product vocabulary-major), here with the loop compiled with Eigen's dots,
    the same with the attention in XLA's products (``decode_attention=compiler``: each beam's cross-attention
    query alone, the cache rows of extra children copied), and the
    accelerators' (a row's beams as one product; the whole cache gathered by parent; the LM head as
    transformers writes it; the compiler's dots and TopK), all run here from models built for each
    (florence_jax.hardware), give the same beams and scores (float32 rounding: 1e-5). The parity tests
    above run the CPU's default path (florence_jax's CPU kernels for the weight products and the
    cross-attention) against transformers."""
    _, ours = gen_pair
    ids, pixels, mask = prompts
    generator = Generator(ours.for_hardware("cpu:decode_dots=eigen"))
    assert generator.decode_options
    enc = generator.encode(ids, pixels, mask)
    kw = dict(max_new_tokens=MAX_NEW, num_beams=3, no_repeat_ngram_size=3, early_stopping=True, **EARLY_EOS)
    accelerator = Generator(ours.for_hardware("cpu:beam_cross_attention=batched,beam_cache_copy=gather,"
                                              "lm_head_product=hidden_major,decode_dots=compiler,"
                                              "decode_attention=compiler,decode_top_k=compiler"))
    per_beam = Generator(ours.for_hardware("cpu:decode_attention=compiler"))
    assert ours.formulations.beam_cache_copy == "row_by_row"
    assert ours.formulations.decode_attention == "kernel"
    (a, sa), (b, sb), (c, sc) = (g.generate_from_encoder(enc, mask, return_scores=True, **kw)
                                 for g in (generator, accelerator, per_beam))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_allclose(sa, sb, atol=1e-5)
    np.testing.assert_allclose(sa, sc, atol=1e-5)


def test_the_cpu_decoding_program_has_its_lm_head_product_and_dot_kernels(gen_pair, prompts):
    """What the CPU formulations promise of the compiled decoding loop, read off XLA's optimized program:
    under ``lm_head_product=vocab_major`` a dot with the vocabulary as its rows survives compilation (XLA
    would otherwise fold the transpose back into ``hidden @ embedding.T``); under ``decode_dots=eigen``
    no dot is handed to YNNPACK (``__ynn_fusion``), while the compiler's program has such dots; and under
    the CPU's default, ``decode_dots=kernel``, every weight product of a step (8 per decoder layer and the
    LM head) is a call of florence_jax's CPU kernel and no dot reads the vocabulary; under
    ``decode_attention=kernel`` (the CPU's default) each layer's cross-attention is one call of the
    cross-attention kernel and its self-attention one of the cached-attention kernel, and under
    ``decode_attention=compiler`` neither is called; under ``decode_top_k=kernel`` (the CPU's default) the
    step's choice among beams x vocabulary is the top-k kernel's.
    The logits of the two LM-head products agree to float32 summation order (1e-5)."""
    import jax.numpy as jnp

    from florence_jax.generation import _decode, jit_with_options

    _, ours = gen_pair
    ids, pixels, mask = prompts
    vocab, rows = ours.config.text_config.vocab_size, len(PROMPT_LENGTHS) * 3
    layers = ours.config.text_config.decoder_layers

    def program(model):
        generator = Generator(model, max_new_tokens=4, num_beams=3)
        enc = generator.encode(ids, pixels, mask)
        static, controls = generator.resolve()
        fn = jit_with_options(_decode, (0, 1), generator.decode_options)
        return fn.lower(generator.graphdef, static, generator.state, enc, np.asarray(mask, np.int32),
                        controls).compile().as_text()

    eigen = program(ours.for_hardware("cpu:decode_dots=eigen"))
    compiler = program(ours.for_hardware("cpu:lm_head_product=hidden_major,decode_dots=compiler"))
    default = program(ours)
    assert ours.formulations.decode_dots == "kernel"
    assert f"f32[{vocab},{rows}]{{1,0}} dot(" in eigen
    assert f"f32[{vocab},{rows}]" not in compiler
    assert "__ynn_fusion" not in eigen and "__ynn_fusion" in compiler
    assert "florence_rows_product" not in eigen + compiler
    # 4 new tokens fit one cache segment: one decoding loop, whose body holds every call.
    assert default.count('custom_call_target="florence_rows_product"') == 8 * layers + 1
    assert f"f32[{vocab},{rows}]" not in default and f"f32[{rows},{vocab}]{{1,0}} dot(" not in default
    assert default.count('custom_call_target="florence_cross_attention"') == layers
    assert default.count('custom_call_target="florence_cached_attention"') == layers
    assert default.count('custom_call_target="florence_top_k"') == 1  # the row's best 2 x beams
    per_beam = program(ours.for_hardware("cpu:decode_attention=compiler"))
    assert "florence_cross_attention" not in per_beam and "florence_cached_attention" not in per_beam
    assert "florence_rows_product" in per_beam
    assert "florence_top_k" not in program(ours.for_hardware("cpu:decode_top_k=compiler"))

    hidden = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, ours.config.text_config.d_model)), jnp.float32)
    by_vocab = ours.for_hardware("cpu:lm_head_product=vocab_major").logits_from_hidden(hidden)
    by_rows = ours.for_hardware("cpu:lm_head_product=hidden_major").logits_from_hidden(hidden)
    assert by_vocab.shape == by_rows.shape == (2, 5, vocab)
    np.testing.assert_allclose(np.asarray(by_vocab), np.asarray(by_rows), rtol=1e-5, atol=1e-5)


def test_a_long_generation_grows_its_cache_and_matches_transformers(gen_pair, prompts):
    """Past ``hardware.CACHE_SEGMENT`` new tokens the CPU's loop grows its self-attention cache a segment at
    a time (``decode_cache=segments``), so a step attends over the written segments only. Greedy and beam
    search over two segments give transformers' tokens (and beam scores within float32 rounding, 1e-5), and
    the same tokens and scores as one preallocated cache: a grown cache only drops masked slots, whose
    softmax weight is exactly zero (1e-6 allows the compiler to order the sums over them differently). A
    generation that ends within the first segment gives the same too (the later loops run no step)."""
    from florence_jax import hardware
    from florence_jax.generation import _cache_sizes

    hf, ours = gen_pair
    new = 120  # the tiny model's 128 decoder positions, less the offset of 2 and the start token
    assert ours.formulations.decode_cache == "segments"
    assert _cache_sizes(new, ours.formulations) == (hardware.CACHE_SEGMENT, new)
    assert _cache_sizes(new, ours.for_hardware("cpu:decode_cache=preallocated").formulations) == (new,)
    whole = ours.for_hardware("cpu:decode_cache=preallocated")
    full = dict(max_new_tokens=new, min_new_tokens=new)
    early = dict(max_new_tokens=new, **EARLY_EOS)  # ends in the first segment: the later loops run no step
    for case in (dict(num_beams=1, **full), dict(num_beams=3, no_repeat_ngram_size=3, early_stopping=False, **full),
                 dict(num_beams=1, **early), dict(num_beams=3, early_stopping=True, **early)):
        kw = case
        ref, ref_scores = _reference(hf, prompts, **kw)
        if "min_new_tokens" in kw:
            assert ref.shape[1] == 1 + new
            _assert_diverse(ref)
        else:
            assert ref.shape[1] < 1 + hardware.CACHE_SEGMENT
        got, scores = generate(ours, *prompts, return_scores=True, **kw)
        np.testing.assert_array_equal(got, ref)
        got_whole, scores_whole = generate(whole, *prompts, return_scores=True, **kw)
        np.testing.assert_array_equal(got_whole, got)
        if case["num_beams"] > 1:
            np.testing.assert_allclose(scores, ref_scores, atol=1e-5, rtol=0)
            np.testing.assert_allclose(scores, scores_whole, atol=1e-6, rtol=0)
