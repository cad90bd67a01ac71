"""Pure train and eval steps over split NNX state, jitted with explicit shardings by the caller.

A batch is a dict of arrays: ``pixel_values`` (B, H, W, 3) NHWC or (B, H/4, W/4, 48) in 4x4 blocks (float,
or uint8 normalized in the step with ``StepFns.pixel_table``), ``input_ids`` / ``attention_mask``
(B, Lp), ``labels`` (B, Lt) and ``label_mask`` (B, Lt) (1 on real target tokens, eos included), and for
evaluation ``example_mask`` (B,) (0 on rows that only pad the last batch).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from florence_jax.losses import shift_tokens_right, token_cross_entropy
from florence_jax.processing import normalize_pixels
from florence_jax.sharding import fsdp_compute, gather_for_compute
from train.optim import FROZEN


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # nnx.State of nnx.Param
    rest: Any  # nnx.State of everything else (buffers); never updated
    opt_state: Any


@flax.struct.dataclass
class StepFns:
    """Static pieces the step closes over (not traced)."""

    graphdef: Any = flax.struct.field(pytree_node=False)
    tx: Any = flax.struct.field(pytree_node=False)
    labels: Any = flax.struct.field(pytree_node=False)
    pad_token_id: int = flax.struct.field(pytree_node=False, default=1)
    decoder_start_token_id: int = flax.struct.field(pytree_node=False, default=2)
    freeze_vision: bool = flax.struct.field(pytree_node=False, default=False)
    grad_accum_steps: int = flax.struct.field(pytree_node=False, default=1)
    # (256, 3) table that turns uint8 pixel batches into the model's input (the data pipeline's
    # ``encoder.pixel_table``) as nested tuples, so the static fields stay hashable (``static_table``);
    # None when batches carry float pixels.
    pixel_table: Any = flax.struct.field(pytree_node=False, default=None)
    # ZeRO-1 (``MeshConfig.shard_optimizer``): two trees, per parameter the NamedSharding it is stored in and
    # the one its gradient, optimizer state and update take (split over ``data`` as well); or None: the
    # update where the parameter lives.
    update_sharding: Any = flax.struct.field(pytree_node=False, default=None)


def static_table(table) -> tuple | None:
    """A pixel table as nested tuples of Python floats (exact for float32 values), or None."""
    return None if table is None else tuple(tuple(float(v) for v in row) for row in np.asarray(table, np.float32))


def image_layout_of(pixels) -> str:
    """The layout of a batch's pixels: "NHWC" images (3 colors last), or "S2D", the data pipeline's 4x4
    blocks of 48 channels (``PipelineConfig.image_layout``); the model checks the shape it gets."""
    return "NHWC" if pixels is None or pixels.shape[-1] == 3 else "S2D"


def model_pixels(pixels, table, formulation: str | None = None):
    """A batch's pixels as the model takes them: uint8 ones normalized on the device with ``table`` (by
    ``formulation``, the model's ``Formulations.pixel_normalize``)."""
    if pixels is None or pixels.dtype != jnp.uint8:
        return pixels
    if table is None:
        raise ValueError("uint8 pixel batches need the data pipeline's pixel table (StepFns.pixel_table)")
    return normalize_pixels(pixels, table, formulation)


def _forward_loss(fns: StepFns, params, rest, batch, rng, total_weight):
    params, rest = gather_for_compute((params, rest))  # FSDP: whole weights meet batch-split activations
    model = nnx.merge(fns.graphdef, params, rest)
    labels = batch["labels"]
    mask = batch["label_mask"]
    if "example_mask" in batch:
        mask = mask * batch["example_mask"][:, None]
    decoder_input_ids = shift_tokens_right(jnp.where(mask > 0, labels, fns.pad_token_id), fns.pad_token_id,
                                           fns.decoder_start_token_id)
    # Cached vision-tower features (frozen tower, train/feature_cache.py) replace the pixels when present;
    # the projector still runs (and trains) on them.
    pixels = model_pixels(batch.get("pixel_values"), fns.pixel_table, model.formulations.pixel_normalize)
    out = model(
        input_ids=batch["input_ids"], pixel_values=pixels,
        attention_mask=batch["attention_mask"],
        decoder_input_ids=decoder_input_ids, image_layout=image_layout_of(pixels), rngs=nnx.Rngs(dropout=rng),
        freeze_vision=fns.freeze_vision, vision_features=batch.get("vision_features"),
    )
    with jax.named_scope("loss"):
        losses, weights = token_cross_entropy(out.logits, labels, mask)
    return losses.sum() / total_weight, (losses.sum(), weights.sum())


