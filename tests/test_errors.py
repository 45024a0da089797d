"""Bad input gets a clear error that names the thing and the fix."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import jaxlens
from conftest import built
from jaxlens.conversion import CheckpointError


@pytest.fixture(scope="module")
def gpt2_path(hf_root):
    return built("gpt2", hf_root)[0]


@pytest.fixture(scope="module")
def model(gpt2_path):
    return jaxlens.from_pretrained(gpt2_path)


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_unknown_model_type(gpt2_path, tmp_path):
    d = copy(gpt2_path, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type 'mamba'.*supported"):
        jaxlens.from_pretrained(d)


def test_missing_tensor(gpt2_path, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = copy(gpt2_path, tmp_path / "m")
    t = load_file(str(d / "model.safetensors"))
    name = next(k for k in t if k.endswith("h.1.mlp.c_fc.weight"))
    del t[name]
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"h\.1\.mlp\.c_fc\.weight.* is missing"):
        jaxlens.from_pretrained(d)


def test_wrong_shape(gpt2_path, tmp_path):
    d = copy(gpt2_path, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_inner"] = 100
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape .* config.json implies"):
        jaxlens.from_pretrained(d)


def test_truncated_safetensors(gpt2_path, tmp_path):
    d = copy(gpt2_path, tmp_path / "m")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        jaxlens.from_pretrained(d)


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        jaxlens.from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        jaxlens.from_pretrained(tmp_path)


def test_unsupported_rope_scaling(hf_root, tmp_path):
    d = copy(built("llama", hf_root)[0], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "mrope", "factor": 4.0, "rope_theta": 10000.0}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="rope_type 'mrope' is not supported"):
        jaxlens.from_pretrained(d)


@pytest.mark.parametrize("bad,match", [
    (np.array([[0, 1, 300]]), r"token id 300 .* outside the vocabulary \[0, 300\)"),
    (np.array([[0, -1, 2]]), r"token id -1 .* outside the vocabulary"),
    (np.zeros((1, 65), np.int32), r"sequence length 65 exceeds .* n_ctx=64"),
    (np.zeros((1, 0), np.int32), "empty"),
    (np.zeros((2, 2, 2), np.int32), r"must be \[batch pos\]"),
    (np.array([[0.5, 1.0]]), "must be integers"),
])
def test_bad_tokens(model, bad, match):
    with pytest.raises(ValueError, match=match):
        model(bad)


def test_bad_text_inputs(model):
    with pytest.raises(ValueError, match="input is empty"):
        model([])
    with pytest.raises(ValueError, match="encodes to no tokens"):
        model("", prepend_bos=False)


def test_bad_mask(model):
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(np.array([[0, 1, 2]]), attention_mask=np.array([[1, 1]]))


def test_names_filter_matching_nothing(model):
    with pytest.raises(ValueError, match="names no hook.*did you mean 'blocks.0.attn.hook_pattern'"):
        model.run_with_cache(np.array([[0, 1]]), names_filter="blocks.0.attn.hook_patern")
    with pytest.raises(ValueError, match="callable matched no hook"):
        model.run_with_cache(np.array([[0, 1]]), names_filter=lambda n: False)
    with pytest.raises(ValueError, match="return_type"):
        model(np.array([[0, 1]]), return_type="probs")


def test_cache_key_error_says_fix(model):
    _, cache = model.run_with_cache(np.array([[0, 1]]), names_filter="blocks.0.hook_resid_pre")
    with pytest.raises(KeyError, match="names_filter"):
        cache["pattern", 0]


def test_config_values_are_validated_from_their_literal_types():
    from jaxlens.config import ModelConfig

    base = dict(model_type="gpt2", d_model=8, n_layers=1, n_heads=2, d_head=4, d_mlp=16, d_vocab=10, n_ctx=8)
    for field, bad in (("normalization_type", "BN"), ("positional_embedding_type", "alibi"), ("act_fn", "tanh")):
        with pytest.raises(ValueError, match=field):
            ModelConfig(**base, **{field: bad})
    old = dict(ModelConfig(**base).to_dict(), tokenizer_name="gpt2")  # a field older versions wrote
    assert ModelConfig.from_dict(old) == ModelConfig(**base)


def test_one_name_for_the_kv_heads():
    from jaxlens.config import ModelConfig

    base = dict(model_type="llama", d_model=8, n_layers=1, n_heads=4, d_head=2, d_mlp=16, d_vocab=10, n_ctx=8)
    assert ModelConfig(**base).n_kv_heads == 4 and ModelConfig(**base).n_key_value_heads is None
    assert ModelConfig(**base) == ModelConfig(**base, n_kv_heads=4)
    grouped = ModelConfig.from_dict(dict(ModelConfig(**base).to_dict(), n_kv_heads=None, n_key_value_heads=2))
    assert grouped.n_kv_heads == 2 and grouped.n_key_value_heads == 2  # TransformerLens's name accepted
    with pytest.raises(ValueError, match="not a multiple of n_kv_heads=3"):
        ModelConfig(**base, n_kv_heads=3)


def test_parameter_of_the_wrong_shape_is_named(model):
    """jaxlens checks a stored parameter's shape itself (flax's check traces the initializer)."""
    import flax
    import jax

    params = jax.tree_util.tree_map(lambda x: x, model.params)
    path, w = next((p, x) for p, x in jax.tree_util.tree_leaves_with_path(params)
                   if jax.tree_util.keystr(p).endswith("['W_in']"))
    bad = jax.tree_util.tree_map_with_path(lambda p, x: x[:, :-1] if p == path else x, params)
    toks = model.to_tokens("a b")
    with pytest.raises(flax.errors.ScopeParamShapeError, match="W_in"):
        jaxlens.forward(bad, model.cfg, toks)
    jaxlens.forward(params, model.cfg, toks)  # the right shapes still run
