"""ActivationCache analyses: parity with TransformerLens 4.x (bridge, compatibility mode), padding,
properties over random configs, pytree behaviour, compiled-program reuse, and error paths."""

from __future__ import annotations

import pickle
from types import SimpleNamespace
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import Phase, given, settings, strategies as st

import jaxlens
from conftest import PROMPTS, assert_close, boot_bridge, built, padded
from jaxlens.cache import analysis as A
from jaxlens.cache.activation_cache import ActivationCache
from jaxlens.cache.slice import Slice

TOKS = np.array([[0, 5, 9, 30, 2, 7, 100, 44, 12, 3], [0, 17, 250, 8, 4, 61, 62, 63, 64, 65],
                 [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]], np.int32)  # [3 10], the padded batches' shape
PROCESS = dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True)


@pytest.fixture(scope="module", params=[False, True], ids=["unprocessed", "processed"])
def pair(request, family, hf_model, jl_model):
    """Our model and cache and TransformerLens's bridge and cache on TOKS (unprocessed or processed),
    the table of analyses for this family, and ours computed in one compiled program."""
    path, _ = hf_model
    processed = request.param
    model = jaxlens.from_pretrained(path, **PROCESS) if processed else jl_model
    bridge = boot_bridge(path, processed)
    with torch.no_grad():
        ref_logits, ref = bridge.run_with_cache(torch.tensor(TOKS, dtype=torch.long))
    logits, cache = model.run_with_cache(TOKS)
    table = calls(family, single_token_word(model.tokenizer))
    if processed:
        table = [(n, fn) for n, fn in table if n in PROCESSED_SUBSET]
    return SimpleNamespace(family=family, model=model, cache=cache, logits=np.asarray(logits), bridge=bridge,
                           ref=ref, ref_logits=ref_logits.numpy(), table=table, ours=ours_all(cache, table))


def _t(x):
    return torch.tensor(np.asarray(x), dtype=torch.long)


def _n(x):
    return np.asarray(x)


