"""`from_pretrained` processes weights by default, as TransformerLens's `HookedTransformer.from_pretrained`
and TL 4's `enable_compatibility_mode()` do; `from_pretrained_no_processing` keeps HF's weights.

Default-loaded models equal the processed TransformerLens bridge key by key (every shared hook, the
logits, the weights), raw-loaded ones equal HF PyTorch, and the two give the same log-probabilities."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import jaxlens
from conftest import assert_close, boot_bridge, built

TOKS = np.array([[0, 5, 9, 30, 2, 7, 100, 44, 12, 3], [0, 17, 250, 8, 4, 61, 62, 63, 64, 65]], np.int32)
FLAGS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")


@pytest.fixture(scope="module")
def default_model(hf_model):
    return jaxlens.from_pretrained(hf_model[0])


@pytest.fixture(scope="module")
def processed_bridge(hf_model):
    """TransformerLens's processed bridge (all four flags, its defaults) and its cache on TOKS."""
    bridge = boot_bridge(hf_model[0], processed=True)
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(torch.tensor(TOKS, dtype=torch.long))
    return bridge, logits.numpy(), cache


def test_default_equals_processed_transformer_lens_key_by_key(family, default_model, processed_bridge):
    bridge, ref_logits, ref = processed_bridge
    logits, cache = default_model.run_with_cache(TOKS)
    shared = [k for k in ref.keys() if k in cache]
    assert len(shared) >= 20, f"{family}: only {len(shared)} hooks shared with TransformerLens"
    for k in shared:
        assert_close(cache[k], ref[k].numpy(), f"{family} {k}")
    assert_close(logits, ref_logits, f"{family} logits")
    for name in ("W_E", "W_U", "b_U", "W_Q", "W_K", "W_V", "W_O", "b_O", "W_in", "W_out"):
        if default_model.cfg.num_experts and name in ("W_in", "W_out"):
            continue  # the bridge has no MoE W_in/W_out; tests/test_moe.py compares the experts with its HF tensors
        try:
            theirs = getattr(bridge, name).detach().numpy()
        except AttributeError:  # TransformerLens exposes no bias a checkpoint lacks: ours must be zero
            assert not np.abs(np.asarray(getattr(default_model, name))).max() > 0, f"{family} {name}"
            continue
        if name in ("W_K", "W_V"):  # TransformerLens keeps grouped heads; jaxlens expands them (as its docs say)
            theirs = np.repeat(theirs, default_model.cfg.n_heads // theirs.shape[1], axis=1)
        assert_close(getattr(default_model, name), theirs, f"{family} {name}")


def test_no_processing_equals_hf(family, hf_model):
    path, hf = hf_model
    raw = jaxlens.from_pretrained_no_processing(path)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(TOKS, dtype=torch.long)).logits.numpy()
    assert_close(raw(TOKS), ref, f"{family} logits")
    assert raw.cfg.normalization_type in ("LN", "RMS") and "ln_final" in raw.params


def test_log_probs_equal_between_default_and_no_processing(family, hf_model, default_model):
    raw = jaxlens.from_pretrained_no_processing(hf_model[0])
    assert_close(jax.nn.log_softmax(default_model(TOKS)), jax.nn.log_softmax(raw(TOKS)), f"{family} log-probs",
                 atol=3e-5)


def test_each_step_applies_to_the_families_transformer_lens_applies_it_to(family, hf_model, default_model):
    """fold_ln wherever a norm reads the residual before a sublayer (norms become weightless; OLMo 2's
    post-norms only are not folded, as in TransformerLens); writing weights centred on LayerNorm
    models only; the unembedding centred unless a final soft-cap makes logits shift-sensitive."""
    raw = jaxlens.from_pretrained_no_processing(hf_model[0])
    cfg = default_model.cfg
    if raw.cfg.norm_placement == "post":
        assert cfg.normalization_type == raw.cfg.normalization_type and "ln_final" in default_model.params
    else:
        assert cfg.normalization_type == {"LN": "LNPre", "RMS": "RMSPre"}[raw.cfg.normalization_type]
        assert "ln_final" not in default_model.params
    W_E = np.asarray(default_model.W_E)
    if raw.cfg.normalization_type == "LN":
        assert_close(W_E.mean(-1), np.zeros(cfg.d_vocab), "centred W_E", atol=1e-6)
    else:  # RMSNorm is not translation invariant: TransformerLens leaves writing weights alone
        np.testing.assert_array_equal(W_E, np.asarray(raw.W_E))
    W_U_mean = np.asarray(default_model.W_U).mean(-1)
    if raw.cfg.output_logits_soft_cap is None:
        assert_close(W_U_mean, np.zeros(cfg.d_model), "centred W_U", atol=1e-6)
    else:  # Gemma 2: tanh is not shift-invariant, TransformerLens leaves W_U uncentred
        assert np.abs(W_U_mean).max() > 1e-4


def test_flags_and_dtype_are_explicit_arguments(hf_root):
    path = built("gpt2", hf_root)[0]
    off = {f: False for f in FLAGS}
    raw = jaxlens.from_pretrained_no_processing(path)
    flagged_off = jaxlens.from_pretrained(path, **off)
    assert flagged_off.cfg == raw.cfg
    jax.tree.map(np.testing.assert_array_equal, flagged_off.params, raw.params)
    # one step alone, on either entry point; the method spelling agrees with the function
    only_unembed = jaxlens.HookedTransformer.from_pretrained_no_processing(path, center_unembed=True)
    assert only_unembed.cfg.normalization_type == "LN"
    assert_close(np.asarray(only_unembed.W_U).mean(-1), np.zeros(raw.cfg.d_model), "W_U", atol=1e-6)
    half = jaxlens.from_pretrained(path, dtype="bfloat16")
    assert half.cfg.normalization_type == "LNPre" and half.W_U.dtype == jax.numpy.bfloat16
    raw_half = jaxlens.from_pretrained_no_processing(path, "bfloat16", scan_layers=True)
    assert raw_half.scan_layers and raw_half.W_E.dtype == jax.numpy.bfloat16
