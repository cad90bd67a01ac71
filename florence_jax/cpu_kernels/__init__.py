"""CPU kernels XLA:CPU lacks, built at first use with the host's C++ compiler and called through XLA's FFI.

Kernels for the decoding loop and the vision tower, built into one library:

- ``rows_product.cc``: a few rows times a large float32 matrix stored panel-major, the shape of every weight
  product in a decoding step (a step has batch x beams rows; XLA:CPU's dot libraries run those at about
  half the FMA peak, docs/benchmarks.md). Used under ``Formulations.decode_dots="kernel"`` (the CPU
  default): :func:`decode_products` packs the decoder's weights once per generation, before the loop, and
  :func:`packed_product` is what a linear layer calls inside it.
- ``cross_attention.cc``: a step's attention, a few query rows per (batch row, head) against keys stored
  panel-major over positions, split among threads (XLA:CPU runs it as one matrix-vector product per beam
  and head, on one core). Used under ``Formulations.decode_attention="kernel"`` (the CPU default): for the
  cross-attention :func:`pack_cross_kv` lays each layer's encoder keys out once per generation (a prompt's
  beams share them: read once for all) and :func:`cross_attention` runs a step's; :func:`cached_attention`
  runs the self-attention over a cache (:func:`empty_cache`, :func:`write_cache`) whose rows also say which
  row holds each slot, so beam search forks a hypothesis without copying its keys and values.
- ``top_k.cc``: beam search's best 2 x beams of each row's beams x vocabulary scores, in XLA's order, one
  pass per row (XLA:CPU partially sorts each row, one row at a time). Used under
  ``Formulations.decode_top_k="kernel"`` (the CPU default): :func:`top_k`.
- ``window_attention.cc``: DaViT's window attention (144 tokens, heads of 32 channels), every (window, head)
  pair from the qkv projection's output as it lies, the pairs split among threads (XLA:CPU runs the two
  products of each pair as a batch of small products on one core, after transposing q, k and v). Used
  under ``Formulations.window_attention="kernel"`` (the CPU default): :func:`window_attention`, its
  gradient through XLA's einsums (``florence_jax.modeling.davit``).
- ``depthwise_conv.cc``: DaViT's 3x3 depthwise convolution with its bias and the block's residual in one pass
  over the image, three input rows per output row (XLA:CPU pads the input in one pass, then slices it nine
  times per element). Used under ``Formulations.depthwise_conv="kernel"`` (the CPU default):
  :func:`depthwise_residual`, its gradient through the shifted sum's (``florence_jax.modeling.davit``).

The shared library is compiled with ``-O3 -march=native`` for the host it runs on and cached under
``$FLORENCE_JAX_CACHE`` (default ``~/.cache/florence_jax``)/kernels, keyed by the source, the flags, the
compiler and the CPU's features, so hosts that share a home directory never load each other's build. If
no compiler is found or the build fails, :func:`available` says why (once, as a warning) and the model keeps
XLA's ops: same values up to float32 rounding.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

_SOURCES = tuple(Path(__file__).with_name(f)
                 for f in ("rows_product.cc", "cross_attention.cc", "top_k.cc", "window_attention.cc",
                           "depthwise_conv.cc"))
_HEADERS = (Path(__file__).with_name("kernels.h"),)  # what the sources share; part of the build's key
_TARGET = "florence_rows_product"
_CROSS_TARGET = "florence_cross_attention"
_CACHED_TARGET = "florence_cached_attention"
_TOP_K_TARGET = "florence_top_k"
_WINDOW_TARGET = "florence_window_attention"
_DEPTHWISE_TARGET = "florence_depthwise_residual"
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
# A product with more rows than this (a prompt's encoder states, a training batch) is a GEMM: XLA's own
# dot libraries are the right kernel for it.
MAX_ROWS = 64


def cache_dir() -> Path:
    root = os.environ.get("FLORENCE_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "florence_jax")
    return Path(root) / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and (path := shutil.which(name)):
            return path
    return None


def _cpu_features() -> str:
    """What ``-march=native`` builds for: the CPU's feature flags where the OS lists them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _build(compiler: str) -> Path:
    sources = [p.read_bytes() for p in _SOURCES + _HEADERS]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(b"\0".join([*sources, " ".join(_FLAGS).encode(), version.encode(),
                                     _cpu_features().encode(), jax.ffi.include_dir().encode()])).hexdigest()
    out = cache_dir() / f"decoding_kernels-{key[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Compile beside the target and rename into place: a concurrent build or a crash never leaves a
    # half-written library under the final name.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [compiler, *_FLAGS, "-I", jax.ffi.include_dir(), "-o", tmp, *map(str, _SOURCES)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The loaded kernel library, registered with XLA; or, if it cannot be had, the reason why."""
    compiler = _compiler()
    if compiler is None:
        return "no C++ compiler found (set CXX or install g++ or clang++)"
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build(compiler)))
        jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.florence_rows_product), platform="cpu")
        for target in (_CROSS_TARGET, _CACHED_TARGET, _TOP_K_TARGET, _WINDOW_TARGET, _DEPTHWISE_TARGET):
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, target)), platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return f"building or loading {' and '.join(p.name for p in _SOURCES)} failed: {e}"
    log.info("CPU kernels: %s", lib._name)
    return lib


