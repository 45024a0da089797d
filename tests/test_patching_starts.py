"""Where the patching grids start each cell, beyond its layer and position: at the first position
where the clean activation differs from the corrupted one (earlier positions are patched with
the values they already have), and inside the patched block (a z patch cannot change that
block's queries, keys, values or pattern; a patch after the attention cannot change the
attention sublayer). Every grid still equals a plain loop of full patched forwards, on families
whose blocks differ (parallel attention and MLP, norms after the sublayers, GQA)."""

from __future__ import annotations

from functools import partial

import jax.numpy as jnp
import numpy as np
import pytest

import jaxlens
from conftest import assert_close, built
from jaxlens.edits import patching
from jaxlens.fingerprint import Fn
from jaxlens.hooks import Hooks
from jaxlens.model.block import Resume
from jaxlens.model.forward import forward, unstack_layers
from test_patching_suffix import _patched_logits

S = 12
RNG = np.random.default_rng(7)
CLEAN = RNG.integers(1, 150, (2, S)).astype(np.int32)
CORRUPT = CLEAN.copy()
FIRST = 5  # the first position where the prompts differ (start bucket 4: cells at 4 still run)
CORRUPT[:, [FIRST, 9]] = RNG.integers(150, 200, (2, 2))
A, B = 3, 4


def metric(logits):
    return (logits[:, -1, A] - logits[:, -1, B]).mean() + 0.3 * logits[:, 7, A].mean()


def loop(m, tokens, cache, act, layer, axes, sizes):
    """The reference: one full forward per cell with the patch hook, full logits, the metric."""
    params = unstack_layers(m.params, m.cfg.n_layers) if "blocks" in m.params else m.params
    name = jaxlens.get_act_name(act, layer)
    mask = jnp.ones(tokens.shape, jnp.int32)
    out = np.zeros(sizes, np.float32)
    for cell in np.ndindex(*sizes):
        logits = _patched_logits(params, jnp.asarray(tokens), mask, jnp.asarray(cell, jnp.int32), cache[name],
                                 cfg=m.cfg, name=name, axes=axes)
        out[cell] = metric(logits)
    return out


@pytest.fixture(scope="module")
def models(hf_root):
    out = {}

    def get(family):
        if family not in out:
            m = jaxlens.from_pretrained_no_processing(built(family, hf_root)[0])
            out[family] = m, m.run_with_cache(CLEAN)[1]
        return out[family]

    return get


GRIDS = {  # function, activation, patched axes of the activation, the grid's position axis (None: all positions)
    "head_out_all_pos": (patching.get_act_patch_attn_head_out_all_pos, "z", (2,), None),
    "v_all_pos": (patching.get_act_patch_attn_head_v_all_pos, "v", (2,), None),
    "resid_pre": (patching.get_act_patch_resid_pre, "resid_pre", (1,), 0),
    "attn_out": (patching.get_act_patch_attn_out, "attn_out", (1,), 0),
    "mlp_out": (patching.get_act_patch_mlp_out, "mlp_out", (1,), 0),
    "resid_mid": (patching.get_act_patch_resid_mid, "resid_mid", (1,), 0),
    "head_out_by_pos": (patching.get_act_patch_attn_head_out_by_pos, "z", (1, 2), 0),
    "pattern_by_pos": (patching.get_act_patch_attn_head_pattern_by_pos, "pattern", (1, 2), 1),  # [head dest_pos]
    # generic grids of hooks after the attention: they resume at hook_attn_out too
    "mlp_post": (partial(patching.generic_activation_patch, activation_name="post", index_axis_names=("layer", "pos")),
                 "post", (1,), 0),
    "resid_post": (partial(patching.generic_activation_patch, activation_name="resid_post",
                           index_axis_names=("layer", "pos")), "resid_post", (1,), 0),
}
CASES = [("gpt2", g, 1) for g in GRIDS] + [
    ("gpt_neox", "mlp_out", 0), ("gpt_neox", "head_out_all_pos", 1),  # parallel attention and MLP
    ("gemma2", "attn_out", 1), ("gemma2", "head_out_all_pos", 0),  # norms before and after each sublayer
    ("olmo2", "resid_mid", 0), ("olmo2", "head_out_all_pos", 1),  # norms after each sublayer
    ("llama", "head_out_all_pos", 1), ("llama", "v_all_pos", 0),  # grouped-query attention
    ("llama", "mlp_post", 1),  # gated MLP
]


@pytest.mark.parametrize("family,grid,layer", CASES)
def test_grid_equals_the_loop_from_the_first_difference_on(models, family, grid, layer):
    m, cache = models(family)
    fn, act, axes, pos_axis = GRIDS[grid]
    out = np.asarray(fn(m, CORRUPT, cache, metric, layers=[layer]))[layer]
    ref = loop(m, CORRUPT, cache, act, layer, axes, out.shape)
    assert_close(out, ref, f"{family} {grid} layer {layer}")
    assert np.ptp(ref) > 1e-4, "the patches must matter, or the comparison proves nothing"
    if pos_axis is not None:  # position grids: the cells before the first difference are the corrupted run
        corrupted = float(metric(m(CORRUPT)))
        np.testing.assert_allclose(np.moveaxis(out, pos_axis, 0)[:FIRST], corrupted, rtol=1e-5, atol=1e-5)


