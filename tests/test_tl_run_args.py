"""TransformerLens 4's run arguments on the model, against the bridge on the same checkpoint:
`run_with_cache(pos_slice=, return_cache_object=False)`, `run_with_hooks(remove_batch_dim=True)`,
`to_str_tokens(padding_side=)`, `add_hook(hook_fn=)`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jaxlens
from conftest import PROMPTS, assert_close, boot_bridge, built

TOKS = np.asarray([PROMPTS[0], [0, 17, 250, 8, 3, 9, 4, 6, 1, 2]], np.int32)


@pytest.fixture(scope="module", params=["gpt2", "llama", "qwen3"])
def pair(request, hf_root):
    path, _ = built(request.param, hf_root)
    return request.param, jaxlens.from_pretrained_no_processing(path), boot_bridge(path, processed=False)


@pytest.mark.parametrize("pos_slice", [-1, (1, 4), [0, 2, 7]])
def test_run_with_cache_pos_slice_matches_the_bridge(pair, pos_slice):
    family, model, bridge = pair
    _, ours = model.run_with_cache(TOKS, pos_slice=pos_slice)
    _, theirs = bridge.run_with_cache(torch.tensor(TOKS, dtype=torch.long), pos_slice=pos_slice)
    for k in ours.keys():  # every jaxlens key is a bridge key (tests/test_hook_names.py)
        assert_close(ours[k], theirs[k].detach().numpy(), f"{family} {k} pos_slice={pos_slice}")
    if family == "qwen3":  # [batch head pos d_head] q/k-norm hooks are sliced along positions
        assert ours["blocks.0.attn.hook_q_normed"].shape[2] == (1 if pos_slice == -1 else 3)


def test_pos_slice_then_remove_batch_dim_and_plain_dicts(pair):
    family, model, bridge = pair
    one = TOKS[:1]
    _, ours = model.run_with_cache(one, pos_slice=-1, remove_batch_dim=True, return_cache_object=False)
    _, theirs = bridge.run_with_cache(torch.tensor(one, dtype=torch.long), pos_slice=-1, remove_batch_dim=True,
                                      return_cache_object=False)
    assert type(ours) is dict and type(theirs) is dict
    for k in ours:
        assert_close(ours[k], theirs[k].detach().numpy(), f"{family} {k}")


def test_pos_slice_refuses_flattened_router_hooks(hf_root):
    path, _ = built("qwen3_moe", hf_root)
    model = jaxlens.from_pretrained_no_processing(path)
    with pytest.raises(ValueError, match="pos_slice cannot slice blocks.0.mlp.gate.hook_out"):
        model.run_with_cache(TOKS, pos_slice=-1)
    _, cache = model.run_with_cache(TOKS, pos_slice=-1, names_filter=lambda n: "mlp.gate" not in n and "expert" not in n)
    assert cache["blocks.0.hook_resid_pre"].shape[1] == 1
    with pytest.raises(ValueError, match="pos_slice for blocks.0.hook_resid_pre index 99 is out of range"):
        model.run_with_cache(TOKS, pos_slice=99, names_filter="blocks.0.hook_resid_pre")


def test_run_with_hooks_remove_batch_dim_matches_the_bridge(pair):
    """A hook sees [pos d_model] at batch 1 and its edit of position 0 lands there; at batch 2 it
    sees the batch axis, as in TransformerLens."""
    family, model, bridge = pair

    def ours_fn(ndim):
        def fn(x, hook):
            if x.ndim != ndim:  # jaxlens hooks may not record: check the shape where it is seen
                raise AssertionError(f"hook saw shape {x.shape}, expected {ndim} axes")
            return x.at[0].multiply(3.0)
        return fn

    def theirs_fn(x, hook):
        x = x.clone()
        x[0] *= 3.0
        return x

    for toks, ndim in ((TOKS[:1], 2), (TOKS, 3)):
        got = model.run_with_hooks(toks, fwd_hooks=[("blocks.1.hook_resid_pre", ours_fn(ndim))], remove_batch_dim=True)
        want = bridge.run_with_hooks(torch.tensor(toks, dtype=torch.long), remove_batch_dim=True,
                                     fwd_hooks=[("blocks.1.hook_resid_pre", theirs_fn)])
        assert_close(got, want.detach().numpy(), f"{family} batch {toks.shape[0]}")


def test_to_str_tokens_padding_side_and_add_hook_fn(pair):
    family, model, bridge = pair
    assert model.to_str_tokens(TOKS[1], padding_side="left") == bridge.to_str_tokens(torch.tensor(TOKS[1]),
                                                                                    padding_side="left")
    model.add_hook("blocks.0.hook_resid_pre", hook_fn=lambda x, hook: x * 0)
    try:
        zeroed = model(TOKS)
    finally:
        model.reset_hooks()
    bridge.add_hook("blocks.0.hook_resid_pre", hook_fn=lambda x, hook: x * 0)
    try:
        want = bridge(torch.tensor(TOKS, dtype=torch.long))
    finally:
        bridge.reset_hooks()
    assert_close(zeroed, want.detach().numpy(), family)
    with pytest.raises(ValueError, match="needs the hook function once"):
        model.add_hook("blocks.0.hook_resid_pre", lambda x, hook: x, hook_fn=lambda x, hook: x)


@pytest.mark.parametrize("penalty", [1.5, 0.6])
def test_generate_repetition_penalty_matches_the_bridge(pair, penalty):
    """HF-style repetition penalty, greedy (TransformerLens applies it there too), one prompt and a
    left-padded batch (the padding's pad id counts as seen, as in HF's and TL's input_ids)."""
    from conftest import padded

    family, model, bridge = pair
    for toks, mask in ((TOKS[:1], np.ones_like(TOKS[:1])), padded("left")):
        kw = dict(max_new_tokens=8, do_sample=False, stop_at_eos=False)
        ours = np.asarray(model.generate(toks, attention_mask=mask, repetition_penalty=penalty, return_type="tokens",
                                         **kw))
        theirs = bridge.generate(torch.tensor(toks, dtype=torch.long), attention_mask=torch.tensor(mask),
                                 repetition_penalty=penalty, return_type="tokens", verbose=False, use_past_kv_cache=False,
                                 **kw).numpy()  # its KV-cached loop diverges from its own uncached one and
        # from HF even without a penalty (TL 4.3 bridge, checked: greedy, gpt2), so the uncached loop is the reference
        np.testing.assert_array_equal(ours, theirs, f"{family} penalty {penalty} batch {toks.shape[0]}")
        if penalty > 1:  # (below 1 it favours repeats, which these random models' greedy runs already are)
            plain = np.asarray(model.generate(toks, attention_mask=mask, return_type="tokens", **kw))
            assert not np.array_equal(plain, ours), "the penalty must change these greedy continuations"
    with pytest.raises(ValueError, match="repetition_penalty must be a finite number > 0"):
        model.generate(TOKS[:1], max_new_tokens=2, do_sample=False, repetition_penalty=0.0)


def test_generate_output_logits_return_cache_and_input_tokens_match_the_bridge(pair):
    """TransformerLens 4's `output_logits` (sequences and one [batch vocab] logits array per step),
    `return_cache` (run_with_cache over the output, the prompt mask extended over the new columns)
    and `return_input_tokens`, on a left-padded batch, against the bridge's uncached loop."""
    from conftest import padded

    family, model, bridge = pair
    toks, mask = padded("left")
    kw = dict(max_new_tokens=5, do_sample=False, stop_at_eos=False)
    names = ["blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern"]
    t_toks, t_mask = torch.tensor(toks, dtype=torch.long), torch.tensor(mask)
    ours = model.generate(toks, attention_mask=mask, output_logits=True, **kw)
    theirs = bridge.generate(t_toks, attention_mask=t_mask, output_logits=True, verbose=False, use_past_kv_cache=False,
                             **kw)
    np.testing.assert_array_equal(np.asarray(ours.sequences), theirs.sequences.numpy())
    np.testing.assert_array_equal(np.asarray(ours["sequences"]), np.asarray(ours.sequences))
    assert len(ours.logits) == len(theirs.logits) == 5
    for i, (a, b) in enumerate(zip(ours.logits, theirs.logits)):
        real = mask.sum(1) > 0
        assert_close(np.asarray(a)[real], b.numpy()[real], f"{family} step {i} logits")
    one, one_t = TOKS[:1], torch.tensor(TOKS[:1], dtype=torch.long)  # TL: return_cache is single-prompt only
    out, cache, inputs = model.generate(one, return_cache=True, return_input_tokens=True, names_filter=names,
                                        return_type="tokens", **kw)
    t_out, t_cache, t_inputs = bridge.generate(one_t, return_cache=True, return_input_tokens=True, names_filter=names,
                                               return_type="tokens", verbose=False, use_past_kv_cache=False, **kw)
    np.testing.assert_array_equal(np.asarray(out), t_out.numpy())
    np.testing.assert_array_equal(np.asarray(inputs), t_inputs.numpy())
    assert sorted(cache.keys()) == sorted(names)
    for name in names:
        assert_close(cache[name], t_cache[name].detach().numpy(), f"{family} {name}")
    # a batch (beyond TL, which refuses it): the cache is run_with_cache over the output and its mask
    out, cache = model.generate(toks, attention_mask=mask, return_cache=True, names_filter=names,
                                return_type="tokens", **kw)
    full_mask = np.concatenate([mask, np.ones((mask.shape[0], 5), mask.dtype)], 1)
    _, ref = model.run_with_cache(np.asarray(out), names_filter=names, attention_mask=full_mask)
    for name in names:
        np.testing.assert_array_equal(np.asarray(cache[name]), np.asarray(ref[name]))