def available() -> bool:
    """Whether the kernels are built and registered (builds them on the first call: about 5 seconds). When
    they are not, warns once with the reason."""
    lib = _library()
    if isinstance(lib, str):
        _warn_once(lib)
        return False
    return True


@functools.cache
def _warn_once(reason: str) -> None:
    warnings.warn(f"florence_jax's CPU kernels are unavailable ({reason}); the model uses XLA's ops (set the "
                  "hardware formulations decode_dots, decode_attention and decode_top_k to compiler, "
                  "window_attention to einsum and depthwise_conv to shifted_sum to silence this)", stacklevel=3)


def _loaded() -> ctypes.CDLL:
    lib = _library()
    if isinstance(lib, str):
        raise RuntimeError(f"the CPU kernels are unavailable: {lib}")
    return lib


def panel_width() -> int:
    return int(_loaded().florence_rows_product_panel())


def pack(w: jax.Array) -> jax.Array:
    """``w`` (K, N) as the kernel stores it: (ceil(N / panel), K, panel), zero padded past column N."""
    k, n = w.shape
    pw = panel_width()
    panels = -(-n // pw)
    return jnp.pad(w, ((0, 0), (0, panels * pw - n))).reshape(k, panels, pw).transpose(1, 0, 2)


def rows_product(x: jax.Array, packed: jax.Array, n: int) -> jax.Array:
    """``x @ w`` for ``x`` (..., K) float32 and ``packed = pack(w)`` of a (K, ``n``) float32 ``w``."""
    rows = x.reshape(-1, x.shape[-1])
    out = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((rows.shape[0], n), jnp.float32))(rows, packed)
    return out.reshape(*x.shape[:-1], n)


# ------------------------------------------------------------------------------------ the decoding loop
_PACKED: contextvars.ContextVar[dict[int, tuple[jax.Array, int]] | None] = contextvars.ContextVar(
    "florence_jax_packed_weights", default=None)


@contextlib.contextmanager
def decode_products(weights):
    """Within this context (traced inside a jitted program), :func:`packed_product` of each owner in
    ``weights`` (``{owner: (K, N) float32 matrix}``, owners being modules) runs the kernel on the matrix
    packed here, once, outside whatever loop the context then traces. Matrices that are not float32 are
    left to XLA."""
    packed = {id(owner): (pack(w), w.shape[1]) for owner, w in weights.items() if w.dtype == jnp.float32}
    token = _PACKED.set(packed)
    try:
        yield
    finally:
        _PACKED.reset(token)


def packed_product(owner, x: jax.Array) -> jax.Array | None:
    """``x @ w`` by the kernel when ``owner``'s matrix was packed by the enclosing :func:`decode_products`
    and ``x`` is a float32 few-row input; None otherwise (the caller runs its own product)."""
    packed = _PACKED.get()
    if not packed or id(owner) not in packed or x.dtype != jnp.float32:
        return None
    if x.size // x.shape[-1] > MAX_ROWS:
        return None
    w, n = packed[id(owner)]
    return rows_product(x, w, n)