def calls(family, tokenizer_word):
    """(name, fn(cache, T)) where T turns a numpy array into the framework's tensor."""
    par = family == "gpt_neox"
    out = [
        ("accumulated", lambda c, T: c.accumulated_resid(return_labels=True)),
        ("accumulated ln", lambda c, T: c.accumulated_resid(apply_ln=True, return_labels=True)),
        ("accumulated mid ln", lambda c, T: c.accumulated_resid(layer=1, incl_mid=not par, mlp_input=not par,
                                                                apply_ln=True, pos_slice=-1, return_labels=True)),
        ("decompose", lambda c, T: c.decompose_resid(return_labels=True)),
        ("decompose attn mlp_input ln", lambda c, T: c.decompose_resid(layer=1, mlp_input=True, mode="attn",
                                                                       apply_ln=True, pos_slice=(1, 4),
                                                                       return_labels=True)),
        ("decompose mlp ln", lambda c, T: c.decompose_resid(mode="mlp", incl_embeds=False, apply_ln=True,
                                                            pos_slice=[0, 2, -1], return_labels=True)),
        ("full ln", lambda c, T: c.get_full_resid_decomposition(apply_ln=True, return_labels=True)),
        ("full mlp_input", lambda c, T: c.get_full_resid_decomposition(layer=1, mlp_input=True, expand_neurons=False,
                                                                       apply_ln=True, pos_slice=-1,
                                                                       return_labels=True)),
        ("full layer0", lambda c, T: c.get_full_resid_decomposition(layer=0, return_labels=True)),
        ("heads ln remainder", lambda c, T: c.stack_head_results(incl_remainder=True, apply_ln=True,
                                                                 pos_slice=(1, 5), return_labels=True)),
        ("heads layer1", lambda c, T: c.stack_head_results(layer=1, return_labels=True)),
        ("heads layer0 remainder", lambda c, T: c.stack_head_results(layer=0, incl_remainder=True,
                                                                     return_labels=True)),
        ("neurons", lambda c, T: c.stack_neuron_results(2, neuron_slice=[1, 3], incl_remainder=True, apply_ln=True,
                                                        return_labels=True)),
        ("neuron results", lambda c, T: c.get_neuron_results(1, neuron_slice=(2, 9, 3), pos_slice=[0, -1])),
        ("neuron results int", lambda c, T: c.get_neuron_results(0, neuron_slice=4)),
        ("apply_ln_to_stack", lambda c, T: c.apply_ln_to_stack(c.decompose_resid(layer=1, mlp_input=True,
                                                                                 pos_slice=-1),
                                                               layer=1, mlp_input=True, pos_slice=-1,
                                                               batch_slice=[1])),
        ("logit_attrs int", lambda c, T: c.logit_attrs(c.decompose_resid(), 5)),
        ("logit_attrs scalar", lambda c, T: c.logit_attrs(c.decompose_resid(layer=1), T(np.array(7)),
                                                          T(np.array(3)))),
        ("logit_attrs str", lambda c, T: c.logit_attrs(c.decompose_resid(pos_slice=-1), tokenizer_word,
                                                       pos_slice=-1)),
        ("logit_attrs batch diff", lambda c, T: c.logit_attrs(c.decompose_resid(), T([5, 7, 2]), T([1, 2, 3]))),
        ("logit_attrs batch pos", lambda c, T: c.logit_attrs(c.stack_head_results(), T(TOKS))),
        ("logit_attrs batch_slice", lambda c, T: c.logit_attrs(c.accumulated_resid(pos_slice=-1), T([9]),
                                                               pos_slice=-1, batch_slice=1)),
        ("stack_activation", lambda c, T: c.stack_activation("pattern")),
        ("stack_activation scale", lambda c, T: c.stack_activation("scale", 1, "ln1")),
    ]
    if not par:
        out.append(("neurons mlp_input", lambda c, T: c.stack_neuron_results(
            1, neuron_slice=5, pos_slice=-1, mlp_input=True, incl_remainder=True, apply_ln=True, return_labels=True)))
    if family in POST_NORM_ONLY:  # no ln1/ln2: a mid-layer cached-scale norm is an error on both sides (tested below)
        out = [(n, fn) for n, fn in out if n not in MID_LAYER_LN]
    if family in MOE_FAMILIES:  # routed experts have no neuron basis: an error on both sides (tests/test_moe.py)
        out = [(n, fn) for n, fn in out if n not in NEURON_CALLS]
    return out


MOE_FAMILIES = ("mixtral", "qwen3_moe")
NEURON_CALLS = ("full ln", "neurons", "neuron results", "neuron results int", "neurons mlp_input")


POST_NORM_ONLY = ("olmo2",)
MID_LAYER_LN = ("accumulated mid ln", "decompose attn mlp_input ln", "full mlp_input", "apply_ln_to_stack",
                "stack_activation scale", "neurons mlp_input")


def compare(ours, theirs, name):
    if isinstance(theirs, tuple):
        ours, labels = ours
        theirs, ref_labels = theirs
        assert labels == ref_labels, f"{name}: labels {labels[:6]} != {ref_labels[:6]}"
    assert_close(ours, theirs.detach().numpy(), name)


def single_token_word(tokenizer):
    for i in range(20, 200):
        s = tokenizer.decode([i])
        if len(tokenizer(s, add_special_tokens=False)["input_ids"]) == 1:
            return s
    raise AssertionError("no single-token word")


BATCHLESS = ("decompose", "full ln", "heads ln remainder", "accumulated ln")


def run_fast(fn, *args):
    """fn(*args) as one compiled program, built without LLVM optimisation: these programs run once,
    so compile time is what matters (the float semantics are the same)."""
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})(*args)


def ours_all(cache, table):
    """Every analysis of `table` (and the batchless ones) traced into one compiled program: one
    compile per model instead of one per method, and every Slice index is a traced leaf, as under a
    user's jit. (The methods' own compiled paths are tested below: reuse, traced slices, properties.)"""
    labels = {}

    def body(c):
        outs = {}
        one = c.apply_slice_to_batch_dim(1)
        items = [(n, fn, c) for n, fn in table] + [(f"batchless {n}", fn, one) for n, fn in table if n in BATCHLESS]
        for name, fn, cc in items:
            r = fn(cc, _n)
            if isinstance(r, tuple):
                r, labels[name] = r
            outs[name] = r
        outs["batchless logit_attrs"] = one.logit_attrs(one.decompose_resid(), 5, has_batch_dim=False)
        outs["head results"] = {k: v for k, v in c.compute_head_results().items() if k.endswith("hook_result")}
        return outs

    outs = run_fast(body, cache)
    return {k: (v, labels[k]) if k in labels else v for k, v in outs.items()}


