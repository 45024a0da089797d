"""Patching grids: equal a Python loop of single patched runs, and TransformerLens's patching
functions on its bridge; the prefix below the patched layer is not recomputed."""

from __future__ import annotations

from jaxlens.fingerprint import Fn
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxlens
from conftest import assert_close, boot_bridge, built
from jaxlens.edits import interventions as iv
from jaxlens.edits import patching

CLEAN = np.array([[0, 5, 9, 30, 2, 7], [0, 17, 250, 8, 3, 3]], np.int32)
CORRUPT = np.array([[0, 5, 9, 31, 2, 7], [0, 17, 251, 8, 3, 4]], np.int32)
A, B = 3, 4  # answer / wrong-answer tokens of the logit-difference metric


def metric(logits):
    return (logits[:, -1, A] - logits[:, -1, B]).mean()


def metric_t(logits):
    return (logits[:, -1, A] - logits[:, -1, B]).mean()


@pytest.fixture(scope="module")
def gpt2(hf_root):
    path, _ = built("gpt2", hf_root)
    m = jaxlens.from_pretrained_no_processing(path)
    _, cache = m.run_with_cache(CLEAN)
    return m, cache


GRIDS = {
    "resid_pre": (patching.get_act_patch_resid_pre, ("layer", "pos")),
    "attn_out": (patching.get_act_patch_attn_out, ("layer", "pos")),
    "mlp_out": (patching.get_act_patch_mlp_out, ("layer", "pos")),
    "z_all": (patching.get_act_patch_attn_head_out_all_pos, ("layer", "head")),
    "z_by_pos": (patching.get_act_patch_attn_head_out_by_pos, ("layer", "pos", "head")),
    "pattern_all": (patching.get_act_patch_attn_head_pattern_all_pos, ("layer", "head_index")),
}


# Every layer of a grid is its own compiled program; to keep the suite fast, the two grids that only
# repeat the resid_pre / z mechanics on another hook are compared on their last layer.
PARTIAL = {"mlp_out": [1], "z_all": [1]}


@pytest.fixture(scope="module")
def grids(gpt2):
    m, cache = gpt2
    return {k: np.asarray(fn(m, CORRUPT, cache, metric, layers=PARTIAL.get(k))) for k, (fn, _) in GRIDS.items()}


@pytest.fixture(scope="module")
def tl_grids(hf_root, gpt2):
    from transformer_lens import patching as tlp

    path, _ = built("gpt2", hf_root)
    bridge = boot_bridge(path, processed=False)
    with torch.no_grad():
        _, tl_cache = bridge.run_with_cache(torch.tensor(CLEAN, dtype=torch.long))
        corrupt = torch.tensor(CORRUPT, dtype=torch.long)
        return {k: getattr(tlp, _TL_NAMES[k])(bridge, corrupt, tl_cache, metric_t).numpy() for k in GRIDS}


_TL_NAMES = {"resid_pre": "get_act_patch_resid_pre", "attn_out": "get_act_patch_attn_out",
             "mlp_out": "get_act_patch_mlp_out", "z_all": "get_act_patch_attn_head_out_all_pos",
             "z_by_pos": "get_act_patch_attn_head_out_by_pos", "pattern_all": "get_act_patch_attn_head_pattern_all_pos"}


def test_grids_match_transformer_lens(grids, tl_grids, gpt2):
    m, _ = gpt2
    L, P, H = m.cfg.n_layers, CORRUPT.shape[1], m.cfg.n_heads
    shapes = {"resid_pre": (L, P), "attn_out": (L, P), "mlp_out": (L, P), "z_all": (L, H), "z_by_pos": (L, P, H),
              "pattern_all": (L, H)}
    for k in GRIDS:
        assert grids[k].shape == shapes[k] == tl_grids[k].shape, k
        rows = PARTIAL.get(k, slice(None))
        assert_close(grids[k][rows], tl_grids[k][rows], k)
    assert np.ptp(grids["resid_pre"]) > 1e-3  # the grid is not constant: patches matter


def _setter_edit(kind, index, clean):
    """The TransformerLens patch setter for one cell, as a pytree edit (index traced: one compile per layer)."""
    if kind in ("resid_pre",):
        return iv.intervention_resid([index[0]], clean)
    if kind == "z_by_pos":
        return iv.patch_heads([index[1]], clean, positions=[index[0]])
    if kind == "pattern_all":
        return iv.patch_heads([index[0]], clean)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["resid_pre", "z_by_pos", "pattern_all"])
def test_grid_equals_loop_of_single_runs(grids, gpt2, kind):
    m, cache = gpt2
    act = {"resid_pre": "resid_pre", "z_by_pos": "z", "pattern_all": "pattern"}[kind]
    grid = grids[kind]
    ref = np.zeros_like(grid)
    layers = range(m.cfg.n_layers) if kind == "resid_pre" else [1]  # one compile per layer: keep it short
    for l in layers:
        name = jaxlens.get_act_name(act, l)
        for index in np.ndindex(*grid.shape[1:]):
            logits = m.run_with_hooks(CORRUPT, fwd_hooks=[(name, _setter_edit(kind, index, cache[name]))])
            ref[(l, *index)] = metric(logits)
    assert_close(grid[list(layers)], ref[list(layers)], kind)


