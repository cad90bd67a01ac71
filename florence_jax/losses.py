"""Token cross-entropy as transformers computes it for Florence-2, in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


def shift_tokens_right(labels: jax.Array, pad_token_id: int, decoder_start_token_id: int) -> jax.Array:
    """Decoder inputs for teacher forcing: start token, then labels[:-1]; -100 becomes padding."""
    labels = jnp.asarray(labels)
    shifted = jnp.concatenate(
        [jnp.full((labels.shape[0], 1), decoder_start_token_id, labels.dtype), labels[:, :-1]], axis=1
    )
    return jnp.where(shifted == IGNORE_INDEX, pad_token_id, shifted)


def token_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None):
    """Per-token losses and the mask of counted tokens (float32).

    Positions where ``labels == -100`` or ``mask == 0`` are excluded; the caller averages over the
    counted tokens (``sum(loss * mask) / sum(mask)``) so padding is never trained as a target.
    """
    labels = jnp.asarray(labels)
    valid = labels != IGNORE_INDEX
    if mask is not None:
        valid = valid & (jnp.asarray(mask) > 0)
    safe = jnp.where(valid, labels, 0)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    weights = valid.astype(jnp.float32)
    return nll * weights, weights


def mean_token_loss(logits, labels, mask=None) -> jax.Array:
    losses, weights = token_cross_entropy(logits, labels, mask)
    return losses.sum() / jnp.maximum(weights.sum(), 1.0)
