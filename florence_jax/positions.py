"""More learned positions than a checkpoint has: BART's position tables grown for long prompts and targets.

Florence-2's BART learns one position embedding per position, in the encoder (image tokens + prompt) and in the
decoder (the target), both sized by the text config's one ``max_position_embeddings`` (1,024 for every base
checkpoint). Nothing else in the model depends on the length: the tables are ordinary parameters, so a model
with more rows runs, trains, generates and exports like any other (config.json carries the new
``max_position_embeddings``).

:func:`grow_position_table` appends rows to a table; :func:`grow_positions` does it to a built model, and
``Florence2ForConditionalGeneration.from_pretrained(..., max_positions=N)`` (``config.model.max_positions`` in
training) does it at load time, straight into the parameters' sharding. Both tables grow to the same size,
since config.json can only say one. The rows a checkpoint has are kept bit for bit, so every output on
sequences that fit the old tables is identical to the original model's; only the new rows are made up, by one
of :data:`POSITION_INITS`:

``tile``
    new position ``p`` takes the row of position ``p mod n`` (the learned table repeated);
``interpolate``
    new position ``p`` takes the learned table linearly interpolated at ``p * (n - 1) / (m - 1)`` (the grown
    range squeezed into the learned one, as position interpolation does; the rows below ``n`` keep their own
    values);
``copy``
    every new position takes the row of the last learned position;
``random``
    normal rows with the learned rows' per-channel mean and standard deviation (seeded: always the same rows).

``n`` is the checkpoint's positions, ``m`` the grown count. :data:`DEFAULT_POSITION_INIT` is the rule that did
best on the long synthetic task (``python -m scripts.long_targets init_rules``; docs/benchmarks.md, "Positions past
the checkpoint's"): the four rules came within 0.005 token accuracy of one another past the old limit after 200
steps, ``random`` marginally ahead in accuracy and loss, so the choice matters little there.

A request for fewer positions than the model has changes nothing: a checkpoint keeps every position it learned
(``microsoft/Florence-2-large``'s 4,096 load as they are).
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import numpy as np
from flax import nnx

log = logging.getLogger(__name__)

POSITION_OFFSET = 2  # BART's learned positions are indexed from 2 (a fairseq legacy): two rows before position 0

POSITION_INITS = ("tile", "interpolate", "copy", "random")
DEFAULT_POSITION_INIT = "random"
POSITION_TABLES = ("model.language_model.encoder.embed_positions.embedding",
                   "model.language_model.decoder.embed_positions.embedding")


def is_position_table(path: str) -> bool:
    """Whether an NNX parameter path is one of BART's two learned position tables."""
    return path in POSITION_TABLES


def check_init(init: str) -> str:
    if init not in POSITION_INITS:
        raise ValueError(f"position_init must be one of {POSITION_INITS}, got {init!r}")
    return init


def grow_position_table(table: np.ndarray, max_positions: int, init: str = DEFAULT_POSITION_INIT) -> np.ndarray:
    """``table`` (``n + 2`` rows: BART's two offset rows, then positions ``0..n-1``) grown to ``max_positions + 2``
    rows; its own rows unchanged, the new ones made by ``init`` (module docstring)."""
    check_init(init)
    table = np.asarray(table)
    n = table.shape[0] - POSITION_OFFSET
    m = int(max_positions)
    if n < 1:
        raise ValueError(f"a position table has {POSITION_OFFSET} offset rows and at least one position; got "
                         f"{table.shape[0]} rows")
    if m < n:
        raise ValueError(f"cannot shrink a position table from {n} to {m} positions")
    if m == n:
        return table
    learned = table[POSITION_OFFSET:].astype(np.float32)
    new = np.arange(n, m)
    if init == "tile":
        rows = learned[new % n]
    elif init == "copy":
        rows = np.repeat(learned[-1:], m - n, axis=0)
    elif init == "interpolate":
        at = new * (n - 1) / max(m - 1, 1)
        lo = np.floor(at).astype(np.int64)
        hi = np.minimum(lo + 1, n - 1)
        frac = (at - lo).astype(np.float32)[:, None]
        rows = learned[lo] * (1.0 - frac) + learned[hi] * frac
    else:  # random
        rng = np.random.default_rng(0)
        rows = rng.normal(learned.mean(axis=0), learned.std(axis=0), size=(m - n, learned.shape[1]))
    return np.concatenate([table, rows.astype(table.dtype)], axis=0)


def grow_positions(model, max_positions: int, init: str = DEFAULT_POSITION_INIT, *, sharding_fn=None):
    """``model`` with both position tables grown to ``max_positions`` (a new model; the old one is left as it
    is). Returns ``model`` itself when it already has that many or more.

    ``sharding_fn(path, shape)`` places the grown tables (default: where the old ones were, when that sharding
    divides the new shape, else the first device).
    """
    from florence_jax.devices import to_host

    check_init(init)
    cfg = model.config
    have = cfg.text_config.max_position_embeddings
    if max_positions <= have:
        if max_positions < have:
            log.info("the model has %d positions, more than the %d asked: kept", have, max_positions)
        return model
    new_cfg = cfg.replace(text_config=dataclasses.replace(cfg.text_config, max_position_embeddings=int(max_positions)))
    cls = type(model)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: cls(new_cfg, rngs=nnx.Rngs(0))))
    _, state = nnx.split(model)
    state = jax.tree.map(lambda x: x, state)  # new Variables (same arrays): the old model keeps its tables
    lm = state["model"]["language_model"]
    for side, path in zip(("encoder", "decoder"), POSITION_TABLES):
        var = lm[side]["embed_positions"]["embedding"]
        old = var.get_value()
        table = grow_position_table(to_host(old), max_positions, init)
        if sharding_fn is not None:
            sharding = sharding_fn(path, table.shape)
        else:
            sharding = old.sharding
            try:
                sharding.shard_shape(table.shape)
            except ValueError:
                sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        var.set_value(jax.make_array_from_callback(table.shape, sharding, lambda idx, t=table: t[idx]))
    new = nnx.merge(graphdef, state)
    for name in ("generation_config", "checkpoint_layout", "name_or_path"):
        if hasattr(model, name):
            setattr(new, name, getattr(model, name))
    return new
