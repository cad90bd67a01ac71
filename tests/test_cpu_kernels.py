"""The CPU kernels (florence_jax/cpu_kernels): a few rows times a large float32 matrix, a step's
cross-attention, window attention and the depthwise convolution, against float64 numpy, inside a compiled
loop and across XLA's threads; their build cache; their bad-input errors; and the fallback to XLA's dots
when they cannot be built."""

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
    monkeypatch.setattr(cpu_kernels, "_SOURCES", (bad,))
    with pytest.raises(RuntimeError, match="failed"):
        cpu_kernels._build(cpu_kernels._compiler())
    assert list((tmp_path / "kernels").iterdir()) == []


def test_without_a_compiler_decoding_keeps_xlas_dots(monkeypatch):
    """No compiler: ``available()`` is False with one warning naming the reason, a decoding loop built under
    the kernel formulation packs nothing (its layers keep their own products), and the tower's depthwise
    convolutions take the shifted sum."""
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
        # the tower's depthwise convolutions under the kernel formulation take the shifted sum
        from flax import nnx

        from florence_jax.modeling.davit import DepthwiseConv, _depthwise_conv3x3
        from train.state import tiny_config

        conv = DepthwiseConv(tiny_config(128, 127), 32, rngs=nnx.Rngs(0))
        x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 5, 32)), jnp.float32)
        assert conv.formulation == "kernel" and not conv.runs_cpu_kernel(x)
        np.testing.assert_array_equal(conv.residual(x), _depthwise_conv3x3(x, conv.kernel[...], conv.bias[...]) + x)
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


