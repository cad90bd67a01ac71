"""The compile watcher counts what XLA compiles inside a call site, so a recompiling step cannot hide."""

import jax
import jax.numpy as jnp

from train.compiles import CompileWatch, compile_count


def test_compile_watch_counts_first_compile_and_recompiles():
    @jax.jit
    def f(x):
        return jnp.sin(x) * 3.0 + 1.0

    a, b = jnp.ones((3, 5)), jnp.ones((4, 5))  # made outside the watch (creating them compiles too)
    watch = CompileWatch("f")
    for _ in range(3):
        with watch:
            f(a).block_until_ready()
    assert watch.calls == 3 and watch.compiles == 1 and watch.recompiles == 0
    with watch:  # a new shape: one recompile
        f(b).block_until_ready()
    with watch:  # back to a seen shape: served from jit's cache
        f(a).block_until_ready()
    assert watch.recompiles == 1 and watch.compiles == 2


def test_compile_count_is_monotonic_and_ignores_cached_calls():
    @jax.jit
    def g(x):
        return x @ x.T

    x = jnp.ones((6, 2))
    g(x).block_until_ready()
    before = compile_count()
    for _ in range(3):
        g(x).block_until_ready()
    assert compile_count() == before
