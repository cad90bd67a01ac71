"""Greedy and beam-search generation that reproduces transformers' ``generate()`` token for token.

Design
------
*A generator owns the split model.* A :class:`Generator` splits the model once (``nnx.split``) and
keeps its ``GraphDef`` and state; it takes up a changed model only when told (:meth:`Generator.update`,
or assigning :attr:`Generator.state`), so what it generates with is always the split it holds and no
process-wide cache can serve an old one. Its options are one frozen :class:`GenerationOptions`, resolved
against the checkpoint's :class:`GenerationConfig` in one place (:meth:`GenerationOptions.resolve`).
:func:`generate` is one call of a generator made for it.

*One executable per (shapes, structural settings).* The generator calls a module-level ``jax.jit`` whose
static arguments are the ``GraphDef`` and a small frozen :class:`DecodeStatic` (total length, number of
beams, n-gram size, image layout). The parameters travel as a jit *argument*, so a fine-tuned or
reloaded model (or another generator of the same model) reuses the executable and no weights are baked
in as constants. Everything a user tunes per call without changing shapes (length penalty,
early-stopping mode, forced BOS/EOS, EOS/pad ids, min length, the suppressed-token mask) is a traced
:class:`DecodeControls` pytree, so sweeping those never recompiles.

*Encoder once, decoder incrementally.* Inside the executable the vision tower, projector and BART
encoder run once; each decoder layer's cross-attention keys/values are projected once
(``BartDecoder.cross_kv``); the decoder then runs one token per step against a preallocated
self-attention cache ``[LayerCache(key, value)] * layers`` of shape
``(batch * num_beams, heads, max_length - 1, head_dim)`` (heads-major, like the cross K/V, so no step
transposes them). Step ``t`` feeds the token at position ``t`` and writes that position's
keys/values; the mask hides positions not yet written. The last token is never fed back, hence
``max_length - 1`` slots.

*Why ``lax.while_loop``.* The number of steps is data dependent (every row hits EOS, or beam search's
early-stopping heuristic says no running beam can still win). A ``while_loop`` keeps the whole search
on the device with static shapes, stops as soon as transformers would, and compiles the decoder step
once instead of unrolling ``max_length`` copies of it. The Python loop transformers runs would cost a
host round trip per token.

*Beam bookkeeping (transformers 5.x vectorised ``_beam_search``, mirrored operation by operation).*
Per batch row we keep ``num_beams`` running hypotheses (token buffer, accumulated log-prob) and
``num_beams`` finished slots (token buffer, length-normalised score, finished bit, generated length).
Each step takes the top ``2 * num_beams`` of ``num_beams * vocab`` accumulated log-probs (twice the
beams so that at least ``num_beams`` candidates have not just emitted EOS), then

1. the next running beams are the top ``num_beams`` candidates after adding ``-1e9`` to those that
   hit a stopping criterion (EOS or max length);
2. candidates among the *first* ``num_beams`` that hit a criterion are scored
   ``sum_logprobs / generated_len ** length_penalty`` (``generated_len`` counts EOS but not the
   decoder start token) and merged with the finished slots by top-``num_beams``; ``-1e9`` penalties
   keep running candidates, full rows (``early_stopping=True``) and rows the heuristic closed out;
3. the surviving beams inherit their parents' self-attention caches (see below);
4. the early-stop heuristic compares the best running score, normalised by the current generated
   length (or by ``max_length - 1`` for ``early_stopping="never"`` with a positive penalty), with the
   worst finished score.

*Cache slots.* transformers gathers every layer's cache by the parents each step, a full copy of the
cache (on a 2-core CPU, a fifth of a step at 256 tokens). Here a beam's cache lives in a *slot* (a row
of the cache), and ``slot_of[b, j]`` says which slot holds rank-``j`` beam's. The decoder runs the slots
in slot order; the beam bookkeeping stays in rank order (ties break by rank, as in transformers), with
the hidden states permuted back before the LM head. After each selection, the first child of a parent
takes over the parent's slot without moving anything; each further child is copied into a slot whose
beam had no child (so sources and destinations never overlap). Only those rows are copied, in a
``while_loop`` as long as the number of copies, which is usually a small part of the cache. That is the
CPU's way with XLA's attention; on accelerators one gather of the whole cache is cheaper than a loop of
small copies, and the slots simply stay in rank order (``Formulations.beam_cache_copy``). With the CPU's
attention kernel (``Formulations.decode_attention="kernel"``, the CPU default) nothing is copied at all: each
row of its cache (``KernelLayerCache``) also holds the row each of its slots is read from, a step writes
every row's new slot in that row, and a fork copies the parent's row of sources (slot j of a row is written
once, at step j, so no later step overwrites what another hypothesis reads); the slots stay in rank order.

The loop ends when no row can improve, when every row is full under ``early_stopping=True``, or when
every candidate hit a stopping criterion (max length). Logits processors run in transformers' order
(no-repeat n-gram, min length, forced BOS, forced EOS, suppress tokens): on raw logits for greedy, on
log-softmax scores for beam search. Length-penalty denominators are computed on the host in double
precision and rounded to float32, exactly as PyTorch divides a float32 tensor by a Python float.

Outputs follow transformers' layout: ``decoder_start_token_id`` first, pad after EOS, cropped to the
longest returned sequence, so shape ``(batch, <= 1 + max_new_tokens)``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from types import EllipsisType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from florence_jax import cpu_kernels, hardware
from florence_jax.devices import to_host
from florence_jax.generation_config import GenerationConfig
from florence_jax.modeling.bart import KernelLayerCache, LayerCache

_NEG = -1.0e9  # transformers' "very large negative" beam score (exact in float32)
_DEFAULT_NEW_TOKENS = 20  # transformers' model-agnostic default when no length is set anywhere
_FROM_CONFIG: EllipsisType = ...  # sentinel: None would mean "disable" for forced_*/suppress_tokens


@dataclass(frozen=True)
class DecodeStatic:
    """Settings that change shapes or program structure: part of the compilation key."""

    max_length: int  # total decoder length, decoder_start token included (transformers' convention)
    num_beams: int
    no_repeat_ngram_size: int
    image_layout: str = "NCHW"


class DecodeControls(NamedTuple):
    """Per-call settings traced as arrays, so changing them does not recompile."""

    eos: jax.Array  # int32 scalar
    pad: jax.Array  # int32 scalar: what greedy writes after EOS
    fill: jax.Array  # int32 scalar: what beam search writes after EOS (pad, or EOS when pad is 0)
    start: jax.Array  # int32 scalar: decoder_start_token_id
    forced_bos: jax.Array  # int32 scalar, -1 = none
    forced_eos: jax.Array  # int32 scalar, -1 = none
    min_length: jax.Array  # int32 scalar: EOS is banned while the sequence is shorter
    suppress: jax.Array  # (vocab,) bool
    early_stop_true: jax.Array  # bool scalar: early_stopping is True
    finish_denom: jax.Array  # (max_length + 1,) f32: float32(n ** length_penalty), n = generated tokens
    heuristic_denom: jax.Array  # (max_length + 1,) f32 by current length, for the early-stop heuristic


class DecodeOutput(NamedTuple):
    """Device-side result of the decode loop (uncropped)."""

    sequences: jax.Array  # (batch, max_length) int32
    length: jax.Array  # int32 scalar: the transformers output length; crop sequences[:, :length]
    scores: jax.Array | None  # (batch,) f32 beam sequence scores; None for greedy


# ------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class GenerationOptions:
    """Everything a generation call may set, in one place; unset fields take the checkpoint's value.

    ``None`` means "the checkpoint's :class:`GenerationConfig` value". For ``forced_bos_token_id``,
    ``forced_eos_token_id`` and ``suppress_tokens`` None means "none", so "the checkpoint's" is the default
    ``...`` instead. :meth:`resolve` merges these over a generation config the way transformers does.
    Length: ``max_new_tokens`` wins over ``max_length``; ``max_length`` counts the decoder start token (so
    ``max_length=L`` yields at most ``L - 1`` new tokens). With neither set anywhere, transformers generates
    its default 20 new tokens. ``image_layout`` is the pixels' layout (``"NCHW"`` or ``"NHWC"``).
    """

    max_new_tokens: int | None = None
    max_length: int | None = None
    min_length: int | None = None
    min_new_tokens: int | None = None
    num_beams: int | None = None
    no_repeat_ngram_size: int | None = None
    early_stopping: bool | str | None = None
    length_penalty: float | None = None
    forced_bos_token_id: int | None | EllipsisType = _FROM_CONFIG
    forced_eos_token_id: int | None | EllipsisType = _FROM_CONFIG
    suppress_tokens: tuple[int, ...] | None | EllipsisType = _FROM_CONFIG
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    decoder_start_token_id: int | None = None
    image_layout: str = "NCHW"

    def __post_init__(self):
        if self.suppress_tokens not in (None, _FROM_CONFIG):  # any iterable of ids, kept hashable
            object.__setattr__(self, "suppress_tokens", tuple(int(t) for t in self.suppress_tokens))

    def replace(self, **changes: Any) -> GenerationOptions:
        """A copy with ``changes``; a name that is not an option is a ``TypeError``."""
        return dataclasses.replace(self, **changes) if changes else self

    def resolve(self, gc: GenerationConfig, text_config) -> tuple[DecodeStatic, DecodeControls]:
        """The compiled (:class:`DecodeStatic`) and traced (:class:`DecodeControls`) settings of a call on a
        model whose text config is ``text_config`` and whose generation config is ``gc``."""
        max_new_tokens, max_length = self.max_new_tokens, self.max_length
        if max_new_tokens is None and max_length is None:
            max_new_tokens = gc.max_new_tokens
            if max_new_tokens is None:
                if gc.max_length is None:
                    max_new_tokens = _DEFAULT_NEW_TOKENS
                else:
                    max_length = gc.max_length
        if max_new_tokens is not None:
            if max_new_tokens <= 0:
                raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
            total = 1 + int(max_new_tokens)
        else:
            total = int(max_length)
        if total < 2:
            raise ValueError(f"max_length={total} leaves no room after the decoder start token")
        max_positions = text_config.max_position_embeddings
        if total - 1 > max_positions:
            raise ValueError(f"generation needs {total - 1} decoder positions; the model has {max_positions}")

        num_beams = int(gc.num_beams if self.num_beams is None else self.num_beams)
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        ngram = int(gc.no_repeat_ngram_size if self.no_repeat_ngram_size is None else self.no_repeat_ngram_size)
        early_stopping = gc.early_stopping if self.early_stopping is None else self.early_stopping
        if isinstance(early_stopping, str):
            if early_stopping != "never":
                raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
        else:
            early_stopping = bool(early_stopping)
        length_penalty = gc.length_penalty if self.length_penalty is None else self.length_penalty

        def or_config(value, config_value):
            return config_value if value is _FROM_CONFIG else value

        forced_bos = or_config(self.forced_bos_token_id, gc.forced_bos_token_id)
        forced_eos = or_config(self.forced_eos_token_id, gc.forced_eos_token_id)
        suppress = or_config(self.suppress_tokens, gc.suppress_tokens) or ()
        eos = gc.eos_token_id if self.eos_token_id is None else self.eos_token_id
        pad = gc.pad_token_id if self.pad_token_id is None else self.pad_token_id
        pad = eos if pad is None else pad  # transformers falls back to EOS (with a warning)
        start = gc.decoder_start_token_id if self.decoder_start_token_id is None else self.decoder_start_token_id
        min_len = max(int(self.min_length or 0), 1 + int(self.min_new_tokens) if self.min_new_tokens else 0)

        vocab = text_config.vocab_size
        mask = np.zeros((vocab,), bool)
        mask[[t for t in suppress if 0 <= t < vocab]] = True

        def denominators(lengths: list[int]) -> np.ndarray:
            # Python's int ** float in double, rounded to float32: what ``tensor / python_float`` divides by.
            return np.asarray([float(n**length_penalty) if n > 0 else 1.0 for n in lengths], np.float32)

        finish = denominators(list(range(total + 1)))
        if early_stopping == "never" and length_penalty > 0.0:
            heuristic = denominators([total - 1] * (total + 1))
        else:
            heuristic = denominators([max(n - 1, 0) for n in range(total + 1)])

        i32 = np.int32
        controls = DecodeControls(
            eos=i32(eos), pad=i32(pad), fill=i32(pad if pad else eos), start=i32(start),
            forced_bos=i32(-1 if forced_bos is None else forced_bos),
            forced_eos=i32(-1 if forced_eos is None else forced_eos),
            min_length=i32(min_len), suppress=mask, early_stop_true=np.bool_(early_stopping is True),
            finish_denom=finish, heuristic_denom=heuristic,
        )
        return DecodeStatic(total, num_beams, ngram, self.image_layout), controls


# ------------------------------------------------------------------------------------------ processors
def _ban_repeated_ngrams(scores: jax.Array, ids: jax.Array, cur_len: jax.Array, n: int) -> jax.Array:
    """``NoRepeatNGramLogitsProcessor`` on a static buffer whose first ``cur_len`` columns are valid.

    The next token would complete an n-gram starting with the current (n-1)-token suffix; every earlier
    window whose first n-1 tokens equal that suffix bans its last token. Windows must lie entirely
    inside the valid prefix, so the suffix's own window (one token short) never bans anything.
    """
    rows, length = ids.shape
    vocab = scores.shape[-1]
    num_windows = length - n + 1
    if num_windows <= 0:
        return scores
    windows = jnp.stack([ids[:, j:j + num_windows] for j in range(n)], axis=-1)  # (rows, W, n)
    prefix = jax.lax.dynamic_slice_in_dim(ids, jnp.maximum(cur_len + 1 - n, 0), n - 1, axis=1)
    valid = jnp.arange(num_windows) + n <= cur_len
    matches = jnp.all(windows[..., :-1] == prefix[:, None, :], axis=-1) & valid[None, :]
    target = jnp.where(matches, jnp.clip(windows[..., -1], 0, vocab), vocab)  # spare column: no ban
    banned = jnp.zeros((rows, vocab + 1), bool).at[jnp.arange(rows)[:, None], target].set(True)
    return jnp.where(banned[:, :vocab], -jnp.inf, scores)


def _process(scores: jax.Array, ids: jax.Array, cur_len: jax.Array, c: DecodeControls,
             s: DecodeStatic) -> jax.Array:
    """transformers' logits-processor list, in its order, for a ``(rows, vocab)`` float32 score matrix."""
    vocab_ids = jnp.arange(scores.shape[-1])
    if s.no_repeat_ngram_size > 0:
        scores = _ban_repeated_ngrams(scores, ids, cur_len, s.no_repeat_ngram_size)
    scores = jnp.where((cur_len < c.min_length) & (vocab_ids == c.eos)[None], -jnp.inf, scores)

    def forced(token):  # every score -inf except the forced token's 0
        return jnp.where(vocab_ids == token, 0.0, -jnp.inf).astype(scores.dtype)[None]

    scores = jnp.where((c.forced_bos >= 0) & (cur_len == 1), forced(c.forced_bos), scores)
    scores = jnp.where((c.forced_eos >= 0) & (cur_len == s.max_length - 1), forced(c.forced_eos), scores)
    return jnp.where(c.suppress[None], -jnp.inf, scores)