def _attention64(q, k, v, mask):
    """Softmax attention in float64, q (B, G, H, D), k and v (B, H, S, D), mask (B, S): a masked position's
    score is float32's minimum, as the einsum path, so a row with every position masked averages them."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = np.einsum("bghd,bhsd->bghs", q, k) / np.sqrt(q.shape[-1])
    s = np.where(mask[:, None, None, :], s, np.finfo(np.float32).min)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bghs,bhsd->bghd", p, v)


# (prompts, beams, heads, positions, head_dim): greedy (one row), beam 3, more beams than the kernel's block
# of 4, head sizes under a vector (padded), Florence-2's 64 and the largest taken; positions under a panel,
# not a whole number of panels, Florence-2 base's 577 image tokens plus a prompt; enough (prompt, head)
# pairs to be split among threads.
@pytest.mark.parametrize("b,g,h,n,d", [(3, 1, 2, 5, 8), (4, 3, 12, 593, 64), (2, 6, 3, 70, 20),
                                       (1, 2, 2, 129, 128), (5, 3, 4, 33, 64)])
def test_cross_attention_matches_float64(b, g, h, n, d):
    """Within (n + d) float32 roundings of the values' scale per element: the scores' sums, the exponential
    (a polynomial within 2 ulp), the softmax's sum and the weighted sum of values. A wrong position,
    beam, head or mask moves an output by a whole probability times a value, far outside it."""
    rng = np.random.default_rng(b * 1000 + n)
    q = rng.standard_normal((b * g, 1, h * d), np.float32) * 2
    k, v = (rng.standard_normal((b, h, n, d), np.float32) for _ in range(2))
    mask = rng.random((b, n)) > 0.3
    if b > 1:
        mask[1] = False  # a prompt with every position masked: uniform weights, as the einsum path
    kv = cpu_kernels.pack_cross_kv(jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask))
    out = jax.jit(lambda q, kv: cpu_kernels.cross_attention(q, kv, d**-0.5))(q, kv)
    assert out.shape == q.shape and out.dtype == jnp.float32
    want = _attention64(q.reshape(b, g, h, d), k, v, mask).reshape(b * g, 1, h * d)
    bound = (n + d) * np.finfo(np.float32).eps * np.abs(v).max()
    assert np.abs(np.asarray(out, np.float64) - want).max() <= bound
    unmasked = cpu_kernels.pack_cross_kv(jnp.asarray(k), jnp.asarray(v), None)
    want = _attention64(q.reshape(b, g, h, d), k, v, np.ones((b, n), bool)).reshape(b * g, 1, h * d)
    assert np.abs(np.asarray(cpu_kernels.cross_attention(jnp.asarray(q), unmasked, d**-0.5)) - want).max() <= bound


def test_cross_attention_layout_and_limits():
    """Keys are packed in the rows-product kernel's panels over positions, padding weighs nothing (-inf), and
    a masked position scores float32's minimum; heads past 8 vectors are left to XLA; a mismatched
    operand is an error, not a wrong read."""
    pw = cpu_kernels.panel_width()
    k = jnp.arange(2 * 3 * 40 * 8, dtype=jnp.float32).reshape(2, 3, 40, 8)
    kv = cpu_kernels.pack_cross_kv(k, k, jnp.asarray(np.arange(40) % 2 == 0)[None].repeat(2, 0))
    panels, dp = -(-40 // pw), kv.key.shape[3]
    assert kv.key.shape == (2, 3, panels, dp, pw) and kv.value.shape == (2, 3, panels * pw, dp)
    np.testing.assert_array_equal(np.asarray(kv.key)[1, 2, 0, :8, 5], np.asarray(k)[1, 2, 5])
    fill = np.asarray(kv.fill)
    assert np.isnan(fill[:, 0]).all() and (fill[:, 1] == np.finfo(np.float32).min).all()
    assert (fill[:, 40:] == -np.inf).all()
    assert cpu_kernels.cross_attention_supported(64) and not cpu_kernels.cross_attention_supported(1024)
    with pytest.raises(Exception, match="florence_cross_attention"):
        bad = kv._replace(fill=kv.fill[:, :-1])
        jax.block_until_ready(cpu_kernels.cross_attention(jnp.ones((2, 1, 24), jnp.float32), bad, 0.3))


def test_cached_attention_follows_each_rows_sources():
    """Beam search's self-attention cache without copies: rows write their step's keys and values into their
    own row, a fork copies only the row of slot sources (``KernelLayerCache.reordered``), and each row's
    query attends over its own hypothesis' history, here tracked explicitly step by step and checked against
    float64 attention over it (bound as above). Head size 20 is zero padded to whole vectors."""
    from florence_jax.modeling.bart import KernelLayerCache

    rng = np.random.default_rng(7)
    rows, heads, d, steps = 6, 3, 20, 9
    cache = KernelLayerCache(*cpu_kernels.empty_cache(rows, heads, 4, d))
    history = [[] for _ in range(rows)]  # each row's hypothesis: its (key, value) per step
    step = jax.jit(lambda c, k, v, q, i: (lambda c2: (c2, cpu_kernels.cached_attention(q, *c2, i, d**-0.5)))(
        KernelLayerCache(*cpu_kernels.write_cache(*c, k, v, i))))
    for i in range(steps):
        if i == 4:
            cache = cache.grown(steps)  # more slots part way, as the decoding loop's segments
        k, v, q = (rng.standard_normal((rows, 1, heads * d), np.float32) for _ in range(3))
        cache, out = step(cache, k, v, q, jnp.int32(i))
        for r in range(rows):
            history[r].append((k[r, 0].reshape(heads, d), v[r, 0].reshape(heads, d)))
        keys = np.stack([np.stack([kk for kk, _ in h], 1) for h in history])  # (rows, heads, i + 1, d)
        values = np.stack([np.stack([vv for _, vv in h], 1) for h in history])
        want = _attention64(q.reshape(rows, 1, heads, d), keys, values, np.ones((rows, i + 1), bool))
        bound = (i + 1 + d) * np.finfo(np.float32).eps * np.abs(values).max()
        assert np.abs(np.asarray(out, np.float64).reshape(rows, 1, heads, d) - want).max() <= bound, i
        parents = rng.integers(0, rows, rows)  # the next step's rows continue these (repeats: forks)
        cache = cache.reordered(jnp.asarray(parents, jnp.int32))
        history = [list(history[p]) for p in parents]
    assert cache.key.shape == (rows, heads, steps, cpu_kernels.empty_cache(1, 1, 1, d)[0].shape[-1])


# Ties (lower index first), -inf (banned tokens), +0 against -0 and NaNs of both signs (XLA's total order),
# k of 1, a beam-3 row's 6, the kernel's most; rows shorter than a block, longer, and k == n.
@pytest.mark.parametrize("n,k", [(6, 1), (6, 6), (70, 1), (70, 6), (70, 64), (153984, 1), (153984, 6),
                                 (153984, 64)])
def test_top_k_is_xlas(n, k):
    rng = np.random.default_rng(n + k)
    x = rng.standard_normal((5, n)).astype(np.float32)
    x[:, ::7] = -np.inf
    x[1, [2, n // 2, n - 1]] = 9.0
    x[2] = 0.0
    x[2, 1::3] = -0.0
    x[3, n // 3] = np.nan
    x[3, n // 4] = -np.nan
    x[4] = np.round(x[4])  # many ties
    got = jax.jit(lambda x: cpu_kernels.top_k(x, k))(x)
    want = jax.lax.top_k(jnp.asarray(x), k)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    np.testing.assert_array_equal(np.asarray(got[0]).view(np.int32), np.asarray(want[0]).view(np.int32))


def test_top_k_limits():
    assert cpu_kernels.top_k_supported(64) and not cpu_kernels.top_k_supported(65)
    with pytest.raises(Exception, match="florence_top_k"):
        jax.block_until_ready(cpu_kernels.top_k(jnp.ones((2, 5), jnp.float32), 6))


def test_every_file_the_build_reads_is_keyed_and_installed():
    """The header the sources include is part of the build's cache key (a changed header is a new build) and,
    with the sources, part of the package's data (an installed, not editable, package can build)."""
    import fnmatch
    import re
    import tomllib
    from pathlib import Path

    local = {m for p in cpu_kernels._SOURCES for m in re.findall(r'#include "([^/"]+)"', p.read_text())}
    assert local and local == {p.name for p in cpu_kernels._HEADERS}
    root = Path(cpu_kernels.__file__).parents[2]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = globs["florence_jax.cpu_kernels"]
    for p in cpu_kernels._SOURCES + cpu_kernels._HEADERS:
        assert p.exists() and any(fnmatch.fnmatch(p.name, g) for g in shipped), p.name


