"""Hook names have one source of truth: the names the model sows.

`jaxlens.hook_names(cfg)` is read off an abstract capture-all trace of the model. Here, for
every HF family and for random configs, it must equal what real runs return: a jitted
`forward` with capture `EVERY_HOOK` (names in the order the model sows them, as the trace
sees them), `run_with_cache(names_filter=None)` plus the opt-in `hook_result`, and the same
set from a scanned (`scan_layers=True`) model. A short written-out spec of TransformerLens's
names checks that the model sows what users expect, independently of the model's code.
"""

from __future__ import annotations

import itertools
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlens
from jaxlens.model.forward import forward, stack_layers
from jaxlens.hooks import EVERY_HOOK, RunCtx, _sown_names, block_hook_templates, hook_names
from jaxlens.model import Transformer

TOKS = np.array([[1, 5, 2, 7, 3], [4, 4, 0, 1, 2]], np.int32)
RESULT = "attn.hook_result"
FORKS = ("hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input")
OPT_IN = (RESULT, "hook_mlp_in", *FORKS)  # TransformerLens's opt-in hooks (use_attn_result, use_hook_mlp_in, ...)


MOE = ["mlp.hook_pre", "mlp.gate.hook_out", "mlp.hook_expert_weights", "mlp.hook_expert_indices",
       "mlp.hook_expert_outputs", "mlp.hook_post"]


def spec_names(cfg: jaxlens.ModelConfig) -> list[str]:
    """TransformerLens's hook names for this config, in forward order, written out by hand
    (the docs' list in ARCHITECTURE.md, and TransformerLens 4.3's bridge for q/k norms and
    post-norms): the model must sow exactly these."""
    qk = [f"attn.{x}" for w in "qk" for x in (f"{w}_norm.hook_scale", f"{w}_norm.hook_normalized", f"hook_{w}_normed")]
    attn = (["attn.hook_q", "attn.hook_k", "attn.hook_v"] + (qk if cfg.use_qk_norm else [])
            + (["attn.hook_rot_q", "attn.hook_rot_k"] if not cfg.has_pos_embed else [])
            + [f"attn.hook_{a}" for a in ("attn_scores", "pattern", "z", "result")])
    pre, post = cfg.norm_placement != "post", cfg.norm_placement != "pre"

    def norm(name, on):
        return [f"{name}.hook_scale", f"{name}.hook_normalized"] if on else []

    block = (["hook_resid_pre"] + norm("ln1", pre) + list(FORKS) + attn + norm("ln1_post", post)
             + ["hook_attn_out"] + ([] if cfg.parallel_attn_mlp else ["hook_resid_mid"]) + ["hook_mlp_in"]
             + norm("ln2", pre) + (MOE if cfg.num_experts else ["mlp.hook_pre"]
                                   + (["mlp.hook_pre_linear"] if cfg.gated_mlp else []) + ["mlp.hook_post"])
             + norm("ln2_post", post)
             + ["hook_mlp_out", "hook_resid_post"])
    return (["hook_embed"] + (["hook_pos_embed"] if cfg.has_pos_embed else [])
            + [f"blocks.{l}.{n}" for l in range(cfg.n_layers) for n in block]
            + ["ln_final.hook_scale", "ln_final.hook_normalized"])


def sown_by_run(params, cfg) -> tuple[list[str], set[str]]:
    """(names in the order a capture-all `forward` of these params sows them, names it returns).

    Traced abstractly: the names are static, so running it would add nothing."""
    order: list[list[str]] = []

    def run(p, t):
        _, acts, _ = forward(p, cfg, t, capture=EVERY_HOOK)
        order.append(list(acts))  # the dict as the model filled it
        return acts

    out = jax.eval_shape(run, params, jnp.asarray(TOKS))  # (a traced function's dict comes back key-sorted)
    return order[0], set(out)


def check_model(model: jaxlens.HookedTransformer, scanned: jaxlens.HookedTransformer) -> None:
    cfg = model.cfg
    names = hook_names(cfg)
    assert len(names) == len(set(names)), "a hook name is listed twice"
    order, returned = sown_by_run(model.params, cfg)
    assert order == names, "hook_names is not the list of names a capture-all run sows, in forward order"
    assert returned == set(names)

    _, cache = model.run_with_cache(TOKS, names_filter=None)
    results = [n for n in names if n.endswith(OPT_IN)]
    assert len(results) == len(OPT_IN) * cfg.n_layers
    assert set(cache.keys()) == set(names) - set(results), "names_filter=None must give every hook but the opt-in ones"
    assert hook_names(cfg, include_result=False) == [n for n in names if n not in results]
    _, with_result = model.run_with_cache(TOKS, names_filter=results)
    assert set(with_result.keys()) == set(results)
    assert set(cache.keys()) | set(with_result.keys()) == set(names)

    # scanned: the same names (nn.scan hands its sown values back key-sorted, so only the set)
    assert scanned.scan_layers and scanned.cfg == cfg
    _, returned_scanned = sown_by_run(scanned.params, cfg)
    assert returned_scanned == set(names)
    _, cache_scanned = scanned.run_with_cache(TOKS, names_filter=None)
    assert set(cache_scanned.keys()) == set(cache.keys())


