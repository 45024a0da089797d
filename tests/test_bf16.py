"""bf16 as a first-class path: a bfloat16 model matches float32 within bf16's precision, every family.

Two references per family, both float32 runs of the same checkpoint:
- the float32 model on the bf16-rounded weights: the difference is only the bf16 arithmetic
  (activations rounded to 8 mantissa bits between ops; softmax, norm statistics and router
  softmax must be float32, or the error grows well past the bound below);
- the plain float32 model: weight rounding included, a looser bound.
Errors are measured relative to the logit scale (max |logit| of the reference), the way a
bf16 user reads them: bf16's relative step is 2**-8 = 0.4%, and a 2-layer model compounds a
few such roundings per op.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlens
from conftest import PROMPTS, built, padded
from hf_models import FAMILIES

TOKS, MASK = padded("left")
# hooks whose dtype a bf16 MoE model must show: scores (so the softmax) and router logits in float32
STATS = {"blocks.0.attn.hook_attn_scores": jnp.float32, "blocks.0.mlp.gate.hook_out": jnp.float32,
         "blocks.1.attn.hook_pattern": jnp.bfloat16, "blocks.0.hook_resid_post": jnp.bfloat16}
# bf16 arithmetic vs f32 arithmetic on the same (rounded) weights: a few bf16 steps (0.4% each)
# through 2 layers; measured at most 2.0% of the logit scale (gemma2, olmo2), so 2x headroom
ARITH_TOL = 0.04
# against the plain f32 weights the rounding of every weight adds to it: measured at most 3.5%
# (qwen3_moe; dense families at most 2.4%)
WEIGHT_TOL = 0.06


def _rel_err(ref: np.ndarray, got: np.ndarray, where: np.ndarray) -> float:
    """max |ref - got| over the positions `where` [batch pos], relative to max |ref| there."""
    return float(np.abs(ref - got)[where].max() / np.abs(ref[where]).max())


@pytest.fixture(scope="module")
def models(hf_root):
    """{family: (f32 model, bf16 model, f32 model on the bf16-rounded weights)}, each built once."""
    out = {}
    for fam in FAMILIES:
        path, _ = built(fam, hf_root)
        f32 = jaxlens.from_pretrained_no_processing(path)
        b16 = jaxlens.from_pretrained_no_processing(path, "bfloat16")
        rounded = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), b16.params)
        out[fam] = (f32, b16, jaxlens.HookedTransformer(f32.cfg, rounded, f32.tokenizer))
    return out


def _logits(model, moe: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(float32 logits, [layer batch pos k] expert indices for MoE models, else None)."""
    if not moe:
        return np.asarray(model(TOKS, attention_mask=MASK).astype(jnp.float32)), None
    logits, cache = model.run_with_cache(TOKS, names_filter=lambda n: n.endswith("hook_expert_indices") or n in STATS,
                                         attention_mask=MASK)
    if model.cfg.dtype == jnp.bfloat16:  # statistics in float32 (scores and so the softmax; router logits)
        assert {n: cache[n].dtype for n in STATS} == STATS, STATS
        pattern = np.asarray(cache["blocks.1.attn.hook_pattern"].astype(jnp.float32))
        rows = np.broadcast_to(MASK.astype(bool)[:, None, :], pattern.shape[:3])
        np.testing.assert_allclose(pattern.sum(-1)[rows], 1.0, atol=1e-2)  # within bf16 rounding of each entry
    idx = np.stack([np.asarray(cache[f"blocks.{l}.mlp.hook_expert_indices"]) for l in range(model.cfg.n_layers)])
    return np.asarray(logits.astype(jnp.float32)), np.sort(idx.reshape(idx.shape[0], *TOKS.shape, -1), -1)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_logits_match_f32(models, family):
    """Logits within bf16 tolerance of both references (MoE: also the float32 statistics, see STATS)."""
    f32, b16, rounded = models[family]
    assert {x.dtype for x in jax.tree.leaves(b16.params)} == {jnp.dtype(jnp.bfloat16)}
    moe = bool(f32.cfg.num_experts)
    ref, idx_ref = _logits(f32, moe)
    ref_rounded, idx_rounded = _logits(rounded, moe)
    got, idx_got = _logits(b16, moe)
    real = MASK.astype(bool)
    assert np.isfinite(got[real]).all(), family
    same_route, same_route_rounded = real, real
    if moe:  # a near-tie in the router may pick another expert (a discrete jump): compare where none did
        same_route = real & (idx_got == idx_ref).all(axis=(0, -1))
        same_route_rounded = real & (idx_got == idx_rounded).all(axis=(0, -1))
        assert same_route.sum() >= 0.7 * real.sum() and same_route_rounded.sum() >= 0.7 * real.sum(), family
    arith, total = _rel_err(ref_rounded, got, same_route_rounded), _rel_err(ref, got, same_route)
    assert arith < ARITH_TOL, f"{family}: bf16 arithmetic error {arith:.3%} of the logit scale"
    assert total < WEIGHT_TOL, f"{family}: bf16 vs f32 error {total:.3%} of the logit scale"


