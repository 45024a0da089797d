"""Compiled generation: greedy equals HF `generate` token for token on every family (single prompt
and left-padded batch), cached logits equal full recomputation at every step, capture and hooks at
every step, sampling (reproducible, top-k/top-p distribution), no recompiles within a bucket, and
clear errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import PROMPTS, assert_close, built, padded
from jaxlens.model.forward import forward_jit
from jaxlens.generation.generate import (Sampler, bucket, compile_count, filter_logits, generate_tokens,
                              sample_logits)
from jaxlens.hooks import make_hooks

N_NEW = 9


def hf_generate(model, toks, mask, eos, **kw):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these models are tiny: extra threads only spin on a busy machine
    try:
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor(toks, dtype=torch.long), attention_mask=torch.tensor(mask),
                                 do_sample=False, max_new_tokens=N_NEW, eos_token_id=eos, pad_token_id=0, **kw)
        return out.numpy()
    finally:
        torch.set_num_threads(threads)


def jl_generate(model, toks, mask, eos, **kw):
    return generate_tokens(model.params, model.cfg, toks, mask, max_new_tokens=N_NEW, eos_token_id=eos,
                           pad_token_id=0, precision="highest", **kw)


def trimmed(out):
    """Tokens up to the last step run (HF's output width)."""
    width = out.tokens.shape[1] - N_NEW + int(out.n_steps)
    return np.asarray(out.tokens[:, :width]), np.asarray(out.attention_mask[:, :width])


def test_greedy_matches_hf_and_full_recomputation(hf_model, jl_model):
    """Left-padded batch: same tokens as HF generate (with a stop token that ends one row early),
    and the KV-cached logits of every step equal a full forward over the generated sequence."""
    _, hf = hf_model
    toks, mask = padded("left", PROMPTS)
    free = hf_generate(hf, toks, mask, eos=0, min_new_tokens=N_NEW)  # only to pick a stop token
    eos = int(free[1, toks.shape[1] + 3])  # a token row 1 emits at step 3: it stops there (or earlier)
    ref = hf_generate(hf, toks, mask, eos=eos)
    out = jl_generate(jl_model, toks, mask, eos, return_logits=True)
    got, got_mask = trimmed(out)
    np.testing.assert_array_equal(got, ref)
    assert np.asarray(out.finished)[1]
    assert (got[1, toks.shape[1] + 4:] == 0).all()  # a stopped row is padded

    p, n = toks.shape[1], int(out.n_steps)
    full = np.asarray(forward_jit(jl_model.params, jl_model.cfg, jnp.asarray(got), jnp.asarray(got_mask),
                                  precision="highest")[0])
    assert_close(np.asarray(out.logits)[:, :n], full[:, p - 1:p - 1 + n], "cached step logits vs full pass")


def test_greedy_single_prompt_matches_hf(hf_model, jl_model):
    _, hf = hf_model
    toks = np.array([PROMPTS[0]], np.int32)
    ref = hf_generate(hf, toks, np.ones_like(toks), eos=0)
    out = jl_generate(jl_model, toks, None, 0)
    np.testing.assert_array_equal(trimmed(out)[0], ref)


# --- gpt2-only behaviour -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt2(hf_root):
    import jaxlens

    return jaxlens.from_pretrained_no_processing(built("gpt2", hf_root)[0])


@pytest.fixture(scope="module")
def llama(hf_root):
    import jaxlens

    return jaxlens.from_pretrained_no_processing(built("llama", hf_root)[0])


CAPTURED = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_pattern", "blocks.1.attn.hook_k",
            "ln_final.hook_scale", "blocks.0.mlp.hook_post"]


def test_capture_every_step_equals_run_with_cache(llama):
    """names_filter during generation: activations at every step, the position axis running over
    the steps, equal to run_with_cache over the output at those positions (grouped-query k,
    rotary, left padding)."""
    model = llama
    toks, mask = padded("left", PROMPTS)
    out, steps = model.generate(toks, N_NEW, do_sample=False, stop_at_eos=False, attention_mask=mask,
                                names_filter=CAPTURED)
    out = np.asarray(out)
    full_mask = np.concatenate([mask, np.ones((len(PROMPTS), N_NEW), np.int32)], 1)
    _, cache = model.run_with_cache(out, names_filter=CAPTURED, attention_mask=full_mask)
    p = toks.shape[1]
    at = slice(p - 1, p - 1 + N_NEW)
    for name in CAPTURED:
        ref = np.asarray(cache[name])
        ref = ref[:, :, at] if name.endswith("hook_pattern") else ref[:, at]
        got = np.asarray(steps[name])
        if name.endswith("hook_pattern"):  # keys run over the output's columns
            got = got[..., : out.shape[1]]
        assert_close(got, ref, name)