def _window_attention64(qkv, heads):
    """Attention inside each window in float64: ``qkv`` (windows, tokens, 3 * C), heads x head size."""
    w, n, c3 = qkv.shape
    x = np.asarray(qkv, np.float64).reshape(w, n, 3, heads, c3 // 3 // heads)
    q, k, v = x[:, :, 0], x[:, :, 1], x[:, :, 2]
    s = np.einsum("wqhd,wkhd->whqk", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("whqk,wkhd->wqhd", p, v).reshape(w, n, c3 // 3)


def _lanes() -> int:
    return cpu_kernels._head_dims()[0]


# (windows, tokens, heads, head_dim in vectors): DaViT's 144-token windows with base's heads of 32 channels
# (two vectors with AVX-512); tokens under one vector and not a whole number of vectors; fewer rows than the
# kernel's block of 8 and one past it; the largest head taken; enough (window, head) pairs to be split
# among threads.
@pytest.mark.parametrize("w,n,h,dv", [(6, 144, 4, 2), (5, 3, 2, 1), (3, 20, 3, 2), (2, 9, 1, 8), (40, 16, 2, 1)])
def test_window_attention_matches_float64(w, n, h, dv):
    """Within (n + d) float32 roundings of the values' scale per element, as the cross-attention kernel:
    scores summed over d, the exponential within 2 ulp, the softmax's sum over n, the weighted sum of
    values over n. A wrong window, head, token or channel moves an output by a probability times a value."""
    d = dv * _lanes()
    rng = np.random.default_rng(w * 100 + n)
    qkv = rng.standard_normal((w, n, 3 * h * d), np.float32) * 2
    out = jax.jit(lambda x: cpu_kernels.window_attention(x, h, d**-0.5))(qkv)
    assert out.shape == (w, n, h * d) and out.dtype == jnp.float32
    want = _window_attention64(qkv, h)
    bound = (n + d) * np.finfo(np.float32).eps * np.abs(qkv).max()
    assert np.abs(np.asarray(out, np.float64) - want).max() <= bound
    # not trivially close: the attention mixes tokens, its output is not the values
    assert n == 1 or np.abs(want - qkv[..., 2 * h * d:]).max() > 100 * bound


def test_window_attention_limits():
    lanes = _lanes()
    assert cpu_kernels.window_attention_supported(lanes) and cpu_kernels.window_attention_supported(8 * lanes)
    assert not cpu_kernels.window_attention_supported(9 * lanes)
    assert not cpu_kernels.window_attention_supported(lanes + 1)  # not whole vectors: XLA's einsums
    with pytest.raises(Exception, match="florence_window_attention"):  # heads of 11 channels: not whole vectors
        jax.block_until_ready(cpu_kernels.window_attention(jnp.ones((2, 4, 99), jnp.float32), 3, 0.5))


def _tower_kernel_against(other: str, target: str, seed: int):
    """The tiny tower (the demo's model) with the CPU's defaults and with ``other``'s formulations: the
    kernel's calls in each compiled forward, and the features and parameter gradients of each (the kernel's
    backward is the formulation it replaces, taken at the same input: float32 rounding apart)."""
    from flax import nnx

    from florence_jax import Florence2ForConditionalGeneration
    from train.state import tiny_config

    model = Florence2ForConditionalGeneration(tiny_config(128, 127), rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(seed).uniform(-2, 2, (2, 64, 64, 3)), jnp.float32)

    def run(m):
        tower = m.model.vision_tower
        fwd = jax.jit(lambda t, x: t(x))
        grad = jax.jit(nnx.grad(lambda t, x: jnp.sum(t(x) ** 2)))
        calls = fwd.lower(tower, x).compile().as_text().count(f'custom_call_target="{target}"')
        grads = nnx.to_flat_state(nnx.state(grad(tower, x), nnx.Param))
        return calls, np.asarray(fwd(tower, x)), {k: np.asarray(v[...]) for k, v in grads}

    (calls, out, grads), (calls0, out0, grads0) = run(model), run(model.for_hardware(other))
    np.testing.assert_allclose(out, out0, rtol=0, atol=1e-5 * np.abs(out0).max())
    assert grads.keys() == grads0.keys()
    for k in grads:
        np.testing.assert_allclose(grads[k], grads0[k], rtol=0, atol=1e-5 * np.abs(grads0[k]).max() + 1e-30,
                                   err_msg=str(k))
    return model, calls, calls0, grads


def test_the_towers_window_attention_runs_the_kernel_with_the_einsums_gradient():
    """The CPU's default (``window_attention="kernel"``) against the einsums on the demo's tiny model (heads
    of 16 channels, windows of 16 tokens): one kernel call per spatial block in the compiled tower and none
    in the einsums'; the features within float32 rounding (the kernel's exponential and sums in another
    order, through four stages); every parameter's gradient within float32 rounding of its largest entry
    (the kernel's backward is the einsums', taken at the same qkv)."""
    model, calls, calls0, grads = _tower_kernel_against("cpu:window_attention=einsum", "florence_window_attention", 0)
    assert model.formulations.window_attention == "kernel"
    assert calls == sum(model.config.vision_config.depths) and calls0 == 0
    assert any("window_attn" in str(k) for k in grads)


def test_the_kernels_products_count_as_the_einsums_do():
    """The benchmark's MFU counts a kernel's products (``matmul_flops``) as it counts the einsums it replaces:
    the same FLOPs for window attention and for a packed product, none for a kernel that is not one."""
    from florence_jax.modeling.davit import _einsum_window_attention
    from scripts.benchmark import jaxpr_flops

    d = 2 * _lanes()
    qkv = jnp.ones((5, 144, 3 * 3 * d), jnp.float32)
    kernel = jax.make_jaxpr(lambda x: cpu_kernels.window_attention(x, 3, 0.5))(qkv)
    einsum = jax.make_jaxpr(lambda x: _einsum_window_attention(x, 3, 0.5, "xla", "heads_major"))(qkv)
    assert jaxpr_flops(kernel) == jaxpr_flops(einsum) == 4 * 5 * 144 * 144 * 3 * d
    x, w = jnp.ones((12, 64), jnp.float32), jnp.ones((64, 100), jnp.float32)
    packed = jax.make_jaxpr(lambda x, p: cpu_kernels.rows_product(x, p, 100))(x, cpu_kernels.pack(w))
    assert jaxpr_flops(packed) == jaxpr_flops(jax.make_jaxpr(jnp.matmul)(x, w)) == 2 * 12 * 64 * 100
    assert jaxpr_flops(jax.make_jaxpr(lambda x: cpu_kernels.top_k(x, 4))(jnp.ones((3, 50), jnp.float32))) == 0


def test_window_attention_runs_per_device_on_a_mesh():
    """On a data x fsdp mesh with the windows split as a step splits its batch, each device runs the kernel on
    its own windows (``sharding.per_batch_shard``): the compiled forward and backward move no activations
    between devices and give the einsums' values and gradient. The same call without the split gathers the
    windows whole, so the check can fail."""
    import re

    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from florence_jax import sharding
    from florence_jax.modeling.davit import _einsum_window_attention, _window_kernel

    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), sharding.BATCH_AXES)
    sh = NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES))
    d = _lanes()
    qkv = jnp.asarray(np.random.default_rng(0).normal(size=(16, 9, 3 * 2 * d)), jnp.float32)

    def kernel(x):
        return sharding.per_batch_shard(lambda t: _window_kernel(t, 2, 0.5, "heads_major"), x)

    def einsum(x):
        return _einsum_window_attention(x, 2, 0.5, "xla", "heads_major")

    def collectives(fn, x):
        return re.findall(r"all-gather|all-to-all|collective-permute|all-reduce",
                          fn.lower(x).compile().as_text())

    forward = jax.jit(kernel)
    backward = jax.jit(jax.grad(lambda x: jnp.sum(kernel(x) ** 2)))
    arg = jax.device_put(qkv, sh)
    assert collectives(forward, arg) == [] and collectives(backward, arg) == []
    np.testing.assert_allclose(np.asarray(forward(arg)), np.asarray(einsum(qkv)), rtol=0, atol=2e-6)
    grad = backward(arg)
    assert grad.sharding.is_equivalent_to(sh, 3)
    ref = np.asarray(jax.grad(lambda x: jnp.sum(einsum(x) ** 2))(qkv))
    np.testing.assert_allclose(np.asarray(grad), ref, rtol=0, atol=2e-6 * float(np.abs(ref).max()))
    whole = jax.jit(lambda x: _window_kernel(x, 2, 0.5, "heads_major"), in_shardings=sh)
    assert collectives(whole, qkv)


