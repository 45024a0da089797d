"""Model properties: scanned == unrolled, save/load round trip, jit capture costs nothing extra."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlens
from conftest import assert_close, built
from jaxlens.conversion import load_converted

TOKS = np.array([[0, 5, 9, 30, 2, 7, 100, 44], [0, 3, 3, 3, 3, 1, 2, 9]], np.int32)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def paths(request, hf_root):
    return built(request.param, hf_root)[0]


def test_scanned_equals_unrolled(paths):
    a = jaxlens.from_pretrained(paths)
    b = jaxlens.from_pretrained(paths, scan_layers=True)
    assert "blocks" in b.params and "blocks_0" not in b.params
    la, ca = a.run_with_cache(TOKS)
    lb, cb = b.run_with_cache(TOKS)
    assert_close(la, lb, "logits", rtol=1e-6, atol=1e-6)
    assert set(ca.keys()) == set(cb.keys())
    for k in ca.keys():
        assert_close(ca[k], cb[k], k, rtol=1e-6, atol=1e-6)
    # a filter that selects one layer in the scanned model returns just that layer
    _, one = b.run_with_cache(TOKS, names_filter="blocks.1.attn.hook_pattern")
    assert list(one.keys()) == ["blocks.1.attn.hook_pattern"]
    assert_close(one["pattern", 1], ca["pattern", 1])
    np.testing.assert_array_equal(np.asarray(a.W_Q), np.asarray(b.W_Q))


def test_save_load_round_trip(paths, tmp_path):
    a = jaxlens.from_pretrained(paths)
    out = a.save(tmp_path / "converted")
    assert (out / "jaxlens_config.json").is_file() and (out / "params.safetensors").is_file()
    cfg, params = load_converted(out)
    assert cfg == a.cfg
    b = jaxlens.from_pretrained_no_processing(out)
    np.testing.assert_array_equal(np.asarray(a(TOKS)), np.asarray(b(TOKS)))
    assert b.to_str_tokens(TOKS[0]) == a.to_str_tokens(TOKS[0])


def test_bf16_runs_close(paths):
    a = jaxlens.from_pretrained(paths)
    b = jaxlens.from_pretrained(paths, dtype="bfloat16")
    assert b.params["W_E"].dtype == jnp.bfloat16
    la, lb = np.asarray(a(TOKS)), np.asarray(b(TOKS)).astype(np.float32)
    # bf16 has an 8-bit mantissa: the next-token choice agrees where f32 has a clear margin, and
    # the logits are close relative to their scale
    top2 = np.sort(la, -1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) > 0.05 * np.abs(la).max()
    assert clear.any() and (la.argmax(-1) == lb.argmax(-1))[clear].all()
    assert np.abs(la - lb).max() < 0.1 * np.abs(la).max() + 0.1


def test_weight_properties_layout(paths):
    m = jaxlens.from_pretrained(paths)
    c = m.cfg
    assert m.W_Q.shape == (c.n_layers, c.n_heads, c.d_model, c.d_head)
    assert m.W_K.shape == (c.n_layers, c.n_heads, c.d_model, c.d_head)  # grouped heads expanded
    assert m.W_O.shape == (c.n_layers, c.n_heads, c.d_head, c.d_model)
    assert m.W_in.shape == (c.n_layers, c.d_model, c.d_mlp)
    assert m.W_out.shape == (c.n_layers, c.d_mlp, c.d_model)
    assert m.W_U.shape == (c.d_model, c.d_vocab)
    assert m.b_O.shape == (c.n_layers, c.d_model)


def test_patterns_only_capture_uses_less_memory(paths):
    """Unrequested activations are not materialised: compiled peak memory grows only by what is asked."""
    m = jaxlens.from_pretrained(paths)
    toks, mask = jnp.asarray(np.tile(TOKS, (4, 4))[:, :32]), jnp.ones((8, 32), jnp.int32)
    from jaxlens.model.forward import forward_jit

    def mem(capture):
        lowered = forward_jit.lower(m.params, m.cfg, toks, mask, capture=capture, precision="highest")
        ma = lowered.compile().memory_analysis()
        return ma.temp_size_in_bytes + ma.output_size_in_bytes

    none = mem(frozenset())
    pats = mem(jaxlens.resolve_names(lambda n: n.endswith("hook_pattern"), m.cfg))
    every = mem(jaxlens.resolve_names(None, m.cfg))
    pattern_bytes = m.cfg.n_layers * 8 * m.cfg.n_heads * 32 * 32 * 4
    assert pats <= none + pattern_bytes * 1.05 + 4096
    assert every > pats


def test_jit_vmap_grad_through_forward(paths):
    m = jaxlens.from_pretrained(paths)
    toks = jnp.asarray(TOKS)

    def loss(params):
        logits, _, _ = jaxlens.forward(params, m.cfg, toks)
        return jax.nn.logsumexp(logits, -1).mean()

    g = jax.jit(jax.grad(loss))(m.params)
    assert jax.tree.structure(g) == jax.tree.structure(m.params)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(g))
    per_row = jax.vmap(lambda t: jaxlens.forward(m.params, m.cfg, t[None])[0][0])(toks)
    assert_close(per_row, m(TOKS), "vmap", rtol=1e-5, atol=1e-5)


def test_sharded_batch_equals_single_device(paths):
    """The batch sharded over 8 simulated host devices gives the single-device numbers."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    if len(jax.devices()) < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (set by conftest)")
    m = jaxlens.from_pretrained(paths)
    toks = jnp.asarray(np.tile(TOKS, (4, 1)))
    mesh = Mesh(np.array(jax.devices()[:8]), ("batch",))
    sharded = jax.device_put(toks, NamedSharding(mesh, P("batch")))
    params = jax.device_put(m.params, NamedSharding(mesh, P()))
    capture = frozenset({"blocks.1.attn.hook_pattern", "blocks.0.hook_resid_post"})
    from jaxlens.model.forward import forward_jit

    la, ca, _ = forward_jit(m.params, m.cfg, toks, jnp.ones_like(toks), capture=capture, precision="highest")
    lb, cb, _ = forward_jit(params, m.cfg, sharded, jnp.ones_like(sharded), capture=capture, precision="highest")
    assert len(lb.sharding.device_set) == 8
    assert_close(la, lb, "logits", rtol=1e-6, atol=1e-6)
    for k in capture:
        assert_close(ca[k], cb[k], k, rtol=1e-6, atol=1e-6)