def train_step(fns: StepFns, state: TrainState, batch: dict, rng: jax.Array):
    """One optimizer step on a global batch (split into ``grad_accum_steps`` micro-batches).

    The loss is the mean over every real target token of the global batch, whatever the split.
    """
    rng = jax.random.fold_in(rng, state.step)
    total_weight = jnp.maximum(batch["label_mask"].astype(jnp.float32).sum(), 1.0)
    grad_fn = jax.value_and_grad(_forward_loss, argnums=1, has_aux=True)

    def grads_of(params, mb, key):
        # Frozen leaves get an exact zero, not their gradient: clipping and the reported norm see only
        # what trains, and XLA drops the frozen weight-gradient computations.
        out, g = grad_fn(fns, params, state.rest, mb, key, total_weight)
        return out, jax.tree.map(lambda x, lab: jnp.zeros_like(x) if lab == FROZEN else x, g, fns.labels)

    if fns.grad_accum_steps == 1:
        (_, (loss_sum, n_tok)), grads = grads_of(state.params, batch, rng)
    else:
        k = fns.grad_accum_steps
        micro = jax.tree.map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), batch)

        def body(carry, xs):
            g_acc, l_acc, n_acc = carry
            mb, i = xs
            (_, (ls, n)), g = grads_of(state.params, mb, jax.random.fold_in(rng, i))
            return (jax.tree.map(jnp.add, g_acc, g), l_acc + ls, n_acc + n), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (grads, loss_sum, n_tok), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), (micro, jnp.arange(k)))
    with jax.named_scope("optimizer"):
        old = state.params
        if fns.update_sharding is not None:
            # ZeRO-1: each device updates its share of every trained parameter; the updated parameters are
            # all-gathered into their own sharding by the step's out_shardings. The gradients are pinned
            # where the parameters live first: constrained to the split alone, the partitioner carried the
            # split back into the backward pass and ran its weight-gradient products on sliced operands
            # (12% more matrix FLOPs in tpu_v5e_16.py's step). Reduced, then sliced locally.
            stored, split = fns.update_sharding
            grads = jax.lax.with_sharding_constraint(jax.lax.with_sharding_constraint(grads, stored), split)
            old = jax.lax.with_sharding_constraint(old, split)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = fns.tx.update(grads, state.opt_state, old)
        # Frozen leaves are returned as they are (not p + 0), so they stay bit-identical.
        params = jax.tree.map(lambda p, q, u, lab: p if lab == FROZEN else (q + u).astype(p.dtype),
                              state.params, old, updates, fns.labels)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    metrics = {"loss": loss_sum / jnp.maximum(n_tok, 1.0), "grad_norm": grad_norm, "tokens": n_tok}
    return new_state, metrics


def eval_step(fns: StepFns, params, rest, batch: dict):
    """Summed token loss and token count over real rows (padding rows of the last batch excluded)."""
    _, (loss_sum, n_tok) = _forward_loss(fns, params, rest, batch, jax.random.key(0), 1.0)
    return {"loss_sum": loss_sum, "tokens": n_tok}


def _eval_step_on(mesh, fns: StepFns, params, rest, batch: dict):
    with fsdp_compute(mesh):  # the step's mesh, as the train step's
        return eval_step(fns, params, rest, batch)


def jit_train_step(fns: StepFns, state: TrainState, batch_sharding, *, donate: bool = True):
    """``step(state, batch, rng) -> (state, metrics)`` jitted with explicit shardings.

    The state keeps the shardings it has (rules over parameter paths), the batch is split over the data
    axes, metrics come back replicated, and the old state's buffers are donated.
    """
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    repl = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())

    def step(state, batch, rng):
        with fsdp_compute(batch_sharding.mesh):  # FSDP gathers weights for compute, never activations
            return train_step(fns, state, batch, rng)

    step.__name__ = step.__qualname__ = "train_step"  # the program's name in profiles and HLO metadata

    return jax.jit(
        step,
        in_shardings=(state_sh, batch_sharding, repl),
        out_shardings=(state_sh, repl),
        donate_argnums=(0,) if donate else (),
    )


def jit_eval_step(fns: StepFns, state: TrainState, batch_sharding):
    repl = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    params_sh = jax.tree.map(lambda x: x.sharding, state.params)
    rest_sh = jax.tree.map(lambda x: x.sharding, state.rest)
    return jax.jit(functools.partial(_eval_step_on, batch_sharding.mesh, fns),
                   in_shardings=(params_sh, rest_sh, batch_sharding),
                   out_shardings=repl)
