"""KVCache: chunked prefill equals one pass, left-padded prompts extend correctly, prefix reuse
(fork), scanned layers, and clear errors for caches that do not fit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import PROMPTS, assert_close, built, padded
from jaxlens import HookedTransformer
from jaxlens.model.forward import stack_layers
from jaxlens.generation.kv_cache import KVCache, check_cache, forward_cached_jit

EXTRA = [[11, 12, 13], [21, 22, 23], [31, 32, 33]]  # one token per row per step after the prompt


def model_for(family, hf_root):
    import jaxlens

    return jaxlens.from_pretrained_no_processing(built(family, hf_root)[0])


@pytest.fixture(scope="module")
def gpt2(hf_root):
    return model_for("gpt2", hf_root)


def chunked_vs_full(model):
    """Prefill the left-padded prompts in uneven chunks, then extend one token per step; every real
    position's logits must equal one full pass over the same tokens."""
    toks, mask = padded("left", PROMPTS)
    extra = np.array(EXTRA, np.int32)
    all_toks = np.concatenate([toks, extra], 1)
    all_mask = np.concatenate([mask, np.ones_like(extra)], 1)
    full = np.asarray(model(all_toks, attention_mask=all_mask))

    cache = model.init_kv_cache(len(PROMPTS), 16)
    got = []
    for a, b in [(0, 5), (5, 10)] + [(10 + i, 11 + i) for i in range(extra.shape[1])]:
        logits, new = model(all_toks[:, a:b], attention_mask=all_mask[:, a:b], kv_cache=cache)
        assert int(cache.length) == a  # the old cache is untouched
        cache = new
        got.append(np.asarray(logits))
    got = np.concatenate(got, 1)
    real = all_mask.astype(bool)
    assert_close(got[real], full[real], "chunked + extended logits")
    assert int(cache.length) == all_toks.shape[1]
    np.testing.assert_array_equal(np.asarray(cache.lengths), all_mask.sum(1))


@pytest.mark.parametrize("family", ["gpt2", "mistral"])
def test_chunked_prefill_and_extension_equal_full_pass(family, hf_root):
    """Learned positions (gpt2) and a sliding window (mistral); every family's cache is also checked
    step by step against full recomputation in test_generate.py."""
    chunked_vs_full(model_for(family, hf_root))


def test_scanned_layers_cache_equals_full_pass(hf_root):
    m = model_for("llama", hf_root)  # grouped-query, rotary, qkv bias
    scanned = HookedTransformer(m.cfg, stack_layers(m.params, m.cfg.n_layers), m.tokenizer)
    chunked_vs_full(scanned)


def test_prefix_forked_to_batch_is_reused(gpt2):
    """One prefix cache, built once, serves many continuations (broadcast to a batch with fork)."""
    prefix = [0, 5, 9, 30, 2]
    conts = np.array([[7, 100], [44, 12], [3, 250], [8, 9], [70, 71], [1, 2]], np.int32)
    _, prefix_cache = gpt2(np.array([prefix], np.int32), kv_cache=gpt2.init_kv_cache(1, 12))
    forked = prefix_cache.fork(3)
    assert forked.keys.shape[1] == 3 and int(forked.length) == len(prefix)
    first, _ = gpt2(conts[:3], kv_cache=forked)
    second, _ = gpt2(conts[3:], kv_cache=prefix_cache.fork(3))  # the same prefix, reused
    got = np.concatenate([np.asarray(first), np.asarray(second)])
    full = np.asarray(gpt2(np.concatenate([np.tile(prefix, (6, 1)), conts], 1)))
    assert_close(got, full[:, len(prefix):], "continuations of a forked prefix")
    assert int(prefix_cache.length) == len(prefix)


def test_fork_repeats_each_row():
    from jaxlens import ModelConfig

    cfg = ModelConfig("gpt2", d_model=8, n_layers=1, n_heads=2, d_head=4, d_mlp=16, d_vocab=10, n_ctx=8)
    c = KVCache.init(cfg, 2, 4)
    c = KVCache(c.keys.at[:, 1].set(1.0), c.values, c.mask.at[1, 0].set(1), c.length + 1)
    f = c.fork(2)
    np.testing.assert_array_equal(np.asarray(f.keys[0, :, 0, 0, 0]), [0, 0, 1, 1])
    np.testing.assert_array_equal(np.asarray(f.mask[:, 0]), [0, 0, 1, 1])
    assert int(f.length) == 1


