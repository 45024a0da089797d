"""Direct path patching (`jaxlens.patching.get_act_patch_direct_path`, TransformerLens 4's) on the
per-head q/k/v inputs, against TransformerLens 4.3 on the same weights, and its refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jaxlens
from conftest import assert_close, boot_bridge, built

CLEAN = np.array([[0, 5, 9, 30, 2, 7, 11, 40], [0, 17, 250, 8, 4, 61, 62, 63]], np.int32)
CORRUPT = np.array([[0, 5, 9, 31, 2, 7, 12, 40], [0, 17, 251, 8, 4, 60, 62, 63]], np.int32)


def metric(logits):
    return logits[:, -1, 5].mean() - logits[:, -1, 7].mean()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def both(request, hf_root):
    path, _ = built(request.param, hf_root)
    bridge = boot_bridge(path, processed=True)
    model = jaxlens.from_pretrained(path)
    with torch.no_grad():
        ref = [bridge.run_with_cache(torch.tensor(t, dtype=torch.long))[1] for t in (CLEAN, CORRUPT)]
    ours = [model.run_with_cache(t)[1] for t in (CLEAN, CORRUPT)]
    return model, bridge, ours, ref


@pytest.mark.parametrize("component", ["q", "k", "v"])
def test_matches_transformer_lens(both, component):
    from transformer_lens import patching as tlp

    model, bridge, (clean, corrupt), (ref_clean, ref_corrupt) = both
    args = (CORRUPT, clean, corrupt, metric, 0, 1, component)
    if component != "q" and model.cfg.n_kv_heads != model.cfg.n_heads:  # GQA: refused by both
        with pytest.raises(ValueError, match="grouped-query attention"):
            jaxlens.patching.get_act_patch_direct_path(model, *args)
        with pytest.raises(ValueError, match="GQA"):
            tlp.get_act_patch_direct_path(bridge, torch.tensor(CORRUPT, dtype=torch.long), ref_clean, ref_corrupt,
                                          metric, 0, 1, component, verbose=False)
        return
    with torch.no_grad():
        want = tlp.get_act_patch_direct_path(bridge, torch.tensor(CORRUPT, dtype=torch.long), ref_clean, ref_corrupt,
                                             metric, 0, 1, component, verbose=False).numpy()
    got = jaxlens.patching.get_act_patch_direct_path(model, *args)
    assert got.shape == (model.cfg.n_layers, model.cfg.n_heads)
    assert_close(got, want, f"direct path into {component}", atol=1e-5)
    base = float(metric(model(CORRUPT)))
    assert np.abs(np.asarray(got)[1] - base).max() > 1e-4  # the paths change the metric
    assert not np.asarray(got)[0].any()  # no path into the source's own layer
    if component == "q":
        every = jaxlens.patching.get_act_patch_direct_path_all_sources(model, CORRUPT, clean, corrupt, metric)
        assert every.shape == (2, model.cfg.n_heads, 2, model.cfg.n_heads)
        assert_close(every[0, 1], got, "all sources [0, 1]")
        assert not np.asarray(every[1]).any()  # the last layer's heads have no later reader


def test_refusals(both, hf_root):
    model, _, (clean, corrupt), _ = both
    with pytest.raises(ValueError, match="component must be 'q', 'k' or 'v'"):
        jaxlens.patching.get_act_patch_direct_path(model, CORRUPT, clean, corrupt, metric, 0, 1, "z")
    with pytest.raises(ValueError, match="src_head=9 is out of range"):
        jaxlens.patching.get_act_patch_direct_path(model, CORRUPT, clean, corrupt, metric, 0, 9)
    with pytest.raises(ValueError, match="src_layer=2 is out of range"):
        jaxlens.patching.get_act_patch_direct_path(model, CORRUPT, clean, corrupt, metric, 2, 0)
    partial_cache = model.run_with_cache(CLEAN, names_filter=["blocks.1.attn.hook_z"])[1]
    with pytest.raises(ValueError, match="clean_cache must hold blocks.0.attn.hook_z"):
        jaxlens.patching.get_act_patch_direct_path(model, CORRUPT, partial_cache, corrupt, metric, 0, 1)
    gemma = jaxlens.from_pretrained(built("gemma2", hf_root)[0])
    g_cache = gemma.run_with_cache(CLEAN)[1]
    with pytest.raises(ValueError, match="normalises each attention output before the residual add"):
        jaxlens.patching.get_act_patch_direct_path(gemma, CORRUPT, g_cache, g_cache, metric, 0, 1)