def test_bf16_greedy_generation_matches_rounded_f32(models):
    """bf16 decoding (KV cache in bf16) gives the tokens the f32 run on the same weights gives,
    wherever f32's top choice has a clear margin at every step (otherwise one rounding may flip it)."""
    from jaxlens.generation.generate import generate_tokens

    _, b16, rounded = models["llama"]
    prompt = np.asarray([PROMPTS[0]], np.int32)
    out_b = generate_tokens(b16.params, b16.cfg, prompt, max_new_tokens=6, stop_at_eos=False, return_logits=True)
    out_r = generate_tokens(rounded.params, rounded.cfg, prompt, max_new_tokens=6, stop_at_eos=False,
                            return_logits=True, precision="highest")
    lr = np.asarray(out_r.logits[0], np.float32)
    top2 = np.sort(lr, -1)[:, -2:]
    margin = (top2[:, 1] - top2[:, 0]) / np.abs(lr).max()
    n_clear = int(np.argmax(margin < 0.05)) if (margin < 0.05).any() else len(margin)
    assert out_b.kv_cache.keys.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out_b.tokens)[0, : prompt.shape[1] + n_clear],
                                  np.asarray(out_r.tokens)[0, : prompt.shape[1] + n_clear])


@pytest.mark.parametrize("spec,x_shape,w_shape", [("rk,kn->rn", (1, 48), (48, 40)),            # MLP, one row
                                                  ("bpm,hmd->bphd", (1, 1, 48), (3, 48, 8)),    # q/k/v projection
                                                  ("bphm,hmd->bphd", (1, 1, 3, 48), (3, 48, 8)),  # split q/k/v input
                                                  ("bpd,vd->bpv", (1, 1, 48), (97, 48)),         # tied unembedding
                                                  ("bpd,vd->bpv", (2, 3, 48), (97, 48))])        # several rows: as is
def test_weight_einsum_bf16_equals_f32_accumulation(spec, x_shape, w_shape):
    """A bf16 weight product (one row padded to two on CPU) is the float32 product of the same bf16
    values, rounded once to bf16: the padding row changes nothing, and the result keeps x's dtype."""
    from jaxlens.model.layers import weight_einsum

    kx, kw = jax.random.split(jax.random.PRNGKey(3))
    x = jax.random.normal(kx, x_shape).astype(jnp.bfloat16)
    W = jax.random.normal(kw, w_shape).astype(jnp.bfloat16)
    got = jax.jit(weight_einsum, static_argnums=0)(spec, x, W)
    ref = jnp.einsum(spec, x.astype(jnp.float32), W.astype(jnp.float32), precision="highest")
    assert got.dtype == jnp.bfloat16 and got.shape == ref.shape
    # one bf16 rounding of the f32 sum (relative step 2**-8), plus f32 summation-order noise
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref), rtol=2**-8, atol=1e-5)


def test_take_rows_is_exact_indexing():
    """`take_rows` (a bf16 table gathered through its 16-bit view) is bit-for-bit `table[idx]`,
    for bf16, float16 and float32 tables, inside jit and with a [batch pos] index."""
    from jaxlens.model.layers import take_rows

    idx = jnp.asarray([[0, 5, 96], [3, 3, 1]])
    for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
        table = (jax.random.normal(jax.random.PRNGKey(0), (97, 16)) * 100).astype(dtype)
        got = jax.jit(take_rows)(table, idx)
        assert got.dtype == table.dtype
        np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(table[idx].astype(jnp.float32)))


def test_bf16_split_qkv_input_runs(models):
    """A bf16 model with TransformerLens's split q/k/v input, edited per head (a head axis in both
    operands of the projection: XLA:CPU has no batched bf16 dot with f32 output), runs and matches
    the float32 run on the same weights with the same edit (compared at hook_z, where it acts)."""
    _, b16, rounded = models["llama"]

    def per_head(act, hook):  # [batch pos head d_model], before ln1: a different direction added per head
        h, m = act.shape[2:]
        shift = jnp.arange(h, dtype=jnp.float32)[:, None] * jnp.cos(jnp.arange(m, dtype=jnp.float32))[None]
        return act + shift.astype(act.dtype)

    hooks = [("blocks.0.hook_q_input", per_head), ("blocks.0.hook_v_input", per_head), ("blocks.1.hook_k_input", per_head)]
    names = ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]
    z = {}
    for name, m in (("bf16", b16), ("f32", rounded), ("unedited", rounded)):
        m.set_use_split_qkv_input(True)
        try:
            _, cache = m.run_with_cache(TOKS, attention_mask=MASK, names_filter=names,
                                        fwd_hooks=[] if name == "unedited" else hooks)
        finally:
            m.set_use_split_qkv_input(False)
        z[name] = [np.asarray(cache[n].astype(jnp.float32)) for n in names]
    real = MASK.astype(bool)
    for l in range(2):
        assert _rel_err(z["unedited"][l], z["f32"][l], real) > 10 * ARITH_TOL  # the edit matters
        assert _rel_err(z["f32"][l], z["bf16"][l], real) < ARITH_TOL
