"""The newer families' distinctive features (issue 11): each one changes the output of the random
test model (so the parity tests in test_parity.py & co. really exercise it), scanned layers of
mixed kinds equal unrolled ones, and config.json keys are read, ignored knowingly, or refused."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

import jaxlens
from conftest import PROMPTS, assert_close, built, padded
from hf_models import FAMILIES
from jaxlens.conversion import CheckpointError, hf_config
from jaxlens.model.forward import forward_jit

TOKS, MASK = padded("left", PROMPTS)

# family -> {feature: the ModelConfig change that switches it off (same params)}
FEATURES = {
    "gemma2": {"attention soft-cap": dict(attn_scores_soft_cap=None),
               "final logit soft-cap": dict(output_logits_soft_cap=None),
               "query_pre_attn_scalar": dict(attn_scale=None),
               "sliding-window layers": dict(attn_types=None, sliding_window=None),
               "post-norms": dict(norm_placement="pre")},
    "gemma3": {"q/k norm": dict(use_qk_norm=False),
               "local RoPE base": dict(rotary_base_local=None),
               "global RoPE scaling": dict(rope_scaling=None),
               "sliding-window layers": dict(attn_types=None, sliding_window=None),
               "post-norms": dict(norm_placement="pre")},
    "qwen3": {"q/k norm": dict(use_qk_norm=False)},
    "olmo2": {"q/k norm": dict(use_qk_norm=False)},
    "phi3": {"longrope": dict(rope_scaling=None), "sliding window": dict(sliding_window=None)},
}


@pytest.fixture(scope="module")
def models(hf_root):
    return {f: jaxlens.from_pretrained_no_processing(built(f, hf_root)[0]) for f in FEATURES}


def logits(params, cfg):
    return np.asarray(forward_jit(params, cfg, TOKS, MASK, precision="highest")[0])[MASK.astype(bool)]


@pytest.mark.parametrize("family,feature", [(f, x) for f, fs in FEATURES.items() for x in fs])
def test_each_feature_changes_the_output(models, family, feature):
    m = models[family]
    off = m.cfg.replace(**FEATURES[family][feature])
    if feature == "post-norms":  # "pre" reads no ln*_post: the same params run without them
        assert any("ln1_post" in k for k in m.params["blocks_0"])
    diff = np.abs(logits(m.params, m.cfg) - logits(m.params, off)).max()
    assert diff > 1e-3, f"{family}: switching off {feature} changes logits by only {diff}"


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "qwen3", "olmo2", "phi3", "qwen3_moe"])
def test_scanned_layers_equal_unrolled(hf_root, family):
    """scan_layers=True gives the unrolled numbers. Local and global layers (Gemma 2/3) share one
    nn.scan: the layer's kind is a scanned boolean that selects its mask and rotary angles (both
    computed once, outside the scan)."""
    path = built(family, hf_root)[0]
    a = jaxlens.from_pretrained_no_processing(path)
    b = jaxlens.from_pretrained_no_processing(path, scan_layers=True)
    la, ca = a.run_with_cache(TOKS, attention_mask=MASK)
    lb, cb = b.run_with_cache(TOKS, attention_mask=MASK)
    assert_close(lb, la, "logits")
    assert set(ca.keys()) == set(cb.keys())
    for k in ca.keys():
        assert_close(cb[k], ca[k], k)


def test_every_key_of_the_hf_config_classes_is_classified(hf_root):
    """A config.json written by transformers for each family converts without an unknown-key warning."""
    for family in FAMILIES:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*does not read.*")
            hf_config(built(family, hf_root)[0])


def _with_config(hf_root, tmp_path, family, **changes):
    src = built(family, hf_root)[0]
    dst = tmp_path / family
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_unknown_keys_warn_with_their_values(hf_root, tmp_path):
    path = _with_config(hf_root, tmp_path, "qwen3", some_new_switch=3, other_flag=False)
    with pytest.warns(UserWarning, match=r"some_new_switch=3.*other_flag \(default-like"):
        hf_config(path)


@pytest.mark.parametrize("family,changes,match", [
    ("gemma3", dict(use_bidirectional_attention=True), "use_bidirectional_attention=True"),
    ("qwen3", dict(quantization_config={"quant_method": "gptq"}), "quantization_config"),
    ("llama", dict(auto_map={"AutoModel": "x.Y"}), "remote code"),
    ("gemma2", dict(layer_types=["sliding_attention"]), "layer_types"),
])
def test_refused_keys_name_the_key_and_value(hf_root, tmp_path, family, changes, match):
    path = _with_config(hf_root, tmp_path, family, **changes)
    with pytest.raises(CheckpointError, match=match):
        hf_config(path)


def test_gemma2_sliding_window_default_pattern(hf_root, tmp_path):
    """Older Gemma 2 configs have no layer_types: even layers are local (HF's rule)."""
    path = _with_config(hf_root, tmp_path, "gemma2", layer_types=None)
    assert hf_config(path).attn_types == ("local", "global")
