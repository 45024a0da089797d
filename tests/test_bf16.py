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
