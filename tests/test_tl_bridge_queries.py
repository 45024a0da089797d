"""TransformerLens 4's parameter and per-block queries on the model (`tl_parameters`,
`tl_named_parameters`, `get_params`, `blocks_with`, `stack_params_for`, `composition_layer_indices`,
`attn_head_labels`, `QK_for_attn_layers`, `OV_for_attn_layers`, `n_params_total`, `get_hook_point`)
against the bridge on the same checkpoint, MHA and grouped-query."""

from __future__ import annotations

import numpy as np
import pytest

import jaxlens
from conftest import assert_close, boot_bridge, built


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pair(request, hf_root):
    path, _ = built(request.param, hf_root)
    return jaxlens.from_pretrained_no_processing(path), boot_bridge(path, processed=False)


def test_parameter_dicts_match_the_bridge(pair):
    model, bridge = pair
    ours, theirs = model.tl_parameters(), bridge.tl_parameters()
    assert list(ours) == list(theirs)
    for k in theirs:
        assert_close(ours[k], theirs[k].detach().numpy(), k)
    assert [k for k, _ in model.tl_named_parameters()] == [k for k, _ in bridge.tl_named_parameters()]
    assert list(model.get_params()) == list(bridge.get_params())


def test_block_queries_match_the_bridge(pair):
    model, bridge = pair
    for sub in ("attn", "mlp"):
        assert [l for l, _ in model.blocks_with(sub)] == [l for l, _ in bridge.blocks_with(sub)]
    assert model.composition_layer_indices() == bridge.composition_layer_indices()
    assert model.attn_head_labels == bridge.attn_head_labels
    idx, W_Q = model.stack_params_for("attn", "attn.W_Q")
    tidx, tW_Q = bridge.stack_params_for("attn", "attn.W_Q")
    assert idx == tidx
    assert_close(W_Q, tW_Q.detach().numpy(), "stacked W_Q")
    idx, W_in = model.stack_params_for("mlp", "mlp.W_in", reshape_fn=lambda w: w * 2)
    assert idx == list(range(model.cfg.n_layers)) and np.allclose(np.asarray(W_in), 2 * np.asarray(model.W_in))
    for name in ("QK_for_attn_layers", "OV_for_attn_layers"):
        (i_o, m_o), (i_t, m_t) = getattr(model, name)(), getattr(bridge, name)()
        assert i_o == i_t, name
        assert_close(m_o.AB, m_t.AB.detach().numpy(), name)
    with pytest.raises(ValueError, match=r"submodule must be one of \['attn', 'mlp'\]"):
        model.blocks_with("ssm")


def test_n_params_total_matches_the_bridge_whatever_the_processing(pair):
    model, bridge = pair
    n = bridge.n_params_total
    assert model.n_params_total == n
    assert model.process_weights().n_params_total == n  # fold_ln drops norm weights, untying adds W_U
    if model.cfg.has_pos_embed:  # (rotary models cannot be refactored)
        assert model.refactor_factored_attn_matrices().n_params_total == n
    # a model built from a params tree counts that tree (less the b_U jaxlens always keeps)
    assert jaxlens.HookedTransformer(model.cfg, model.params).n_params_total == n


def test_get_hook_point_matches_the_bridge(pair):
    model, bridge = pair
    for name in model.hook_names():
        ref = model.get_hook_point(name)
        assert ref is not None and ref.name == name and bridge.get_hook_point(name) is not None, name
    for name in ("nope", "blocks.0.attn", f"blocks.{model.cfg.n_layers}.hook_resid_pre", "hook_embed.x"):
        assert model.get_hook_point(name) is None and bridge.get_hook_point(name) is None, name
    point = model.get_hook_point("blocks.0.hook_resid_pre")
    point.add_hook(lambda x, hook: x * 0)
    try:
        assert point.has_hooks()
        toks = np.array([[0, 5, 9, 30]], np.int32)
        edited = np.asarray(model(toks))
    finally:
        model.reset_hooks()
    assert not point.has_hooks()
    assert not np.allclose(edited, np.asarray(model(toks)))


def test_n_params_total_of_a_processed_load(hf_root):
    path, _ = built("gpt2", hf_root)  # tied: processing unties W_U and folds the norms away
    assert jaxlens.from_pretrained(path).n_params_total == boot_bridge(path, processed=True).n_params_total