def test_steering_hook_applies_at_every_step(gpt2):
    """A steering vector at a resid hook changes generation exactly as in full recomputation:
    teacher-forcing the steered output with the same hook gives back its own greedy tokens."""
    vec = jnp.asarray(np.random.default_rng(0).normal(size=gpt2.cfg.d_model) * 3.0, jnp.float32)
    hooks = [("blocks.0.hook_resid_post", lambda x, hook: x + vec)]
    toks = np.array([PROMPTS[0]], np.int32)
    plain = jl_generate(gpt2, toks, None, 0)  # the program of test_greedy_single_prompt_matches_hf
    steered = jl_generate(gpt2, toks, None, 0, hooks=make_hooks(hooks, gpt2.cfg), return_logits=True)
    assert int(steered.n_steps) == N_NEW  # (the steered continuation does not emit token 0)
    assert not np.array_equal(np.asarray(plain.tokens), np.asarray(steered.tokens))
    seq = np.asarray(steered.tokens)
    p = toks.shape[1]
    full = np.asarray(gpt2.run_with_hooks(seq, fwd_hooks=hooks))
    np.testing.assert_array_equal(full[:, p - 1:-1].argmax(-1), seq[:, p:])
    assert_close(np.asarray(steered.logits), full[:, p - 1:-1], "steered step logits vs full pass")


def test_no_recompile_within_a_bucket(gpt2):
    def run(n_prompt, n_new, seed):
        toks = np.random.default_rng(seed).integers(1, 200, (2, n_prompt))
        out = generate_tokens(gpt2.params, gpt2.cfg, toks, max_new_tokens=n_new, stop_at_eos=False, return_logits=True)
        out.tokens.block_until_ready()

    run(10, 5, seed=0)  # compiles (or reuses) the program of its bucket, whatever ran before
    before = compile_count()
    run(12, 7, seed=1)  # prompt bucket 16, new-token bucket 8, batch 2: the same program
    run(9, 8, seed=2)
    assert compile_count() == before
    assert [bucket(n, 8) for n in (1, 8, 9, 64, 65, 130)] == [8, 8, 16, 64, 128, 192]
    assert [bucket(n) for n in (1, 3, 8)] == [1, 4, 8]


def test_prefix_cache_continues_like_the_full_prompt(gpt2):
    """Generation from a batch-1 prefix cache (forked to the batch): the step logits equal a full
    forward over prefix + prompt + generated tokens, and the prefix cache is unchanged."""
    prefix, tails = [0, 5, 9, 30, 2, 7], np.array([[100, 44], [12, 3]], np.int32)
    _, cache = gpt2(np.array([prefix], np.int32), kv_cache=gpt2.init_kv_cache(1, 32))
    out = generate_tokens(gpt2.params, gpt2.cfg, tails, max_new_tokens=N_NEW, stop_at_eos=False, kv_cache=cache,
                          return_logits=True, precision="highest")
    seq = np.concatenate([np.tile(prefix, (2, 1)), np.asarray(out.tokens)], 1)
    full = np.asarray(gpt2(seq))
    start = len(prefix) + tails.shape[1] - 1
    assert_close(np.asarray(out.logits), full[:, start:start + N_NEW], "steps after a cached prefix")
    np.testing.assert_array_equal(np.asarray(out.logits).argmax(-1), seq[:, start + 1:])
    assert int(cache.length) == len(prefix)


