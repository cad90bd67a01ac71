"""florence_jax.host_memory: freed host memory is kept, so reusing it costs no page faults."""

import subprocess
import sys
import textwrap

import pytest

from florence_jax import host_memory

# A child process allocates, writes and frees a 64 MiB buffer five times, the way XLA:CPU allocates an
# executable's temporaries on every call, and prints the minor page faults of the last four rounds.
_CHILD = textwrap.dedent("""
    import ctypes, resource, sys
    from florence_jax.host_memory import retain_freed_memory
    applied = retain_freed_memory(only_on_cpu=False) if sys.argv[1] == "retain" else False
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20
    faults = []
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        libc.free(p)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(applied, sum(faults[1:]))
""")


def _faults(mode: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_reused_buffers_page_fault_only_without_retained_memory():
    applied, retained = _faults("retain")
    if not applied:
        pytest.skip("not glibc")
    _, default = _faults("default")
    # Without it each round maps the buffer anew: 16,384 faults of 4 KiB pages per round. With
    # transparent huge pages on every mapping there would be 32 per round, too few to tell apart.
    if default < 4 * 4096:
        pytest.skip(f"only {default} faults in four rounds by default: pages too large to compare")
    assert retained < default / 50, (retained, default)


def test_it_waits_for_the_cpu_and_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(host_memory, "_applied", False)
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not host_memory.will_run_on_cpu()
    assert host_memory.retain_freed_memory() is False
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_memory.will_run_on_cpu()
    monkeypatch.setenv("FLORENCE_JAX_RETAIN_HOST_MEMORY", "0")
    assert host_memory.retain_freed_memory() is False
    assert host_memory._applied is False
