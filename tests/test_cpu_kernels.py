"""jaxlens's CPU kernels (`jaxlens.model.cpu_kernels`): the bf16 one-row kernel (exact f32 sums of
bf16 x f32 products) and the f32 few-row kernel (f32 sums within the bound of plain summation) on
every layout weight_einsum sends them, which products go to them, their autodiff and vmap rules,
and the fallbacks (switched off, no compiler) that run XLA's path instead."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlens.model import cpu_kernels
from jaxlens.model.layers import weight_einsum

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(), reason=f"kernel: {cpu_kernels.status()}")


def _exact(spec, x, W):
    """The f64 product of the bf16 weight and the f32 activation (the kernel's sums are f32)."""
    return np.einsum(spec, np.asarray(x, np.float64), np.asarray(W.astype(jnp.float32), np.float64))


def _rand(key, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32).astype(dtype)


@pytest.mark.parametrize("spec,x_shape,w_shape,plan", [
    ("rk,kn->rn", (1, 768), (768, 3072), (1, 768, 1, 3072, False)),
    ("bpm,hmd->bphd", (1, 1, 768), (12, 768, 64), (1, 768, 12, 64, False)),
    ("bpd,vd->bpv", (1, 1, 64), (500, 64), (1, 64, 1, 500, True)),
    ("bpd,dv->bpv", (2, 3, 64), (64, 500), (6, 64, 1, 500, False)),
    ("bphd,hdm->bpm", (1, 1, 4, 16), (4, 16, 32), (1, 64, 1, 32, False)),  # two contracted axes
])
def test_plan_maps_matrix_products(spec, x_shape, w_shape, plan):
    p = cpu_kernels.matvec_plan(spec, x_shape, w_shape)
    assert (p.rows, p.K, p.G, p.N, p.trans) == plan
    assert p.out_shape == jnp.einsum(spec, jnp.zeros(x_shape), jnp.zeros(w_shape)).shape


@pytest.mark.parametrize("spec,x_shape,w_shape", [
    ("bphm,hmd->bphd", (1, 1, 4, 8), (4, 8, 16)),  # a batch axis (head in both and in the output)
    ("bpm,hmd->bpdh", (1, 1, 8), (4, 8, 16)),  # the output permutes W's axes
    ("bmp,hmd->bphd", (1, 8, 1), (4, 8, 16)),  # the contracted axis is not x's last
    ("bpd,d->bp", (1, 1, 8), (8,)),  # a vector: nothing left of W
    ("bpd,dd->bp", (1, 1, 8), (8, 8)),  # a repeated axis
])
def test_plan_refuses_other_einsums(spec, x_shape, w_shape):
    assert cpu_kernels.matvec_plan(spec, x_shape, w_shape) is None


@needs_kernel
@pytest.mark.parametrize("spec,x_shape,w_shape", [
    ("rk,kn->rn", (1, 771), (771, 2309)),  # K not a multiple of 4, N of 16, several column tiles
    ("rk,kn->rn", (3, 64), (64, 5000)),  # several rows
    ("bpm,hmd->bphd", (1, 1, 96), (6, 96, 20)),  # per-head groups
    ("bpd,vd->bpv", (1, 1, 77), (1003, 77)),  # trans: K not a multiple of 16
    ("bpd,vd->bpv", (2, 2, 256), (130, 256)),
    ("rk,kn->rn", (1, 0), (0, 40)),  # empty contraction
])
def test_kernel_is_the_exact_product_in_f32(spec, x_shape, w_shape):
    x, W = _rand(0, x_shape), _rand(1, w_shape, jnp.bfloat16)
    got = np.asarray(jax.jit(cpu_kernels.kernel_einsum, static_argnums=0)(spec, x, W))
    want = _exact(spec, x, W)
    assert got.dtype == np.float32 and got.shape == want.shape
    # f32 sums of K terms of size ~1: a few f32 ulps of sqrt(K), far below one bf16 ulp (4e-3)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * max(1, w_shape[-2 if spec.endswith("n") else -1]) ** 0.5 * 4)


@needs_kernel
@pytest.mark.parametrize("spec,x_shape,w_shape", [
    ("rk,kn->rn", (8, 768), (768, 3072)),  # an MLP's W_in at batch 8: two wide column tiles, K in chunks
    ("rk,kn->rn", (2, 3072), (3072, 768)),  # W_out: one column tile, K split in chunks for the threads
    ("rk,kn->rn", (5, 771), (771, 2309)),  # K not a multiple of 4, N of 8: every tail, in every K chunk
    ("rk,kn->rn", (3, 3), (3, 5)),  # smaller than one vector
    ("rk,kn->rn", (19, 40), (40, 300)),  # more rows than one pass: three passes over the weight
    ("rk,kn->rn", (19, 300), (300, 40)),  # three passes in each of the K chunks
    ("bpm,hmd->bphd", (7, 1, 96), (6, 96, 20)),  # per-head groups
    ("bphd,hdm->bpm", (3, 1, 4, 16), (4, 16, 32)),  # two contracted axes (W_O)
    ("bpd,vd->bpv", (8, 1, 77), (1003, 77)),  # trans (the tied unembedding): K and N tails
    ("bpd,vd->bpv", (2, 3, 256), (130, 256)),
    ("bpd,vd->bpv", (6, 1, 5), (2, 5)),  # fewer weight rows than one block
    ("rk,kn->rn", (4, 0), (0, 40)),  # empty contraction
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rows_kernel_sums_within_the_bound_of_plain_summation(spec, x_shape, w_shape, dtype):
    x, W = _rand(10, x_shape), _rand(11, w_shape, dtype)
    got = np.asarray(jax.jit(cpu_kernels.kernel_einsum, static_argnums=0)(spec, x, W))
    xd, Wd = np.asarray(x, np.float64), np.asarray(W.astype(jnp.float32), np.float64)
    want, scale = np.einsum(spec, xd, Wd), np.einsum(spec, np.abs(xd), np.abs(Wd))
    xs, ws = spec.split("->")[0].split(",")
    K = int(np.prod([n for a, n in zip(xs, x_shape) if a in ws]))
    assert got.dtype == np.float32 and got.shape == want.shape
    # the forward error bound of summing K f32-rounded products in f32: (K + 1) * 2^-24 * sum |x_k w_k|
    assert np.all(np.abs(got - want) <= (K + 1) * 2.0 ** -24 * scale + 1e-30)


@needs_kernel
@pytest.mark.parametrize("dtype,rows,target", [
    (jnp.float32, 1, None), (jnp.float32, 2, cpu_kernels.F32_TARGET), (jnp.float32, 8, cpu_kernels.F32_TARGET),
    (jnp.float32, 9, None), (jnp.bfloat16, 1, cpu_kernels.TARGET), (jnp.bfloat16, 2, cpu_kernels.BF16_ROWS_TARGET),
    (jnp.bfloat16, 8, cpu_kernels.BF16_ROWS_TARGET), (jnp.bfloat16, 9, None)])
def test_weight_einsum_sends_up_to_eight_rows_to_a_kernel(dtype, rows, target):
    """One f32 row and more than eight rows stay with XLA; a head axis in both operands too."""
    W = _rand(12, (64, 300), dtype)
    x = _rand(13, (rows, 1, 64), dtype)
    f = jax.jit(lambda x, W: weight_einsum("bpd,dv->bpv", x, W))
    text = f.lower(x, W).as_text()
    targets = (cpu_kernels.TARGET, cpu_kernels.F32_TARGET, cpu_kernels.BF16_ROWS_TARGET)
    assert [t for t in targets if t in text] == ([] if target is None else [target])
    y = f(x, W)
    assert y.dtype == dtype
    ref = jnp.einsum("bpd,dv->bpv", x.astype(jnp.float32), W.astype(jnp.float32)).astype(dtype)
    tol = 1e-5 if dtype == jnp.float32 else 8e-3  # bf16: the f32 sums rounded once to bf16
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32), rtol=tol, atol=1e-5)
    batched = jax.jit(lambda x: weight_einsum("bphm,hmd->bphd", x, W.reshape(4, 16, 300)))  # a head axis in both
    assert not any(t in batched.lower(_rand(14, (rows, 1, 4, 16), dtype)).as_text() for t in targets)


@needs_kernel
@pytest.mark.parametrize("dtype,rows", [(jnp.bfloat16, 1), (jnp.bfloat16, 3), (jnp.float32, 4)])
def test_kernel_gradients_and_vmap_match_xla(dtype, rows):
    spec = "bpm,hmd->bphd"
    x, W = _rand(4, (rows, 1, 48)), _rand(5, (3, 48, 8), dtype)
    ref = lambda x, W: jnp.einsum(spec, x, W, preferred_element_type=jnp.float32)  # noqa: E731
    loss = lambda f: lambda x, W: jnp.sum(jnp.sin(f(spec, x, W) if f is not ref else ref(x, W)))  # noqa: E731
    gk = jax.grad(loss(cpu_kernels.kernel_einsum), argnums=(0, 1))(x, W)
    gr = jax.grad(loss(ref), argnums=(0, 1))(x, W)
    for a, b in zip(gk, gr):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-2, atol=1e-5)
    xs, Ws = _rand(6, (5, rows, 1, 48)), _rand(7, (5, 3, 48, 8), dtype)
    for axes, args in (((0, None), (xs, W)), ((None, 0), (x, Ws)), ((0, 0), (xs, Ws))):
        got = jax.vmap(lambda a, b: cpu_kernels.kernel_einsum(spec, a, b), in_axes=axes)(*args)
        want = jax.vmap(ref, in_axes=axes)(*args)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_library_path_is_keyed_by_cpu_and_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    a = cpu_kernels.library_path("g++")
    assert a.parent == tmp_path / "jaxlens" / "kernels"
    assert cpu_kernels.library_path("clang++") != a
    monkeypatch.setattr(cpu_kernels, "_cpu_signature", lambda: "another CPU")
    assert cpu_kernels.library_path("g++") != a