# Processed weights change only the numbers the analyses read (and LN -> LNPre); one variant per method.
PROCESSED_SUBSET = ("accumulated ln", "accumulated mid ln", "decompose attn mlp_input ln", "full ln", "full mlp_input",
                    "heads ln remainder", "neurons", "neuron results", "apply_ln_to_stack", "logit_attrs str",
                    "logit_attrs batch diff", "stack_activation scale")


def test_analyses_match_transformer_lens(pair):
    family, ref, table, ours = pair.family, pair.ref, pair.table, pair.ours
    ref_one = ref.apply_slice_to_batch_dim(1)
    for name, fn in table:
        compare(ours[name], fn(ref, _t), f"{family} {name}")
        if name in BATCHLESS:
            compare(ours[f"batchless {name}"], fn(ref_one, _t), f"{family} batchless {name}")
    compare(ours["batchless logit_attrs"], ref_one.logit_attrs(ref_one.decompose_resid(), 5, has_batch_dim=False),
            "batchless logit_attrs")


def test_hooks_logits_and_head_results_match(pair, hf_model):
    family, cache, ref, logits = pair.family, pair.cache, pair.ref, pair.logits
    ref.compute_head_results()
    with_results = cache.compute_head_results()
    for l in range(pair.model.cfg.n_layers):
        k = f"blocks.{l}.attn.hook_result"
        assert k in with_results and k not in cache  # immutable: compute_head_results returned a new cache
        assert_close(pair.ours["head results"][k], ref[k].detach().numpy(), k)
    # every hook TransformerLens has in this mode agrees (processed weights included), and the logits
    shared = [k for k in ref.keys() if k in cache]
    assert len(shared) >= 20
    for k in shared:
        assert_close(cache[k], ref[k].detach().numpy(), f"{family} {k}")
    assert_close(logits, pair.ref_logits, f"{family} logits")
    assert_close(cache.weights["W_U"], pair.bridge.W_U.detach().numpy(), "W_U")
    # against HF: log-probs are unchanged; processed logits move by a constant per position
    with torch.no_grad():
        hf = hf_model[1](input_ids=torch.tensor(TOKS, dtype=torch.long)).logits.numpy()
    assert_close(jax.nn.log_softmax(logits), torch.log_softmax(torch.tensor(hf), -1).numpy(), "log-probs vs HF")
    shift = logits - hf
    assert_close(shift, np.broadcast_to(shift.mean(-1, keepdims=True), shift.shape), "constant shift", atol=3e-5)


PADDED_CALLS = [
    ("accumulated ln", lambda c, T: c.accumulated_resid(apply_ln=True)),
    ("full mlp_input ln", lambda c, T: c.get_full_resid_decomposition(layer=1, mlp_input=True, apply_ln=True)),
    ("full mlp_input ln heads only", lambda c, T: c.get_full_resid_decomposition(layer=1, mlp_input=True, apply_ln=True,
                                                                                 expand_neurons=False)),
    ("logit_attrs", lambda c, T: c.logit_attrs(c.decompose_resid(), T([3, 5, 7]), T([9, 11, 13]))),
]


def test_mid_layer_norm_of_a_post_norm_model_is_an_error(hf_root):
    """OLMo 2 has no norm before its sublayers: TransformerLens 4.3 and jaxlens both refuse a
    mid-layer cached-scale norm, with a message that names the missing norm and the fix."""
    from conftest import built

    path = built("olmo2", hf_root)[0]
    _, cache = jaxlens.from_pretrained_no_processing(path).run_with_cache(TOKS[:1])
    bridge = boot_bridge(path, processed=False)
    with torch.no_grad():
        _, ref = bridge.run_with_cache(torch.tensor(TOKS[:1], dtype=torch.long))
    for c in (cache, ref):
        with pytest.raises(KeyError, match="has no ln2"):
            c.decompose_resid(layer=1, mlp_input=True, apply_ln=True)
        with pytest.raises(KeyError, match="has no ln1"):
            c.stack_head_results(layer=1, apply_ln=True)
    assert_close(cache.accumulated_resid(apply_ln=True), ref.accumulated_resid(apply_ln=True).detach().numpy(),
                 "final ln")