def test_text_in_text_out(gpt2):
    """A string gives a string, a list of strings a list (left-padded batch), both starting with
    their prompts; the batch is the token-level generation of the left-padded tokens."""
    texts = ["The quick brown fox", "Bob gave a book"]
    assert 8 < gpt2.to_tokens(texts[0]).shape[1] <= 16  # shares the single-prompt test's program
    one = gpt2.generate(texts[0], N_NEW, do_sample=False)
    assert isinstance(one, str) and one.startswith(texts[0]) and len(one) > len(texts[0])
    toks = gpt2.generate(texts[0], N_NEW, do_sample=False, return_type="tokens")
    decode = lambda ids: gpt2.tokenizer.decode(list(map(int, ids)), skip_special_tokens=True)  # noqa: E731
    assert decode(np.asarray(toks[0])) == one  # special tokens (BOS) skipped, as TransformerLens
    both = gpt2.generate(texts, N_NEW, do_sample=False, stop_at_eos=False)
    assert isinstance(both, list) and all(b.startswith(t) for t, b in zip(texts, both))
    padded, mask = gpt2.to_tokens(texts, padding_side="left", return_mask=True)
    ref = generate_tokens(gpt2.params, gpt2.cfg, padded, mask, max_new_tokens=N_NEW, stop_at_eos=False,
                          precision="highest")
    assert both == [decode(np.asarray(r)[np.asarray(m) == 1]) for r, m in zip(ref.tokens, ref.attention_mask)]


# --- sampling ----------------------------------------------------------------------------------

def test_sampling_is_reproducible_per_key(gpt2):
    toks, mask = padded("left", PROMPTS)

    def sample(seed):
        return np.asarray(gpt2.generate(toks, N_NEW, attention_mask=mask, stop_at_eos=False, temperature=1.5,
                                        key=jax.random.key(seed)))

    a, b, c = sample(0), sample(0), sample(1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(a[:, :toks.shape[1]], toks)


def reference_filter(logits, temperature, top_k, top_p):
    """HF's warpers in numpy: temperature, top-k (ties kept), then top-p (smallest set reaching p)."""
    x = logits / temperature
    if top_k is not None:
        x = np.where(x >= np.sort(x)[::-1][top_k - 1], x, -np.inf)
    if top_p is not None:
        order = np.argsort(-x)
        pr = np.exp(x[order] - x[order][0])
        pr /= pr.sum()
        before = np.cumsum(pr) - pr
        keep = order[before < top_p]
        x = np.where(np.isin(np.arange(len(x)), keep), x, -np.inf)
    p = np.exp(x - x.max())
    return p / p.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, None), (0.7, None, 0.6), (1.3, 8, 0.5),
                                                     (1.0, None, None), (2.0, 1, None), (1.0, None, 1e-6)])
def test_sampling_follows_the_filtered_softmax(temperature, top_k, top_p):
    """20000 draws (fixed key, so deterministic) match the filtered softmax within 5 standard
    errors, and no filtered-out token is ever drawn."""
    logits = np.random.default_rng(0).normal(size=24).astype(np.float32) * 1.5
    ref = reference_filter(logits.astype(np.float64), temperature, top_k, top_p)
    filt = np.asarray(filter_logits(jnp.asarray(logits)[None], temperature, top_k, top_p))[0]
    np.testing.assert_array_equal(np.isfinite(filt), ref > 0)
    sampler = Sampler(greedy=False, top_k=top_k, use_top_p=top_p is not None)
    n = 20000
    keys = jax.random.split(jax.random.key(42), n)
    draw = jax.jit(jax.vmap(lambda k: sample_logits(jnp.asarray(logits)[None], k, sampler, temperature,
                                                    1.0 if top_p is None else top_p)[0]))
    freq = np.bincount(np.asarray(draw(keys)), minlength=len(logits)) / n
    assert (freq[ref == 0] == 0).all()
    se = np.sqrt(ref * (1 - ref) / n)
    assert (np.abs(freq - ref) <= 5 * se + 1e-9).all(), np.c_[freq, ref]


# --- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,match", [
    (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=0), "top_k must be None or an int >= 1"),
    (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
    (dict(temperature=1.0), "sampling needs an explicit PRNG key"),
    (dict(max_len=8), "max_len=8 is too small: a 10-token prompt and 4 new tokens need 13 cache slots"),
    (dict(eos_token_id=10_000), r"eos_token_id 10000 must be token id\(s\) in \[0, \d+\)"),
])
def test_bad_arguments(gpt2, kw, match):
    args = dict(max_new_tokens=4, temperature=0.0) | kw
    with pytest.raises(ValueError, match=match):
        generate_tokens(gpt2.params, gpt2.cfg, np.array([PROMPTS[0]]), **args)


