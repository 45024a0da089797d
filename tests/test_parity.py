"""Parity with HF PyTorch (logits, residual stream) and TransformerLens 4.x (every shared hook)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import PROMPTS, assert_close, boot_bridge, padded


def head_first(name, cfg):
    """Per-head q/k-norm hooks are [batch head pos ...] (TransformerLens 4.3's layout)."""
    return cfg.qk_norm_scope == "head" and any(t in name for t in ("q_norm.", "k_norm.", "_normed"))


FLAT = ("mlp.gate.hook_out", "mlp.hook_expert_weights", "mlp.hook_expert_indices", "mlp.hook_expert_outputs")


def hf_run(model, toks, mask):
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(toks, dtype=torch.long), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(pos, dtype=torch.long), output_hidden_states=True)
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


@pytest.mark.parametrize("side", ["none", "left", "right"])
def test_matches_hf(hf_model, jl_model, side):
    _, model = hf_model
    if side == "none":
        toks = np.array([PROMPTS[0]], np.int32)
        mask = np.ones_like(toks)
    else:
        toks, mask = padded(side)
    logits, cache = jl_model.run_with_cache(toks, names_filter=lambda n: n.endswith("hook_resid_pre"),
                                            attention_mask=mask)
    ref_logits, hidden = hf_run(model, toks, mask)
    real = mask.astype(bool)
    assert_close(np.asarray(logits)[real], ref_logits[real], "logits")
    for l in range(jl_model.cfg.n_layers):
        assert_close(np.asarray(cache["resid_pre", l])[real], hidden[l][real], f"resid_pre {l}")


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_equal_prompt_alone(jl_model, side):
    """Every hook, at every real token, equals the same prompt run alone."""
    toks, mask = padded(side)
    _, batch = jl_model.run_with_cache(toks, attention_mask=mask)
    n = toks.shape[1]
    for i, p in enumerate(PROMPTS):
        _, alone = jl_model.run_with_cache(np.array([p], np.int32))
        off = n - len(p) if side == "left" else 0
        sl = slice(off, off + len(p))
        for name, a in alone.items():
            if name.endswith(FLAT):  # [tokens ...] with tokens = batch*pos (TransformerLens's MoE routing hooks)
                b = np.asarray(batch[name]).reshape(toks.shape + np.shape(a)[1:])[i]
                a = np.asarray(a)
            else:
                b = np.asarray(batch[name])[i]
                a = np.asarray(a)[0]
            if name.endswith(("hook_attn_scores", "hook_pattern")):
                b = b[:, sl, sl]
            elif head_first(name, jl_model.cfg):
                b = b[:, sl]
            else:
                b = b[sl]
            assert_close(b, a, f"{name} row {i}")


def test_every_hook_matches_transformer_lens(hf_model, jl_model):
    path, _ = hf_model
    bridge = boot_bridge(path, processed=False)
    toks = np.array([PROMPTS[0]], np.int32)
    with torch.no_grad():
        ref_logits, ref = bridge.run_with_cache(torch.tensor(toks, dtype=torch.long))
    logits, cache = jl_model.run_with_cache(toks)
    assert_close(logits, ref_logits.numpy(), "logits")
    shared = [k for k in ref.keys() if k in cache]
    ours = set(cache.keys())
    # Bridge-only aliases (hook_in/out, rotary cos/sin, hook_hidden_states, hook_unembed) are not
    # TransformerLens HookedTransformer hook points; every classic name must be present.
    classic = [k for k in ref.keys() if not k.endswith(("hook_in", "hook_out", "hook_cos", "hook_sin",
                                                         "hook_hidden_states", "hook_unembed",
                                                         "gate.hook_expert_weights", "gate.hook_expert_indices"))]
    missing = sorted(set(classic) - ours)
    assert not missing, f"hooks TransformerLens has and jaxlens lacks: {missing}"
    assert len(shared) >= 20
    for k in shared:
        assert_close(cache[k], ref[k].numpy(), k)
    # TL 4's per-block queries. block_hooks: our hook points, which are the bridge's less its own aliases
    # (hook_in/out, rotary cos/sin, the attention's and router's copies of block and expert hooks)
    assert jl_model.layer_types() == bridge.layer_types()
    bridge_only = ("hook_in", "hook_out", "hook_cos", "hook_sin", "hook_hidden_states", "hook_router_scores",
                   "gate.hook_expert_weights", "gate.hook_expert_indices")
    for l in range(jl_model.cfg.n_layers):
        assert jl_model.block_submodules(l) == bridge.block_submodules(l), f"block_submodules({l})"
        ours, theirs = jl_model.block_hooks(l), set(bridge.block_hooks(l))
        assert ours == sorted(ours) and set(ours) - theirs <= {"mlp.hook_expert_outputs"}, f"block_hooks({l})"
        left = [n for n in theirs - set(ours) if not n.endswith(bridge_only) and n.removeprefix("attn.") not in ours]
        assert not left, f"block {l} hooks the bridge has and jaxlens lacks: {left}"
    assert jl_model.block_submodules(-1) == bridge.block_submodules(-1)
    with pytest.raises(IndexError, match="out of range"):
        jl_model.block_hooks(jl_model.cfg.n_layers)
    # text input: the same tokens, so BOS is prepended (or not) as TransformerLens 4 decides per family
    assert jl_model.cfg.default_prepend_bos == bridge.cfg.default_prepend_bos, "default_prepend_bos"
    text = "Alice and Bob went to the market"
    np.testing.assert_array_equal(jl_model.to_tokens(text), bridge.to_tokens(text).numpy())