def _depthwise_residual64(x, k, b):
    """``x + b + conv(x)`` in float64, and the sum of the magnitudes of its terms (for a rounding bound)."""
    x64, k64 = np.asarray(x, np.float64), np.asarray(k, np.float64).reshape(3, 3, -1)
    h, w = x64.shape[1:3]
    xp = np.pad(x64, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = x64 + np.asarray(b, np.float64)
    mag = np.abs(out)
    for i in range(3):
        for j in range(3):
            term = xp[:, i:i + h, j:j + w] * k64[i, j]
            out, mag = out + term, mag + np.abs(term)
    return out, mag


# (batch, H, W, channels in vectors): one pixel; a row shorter than the window; rows and columns at every
# border; more rows than a thread's chunk (DaViT's rows hold 24K outputs, chunks about 64K), so rows are
# split among threads; several vectors of channels.
@pytest.mark.parametrize("b,h,w,cv", [(1, 1, 1, 1), (2, 5, 2, 1), (3, 9, 7, 3), (2, 40, 33, 8)])
def test_depthwise_residual_matches_float64(b, h, w, cv):
    """Within 11 float32 roundings of the sum of its terms' magnitudes per element (ten additions in some
    order, each product rounded once). A tap read from the wrong row, column or channel moves an output by
    a whole term, far outside it."""
    c = cv * _lanes()
    rng = np.random.default_rng(b * 1000 + h * 10 + w)
    x = rng.standard_normal((b, h, w, c), np.float32)
    k = rng.standard_normal((3, 3, 1, c), np.float32)
    bias = rng.standard_normal(c, np.float32)
    out = jax.jit(cpu_kernels.depthwise_residual)(x, k, bias)
    assert out.shape == x.shape and out.dtype == jnp.float32
    want, mag = _depthwise_residual64(x, k, bias)
    err = np.abs(np.asarray(out, np.float64) - want)
    assert np.all(err <= 11 * np.finfo(np.float32).eps * mag), float((err / mag).max())
    # not trivially close: the taps move every output by far more than the bound
    assert np.abs(want - x - bias).max() > 1e4 * np.finfo(np.float32).eps * mag.max()


def test_depthwise_residual_limits():
    lanes = _lanes()
    assert cpu_kernels.depthwise_supported(lanes) and cpu_kernels.depthwise_supported(64 * lanes)
    assert not cpu_kernels.depthwise_supported(lanes + 1)  # not whole vectors: the shifted sum
    with pytest.raises(Exception, match="florence_depthwise_residual"):
        c = lanes + 1
        jax.block_until_ready(cpu_kernels.depthwise_residual(jnp.ones((1, 3, 3, c), jnp.float32),
                                                            jnp.ones((3, 3, 1, c), jnp.float32),
                                                            jnp.ones(c, jnp.float32)))


def test_the_towers_depthwise_convolutions_run_the_kernel_with_the_shifted_sums_gradient():
    """The CPU's default (``depthwise_conv="kernel"``) against the shifted sum on the demo's tiny model:
    four kernel calls per block (two per spatial and per channel half) in the compiled tower and none in
    the shifted sum's; the features within float32 rounding of the largest (the taps summed in another
    order, through four stages); every parameter's gradient within float32 rounding of its largest entry
    (the kernel's backward is the shifted sum's, taken at the same input)."""
    model, calls, calls0, grads = _tower_kernel_against("cpu:depthwise_conv=shifted_sum",
                                                        "florence_depthwise_residual", 1)
    assert model.formulations.depthwise_conv == "kernel"
    assert calls == 4 * sum(model.config.vision_config.depths) and calls0 == 0
    assert any("conv1" in str(k) for k in grads)


def test_depthwise_residual_runs_per_device_on_a_mesh():
    """On a data x fsdp mesh with the images split as a step splits its batch, each device convolves its own
    images (``sharding.per_batch_shard``): the compiled forward and backward move no activations between
    devices and give the shifted sum's values and gradients (input, taps, bias). The same call without the
    split gathers the images whole, so the check can fail."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from florence_jax import sharding
    from florence_jax.modeling.davit import _cpu_depthwise_residual, _depthwise_conv3x3

    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), sharding.BATCH_AXES)
    sh = NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES))
    c = 2 * _lanes()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 6, 5, c)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, 1, c)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(c,)), jnp.float32)

    def kernel(x, k, b):
        return sharding.per_batch_shard(_cpu_depthwise_residual, x, k, b)

    def shifted(x, k, b):
        return _depthwise_conv3x3(x, k, b) + x

    def collectives(fn, *args):
        # activations moved between devices; an all-reduce is the taps' and bias's gradients summed over
        # the batch's devices, as every parameter's gradient is
        import re
        return re.findall(r"all-gather|all-to-all|collective-permute", fn.lower(*args).compile().as_text())

    forward = jax.jit(kernel)
    backward = jax.jit(jax.grad(lambda *a: jnp.sum(kernel(*a) ** 2), argnums=(0, 1, 2)))
    arg = jax.device_put(x, sh)
    assert collectives(forward, arg, k, b) == [] and collectives(backward, arg, k, b) == []
    np.testing.assert_allclose(np.asarray(forward(arg, k, b)), np.asarray(shifted(x, k, b)), rtol=0, atol=1e-5)
    grads = backward(arg, k, b)
    assert grads[0].sharding.is_equivalent_to(sh, 4)
    refs = jax.grad(lambda *a: jnp.sum(shifted(*a) ** 2), argnums=(0, 1, 2))(x, k, b)
    for g, r in zip(grads, refs):
        r = np.asarray(r)
        np.testing.assert_allclose(np.asarray(g), r, rtol=0, atol=2e-6 * float(np.abs(r).max()))
    whole = jax.jit(_cpu_depthwise_residual, in_shardings=(sh, None, None))
    assert collectives(whole, x, k, b)
