"""The model API a TransformerLens user reaches for, against TransformerLens 4.3 (its bridge in
compatibility mode, unprocessed) on the same random weights: module views and TL-named
parameters, stop/start_at_layer, per-token loss, truncation, stateful hooks (add / reset /
context manager / permanent / per hook point), backward hooks and incl_bwd gradients, generate's
TL arguments (freq_penalty), devices, cfg fields, and the error paths."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxlens
from conftest import assert_close, boot_bridge, built
from jaxlens.model.forward import forward_jit, stack_layers
from jaxlens.hooked import HookedTransformer

TOKS = np.array([[0, 5, 9, 30, 2, 7, 100, 44], [0, 17, 250, 8, 4, 61, 62, 63]], np.int32)
FAMILIES = ("gpt2", "llama")  # learned positions + LayerNorm + tied unembed; rotary + RMS + GQA + gated MLP


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, hf_root):
    """(jaxlens model, TL bridge) on the same random HF checkpoint, both unprocessed."""

    path, _ = built(request.param, hf_root)
    bridge = boot_bridge(path, processed=False)
    return jaxlens.from_pretrained_no_processing(path), bridge


@pytest.fixture(scope="module")
def gpt2_pair(hf_root):
    path, _ = built("gpt2", hf_root)
    bridge = boot_bridge(path, processed=False)
    return jaxlens.from_pretrained_no_processing(path), bridge


def T(x):
    return torch.tensor(np.asarray(x))


def _n(x):
    return x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


# --- parameters and module views -----------------------------------------------------------------

def test_named_parameters_match_tl(pair):
    """Names, order, shapes and values equal TL 4's `tl_named_parameters` (grouped K/V expanded,
    absent biases zero); parameters()/state_dict() agree; a scanned model lists the same."""
    m, bridge = pair
    ours, ref = list(m.named_parameters()), list(bridge.tl_named_parameters())
    assert [n for n, _ in ours] == [n for n, _ in ref]
    for (name, a), (_, b) in zip(ours, ref):
        assert_close(a, _n(b), name)
    assert len(list(m.parameters())) == len(ours) and list(m.state_dict()) == [n for n, _ in ours]
    scanned = HookedTransformer(m.cfg, stack_layers(m.params, m.cfg.n_layers), m.tokenizer)
    for (name, a), (_, b) in zip(ours, scanned.named_parameters()):
        assert_close(a, b, f"scanned {name}")


def test_module_views(pair):
    m, bridge = pair
    cfg = m.cfg
    ref = dict(bridge.tl_named_parameters())
    assert len(m.blocks) == cfg.n_layers and [b._layer for b in m.blocks] == list(range(cfg.n_layers))
    last = m.blocks[-1]
    for n in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
        assert_close(getattr(last.attn, n), _n(ref[f"blocks.{cfg.n_layers - 1}.attn.{n}"]), n)
    assert last.attn._W_K.shape == (cfg.n_kv_heads, cfg.d_model, cfg.d_head)
    for n in ("W_in", "W_out", "b_in", "b_out"):
        assert_close(getattr(m.blocks[0].mlp, n), _n(ref[f"blocks.0.mlp.{n}"]), n)
    for view, name in ((m.embed.W_E, "embed.W_E"), (m.unembed.W_U, "unembed.W_U"), (m.blocks[0].ln1.w, "blocks.0.ln1.w"),
                       (m.ln_final.w, "ln_final.w")):
        assert_close(view, _n(ref[name]), name)
    assert_close(m.embed(TOKS), _n(bridge.embed(T(TOKS).long())), "embed(tokens)")

    names = ["blocks.0.hook_resid_pre", "blocks.0.ln1.hook_normalized", "blocks.1.hook_resid_pre",
             "blocks.1.hook_resid_post"]
    logits, cache = m.run_with_cache(TOKS, names)
    resid0 = m.embed(TOKS) + (m.pos_embed(TOKS) if cfg.has_pos_embed else 0)
    assert_close(resid0, cache["blocks.0.hook_resid_pre"], "embed + pos_embed")
    ln1 = cache["blocks.0.ln1.hook_normalized"] * m.blocks[0].ln1.w
    ln1 = ln1 + m.blocks[0].ln1.b if cfg.normalization_type == "LN" else ln1
    assert_close(m.blocks[0].ln1(cache["blocks.0.hook_resid_pre"]), ln1, "ln1(x)", atol=1e-5)
    assert_close(m.blocks[1](cache["blocks.1.hook_resid_pre"]), cache["blocks.1.hook_resid_post"], "block(resid)")
    assert_close(m.unembed(m.ln_final(cache["blocks.1.hook_resid_post"])), logits, "unembed(ln_final(x))", atol=1e-4)

    hp = m.blocks[0].attn.hook_z
    assert hp.name == "blocks.0.attn.hook_z" and hp.layer() == 0 and m.hook_dict["hook_embed"].name == "hook_embed"
    with pytest.raises(AttributeError, match="read-only"):
        m.blocks[0].attn.W_Q = 0
    with pytest.raises(IndexError, match="out of range: the model has 2 blocks"):
        m.blocks[2]
    with pytest.raises(AttributeError, match="hook_nonsense"):
        m.blocks[0].attn.hook_nonsense
    if cfg.gated_mlp:
        assert m.blocks[0].mlp.W_gate.shape == (cfg.d_model, cfg.d_mlp)
    else:
        with pytest.raises(AttributeError, match="not a gated MLP"):
            m.blocks[0].mlp.W_gate
    if not cfg.has_pos_embed:
        with pytest.raises(AttributeError, match="rotary"):
            m.pos_embed


# --- stop_at_layer / start_at_layer ----------------------------------------------------------------

def test_stop_and_start_at_layer_match_tl(pair):
    m, bridge = pair
    with torch.no_grad():
        for k in (0, 1, -1):
            assert_close(m(TOKS, stop_at_layer=k), _n(bridge(T(TOKS).long(), stop_at_layer=k)), f"stop_at_layer={k}")
        resid = m(TOKS, stop_at_layer=1)
        ref = _n(bridge(T(resid), start_at_layer=1))
    assert_close(m(resid, start_at_layer=1), ref, "start_at_layer=1", atol=1e-4)
    assert_close(m(resid, start_at_layer=-1), ref, "start_at_layer=-1", atol=1e-4)
    # the loss from a residual needs the tokens (TL's `tokens=`)
    assert_close(m(resid, start_at_layer=1, tokens=TOKS, return_type="loss"), m(TOKS, return_type="loss"), "loss")


@pytest.fixture(scope="module")
def llama(hf_root):
    path, _ = built("llama", hf_root)
    return jaxlens.from_pretrained_no_processing(path)


def test_layer_bounds(llama):
    """stop_at_layer=n_layers (legacy TL: the residual after the last block; the 4.3 bridge
    returns logits there), start == stop, the cache holds only what ran, scanned params give the
    same numbers, one program per bound, and a left-padded residual restarts correctly."""
    m, n = llama, llama.cfg.n_layers
    only = lambda name: "resid" in name or name.startswith(("hook_", "ln_final"))  # noqa: E731
    _, cache = m.run_with_cache(TOKS, only)
    resid = cache["blocks.1.hook_resid_pre"]
    assert_close(m(TOKS, stop_at_layer=n), cache[f"blocks.{n - 1}.hook_resid_post"], "stop_at_layer=n_layers")
    assert_close(m(resid, start_at_layer=1, stop_at_layer=1), resid, "start == stop")
    _, c_stop = m.run_with_cache(TOKS, only, stop_at_layer=1)
    assert sorted(c_stop) == ["blocks.0.hook_resid_mid", "blocks.0.hook_resid_post", "blocks.0.hook_resid_pre",
                              "hook_embed"]
    _, c_start = m.run_with_cache(resid, only, start_at_layer=1)
    assert sorted(c_start) == ["blocks.1.hook_resid_mid", "blocks.1.hook_resid_post", "blocks.1.hook_resid_pre",
                               "ln_final.hook_normalized", "ln_final.hook_scale"]
    s = HookedTransformer(m.cfg, stack_layers(m.params, n), m.tokenizer)
    assert_close(s(TOKS, stop_at_layer=1), resid, "scanned stop")
    _, s_start = s.run_with_cache(resid, only, start_at_layer=1)  # stacked activations named by their real layer
    assert sorted(s_start) == sorted(c_start)
    for k in c_start:
        assert_close(s_start[k], c_start[k], f"scanned start {k}")
    m(TOKS, stop_at_layer=1)  # compiles (or reuses) the stop_at_layer=1 program
    before = forward_jit._cache_size()
    m(TOKS + 1, stop_at_layer=1)
    m(TOKS, stop_at_layer=-1)  # the same bound, counted from the end
    assert forward_jit._cache_size() == before

    def dots(start=None, stop=None):  # matmuls in the traced program: only the layers that run
        x = TOKS if start is None else resid
        jaxpr = jax.make_jaxpr(lambda p, t: jaxlens.forward(p, m.cfg, t, start_at_layer=start, stop_at_layer=stop)[0])
        return str(jaxpr(m.params, x)).count("dot_general")

    assert dots(stop=1) == dots(start=1, stop=2) and 2 * dots(stop=1) < dots()
    toks, mask = TOKS.copy(), np.ones_like(TOKS)  # TOKS's shape: the programs above serve it
    toks[0, :3], mask[0, :3] = 0, 0  # left padding: positions (rotary) come from the mask
    out = m(m(toks, mask, stop_at_layer=1), mask, start_at_layer=1)
    assert_close(out, m(toks, mask), "left-padded start_at_layer", atol=1e-4)


# --- loss -------------------------------------------------------------------------------------

def test_per_token_loss_matches_tl(pair):
    from transformer_lens.utilities.lm_utils import lm_cross_entropy_loss

    m, bridge = pair
    with torch.no_grad():
        ref = bridge(T(TOKS).long(), return_type="loss", loss_per_token=True).numpy()
        ref_mean = bridge(T(TOKS).long(), return_type="loss").item()
    per_tok = m(TOKS, return_type="loss", loss_per_token=True)
    assert per_tok.shape == (2, TOKS.shape[1] - 1)
    assert_close(per_tok, ref, "loss_per_token", atol=1e-4)
    np.testing.assert_allclose(float(m(TOKS, return_type="loss")), ref_mean, rtol=1e-5)
    logits, loss = m(TOKS, return_type="both", loss_per_token=True)
    assert_close(loss, ref, atol=1e-4)
    mask = np.ones_like(TOKS)
    mask[1, 5:] = 0
    ref_masked = lm_cross_entropy_loss(T(logits), T(TOKS).long(), T(mask), per_token=True).numpy()
    assert_close(m.loss_fn(logits, TOKS, mask, per_token=True), ref_masked, "masked per-token loss", atol=1e-4)
    ref_masked_mean = lm_cross_entropy_loss(T(logits), T(TOKS).long(), T(mask)).item()
    np.testing.assert_allclose(float(m.loss_fn(logits, TOKS, mask)), ref_masked_mean, rtol=1e-5)


# --- tokens --------------------------------------------------------------------------------------

def test_to_tokens_truncates_like_tl(gpt2_pair):
    m, bridge = gpt2_pair
    long, short = "The quick brown fox jumps over the lazy dog. " * 12, "Alice and Bob"
    with pytest.warns(UserWarning, match=r"token\(s\) past the model's context n_ctx=64 were dropped"):
        toks = m.to_tokens(long)
    assert toks.shape == (1, 64)
    np.testing.assert_array_equal(toks, bridge.to_tokens(long).numpy())
    with pytest.warns(UserWarning, match="dropped from 1 sequence"):
        both = m.to_tokens([long, short], padding_side="left")
    np.testing.assert_array_equal(both, bridge.to_tokens([long, short], padding_side="left").numpy())
    with pytest.warns(UserWarning):
        right = m.to_tokens([short, long])
    np.testing.assert_array_equal(right, bridge.to_tokens([short, long], padding_side="right").numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing dropped: no warning
        m.to_tokens(short)
    with pytest.raises(ValueError, match="exceeds the model's context n_ctx=64"):
        m.to_tokens(long, truncate=False)
    with pytest.warns(UserWarning):  # text input to a run truncates too, as TL's forward does
        assert_close(m(long), m(toks), "model(long text)")


def test_text_batches_pad_like_tl(pair):
    """A list of strings: padded on the tokenizer's side unless padding_side says otherwise; right
    padding is not masked, so pad positions and the loss (pad targets included) are TL's numbers;
    left padding is masked (the real tokens and the loss equal TL's)."""
    m, bridge = pair
    texts = ["Alice went", "Bob gave a book to Alice and"]
    with torch.no_grad():
        for kw in (dict(), dict(padding_side="right")):
            np.testing.assert_array_equal(m.to_tokens(texts, **kw), bridge.to_tokens(texts, **kw).numpy())
            assert_close(m(texts, **kw), bridge(texts, **kw).numpy(), f"right-padded logits {kw}", atol=1e-4)
            np.testing.assert_allclose(float(m(texts, return_type="loss", **kw)),
                                       bridge(texts, return_type="loss", **kw).item(), rtol=1e-5)
            assert_close(m(texts, return_type="loss", loss_per_token=True, **kw),
                         bridge(texts, return_type="loss", loss_per_token=True, **kw).numpy(), "per-token", atol=1e-4)
        toks, mask = m.to_tokens(texts, padding_side="left", return_mask=True)
        real = np.asarray(mask, bool)
        assert not real.all()
        ours, ref = np.asarray(m(texts, padding_side="left")), bridge(texts, padding_side="left").numpy()
        assert_close(ours[real], ref[real], "left-padded logits at the real tokens", atol=1e-4)
        np.testing.assert_allclose(float(m(texts, return_type="loss", padding_side="left")),
                                   bridge(texts, return_type="loss", padding_side="left").item(), rtol=1e-5)
        # the tokenizer's own padding side is the default, on both
        sides = m.tokenizer.padding_side, bridge.tokenizer.padding_side
        try:
            m.tokenizer.padding_side = bridge.tokenizer.padding_side = "left"
            np.testing.assert_array_equal(m.to_tokens(texts), toks)
            np.testing.assert_array_equal(bridge.to_tokens(texts).numpy(), toks)
            np.testing.assert_allclose(float(m(texts, return_type="loss")),
                                       bridge(texts, return_type="loss").item(), rtol=1e-5)
        finally:
            m.tokenizer.padding_side, bridge.tokenizer.padding_side = sides


def test_input_to_embed_w_e_pos_eval(pair):
    """input_to_embed gives TL's residual and tokens, and resumes the run with start_at_layer=0
    (left padding too: TL 4.3's bridge builds its mask there from the tokenizer's side, not the
    argument, so only our own run is the reference); W_E_pos; eval()/train() return the model."""
    m, bridge = pair
    texts = ["Alice went", "Bob gave a book to Alice and"]
    for inp in (texts[1], texts):
        with torch.no_grad():
            ref_resid, ref_toks, _, _ = bridge.input_to_embed(inp)
        resid, toks, pos, mask = m.input_to_embed(inp)
        assert pos is None
        np.testing.assert_array_equal(toks, ref_toks.numpy())
        assert_close(resid, ref_resid.numpy(), "input_to_embed residual")
    for side in ("left", "right"):
        resid, toks, _, mask = m.input_to_embed(texts, padding_side=side)
        assert_close(m(resid, start_at_layer=0, attention_mask=mask, tokens=toks), m(texts, padding_side=side),
                     f"resumed run, {side} padding", atol=1e-6)
        np.testing.assert_allclose(float(m(resid, return_type="loss", start_at_layer=0, attention_mask=mask, tokens=toks)),
                                   float(m(texts, return_type="loss", padding_side=side)), rtol=1e-6)
    if m.cfg.has_pos_embed:
        assert_close(m.W_E_pos, bridge.W_E_pos.detach().numpy(), "W_E_pos")
    else:
        with pytest.raises(AttributeError, match="rotary"):
            m.W_E_pos
    assert m.eval() is m and m.train() is m and m.train(False) is m and m.device == "cpu"


def test_single_str_token_and_one_row_generate_text(pair):
    m, bridge = pair
    for t in (5, np.int64(7)):
        assert m.to_single_str_token(t) == bridge.to_single_str_token(int(t))
    with pytest.raises(TypeError, match="one int token id"):
        m.to_single_str_token("a")
    kw = dict(max_new_tokens=3, do_sample=False, verbose=False, return_type="str")
    with torch.no_grad():  # TL 4.3's KV-cached generate disagrees with its own uncached loop: see below
        ref = bridge.generate(T(TOKS[:1]).long(), use_past_kv_cache=False, **kw)
        ref_two = bridge.generate(T(TOKS).long(), use_past_kv_cache=False, **kw)
    assert isinstance(ref, str) and m.generate(TOKS[:1], **kw) == ref  # one row: a string
    assert m.generate(TOKS, **kw) == ref_two and isinstance(ref_two, list)


def test_opt_in_hook_switches_match_tl(pair):
    """set_use_attn_result / set_use_hook_mlp_in on both models: the same opt-in hooks in a default
    run, equal values, and an edit of hook_mlp_in (the MLP's input only) gives TL's logits."""
    m, bridge = pair
    opt_in = ("attn.hook_result", "hook_mlp_in")
    try:
        for model in (m, bridge):
            model.set_use_attn_result(True)
            model.set_use_hook_mlp_in(True)
        with torch.no_grad():
            _, ref = bridge.run_with_cache(T(TOKS).long())
            ref_edit = bridge.run_with_hooks(T(TOKS).long(), fwd_hooks=[("blocks.1.hook_mlp_in", half)]).numpy()
        _, cache = m.run_with_cache(TOKS)
        names = sorted(k for k in ref.keys() if k.endswith(opt_in))
        assert names == sorted(k for k in cache.keys() if k.endswith(opt_in)) and len(names) == 2 * m.cfg.n_layers
        for k in names:
            assert_close(cache[k], ref[k].numpy(), k)
        edited = m.run_with_hooks(TOKS, fwd_hooks=[("blocks.1.hook_mlp_in", half)])
        assert_close(edited, ref_edit, "logits with hook_mlp_in halved", atol=1e-4)
        assert np.abs(np.asarray(edited) - np.asarray(m(TOKS))).max() > 1e-5  # the edit bites
    finally:
        for model in (m, bridge):
            model.set_use_attn_result(False)
            model.set_use_hook_mlp_in(False)


def _flip_head_1(x, hook):  # from position 2 on, head 1's copy of the input only
    return x.at[:, 2:, 1].multiply(-0.7) if isinstance(x, jax.Array) else _torch_flip(x)


def _torch_flip(x):
    x = x.clone()
    x[:, 2:, 1] *= -0.7
    return x


@pytest.mark.parametrize("switch, forks", [("set_use_split_qkv_input", ("hook_q_input", "hook_k_input", "hook_v_input")),
                                           ("set_use_attn_in", ("hook_attn_in",))])
def test_forked_attention_inputs_match_tl(pair, switch, forks):
    """TL's per-head copies of the attention input: the same hooks and values in a default run
    (kv heads for keys/values under GQA), and an edit of one head's copy on one path gives TL's
    logits; also scanned. Unedited, the logits are the plain run's."""
    m, bridge = pair
    try:
        for model in (m, bridge):
            getattr(model, switch)(True)
        with torch.no_grad():
            ref_logits, ref = bridge.run_with_cache(T(TOKS).long())
        logits, cache = m.run_with_cache(TOKS)
        assert_close(logits, ref_logits.numpy(), "logits", atol=1e-4)
        names = sorted(k for k in ref.keys() if k.startswith("blocks.") and k.split(".")[2] in forks)
        assert names == sorted(k for k in cache.keys() if k.endswith(forks)) and len(names) == len(forks) * m.cfg.n_layers
        for k in names:
            assert_close(cache[k], ref[k].numpy(), k)
        scanned = HookedTransformer(m.cfg, stack_layers(m.params, m.cfg.n_layers), m.tokenizer)
        for name in (f"blocks.1.{f}" for f in forks):
            with torch.no_grad():
                want = bridge.run_with_hooks(T(TOKS).long(), fwd_hooks=[(name, _flip_head_1)]).numpy()
            got = m.run_with_hooks(TOKS, fwd_hooks=[(name, _flip_head_1)])
            assert_close(got, want, f"logits with {name} head 1 flipped", atol=1e-4)
            assert np.abs(want - ref_logits.numpy()).max() > 1e-3  # the edit bites
            assert_close(scanned.run_with_hooks(TOKS, fwd_hooks=[(name, _flip_head_1)]), got, f"scanned {name}",
                         atol=1e-5)
    finally:
        for model in (m, bridge):
            getattr(model, switch)(False)


# --- stateful hooks -----------------------------------------------------------------------------

def half(x, hook):
    return x * 0.5


def plus_one(x, hook):
    return x + 1.0


def twice(x, hook):
    return x * 2.0


def _both(m, bridge, toks=TOKS):
    with torch.no_grad():
        return np.asarray(m(toks)), bridge(T(toks).long()).numpy()


def test_stateful_hooks_match_tl(gpt2_pair):
    """The same sequence of add_hook / hooks() / reset_hooks on both models gives the same logits
    after every step; stored hooks run before a call's own, as in TransformerLens."""
    m, bridge = gpt2_pair
    clean, _ = _both(m, bridge)
    try:
        for model in (m, bridge):
            model.add_hook("blocks.0.hook_resid_post", half, is_permanent=True)
            model.add_hook(lambda name: name.endswith("hook_mlp_out"), plus_one)
        a, b = _both(m, bridge)
        assert_close(a, b, "permanent + filter hooks", atol=1e-4)
        assert np.abs(a - clean).max() > 1e-3
        for model in (m, bridge):
            model.reset_hooks()  # the permanent hook stays
        a, b = _both(m, bridge)
        assert_close(a, b, "after reset_hooks", atol=1e-4)
        for model in (m, bridge):
            with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", plus_one)]):
                inside = model(T(TOKS).long()) if model is bridge else model(TOKS)
            if model is m:
                ours_inside = np.asarray(inside)
            else:
                ref_inside = inside.detach().numpy()
        assert_close(ours_inside, ref_inside, "inside hooks()", atol=1e-4)
        a, b = _both(m, bridge)
        assert_close(a, b, "after hooks() exits", atol=1e-4)
        # order: stored (+1) then the call's (x2) on the same point
        m.add_hook("blocks.1.hook_attn_out", plus_one)
        bridge.add_hook("blocks.1.hook_attn_out", plus_one)
        ours = m.run_with_hooks(TOKS, fwd_hooks=[("blocks.1.hook_attn_out", twice)])
        with torch.no_grad():
            ref = bridge.run_with_hooks(T(TOKS).long(), fwd_hooks=[("blocks.1.hook_attn_out", twice)]).numpy()
        assert_close(ours, ref, "stored then call hooks", atol=1e-4)
        # per hook point, through the module tree; remove_hooks clears only that point
        m.blocks[0].attn.hook_z.add_hook(half)
        bridge.blocks[0].attn.hook_z.add_hook(half)
        a, b = _both(m, bridge)
        assert_close(a, b, "hook_z.add_hook", atol=1e-4)
        assert m.blocks[0].attn.hook_z.has_hooks() and len(m.blocks[0].attn.hook_z.fwd_hooks) == 1
        before = m._stored_hooks[:-1]
        m.blocks[0].attn.hook_z.remove_hooks()
        bridge.blocks[0].attn.hook_z.remove_hooks()
        assert m._stored_hooks == before and not bridge.blocks[0].attn.hook_z.fwd_hooks
        # run_with_hooks(reset_hooks_end=False) leaves its hooks on the model (the same hook set
        # as after reset_hooks above, so no new program)
        for model in (m, bridge):
            model.reset_hooks(including_permanent=True)
            model.run_with_hooks(TOKS if model is m else T(TOKS).long(),
                                 fwd_hooks=[("blocks.0.hook_resid_post", half)], reset_hooks_end=False)
        assert len(m._stored_hooks) == 1 and len(bridge.hook_dict["blocks.0.hook_resid_post"].fwd_hooks) == 1
        a, b = _both(m, bridge)
        assert_close(a, b, "reset_hooks_end=False", atol=1e-4)
        for model in (m, bridge):
            model.reset_hooks(including_permanent=True)
        a, _ = _both(m, bridge)
        assert_close(a, clean, "reset_hooks(including_permanent=True)")
    finally:
        m.reset_hooks(including_permanent=True)
        bridge.reset_hooks(including_permanent=True)


def test_stored_hooks_apply_to_every_run(gpt2_pair):
    m, _ = gpt2_pair
    ref = m.run_with_hooks(TOKS, fwd_hooks=[("blocks.0.hook_mlp_out", half)], return_type="loss")
    with m.hooks(fwd_hooks=[("blocks.0.hook_mlp_out", half)]):
        assert_close(m(TOKS, return_type="loss"), ref)
        loss, cache = m.run_with_cache(TOKS, ["blocks.0.hook_mlp_out"], return_type="loss")
        assert_close(loss, ref)
        _, plain = m.run_with_cache(TOKS, ["blocks.0.hook_mlp_out"], fwd_hooks=[("blocks.0.hook_mlp_out", twice)])
        gen = m.generate(TOKS[:1], 3, do_sample=False, stop_at_eos=False, return_type="tokens")
    assert m._stored_hooks == ()
    assert_close(plain["blocks.0.hook_mlp_out"], cache["blocks.0.hook_mlp_out"] * 2, "stored, then the call's")
    ref_gen = m.generate(TOKS[:1], 3, do_sample=False, stop_at_eos=False, return_type="tokens",
                         fwd_hooks=[("blocks.0.hook_mlp_out", half)])
    np.testing.assert_array_equal(gen, ref_gen)
    # prepend=True runs before the hooks already stored on the point
    m.add_hook("blocks.0.hook_mlp_out", half)
    m.add_hook("blocks.0.hook_mlp_out", twice, prepend=True)
    try:
        stored = m(TOKS, return_type="loss")
    finally:
        m.reset_hooks()
    ref = m.run_with_hooks(TOKS, fwd_hooks=[("blocks.0.hook_mlp_out", twice), ("blocks.0.hook_mlp_out", half)],
                           return_type="loss")
    assert_close(stored, ref, "prepend")


# --- backward hooks and gradients -----------------------------------------------------------------

def test_incl_bwd_grads_match_tl(pair):
    m, bridge = pair
    loss, cache = m.run_with_cache(TOKS, return_type="loss", incl_bwd=True)
    ref_loss, ref = bridge.run_with_cache(T(TOKS).long(), return_type="loss", incl_bwd=True)
    np.testing.assert_allclose(float(loss), ref_loss.item(), rtol=1e-5)
    grads = [k for k in cache.keys() if k.endswith("_grad")]
    assert len(grads) == len(m.hook_names(include_result=False))  # every hook but the opt-in ones
    compared = 0
    for k in grads:
        want = _n(ref[k]) if k in ref else None
        if k.endswith("hook_resid_mid_grad"):
            # TL 4.3 aliases hook_resid_mid to ln2.hook_in, whose gradient is only the LN2 branch's;
            # jaxlens's (and legacy HookedTransformer's) is the residual stream's: plus the skip path
            layer = k.split(".")[1]
            want = want + _n(ref[f"blocks.{layer}.hook_resid_post_grad"])
        if want is not None:
            assert_close(cache[k], want, k, rtol=1e-4, atol=1e-6)
            compared += 1
    assert compared == len(grads), "TL's cache holds every one of our names"
    if m.cfg.gated_mlp:  # scanned params (one family is enough)
        scanned = HookedTransformer(m.cfg, stack_layers(m.params, m.cfg.n_layers), m.tokenizer)
        _, s_cache = scanned.run_with_cache(TOKS, ["blocks.0.hook_resid_pre"], return_type="loss", incl_bwd=True)
        assert_close(s_cache["blocks.0.hook_resid_pre_grad"], cache["blocks.0.hook_resid_pre_grad"], "scanned grads")


def _recorder(store, key, scale=None):
    """A jaxlens backward hook that reports the gradient it sees (jax.debug.callback) and
    optionally returns it scaled."""

    def fn(g, hook):
        jax.debug.callback(lambda a: store.setdefault(key, []).append(np.asarray(a)), g)
        return None if scale is None else g * scale

    return fn


def _torch_recorder(store, key, scale=None):
    def fn(g, hook):
        store.setdefault(key, []).append(g.detach().clone().numpy())
        return None if scale is None else g * scale

    return fn


def test_backward_hooks_match_tl(gpt2_pair):
    """bwd hooks see the gradient of the loss; every hook on a point sees the same incoming
    gradient and the last returned replacement flows further back (PyTorch's rule); the
    point's own cached gradient is the unreplaced one."""
    m, bridge = gpt2_pair
    point = "blocks.1.hook_resid_pre"
    names = ["blocks.0.hook_resid_pre", point]
    seen, ref_seen = {}, {}
    with m.hooks(bwd_hooks=[(point, _recorder(seen, "a", 2.0)), (point, _recorder(seen, "b", 3.0))]):
        _, cache = m.run_with_cache(TOKS, names, return_type="loss", incl_bwd=True)
    with bridge.hooks(bwd_hooks=[(point, _torch_recorder(ref_seen, "a", 2.0)),
                                 (point, _torch_recorder(ref_seen, "b", 3.0))]):
        _, ref = bridge.run_with_cache(T(TOKS).long(), return_type="loss", incl_bwd=True)
    for k in ("a", "b"):
        assert len(seen[k]) == 1
        assert_close(seen[k][0], ref_seen[k][0], f"grad seen by hook {k}", rtol=1e-4, atol=1e-7)
    for n in names:
        assert_close(cache[n + "_grad"], _n(ref[n + "_grad"]), n, rtol=1e-4, atol=1e-7)
    # run_with_hooks(bwd_hooks=...): TL needs reset_hooks_end=False and .backward(); jaxlens runs it
    seen, ref_seen = {}, {}
    loss = m.run_with_hooks(TOKS, bwd_hooks=[("hook_embed", _recorder(seen, "e"))], return_type="loss")
    try:
        ref_loss = bridge.run_with_hooks(T(TOKS).long(), bwd_hooks=[("hook_embed", _torch_recorder(ref_seen, "e"))],
                                         return_type="loss", reset_hooks_end=False)
        ref_loss.backward()
    finally:  # the bridge is shared by the module: leave it without hooks or parameter grads
        bridge.reset_hooks()
        bridge.zero_grad(set_to_none=True)
    np.testing.assert_allclose(float(loss), ref_loss.item(), rtol=1e-5)
    assert_close(seen["e"][0], ref_seen["e"][0], "hook_embed grad", rtol=1e-4, atol=1e-7)
    assert m._stored_hooks == ()
    # a stored bwd hook fires in runs that return the loss, and is ignored by ones that do not
    seen = {}
    m.add_hook(point, _recorder(seen, "s"), dir="bwd")
    try:
        m(TOKS)
        assert "s" not in seen
        m(TOKS, return_type="loss")
        assert_close(seen["s"][0], cache[point + "_grad"], "stored bwd hook", rtol=1e-5, atol=1e-7)
    finally:
        m.reset_hooks()


# --- generate ---------------------------------------------------------------------------------------

def test_generate_tl_arguments(llama, hf_root):
    """freq_penalty as TL defines it (logits / T - penalty * count, greedy unaffected), against
    TL's generate; without key= sampling uses key(0) and says so once."""
    import jaxlens.generation.generate as G

    m = llama
    bridge = boot_bridge(built("llama", hf_root)[0], processed=False)
    prompt = TOKS[:1]
    kw = dict(max_new_tokens=6, stop_at_eos=False, verbose=False, return_type="tokens")
    # TL 4.3's KV-cached generate disagrees with its own uncached loop (and with HF) on these
    # models; its uncached loop is the reference
    ref_kw = dict(kw, use_past_kv_cache=False)
    with torch.no_grad():
        ref_greedy = bridge.generate(T(prompt).long(), do_sample=False, freq_penalty=2.0, **ref_kw).numpy()
        ref_pen = bridge.generate(T(prompt).long(), do_sample=True, top_k=1, freq_penalty=2.0, **ref_kw).numpy()
    greedy = m.generate(prompt, do_sample=False, freq_penalty=2.0, **kw)
    np.testing.assert_array_equal(greedy, ref_greedy)
    G._WARNED_KEY = False
    with pytest.warns(UserWarning, match=r"uses jax.random.key\(0\)"):
        pen = m.generate(prompt, do_sample=True, top_k=1, freq_penalty=2.0, **kw)
    np.testing.assert_array_equal(pen, ref_pen)
    assert (np.asarray(pen) != np.asarray(greedy)).any(), "the penalty changes this model's greedy continuation"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        again = m.generate(prompt, do_sample=True, top_k=1, freq_penalty=2.0, use_past_kv_cache=False, **kw)
    np.testing.assert_array_equal(again, pen)
    with pytest.raises(ValueError, match="freq_penalty must be a finite number >= 0"):
        m.generate(prompt, do_sample=True, freq_penalty=-1.0, key=jax.random.key(1), **kw)
    with pytest.raises(ValueError, match="padding_side must be None, 'left' or 'right'"):
        m.generate(prompt, padding_side="middle", do_sample=False, **kw)


# --- devices and cfg ----------------------------------------------------------------------------------

def test_devices(gpt2_pair):
    m0, _ = gpt2_pair
    m = HookedTransformer(m0.cfg, m0.params, m0.tokenizer)
    ref = np.asarray(m(TOKS))
    cpus = jax.devices("cpu")
    other = cpus[1] if len(cpus) > 1 else cpus[0]
    assert m.to(other) is m and m.params["W_E"].devices() == {other} and m.cfg.device == "cpu"
    assert_close(m(TOKS), ref, "moved model")
    m.to(f"cpu:{other.id}" if other.platform == "cpu" else "cpu")
    assert m.cpu() is m and m.params["W_E"].devices() == {cpus[0]}
    placed = HookedTransformer(m0.cfg, m0.params, m0.tokenizer, device=other)
    assert placed.params["blocks_0"]["attn"]["W_Q"].devices() == {other}
    for bad, match in (("npu", "not a device name"), ("cpu:x", "not a device name"), ("cpu:99", "only"), (3.0, "jax.Device")):
        with pytest.raises(ValueError, match=match):
            m.to(bad)
    if not any(d.platform == "gpu" for d in jax.devices()):
        with pytest.raises(ValueError, match="no gpu devices"):
            m.cuda()
    else:
        assert m.cuda().cfg.device == "gpu"
        assert_close(m(TOKS), ref, "on gpu", atol=1e-4)


def test_cfg_fields(gpt2_pair, hf_root):
    from jaxlens.config import ModelConfig
    from transformer_lens.model_bridge.sources._bridge_builder import detect_tokenizer_bos_eos
    from transformers import AutoTokenizer

    m, _ = gpt2_pair
    cfg = m.cfg
    assert cfg.original_architecture == "GPT2LMHeadModel" and cfg.dtype == jnp.float32 and cfg.device == "cpu"
    # TL's HookedTransformerConfig: n_layers * (4 d_model d_head n_heads + (2 + gated) d_model d_mlp)
    assert cfg.n_params == 2 * (4 * 32 * 8 * 4 + 2 * 32 * 128)
    path, _ = built("llama", hf_root)
    ll = jaxlens.from_pretrained_no_processing(path, dtype="bfloat16")
    assert ll.cfg.original_architecture == "LlamaForCausalLM" and ll.cfg.dtype == jnp.bfloat16
    assert ll.cfg.n_params == 2 * (4 * 32 * 8 * 4 + 3 * 32 * 48)
    assert cfg.tokenizer_prepends_bos == detect_tokenizer_bos_eos(AutoTokenizer.from_pretrained(str(built("gpt2", hf_root)[0])))[0]
    from jaxlens.assets import model_dir
    from jaxlens.conversion import hf_config

    assert hf_config(model_dir()).original_architecture == "GPT2LMHeadModel"
    d = cfg.to_dict()
    assert not {"device", "dtype", "tokenizer_prepends_bos"} & set(d) and d["original_architecture"] == "GPT2LMHeadModel"
    assert ModelConfig.from_dict(d) == cfg and hash(ModelConfig.from_dict(d)) == hash(cfg)


# --- errors -----------------------------------------------------------------------------------------

def test_errors(gpt2_pair):
    m, _ = gpt2_pair
    resid = m(TOKS, stop_at_layer=1)
    cases = [
        (lambda: m(TOKS, stop_at_layer=3), r"stop_at_layer=3 is out of range for a model of 2 layers"),
        (lambda: m(TOKS, stop_at_layer=-3), r"stop_at_layer=-3 is out of range"),
        (lambda: m(resid, start_at_layer=2), r"start_at_layer=2 is out of range"),
        (lambda: m(resid, start_at_layer=1, stop_at_layer=0), "start must be <= stop"),
        (lambda: m(TOKS, stop_at_layer=1.5), "stop_at_layer must be an int index"),
        (lambda: m(TOKS, start_at_layer=1), "must be a float residual stream"),
        (lambda: m("some text", start_at_layer=1), "not text"),
        (lambda: m(resid, start_at_layer=1, return_type="loss"), "pass tokens="),
        (lambda: m(resid, start_at_layer=1, tokens=TOKS[:1]), "must match the residual"),
        (lambda: m(TOKS, tokens=TOKS), "tokens= is for start_at_layer"),
        (lambda: m.run_with_cache(TOKS, incl_bwd=True), "needs return_type='loss'"),
        (lambda: m.run_with_cache(TOKS, incl_bwd=True, return_type="loss", stop_at_layer=1), "return_type='loss'"),
        (lambda: m.run_with_hooks(TOKS, bwd_hooks=[("hook_embed", half)]), "pass return_type='loss'"),
        (lambda: m.run_with_hooks(TOKS, bwd_hooks=[("hook_embed", half)], return_type="loss", loss_per_token=True),
         "scalar loss"),
        (lambda: m.add_hook("hook_embed", half, dir="up"), r"dir must be one of \('fwd', 'bwd'\)"),
        (lambda: m.add_hook("hook_embedd", half), "did you mean 'hook_embed'"),
        (lambda: m.reset_hooks(direction="sideways"), "dir must be one of"),
        (lambda: m.blocks[0].attn.hook_z.remove_hooks(dir="up"), "dir must be one of"),
        (lambda: m(TOKS, kv_cache=m.init_kv_cache(2, 16), stop_at_layer=1), "kv_cache runs return logits"),
        (lambda: m.run_with_hooks(TOKS, bwd_hooks=[("hook_embed", lambda g, hook: g[:, :1])], return_type="loss"),
         "must return a gradient of the activation's shape"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()
    assert m._stored_hooks == () and m.context_level == 0
