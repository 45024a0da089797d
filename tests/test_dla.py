"""`jaxlens.direct_logit_attribution` against TransformerLens 4.3's `tools.analysis`
`direct_logit_attribution` on the same (processed) weights: every unit, answer and incorrect
tokens as ids, strings and per-example arrays, one position or all; `top`; the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jaxlens
from conftest import assert_close, boot_bridge, built

TOKS = np.array([[0, 5, 9, 30, 2, 7, 11, 40], [0, 17, 250, 8, 4, 61, 62, 63]], np.int32)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def both(request, hf_root):
    path, _ = built(request.param, hf_root)
    return jaxlens.from_pretrained(path), boot_bridge(path, processed=True), path


@pytest.mark.parametrize("unit", ["component", "layer", "head"])
@pytest.mark.parametrize("kw", [dict(answer_tokens=5), dict(answer_tokens="word", incorrect_tokens=7),
                                dict(answer_tokens=np.array([5, 6]), incorrect_tokens=np.array([7, 8])),
                                dict(answer_tokens=5, pos=None)], ids=["id", "str-minus-id", "per-example", "all-pos"])
def test_matches_transformer_lens(both, unit, kw):
    from transformer_lens.tools.analysis import direct_logit_attribution as tl_dla

    model, bridge, _ = both
    kw = {k: (model.tokenizer.decode([40]) if isinstance(v, str) else v) for k, v in kw.items()}
    with torch.no_grad():
        want = tl_dla(bridge, torch.tensor(TOKS, dtype=torch.long), unit=unit,
                      **{k: (torch.tensor(v, dtype=torch.long) if isinstance(v, np.ndarray) else v) for k, v in kw.items()})
    got = jaxlens.direct_logit_attribution(model, TOKS, unit=unit, **kw)
    assert got.labels == want.labels and got.unit == unit
    assert_close(got.attribution, want.attribution.numpy(), f"{unit} attribution", atol=2e-5)
    assert [label for label, _ in got.top(3)] == [label for label, _ in want.top(3)]


def test_cache_entry_sum_and_refusals(both):
    model, _, path = both
    logits, cache = model.run_with_cache(TOKS)
    res = jaxlens.direct_logit_attribution(cache, answer_tokens=5)  # a cache alone
    full = np.asarray(logits)[:, -1, 5] - np.asarray(model.b_U)[5]
    assert_close(np.asarray(res.attribution).sum(0), full, "components sum to logit - b_U", atol=1e-4)
    with pytest.raises(ValueError, match="unit must be one of"):
        jaxlens.direct_logit_attribution(cache, answer_tokens=5, unit="neuron")
    with pytest.raises(ValueError, match="answer_tokens is required"):
        jaxlens.direct_logit_attribution(cache)
    with pytest.raises(ValueError, match="provide either `input` to run the model, or a precomputed `cache`"):
        jaxlens.direct_logit_attribution(model, answer_tokens=5)
    raw = jaxlens.from_pretrained_no_processing(path)
    with pytest.raises(ValueError, match="identity final norm weight"):
        jaxlens.direct_logit_attribution(raw, TOKS, answer_tokens=5)