# --- every family --------------------------------------------------------------------------------

def test_family_hook_names(hf_model):
    path, _ = hf_model
    model = jaxlens.from_pretrained_no_processing(path)
    check_model(model, jaxlens.from_pretrained_no_processing(path, scan_layers=True))
    assert hook_names(model.cfg) == spec_names(model.cfg)
    # TransformerLens's weight processing (LN -> LNPre, ...) changes no name
    assert hook_names(jaxlens.from_pretrained(path).cfg) == hook_names(model.cfg)


# --- random configs ------------------------------------------------------------------------------

def random_config(seed: int, **fields) -> jaxlens.ModelConfig:
    """A small random config; `fields` fix any of them (the architectural switches included)."""
    rng = np.random.default_rng(seed)
    pick = lambda *xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    heads, d_head = pick(2, 4), pick(4, 8)
    f = dict(positional_embedding_type=pick("standard", "rotary"), parallel_attn_mlp=pick(False, True),
             gated_mlp=pick(False, True), normalization_type=pick("LN", "RMS", "LNPre", "RMSPre"),
             d_model=pick(8, 16), n_layers=pick(1, 2, 3), n_heads=heads, d_head=d_head, d_mlp=pick(8, 12),
             n_kv_heads=pick(None, heads // 2), use_qkv_bias=pick(False, True), use_o_bias=pick(False, True),
             use_mlp_bias=pick(False, True), tie_word_embeddings=pick(False, True), sliding_window=pick(None, 3))
    f.update(norm_placement=pick("pre", "pre_post", "post"), use_qk_norm=pick(False, True), qk_norm_scope=pick("head", "all"), attn_scores_soft_cap=pick(None, 2.0),
             output_logits_soft_cap=pick(None, 5.0))
    f.update(fields)
    if f["parallel_attn_mlp"]:
        f["norm_placement"] = "pre"  # parallel blocks have pre-norms only
    if f["sliding_window"] is not None and f.get("attn_types") is None:
        f["attn_types"] = tuple(pick("local", "global") for _ in range(f["n_layers"]))
    f["act_fn"] = "silu" if f["gated_mlp"] else pick("gelu_new", "relu")
    f["rotary_dim"] = pick(d_head, d_head // 2) if f["positional_embedding_type"] == "rotary" else None
    return jaxlens.ModelConfig(model_type="random", d_vocab=50, n_ctx=16, **f)


def random_params(cfg: jaxlens.ModelConfig, seed: int):
    toks = jnp.zeros((1, 2), jnp.int32)
    shapes = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.PRNGKey(0), toks, jnp.ones_like(toks),
                                                          RunCtx())["params"])
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.3, s.shape).astype(np.float32)), shapes)


RUN = [("rotary", True, False, "LN"), ("rotary", False, True, "RMS"), ("standard", True, True, "LNPre"),
       ("standard", False, False, "RMSPre")]  # each switch both ways; the rest of the config random


@pytest.mark.parametrize("seed", range(len(RUN)))
def test_random_config_hook_names(seed):
    pos, parallel, gated, norm = RUN[seed]
    cfg = random_config(seed, positional_embedding_type=pos, parallel_attn_mlp=parallel, gated_mlp=gated,
                        normalization_type=norm, n_layers=2 + seed % 2)
    params = random_params(cfg, seed)
    model = jaxlens.HookedTransformer(cfg, params, None)
    check_model(model, jaxlens.HookedTransformer(cfg, stack_layers(params, cfg.n_layers), None))
    assert hook_names(cfg) == spec_names(cfg)


SWITCHES = list(itertools.product(["standard", "rotary"], [False, True], [False, True], ["LN", "RMS", "LNPre", "RMSPre"]))


@pytest.mark.parametrize("i", range(len(SWITCHES)))
def test_every_switch_combination_sows_the_spec(i):
    """Abstract only (no run): the derived names follow TransformerLens's for each combination."""
    pos, parallel, gated, norm = SWITCHES[i]
    cfg = random_config(100 + i, positional_embedding_type=pos, parallel_attn_mlp=parallel, gated_mlp=gated,
                        normalization_type=norm)
    names = hook_names(cfg)
    assert names == spec_names(cfg)
    templates = block_hook_templates(cfg)
    assert [t.format(l=l) for l in range(cfg.n_layers) for t in templates] == [n for n in names if n.startswith("blocks.")]
    assert block_hook_templates(cfg, include_result=False) == [t for t in templates if not t.endswith(OPT_IN)]
    assert all(re.fullmatch(r"blocks\.\{l\}\.[a-z0-9_.]+", t) for t in templates)