def test_identical_prompts_compile_nothing(models):
    m, cache = models("gpt2")
    before = patching._suffix_grid._cache_size() + patching._packed_grid._cache_size()
    for fn in (patching.get_act_patch_resid_pre, patching.get_act_patch_attn_head_out_all_pos):
        out = np.asarray(fn(m, CLEAN, cache, metric))
        np.testing.assert_allclose(out, float(metric(m(CLEAN))), rtol=1e-5, atol=1e-5)
    assert patching._suffix_grid._cache_size() + patching._packed_grid._cache_size() == before


def test_first_difference():
    a = np.zeros((2, 6, 3), np.float32)
    b = a.copy()
    assert patching.first_difference(a, b, 1) == 6  # equal everywhere: the axis length
    b[1, 4, 2] = 1e-30
    assert patching.first_difference(a, b, 1) == 4  # any batch row or feature
    a[0, 2, 0] = np.nan
    b[0, 2, 0] = np.nan
    assert patching.first_difference(a, b, 1) == 2  # NaN never counts as equal
    pat = np.zeros((1, 2, 5, 5), np.float32)
    pat2 = pat.copy()
    pat2[0, 1, 3, 0] = 0.5
    assert patching.first_difference(pat, pat2, 2) == 3  # a pattern's query axis
    wide = np.ones((1, 3, 2), np.float64) + 1e-12  # the clean value as the patch writes it (cast): equal
    assert patching.first_difference(wide, jnp.ones((1, 3, 2), jnp.float32), 1) == 3


def test_start_bucket():
    got = [patching.start_bucket(p) for p in range(34)]
    assert got[:13] == [0, 1, 2, 3, 4, 4, 6, 6, 8, 8, 8, 8, 12]
    assert got[16:18] == [16, 16] and got[24] == 24 and got[31] == 24 and got[32] == 32
    assert all(b <= p and (p < 4 or b > p * 0.66) for p, b in enumerate(got))


def test_resume_skips_the_attention_work(models):
    """A z cell's block starts at hook_z, an attn_out cell's after the attention: less work, checked
    in the compiled program (and the grids above check that the numbers are the loop's)."""
    m, cache = models("gpt2")
    params = unstack_layers(m.params, m.cfg.n_layers) if "blocks" in m.params else m.params
    mask = jnp.ones(CORRUPT.shape, jnp.int32)
    names = frozenset({"blocks.0.hook_resid_pre", "blocks.0.attn.hook_z", "blocks.0.hook_attn_out"})
    logits, acts, kv = patching._corrupted_run(params, jnp.asarray(CORRUPT), mask, cfg=m.cfg, capture=names,
                                               precision=m.precision, with_kv=True)
    cells = jnp.arange(m.cfg.n_heads, dtype=jnp.int32)[:, None]

    def flops(resume_at, value):
        c = patching._suffix_grid.lower(params, mask, acts["blocks.0.hook_resid_pre"], kv, logits,
                                        cache["blocks.0.attn.hook_z"], cells, Fn(metric), value, cfg=m.cfg,
                                        name="blocks.0.attn.hook_z", axes=(2,), layer=0, window=4, window_axis=None,
                                        metric_positions=None, precision=m.precision, chunk_size=m.cfg.n_heads,
                                        resume_at=resume_at).compile()
        ca = c.cost_analysis()
        return (ca[0] if isinstance(ca, list) else ca)["flops"]

    assert flops("z", acts["blocks.0.attn.hook_z"]) < flops(None, None)


def test_resume_needs_a_start_layer(models):
    m, _ = models("gpt2")
    z = jnp.zeros((2, S, m.cfg.n_heads, m.cfg.d_head))
    with pytest.raises(ValueError, match="resume starts the first block"):
        forward(m.params, m.cfg, jnp.asarray(CORRUPT), resume=Resume("z", z))
    x = jnp.zeros((2, S, m.cfg.d_model))
    with pytest.raises(ValueError, match="resume starts the first block"):
        forward(m.params, m.cfg, x, start_at_layer=0, resume=Resume("mlp_out", x))
    out = forward(m.params, m.cfg, x, start_at_layer=0, resume=Resume("attn_out", x), hooks=Hooks())[0]
    assert out.shape == (2, S, m.cfg.d_vocab)


def test_first_differences_fall_back_to_the_clean_cache_program(models):
    """Where the grid's own corrupted run differs from the clean cache at position 0 only by
    rounding (another program), the corrupted prompt runs through the clean cache's program, which
    gives the clean values bit for bit where the prompts agree; unless the embeddings already
    differ at position 0 (then nothing can be skipped and no forward is spent)."""
    m, cache = models("gpt2")
    name, emb = "blocks.1.hook_resid_mid", patching.EMBEDDED
    own = m.run_with_cache(CORRUPT, names_filter=[name, emb])[1]
    rounded = {name: own[name] * (1 + 2 ** -20), emb: own[emb]}  # off at every position, as another program
    cleans = {name: jnp.asarray(cache[name])}
    got = patching._first_differences(m, CORRUPT, None, cache, cleans, rounded, 1)
    assert got == {name: FIRST}
    assert patching.first_difference(cache[name], rounded[name], 1) == 0
    other = CORRUPT.copy()
    other[:, 0] = (other[:, 0] + 1) % 150
    moved = {name: rounded[name], emb: m.run_with_cache(other, names_filter=emb)[1][emb]}
    assert patching._first_differences(m, CORRUPT, None, cache, cleans, moved, 1) == {name: 0}
