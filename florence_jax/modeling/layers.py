"""Shared building blocks: activations, attention core, LayerNorm/Linear factories with PyTorch defaults."""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from florence_jax.modeling.dropout import DROPOUT_KEEP


def named(scope: str):
    """Run the decorated method under ``jax.named_scope(scope)``.

    The scope becomes part of every op's name in the compiled program's metadata (``vision_tower/stage2/
    spatial/window_attn/dot_general``; autodiff wraps backward ops in ``transpose(...)``), so device
    profiles read per model part (``scripts/op_profile.py``). Nothing changes at run time.
    """

    def wrap(fn):
        @functools.wraps(fn)
        def scoped(*args, **kwargs):
            with jax.named_scope(scope):
                return fn(*args, **kwargs)

        return scoped

    return wrap


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """``jax.nn.softmax(x, axis)``, the same values (the same operations: the maximum subtracted,
    ``exp``, a division by the sum), differentiated through its result: ``dy = y (dx - sum(y dx))``.

    ``jax.nn.softmax``'s default derivative (while ``jax_softmax_custom_jvp`` is off, as it is by default)
    goes through ``exp`` and the division, so a backward pass keeps the unnormalized exponentials beside
    the probabilities and runs the quotient rule over both: attention's ``(batch, heads, queries, keys)``
    twice over, in memory and in every pass of the softmax's backward. Here the probabilities alone are
    kept (``tests/test_modeling.py``)."""
    unnormalized = jnp.exp(x - jnp.max(x, axis, keepdims=True))
    return unnormalized / jnp.sum(unnormalized, axis, keepdims=True)


@softmax.defjvp
def _softmax_jvp(axis, primals, tangents):
    (x,), (x_dot,) = primals, tangents
    y = softmax(x, axis)
    return y, y * (x_dot - jnp.sum(y * x_dot, axis, keepdims=True))


def recompute_in_backward(fn=None, *, static_argnums: tuple[int, ...] = ()):
    """``fn`` with only its inputs kept for the backward pass, which recomputes the rest.

    For cheap elementwise chains whose autodiff would otherwise keep several activation-sized
    intermediates: the exact GELU keeps three float32 arrays (its input, an ``exp`` and a sum), a float32
    LayerNorm three float32 copies, the shifted-sum depthwise conv its nine shifted inputs. Inside the
    scan over a vision stage every one of those is stacked across the stage's blocks and held until the
    backward pass; unscanned, XLA would have fused them away. Recomputing them costs a few elementwise
    passes and cuts the vision tower's saved activations several-fold (see ``docs/architecture.md``).
    """
    if fn is None:
        return functools.partial(recompute_in_backward, static_argnums=static_argnums)
    return jax.checkpoint(fn, static_argnums=static_argnums)


_SQRT_HALF = 0.7071067811865476


def with_gradient_of(forward, reference):
    """``forward`` (a kernel) with ``reference``'s gradient: the same function of its arrays in another
    formulation, whose ``vjp`` is taken at the saved inputs in the backward pass (recomputing its own
    forward). How a kernel without a backward of its own trains: the gradient is the reference's exactly."""

    @jax.custom_vjp
    def fn(*args):
        return forward(*args)

    fn.defvjp(lambda *args: (forward(*args), args), lambda args, d_out: jax.vjp(reference, *args)[1](d_out))
    return fn


def gelu_exact(x: jax.Array) -> jax.Array:
    """The exact GELU as PyTorch computes it: ``x / 2 * (1 + erf(x / sqrt(2)))`` in float32, rounded once.

    ``jax.nn.gelu(approximate=False)`` is the same function written with ``erfc(-x / sqrt(2))``, whose
    float32 expansion evaluates two rational approximations, an ``exp`` and two divisions for every element
    (about 60 vector operations against about 20 for ``erf``). Fused into the MLP's second matmul it made
    that matmul vector-bound on a v4 chip: 1.70 against 0.97 ms by the TPU compiler's estimate for
    ``(18432, 4096) x (4096, 1024)`` in bfloat16, with 0.59 ms for the matmul alone (``docs/scale-out.md``).
    The two forms differ only by float32 rounding, except far in the negative tail (below about -4), where
    this one, like PyTorch's, keeps values under 1e-6 to an absolute precision of about 1e-7 rather than a
    relative one. Half-precision inputs are computed in float32 and rounded once, as PyTorch does.
    """
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return (x32 * 0.5 * (1.0 + jax.lax.erf(x32 * _SQRT_HALF))).astype(x.dtype)

