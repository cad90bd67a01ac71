"""LoRA adapters on Florence-2's linear layers, built from flax NNX's ``nnx.LoRA`` / ``nnx.LoRALinear``.

``apply_lora`` replaces every ``nnx.Linear`` whose module path matches one of the target regexes by a
:class:`LoRALinear`: the same ``kernel``/``bias`` variables at the same paths (so checkpoints map as
before) plus ``<path>.lora.lora_a`` (in, r) and ``<path>.lora.lora_b`` (r, out), ``nnx.LoRAParam``s,
A random (He uniform), B zero, so the model's outputs are unchanged until training moves B:

    y = x W + b + (alpha / r) * dropout(x) A B

Module paths are transformers' module names (``model.language_model.encoder.layers.0.self_attn.q_proj``,
``model.vision_tower.blocks.0.0.spatial_block.window_attn.qkv``); the tied LM head is the virtual path
``lm_head`` (an adapter added to the logits; the shared embedding itself stays as it is).

Export: :func:`merge_lora` folds ``W + (alpha / r) A B`` into the base kernels and returns a plain model
(``save_pretrained`` as usual); :func:`save_peft_adapter` writes a peft LoRA directory
(``adapter_config.json`` + ``adapter_model.safetensors``, keys ``base_model.model.<module>.lora_A.weight``)
that ``peft.PeftModel.from_pretrained(transformers_model, dir)`` loads.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from florence_jax import cpu_kernels
from florence_jax.devices import to_host

LM_HEAD = "lm_head"
# Dotted parameter paths of adapter weights (what the optimizer trains when adapters are present).
LORA_PARAM_RE = re.compile(r"(^|\.)lora\.lora_[ab]$")


class LoRALinear(nnx.LoRALinear):
    """An ``nnx.Linear`` (its own variables, adopted) plus a scaled ``nnx.LoRA`` with input dropout."""

    def __init__(self, base: nnx.Linear, *, rank: int, alpha: float, dropout: float, rngs: nnx.Rngs):
        # nnx.LoRALinear builds a fresh kernel; the base layer's variables replace it right after.
        super().__init__(
            base.in_features, base.out_features, lora_rank=rank, use_bias=base.use_bias, dtype=base.dtype,
            param_dtype=base.param_dtype, lora_dtype=base.dtype, lora_param_dtype=base.param_dtype,
            kernel_init=nnx.initializers.zeros, rngs=rngs,
        )
        self.kernel = base.kernel
        self.bias = base.bias
        self.lora_alpha = float(alpha)
        self.lora_scale = float(alpha) / rank
        self.lora_dropout = nnx.Dropout(dropout, deterministic=True)  # model.train() switches it

    def __call__(self, x: jax.Array, out_sharding=None, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        y = nnx.Linear.__call__(self, x, out_sharding=out_sharding)
        delta = self.lora(self.lora_dropout(x, rngs=rngs)) * self.lora_scale
        return y + delta.astype(y.dtype)


class LoRAHead(nnx.Module):
    """The adapter of the tied LM head: ``logits += (alpha / r) * dropout(h) A B`` (A: (d, r), B: (r, V))."""

    def __init__(self, d_model: int, vocab_size: int, *, rank: int, alpha: float, dropout: float, dtype,
                 param_dtype, rngs: nnx.Rngs):
        self.lora = nnx.LoRA(d_model, rank, vocab_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.lora_alpha = float(alpha)
        self.lora_scale = float(alpha) / rank
        self.lora_dropout = nnx.Dropout(dropout, deterministic=True)

    def __call__(self, h: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        return self.lora(self.lora_dropout(h, rngs=rngs)) * self.lora_scale


def dense(layer, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Call a linear layer; a LoRA layer also receives the dropout RNG. Inside a decoding loop whose weights
    were packed for the CPU kernel (florence_jax.cpu_kernels.decode_products) the product runs there."""
    if isinstance(layer, LoRALinear):
        return layer(x, rngs=rngs)
    y = cpu_kernels.packed_product(layer, x)
    if y is None:
        return layer(x)
    return y if layer.bias is None else y + layer.bias[...]