# ------------------------------------------------------------------------------------------ decoding
def _step_logits(model, tokens: jax.Array, index: jax.Array, cross_kv, cross_mask, cache, slot_of=None):
    """One decoder step for ``tokens`` of shape (rows,) at position ``index``; float32 logits.

    With ``slot_of`` (beam search's ``(batch, beams)`` cache slots, see "Cache slots"), ``tokens`` and the
    logits are in rank order and the decoder runs its cache rows in slot order.
    """
    lm = model.model.language_model
    if slot_of is not None:
        batch, nb = slot_of.shape
        in_slot = jnp.argsort(slot_of, axis=1).astype(jnp.int32)  # the beam rank occupying each slot
        tokens = _gather(tokens.reshape(batch, nb), in_slot).reshape(-1)
    h, cache = lm.decoder(lm.embed(tokens[:, None]), None, cross_mask, cross_kv=cross_kv, cache=cache,
                          index=index)
    if slot_of is not None:
        h = _gather(h.reshape(batch, nb, -1), slot_of).reshape(batch * nb, 1, -1)  # back to rank order
    return model.logits_from_hidden(h)[:, 0].astype(jnp.float32), cache


def _greedy(model, enc: jax.Array, enc_mask: jax.Array | None, c: DecodeControls,
            s: DecodeStatic) -> DecodeOutput:
    batch, total = enc.shape[0], s.max_length
    decoder = model.model.language_model.decoder
    cross_kv = decoder.step_cross_kv(enc, enc_mask)
    seq = jnp.full((batch, total), c.pad, jnp.int32).at[:, 0].set(c.start)
    sizes = _cache_sizes(total - 1, model.formulations)
    carry = (jnp.int32(1), seq, jnp.ones((batch,), bool),
             decoder.init_cache(batch, sizes[0], model.config.dtype))

    def cond(carry):
        cur_len, _, unfinished, _ = carry
        return (cur_len < total) & jnp.any(unfinished)

    def body(carry):
        cur_len, seq, unfinished, cache = carry
        tokens = jax.lax.dynamic_index_in_dim(seq, cur_len - 1, axis=1, keepdims=False)
        logits, cache = _step_logits(model, tokens, cur_len - 1, cross_kv, enc_mask, cache)
        nxt = jnp.argmax(_process(logits, seq, cur_len, c, s), axis=-1).astype(jnp.int32)
        nxt = jnp.where(unfinished, nxt, c.pad)  # finished rows are padded
        seq = jax.lax.dynamic_update_index_in_dim(seq, nxt, cur_len, axis=1)
        unfinished = unfinished & (nxt != c.eos) & (cur_len + 1 < total)
        return cur_len + 1, seq, unfinished, cache

    carry = _segmented_while(
        sizes, cond, body, carry, cur_len=lambda cr: cr[0],
        grow=lambda cr, size: (*cr[:3], _grow_cache(cr[3], size)))
    cur_len, seq, _, _ = carry
    return DecodeOutput(seq, cur_len, None)


