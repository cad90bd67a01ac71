"""Build the model and the sharded train state from a config."""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from florence_jax import (
    Florence2Config,
    Florence2ForConditionalGeneration,
    TextConfig,
    VisionConfig,
    hardware,
)
from florence_jax.config import PRESETS, resolve_dtype
from florence_jax.sharding import optimizer_spec, param_sharding_fn, param_spec
from train.config import LoRAConfig, ModelConfig, OptimConfig
from train.optim import FROZEN, make_optimizer, path_str
from train.step import StepFns, TrainState, static_table

log = logging.getLogger(__name__)


def tiny_config(vocab_size: int, image_token_id: int) -> Florence2Config:
    """A ~2-5M parameter Florence-2 for the CPU demo and tests (real structure, small widths)."""
    return Florence2Config(
        vision_config=VisionConfig(
            depths=(1, 1, 1, 1), embed_dim=(32, 64, 96, 128), num_heads=(2, 4, 6, 8), num_groups=(2, 4, 6, 8),
            window_size=4, projection_dim=128, drop_path_rate=0.0,
        ),
        text_config=TextConfig(
            vocab_size=vocab_size, d_model=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=512, decoder_ffn_dim=512, max_position_embeddings=512,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        ),
        image_token_id=image_token_id,
    )


def model_config_for(cfg: ModelConfig, tokenizer=None) -> Florence2Config | None:
    """The Florence2Config of a ``random:<preset>`` model (None for checkpoints)."""
    if not cfg.name_or_path.startswith("random:"):
        return None
    preset = cfg.name_or_path.split(":", 1)[1]
    if tokenizer is None:
        raise ValueError("a random model needs the tokenizer to size its vocabulary")
    vocab = -(-len(tokenizer) // 64) * 64
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    if preset == "tiny":
        fc = tiny_config(vocab, image_token_id)
    elif preset in PRESETS:
        fc = PRESETS[preset]()
        fc = fc.replace(text_config=dataclasses.replace(fc.text_config, vocab_size=vocab),
                        image_token_id=image_token_id)
    else:
        raise ValueError(f"unknown random preset {preset!r}; expected tiny, base or large")
    fc = fc.replace(num_real_tokens=len(tokenizer))
    if cfg.max_positions:
        fc = fc.replace(text_config=dataclasses.replace(fc.text_config, max_position_embeddings=cfg.max_positions))
    return fc


def _apply_model_options(fc: Florence2Config, cfg: ModelConfig) -> Florence2Config:
    fc = fc.replace(dtype=resolve_dtype(cfg.dtype), param_dtype=resolve_dtype(cfg.param_dtype),
                    attention_impl=cfg.attention_impl, remat_policy=cfg.remat_policy,
                    scan_vision_blocks=cfg.scan_vision_blocks, hardware=hardware.resolve(cfg.hardware))
    if cfg.dropout is not None:
        t = fc.text_config
        fc = fc.replace(text_config=dataclasses.replace(
            t, dropout=cfg.dropout, attention_dropout=cfg.dropout, activation_dropout=cfg.dropout))
    if cfg.drop_path_rate is not None:
        fc = fc.replace(vision_config=dataclasses.replace(fc.vision_config, drop_path_rate=cfg.drop_path_rate))
    return fc


def create_model(cfg: ModelConfig, mesh: Mesh, *, tokenizer=None, seed: int = 0, min_shard_size: int = 2**18,
                 lora: LoRAConfig | None = None):
    """Load (or randomly initialise) the model straight into its sharding on ``mesh``; then give rows to
    ``cfg.add_tokens`` and wrap ``lora.targets`` with adapters when ``lora.enabled``."""
    built_for, runs_on = hardware.resolve(cfg.hardware), hardware.backend()
    if built_for.platform != runs_on:
        # another platform's program, compiled by this platform's XLA: what cannot compile here gives way
        runnable, changed = hardware.runnable_on(built_for, runs_on)
        log.warning("the model's programs are built for %s (config.model.hardware=%r) but run on %s: they "
                    "compute the same, with that hardware's formulations%s; --config.model.hardware=%s uses "
                    "this machine's", built_for.platform, cfg.hardware, runs_on,
                    f" ({changed})" if changed else "", runs_on)
        cfg = dataclasses.replace(cfg, hardware=runnable.spec())
    model = _create_base_model(cfg, mesh, tokenizer=tokenizer, seed=seed, min_shard_size=min_shard_size)
    if cfg.add_tokens:
        if tokenizer is None:
            raise ValueError("config.model.add_tokens needs the tokenizer")
        from florence_jax.vocab import add_tokens, resize_for_tokens

        ids = add_tokens(tokenizer, cfg.add_tokens)
        model = resize_for_tokens(model, ids, len(tokenizer), sharding_fn=param_sharding_fn(mesh, min_shard_size))
    if lora is not None and lora.enabled:
        from florence_jax.lora import apply_lora

        try:
            paths = apply_lora(model, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, targets=lora.targets,
                               seed=seed)
        except ValueError as e:  # a target that matches no layer: the message lists what paths look like
            from train.config import ConfigError

            raise ConfigError(f"config.lora.targets: {e}") from None
        log.info("LoRA rank %d on %d layers", lora.rank, len(paths))
    return model


def _create_base_model(cfg: ModelConfig, mesh: Mesh, *, tokenizer=None, seed: int = 0, min_shard_size: int = 2**18):
    fc = model_config_for(cfg, tokenizer)
    if fc is None:
        model = Florence2ForConditionalGeneration.from_pretrained(
            cfg.name_or_path, revision=cfg.revision, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            sharding_fn=param_sharding_fn(mesh, min_shard_size), hardware=cfg.hardware or None,
            max_positions=cfg.max_positions or None, position_init=cfg.position_init,
        )
        model.config = _apply_model_options(model.config, cfg)
        if (model.config.attention_impl != "xla" or model.config.remat_policy != "none" or cfg.dropout is not None
                or cfg.drop_path_rate is not None or not cfg.scan_vision_blocks):
            model = _rebuild_with_config(model, model.config)
        return model
    fc = _apply_model_options(fc, cfg)

    # Initialise under jit with out_shardings so parameters never gather on one device (big_vision style).
    abstract = nnx.eval_shape(lambda: Florence2ForConditionalGeneration(fc, rngs=nnx.Rngs(seed)))
    graphdef, abs_state = nnx.split(abstract)
    shardings = _state_shardings(abs_state, mesh, min_shard_size)

    def init():
        return nnx.split(Florence2ForConditionalGeneration(fc, rngs=nnx.Rngs(seed)))[1]

    state = jax.jit(init, out_shardings=shardings)()
    model = nnx.merge(graphdef, state)
    from florence_jax.generation_config import GenerationConfig

    model.generation_config = GenerationConfig.from_model_config(fc)
    return model


def _rebuild_with_config(model, fc: Florence2Config):
    """Same parameters, new static options (attention implementation, remat, dropout)."""
    _, state = nnx.split(model)
    abstract = nnx.eval_shape(lambda: Florence2ForConditionalGeneration(fc, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract)
    new = nnx.merge(graphdef, state)
    new.generation_config = getattr(model, "generation_config", None)
    return new


def _state_shardings(state, mesh: Mesh, min_size: int):
    from train.optim import path_str

    def spec(keypath, x):
        return NamedSharding(mesh, param_spec(path_str(keypath), tuple(x.shape), mesh, min_size=min_size))

    return jax.tree_util.tree_map_with_path(spec, state)


def init_train_state(model, optim: OptimConfig, total_steps: int, mesh: Mesh, *, grad_accum_steps: int = 1,
                     min_shard_size: int = 2**18, pixel_table=None, shard_optimizer: bool = False):
    """Split the model, build the optimizer and its sharded state; return ``(fns, state, schedule)``.

    ``pixel_table``: the data pipeline's (``encoder.pixel_table``) when its batches carry uint8 pixels.
    ``shard_optimizer``: the optimizer state and the update split over ``data`` too (ZeRO-1,
    ``MeshConfig.shard_optimizer``)."""
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx, labels, schedule = make_optimizer(optim, params, total_steps)
    freeze_vision = _vision_frozen(labels)
    t = model.config.text_config
    repl = NamedSharding(mesh, jax.sharding.PartitionSpec())
    # Parameters not yet on the mesh (e.g. loaded to one device) go to their rule-given sharding.
    targets = _state_shardings(params, mesh, min_shard_size)
    params = jax.tree.map(lambda x, s: x if _on_mesh(x, mesh) else jax.device_put(x, s), params, targets)
    rest = jax.tree.map(lambda x: x if _on_mesh(x, mesh) else jax.device_put(x, repl), rest)
    update_sh = update_shardings(params, labels, mesh, min_shard_size) if shard_optimizer else None
    fns = StepFns(graphdef=graphdef, tx=tx, labels=labels, pad_token_id=t.pad_token_id,
                  decoder_start_token_id=t.decoder_start_token_id, freeze_vision=freeze_vision,
                  grad_accum_steps=grad_accum_steps, pixel_table=static_table(pixel_table),
                  update_sharding=update_sh)
    opt_sh = opt_state_shardings(tx, params, mesh, update_sh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), repl), params=params, rest=rest,
                       opt_state=opt_state)
    model.eval()
    return fns, state, schedule