def dense_of_activation(layer, act, h: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
    """``dense(layer, act(h))`` whose backward pass keeps ``h`` alone and recomputes ``act(h)`` for the
    layer's weight gradient, instead of keeping both (an MLP's hidden activations are 4x its width).
    A LoRA layer (with its own dropout RNG) is called as it is."""
    if isinstance(layer, LoRALinear):
        return layer(act(h), rngs=rngs)
    return jax.checkpoint(lambda h: layer(act(h)))(h)


def _path(keys) -> str:
    return ".".join(str(k) for k in keys)


def linear_modules(model) -> dict[str, nnx.Linear]:
    """Every linear layer by its module path (transformers' module name), adapters included."""
    return {_path(p): m for p, m in nnx.iter_modules(model) if isinstance(m, nnx.Linear)}


def lora_modules(model) -> dict[str, LoRALinear | LoRAHead]:
    """The adapters of a model by module path (``lm_head`` for the LM head's)."""
    out: dict[str, LoRALinear | LoRAHead] = {
        p: m for p, m in linear_modules(model).items() if isinstance(m, LoRALinear)}
    head = getattr(model, LM_HEAD, None)
    if isinstance(head, LoRAHead):
        out[LM_HEAD] = head
    return out


def has_lora(model) -> bool:
    return bool(lora_modules(model))


def apply_lora(model, *, rank: int, alpha: float, dropout: float, targets: Sequence[str],
               seed: int = 0) -> list[str]:
    """Wrap the linear layers whose module path matches any regex in ``targets`` (``re.search``) with
    LoRA adapters, in place; ``lm_head`` (the tied LM head) is a valid target too. Returns the wrapped
    paths. Every pattern must match at least one layer."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    linears = linear_modules(model)
    candidates = sorted(linears) + [LM_HEAD]
    patterns = [re.compile(t) for t in targets]
    for t, pat in zip(targets, patterns):
        if not any(pat.search(p) for p in candidates):
            examples = ", ".join(candidates[i] for i in (0, len(candidates) // 2, -1))
            raise ValueError(f"LoRA target {t!r} matches no linear layer; module paths look like {examples}")
    chosen = [p for p in candidates if any(pat.search(p) for pat in patterns)]
    already = [p for p in chosen if p in linears and isinstance(linears[p], LoRALinear)]
    if already or (LM_HEAD in chosen and getattr(model, LM_HEAD, None) is not None):
        raise ValueError(f"LoRA is already applied to {already or [LM_HEAD]}")
    rngs = nnx.Rngs(params=seed)
    for p in chosen:
        if p == LM_HEAD:
            t = model.config.text_config
            setattr(model, LM_HEAD, LoRAHead(t.d_model, t.vocab_size, rank=rank, alpha=alpha, dropout=dropout,
                                             dtype=model.config.dtype, param_dtype=model.config.param_dtype,
                                             rngs=rngs))
            continue
        *parent_keys, name = p.split(".")
        parent = model
        for k in parent_keys:
            parent = parent[int(k)] if k.isdigit() else getattr(parent, k)
        if name.isdigit():
            raise ValueError(f"cannot wrap {p}: a linear layer held in a list")
        setattr(parent, name, LoRALinear(linears[p], rank=rank, alpha=alpha, dropout=dropout, rngs=rngs))
    return chosen


def _delta(m: LoRALinear | LoRAHead) -> jax.Array:
    a = m.lora.lora_a.get_value().astype(jnp.float32)
    b = m.lora.lora_b.get_value().astype(jnp.float32)
    return m.lora_scale * (a @ b)


def merge_lora(model):
    """A plain model (no adapters) whose kernels are ``W + (alpha / r) A B``; ``model`` is not modified.

    The tied LM head cannot take a merged adapter without changing the input embeddings as well, so a
    model with an ``lm_head`` adapter is refused: export it with :func:`save_peft_adapter` instead.
    """
    if LM_HEAD in lora_modules(model):
        raise ValueError("the LM head's LoRA adapter cannot be merged into the tied embedding (it would change "
                         "the input embeddings too); export it as a peft adapter, or leave lm_head out of "
                         "lora.targets")
    return _plain_model(model, merge=True)


def strip_lora(model):
    """The base model alone (adapters dropped, base weights as they are); ``model`` is not modified."""
    return _plain_model(model, merge=False)


def _plain_model(model, merge: bool):
    adapters = lora_modules(model)
    cls = type(model)
    abstract = nnx.eval_shape(lambda: cls(model.config, rngs=nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract)
    source = {_path(p): v for p, v in nnx.to_flat_state(nnx.split(model)[1])}
    flat = []
    for p, var in nnx.to_flat_state(abs_state):
        key = _path(p)
        value = source[key].get_value()
        module = key.rsplit(".", 1)[0]
        if merge and key.endswith(".kernel") and module in adapters:
            value = (value.astype(jnp.float32) + _delta(adapters[module])).astype(value.dtype)
        var.set_value(value)
        flat.append((p, var))
    plain = nnx.merge(graphdef, nnx.from_flat_state(flat))
    for attr in ("generation_config", "name_or_path"):
        if hasattr(model, attr):
            setattr(plain, attr, getattr(model, attr))
    return plain


def peft_state_dict(model) -> dict[str, np.ndarray]:
    """Adapter weights under peft's names: ``base_model.model.<module>.lora_A.weight`` (r, in) and
    ``.lora_B.weight`` (out, r), as torch's nn.Linear stores them."""
    out = {}
    for p, m in lora_modules(model).items():
        out[f"base_model.model.{p}.lora_A.weight"] = np.ascontiguousarray(to_host(m.lora.lora_a.get_value()).T)
        out[f"base_model.model.{p}.lora_B.weight"] = np.ascontiguousarray(to_host(m.lora.lora_b.get_value()).T)
    return out


def save_peft_adapter(model, save_directory: str | os.PathLike, *, base_model_name_or_path: str | None = None,
                      revision: str | None = None, is_main_process: bool | None = None) -> Path:
    """Write a peft LoRA adapter directory for transformers' ``Florence2ForConditionalGeneration``."""
    from safetensors.numpy import save_file

    adapters = lora_modules(model)
    if not adapters:
        raise ValueError("the model has no LoRA adapters to save")
    ranks = {int(m.lora.lora_a.get_value().shape[1]) for m in adapters.values()}
    alphas = {m.lora_alpha for m in adapters.values()}
    rates = {float(m.lora_dropout.rate) for m in adapters.values()}
    if len(ranks) > 1 or len(alphas) > 1 or len(rates) > 1:
        raise ValueError(f"adapters differ in rank/alpha/dropout ({ranks}, {alphas}, {rates}); peft's "
                         "adapter_config.json holds one of each")
    state = peft_state_dict(model)  # every process joins the gather; only one writes
    if is_main_process is None:
        is_main_process = jax.process_index() == 0
    out = Path(save_directory)
    if not is_main_process:
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": revision,
        "r": ranks.pop(),
        "lora_alpha": alphas.pop(),
        "lora_dropout": rates.pop(),
        "target_modules": sorted(adapters),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    from florence_jax.weights.export import _ordinary_permissions

    _ordinary_permissions(out)
    return out