_FALLBACK = """
import jax, jax.numpy as jnp, numpy as np
from jaxlens.model import cpu_kernels
from jaxlens.model.layers import weight_einsum
x = jax.random.normal(jax.random.key(0), (1, 1, 64)).astype(jnp.bfloat16)
W = jax.random.normal(jax.random.key(1), (64, 30)).astype(jnp.bfloat16)
text = jax.jit(lambda x: weight_einsum("bpd,dv->bpv", x, W)).lower(x).as_text()
y = weight_einsum("bpd,dv->bpv", x, W)
ref = jnp.einsum("bpd,dv->bpv", x.astype(jnp.float32), W.astype(jnp.float32)).astype(jnp.bfloat16)
x4, W32 = jnp.concatenate([x] * 4).astype(jnp.float32), W.astype(jnp.float32)
text32 = jax.jit(lambda x: weight_einsum("bpd,dv->bpv", x, W32)).lower(x4).as_text()
same32 = bool(jnp.all(weight_einsum("bpd,dv->bpv", x4, W32) == jnp.einsum("bpd,dv->bpv", x4, W32)))
print(cpu_kernels.status(), cpu_kernels.TARGET in text, cpu_kernels.F32_TARGET in text32, bool(jnp.all(y == ref)) and same32)
"""


