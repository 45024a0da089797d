"""`SVDInterpreter` against TransformerLens's on the same checkpoints: OV, w_in and w_out singular
vectors read out through W_U, unprocessed (ln2's gain scales w_in; Gemma's 1 + w) and processed
(fold_ln: no gain), compared vector by vector up to sign; and its errors."""

from __future__ import annotations

import numpy as np
import pytest

import jaxlens
from conftest import assert_close, boot_bridge, built

CASES = [("gpt2", False), ("gpt2", True), ("llama", False), ("gemma2", False), ("olmo2", False)]


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{'processed' if p else 'raw'}" for f, p in CASES])
def pair(request, hf_root):
    family, processed = request.param
    path, _ = built(family, hf_root)
    model = jaxlens.from_pretrained(path) if processed else jaxlens.from_pretrained_no_processing(path)
    return family, model, boot_bridge(path, processed)


# A singular vector moves by (perturbation) / (gap to its neighbouring singular values): these random
# matrices have neighbours 0.6% apart, so jax's and torch's float32 LAPACK SVDs (and, processed, the
# float32 rounding of two weight foldings) differ by up to 6e-5 of a vector's scale (measured); 1e-4
VECTOR_TOL = 1e-4


def _same_up_to_sign(ours, theirs, name):
    ours, theirs = np.asarray(ours), theirs.detach().numpy()
    assert ours.shape == theirs.shape, name
    for i in range(ours.shape[-1]):
        sign = np.sign(np.vdot(ours[..., i], theirs[..., i]))
        scale = np.abs(theirs[..., i]).max()
        assert_close(sign * ours[..., i], theirs[..., i], f"{name} vector {i}", rtol=0, atol=VECTOR_TOL * scale)


def test_singular_vectors_match_transformer_lens(pair):
    from transformer_lens import SVDInterpreter as TLSVDInterpreter

    family, model, bridge = pair
    ours, theirs = jaxlens.SVDInterpreter(model), TLSVDInterpreter(bridge)
    # head 0 only under grouped-query attention: TransformerLens indexes its per-kv-head W_V by the
    # query head there, where jaxlens (as HookedTransformer) pairs query head h with kv head h // group
    heads = range(model.cfg.n_heads) if model.cfg.n_kv_heads == model.cfg.n_heads else [0]
    for layer in range(model.cfg.n_layers):
        for kind in ("w_in", "w_out"):
            _same_up_to_sign(ours.get_singular_vectors(kind, layer, 4), theirs.get_singular_vectors(kind, layer, 4),
                             f"{family} {kind} L{layer}")
        for h in heads:
            _same_up_to_sign(ours.get_singular_vectors("OV", layer, 3, head_index=h),
                             theirs.get_singular_vectors("OV", layer, 3, head_index=h), f"{family} OV L{layer}H{h}")


def test_bad_arguments_raise_clear_errors(pair):
    _, model, _ = pair
    svd = jaxlens.SVDInterpreter(model)
    with pytest.raises(ValueError, match="vector_type must be one of"):
        svd.get_singular_vectors("QK", 0)
    with pytest.raises(ValueError, match="needs head_index"):
        svd.get_singular_vectors("OV", 0)
    with pytest.raises(ValueError, match="layer_index must be an int in 0..1"):
        svd.get_singular_vectors("w_in", 2)
    with pytest.raises(ValueError, match="head_index must be an int"):
        svd.get_singular_vectors("OV", 0, head_index=model.cfg.n_heads)
    with pytest.raises(ValueError, match="num_vectors must be an int in 1.."):
        svd.get_singular_vectors("w_out", 0, num_vectors=10**6)


def test_moe_layers_have_no_dense_mlp(hf_root):
    path, _ = built("qwen3_moe", hf_root)
    svd = jaxlens.SVDInterpreter(jaxlens.from_pretrained_no_processing(path))
    with pytest.raises(NotImplementedError, match="sparse MoE layer"):
        svd.get_singular_vectors("w_in", 0)
    assert svd.get_singular_vectors("OV", 0, 2, head_index=0).shape == (svd.cfg.d_vocab, 1, 2)