ACTIVATIONS = {
    # transformers' ACT2FN names -> jax functions. "gelu" is the exact erf form, as in PyTorch.
    "gelu": recompute_in_backward(gelu_exact),
    "gelu_new": recompute_in_backward(functools.partial(jax.nn.gelu, approximate=True)),
    "gelu_pytorch_tanh": recompute_in_backward(functools.partial(jax.nn.gelu, approximate=True)),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


# transformers initialises Florence-2's Linear, Conv2d and Embedding weights from N(0, 0.02) (biases 0,
# LayerNorms 1/0); random-init training starts from the same distribution.
INIT_STD = 0.02


def embed(cfg, num: int, dim: int, *, rngs: nnx.Rngs) -> nnx.Embed:
    return nnx.Embed(num, dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                     embedding_init=nnx.initializers.normal(INIT_STD), rngs=rngs)


def linear(cfg, din: int, dout: int, *, use_bias: bool = True, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        din, dout, use_bias=use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        kernel_init=nnx.initializers.normal(INIT_STD), rngs=rngs,
    )


class LayerNorm(nnx.LayerNorm):
    """``nnx.LayerNorm`` over the last axis (same parameters, same float32 statistics) whose backward
    pass keeps only the input and recomputes the normalisation (``recompute_in_backward``).

    ``stats="matrix"`` (``Formulations.layer_norm_stats``) takes a bfloat16 input's statistics, where it
    has at least ``MATRIX_STATS_MIN_CHANNELS`` channels, as products on the matrix unit
    (:func:`matrix_moments`); the backward pass is the same either way."""

    def __init__(self, *args, stats: str = "vector", **kwargs):
        super().__init__(*args, **kwargs)
        self.stats = stats

    def __call__(self, x, *, mask=None):
        if mask is not None or self.scale is None or self.bias is None or self.reduction_axes != -1:
            return super().__call__(x, mask=mask)
        dtype = self.dtype or x.dtype
        fn = _layer_norm_matrix if self.stats == "matrix" and matrix_moments_apply(dtype, x.shape[-1]) else _layer_norm
        return fn(x, self.scale[...], self.bias[...], self.epsilon, dtype)


def _normalize(x, scale, bias, eps: float, dtype, moments):
    # flax's LayerNorm arithmetic: input and parameters cast to the compute dtype, statistics in (at
    # least) float32 with the fast variance, (x - mean) * (rsqrt(var + eps) * scale) + bias, cast back.
    x, scale, bias = x.astype(dtype), scale.astype(dtype), bias.astype(dtype)
    mean, mean_sq = moments(x)
    var = jnp.maximum(0.0, mean_sq - jnp.square(mean))
    return ((x - mean) * (jax.lax.rsqrt(var + eps) * scale) + bias).astype(dtype)


def vector_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The mean and the mean square of ``x`` over its last axis, ``(..., 1)``, by float32 reductions."""
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return jnp.mean(x32, axis=-1, keepdims=True), jnp.mean(jnp.square(x32), axis=-1, keepdims=True)


# Formulations.layer_norm_stats="matrix" applies to bfloat16 inputs of at least this many channels. The TPU
# compiler's estimates of a DaViT block's forward (scripts/block_cost.py, docs/scale-out.md): better from 512
# channels on both chips; at 256 better for base's second stage on a v5e (11.6 to 10.8 ms, 16 images) but
# worse for large's first on a v4 (22.2 to 23.6 ms, 8 images); at 128 (base's first stage) much worse, 24.6
# to 29.4 ms: the products' (tokens, 128) float32 outputs outweigh what they save.
MATRIX_STATS_MIN_CHANNELS = 512
# The named scope of the statistics' products: matrix-unit work, but not the model's (scripts/hlo_cost.py
# leaves it out of the matrix FLOPs an MFU counts).
STATS_SCOPE = "layer_norm_stats"
_STATS_LANES = 128  # the matrix unit's output width; a product with one column XLA turns into a reduction


def matrix_moments_apply(dtype, channels: int) -> bool:
    return jnp.dtype(dtype) == jnp.bfloat16 and channels >= MATRIX_STATS_MIN_CHANNELS


def square_parts(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x * x`` for a bfloat16 ``x`` as two bfloat16 arrays whose sum it is exactly: its rounding and the
    rest. A bfloat16 has 8 significant bits, so the square has at most 16, and what its rounding to 8
    leaves has at most 8. Wherever that rest is a normal float32 (squares from 2**-111 up); below, devices
    that flush subnormals to zero drop it, an error under 2**-8 of such a square."""
    sq = jnp.square(x.astype(jnp.float32))
    hi = sq.astype(jnp.bfloat16)
    return hi, (sq - hi.astype(jnp.float32)).astype(jnp.bfloat16)


def matrix_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """:func:`vector_moments` of a bfloat16 ``x`` as products with a ``(C, 128)`` matrix of ones on the
    matrix unit, float32 sums of exact products: ``x`` itself, and ``x * x`` (16 significant bits, exact in
    float32) as the sum of two bfloat16 parts, its rounding and the rest, each exact in bfloat16. The sums
    differ from the reductions' by the order of float32 additions only.

    XLA:TPU runs a LayerNorm's reductions over the lanes on the vector unit and leaves the statistics
    with the tokens along the lanes, so the normalisation turns them back across the lanes; the products
    are the idle matrix unit's work, and their sums arrive on every lane of their token's row, where the
    normalisation broadcasts them (docs/scale-out.md gives the compiler's estimates)."""
    if x.dtype != jnp.bfloat16:
        raise ValueError(f"matrix moments need a bfloat16 input, got {x.dtype}")
    n = x.shape[-1]
    f32 = jnp.float32
    hi, lo = square_parts(x)
    with jax.named_scope(STATS_SCOPE):
        ones = jnp.ones((n, _STATS_LANES), jnp.bfloat16)
        total = jnp.dot(x, ones, preferred_element_type=f32)[..., :1]
        total_sq = jnp.dot(hi, ones, preferred_element_type=f32) + jnp.dot(lo, ones, preferred_element_type=f32)
    return total / n, total_sq[..., :1] / n


@recompute_in_backward(static_argnums=(3, 4))
def _layer_norm(x, scale, bias, eps: float, dtype):
    return _normalize(x, scale, bias, eps, dtype, vector_moments)


# The matrix statistics' backward pass is the vector formulation's, recomputed from the same saved inputs:
# the same gradients, and no float32 cotangent rounded to bfloat16 on its way through the products.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _layer_norm_matrix(x, scale, bias, eps: float, dtype):
    return _normalize(x, scale, bias, eps, dtype, matrix_moments)


def _layer_norm_matrix_fwd(x, scale, bias, eps, dtype):
    return _layer_norm_matrix(x, scale, bias, eps, dtype), (x, scale, bias)


def _layer_norm_matrix_bwd(eps, dtype, saved, ct):
    _, pullback = jax.vjp(lambda *a: _normalize(*a, eps, dtype, vector_moments), *saved)
    return pullback(ct)


_layer_norm_matrix.defvjp(_layer_norm_matrix_fwd, _layer_norm_matrix_bwd)


def layer_norm(cfg, dim: int, *, eps: float = 1e-5, rngs: nnx.Rngs, stats: str = "vector") -> LayerNorm:
    """PyTorch's LayerNorm (its default epsilon is 1e-5, flax's 1e-6); ``stats`` as :class:`LayerNorm`'s."""
    return LayerNorm(dim, epsilon=eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs, stats=stats)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    mask: jax.Array | None = None,
    impl: str = "xla",
    dropout: nnx.Dropout | None = None,
    rngs: nnx.Rngs | None = None,
    heads_major: bool = False,
    layout: str = "heads_major",
) -> jax.Array:
    """Softmax attention over ``(batch, length, heads, head_dim)`` inputs, or ``(batch, heads, length,
    head_dim)`` ones with ``heads_major`` (the output has the inputs' layout).

    ``mask`` is boolean, broadcastable to ``(batch, heads, q_len, k_len)``, True where attention is
    allowed. Scores and softmax are computed in float32 whatever the compute dtype. A fully masked row
    gives a uniform distribution, as transformers' eager attention does with its finfo.min bias.
    ``impl="dot_product"`` routes to ``jax.nn.dot_product_attention`` when no attention dropout is active,
    with its default implementation: in this jax, XLA's attention on every backend (cuDNN's fused kernel
    only when asked for by name; deciding that takes a GPU to measure on).

    ``layout`` (``Formulations.attention_layout``) is the einsums' operand layout for inputs that are not
    heads-major: ``"heads_major"`` transposes them first (XLA:CPU's batched matmuls are much faster on
    that layout than on (batch, length, heads, dim); docs/benchmarks.md, "Formulations per backend");
    ``"sequence_major"`` contracts them as they are and leaves the layout to the compiler. BART keeps its
    keys, values and decoding cache heads-major, so nothing is transposed per step either way.
    """
    use_dropout = dropout is not None and dropout.rate > 0 and not dropout.deterministic
    if impl == "dot_product" and not use_dropout:
        if heads_major:
            q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale).astype(v.dtype)
        return out.transpose(0, 2, 1, 3) if heads_major else out
    if layout not in ("heads_major", "sequence_major"):
        raise ValueError(f"unknown attention layout {layout!r}; expected heads_major or sequence_major")
    transpose = not heads_major and layout == "heads_major"
    if transpose:
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    qk, pv = (("bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd") if not heads_major and not transpose
              else ("bhqd,bhkd->bhqk", "bhqk,bhkd->bhqd"))
    scores = jnp.einsum(qk, q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = softmax(scores, -1).astype(v.dtype)
    if use_dropout:
        probs = dropout(probs, rngs=rngs)
    out = jnp.einsum(pv, probs, v)
    return out.transpose(0, 2, 1, 3) if transpose else out


# The name of an attention kernel's output (the Pallas window and text attention, the CPU window kernel),
# which the "dots" remat policy saves. A kernel is not a matrix product to the policy, so without the name
# the backward would run the forward kernel again for the output its consumer's gradient needs (the output
# projection's weight gradient). Saving costs a copy: JAX rounds a saved value to its own dtype after its
# producer, which XLA cannot fuse into a kernel; for attention that copy is far cheaper than the kernel
# (docs/scale-out.md). The depthwise convolution's kernel is not named: its rerun costs about the copy.
KERNEL_OUT = "kernel_out"


_SAVE_KERNEL_OUTPUTS = contextvars.ContextVar("save_kernel_outputs", default=True)


def kernel_output(x: jax.Array) -> jax.Array:
    """``x``, a kernel's output, named :data:`KERNEL_OUT` for remat policies (unless traced under
    :func:`kernel_outputs_unsaved`)."""
    return checkpoint_name(x, KERNEL_OUT) if _SAVE_KERNEL_OUTPUTS.get() else x


@contextlib.contextmanager
def kernel_outputs_unsaved():
    """Trace a part whose backward is never computed (a frozen vision tower) with its kernels' outputs
    unnamed, so that no remat policy saves them."""
    token = _SAVE_KERNEL_OUTPUTS.set(False)
    try:
        yield
    finally:
        _SAVE_KERNEL_OUTPUTS.reset(token)


# "dots" saves the matrix products, the kernels' outputs and the text model's dropout masks
# (florence_jax.modeling.dropout: a byte per element, where recomputing them costs Threefry hashes); "full"
# saves nothing.
_REMAT = {"full": None, "dots": jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    jax.checkpoint_policies.save_only_these_names(DROPOUT_KEEP, KERNEL_OUT))}


def _remat_policy(policy: str):
    if policy != "none" and policy not in _REMAT:
        raise ValueError(f"unknown remat_policy {policy!r}; expected none, full or dots")
    return _REMAT.get(policy)


def maybe_remat(fn, policy: str):
    """Wrap a module call with ``nnx.remat`` according to the config's ``remat_policy``."""
    saveable = _remat_policy(policy)
    return fn if policy == "none" else nnx.remat(fn, policy=saveable)


def remat_function(fn, policy: str):
    """``maybe_remat`` for a pure function (e.g. a scan body)."""
    saveable = _remat_policy(policy)
    return fn if policy == "none" else jax.checkpoint(fn, policy=saveable)


Dtype = Any