def test_padded_batches(family, hf_model, jl_model):
    """Left- and right-padded batches give, at every real token, the numbers of the prompt alone.

    TransformerLens's bridge does not take positions from the mask, so it cannot run a left-padded
    batch faithfully: we compare ours-left-padded with ours-right-padded, and ours-right-padded with
    TransformerLens on the same right-padded tokens without a mask (causal attention keeps real
    positions independent of the padding after them; the foundation tests show padded rows equal
    the prompt run alone).
    """
    path, _ = hf_model
    lt, lm = padded("left")
    rt, rm = padded("right")
    _, left = jl_model.run_with_cache(lt, attention_mask=lm)
    _, right = jl_model.run_with_cache(rt, attention_mask=rm)
    bridge = boot_bridge(path, processed=False)
    with torch.no_grad():
        _, ref = bridge.run_with_cache(torch.tensor(rt, dtype=torch.long))
    n = lt.shape[1]
    table = [(n, fn) for n, fn in PADDED_CALLS if not (family in POST_NORM_ONLY and "mlp_input" in n)
             and not (family in MOE_FAMILIES and n == "full mlp_input ln")]  # experts: no neuron basis
    ours = run_fast(lambda l, r: [(fn(l, _n), fn(r, _n)) for _, fn in table], left, right)
    for (name, fn), (a, b) in zip(table, ours):
        r = fn(ref, _t).detach().numpy()
        a, b = np.asarray(a), np.asarray(b)
        for i, p in enumerate(PROMPTS):
            real = slice(0, len(p))
            assert_close(a[:, i, n - len(p):], b[:, i, real], f"{family} {name} left vs right row {i}")
            assert_close(b[:, i, real], r[:, i, real], f"{family} {name} right vs TL row {i}")


# ---------------------------------------------------------------------------------------------
# Properties over random small configs (no torch)
# ---------------------------------------------------------------------------------------------


# Each example compiles a model: no shrinking (minutes per step); a failure prints its config.
MODEL_PHASES = (Phase.explicit, Phase.reuse, Phase.generate)


@st.composite
def small_configs(draw, max_layers: int = 3):
    gated = draw(st.booleans())
    heads = draw(st.sampled_from([2, 4]))
    d_head = draw(st.sampled_from([4, 8]))
    rotary = draw(st.booleans())
    return jaxlens.ModelConfig(
        model_type="random", d_model=draw(st.sampled_from([8, 16])), n_layers=draw(st.integers(1, max_layers)),
        n_heads=heads, d_head=d_head, d_mlp=draw(st.sampled_from([8, 12])), d_vocab=50, n_ctx=16,
        n_kv_heads=draw(st.sampled_from([None, heads // 2])),
        act_fn="silu" if gated else "gelu_new", normalization_type=draw(st.sampled_from(["LN", "RMS"])),
        positional_embedding_type="rotary" if rotary else "standard", rotary_dim=d_head if rotary else None,
        parallel_attn_mlp=draw(st.booleans()), gated_mlp=gated, use_qkv_bias=draw(st.booleans()),
        use_o_bias=draw(st.booleans()), use_mlp_bias=draw(st.booleans()),
        tie_word_embeddings=draw(st.booleans()))


def random_params(cfg, seed):
    """Parameters with every entry random (norm gains and biases too), so no term is trivially zero.
    (numpy draws: jax.random would compile a threefry kernel per parameter shape.)"""
    from jaxlens.hooks import RunCtx
    from jaxlens.model import Transformer

    toks = jnp.zeros((1, 4), jnp.int32)
    shapes = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.PRNGKey(0), toks, jnp.ones_like(toks),
                                                          RunCtx())["params"])
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(0.0, 0.3, s.shape).astype(np.float32) + (1.0 if s.ndim == 1 else 0.0),
                        shapes)


