"""TransformerLens 4's parameter and per-block queries on the model (`tl_parameters`,
`tl_named_parameters`, `get_params`, `blocks_with`, `stack_params_for`, `composition_layer_indices`,
`attn_head_labels`, `QK_for_attn_layers`, `OV_for_attn_layers`) against the bridge on the same
checkpoint, MHA and grouped-query."""

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