def test_chunked_and_layer_subset_equal_full(grids, gpt2):
    m, cache = gpt2
    part = np.asarray(patching.get_act_patch_resid_pre(m, CORRUPT, cache, metric, layers=[1], chunk_size=4))
    assert np.isnan(part[0]).all()
    assert_close(part[1], grids["resid_pre"][1], "chunked layer 1")


def test_gqa_value_heads(hf_root):
    """k/v grids of a grouped-query model run over kv heads, as TransformerLens's."""
    path, _ = built("llama", hf_root)
    m = jaxlens.from_pretrained_no_processing(path)
    _, cache = m.run_with_cache(CLEAN, names_filter="blocks.1.attn.hook_v")
    grid = np.asarray(patching.get_act_patch_attn_head_v_all_pos(m, CORRUPT, cache, metric, layers=[1]))
    assert grid.shape == (m.cfg.n_layers, m.cfg.n_kv_heads)
    for h in range(m.cfg.n_kv_heads):
        logits = m.run_with_hooks(CORRUPT, fwd_hooks=[("blocks.1.attn.hook_v", iv.patch_heads([h], cache["v", 1]))])
        assert_close(grid[1, h], metric(logits), f"kv head {h}")


def test_prefix_below_patched_layer_is_not_computed(gpt2):
    """The program for the last layer does about half the work of layer 0's (2 layers): XLA drops
    the embedding and layer 0 because resid_pre of the patched layer is supplied; and a suffix
    starting at a later position (the corrupted run's cache before it) does less still."""
    m, cache = gpt2
    mask = jnp.ones(CORRUPT.shape, jnp.int32)
    cells = jnp.arange(CORRUPT.shape[1], dtype=jnp.int32)[:, None]
    logits, resid, kv = patching._corrupted_run(m.params, jnp.asarray(CORRUPT), mask, cfg=m.cfg,
                                                capture=frozenset({"blocks.0.hook_resid_pre"}),
                                                precision=m.precision, with_kv=True)

    def flops(l, window=0, metric_positions=None):
        name = f"blocks.{l}.hook_mlp_out"
        c = patching._suffix_grid.lower(m.params, mask, resid["blocks.0.hook_resid_pre"], kv if window else None,
                                        logits, cache[name], cells[window:], Fn(metric), cfg=m.cfg, name=name,
                                        axes=(1,), layer=l, window=window, window_axis=0,
                                        metric_positions=metric_positions, precision=m.precision,
                                        chunk_size=CORRUPT.shape[1] - window).compile()  # one chunk: all counted
        ca = c.cost_analysis()
        return (ca[0] if isinstance(ca, list) else ca)["flops"] / (CORRUPT.shape[1] - window)  # per cell

    f0, f1 = flops(0), flops(1)
    # per patch: unembed + 2 blocks vs unembed + 1 block (unembed is d_model x vocab, about one block here)
    assert f1 < 0.8 * f0, (f0, f1)
    assert flops(0, window=3) < 0.7 * f0  # half the positions
    assert flops(0, metric_positions=(5,)) < 0.8 * f0  # logits at one position of six


def test_run_grid_of_edits(gpt2):
    """Any grid of edits is one program: here attention multipliers × heads on layer 1's pattern."""
    m, _ = gpt2
    heads = jnp.repeat(jnp.arange(4), 3)
    mults = jnp.tile(jnp.array([0.0, 0.5, 2.0]), 4)

    def build(item, qs):
        h, s = item
        return [("blocks.1.attn.hook_pattern", iv.AttnMatEdit(h[None], qs, jnp.arange(2), s))]

    qs = jnp.array([3, 4, 5])
    out = np.asarray(patching.run_grid(m, CORRUPT, build, (heads, mults), metric, (qs,), chunk_size=5))
    assert out.shape == (12,)
    for i in range(12):
        logits = m.run_with_hooks(CORRUPT, fwd_hooks=build((heads[i], mults[i]), qs))
        assert_close(out[i], metric(logits), f"cell {i}")


def test_patching_errors(gpt2):
    m, cache = gpt2
    with pytest.raises(ValueError, match="must return a scalar"):
        patching.get_act_patch_resid_pre(m, CORRUPT, cache, lambda lg: lg[:, -1, 0], layers=[1])
    partial_cache = jaxlens.ActivationCache({"blocks.0.hook_resid_pre": cache["resid_pre", 0]}, m.cfg)
    with pytest.raises(ValueError, match="clean_cache has no 'blocks.1.hook_resid_pre'"):
        patching.get_act_patch_resid_pre(m, CORRUPT, partial_cache, metric)
    with pytest.raises(ValueError, match="same batch size and length"):
        patching.get_act_patch_resid_pre(m, CORRUPT[:, :5], cache, metric)
    with pytest.raises(ValueError, match="does not apply to activation"):
        patching.generic_activation_patch(m, CORRUPT, cache, metric, "pattern", ("layer", "pos"))
    with pytest.raises(ValueError, match="chunk_size"):
        patching.get_act_patch_resid_pre(m, CORRUPT, cache, metric, chunk_size=0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        patching.get_act_patch_resid_pre(m, CORRUPT + 1000, cache, metric)
    with pytest.raises(ValueError, match="same leading"):
        patching.run_grid(m, CORRUPT, lambda i: [], (jnp.arange(3), jnp.arange(4)), metric)