def decomposition_errors(cfg, params, toks):
    """{check: max |sum of the stack - what it decomposes|} for every layer, traced as one program."""
    from jaxlens.model.forward import forward

    _, acts, _ = forward(params, cfg, toks, capture=jaxlens.resolve_names(None, cfg))
    model = jaxlens.HookedTransformer(cfg, params, None)
    c = ActivationCache(acts, cfg, True, model.cache_weights())
    err = {}

    def check(name, a, b):
        err[name] = jnp.max(jnp.abs(a - b))

    for L in range(cfg.n_layers + 1):
        target = c["resid_pre", L] if L < cfg.n_layers else c["resid_post", cfg.n_layers - 1]
        check(f"decompose L={L}", c.decompose_resid(layer=L).sum(0), target)
        for expand in (True, False):
            check(f"full L={L} expand={expand}", c.get_full_resid_decomposition(layer=L, expand_neurons=expand).sum(0),
                  target)
        if L == cfg.n_layers:
            continue
        mid = c["resid_pre", L] + c["attn_out", L]  # the MLP's input (resid_mid when sequential)
        if not cfg.parallel_attn_mlp:
            check(f"resid_mid L={L}", mid, c["resid_mid", L])
        check(f"decompose mlp_input L={L}", c.decompose_resid(layer=L, mlp_input=True).sum(0), mid)
        for expand in (True, False):
            check(f"full mlp_input L={L} expand={expand}",
                  c.get_full_resid_decomposition(layer=L, mlp_input=True, expand_neurons=expand).sum(0), mid)
        heads = c.stack_head_results(layer=L + 1)[L * cfg.n_heads:]
        check(f"heads + b_O L={L}", heads.sum(0) + c.weights["b_O"][L], c["attn_out", L])
        check(f"neurons + b_out L={L}", c.get_neuron_results(L).sum(-2) + c.weights["b_out"][L], c["mlp_out", L])
    final = c["resid_post", cfg.n_layers - 1]
    check("head remainder", c.stack_head_results(incl_remainder=True).sum(0), final)
    check("neuron remainder", c.stack_neuron_results(cfg.n_layers, incl_remainder=True).sum(0), final)
    return err


@settings(max_examples=5, deadline=None, phases=MODEL_PHASES)
@given(cfg=small_configs(max_layers=2), seed=st.integers(0, 1000))
def test_decompositions_sum_to_the_residual(cfg, seed):
    toks = np.random.default_rng(seed).integers(0, cfg.d_vocab, (2, 5)).astype(np.int32)
    errs = run_fast(partial(decomposition_errors, cfg), random_params(cfg, seed), toks)
    # sums of a few dozen float32 terms of size ~1
    bad = {k: float(v) for k, v in errs.items() if not float(v) < 1e-4}
    assert not bad, f"decompositions do not sum to the residual: {bad}"


# ---------------------------------------------------------------------------------------------
# Pytree behaviour, compiled reuse
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_cache(hf_root):
    model = jaxlens.from_pretrained(built("gpt2", hf_root)[0])
    return model, model.run_with_cache(TOKS)[1]


