"""New tokens (e.g. a task token ``<MY_TASK>``): tokenizer entries and embedding rows for them.

``add_tokens`` adds the strings to the tokenizer; ``resize_for_tokens`` gives the model a row for each new
id. The shared embedding (which is also the tied LM head) grows when an id falls beyond it, to a multiple
of 64; the rows of the new tokens, and any rows added as padding, start at the mean of the rows of the
tokens that existed before. Existing rows are untouched, so the logits of existing tokens do not change.

A new token's logit is then the mean of the existing tokens' logits, below their maximum, so greedy
decoding never emits it before training. Rows at or above the tokenizer's length (padding) go to
``generation_config.suppress_tokens``, the mechanism already used for the original checkpoint layout,
which transformers honours after export too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

PAD_MULTIPLE = 64


def add_tokens(tokenizer, tokens: Sequence[str]) -> list[int]:
    """Add ``tokens`` (as special tokens: never split, skipped when decoding with
    ``skip_special_tokens``) to ``tokenizer``; returns their ids. Tokens already present keep their id."""
    tokens = list(tokens)
    for t in tokens:
        if not t or t != t.strip():
            raise ValueError(f"bad token {t!r}: a new token must be non-empty without surrounding spaces")
    tokenizer.add_tokens(tokens, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    unk = getattr(tokenizer, "unk_token_id", None)
    if any(i is None or i == unk for i in ids):
        raise ValueError(f"the tokenizer did not take the tokens {tokens}: got ids {ids}")
    return list(ids)


def resize_for_tokens(model, new_ids: Sequence[int], num_tokens: int, *, sharding_fn=None):
    """Return ``model`` with rows for ``new_ids`` (a new model when the vocabulary grows).

    ``num_tokens`` is the tokenizer's length after adding; ids at or above it are suppressed in generation.
    ``sharding_fn(path, shape)`` places a grown embedding (default: the old one's sharding when it fits).
    """
    from florence_jax.weights.common import to_numpy as _to_numpy

    new_ids = sorted(set(int(i) for i in new_ids))
    if not new_ids:
        return model
    cfg = model.config
    shared = model.model.language_model.shared
    old = _to_numpy(shared.embedding.get_value())
    old_vocab = old.shape[0]
    first_new = new_ids[0]
    need = max(new_ids[-1] + 1, num_tokens)
    vocab = old_vocab if need <= old_vocab else -(-need // PAD_MULTIPLE) * PAD_MULTIPLE
    mean = old[:first_new].astype(np.float32).mean(axis=0).astype(old.dtype)
    table = np.concatenate([old, np.repeat(mean[None], vocab - old_vocab, axis=0)], axis=0)
    table[new_ids] = mean

    gen = getattr(model, "generation_config", None)
    if gen is None:
        from florence_jax.generation_config import GenerationConfig

        gen = GenerationConfig.from_model_config(cfg)
    suppress = (set(gen.suppress_tokens) - set(new_ids)) | set(range(num_tokens, vocab))
    gen = dataclasses.replace(gen, suppress_tokens=tuple(sorted(suppress)))

    path = "model.language_model.shared.embedding"
    if sharding_fn is not None:
        sharding = sharding_fn(path, table.shape)
    elif vocab == old_vocab:
        sharding = shared.embedding.get_value().sharding
    else:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    value = jax.make_array_from_callback(table.shape, sharding, lambda idx: table[idx])
    new_cfg = cfg.replace(text_config=dataclasses.replace(cfg.text_config, vocab_size=vocab),
                          num_real_tokens=num_tokens)
    if vocab == old_vocab:
        shared.embedding.set_value(value)
        model.config = new_cfg
        model.generation_config = gen
        return model
    cls = type(model)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: cls(new_cfg, rngs=nnx.Rngs(0))))
    _, state = nnx.split(model)
    state["model"]["language_model"]["shared"]["embedding"].set_value(value)
    new = nnx.merge(graphdef, state)
    new.generation_config = gen
    if hasattr(model, "name_or_path"):
        new.name_or_path = model.name_or_path
    return new