def _on_mesh(x, mesh) -> bool:
    s = getattr(x, "sharding", None)
    return isinstance(s, NamedSharding) and s.mesh == mesh


def update_shardings(params, labels, mesh: Mesh, min_size: int = 2**18):
    """Where each parameter's update is computed when the optimizer is split over ``data`` (ZeRO-1), as
    ``StepFns.update_sharding``: two trees, each parameter's own sharding and its update's
    (:func:`florence_jax.sharding.optimizer_spec` of its own for a trained parameter; a frozen one's own, as
    it has no optimizer state and is never updated). ``params`` may be arrays or ShapeDtypeStructs carrying
    shardings."""
    stored = jax.tree.map(lambda x: x.sharding, params)

    def split(x, lab):
        if lab == FROZEN:
            return x.sharding
        return NamedSharding(mesh, optimizer_spec(x.sharding.spec, tuple(x.shape), mesh, min_size=min_size))

    return stored, jax.tree.map(split, params, labels)


def opt_state_shardings(tx, params, mesh: Mesh, update_sharding=None):
    """Shardings of ``tx.init(params)``: Adam moments take their parameter's sharding (their key path
    ends with the parameter's path), or its update's when ``update_sharding`` (:func:`update_shardings`)
    is given; counters and other scalars are replicated. ``params`` may be arrays or ShapeDtypeStructs
    carrying shardings."""
    repl = NamedSharding(mesh, jax.sharding.PartitionSpec())
    where = jax.tree.map(lambda x: x.sharding, params) if update_sharding is None else update_sharding[1]
    by_path = {path_str(kp): s for kp, s in jax.tree_util.tree_leaves_with_path(where)}

    def opt_sharding(kp, x):
        parts = path_str(kp).split(".")
        for i in range(len(parts)):
            s = by_path.get(".".join(parts[i:]))
            if s is not None:
                return s
        return repl

    return jax.tree_util.tree_map_with_path(opt_sharding, jax.eval_shape(tx.init, params))


