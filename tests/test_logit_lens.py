"""`jaxlens.logit_lens` / `cache.logit_lens` / `logit_readout` against TransformerLens 4.3's
`transformer_lens.tools.analysis.logit_lens` on the same weights (its bridge, unprocessed and
in compatibility mode): labels, values, entropy, top ids, target ranks, per-row targets, the
result's helpers, and the error paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jaxlens
from conftest import assert_close, boot_bridge, built

TOKS = np.array([[0, 5, 9, 30, 2, 7, 11, 40], [0, 17, 250, 8, 4, 61, 62, 63]], np.int32)


@pytest.fixture(scope="module", params=[("gpt2", False), ("llama", True), ("gemma2", False)],
                ids=["gpt2", "llama-processed", "gemma2-softcap"])
def lenses(request, hf_root):
    family, processed = request.param
    path, _ = built(family, hf_root)
    bridge = boot_bridge(path, processed)
    model = jaxlens.from_pretrained(path) if processed else jaxlens.from_pretrained_no_processing(path)
    with torch.no_grad():
        _, ref = bridge.run_with_cache(torch.tensor(TOKS, dtype=torch.long))
    return model, model.run_with_cache(TOKS)[1], bridge, ref


def _n(x):
    return None if x is None else (x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x))


def _t(kw):
    return {k: (torch.tensor(v, dtype=torch.long) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}


CASES = [dict(), dict(incl_mid=True), dict(positions=None, top_k=5), dict(targets=[5, 7], return_type="log_probs"),
         dict(targets=TOKS[:, 1:], positions=slice(0, 7)), dict(vocab=[1, 2, 3], return_type="probs", batch_slice=1),
         dict(layers=[0, -1], apply_ln=False), dict(targets=np.array([3, 4])),
         dict(positions=[1, 3], batch_slice=[0], top_k=3, chunk_size=3)]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(kw) or "default")
def test_matches_transformer_lens(lenses, kw):
    from transformer_lens.tools.analysis.logit_lens import logit_lens as tl_lens

    model, cache, bridge, ref = lenses
    with torch.no_grad():
        want = tl_lens(bridge, cache=ref, **_t(kw))
    got = cache.logit_lens(**kw)
    assert got.labels == want.labels and got.has_batch_dim == want.has_batch_dim
    for field in ("values", "entropy", "top_ids", "target_ids", "target_ranks", "vocab_ids"):
        a, b = _n(getattr(got.readout, field)), _n(getattr(want.readout, field))
        assert (a is None) == (b is None), field
        if a is not None:
            assert_close(a, b, field, atol=2e-5)
    if "top_k" in kw:
        assert got.top_tokens(model.tokenizer) == want.top_tokens(bridge.tokenizer)
        ours, theirs = got.to_dataframe(model.tokenizer), want.to_dataframe(bridge.tokenizer)
        assert list(ours.columns) == list(theirs.columns) and len(ours) == len(theirs)
        assert (ours["token_index"] == theirs["token_index"]).all()
        np.testing.assert_allclose(ours.iloc[:, -1], theirs.iloc[:, -1], atol=2e-5)
    if isinstance(kw.get("targets"), list):
        np.testing.assert_array_equal(got.rank_trajectory(7), _n(want.rank_trajectory(7)))


def test_model_entry_point_and_last_entry(lenses):
    """From a model and input (only the residual hooks run); the last entry is the model's
    logits (log-probabilities once center_unembed shifted them); a lens maps each entry."""
    from transformer_lens.tools.analysis.logit_lens import logit_lens as tl_lens

    model, cache, bridge, _ = lenses
    got = jaxlens.logit_lens(model, TOKS, targets=[5], positions=None)
    with torch.no_grad():
        want = tl_lens(bridge, torch.tensor(TOKS, dtype=torch.long), targets=[5], positions=None)
    assert_close(got.values, _n(want.values), "values", atol=2e-5)
    full = cache.logit_lens(positions=None, return_type="log_probs").values[-1]
    logp = np.asarray(jax_log_softmax(model(TOKS)))
    assert_close(full, logp, "final entry = the model's log-probabilities", atol=1e-4)
    same = cache.logit_lens(lens=lambda entry, i: entry * 0 + cache["blocks.0.hook_resid_pre"][:, -1])
    assert np.allclose(np.asarray(same.values)[0], np.asarray(same.values)[-1])  # the lens is applied per entry


def jax_log_softmax(x):
    import jax

    return jax.nn.log_softmax(x, axis=-1)


def test_string_targets_and_readout(lenses):
    model, cache, _, _ = lenses
    word = model.tokenizer.decode([40])
    res = cache.logit_lens(targets=[word, 7])
    assert res.target_names == [word, None]
    np.testing.assert_array_equal(res.rank_trajectory(word), res.rank_trajectory(40))
    vec = cache["blocks.1.hook_resid_post"][:, -1]
    direct = jaxlens.logit_readout(cache, vec, top_k=2)
    assert direct.values.shape == (2, 2) and direct.decode(model.tokenizer)[0][0] == model.tokenizer.decode(
        [int(direct.top_ids[0, 0])])


def test_errors(lenses):
    model, cache, _, _ = lenses
    with pytest.raises(ValueError, match="at most one of vocab, targets and top_k"):
        cache.logit_lens(vocab=[1], top_k=2)
    with pytest.raises(ValueError, match="return_type must be one of"):
        cache.logit_lens(return_type="odds")
    with pytest.raises(ValueError, match="out of range for the accumulated stack"):
        cache.logit_lens(layers=[99])
    with pytest.raises(ValueError, match=r"ids must be within \[0, 300\)"):
        cache.logit_lens(vocab=[300])
    with pytest.raises(ValueError, match="top_k must be in"):
        cache.logit_lens(top_k=0)
    with pytest.raises(ValueError, match="do not broadcast"):
        cache.logit_lens(targets=np.zeros((2, 3), np.int32), positions=None)
    with pytest.raises(ValueError, match="either a cache or a model with input"):
        jaxlens.logit_lens(cache, TOKS)
    with pytest.raises(ValueError, match="needs an input to run or a cache"):
        jaxlens.logit_lens(model)
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
        cache.logit_lens(chunk_size=0)
    with pytest.raises(ValueError, match="rank_trajectory needs a lens run with targets"):
        cache.logit_lens().rank_trajectory()
    with pytest.raises(ValueError, match="pass target= when more than one target"):
        cache.logit_lens(targets=[1, 2]).rank_trajectory()
    with pytest.raises(ValueError, match="not among the requested targets"):
        cache.logit_lens(targets=[1, 2]).rank_trajectory(3)
    with pytest.raises(TypeError, match="vectors must be a floating-point array"):
        jaxlens.logit_readout(cache, np.zeros((2, model.cfg.d_model), np.int32))
