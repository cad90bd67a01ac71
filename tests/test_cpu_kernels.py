"""The CPU kernel for a few rows times a large float32 matrix (florence_jax/cpu_kernels): its products against
float64 numpy, inside a compiled loop and across XLA's threads; its build cache; its bad-input errors; and
the fallback to XLA's dots when it cannot be built."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from florence_jax import cpu_kernels


@pytest.fixture(scope="module", autouse=True)
def built():
    if not cpu_kernels.available():
        pytest.fail("the CPU kernel did not build here; the tests of its fallback run without it")


def _close(out, x, w):
    """Within the classic bound of a float32 dot product summed in any order: k * eps32 * (|x| @ |w|) per
    element. A wrong weight, row or column is off by the size of a term, far outside it."""
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    bound = x64.shape[-1] * np.finfo(np.float32).eps * (np.abs(x64) @ np.abs(w64))
    err = np.abs(np.asarray(out, np.float64) - x64 @ w64)
    assert np.all(err <= bound), float((err / bound).max())


# rows: one beam, a row of beams, the 12-row block, one past it, more than two blocks; n: under one panel,
# exactly one, one past, and enough panels (>= 16) for the product to be split among threads.
@pytest.mark.parametrize("rows", [1, 3, 12, 13, 27])
@pytest.mark.parametrize("n", [5, 32, 33, 1000])
def test_rows_product_matches_float64(rows, n):
    rng = np.random.default_rng(rows * 1000 + n)
    k = 96
    x = rng.standard_normal((rows, k), np.float32)
    w = rng.standard_normal((k, n), np.float32)
    out = jax.jit(lambda x, w: cpu_kernels.rows_product(x, cpu_kernels.pack(w), n))(x, w)
    assert out.shape == (rows, n) and out.dtype == jnp.float32
    _close(out, x, w)


def test_rows_product_keeps_leading_dims_and_padding_never_leaks():
    """(batch, 1, K) inputs, as a decoding step has them; the panel's zero padding past column n is never
    written to the output (a column count one short of a full panel)."""
    rng = np.random.default_rng(0)
    n = cpu_kernels.panel_width() * 3 - 1
    x = rng.standard_normal((4, 1, 64), np.float32)
    w = rng.standard_normal((64, n), np.float32)
    packed = cpu_kernels.pack(jnp.asarray(w))
    assert packed.shape == (3, 64, cpu_kernels.panel_width())
    assert float(jnp.abs(packed[-1, :, -1]).max()) == 0.0
    out = cpu_kernels.rows_product(jnp.asarray(x), packed, n)
    assert out.shape == (4, 1, n)
    _close(np.asarray(out)[:, 0], x[:, 0], w)


def test_rows_product_inside_a_compiled_loop():
    """The decoding loop's use: weights packed once outside a while loop, the product called each step on
    the previous step's output (so an error in any step carries into the result)."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((128, 128), np.float32) / np.sqrt(128)).astype(np.float32)
    x0 = rng.standard_normal((12, 128), np.float32)

    @jax.jit
    def run(x, w):
        packed = cpu_kernels.pack(w)
        return jax.lax.fori_loop(0, 6, lambda i, h: jnp.tanh(cpu_kernels.rows_product(h, packed, 128)), x)

    want = x0.astype(np.float64)
    for _ in range(6):
        want = np.tanh(want @ w.astype(np.float64))
    # Each step adds float32 rounding (~1e-6 here) and tanh is 1-Lipschitz; w's norm (~2) can double an
    # earlier step's error each step: 2**6 * 1e-6 < 1e-4. A wrong step is off by O(0.1).
    np.testing.assert_allclose(np.asarray(run(x0, w)), want, rtol=0, atol=1e-4)


def test_a_mismatched_packing_is_a_clear_error():
    x = jnp.ones((3, 64), jnp.float32)
    packed = cpu_kernels.pack(jnp.ones((64, 100), jnp.float32))
    with pytest.raises(Exception, match="florence_rows_product: expected"):
        jax.block_until_ready(cpu_kernels.rows_product(x, packed, 200))  # 200 columns need 7 panels, not 4
    with pytest.raises(Exception, match="florence_rows_product: expected"):
        jax.block_until_ready(cpu_kernels.rows_product(jnp.ones((3, 65), jnp.float32), packed, 100))


def test_the_build_is_cached_per_host_and_never_half_written(tmp_path, monkeypatch):
    monkeypatch.setenv("FLORENCE_JAX_CACHE", str(tmp_path))
    compiler = cpu_kernels._compiler()
    first = cpu_kernels._build(compiler)
    assert first.parent == tmp_path / "kernels" and first.exists()
    stamp = first.stat().st_mtime_ns
    assert cpu_kernels._build(compiler) == first and first.stat().st_mtime_ns == stamp  # no second compile
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary left beside it
    monkeypatch.setattr(cpu_kernels, "_cpu_features", lambda: "flags : another host")
    assert cpu_kernels._build(compiler) != first  # another CPU gets its own build


def test_a_failed_build_says_why_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("FLORENCE_JAX_CACHE", str(tmp_path))
    bad = tmp_path / "broken.cc"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_kernels, "_SOURCE", bad)
    with pytest.raises(RuntimeError, match="failed"):
        cpu_kernels._build(cpu_kernels._compiler())
    assert list((tmp_path / "kernels").iterdir()) == []


def test_without_a_compiler_decoding_keeps_xlas_dots(monkeypatch):
    """No compiler: ``available()`` is False with one warning naming the reason, and a decoding loop
    built under the kernel formulation packs nothing (its layers keep their own products)."""
    from florence_jax.generation import _kernel_weights

    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: None)
    cpu_kernels._library.cache_clear()
    cpu_kernels._warn_once.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not cpu_kernels.available()
            assert not cpu_kernels.available()
        assert len(caught) == 1 and "no C++ compiler" in str(caught[0].message)

        class Formulations:
            platform, decode_dots = "cpu", "kernel"

        class Model:
            formulations = Formulations()

        assert _kernel_weights(Model()) == {}
        with cpu_kernels.decode_products({}):
            assert cpu_kernels.packed_product(object(), jnp.ones((3, 8), jnp.float32)) is None
    finally:
        monkeypatch.undo()
        cpu_kernels._library.cache_clear()
        cpu_kernels._warn_once.cache_clear()
    assert cpu_kernels.available()


def test_packed_products_only_for_few_float32_rows():
    """Inside ``decode_products`` an owner's product runs the kernel for up to MAX_ROWS float32 rows; more
    rows (a GEMM), another dtype or an owner that was not packed get None (the caller's own product)."""
    owner, other = object(), object()
    w = jnp.asarray(np.random.default_rng(2).standard_normal((16, 40)), jnp.float32)
    few = jnp.ones((cpu_kernels.MAX_ROWS, 16), jnp.float32)
    with cpu_kernels.decode_products({owner: w, other: w.astype(jnp.bfloat16)}):
        assert cpu_kernels.packed_product(owner, few).shape == (cpu_kernels.MAX_ROWS, 40)
        assert cpu_kernels.packed_product(owner, jnp.ones((cpu_kernels.MAX_ROWS + 1, 16), jnp.float32)) is None
        assert cpu_kernels.packed_product(owner, few.astype(jnp.bfloat16)) is None
        assert cpu_kernels.packed_product(other, few) is None
    assert cpu_kernels.packed_product(owner, few) is None  # outside the context