def abstract_train_state(fc: Florence2Config, optim: OptimConfig, total_steps: int, mesh: Mesh, *,
                         grad_accum_steps: int = 1, min_shard_size: int = 2**18, lora: LoRAConfig | None = None,
                         pixel_table=None, shard_optimizer: bool = False):
    """``(fns, state)`` with ShapeDtypeStruct leaves carrying their shardings: no memory, no weights.
    Used for ahead-of-time compilation (also for TPU topologies this machine does not have)."""

    def build():
        model = Florence2ForConditionalGeneration(fc, rngs=nnx.Rngs(0))
        if lora is not None and lora.enabled:
            from florence_jax.lora import apply_lora

            apply_lora(model, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, targets=lora.targets)
        return model

    abstract = nnx.eval_shape(build)
    abstract.train()
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    tx, labels, _ = make_optimizer(optim, params, total_steps)
    repl = NamedSharding(mesh, jax.sharding.PartitionSpec())

    def with_sharding(tree, shardings):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

    params = with_sharding(params, _state_shardings(params, mesh, min_shard_size))
    rest = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), rest)
    update_sh = update_shardings(params, labels, mesh, min_shard_size) if shard_optimizer else None
    opt_state = with_sharding(jax.eval_shape(tx.init, params), opt_state_shardings(tx, params, mesh, update_sh))
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=repl), params=params, rest=rest,
                       opt_state=opt_state)
    t = fc.text_config
    fns = StepFns(graphdef=graphdef, tx=tx, labels=labels, pad_token_id=t.pad_token_id,
                  decoder_start_token_id=t.decoder_start_token_id,
                  freeze_vision=_vision_frozen(labels), grad_accum_steps=grad_accum_steps,
                  pixel_table=static_table(pixel_table), update_sharding=update_sh)
    return fns, state


def _vision_frozen(labels) -> bool:
    vision = [lab for kp, lab in jax.tree_util.tree_leaves_with_path(labels) if ".vision_tower." in f".{path_str(kp)}."]
    return bool(vision) and all(lab == FROZEN for lab in vision)
