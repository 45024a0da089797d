"""Gradients with respect to hook activations: equal torch autograd on the HF model and finite
differences; attribution patching equals its formula computed by hand from torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jaxlens
from conftest import assert_close, built
from jaxlens.model.forward import stack_layers
from jaxlens.edits.gradients import Perturb, attribution_patching, run_with_cache_and_grad

CLEAN = np.array([[0, 5, 9, 30, 2, 7, 100], [0, 17, 250, 8, 3, 3, 60]], np.int32)
CORRUPT = np.array([[0, 5, 9, 31, 2, 7, 100], [0, 17, 251, 8, 3, 4, 60]], np.int32)
A, B = 3, 4


def metric(logits):
    return (logits[:, -1, A] - logits[:, -1, B]).mean()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pair(request, hf_root):
    path, model = built(request.param, hf_root)
    return jaxlens.from_pretrained_no_processing(path), model


def _blocks(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def _o_proj(model, l):
    blk = _blocks(model)[l]
    return blk.attn.c_proj if hasattr(blk, "attn") else blk.self_attn.o_proj


def torch_grads(model, toks, retain_at_layer=1, z_layer=0):
    """Torch autograd: metric value, and (activation, grad) of the embedding output, resid_pre of a
    layer (the block's input) and hook_z of a layer (the output projection's input)."""
    emb_mod = model.get_input_embeddings()
    ids = torch.tensor(toks, dtype=torch.long)
    emb = emb_mod(ids).detach().requires_grad_(True)
    store = {}

    def pre_block(mod, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        x.retain_grad()
        store["resid"] = x

    def pre_o(mod, args):
        args[0].retain_grad()
        store["z"] = args[0]

    h1 = _blocks(model)[retain_at_layer].register_forward_pre_hook(pre_block, with_kwargs=True)
    h2 = _o_proj(model, z_layer).register_forward_pre_hook(pre_o)
    try:
        logits = model(inputs_embeds=emb).logits
        value = (logits[:, -1, A] - logits[:, -1, B]).mean()
        value.backward()
    finally:
        h1.remove()
        h2.remove()
    z, zg = store["z"].detach(), store["z"].grad
    shape = (*z.shape[:2], -1, model.config.n_embd // model.config.n_head if hasattr(model.config, "n_embd")
             else model.config.hidden_size // model.config.num_attention_heads)
    return value.item(), {"hook_embed": (emb.detach().numpy(), emb.grad.numpy()),
                          f"blocks.{retain_at_layer}.hook_resid_pre": (store["resid"].detach().numpy(),
                                                                       store["resid"].grad.numpy()),
                          f"blocks.{z_layer}.attn.hook_z": (z.reshape(shape).numpy(), zg.reshape(shape).numpy())}


# One set of names for every test, so each model's forward+backward program is compiled once.
NAMES = ["hook_embed", "blocks.1.hook_resid_pre", "blocks.0.attn.hook_z", "blocks.1.attn.hook_pattern"]


def test_grads_match_torch_autograd(pair):
    m, model = pair
    value, fwd, grads = run_with_cache_and_grad(m, CORRUPT, metric, NAMES)
    ref_value, ref = torch_grads(model, CORRUPT)
    assert_close(value, ref_value, "metric")
    assert set(grads.keys()) == set(fwd.keys()) == set(NAMES)
    for n in NAMES[:3]:  # torch exposes no pattern tensor to take a gradient at; finite differences cover it
        assert_close(fwd[n], ref[n][0], f"activation {n}")
        assert_close(grads[n], ref[n][1], f"grad {n}")


def test_grads_match_finite_differences(hf_root):
    """Directional derivatives along random directions: central differences in float32 (no f64 by
    default). eps=1e-2 balances truncation (~eps^2 times the third derivative) and rounding
    (~1e-7·|f|/eps), so the tolerance is 2e-3 relative to the directional derivative's scale. One
    compiled program evaluates every perturbation (Perturb's deltas are traced leaves)."""
    m = jaxlens.from_pretrained_no_processing(built("gpt2", hf_root)[0])
    names = NAMES
    _, fwd, grads = run_with_cache_and_grad(m, CORRUPT, metric, names)
    zeros = {n: np.zeros(fwd[n].shape, np.float32) for n in names}
    rng = np.random.default_rng(0)
    eps = 1e-2

    def f(n, d):
        edit = Perturb({**zeros, n: d})
        return float(metric(m.run_with_hooks(CORRUPT, fwd_hooks=[(names, edit)])))

    for n in names:
        v = rng.normal(size=fwd[n].shape).astype(np.float32)
        if n.endswith("hook_pattern"):
            v = v * np.tril(np.ones(v.shape[-2:], np.float32))  # only entries the model can attend to
        v /= np.linalg.norm(v)
        fd = (f(n, eps * v) - f(n, -eps * v)) / (2 * eps)
        g = np.asarray(grads[n])
        analytic = float(np.vdot(g, v))
        scale = max(abs(analytic), float(np.linalg.norm(g)) * 0.05)
        assert abs(fd - analytic) < 2e-3 * scale + 1e-5, (n, fd, analytic)


def test_scanned_grads_and_default_loss(hf_root):
    path, _ = built("llama", hf_root)
    m = jaxlens.from_pretrained_no_processing(path)
    s = jaxlens.HookedTransformer(m.cfg, stack_layers(m.params, m.cfg.n_layers), m.tokenizer)
    names = ["blocks.0.attn.hook_z", "blocks.1.hook_resid_pre"]  # one per layer: both switch branches
    va, _, ga = run_with_cache_and_grad(m, CORRUPT, None, names)
    vb, _, gb = run_with_cache_and_grad(s, CORRUPT, None, names)
    with torch.no_grad():
        ids = torch.tensor(CORRUPT, dtype=torch.long)
        hf_loss = built("llama", hf_root)[1](input_ids=ids, labels=ids).loss.item()
    assert_close(va, hf_loss, "default metric is the LM loss")
    assert_close(va, vb, "loss")
    for k in ga:
        assert_close(ga[k], gb[k], k, rtol=1e-5, atol=1e-6)


def test_attribution_patching_equals_formula(hf_root):
    path, model = built("gpt2", hf_root)
    m = jaxlens.from_pretrained_no_processing(path)
    names = NAMES
    _, clean = torch_grads(model, CLEAN)
    _, corrupt = torch_grads(model, CORRUPT)
    for direction, (base, other) in {"denoise": (corrupt, clean), "noise": (clean, corrupt)}.items():
        attr = attribution_patching(m, CLEAN, CORRUPT, metric, names, direction=direction)
        for n in names[:3]:
            act_base, grad_base = base[n]
            want = ((other[n][0] - act_base) * grad_base).sum(-1)
            assert attr[n].shape == want.shape == ((2, 7, m.cfg.n_heads) if "hook_z" in n else (2, 7))
            assert_close(attr[n], want, f"{direction} {n}")
        # patterns stay elementwise (the same compiled programs as inside attribution_patching)
        _, cb, gb = run_with_cache_and_grad(m, CORRUPT if direction == "denoise" else CLEAN, metric, names)
        _, co = m.run_with_cache(CLEAN if direction == "denoise" else CORRUPT, names_filter=names, return_type=None)
        p = names[3]
        assert attr[p].shape == (2, m.cfg.n_heads, 7, 7)
        assert_close(attr[p], (co[p] - cb[p]) * gb[p], f"{direction} pattern")


def test_gradient_errors(hf_root):
    path, _ = built("gpt2", hf_root)
    m = jaxlens.from_pretrained_no_processing(path)
    with pytest.raises(ValueError, match="must return a scalar"):
        run_with_cache_and_grad(m, CORRUPT, lambda lg: lg[:, -1, 0], "hook_embed")
    with pytest.raises(ValueError, match="direction must be"):
        attribution_patching(m, CLEAN, CORRUPT, metric, "hook_embed", direction="sideways")
    with pytest.raises(ValueError, match="same batch size and length"):
        attribution_patching(m, CLEAN[:, :5], CORRUPT, metric, "hook_embed")
    with pytest.raises(ValueError, match="names no hook"):
        run_with_cache_and_grad(m, CORRUPT, metric, "blocks.9.hook_resid_pre")