@pytest.mark.parametrize("env,expect", [({"JAXLENS_CPU_KERNELS": "0"}, "off ("), ({"CXX": "/nonexistent/c++"}, "not built: ")])
def test_without_the_kernel_xla_runs_instead(tmp_path, env, expect):
    full = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "JAX_PLATFORMS": "cpu", **env}
    out = subprocess.run([sys.executable, "-c", _FALLBACK], env=full, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(expect) and out.stdout.rstrip().endswith("False False True"), out.stdout


@needs_kernel
@pytest.mark.parametrize("dtype,rows,target", [(jnp.bfloat16, 1, cpu_kernels.TARGET), (jnp.float32, 4, cpu_kernels.F32_TARGET),
                                               (jnp.bfloat16, 4, cpu_kernels.BF16_ROWS_TARGET)])
def test_kernel_under_a_mesh_gathers_a_sharded_weight(dtype, rows, target):
    """No sharding rule: XLA gathers the operands, so a tensor-parallel weight still gives the product."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    if jax.device_count() < 4:
        pytest.skip("needs 4 devices (the suite's conftest simulates 8)")
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
    W = _rand(8, (64, 302), dtype)
    x = _rand(9, (rows, 1, 64), dtype)
    want = weight_einsum("bpd,dv->bpv", x, W)
    for spec in (PartitionSpec(None, "model"), PartitionSpec("model", None)):
        Ws = jax.device_put(W, NamedSharding(mesh, spec))
        f = jax.jit(lambda x, W: weight_einsum("bpd,dv->bpv", x, W))
        assert target in f.lower(x, Ws).as_text()
        np.testing.assert_array_equal(np.asarray(f(x, Ws), np.float32), np.asarray(want, np.float32))