# --- the cache -----------------------------------------------------------------------------------

def test_names_are_traced_once_per_config_and_returned_fresh():
    cfg = random_config(7, n_layers=2)
    _sown_names.cache_clear()
    t0 = time.perf_counter()
    first = hook_names(cfg)
    t1 = time.perf_counter()
    again = hook_names(cfg.replace(dtype="bfloat16"))  # a runtime field: the same architecture, the same entry
    t2 = time.perf_counter()
    assert again == first and _sown_names.cache_info().hits == 1 and _sown_names.cache_info().misses == 1
    assert t2 - t1 < t1 - t0
    first.append("not a hook")  # the caller's list is its own
    assert "not a hook" not in hook_names(cfg)
    assert hook_names(cfg.replace(n_layers=3)) != again


def test_every_hook_is_never_mistaken_for_a_name_set():
    """As a static `capture` argument it must key its own compiled programs."""
    assert EVERY_HOOK != frozenset() and frozenset() != EVERY_HOOK and EVERY_HOOK == EVERY_HOOK
    assert hash(EVERY_HOOK) != hash(frozenset())
    assert "anything" in EVERY_HOOK and bool(EVERY_HOOK)
    import copy
    import pickle

    assert pickle.loads(pickle.dumps(EVERY_HOOK)) is EVERY_HOOK and copy.deepcopy(EVERY_HOOK) is EVERY_HOOK


def test_run_with_cache_keys_are_in_forward_order():
    import jaxlens
    from jaxlens.assets import model_dir

    m = jaxlens.from_pretrained(model_dir())
    _, cache = m.run_with_cache("a b c")
    names = [n for n in jaxlens.hook_names(m.cfg) if not n.endswith(OPT_IN)]
    assert list(cache.keys()) == names


def test_opt_in_switches():
    """TransformerLens's switches decide what a names_filter of None, a regex or a callable sees;
    an opt-in hook named explicitly is captured or edited whatever they say."""
    import jaxlens
    from jaxlens.assets import model_dir

    m = jaxlens.from_pretrained(model_dir())
    every = jaxlens.hook_names(m.cfg)
    result, mlp_in = [n for n in every if n.endswith(RESULT)], [n for n in every if n.endswith("hook_mlp_in")]
    plain = set(m.run_with_cache("a b c")[1].keys())
    assert not plain & set(result + mlp_in)
    assert not set(m.run_with_cache("a b c", names_filter=lambda n: True)[1].keys()) & set(result + mlp_in)
    with pytest.raises(ValueError, match="matches no hook"):
        m.run_with_cache("a b c", names_filter=re.compile("hook_mlp_in"))
    assert set(m.run_with_cache("a b c", names_filter=mlp_in)[1].keys()) == set(mlp_in)  # named: always
    base = m.cfg
    m.set_use_attn_result(True)
    assert set(m.run_with_cache("a b c")[1].keys()) == plain | set(result)
    m.set_use_hook_mlp_in(True)
    _, cache = m.run_with_cache("a b c")
    shown = [n for n in every if not n.endswith(FORKS)]
    assert list(cache.keys()) == shown
    assert set(m.run_with_cache("a b c", names_filter=re.compile("hook_mlp_in"))[1].keys()) == set(mlp_in)
    np.testing.assert_array_equal(cache[mlp_in[1]], cache["blocks.1.hook_resid_mid"])
    assert "use_attn_result" not in m.cfg.to_dict()  # a runtime switch: not saved with the architecture
    m.set_use_attn_result(False)
    m.set_use_hook_mlp_in(False)
    assert m.cfg == base and set(m.run_with_cache("a b c")[1].keys()) == plain
    m.set_use_split_qkv_input(True)
    forks = [n for n in every if n.endswith(("hook_q_input", "hook_k_input", "hook_v_input"))]
    assert set(m.run_with_cache("a b c")[1].keys()) == plain | set(forks)
    with pytest.raises(ValueError, match="use_split_qkv_input and use_attn_in are exclusive"):
        m.set_use_attn_in(True)
    m.set_use_split_qkv_input(False)
    m.set_use_attn_in(True)
    assert set(m.run_with_cache("a b c")[1].keys()) == plain | {n for n in every if n.endswith("hook_attn_in")}
    m.set_use_attn_in(False)
    with pytest.raises(ValueError, match="hook_attn_in cannot be edited in a run that also reads hook_q_input"):
        m.run_with_cache("a b c", names_filter=["blocks.0.hook_q_input"],
                         fwd_hooks=[("blocks.0.hook_attn_in", lambda x, hook: x * 2)])
    with pytest.raises(TypeError, match="takes True or False"):
        m.set_use_attn_result("yes")