# ------------------------------------------------------------------------------------ cross-attention
class CrossKV(NamedTuple):
    """One decoder layer's cross-attention keys and values as :func:`cross_attention` reads them, made once
    per generation by :func:`pack_cross_kv`: ``key`` (batch, heads, panels, head_dim, panel) panel-major
    over positions, ``value`` (batch, heads, positions, head_dim), ``fill`` (batch, positions): NaN where a
    position's score stands, float32's minimum where the mask hides it (as the einsum path), -inf on the
    padding up to whole panels (weight exactly 0). The head dimension is zero padded to whole vectors."""

    key: jax.Array
    value: jax.Array
    fill: jax.Array


def _head_dims() -> tuple[int, int]:
    lib = _loaded()
    return int(lib.florence_cross_attention_lanes()), int(lib.florence_cross_attention_max_head_dim())


def _padded(head_dim: int) -> int:
    """The head size the attention kernels store: ``head_dim`` rounded up to whole vectors."""
    lanes, _ = _head_dims()
    return -(-head_dim // lanes) * lanes


def _pad_heads(x: jax.Array, padded: int) -> jax.Array:
    """``x`` (..., head_dim) zero padded to (..., padded)."""
    extra = padded - x.shape[-1]
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)]) if extra else x


def cross_attention_supported(head_dim: int) -> bool:
    """Whether :func:`cross_attention` takes heads this size (up to 8 vectors: 128 floats with AVX-512)."""
    return _padded(head_dim) <= _head_dims()[1]