def test_cache_is_a_pytree_and_keeps_dtype(gpt2):
    c = KVCache.init(gpt2.cfg, 2, 5, jnp.bfloat16)
    assert len(jax.tree.leaves(c)) == 4
    assert c.keys.shape == (gpt2.cfg.n_layers, 2, gpt2.cfg.n_kv_heads, 5, gpt2.cfg.d_head)
    assert c.keys.dtype == jnp.bfloat16 and c.mask.dtype == jnp.int32
    moved = jax.jit(lambda x: x)(c)
    assert isinstance(moved, KVCache) and moved.max_len == 5
    assert gpt2.init_kv_cache(1, 3).dtype == gpt2.params["W_E"].dtype


# --- errors ------------------------------------------------------------------------------------

def filled(model, batch, max_len, used):
    """A cache whose first `used` slots hold real tokens (no model run needed)."""
    c = KVCache.init(model.cfg, batch, max_len)  # (model.init_kv_cache is bounded by n_ctx)
    return KVCache(c.keys, c.values, c.mask.at[:, :used].set(1), jnp.int32(used))


def test_overflow_is_an_error(gpt2):
    with pytest.raises(ValueError, match=r"overflow: 4 slots used \+ 3 new tokens > max_len=6"):
        gpt2(np.array([[4, 5, 6]]), kv_cache=filled(gpt2, 1, 6, 4))


def test_overflow_under_jit_gives_nan_not_a_silent_wrap(gpt2):
    """Inside a user's jit the length is traced, so no ValueError: the logits are NaN instead."""
    step = jax.jit(lambda c, t: forward_cached_jit(gpt2.params, gpt2.cfg, t, None, c)[0])
    toks = jnp.array([[7, 8]])
    assert np.isfinite(np.asarray(step(filled(gpt2, 1, 3, 1), toks))).all()  # 1 + 2 <= 3
    assert np.isnan(np.asarray(step(filled(gpt2, 1, 3, 2), toks))).all()  # 2 + 2 > 3


def test_positions_past_n_ctx_are_an_error(gpt2):
    """The cache is bounded by the context, and a cache that cannot take the new tokens is refused."""
    n = gpt2.cfg.n_ctx
    with pytest.raises(ValueError, match=rf"max_len={n + 4} exceeds the model's context n_ctx={n}"):
        gpt2.init_kv_cache(1, n + 4)
    with pytest.raises(ValueError, match="exceed the model's context n_ctx"):
        gpt2(np.zeros((1, 2), np.int32), kv_cache=filled(gpt2, 1, n + 4, n - 1))


def test_cache_of_another_model_or_batch_is_an_error(gpt2, hf_root):
    llama = model_for("llama", hf_root)
    with pytest.raises(ValueError, match=r"\(layers, kv_heads, d_head\)"):
        gpt2(np.array([[0, 1]]), kv_cache=llama.init_kv_cache(1, 4))
    with pytest.raises(ValueError, match=r"holds 1 rows but the tokens have 2.*fork\(2\)"):
        gpt2(np.array([[0, 1], [2, 3]]), kv_cache=gpt2.init_kv_cache(1, 4))
    with pytest.raises(ValueError, match="must be a jaxlens KVCache"):
        check_cache((1, 2, 3, 4), gpt2.cfg, 1, 1)
    with pytest.raises(ValueError, match="return_type='logits'"):
        gpt2(np.array([[0, 1]]), return_type="loss", kv_cache=gpt2.init_kv_cache(1, 4))


@pytest.mark.parametrize("kw", [dict(batch=0, max_len=4), dict(batch=1, max_len=0), dict(batch=1.5, max_len=4)])
def test_init_rejects_bad_sizes(gpt2, kw):
    with pytest.raises(ValueError, match="must be a positive int"):
        KVCache.init(gpt2.cfg, **kw)


def test_fork_rejects_bad_n(gpt2):
    with pytest.raises(ValueError, match="n must be a positive int"):
        gpt2.init_kv_cache(1, 4).fork(0)
