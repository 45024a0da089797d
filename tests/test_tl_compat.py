"""TransformerLens-style code, run on TransformerLens 4.3 and on jaxlens with the same weights.

Each snippet is written once, TransformerLens's way (hooks that read loop variables as globals,
a fresh `functools.partial` per call, `float()` of a scalar, stateful hooks), and run against a
`TransformerBridge` of the shipped model in compatibility mode and against
`jaxlens.HookedTransformer.from_pretrained` of the same folder (both: TransformerLens's default
weight processing). The only difference between the two runs is how an activation is edited
(torch in place vs `.at[].set`), passed in as `set_`.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jaxlens  # noqa: E402
from conftest import boot_bridge  # noqa: E402
from jaxlens.assets import model_dir  # noqa: E402

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
HEAD = 0  # read as a global by the hooks below, as TransformerLens's demos do


def torch_set(x, index, value):
    x[index] = value
    return x


def jax_set(x, index, value):
    return x.at[index].set(value)


@pytest.fixture(scope="module")
def models():
    bridge = boot_bridge(model_dir(), processed=True)
    return {"tl": (bridge, torch_set), "jaxlens": (jaxlens.HookedTransformer.from_pretrained(model_dir()), jax_set)}


def both(models, snippet):
    with torch.inference_mode():
        tl = np.asarray(snippet(*models["tl"]), np.float64)
    ours = np.asarray(snippet(*models["jaxlens"]), np.float64)
    return tl, ours


def patching_loop(model, set_):
    """Main_Demo / Exploratory: patch the clean residual stream in, one position per call."""
    clean, corrupt = model.to_tokens(CLEAN), model.to_tokens(CORRUPT)
    mary, john = model.to_single_token(" Mary"), model.to_single_token(" John")
    _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("resid_pre"))

    def patch(resid, hook, pos, name):
        return set_(resid, (slice(None), pos), cache[name][:, pos])

    out = np.zeros((model.cfg.n_layers, clean.shape[1]))
    for layer in range(model.cfg.n_layers):
        name = f"blocks.{layer}.hook_resid_pre"
        for pos in range(clean.shape[1]):
            logits = model.run_with_hooks(corrupt, fwd_hooks=[(name, functools.partial(patch, pos=pos, name=name))])
            out[layer, pos] = float(logits[0, -1, mary] - logits[0, -1, john])
    return out


def ablate_global_head(z, hook):
    return SET(z, (slice(None), slice(None), HEAD), 0.0)


def head_ablation_loop(model, set_):
    """Main_Demo: a hook that reads the loop variable `HEAD` as a global."""
    global HEAD, SET
    SET = set_
    out = []
    for layer in range(model.cfg.n_layers):
        for HEAD in range(model.cfg.n_heads):
            out.append(float(model.run_with_hooks(CLEAN, return_type="loss",
                                                  fwd_hooks=[(f"blocks.{layer}.attn.hook_z", ablate_global_head)])))
    HEAD = 0
    return out


def stateful_hooks(model, set_):
    """`with model.hooks(...)`, `add_hook` / `reset_hooks`, per-token loss."""
    def zero_head_1(z, hook):
        return set_(z, (slice(None), slice(None), 1), 0.0)

    with model.hooks(fwd_hooks=[("blocks.1.attn.hook_z", zero_head_1)]):
        inside = model(CLEAN, return_type="loss", loss_per_token=True)
    after = model(CLEAN, return_type="loss", loss_per_token=True)
    model.add_hook("blocks.0.attn.hook_z", zero_head_1)
    try:
        added = model(CLEAN, return_type="loss", loss_per_token=True)
    finally:  # the models are shared by the module
        model.reset_hooks()
    return np.stack([np.asarray(inside)[0], np.asarray(after)[0], np.asarray(added)[0]])


def logit_lens(model, set_):
    """Exploratory: accumulated residual through the final norm, onto the answer direction."""
    _, cache = model.run_with_cache(CLEAN)
    resid = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1, apply_ln=True)
    direction = model.tokens_to_residual_directions(" Mary") - model.tokens_to_residual_directions(" John")
    return np.asarray(resid) @ np.asarray(direction)


@pytest.mark.parametrize("snippet", [patching_loop, head_ablation_loop, stateful_hooks, logit_lens])
def test_transformer_lens_code_gives_transformer_lens_numbers(models, snippet):
    tl, ours = both(models, snippet)
    assert tl.shape == ours.shape
    np.testing.assert_allclose(ours, tl, rtol=1e-5, atol=1e-5, err_msg=snippet.__name__)
    assert np.ptp(tl) > 1e-3, "the snippet must actually vary"