def test_bad_prompts(gpt2):
    n = gpt2.cfg.n_ctx
    with pytest.raises(ValueError, match="exceeds the model's context n_ctx"):
        gpt2.generate(np.zeros((1, n + 1), np.int32), 2, do_sample=False)
    with pytest.raises(ValueError, match=r"prompt of 60 tokens \+ max_new_tokens=10 exceeds the model's context"):
        gpt2.generate(np.zeros((1, 60), np.int32), 10, do_sample=False)
    with pytest.raises(ValueError, match="encodes to no tokens"):
        gpt2.generate(["", ""], 2, do_sample=False, prepend_bos=False)
    with pytest.raises(ValueError, match=r"prompt row\(s\) \[0, 1\] have no real tokens"):
        gpt2.generate(np.zeros((2, 3), np.int32), 2, do_sample=False, attention_mask=np.zeros((2, 3), np.int32))
    toks, mask = padded("left", PROMPTS)
    with pytest.raises(ValueError, match="needs left-padded prompts"):
        gpt2.generate(toks, 2, do_sample=False, attention_mask=mask[:, ::-1])
    with pytest.raises(ValueError, match="return_type must be one of"):
        gpt2.generate(toks, 2, do_sample=False, attention_mask=mask, return_type="logits")


def test_cache_too_small_for_generation(gpt2):
    cache = gpt2.init_kv_cache(1, 8)
    with pytest.raises(ValueError, match=r"KVCache overflow: 0 slots used \+ 13 new tokens > max_len=8"):
        gpt2.generate(np.array([PROMPTS[0]]), 4, do_sample=False, kv_cache=cache)
    with pytest.raises(ValueError, match="pass one or the other"):
        gpt2.generate(np.array([PROMPTS[0]]), 4, do_sample=False, kv_cache=cache, max_len=32)


def test_first_argmax_is_argmax():
    """Greedy decoding's `first_argmax` is `jnp.argmax`: the first of tied maxima, the first NaN
    of a row that has one, +inf, an all -inf row (index 0), f32 and bf16, one and several rows."""
    from jaxlens.generation.generate import first_argmax

    x = jax.random.normal(jax.random.PRNGKey(0), (4, 1000))
    x = x.at[0, [700, 30]].set(9.0).at[1, [500, 12]].set(jnp.nan).at[2, 99].set(jnp.inf).at[3].set(-jnp.inf)
    for a in (x, x.astype(jnp.bfloat16), x[:1], x[1:2]):
        got = jax.jit(first_argmax)(a)
        assert got.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(a, -1)))
    np.testing.assert_array_equal(np.asarray(first_argmax(x)), [30, 12, 99, 0])


def test_capture_every_step_of_qk_norm_hooks(hf_root):
    """The [batch head pos d_head] q/k-norm hooks (Qwen3) are captured along their position axis
    (axis 2, not the head axis) and equal run_with_cache over the output; the MoE router hooks,
    whose tokens are flattened, are refused by name."""
    import jaxlens

    path, _ = built("qwen3", hf_root)
    model = jaxlens.from_pretrained_no_processing(path)
    names = ["blocks.0.attn.hook_q_normed", "blocks.1.attn.k_norm.hook_scale", "blocks.1.attn.hook_pattern"]
    toks = np.array([PROMPTS[0]], np.int32)
    out, steps = model.generate(toks, N_NEW, do_sample=False, stop_at_eos=False, names_filter=names)
    out = np.asarray(out)
    _, cache = model.run_with_cache(out, names_filter=names)
    p = toks.shape[1]
    for name in names:
        got, ref = np.asarray(steps[name]), np.asarray(cache[name])[:, :, p - 1:p - 1 + N_NEW]
        if name.endswith("hook_pattern"):
            got = got[..., : out.shape[1]]
        assert_close(got, ref, name)
    moe_path, _ = built("qwen3_moe", hf_root)
    moe = jaxlens.from_pretrained_no_processing(moe_path)
    with pytest.raises(ValueError, match="blocks.0.mlp.gate.hook_out cannot be captured step by step"):
        moe.generate(toks, 2, do_sample=False, names_filter="blocks.0.mlp.gate.hook_out")
