"""Keep freed host memory in the process, so XLA:CPU programs stop page-faulting through their buffers.

XLA:CPU allocates an executable's temporaries (one arena of hundreds of MB for a 768 px vision tower)
and many of its fused kernels' buffers anew on every call. glibc serves each allocation over 32 MB with a
fresh ``mmap`` and unmaps it when freed, so every call touches all of that memory for the first time
again: for Florence-2-base's vision tower on two 768 px images, about 0.9 million page faults and 2 s of
kernel time per 6 s call on a 2-core machine (measured with ``getrusage``; ``perf`` puts the faults in
the matmul and elementwise kernels writing their outputs).

:func:`retain_freed_memory` tells glibc (``mallopt``) to serve every allocation from one heap
(``M_ARENA_MAX`` 1, ``M_MMAP_MAX`` 0) and never to return freed memory to the OS (``M_TRIM_THRESHOLD``
off), which is what the allocators people preload for the same reason (tcmalloc, jemalloc) do. The
tower's call then takes 4.9-5.9 s instead of 6.0-6.9 s, with no page faults. The process's resident
memory stays at its peak, which a training or benchmark process reaches on its first step anyway.

The command-line entry points (``train.main``, ``train.evaluate``, ``florence_jax.predict``,
``scripts.benchmark``) call it when their programs will run on the CPU; GPU and TPU programs keep their
buffers in device memory and are left as they are. ``FLORENCE_JAX_RETAIN_HOST_MEMORY=0`` turns it off;
it does nothing on other C libraries. glibc fixes its number of arenas when a second thread first
allocates, so this must run before JAX starts its thread pools (its first ``jax.devices()`` or
computation); importing JAX is fine. Called later, the page faults stay.
"""

from __future__ import annotations

import ctypes
import os
import platform

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_applied = False


def will_run_on_cpu() -> bool:
    """Whether JAX's programs will run on the CPU, decided without starting a backend
    (:func:`florence_jax.hardware.predicted_backend`)."""
    from florence_jax.hardware import predicted_backend

    return predicted_backend() == "cpu"


def retain_freed_memory(only_on_cpu: bool = True) -> bool:
    """Make glibc keep freed memory for reuse (see the module's docstring). Returns whether it did.

    With ``only_on_cpu`` (the default) it does nothing unless :func:`will_run_on_cpu`, nor where
    ``FLORENCE_JAX_RETAIN_HOST_MEMORY`` is 0.
    """
    global _applied
    if _applied:
        return True
    if os.environ.get("FLORENCE_JAX_RETAIN_HOST_MEMORY", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if only_on_cpu and not will_run_on_cpu():
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # mallopt returns 1 on success. -1 as the trim threshold turns trimming off.
    _applied = all(libc.mallopt(opt, val) == 1 for opt, val in
                   ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
    return _applied
