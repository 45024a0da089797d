"""Memory-efficient attention (issue 13 item 5): when no hook reads or edits the scores or the
pattern, long sequences attend block by block (online softmax) without the [batch head query key]
matrix; the numbers equal the plain path and the compiled temporary memory drops below 1/8."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlens
from conftest import assert_close
from jaxlens.hooks import RunCtx
from jaxlens.model import Transformer
from jaxlens.model.forward import forward, forward_jit
from jaxlens.model.layers import blocked_attention, masked_softmax, soft_cap


def plain(q, k, v, allowed, scale, cap):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) / scale
    if cap is not None:
        s = soft_cap(s, cap)
    return jnp.einsum("bhqk,bhkd->bqhd", masked_softmax(s, allowed), v)


@pytest.mark.parametrize("q_block", [512, 4, 11])  # one query block; three with 1 padded query; exactly one
@pytest.mark.parametrize("cap", [None, 1.5])
@pytest.mark.parametrize("n_k,block", [(37, 8), (64, 16), (5, 16)])
def test_blocked_equals_plain(cap, n_k, block, q_block):
    rng = np.random.default_rng(n_k)
    b, h, n_q, d = 2, 3, 11, 4
    q, k, v = (jnp.asarray(rng.normal(size=s).astype(np.float32)) for s in ((b, h, n_q, d), (b, h, n_k, d), (b, h, n_k, d)))
    allowed = jnp.asarray(rng.random((b, 1, n_q, n_k)) < 0.6)
    allowed = allowed.at[0, 0, 3].set(False)  # a fully masked row: zeros, as masked_softmax
    got = blocked_attention(q, k, v, allowed, 2.0, cap, block=block, q_block=q_block)
    assert_close(got, plain(q, k, v, allowed, 2.0, cap), "blocked attention")
    assert (np.asarray(got)[0, 3] == 0).all()


@pytest.mark.parametrize("q_block,block", [(4, 8), (3, 5)])
def test_blocked_skips_future_key_blocks_exactly(q_block, block):
    """A causal mask over a cached prefix (keys 0..n_k-n_q+i for query i): whole key blocks lie in
    some query blocks' future and are skipped; values and gradients still equal the plain path."""
    rng = np.random.default_rng(7)
    b, h, n_q, n_k, d = 1, 2, 11, 37, 4
    q, k, v = (jnp.asarray(rng.normal(size=s).astype(np.float32)) for s in ((b, h, n_q, d), (b, h, n_k, d), (b, h, n_k, d)))
    allowed = jnp.asarray(np.arange(n_k)[None] <= np.arange(n_q)[:, None] + (n_k - n_q))[None, None]
    assert_close(blocked_attention(q, k, v, allowed, 2.0, block=block, q_block=q_block),
                 plain(q, k, v, allowed, 2.0, None), "blocked attention, causal")
    loss = lambda f: lambda q, k, v: (f(q, k, v) ** 2).sum()  # noqa: E731
    g_blocked = jax.grad(loss(lambda q, k, v: blocked_attention(q, k, v, allowed, 2.0, block=block, q_block=q_block)),
                         argnums=(0, 1, 2))(q, k, v)
    g_plain = jax.grad(loss(lambda q, k, v: plain(q, k, v, allowed, 2.0, None)), argnums=(0, 1, 2))(q, k, v)
    for name, a, e in zip("qkv", g_blocked, g_plain):
        assert_close(a, e, f"d/d{name}", rtol=1e-5, atol=1e-5)


def long_model(**kw):
    cfg = jaxlens.ModelConfig("llama", d_model=16, n_layers=2, n_heads=4, d_head=4, d_mlp=32, d_vocab=50, n_ctx=8192,
                              n_kv_heads=2, act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
                              rotary_dim=4, gated_mlp=True, use_qkv_bias=False, use_o_bias=False, use_mlp_bias=False,
                              **kw)
    toks = jnp.zeros((1, 2), jnp.int32)
    shapes = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.PRNGKey(0), toks, jnp.ones_like(toks),
                                                          RunCtx())["params"])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.5, s.shape).astype(np.float32)), shapes)
    return cfg, params


@pytest.mark.parametrize("kw", [{}, dict(sliding_window=300, attn_scores_soft_cap=2.0)])
def test_long_sequence_without_patterns_equals_with(kw):
    cfg, params = long_model(**kw)
    n = 1100  # >= 2 key blocks: the blocked path
    rng = np.random.default_rng(1)
    toks = jnp.asarray(rng.integers(1, 50, (1, n)), jnp.int32)
    mask = jnp.ones_like(toks).at[0, :5].set(0)  # left padding
    patterns = frozenset(f"blocks.{l}.attn.hook_pattern" for l in range(cfg.n_layers))
    resid = frozenset({"blocks.1.hook_resid_pre", "blocks.1.attn.hook_z"})
    la, aa, _ = forward_jit(params, cfg, toks, mask, capture=resid, precision="highest")
    lb, ab, _ = forward_jit(params, cfg, toks, mask, capture=resid | patterns, precision="highest")
    real = np.asarray(mask).astype(bool)
    assert_close(np.asarray(la)[real], np.asarray(lb)[real], "logits", rtol=1e-5, atol=1e-5)
    for k in resid:
        assert_close(np.asarray(aa[k])[real], np.asarray(ab[k])[real], k, rtol=1e-5, atol=1e-5)


def test_compiled_temp_memory_without_patterns_is_under_an_eighth():
    cfg, params = long_model()
    toks = jnp.zeros((1, 8192), jnp.int32)
    mask = jnp.ones_like(toks)

    def temp(capture):
        f = jax.jit(lambda p, t, m: forward(p, cfg, t, m, capture=capture)[0])
        return f.lower(params, toks, mask).compile().memory_analysis().temp_size_in_bytes

    off = temp(frozenset())
    on = temp(frozenset({"blocks.0.attn.hook_pattern"}))
    assert off * 8 <= on, f"patterns off {off / 2**20:.0f} MiB vs on {on / 2**20:.0f} MiB"


def test_blocked_attention_on_a_mesh_equals_one_device():
    """The blocked path (query-block map, key-block scan, skip conditions) partitioned over 8
    simulated devices, batch on `data` and heads on `model`, equals one device."""
    from jaxlens.distributed import make_mesh, shard_params

    cfg, params = long_model()
    rng = np.random.default_rng(5)
    toks = jnp.asarray(rng.integers(1, 50, (2, 1100)), jnp.int32)
    mask = jnp.ones_like(toks).at[1, :7].set(0)
    resid = frozenset({"blocks.1.attn.hook_z"})
    want_logits, want, _ = forward_jit(params, cfg, toks, mask, capture=resid, precision="highest")
    mesh = make_mesh("data=2,model=2")
    placed = shard_params(params, cfg, mesh)
    got_logits, got, _ = forward_jit(placed, cfg, toks, mask, capture=resid, precision="highest")
    assert_close(np.asarray(got_logits), np.asarray(want_logits), "logits", rtol=1e-5, atol=1e-5)
    assert_close(np.asarray(got["blocks.1.attn.hook_z"]), np.asarray(want["blocks.1.attn.hook_z"]), "hook_z",
                 rtol=1e-5, atol=1e-5)
