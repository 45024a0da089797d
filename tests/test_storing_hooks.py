"""Hooks that store values, as TransformerLens's notebooks write them, and TransformerLens's
caching hooks (`get_caching_hooks`, `add_caching_hooks`, `cache_all`, `cache_some`).

A hook that stores (`store[hook.name] = x`, `acts.append(x)`, `self.x = x`, a global counter)
runs eagerly, so what it stores is the activation of that very call; caching hooks are served
by the compiled capture instead. Both are compared with run_with_cache, and the caching hooks
key by key with TransformerLens 4.3's bridge on the same checkpoint. Where a stored value can
have no concrete value (a vmapped patching grid, a caller's own jit) the error is clear and the
container is left as it was.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest
import torch

import jaxlens
from conftest import PROMPTS, assert_close, boot_bridge, built
from jaxlens.assets import model_dir
from jaxlens.fingerprint import _EAGER_CODES, HookSideEffectError

TOKS = np.asarray([PROMPTS[0], [0, 17, 250, 8, 3, 9, 4, 6, 1, 2]], np.int32)
Z = "blocks.1.attn.hook_z"


@pytest.fixture(scope="module", params=[False, True], ids=["unrolled", "scanned"])
def tiny(request):
    model = jaxlens.from_pretrained(model_dir(), scan_layers=request.param)
    toks = model.to_tokens(["When Mary and John went to the store", "1 2 3 4 1 2 3 4 1"])
    _, ref = model.run_with_cache(toks)
    return model, toks, ref


STORE: list = []
CALLS = 0


def append_to_global(pattern, hook):
    STORE.append((hook.layer(), pattern))


def count_calls(x, hook):
    global CALLS
    CALLS += 1


def quiet_run(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*stores values")
        return fn(*args, **kwargs)


def test_storing_hooks_keep_this_calls_values(tiny):
    model, toks, ref = tiny
    acts = {}

    def into_dict(z, hook):
        acts[hook.name] = z

    logits = quiet_run(model.run_with_hooks, toks, fwd_hooks=[(lambda n: n.endswith("hook_z"), into_dict)])
    assert_close(logits, model(toks), "logits unchanged by a hook that returns None")
    assert sorted(acts) == [f"blocks.{l}.attn.hook_z" for l in range(model.cfg.n_layers)]
    for k, v in acts.items():
        assert isinstance(v, jax.Array)
        assert_close(v, ref[k], k)
    # the next call stores its own values (no program reused with the first call's arrays)
    other = toks.at[:, 1].set(7)
    _, ref2 = model.run_with_cache(other, names_filter=Z)
    quiet_run(model.run_with_hooks, other, fwd_hooks=[(Z, into_dict)])
    assert_close(acts[Z], ref2[Z], "second call")

    STORE.clear()
    quiet_run(model.run_with_hooks, toks, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), append_to_global)])
    quiet_run(model.run_with_hooks, toks, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), append_to_global)])
    assert [l for l, _ in STORE] == list(range(model.cfg.n_layers)) * 2
    assert_close(STORE[-1][1], ref[f"blocks.{model.cfg.n_layers - 1}.attn.hook_pattern"], "appended pattern")


def test_objects_counters_and_stored_hooks(tiny):
    model, toks, ref = tiny

    class Recorder:
        def __init__(self):
            self.last = None

        def __call__(self, x, hook):
            self.last = x

    r = Recorder()
    model.add_hook("blocks.0.hook_resid_post", r)
    try:
        quiet_run(model, toks)
    finally:
        model.reset_hooks()
    assert_close(r.last, ref["blocks.0.hook_resid_post"], "attribute")

    before = CALLS
    with model.hooks(fwd_hooks=[("hook_embed", count_calls)]):
        quiet_run(model, toks)
        quiet_run(model, toks)
    assert CALLS == before + 2


def test_storing_hooks_warn_once_and_leave_compiled_runs_alone(tiny):
    model, toks, _ = tiny
    seen = []

    def fresh_code(x, hook):
        seen.append(x)

    if fresh_code.__code__ in _EAGER_CODES:  # the other parametrization warned already
        quiet_run(model.run_with_hooks, toks, fwd_hooks=[("hook_embed", fresh_code)])
    else:
        with pytest.warns(UserWarning, match="'fresh_code'.*stores values.*eagerly"):
            model.run_with_hooks(toks, fwd_hooks=[("hook_embed", fresh_code)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # seen before: eager at once, no second warning
        model.run_with_hooks(toks, fwd_hooks=[("hook_embed", fresh_code)])
    assert len(seen) == 2
    edit = lambda x, hook: x * 2  # noqa: E731  a hook that returns its edit still compiles
    assert_close(model.run_with_hooks(toks, fwd_hooks=[("hook_embed", edit)]),
                 jaxlens.forward_jit(model.params, model.cfg, toks, None,
                                     jaxlens.make_hooks([("hook_embed", edit)], model.cfg))[0], "compiled edit")


def test_storing_in_generate_and_in_the_backward_pass(tiny):
    model, toks, ref = tiny
    greedy = dict(max_new_tokens=3, do_sample=False, verbose=False, stop_at_eos=False)
    def run(crit):
        stored = []
        out = quiet_run(model.generate, toks, fwd_hooks=[("hook_embed", lambda x, hook: stored.append(x))],
                        stopping_criteria=crit, **greedy)
        return np.asarray(out), stored

    for crit in (None, lambda ids, scores: np.zeros(len(ids), bool)):  # with stopping criteria too
        out, stored = run(crit)
        assert (out == np.asarray(model.generate(toks, **greedy))).all()
        # the call's own shapes (no compile buckets): the prompt but its last token, then one per step
        assert [a.shape[:2] for a in stored] == [(2, toks.shape[1] - 1)] + [(2, 1)] * 3
        _, cache = model.run_with_cache(out, names_filter="hook_embed")
        assert_close(np.concatenate([np.asarray(a) for a in stored], 1), cache["hook_embed"][:, :-1], "stored")

    name = "blocks.0.hook_resid_post"
    fwd, grads = {}, {}

    def keep_act(x, hook):
        fwd[hook.name] = x

    def keep_grad(g, hook):
        grads[hook.name] = g

    loss = quiet_run(model.run_with_hooks, toks, return_type="loss", fwd_hooks=[(name, keep_act)],
                     bwd_hooks=[(name, keep_grad)])
    want_loss, cache = model.run_with_cache(toks, names_filter=name, return_type="loss", incl_bwd=True)
    assert_close(loss, want_loss, "loss")
    assert_close(fwd[name], cache[name], "forward value under grad (its primal, as TL's .detach())")
    assert_close(grads[name], cache[name + "_grad"], "gradient")


def test_a_traced_store_is_a_clear_error_and_loses_nothing(tiny):
    model, toks, ref = tiny
    from jaxlens.edits import patching

    seen = {"kept": 1}

    def storing_metric(logits):
        seen["logits"] = logits
        return logits[0, -1].max()

    with pytest.raises(HookSideEffectError, match="storing_metric' changed.*patching grids cannot"):
        patching.get_act_patch_resid_pre(model, toks[:1], ref, storing_metric)
    assert seen == {"kept": 1}

    def into(x, hook):
        seen["x"] = x

    hooks = jaxlens.make_hooks([("hook_embed", into)], model.cfg)
    with pytest.raises(HookSideEffectError, match="into' changed the closure variable 'seen'"):
        jax.jit(lambda p: jaxlens.forward(p, model.cfg, toks, hooks=hooks)[0])(model.params)
    assert seen == {"kept": 1}


def test_caching_hooks_equal_run_with_cache_unrolled_and_scanned(tiny):
    model, toks, _ = tiny
    ours = model.add_caching_hooks(incl_bwd=True)
    try:
        loss = model(toks, return_type="loss")
    finally:
        model.reset_hooks()
    model.clear_contexts()
    assert [h.name for h in model.hook_points()] == list(model.hook_dict)
    want, cache = model.run_with_cache(toks, return_type="loss", incl_bwd=True)
    assert_close(loss, want, "loss")
    assert sorted(ours) == sorted(cache.keys())
    for k in cache.keys():
        assert_close(ours[k], cache[k], k)


# --- caching hooks against TransformerLens 4.3's bridge ------------------------------------------

@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pair(request, hf_root):
    path, _ = built(request.param, hf_root)
    return request.param, jaxlens.from_pretrained_no_processing(path), boot_bridge(path, processed=False)


def tl_run(bridge, toks, **kw):
    with torch.no_grad():
        return bridge(torch.tensor(toks, dtype=torch.long), **kw)


def compare(ours, theirs, what):
    assert ours, what
    for k, v in ours.items():
        assert k in theirs, f"{what}: {k} not in the bridge's cache"
        assert_close(v, theirs[k].detach().numpy(), f"{what} {k}")


def test_cache_all_and_cache_some_match_the_bridge(pair):
    family, model, bridge = pair
    ours = {}
    with pytest.warns(DeprecationWarning, match="cache_all is deprecated"):
        model.cache_all(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # served by the compiled capture: no eager run
        model(TOKS)
    model.reset_hooks()
    # the bridge's cache_all keys its own canonical names (`blocks.0.hook_in`); jaxlens keeps
    # TransformerLens's hook names, so the reference is what the bridge's run_with_cache caches
    _, theirs = bridge.run_with_cache(torch.tensor(TOKS, dtype=torch.long))
    compare(ours, theirs, f"{family} cache_all")
    _, cache = model.run_with_cache(TOKS)
    assert list(ours) == list(cache.keys())  # what run_with_cache caches, in its order
    model(TOKS)
    assert len(ours) == len(cache.keys())  # reset_hooks removed them: nothing new stored

    some, theirs = {}, {}
    flt = lambda n: n.endswith(("hook_pattern", "hook_resid_post"))  # noqa: E731
    with pytest.warns(DeprecationWarning):
        model.cache_some(some, flt)
    model(TOKS)
    model.reset_hooks()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        bridge.cache_some(theirs, flt)
    tl_run(bridge, TOKS)
    bridge.reset_hooks()
    assert sorted(some) == sorted(n for n in model.hook_names() if flt(n))  # the bridge adds canonical names
    compare(some, theirs, f"{family} cache_some")


@pytest.mark.parametrize("pos_slice", [None, -1, (1, 4)])
def test_get_caching_hooks_match_the_bridge(pair, pos_slice):
    family, model, bridge = pair
    names = ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_pattern", "blocks.1.attn.hook_z"]
    for toks, remove in ((TOKS, False), (TOKS[:1], True), (TOKS, True)):
        ours, fwd, bwd = model.get_caching_hooks(names, remove_batch_dim=remove, pos_slice=pos_slice)
        theirs, tfwd, _ = bridge.get_caching_hooks(names, remove_batch_dim=remove, pos_slice=pos_slice)
        assert bwd == [] and model.is_caching
        model.run_with_hooks(toks, fwd_hooks=fwd)
        with torch.no_grad():
            bridge.run_with_hooks(torch.tensor(toks, dtype=torch.long), fwd_hooks=tfwd)
        assert sorted(ours) == sorted(names) and set(names) <= set(theirs)  # the bridge adds canonical names
        compare(ours, theirs, f"{family} pos_slice={pos_slice} remove_batch_dim={remove} batch {toks.shape[0]}")


def test_caching_gradients_match_the_bridge(pair):
    family, model, bridge = pair
    names = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "ln_final.hook_normalized"]
    ours = model.add_caching_hooks(names, incl_bwd=True)
    loss = model(TOKS, return_type="loss")
    model.reset_hooks()
    theirs = bridge.add_caching_hooks(names, incl_bwd=True)
    tl_loss = bridge(torch.tensor(TOKS, dtype=torch.long), return_type="loss")
    tl_loss.backward()
    bridge.reset_hooks()
    bridge.zero_grad(set_to_none=True)
    assert_close(loss, tl_loss.detach().numpy(), f"{family} loss")
    assert sorted(ours) == sorted(names + [n + "_grad" for n in names]) and set(ours) <= set(theirs)
    assert list(ours)[len(names):] == [n + "_grad" for n in reversed(names)]  # backward order, as hooks fire
    compare(ours, theirs, f"{family} incl_bwd")


def test_caching_hook_before_an_edit_sees_the_value_before_it(pair):
    """A caching hook followed by an editing hook on the same point sees the unedited value (it
    runs as a hook then, eagerly); one after the edit, the edited value (served by the capture)."""
    family, model, bridge = pair
    name = "blocks.0.hook_resid_post"

    for first in (True, False):
        ours, fwd, _ = model.get_caching_hooks(name)
        theirs, tfwd, _ = bridge.get_caching_hooks(name)
        mine = [(name, lambda x, hook: x * 0.5)]
        tl = [(name, lambda x, hook: x * 0.5)]
        hooks, thooks = (fwd + mine, tfwd + tl) if first else (mine + fwd, tl + tfwd)
        got = quiet_run(model.run_with_hooks, TOKS, fwd_hooks=hooks)
        with torch.no_grad():
            want = bridge.run_with_hooks(torch.tensor(TOKS, dtype=torch.long), fwd_hooks=thooks)
        assert_close(got, want.numpy(), f"{family} logits first={first}")
        compare(ours, theirs, f"{family} first={first}")


def test_caching_hook_errors(pair):
    _, model, _ = pair
    with pytest.raises(ValueError, match="must be a dict"):
        model.get_caching_hooks("blocks.0.hook_resid_pre", cache=[])
    with pytest.raises(ValueError, match="blocks.0.hook_resid_pree"):
        model.get_caching_hooks("blocks.0.hook_resid_pree")
    ours, fwd, _ = model.get_caching_hooks("blocks.0.hook_resid_pre", pos_slice=40)
    with pytest.raises(ValueError, match="pos_slice for blocks.0.hook_resid_pre index 40 is out of range"):
        model.run_with_hooks(TOKS, fwd_hooks=fwd)
    assert ours == {}
