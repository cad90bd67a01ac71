"""Optimizer: schedule, global-norm clipping, AdamW, and frozen parameters by regex over paths.

Frozen parameters are routed to ``optax.set_to_zero()`` through ``optax.multi_transform``: they get no
Adam moments at all, and the update leaves them bit-identical. (The reference PyTorch recipe sets an
attribute PyTorch ignores, so its "frozen" encoder trains; here freezing is structural.)
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from train.config import OptimConfig

TRAINABLE, VISION, FROZEN = "trainable", "vision", "frozen"
FREEZE_TOWER = r'(r"^model\.vision_tower\.",)'  # the override that freezes the vision tower, as a user types it


def path_str(keypath) -> str:
    """Dotted parameter path (``model.vision_tower.convs.0.conv.kernel``) from a jax key path."""
    parts = []
    for k in keypath:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    if parts and parts[-1] == "value":  # nnx.Variable flattens to its value
        parts.pop()
    return ".".join(parts)


def param_labels(params, freeze: Sequence[str], vision_lr: float | None = None):
    """A pytree of labels (same structure as ``params``): frozen, vision (own learning rate) or trainable.

    When the parameters hold LoRA adapters (``....lora.lora_a`` / ``lora_b``), only adapters train:
    every other parameter is frozen (bit-identical, no optimizer moments).
    """
    from florence_jax.lora import LORA_PARAM_RE

    patterns = [re.compile(p) for p in freeze]
    lora = any(LORA_PARAM_RE.search(path_str(kp)) for kp, _ in jax.tree_util.tree_leaves_with_path(params))

    def label(keypath, _):
        path = path_str(keypath)
        if any(p.search(path) for p in patterns) or (lora and not LORA_PARAM_RE.search(path)):
            return FROZEN
        if vision_lr is not None and ".vision_tower." in f".{path}":
            return VISION
        return TRAINABLE

    return jax.tree_util.tree_map_with_path(label, params)


def make_schedule(cfg: OptimConfig, peak: float, total_steps: int) -> optax.Schedule:
    total = max(total_steps, 1)
    warm = min(cfg.warmup_steps, total)
    if cfg.schedule == "constant":
        decay = optax.constant_schedule(peak)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, 0.0, max(total - warm, 1))
    elif cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, max(total - warm, 1))
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r}")
    if warm == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), decay], [warm])


def check_freeze(params, freeze: Sequence[str], labels) -> None:
    """Every freeze pattern matches some parameter (a typo would silently turn a frozen-tower run into a full
    fine-tune), and something is left to train. Raises ``ConfigError`` naming the nearest paths."""
    import difflib

    from train.config import ConfigError

    paths = [path_str(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(params)]
    for pattern in freeze:
        compiled = re.compile(pattern)
        if any(compiled.search(p) for p in paths):
            continue
        prefixes = sorted({".".join(p.split(".")[:n]) for p in paths for n in range(1, len(p.split(".")) + 1)})
        typed = re.sub(r"\\(.)", r"\1", pattern).strip("^$")
        near = difflib.get_close_matches(typed, prefixes, n=5, cutoff=0.0)
        raise ConfigError(f"config.optim.freeze: {pattern!r} matches no parameter path, so nothing would be frozen by "
                          f"it. The nearest paths: {near}. For example --config.optim.freeze='{FREEZE_TOWER}' freezes "
                          "the vision tower")
    if not any(label != FROZEN for label in jax.tree.leaves(labels)):
        raise ConfigError(f"config.optim.freeze={tuple(freeze)!r} freezes every parameter: nothing would train")


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm``'s rule (updates over ``max_norm`` in global norm scaled down to it), applied
    as one scalar factor per step: ``g * min(1, max_norm / norm)``.

    optax selects per element between ``g`` and ``g / norm * max_norm``, so the compiled update keeps the
    divided gradient as an array of its own where both Adam moments read it: on the CPU, per parameter, the
    gradient written once more and read twice more (14 passes over parameter-sized arrays with the moments'
    and the parameters', against 10 here). The clipped values differ from optax's by float32 rounding (one
    multiplication by ``max_norm / norm`` against a division and a multiplication); unclipped steps are
    bit-identical. The state is optax's (``EmptyState``), so checkpoints resume either way.
    """

    def update_fn(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        scale = jnp.where(norm < max_norm, jnp.ones_like(norm), max_norm / norm)
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(cfg: OptimConfig, params, total_steps: int):
    """Returns ``(tx, labels, schedule)``; ``labels`` marks every leaf trainable/vision/frozen."""
    labels = param_labels(params, cfg.freeze, cfg.vision_learning_rate)
    check_freeze(params, cfg.freeze, labels)

    def adamw(lr):
        return optax.adamw(make_schedule(cfg, lr, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay)

    transforms = {TRAINABLE: adamw(cfg.learning_rate), FROZEN: optax.set_to_zero()}
    if cfg.vision_learning_rate is not None:
        transforms[VISION] = adamw(cfg.vision_learning_rate)
    chain = [optax.multi_transform(transforms, labels)]
    if cfg.max_grad_norm and cfg.max_grad_norm > 0:
        chain.insert(0, clip_by_global_norm(cfg.max_grad_norm))
    return optax.chain(*chain), labels, make_schedule(cfg, cfg.learning_rate, total_steps)


def count_params(params, labels) -> dict[str, int]:
    counts = {TRAINABLE: 0, VISION: 0, FROZEN: 0}
    for p, lab in zip(jax.tree.leaves(params), jax.tree.leaves(labels)):
        counts[lab] += int(p.size)
    return {"trainable": counts[TRAINABLE] + counts[VISION], "frozen": counts[FROZEN]}