def _segmented_while(sizes: tuple[int, ...], cond, body, state, *, cur_len, grow):
    """``lax.while_loop(cond, body, state)`` run as one loop per cache size in ``sizes``
    (:func:`_cache_sizes`): the loop for ``size`` stops once the next step would write past it
    (the step at ``cur_len(state)`` writes cache slot ``cur_len - 1``), and ``grow(state, size)``
    pads the state's cache to the next size between loops, never inside a step."""
    for i, size in enumerate(sizes):
        if i:
            state = grow(state, size)
        state = jax.lax.while_loop(lambda st, _size=size: cond(st) & (cur_len(st) <= _size), body, state)
    return state


def _cache_sizes(slots: int, f: hardware.Formulations) -> tuple[int, ...]:
    """The self-attention cache's size in each of the decoding loop's segments (Formulations.decode_cache):
    ``slots`` whole, or grown ``hardware.CACHE_SEGMENT`` slots at a time up to ``slots``."""
    if f.decode_cache != "segments" or slots <= hardware.CACHE_SEGMENT:
        return (slots,)
    return (*range(hardware.CACHE_SEGMENT, slots, hardware.CACHE_SEGMENT), slots)


def _grow_cache(cache: list[LayerCache], size: int) -> list[LayerCache]:
    """The cache with unwritten (zero) slots appended up to ``size``; the step's mask hides them."""
    return [lc.grown(size) for lc in cache]


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
    """``x[b, idx[b, j], ...]``: transformers' ``_gather_beams``."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _inherit_slots(cache: list[LayerCache], slot_of: jax.Array, parent: jax.Array,
                   row_offset: jax.Array) -> tuple[list[LayerCache], jax.Array]:
    """New ``slot_of`` for the beams whose parents (ranks) are ``parent``, copying only the cache rows of
    second and later children of a parent, into slots whose beams left no child."""
    batch, nb = parent.shape
    parent_slot = _gather(slot_of, parent)
    earlier = jnp.tril(jnp.ones((nb, nb), bool), -1)  # [j, i]: i < j
    first = ~jnp.any((parent[:, :, None] == parent[:, None, :]) & earlier[None], axis=2)
    kept = jnp.any((parent_slot[:, :, None] == jnp.arange(nb)[None, None, :]) & first[:, :, None], axis=1)
    free = jnp.argsort(kept, axis=1, stable=True).astype(jnp.int32)  # slots left without a beam come first
    nth_copy = jnp.clip(jnp.cumsum(~first, axis=1) - 1, 0, nb - 1)
    new_slot = jnp.where(first, parent_slot, jnp.take_along_axis(free, nth_copy, axis=1))

    copy = (~first).reshape(-1)
    order = jnp.argsort(~copy, stable=True)  # the rows to copy first
    src = (parent_slot + row_offset).reshape(-1)[order]
    dst = (new_slot + row_offset).reshape(-1)[order]

    def copy_row(i, cache):
        def move(x):
            return jax.lax.dynamic_update_index_in_dim(x, jax.lax.dynamic_index_in_dim(x, src[i], 0), dst[i], 0)

        return [LayerCache(move(lc.key), move(lc.value)) for lc in cache]

    cache = jax.lax.fori_loop(0, jnp.sum(copy), copy_row, cache)
    return cache, new_slot


class _BeamState(NamedTuple):
    cur_len: jax.Array  # int32: tokens in every running sequence (decoder start included)
    running: jax.Array  # (B, nb, L) running token buffers
    running_scores: jax.Array  # (B, nb) accumulated log-probs
    sequences: jax.Array  # (B, nb, L) finished hypotheses (placeholders until filled)
    scores: jax.Array  # (B, nb) length-normalised scores of the finished slots
    finished: jax.Array  # (B, nb) bool: slot holds a finished hypothesis
    lengths: jax.Array  # (B, nb) int32: generated tokens of the slot's hypothesis (0 = placeholder)
    unsatisfied: jax.Array  # (B, 1) bool: early-stop heuristic says the row can still improve
    cache: list[LayerCache]  # (B * nb, ...) in slot order
    slot_of: jax.Array  # (B, nb) int32: the cache slot of each running beam (a permutation per row)
    done: jax.Array  # bool


def _beam_search(model, enc: jax.Array, enc_mask: jax.Array | None, c: DecodeControls,
                 s: DecodeStatic) -> DecodeOutput:
    batch, nb, total = enc.shape[0], s.num_beams, s.max_length
    k = 2 * nb  # max(2, 1 + number of EOS ids) * num_beams with one EOS id
    decoder = model.model.language_model.decoder
    # Beams of a row share the encoder output: its cross K/V are projected once and never repeated per beam
    # (transformers repeats the encoder output num_beams times); cross-attention groups each row's beam
    # queries against them, which reads num_beams times less memory per step.
    cross_kv = decoder.step_cross_kv(enc, enc_mask)
    cross_mask = enc_mask
    top_mask = jnp.arange(k) < nb
    row_offset = jnp.arange(batch, dtype=jnp.int32)[:, None] * nb

    buf = jnp.full((batch, nb, total), c.fill, jnp.int32).at[:, :, 0].set(c.start)
    sizes = _cache_sizes(total - 1, model.formulations)
    state = _BeamState(
        cur_len=jnp.int32(1), running=buf,
        running_scores=jnp.zeros((batch, nb), jnp.float32).at[:, 1:].set(_NEG),  # only beam 0 is live
        sequences=buf, scores=jnp.full((batch, nb), _NEG, jnp.float32),
        finished=jnp.zeros((batch, nb), bool), lengths=jnp.zeros((batch, nb), jnp.int32),
        unsatisfied=jnp.ones((batch, 1), bool),
        cache=decoder.init_cache(batch * nb, sizes[0], model.config.dtype),
        slot_of=jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32), (batch, nb)), done=jnp.bool_(False),
    )
    # Copying only the cache rows of extra children saves the CPU most of a step's cache traffic; on an
    # accelerator a loop of small copies costs a kernel launch (and, on a GPU, a host round trip for the
    # loop condition) per row, more than one gather of the whole cache at its memory bandwidth, so there
    # the cache is gathered as transformers does (Formulations.beam_cache_copy). With the gather, slot_of
    # stays the identity and nothing is permuted.
    # The CPU kernel's cache (KernelLayerCache) reorders a row by its slot sources alone: nothing to save.
    row_by_row = (model.formulations.beam_cache_copy == "row_by_row"
                  and not isinstance(state.cache[0], KernelLayerCache))
    f = model.formulations
    top_k_kernel = (f.platform == "cpu" and f.decode_top_k == "kernel" and cpu_kernels.available()
                    and cpu_kernels.top_k_supported(k))

    def body(st: _BeamState) -> _BeamState:
        cur_len = st.cur_len
        flat = st.running.reshape(batch * nb, total)
        tokens = jax.lax.dynamic_index_in_dim(flat, cur_len - 1, axis=1, keepdims=False)
        logits, cache = _step_logits(model, tokens, cur_len - 1, cross_kv, cross_mask, st.cache,
                                     st.slot_of if row_by_row else None)
        log_probs = _process(jax.nn.log_softmax(logits, axis=-1), flat, cur_len, c, s)
        vocab = log_probs.shape[-1]
        acc = (log_probs.reshape(batch, nb, vocab) + st.running_scores[:, :, None]).reshape(batch, nb * vocab)

        # Top 2*nb continuations over all beams of a row.
        topk_lp, topk_idx = cpu_kernels.top_k(acc, k) if top_k_kernel else jax.lax.top_k(acc, k)
        parent = (topk_idx // vocab).astype(jnp.int32)
        token = (topk_idx % vocab).astype(jnp.int32)
        topk_seqs = jax.lax.dynamic_update_index_in_dim(_gather(st.running, parent), token, cur_len, axis=2)
        hits = (token == c.eos) | (cur_len + 1 >= total)  # EOS or max-length stopping criteria

        # Running beams for the next step: the best nb candidates that did not stop.
        topk_running_lp = topk_lp + hits.astype(jnp.float32) * _NEG
        _, keep = jax.lax.top_k(topk_running_lp, nb)
        running = _gather(topk_seqs, keep)
        running_scores = _gather(topk_running_lp, keep)
        running_parent = _gather(parent, keep)

        # Finished hypotheses: only the first nb candidates may enter, with the length penalty.
        just_finished = hits & top_mask[None]
        fin = topk_lp / c.finish_denom[cur_len]  # generated length = cur_len + 1 - decoder prompt (1)
        full = jnp.all(st.finished, axis=-1, keepdims=True) & c.early_stop_true
        fin = fin + full.astype(jnp.float32) * _NEG
        fin = fin + (~st.unsatisfied).astype(jnp.float32) * _NEG
        fin = fin + (~just_finished).astype(jnp.float32) * _NEG
        merged_scores = jnp.concatenate([st.scores, fin], axis=1)
        _, sel = jax.lax.top_k(merged_scores, nb)
        sequences = _gather(jnp.concatenate([st.sequences, topk_seqs], axis=1), sel)
        scores = _gather(merged_scores, sel)
        finished = _gather(jnp.concatenate([st.finished, just_finished], axis=1), sel)
        lengths = _gather(jnp.concatenate([st.lengths, jnp.broadcast_to(cur_len, (batch, k))], axis=1), sel)

        # The surviving beams inherit their parents' caches (see "Cache slots" above).
        if row_by_row:
            cache, slot_of = _inherit_slots(cache, st.slot_of, running_parent, row_offset)
        else:  # one gather of every row by its parent; the slots stay in rank order
            rows = (running_parent + row_offset).reshape(-1)
            cache = [lc.reordered(rows) for lc in cache]
            slot_of = st.slot_of

        cur_len = cur_len + 1
        best_running = running_scores[:, :1] / c.heuristic_denom[cur_len]
        worst_finished = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), _NEG)
        unsatisfied = st.unsatisfied & jnp.any(best_running > worst_finished, axis=-1, keepdims=True)
        can_improve = jnp.any(unsatisfied)
        open_beam = ~(jnp.all(finished) & c.early_stop_true)
        can_continue = ~jnp.all(hits)
        done = ~(can_improve & open_beam & can_continue) | (cur_len >= total)
        return _BeamState(cur_len, running, running_scores, sequences, scores, finished, lengths, unsatisfied,
                          cache, slot_of, done)

    st = _segmented_while(
        sizes, lambda st: ~st.done, body, state, cur_len=lambda st: st.cur_len,
        grow=lambda st, size: st._replace(cache=_grow_cache(st.cache, size)))
    length = 1 + jnp.max(st.lengths[:, 0])
    return DecodeOutput(st.sequences[:, 0], length.astype(jnp.int32), st.scores[:, 0])


def _kernel_weights(model) -> dict[Any, jax.Array]:
    """Under ``Formulations.decode_dots="kernel"`` on the CPU: every weight matrix a decoding step multiplies
    a few rows by (the decoder's projections and MLPs, the tied LM head), by the module that owns it, for
    :func:`florence_jax.cpu_kernels.decode_products`. Empty otherwise, and for modules that compute in
    another dtype or carry an adapter (LoRA layers run their own product)."""
    f = model.formulations
    if f.platform != "cpu" or f.decode_dots != "kernel" or not cpu_kernels.available():
        return {}
    lm = model.model.language_model
    weights = {m: m.kernel[...] for m in lm.decoder.step_linears()
               if type(m) is nnx.Linear and m.dtype in (None, jnp.float32)}
    if lm.shared.dtype in (None, jnp.float32):
        weights[lm.shared] = lm.shared.embedding[...].T
    return weights


def decode_loop(model, enc, enc_mask, controls: DecodeControls, static: DecodeStatic) -> DecodeOutput:
    """The decoding loop (greedy or beam search) from encoder outputs, traced inside the caller's program:
    what every jitted generation program here runs after the encoder. For programs built elsewhere (the
    labeller runs it per device under ``shard_map``); ``controls`` and ``static`` from :meth:`Generator.resolve`."""
    with cpu_kernels.decode_products(_kernel_weights(model)):
        if static.num_beams == 1:
            return _greedy(model, enc, enc_mask, controls, static)
        return _beam_search(model, enc, enc_mask, controls, static)



def merge_for_inference(graphdef, state):
    """A copy of the model in inference mode: generation never applies dropout (the caller's model
    keeps whatever mode it is in)."""
    model = nnx.merge(graphdef, state)
    model.eval()
    return model



def _generate(graphdef, static: DecodeStatic, state, input_ids, pixel_values, attention_mask,
              controls: DecodeControls) -> DecodeOutput:
    model = merge_for_inference(graphdef, state)
    enc = model.encode(input_ids, pixel_values, attention_mask, image_layout=static.image_layout)
    return decode_loop(model, enc, attention_mask, controls, static)


def _decode(graphdef, static: DecodeStatic, state, encoder_hidden_states, attention_mask,
            controls: DecodeControls) -> DecodeOutput:
    model = merge_for_inference(graphdef, state)
    return decode_loop(model, encoder_hidden_states, attention_mask, controls, static)


@functools.cache
def jit_with_options(fn: Callable, static_argnums: tuple[int, ...],
                     options: tuple[tuple[str, str], ...] = ()) -> Callable:
    """``jax.jit(fn)`` compiled with these compiler options (``hardware.decode_compiler_options``): one jit
    object per (function, options), so each keeps its own cache of executables."""
    return jax.jit(fn, static_argnums=static_argnums, compiler_options=dict(options) or None)


_generate_jit = jit_with_options(_generate, (0, 1))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _encode_jit(graphdef, image_layout: str, state, input_ids, pixel_values, attention_mask) -> jax.Array:
    model = merge_for_inference(graphdef, state)
    return model.encode(input_ids, pixel_values, attention_mask, image_layout=image_layout)


# ------------------------------------------------------------------------------------------ public API
def _ids(x) -> np.ndarray | jax.Array:
    return x.astype(jnp.int32) if isinstance(x, jax.Array) else np.asarray(x, np.int32)


def _mask(attention_mask) -> np.ndarray | jax.Array | None:
    return None if attention_mask is None else _ids(attention_mask)


def _detached(state: nnx.State) -> nnx.State:
    """The same arrays in variables of their own. ``nnx.split`` returns the model's own variable objects, so
    ``nnx.update(model, ...)`` would change a kept split behind the generator's back; new variables holding
    the current arrays (no device copy) keep what the generator was given."""
    return jax.tree.map(lambda x: x, state)


def _finish(out: DecodeOutput, return_scores: bool):
    length = int(to_host(out.length))
    sequences = to_host(out.sequences)[:, :length]
    if not return_scores:
        return sequences
    return sequences, None if out.scores is None else to_host(out.scores)


class Generator:
    """Generation for one model: its graph definition and state, split once, with default options.

    ``Generator(model, num_beams=3)`` splits ``model`` (``nnx.split`` walks the whole module graph, a large
    share of a short generation on an accelerator; docs/architecture.md) and keeps the split: the graph and the arrays the model holds at that moment. Every call then runs on
    them, whatever happens to ``model`` afterwards (new values or new structure): a changed model is taken
    up by :meth:`update`, new values for the same variables by assigning :attr:`state`. Kept arrays stay
    alive while the generator does, so a loop that changes the model between uses (training) makes a
    generator per use rather than keeping one. Nothing is cached outside the object; the compiled programs
    are shared by every generator (keyed by graph definition, shapes and :class:`DecodeStatic`).

    Options given at construction (a :class:`GenerationOptions` and/or its fields as keywords) are the
    defaults of every call; a call's keywords override them for that call. Either way a name that is not a
    field of :class:`GenerationOptions` is a ``TypeError``.
    """

    def __init__(self, model, options: GenerationOptions | None = None, **overrides: Any):
        self.options = (options or GenerationOptions()).replace(**overrides)
        self.update(model)

    def update(self, model) -> None:
        """Take ``model`` as it is now: its graph definition, state, config and generation config."""
        self._graphdef, state = nnx.split(model)
        self._state = _detached(state)
        self._decode_options = hardware.decode_compiler_options(model.formulations)
        gc = getattr(model, "generation_config", None)
        self.generation_config = gc if gc is not None else GenerationConfig.from_model_config(model.config)
        self.text_config = model.config.text_config

    @property
    def decode_options(self) -> tuple[tuple[str, str], ...]:
        """The compiler options of programs that run the decoding loop for this model
        (:func:`florence_jax.hardware.decode_compiler_options`; empty for the compiler's defaults)."""
        return self._decode_options

    @property
    def graphdef(self) -> nnx.GraphDef:
        """The graph definition of the split model (static in every program)."""
        return self._graphdef

    @property
    def state(self) -> nnx.State:
        """The parameters (and other variables) generation runs with."""
        return self._state

    @state.setter
    def state(self, state: nnx.State) -> None:
        """Swap in new values for the same variables (same tree, shapes and dtypes), e.g. trained parameters;
        a model whose structure changed is taken up by :meth:`update` instead."""
        if jax.tree.structure(state) != jax.tree.structure(self._state):
            raise ValueError("the new state's variables are not the generator's: use update(model) for a "
                             "model whose structure changed")

        def kind(x):
            return jnp.shape(x), getattr(x, "dtype", type(x))

        for (path, new), old in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(self._state)):
            if kind(new) != kind(old):
                raise ValueError(f"{jax.tree_util.keystr(path)}: the new state's (shape, dtype) is {kind(new)} "
                                 f"where the generator's is {kind(old)}")
        self._state = _detached(state)

    def resolve(self, **options: Any) -> tuple[DecodeStatic, DecodeControls]:
        """The settings of a call with ``options`` over the generator's, resolved against the generation
        config."""
        return self.options.replace(**options).resolve(self.generation_config, self.text_config)

    def __call__(self, input_ids, pixel_values=None, attention_mask=None, *, return_scores: bool = False,
                 **options: Any) -> np.ndarray | tuple[np.ndarray, np.ndarray | None]:
        """Greedy (``num_beams=1``) or beam search, matching transformers' ``generate()`` token for token.

        Prompts may be right-padded; pass their ``attention_mask`` (without one the encoder attends to
        every position, as transformers does). Returns int32 ``(batch, <= 1 + max_new_tokens)`` sequences
        starting with the decoder start token, pad after EOS; with ``return_scores`` also the beam
        ``sequences_scores`` (None for greedy, which transformers does not score). Compiled once per
        (input shapes, ``DecodeStatic``); see the module docstring.
        """
        static, controls = self.resolve(**options)
        ids, mask = _ids(input_ids), _mask(attention_mask)
        if self._decode_options:  # the loop compiles differently from the encoder: two programs
            enc = _encode_jit(self._graphdef, static.image_layout, self._state, ids, pixel_values, mask)
            out = jit_with_options(_decode, (0, 1), self._decode_options)(self._graphdef, static, self._state, enc,
                                                                          mask, controls)
        else:
            out = _generate_jit(self._graphdef, static, self._state, ids, pixel_values, mask, controls)
        return _finish(out, return_scores)

    def encode(self, input_ids, pixel_values=None, attention_mask=None, *,
               image_layout: str | None = None) -> jax.Array:
        """Vision tower + projector + encoder under jit: the input of :meth:`generate_from_encoder`."""
        layout = self.options.image_layout if image_layout is None else image_layout
        return _encode_jit(self._graphdef, layout, self._state, _ids(input_ids), pixel_values,
                           _mask(attention_mask))

    def generate_from_encoder(self, encoder_hidden_states, attention_mask=None, *, return_scores: bool = False,
                              **options: Any) -> np.ndarray | tuple[np.ndarray, np.ndarray | None]:
        """:meth:`__call__` from precomputed encoder outputs (same options), decoder loop only."""
        return _finish(self.decode_fn(**options)(encoder_hidden_states, attention_mask), return_scores)

    def decode_fn(self, **options: Any) -> Callable[..., DecodeOutput]:
        """The jitted decode loop bound to the current state and these options, for benchmarking.

        ``fn(encoder_hidden_states, attention_mask=None)`` returns a :class:`DecodeOutput` of device arrays
        without a host sync (call ``jax.block_until_ready`` on it to time the decoder alone).
        """
        static, controls = self.resolve(**options)
        graphdef, state = self._graphdef, self._state
        program = jit_with_options(_decode, (0, 1), self._decode_options)

        def fn(encoder_hidden_states, attention_mask=None) -> DecodeOutput:
            return program(graphdef, static, state, encoder_hidden_states, _mask(attention_mask), controls)

        return fn


def generate(model, input_ids, pixel_values=None, attention_mask=None, *, return_scores: bool = False,
             **options: Any) -> np.ndarray | tuple[np.ndarray, np.ndarray | None]:
    """One call of a :class:`Generator` made for it: ``Generator(model)(input_ids, ..., **options)``.

    Unset options come from ``model.generation_config``. Loops over batches make one :class:`Generator`
    instead, which splits the model once.
    """
    return Generator(model)(input_ids, pixel_values, attention_mask, return_scores=return_scores, **options)
