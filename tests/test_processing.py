"""TransformerLens weight processing: weights equal the bridge's processed weights (all flags and
each alone), configs, layouts, invariants, and round trips. (Activations, logits and analyses of the
processed model are compared with the processed bridge in test_cache_analysis.py.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxlens
from conftest import assert_close, built
from jaxlens.conversion import load_any
from jaxlens.model.processing import process_params

FLAGS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")
ALL = {f: True for f in FLAGS}
WEIGHTS = {"attn": ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"),
           "mlp": ("W_in", "W_gate", "W_out", "b_in", "b_out")}


def boot(path, flags):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(path), device="cpu", dtype=torch.float32)
    bridge.enable_compatibility_mode(**{f: flags.get(f, False) for f in FLAGS})
    return bridge


def ours_stacked(params, cfg, sub, name):
    vals = [params[f"blocks_{l}"][sub].get(name) for l in range(cfg.n_layers)]
    return None if vals[0] is None else np.stack([np.asarray(v) for v in vals])


def compare_weights(params, cfg, bridge, label):
    checked = 0
    for sub, names in WEIGHTS.items():
        if sub == "mlp" and cfg.num_experts:
            continue  # the bridge has no MoE W_in/W_out; tests/test_moe.py compares the experts with its HF tensors
        for n in names:
            ours = ours_stacked(params, cfg, sub, n)
            try:
                theirs = getattr(bridge, n)
            except AttributeError:
                theirs = None
            if theirs is None or ours is None:
                # a bias one side lacks must be zero on the other (TransformerLens drops absent biases)
                present = ours if ours is not None else (None if theirs is None else theirs.detach().numpy())
                assert present is None or not np.abs(present).max() > 0, f"{label} {n}: only one side has it"
                continue
            assert_close(ours, theirs.detach().numpy(), f"{label} {n}")
            checked += 1
    W_U = np.asarray(params["W_E"]).T if cfg.tie_word_embeddings else np.asarray(params["W_U"])
    assert_close(W_U, bridge.W_U.detach().numpy(), f"{label} W_U")
    assert_close(params["b_U"], bridge.b_U.detach().numpy(), f"{label} b_U")
    assert_close(params["W_E"], bridge.W_E.detach().numpy(), f"{label} W_E")
    if cfg.has_pos_embed:
        assert_close(params["W_pos"], bridge.W_pos.detach().numpy(), f"{label} W_pos")
    assert checked >= (4 if cfg.num_experts else 6)


def test_all_processing_matches_transformer_lens(family, hf_model):
    path, _ = hf_model
    cfg, raw = load_any(path, "float32")
    params, new = process_params(raw, cfg, **ALL)
    compare_weights(params, new, boot(path, ALL), f"{family} all")
    if cfg.norm_placement == "post":  # OLMo 2: no norm before a sublayer, nothing folded (TransformerLens alike)
        assert new.normalization_type == cfg.normalization_type and "ln_final" in params
        return
    assert new.normalization_type == {"LN": "LNPre", "RMS": "RMSPre"}[cfg.normalization_type]
    assert "ln_final" not in params and "ln1" not in params["blocks_0"] and "ln2" not in params["blocks_0"]
    if cfg.norm_placement == "pre_post":  # post-norms keep their weights
        assert "ln1_post" in params["blocks_0"] and "ln2_post" in params["blocks_0"]
    assert not new.tie_word_embeddings and "W_U" in params
    if "b_V" in raw["blocks_0"]["attn"]:
        assert new.use_o_bias and not np.abs(ours_stacked(params, new, "attn", "b_V")).max() > 0


@pytest.mark.parametrize("fam", ["gpt2", "qwen2"])  # LN, tied, positions / RMS, value bias without b_O
@pytest.mark.parametrize("flag", FLAGS)
def test_each_flag_alone_matches_transformer_lens(fam, flag, hf_root):
    path = built(fam, hf_root)[0]
    cfg, raw = load_any(path, "float32")
    params, new = process_params(raw, cfg, **{f: f == flag for f in FLAGS})
    compare_weights(params, new, boot(path, {flag: True}), f"{fam} {flag}")


def test_properties_of_processed_weights(hf_root):
    cfg, raw = load_any(built("gpt2", hf_root)[0], "float32")
    p, new = process_params(raw, cfg, **ALL)
    zero = dict(rtol=0, atol=1e-6)
    # LN folded: reading weights are centred over d_model; writing weights and unembed centred
    assert_close(ours_stacked(p, new, "attn", "W_Q").mean(2), np.zeros((2, new.n_heads, new.d_head)), "W_Q", **zero)
    assert_close(ours_stacked(p, new, "mlp", "W_in").mean(1), np.zeros((2, new.d_mlp)), "W_in", **zero)
    assert_close(np.asarray(p["W_E"]).mean(-1), np.zeros(new.d_vocab), "W_E", **zero)
    assert_close(ours_stacked(p, new, "attn", "b_O").mean(-1), np.zeros(2), "b_O", **zero)
    assert_close(np.asarray(p["W_U"]).mean(-1), np.zeros(new.d_model), "W_U vocab", **zero)
    assert_close(np.asarray(p["W_U"]).mean(0), np.zeros(new.d_vocab), "W_U d_model", **zero)
    # nothing changes without flags; the input tree is not modified
    same, cfg2 = process_params(raw, cfg, **{f: False for f in FLAGS})
    assert cfg2 == cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), same, raw)
    assert "ln_final" in raw and cfg.normalization_type == "LN"
    # a second fold_ln is a no-op (norms are already weightless); centring twice changes nothing
    again, cfg3 = process_params(p, new, **ALL)
    assert cfg3 == new
    jax.tree.map(lambda a, b: assert_close(a, b, "twice", atol=1e-6), again, p)


def test_layouts_dtypes_and_jax_arrays_agree(hf_root, tmp_path):
    from jaxlens.model.forward import stack_layers

    path = built("llama", hf_root)[0]
    cfg, raw = load_any(path, "float32")
    p, new = process_params(raw, cfg, **ALL)
    # the scanned layout gives the same numbers, in the scanned layout
    ps, news = process_params(stack_layers(raw, cfg.n_layers), cfg, **ALL)
    assert news == new and "blocks" in ps
    assert_close(ps["blocks"]["block"]["attn"]["W_Q"], ours_stacked(p, new, "attn", "W_Q"), "scanned")
    # HookedTransformer.process_weights() == from_pretrained flags; jax arrays under jit agree too
    model = jaxlens.from_pretrained_no_processing(path)
    processed = model.process_weights()
    flagged = jaxlens.from_pretrained(path, **ALL)
    assert processed.cfg == flagged.cfg == new
    jax.tree.map(lambda a, b: assert_close(a, b, "method vs flags", atol=1e-6), processed.params, flagged.params)
    assert isinstance(jax.tree.leaves(processed.params)[0], jax.Array)
    jitted = jax.jit(lambda q: process_params(q, cfg, **ALL)[0])(model.params)
    jax.tree.map(lambda a, b: assert_close(a, b, "jit", atol=1e-6), jitted, processed.params)
    # bf16 stays bf16 (processed in float32, cast back)
    half = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), raw)
    hp, _ = process_params(half, cfg, **ALL)
    assert {x.dtype for x in jax.tree.leaves(hp)} == {jnp.dtype(jnp.bfloat16)}
    # the processed model saves and loads without torch (config says RMSPre; no norm weights)
    back = jaxlens.from_pretrained_no_processing(flagged.save(tmp_path / "llama_processed"))
    assert back.cfg == flagged.cfg and back.cfg.normalization_type == "RMSPre"
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back.params, flagged.params)
    # the cache of a processed model carries no final-norm weights (there are none)
    assert not any(k.startswith("ln_final") for k in flagged.cache_weights())