def pack_cross_kv(key: jax.Array, value: jax.Array, mask: jax.Array | None) -> CrossKV:
    """Heads-major float32 ``key``, ``value`` (batch, heads, positions, head_dim) and the boolean or 0/1
    ``mask`` (batch, positions; None: every position) as :class:`CrossKV`."""
    b, h, n, d = key.shape
    pw = panel_width()
    dp, np_ = _padded(d), -(-n // pw) * pw
    pad = ((0, 0), (0, 0), (0, np_ - n), (0, dp - d))
    k = jnp.pad(key, pad).reshape(b, h, np_ // pw, pw, dp).transpose(0, 1, 2, 4, 3)
    v = jnp.pad(value, pad)
    allowed = jnp.ones((b, n), bool) if mask is None else mask.astype(bool)
    fill = jnp.where(allowed, jnp.nan, jnp.finfo(jnp.float32).min).astype(jnp.float32)
    fill = jnp.pad(fill, ((0, 0), (0, np_ - n)), constant_values=-jnp.inf)
    return CrossKV(k, v, fill)


def cross_attention(q: jax.Array, kv: CrossKV, scale: float) -> jax.Array:
    """Softmax attention of ``q`` (rows, 1, heads * head_dim), rows = batch x beams in consecutive groups
    per prompt, over the prompt's :class:`CrossKV`; returns (rows, 1, heads * head_dim)."""
    rows, width = q.shape[0], q.shape[-1]
    b, heads, dp = kv.key.shape[0], kv.key.shape[1], kv.key.shape[3]
    d = width // heads
    qh = _pad_heads(q.reshape(b, rows // b, heads, d), dp)
    out = jax.ffi.ffi_call(_CROSS_TARGET, jax.ShapeDtypeStruct(qh.shape, jnp.float32))(
        qh, kv.key, kv.value, kv.fill, scale=np.float32(scale))
    return out[..., :d].reshape(rows, 1, width)


# The self-attention cache as florence_cached_attention reads it: key and value (rows, heads, slots,
# head_dim'), head_dim' the head size zero padded to whole vectors; source (rows, slots) int32, the row whose
# slot each row's hypothesis reads (beam search forks a hypothesis by copying its row of sources).
def empty_cache(rows: int, heads: int, slots: int, head_dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    shape = (rows, heads, slots, _padded(head_dim))
    return jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros((rows, slots), jnp.int32)


def write_cache(key: jax.Array, value: jax.Array, source: jax.Array, k: jax.Array, v: jax.Array,
                index: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A step's ``k``, ``v`` (rows, 1, heads * head_dim) written at slot ``index`` of each row, which each
    row's hypothesis then reads from its own row."""
    rows, heads, _, dp = key.shape
    d = k.shape[-1] // heads

    def heads_of(x):
        return _pad_heads(x.reshape(rows, heads, 1, d), dp)

    zero = jnp.int32(0)
    index = jnp.asarray(index, jnp.int32)
    key = jax.lax.dynamic_update_slice(key, heads_of(k), (zero, zero, index, zero))
    value = jax.lax.dynamic_update_slice(value, heads_of(v), (zero, zero, index, zero))
    source = jax.lax.dynamic_update_slice(source, jnp.arange(rows, dtype=jnp.int32)[:, None], (zero, index))
    return key, value, source


def cached_attention(q: jax.Array, key: jax.Array, value: jax.Array, source: jax.Array, index: jax.Array,
                     scale: float) -> jax.Array:
    """Each row's query ``q`` (rows, 1, heads * head_dim) over its hypothesis' slots 0 .. ``index``."""
    rows, heads, _, dp = key.shape
    d = q.shape[-1] // heads
    qh = _pad_heads(q.reshape(rows, heads, d), dp)
    length = jnp.reshape(jnp.asarray(index, jnp.int32) + 1, (1,))
    out = jax.ffi.ffi_call(_CACHED_TARGET, jax.ShapeDtypeStruct(qh.shape, jnp.float32))(
        qh, key, value, source, length, scale=np.float32(scale))
    return out[..., :d].reshape(rows, 1, heads * d)


# ------------------------------------------------------------------------------------------ top k
def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``jax.lax.top_k(x, k)`` for a float32 ``x`` (rows, n) with ``k`` up to 64: the same values and indices
    (floats in the total order of their bits, ties to the lower index)."""
    return jax.ffi.ffi_call(_TOP_K_TARGET, (jax.ShapeDtypeStruct((x.shape[0], k), jnp.float32),
                                            jax.ShapeDtypeStruct((x.shape[0], k), jnp.int32)))(x, k=np.int64(k))


def top_k_supported(k: int) -> bool:
    return 1 <= k <= int(_loaded().florence_top_k_max_k())


# ------------------------------------------------------------------------------------ accounting
def matmul_flops(target: str, inputs: list[tuple[int, ...]], outputs: list[tuple[int, ...]]) -> float:
    """The matrix products' FLOPs (2 per multiply-add) of a call to one of these kernels with operands and
    results of these shapes, as an MFU counts an einsum's; 0 for a target that is not a product kernel."""
    if target == _TARGET:  # x (rows, K) @ w: y (rows, N)
        (rows, k), (_, n) = inputs[0], outputs[0]
        return 2.0 * rows * k * n
    if target == _WINDOW_TARGET:  # two (N x N) by (N x D) products per window and head: 4 W N^2 C
        w, n, c = outputs[0]
        return 4.0 * w * n * n * c
    return 0.0


# ------------------------------------------------------------------------------------ window attention
def window_attention(qkv: jax.Array, heads: int, scale: float) -> jax.Array:
    """Softmax attention inside each window: ``qkv`` float32 (windows, tokens, 3 * C) in the qkv projection's
    order (q, k, v, each ``heads`` x head size), the result (windows, tokens, C) in heads x head size order.
    Forward only: ``florence_jax.modeling.davit`` gives it its gradient."""
    w, n, c3 = qkv.shape
    return jax.ffi.ffi_call(_WINDOW_TARGET, jax.ShapeDtypeStruct((w, n, c3 // 3), jnp.float32))(
        qkv, heads=np.int64(heads), scale=np.float32(scale))


def depthwise_residual(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """``x + conv(x) + bias`` for float32 ``x`` (batch, H, W, C), ``conv`` the 3x3 depthwise convolution with
    padding 1 whose taps ``kernel`` holds as (3, 3, 1, C) (or any shape of 9 x C values, rows first), ``bias``
    (C,). Forward only: ``florence_jax.modeling.davit`` gives it its gradient."""
    c = x.shape[-1]
    return jax.ffi.ffi_call(_DEPTHWISE_TARGET, jax.ShapeDtypeStruct(x.shape, jnp.float32))(
        x, kernel.reshape(9, c), bias)


def depthwise_supported(channels: int) -> bool:
    """Whether :func:`depthwise_residual` takes this many channels: whole vectors."""
    return channels % _head_dims()[0] == 0


def window_attention_supported(head_dim: int) -> bool:
    """Whether :func:`window_attention` takes heads this size: whole vectors, up to 8 of them."""
    lanes, most = _head_dims()
    return head_dim % lanes == 0 and head_dim <= most
