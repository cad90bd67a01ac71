"""CPU kernels XLA:CPU lacks, built at first use with the host's C++ compiler and called through XLA's FFI.

One kernel for now, ``rows_product.cc``: a few rows times a large float32 matrix stored panel-major, the
shape of every weight product in a decoding step (a step has batch x beams rows; XLA:CPU's dot libraries run
those at about half the FMA peak, docs/benchmarks.md). The decoding loop uses it under
``Formulations.decode_dots="kernel"`` (the CPU default): :func:`decode_products` packs the decoder's weights
once per generation, before the loop, and :func:`packed_product` is what a linear layer calls inside it.

The shared library is compiled with ``-O3 -march=native`` for the host it runs on and cached under
``$FLORENCE_JAX_CACHE`` (default ``~/.cache/florence_jax``)/kernels, keyed by the source, the flags, the
compiler and the CPU's features, so hosts that share a home directory never load each other's build. If
no compiler is found or the build fails, :func:`available` says why (once, as a warning) and the loop keeps
XLA's dots: same values up to float32 summation order.
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

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("rows_product.cc")
_TARGET = "florence_rows_product"
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
    source = _SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(b"\0".join([source, " ".join(_FLAGS).encode(), version.encode(),
                                     _cpu_features().encode(), jax.ffi.include_dir().encode()])).hexdigest()
    out = cache_dir() / f"rows_product-{key[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Compile beside the target and rename into place: a concurrent build or a crash never leaves a
    # half-written library under the final name.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [compiler, *_FLAGS, "-I", jax.ffi.include_dir(), "-o", tmp, str(_SOURCE)]
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
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return f"building or loading {_SOURCE.name} failed: {e}"
    log.info("CPU decoding kernel: %s", lib._name)
    return lib


def available() -> bool:
    """Whether the kernel is built and registered (builds it on the first call: about 2 seconds). When it
    is not, warns once with the reason."""
    lib = _library()
    if isinstance(lib, str):
        _warn_once(lib)
        return False
    return True


@functools.cache
def _warn_once(reason: str) -> None:
    warnings.warn(f"florence_jax's CPU decoding kernel is unavailable ({reason}); decoding uses XLA's dots "
                  "(set the hardware formulation decode_dots=compiler to silence this)", stacklevel=3)


def panel_width() -> int:
    lib = _library()
    if isinstance(lib, str):
        raise RuntimeError(f"the CPU decoding kernel is unavailable: {lib}")
    return int(lib.florence_rows_product_panel())


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
