"""User hooks and edits-as-pytrees against the same edit done by a torch hook on the HF model or by
TransformerLens's `run_with_hooks` on its bridge; jit-breaking hooks fail with a clear message."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxlens
from conftest import assert_close, boot_bridge, built
from jaxlens.edits import interventions as iv
from jaxlens.model.forward import stack_layers

TOKS = np.array([[0, 5, 9, 30, 2, 7, 100, 44], [0, 17, 250, 8, 3, 3, 60, 61]], np.int32)
CLEAN = np.array([[0, 5, 9, 31, 2, 7, 100, 44], [0, 17, 251, 8, 3, 4, 60, 61]], np.int32)


@pytest.fixture(scope="module")
def gpt2(hf_root):
    path, model = built("gpt2", hf_root)
    return jaxlens.from_pretrained_no_processing(path), model


@pytest.fixture(scope="module")
def llama(hf_root):
    path, model = built("llama", hf_root)
    return jaxlens.from_pretrained_no_processing(path), model


@pytest.fixture(scope="module")
def bridge_llama(hf_root):
    path, _ = built("llama", hf_root)
    b = boot_bridge(path, processed=False)
    return b


# --- torch reference helpers --------------------------------------------------------------------

def torch_logits(model, toks, hooks=()):
    """Run the HF model with (module, "pre"|"fwd", fn) hooks; fn maps the tensor to its replacement."""
    handles = []
    for module, kind, fn in hooks:
        if kind == "pre":
            def pre(mod, args, kwargs, fn=fn):
                if args:
                    return (fn(args[0]),) + tuple(args[1:]), kwargs
                return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        else:
            def post(mod, args, out, fn=fn):
                return (fn(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else fn(out)
            handles.append(module.register_forward_hook(post))
    try:
        with torch.no_grad():
            return model(input_ids=torch.tensor(toks, dtype=torch.long)).logits.numpy()
    finally:
        for h in handles:
            h.remove()


def torch_capture(model, toks, module, kind):
    store = {}

    def fn(x):
        store["x"] = x.clone()
        return x

    torch_logits(model, toks, [(module, kind, fn)])
    return store["x"]


def _heads(x, n):  # [b p n*d] <-> [b p n d]
    return x.reshape(*x.shape[:2], n, -1)


@pytest.fixture(scope="module")
def gpt2_pattern_hookable(gpt2):
    """GPT-2's reorder_and_upcast path routes the pattern through the attn_dropout module (identity
    in eval) so a torch forward hook can edit it; numerically the same f32 attention."""
    _, model = gpt2
    for blk in model.transformer.h:
        blk.attn.reorder_and_upcast_attn = True
    yield model
    for blk in model.transformer.h:
        blk.attn.reorder_and_upcast_attn = False


# --- user hooks ---------------------------------------------------------------------------------

def test_user_hook_matches_torch_hook_and_cache_sees_edit(gpt2):
    m, model = gpt2
    vec = np.linspace(-1, 1, m.cfg.d_model).astype(np.float32)

    def hook(x, hook):
        assert hook.name == "blocks.1.hook_resid_pre" and hook.layer() == 1
        return x.at[:, 2].multiply(0.5) + jnp.asarray(vec)

    logits, cache = m.run_with_cache(TOKS, names_filter=["blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"],
                                     fwd_hooks=[("blocks.1.hook_resid_pre", hook)])

    def ref(x):
        x = x.clone()
        x[:, 2] *= 0.5
        return x + torch.tensor(vec)

    ref_logits = torch_logits(model, TOKS, [(model.transformer.h[1], "pre", ref)])
    assert_close(logits, ref_logits, "logits")
    unedited = torch_capture(model, TOKS, model.transformer.h[1], "pre")
    assert_close(cache["resid_pre", 1], ref(unedited).numpy(), "cache holds the edited activation")


def _layer_hooks_jax():
    def scale_q(x, hook):
        return x * (1.0 + 0.1 * hook.layer())

    def damp_pattern(x, hook):
        return x.at[:, 1, 3:, :2].multiply(0.25)

    def shift_mlp(x, hook):
        return x + 0.05 * (hook.layer() + 1)

    return [(lambda n: n.endswith("attn.hook_q"), scale_q), ("blocks.0.attn.hook_pattern", damp_pattern),
            (lambda n: n.endswith("hook_mlp_out"), shift_mlp)]


def _layer_hooks_torch(cfg):
    def layer(hook):
        return int(hook.name.split(".")[1])

    def scale_q(x, hook):
        return x * (1.0 + 0.1 * layer(hook))

    def damp_pattern(x, hook):
        x = x.clone()
        x[:, 1, 3:, :2] *= 0.25
        return x

    def shift_mlp(x, hook):
        return x + 0.05 * (layer(hook) + 1)

    hooks = [(f"blocks.{l}.attn.hook_q", scale_q) for l in range(cfg.n_layers)]
    hooks.append(("blocks.0.attn.hook_pattern", damp_pattern))
    hooks += [(f"blocks.{l}.hook_mlp_out", shift_mlp) for l in range(cfg.n_layers)]
    return hooks


def test_user_hooks_match_transformer_lens(llama, bridge_llama):
    """Filters, hook.layer() and several hooks at once (queries, pattern, mlp_out) on a GQA model."""
    m, _ = llama
    logits = m.run_with_hooks(TOKS, fwd_hooks=_layer_hooks_jax())
    with torch.no_grad():
        ref = bridge_llama.run_with_hooks(torch.tensor(TOKS, dtype=torch.long), fwd_hooks=_layer_hooks_torch(m.cfg))
    assert_close(logits, ref.numpy(), "logits")
    scanned = jaxlens.HookedTransformer(m.cfg, stack_layers(m.params, m.cfg.n_layers), m.tokenizer)
    assert_close(scanned.run_with_hooks(TOKS, fwd_hooks=_layer_hooks_jax()), ref.numpy(), "scanned model")


# --- edits vs torch hooks on HF GPT-2 -----------------------------------------------------------

def test_resid_ablation_and_patch(gpt2):
    m, model = gpt2
    clean = torch_capture(model, CLEAN, model.transformer.h[1], "pre")

    def zero(x):
        x = x.clone()
        x[:, [1, 3]] = 0
        return x

    def patch(x):
        x = x.clone()
        x[:, [2, -1]] = clean[:, [2, -1]]
        return x

    ref = torch_logits(model, TOKS, [(model.transformer.h[0], "pre", zero), (model.transformer.h[1], "pre", patch)])
    ablate = ("blocks.0.hook_resid_pre", iv.intervention_resid([1, 3]))
    full = iv.intervention_resid([2, -1], clean.numpy())
    assert_close(m.run_with_hooks(TOKS, fwd_hooks=[ablate, ("blocks.1.hook_resid_pre", full)]), ref, "patch from full")
    per_pos = iv.intervention_resid([2, -1], clean.numpy()[:, [2, 7]], at_positions=True)
    assert_close(m.run_with_hooks(TOKS, fwd_hooks=[ablate, ("blocks.1.hook_resid_pre", per_pos)]), ref, "per position")


def test_head_edits_on_z(gpt2):
    m, model = gpt2
    H = m.cfg.n_heads
    c_proj0, c_proj1 = model.transformer.h[0].attn.c_proj, model.transformer.h[1].attn.c_proj
    clean_z = _heads(torch_capture(model, CLEAN, c_proj1, "pre"), H)

    def zero(x):
        z = _heads(x.clone(), H)
        z[:, :, [1, 2]] = 0
        return z.reshape(x.shape)

    def patch(x):
        z = _heads(x.clone(), H)
        z[:, 4:, 3] = clean_z[:, 4:, 3]
        return z.reshape(x.shape)

    fwd = [("blocks.0.attn.hook_z", iv.ablate_heads([1, 2])),
           ("blocks.1.attn.hook_z", iv.patch_heads([3], clean_z.numpy(), positions=[4, 5, 6, 7]))]
    ref = torch_logits(model, TOKS, [(c_proj0, "pre", zero), (c_proj1, "pre", patch)])
    assert_close(m.run_with_hooks(TOKS, fwd_hooks=fwd), ref, "zero heads 1,2 of layer 0; patch head 3 of layer 1")


def _torch_attn_mat(x, heads, qs, ks, mult, normalize=None):
    x = x.clone()
    orig = x.clone()
    for h in heads:
        for q in qs:
            x[:, h, q, ks] *= mult
    if normalize == "renorm":
        for h in heads:
            x[:, h] = x[:, h] / x[:, h].sum(-1, keepdim=True)
    elif normalize == "softmax":
        for h in heads:
            x[:, h] = torch.softmax(x[:, h].masked_fill(orig[:, h] <= 0, float("-inf")), dim=-1)
    return x


def test_attn_mat_edit(gpt2, gpt2_pattern_hookable):
    """Multiply entries (layer 0), then re-normalise rows by their sum or by a softmax (two heads of
    layer 1): three edits in one run, each against the same edit by a torch hook."""
    m, _ = gpt2
    model = gpt2_pattern_hookable
    qs, ks = [3, 4, 5], [1, 2]
    fwd = [("blocks.0.attn.hook_pattern", iv.intervention_attn_mat([0, 3], qs, ks, multiplier=0.3)),
           ("blocks.1.attn.hook_pattern", iv.intervention_attn_mat([1], qs, ks, multiplier=0.3, normalize="renorm")),
           ("blocks.1.attn.hook_pattern", iv.intervention_attn_mat([2], qs, ks, multiplier=0.3, normalize="softmax"))]

    def layer1(x):
        return _torch_attn_mat(_torch_attn_mat(x, [1], qs, ks, 0.3, "renorm"), [2], qs, ks, 0.3, "softmax")

    ref = torch_logits(model, TOKS, [
        (model.transformer.h[0].attn.attn_dropout, "fwd", lambda x: _torch_attn_mat(x, [0, 3], qs, ks, 0.3)),
        (model.transformer.h[1].attn.attn_dropout, "fwd", layer1)])
    assert_close(m.run_with_hooks(TOKS, fwd_hooks=fwd), ref, "multiply; renorm; softmax")


def test_attn_mat_set_values_and_keep_self_attn(gpt2, gpt2_pattern_hookable):
    m, _ = gpt2
    model = gpt2_pattern_hookable
    mod0, mod1 = model.transformer.h[0].attn.attn_dropout, model.transformer.h[1].attn.attn_dropout
    clean_p = torch_capture(model, CLEAN, mod0, "fwd")

    def set_vals(x):
        x = x.clone()
        x[:, 2, 6, :3] = clean_p[:, 2, 6, :3]
        return x

    def keep_self(x):  # easyroutine's ablate_pos_keep_self_attn_hook, per batch row
        x = x.clone()
        for h, p in zip([1, 3, 3], [4, 7, 2]):
            x[:, h, p, :-1] = 0
        return x

    fwd = [("blocks.0.attn.hook_pattern", iv.intervention_attn_mat([2], [6], [0, 1, 2], values=clean_p.numpy())),
           ("blocks.1.attn.hook_pattern", iv.ablate_keep_self_attn([1, 3, 3], [4, -1, 2]))]
    ref = torch_logits(model, TOKS, [(mod0, "fwd", set_vals), (mod1, "fwd", keep_self)])
    assert_close(m.run_with_hooks(TOKS, fwd_hooks=fwd), ref, "set from clean pattern; keep self attention")


def test_steer_mean_ablation_and_combined(gpt2):
    m, model = gpt2
    vec = np.cos(np.arange(m.cfg.d_model)).astype(np.float32)
    h1, mlp0, c_proj1 = model.transformer.h[1], model.transformer.h[0].mlp, model.transformer.h[1].attn.c_proj
    batch = np.concatenate([TOKS, CLEAN, TOKS[:, ::-1]])
    mean_t = torch_capture(model, batch, mlp0, "fwd").mean(0, keepdim=True)

    def steer_t(out):
        out = out.clone()
        out[:, [5, 6]] += 2.0 * torch.tensor(vec)
        return out

    def zero_head(x):
        z = _heads(x.clone(), m.cfg.n_heads)
        z[:, :, 0] = 0
        return z.reshape(x.shape)

    steer = ("blocks.1.hook_resid_post", iv.steer(vec, 2.0, positions=[5, 6]))
    batch_cache = {"blocks.0.hook_mlp_out": torch_capture(model, batch, mlp0, "fwd").numpy()}
    combined = iv.mean_ablation(batch_cache, "blocks.0.hook_mlp_out") + [("blocks.1.attn.hook_z", iv.ablate_heads(0)),
                                                                         steer]
    ref = torch_logits(model, TOKS, [(mlp0, "fwd", lambda o: mean_t.expand_as(o).clone()), (c_proj1, "pre", zero_head),
                                     (h1, "fwd", steer_t)])
    assert_close(m.run_with_hooks(TOKS, fwd_hooks=combined), ref, "mean ablation + head ablation + steering in one run")


# --- GQA model edits vs TransformerLens -----------------------------------------------------------

def test_gqa_edits_match_transformer_lens(llama, bridge_llama):
    m, _ = llama
    _, clean = m.run_with_cache(CLEAN, names_filter=["blocks.1.attn.hook_v", "blocks.0.attn.hook_pattern"])
    clean_v = torch.tensor(np.asarray(clean["v", 1]))

    def v_t(x, hook):
        x = x.clone()
        x[:, :, 1] = clean_v[:, :, 1]  # kv head 1 (serves query heads 2 and 3)
        return x

    def scores_t(x, hook):
        x = x.clone()
        x[:, 3, 4:, :3] *= 0.5  # allowed (causal) entries only
        return x

    def z_t(x, hook):
        x = x.clone()
        x[:, :, 2] = 0
        return x

    fwd = [("blocks.1.attn.hook_v", iv.patch_heads([1], clean["v", 1])),
           ("blocks.0.attn.hook_attn_scores", iv.intervention_attn_mat([3], [4, 5, 6, 7], [0, 1, 2], 0.5)),
           ("blocks.0.attn.hook_z", iv.ablate_heads([2]))]
    ref_hooks = [("blocks.1.attn.hook_v", v_t), ("blocks.0.attn.hook_attn_scores", scores_t), ("blocks.0.attn.hook_z", z_t)]
    with torch.no_grad():
        ref = bridge_llama.run_with_hooks(torch.tensor(TOKS, dtype=torch.long), fwd_hooks=ref_hooks).numpy()
    assert_close(m.run_with_hooks(TOKS, fwd_hooks=fwd), ref, "GQA edits")


# --- batches of edits ----------------------------------------------------------------------------

def test_vmapped_edits_equal_single_runs(gpt2):
    """A stack of edits is a pytree with a leading axis: vmap runs them all in one program."""
    from jaxlens.model.forward import forward
    from jaxlens.hooks import make_hooks

    m, _ = gpt2
    edits = iv.stack_edits([iv.intervention_attn_mat([h], [5, 6, 7], [0], multiplier=s)
                            for h, s in [(0, 0.0), (1, 0.5), (3, 2.0)]])
    assert edits.heads.shape == (3, 1) and edits.multiplier.shape == (3,)

    @jax.jit
    def grid(edits):
        def one(e):
            return forward(m.params, m.cfg, jnp.asarray(TOKS), hooks=make_hooks([("blocks.1.attn.hook_pattern", e)], m.cfg))[0]
        return jax.vmap(one)(edits)

    out = grid(edits)
    for i in range(3):
        e = jax.tree.map(lambda x, i=i: x[i], edits)
        assert_close(out[i], m.run_with_hooks(TOKS, fwd_hooks=[("blocks.1.attn.hook_pattern", e)]), f"edit {i}")


# --- errors ---------------------------------------------------------------------------------------

def _bad_float(x, hook):
    return x * float(x.sum())


def _bad_numpy(x, hook):
    return jnp.asarray(np.asarray(x) + 1)


def _bad_branch(x, hook):
    return x * 2 if x.sum() > 0 else x


def _bad_boolean_index(x, hook):
    return x.at[:, 0].set(x[x > 0].mean())


def _bad_inplace(x, hook):
    x[:, 0] = 0
    return x


@pytest.mark.parametrize("fn,why", [(_bad_float, "ConcretizationTypeError"), (_bad_numpy, "TracerArrayConversionError"),
                                    (_bad_branch, "TracerBoolConversionError"),
                                    (_bad_boolean_index, "NonConcreteBooleanIndexError"), (_bad_inplace, "immutable")])
def test_jit_breaking_hooks_say_why(gpt2, fn, why):
    m, _ = gpt2
    with pytest.raises(ValueError, match="blocks.0.hook_resid_post") as e:
        m.run_with_hooks(TOKS, fwd_hooks=[("blocks.0.hook_resid_post", fn)])
    assert why in str(e.value) and fn.__name__ in str(e.value)


def test_edit_errors(gpt2):
    m, _ = gpt2
    cases = [
        ([("blocks.0.hook_resid_pre", iv.ablate_heads([0]))], "per-head activation"),
        ([("blocks.0.attn.hook_pattern", iv.intervention_resid([0]))], "AttnMatEdit or HeadEdit"),
        ([("blocks.0.hook_resid_pre", iv.intervention_resid([0], jnp.ones((3, 5))))], "do not broadcast"),
        ([("blocks.0.hook_mlp_out", iv.intervention_attn_mat([0], [1], [0]))], "hook_pattern or hook_attn_scores"),
        ([("blocks.0.attn.hook_attn_scores", iv.intervention_attn_mat([0], [1], [0], normalize="renorm"))],
         "applies at hook_pattern only"),
        ([("blocks.0.hook_resid_pre", iv.steer(np.ones(7)))], "vector has width 7"),
        ([("blocks.0.attn.hook_z", iv.ablate_keep_self_attn([0], [1]))], "applies at hook_pattern"),
    ]
    for hooks, msg in cases:
        with pytest.raises(ValueError, match=msg):
            m.run_with_hooks(TOKS, fwd_hooks=hooks)
    with pytest.raises(ValueError, match="paired element-wise"):
        iv.ablate_keep_self_attn([0, 1], [2])
    with pytest.raises(ValueError, match="must be integers"):
        iv.intervention_resid([1.5])
    with pytest.raises(ValueError, match="normalize must be"):
        iv.intervention_attn_mat([0], [1], [0], normalize="exp")
    _, cache = m.run_with_cache(TOKS, names_filter="blocks.0.hook_mlp_out")
    with pytest.raises(ValueError, match="not in the cache"):
        iv.mean_ablation(cache, "blocks.1.hook_mlp_out")
    with pytest.raises(ValueError, match="differs in type or static fields"):
        iv.stack_edits([iv.intervention_resid([0]), iv.intervention_resid([0], at_positions=True)])