def test_pytree_jit_vmap_grad_sharding(gpt2_cache):
    model, c = gpt2_cache
    want = c.decompose_resid(apply_ln=True, pos_slice=-1)
    # jit in and out; methods inside jit; a batchless cache too
    out, inside = run_fast(lambda cc: (cc, cc.decompose_resid(apply_ln=True, pos_slice=-1)), c)
    assert isinstance(out, ActivationCache) and list(out.keys()) == list(c.keys())
    assert out.tokenizer is c.tokenizer and out.cfg == c.cfg and out.weights.keys() == c.weights.keys()
    assert_close(inside, want, "in jit")
    one = c.apply_slice_to_batch_dim(0)
    assert jax.tree.structure(run_fast(lambda cc: cc, one)) == jax.tree.structure(one)
    # tree.map gives a cache
    doubled = jax.tree.map(lambda x: 2 * x, c)
    assert isinstance(doubled, ActivationCache)
    assert_close(doubled["resid_pre", 1], 2 * np.asarray(c["resid_pre", 1]), "tree.map")
    # vmap over the batch (weights unmapped), and over a stack of caches
    per_row = run_fast(jax.vmap(lambda cc: cc.decompose_resid(apply_ln=True, pos_slice=-1),
                                in_axes=(c.batch_axes(),), out_axes=1), c)
    assert_close(per_row, want, "vmap batch")
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), c, doubled)
    two = run_fast(jax.vmap(lambda cc: cc.decompose_resid(layer=1)), stacked)
    assert_close(two[1], 2 * np.asarray(c.decompose_resid(layer=1)), "vmap stack")
    # remove_batch_dim on a batch of one is the int batch slice
    single = c.apply_slice_to_batch_dim([1]).remove_batch_dim()
    assert not single.has_batch_dim
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), single, c.apply_slice_to_batch_dim(1))
    # device_put with shardings: activations split over the batch on 3 devices, weights replicated
    n_dev = 3 if len(jax.devices()) >= 3 else 1  # conftest asks for 8 host devices
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:n_dev]), ("batch",))
    by_batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    put = c.to(c.spec(by_batch, replicated))
    assert put["resid_pre", 0].sharding == by_batch and isinstance(put, ActivationCache)
    assert len(put["resid_pre", 0].addressable_shards) == n_dev
    assert_close(put.decompose_resid(apply_ln=True, pos_slice=-1), want, "sharded analysis")
    # grad of a scalar: d(sum of DLA)/d(cache) is a cache; DLA is linear in attn_out
    g = run_fast(jax.grad(lambda cc: cc.logit_attrs(cc.decompose_resid(pos_slice=-1), 5, pos_slice=-1).sum()), c)
    assert isinstance(g, ActivationCache)
    scale = np.asarray(c["ln_final.hook_scale"])[:, -1]
    direction = np.asarray(c.weights["W_U"])[:, 5]
    expect = (direction - direction.mean()) / scale  # LN centres, then divides by the cached scale
    assert_close(np.asarray(g["attn_out", 0])[:, -1], expect, "grad")
    assert float(np.abs(np.asarray(g["attn_out", 0])[:, :-1]).max()) == 0.0
    # pickling keeps activations, weights, config
    back = pickle.loads(pickle.dumps(c))
    assert back.cfg == c.cfg and back.weights.keys() == c.weights.keys()
    assert_close(back.decompose_resid(apply_ln=True, pos_slice=-1), want, "pickle")


def test_compiled_programs_are_reused(gpt2_cache):
    _, c = gpt2_cache
    c.decompose_resid(apply_ln=True, pos_slice=3)
    n = A.decompose_resid_jit._cache_size()
    for p in (0, 5, -1, np.int64(2)):  # int positions are traced leaves: same program
        c.decompose_resid(apply_ln=True, pos_slice=p)
    c.get_full_resid_decomposition(pos_slice=[1, 2])
    m = A.get_full_resid_decomposition_jit._cache_size()
    c.get_full_resid_decomposition(pos_slice=[7, 0])  # same index count: same program
    assert A.decompose_resid_jit._cache_size() == n
    assert A.get_full_resid_decomposition_jit._cache_size() == m
    # results differ with the index, so the index really is an input
    a, b = c.decompose_resid(pos_slice=0), c.decompose_resid(pos_slice=5)
    assert_close(a, np.asarray(c.decompose_resid())[:, :, 0], "pos 0")
    assert_close(b, np.asarray(c.decompose_resid())[:, :, 5], "pos 5")


def test_traced_slices_inside_jit(gpt2_cache):
    _, c = gpt2_cache

    @jax.jit
    def at(cc, pos, idx):
        return cc.decompose_resid(pos_slice=pos), cc.stack_neuron_results(1, neuron_slice=idx, pos_slice=pos)

    full = np.asarray(c.decompose_resid())
    a, n = at(c, jnp.int32(-2), jnp.array([3, 1]))
    assert_close(a, full[:, :, -2], "traced int")
    assert_close(n, np.asarray(c.stack_neuron_results(1, neuron_slice=[3, 1], pos_slice=-2)), "traced array")


def test_slice_semantics():
    x = np.arange(24).reshape(2, 3, 4)
    assert (Slice(1).apply(x, -2) == x[:, 1]).all()
    assert (Slice((1, 3)).apply(x, -1) == x[..., 1:3]).all()
    assert (Slice((0, 4, 2)).apply(x, 2) == x[..., 0:4:2]).all()
    assert (Slice([2, 0]).apply(x, 1) == x[:, [2, 0]]).all()
    assert (Slice(np.array([True, False, True])).apply(x, 1) == x[:, [0, 2]]).all()
    assert (Slice(jnp.array([1])).apply(x, 0) == x[[1]]).all()
    assert Slice(None).apply(x, 0) is x
    assert Slice(np.int64(2)).mode == "int" and Slice(jnp.int32(2)).mode == "int"
    assert list(Slice((1, 5)).indices(10)) == [1, 2, 3, 4] and list(Slice(-1).indices()) == [-1]
    assert Slice.unwrap(3).mode == "array" and Slice.unwrap(Slice(3)).mode == "int"
    # a pytree: the mode is static, indices are leaves
    assert jax.tree.leaves(Slice([1, 2]))[0].tolist() == [1, 2] and jax.tree.leaves(Slice((1, 2))) == []
    with pytest.raises(ValueError, match="invalid slice"):
        Slice("last")
    with pytest.raises(ValueError, match="1-D"):
        Slice(np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="integers or booleans"):
        Slice([0.5])
    with pytest.raises(ValueError, match="out of range"):
        Slice([0, 7]).check(5, "pos_slice")
    with pytest.raises(ValueError, match="boolean mask of length 3"):
        Slice([True, False, True]).check(5, "pos_slice")


def test_bad_arguments_raise_clear_errors(gpt2_cache):
    model, c = gpt2_cache
    n = model.cfg.n_layers
    stack = c.decompose_resid()
    with pytest.raises(ValueError, match=r"layer=7 must be an int in \[0, 2\]"):
        c.decompose_resid(layer=7)
    with pytest.raises(ValueError, match="mode='heads'"):
        c.decompose_resid(mode="heads")
    with pytest.raises(ValueError, match="mlp_input=True needs layer < n_layers"):
        c.get_full_resid_decomposition(layer=n, mlp_input=True)
    with pytest.raises(ValueError, match="pos_slice index 10 is out of range"):
        c.decompose_resid(pos_slice=10)
    with pytest.raises(ValueError, match="neuron_slice index"):
        c.stack_neuron_results(1, neuron_slice=[500])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        c.logit_attrs(stack, model.cfg.d_vocab)
    with pytest.raises(ValueError, match="same shape"):
        c.logit_attrs(stack, np.array([1, 2]), 3)
    with pytest.raises(ValueError, match="not one"):
        c.logit_attrs(stack, "The quick brown fox")
    with pytest.raises(ValueError, match="no tokenizer"):
        ActivationCache(c.to_dict(), c.cfg, True, c.weights).logit_attrs(stack, "x")
    with pytest.raises(ValueError, match="integer token ids"):
        c.logit_attrs(stack, np.array([1.5]))
    with pytest.raises(ValueError, match="last axis must be d_model"):
        c.logit_attrs(stack[..., :3], 1)
    attn_only = ActivationCache({k: v for k, v in c.items() if "attn_out" in k}, c.cfg, True, c.weights)
    with pytest.raises(ValueError, match="hook_resid_pre'.*names_filter"):
        attn_only.accumulated_resid()
    with pytest.raises(ValueError, match="needs the weights"):
        ActivationCache(c.to_dict(), c.cfg).stack_head_results()
    with pytest.raises(ValueError, match="needs the model config"):
        ActivationCache(c.to_dict()).decompose_resid()
    with pytest.raises(ValueError, match="no batch dimension"):
        c.apply_slice_to_batch_dim(0).apply_slice_to_batch_dim(0)
    with pytest.raises(ValueError, match="batch_slice index 5"):
        c.apply_slice_to_batch_dim(5)
    with pytest.raises(ValueError, match="layer=0 selects no layers"):
        c.stack_activation("pattern", 0)


def test_parallel_block_has_no_resid_mid(hf_root):
    _, c = jaxlens.from_pretrained(built("gpt_neox", hf_root)[0]).run_with_cache(TOKS)
    with pytest.raises(ValueError, match="parallel attention and MLP: there is no resid_mid"):
        c.accumulated_resid(incl_mid=True)
