"""Combining caches across batches (strategies, cat, deferred combination, info, metadata, memory,
`+` / update) and streaming statistics (Welford mean/variance, attention-pattern blocks over token
groups), against literal ports of easyroutine 1.1.5's aggregation code."""

from __future__ import annotations

import pickle
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxlens
from conftest import assert_close, built
from jaxlens.cache import aggregate as agg
from jaxlens.cache.activation_cache import ActivationCache
from test_cache_analysis import MODEL_PHASES, random_params, run_fast, small_configs


def synthetic(seed: int, batch: int = 2, pos: int = 4) -> ActivationCache:
    rng = np.random.default_rng(seed)
    acts = {f"blocks.{l}.hook_resid_pre": rng.normal(size=(batch, pos, 3)).astype(np.float32) for l in range(2)}
    acts["blocks.0.attn.hook_pattern"] = rng.random((batch, 2, pos, pos)).astype(np.float32)
    acts["offset"] = np.float32(seed)
    acts["scale"] = np.float32(seed)
    acts["tokens"] = rng.integers(0, 9, (batch, pos)).astype(np.int32)
    return ActivationCache(acts, weights={"W_U": np.ones((3, 5), np.float32)})


# ---------------------------------------------------------------------------------------------
# cat / combine on real caches
# ---------------------------------------------------------------------------------------------


def halves_errors(cfg, params, toks, split):
    """max |cat(cache(first rows), cache(last rows)) - cache(all rows)| per key (and for an analysis
    of the combined cache), traced as one program."""
    from jaxlens.model.forward import forward

    capture = jaxlens.resolve_names(None, cfg)
    weights = jaxlens.HookedTransformer(cfg, params, None).cache_weights()

    def cache_of(t):
        return ActivationCache(forward(params, cfg, t, capture=capture)[1], cfg, True, weights)

    whole, joined = cache_of(toks), agg.cat(cache_of(toks[:split]), cache_of(toks[split:]))
    assert list(joined.keys()) == list(whole.keys()) and joined.n_batches == 2
    # masked attention scores are -inf on both sides: equal entries count as no difference
    errs = {k: jnp.max(jnp.where(joined[k] == whole[k], 0.0, jnp.abs(joined[k] - whole[k]))) for k in whole.keys()}
    errs["full decomposition"] = jnp.max(jnp.abs(joined.get_full_resid_decomposition(apply_ln=True)
                                                 - whole.get_full_resid_decomposition(apply_ln=True)))
    return errs


@settings(max_examples=3, deadline=None, phases=MODEL_PHASES)
@given(cfg=small_configs(max_layers=2), seed=st.integers(0, 1000), batch=st.integers(2, 4), data=st.data())
def test_cat_of_halves_equals_the_whole_batch(cfg, seed, batch, data):
    split = data.draw(st.integers(1, batch - 1))
    toks = np.random.default_rng(seed).integers(0, cfg.d_vocab, (batch, 5)).astype(np.int32)
    errs = run_fast(partial(halves_errors, cfg, split=split), random_params(cfg, seed), toks)
    bad = {k: float(v) for k, v in errs.items() if not float(v) < 1e-5}
    assert not bad, f"cat of the halves differs from the whole batch: {bad}"


def test_combine_many_equals_pairwise_chain_and_deferred():
    parts = [synthetic(i, batch=1 + i % 2) for i in range(5)]
    chain = parts[0]
    for p in parts[1:]:
        chain = chain.cat(p)
    d = agg.Deferred()
    for p in parts:
        d.add(p)
    assert len(d) == 5
    one_shot = agg.combine(parts)
    for combined in (chain, d.result()):
        assert combined.n_batches == 5 and list(combined.keys()) == list(one_shot.keys())
        for k in one_shot.keys():
            assert_close(combined[k], one_shot[k], k, rtol=0, atol=0)
    for k in ("blocks.0.hook_resid_pre", "tokens"):
        assert_close(one_shot[k], np.concatenate([p[k] for p in parts]), k, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------


def test_default_strategy_concat_then_stack_then_list():
    a, b, c = synthetic(0), synthetic(1, batch=3), synthetic(2)
    ab = a.cat(b)
    assert ab["blocks.0.hook_resid_pre"].shape == (5, 4, 3)  # concatenated along the batch
    assert ab["scale"].shape == (2,)  # 0-d: stacked
    assert ab["offset"] == [0.0, 1.0]  # easyroutine pre-registers `offset` as a list per batch
    abc = ab.cat(c)  # how each key was built persists through a chain
    assert abc["scale"].tolist() == [0.0, 1.0, 2.0] and abc["blocks.1.hook_resid_pre"].shape == (7, 4, 3)
    assert dict(abc.meta.resolved)["scale"] == "stack" and abc["offset"] == [0.0, 1.0, 2.0]
    assert_close(agg.combine([a, b, c])["scale"], abc["scale"], "combine == chain")
    # different sequence lengths cannot concatenate or stack: a list
    short = synthetic(3, pos=2)
    mixed = a.cat(short)
    assert isinstance(mixed["blocks.0.attn.hook_pattern"], list) and len(mixed["blocks.0.attn.hook_pattern"]) == 2
    assert len(mixed.cat(synthetic(4))["blocks.0.attn.hook_pattern"]) == 3
    # after two batches concatenate, a third of another trailing shape: [the concatenation, the third]
    for abs_ in (ab.cat(short), agg.combine([a, b, short]), agg.Deferred([a, b]).add(short).result()):
        got = abs_["blocks.0.attn.hook_pattern"]
        assert isinstance(got, list) and len(got) == 2 and abs_.n_batches == 3
        assert_close(got[0], np.concatenate([a["blocks.0.attn.hook_pattern"], b["blocks.0.attn.hook_pattern"]]), "ab")
        assert_close(got[1], short["blocks.0.attn.hook_pattern"], "third")


def keep_max(old, new):
    return new if old is None else jnp.maximum(old, new)


def test_registered_strategies_by_prefix():
    caches = [synthetic(i) for i in range(3)]
    caches[0] = (caches[0].register_aggregation("blocks.0.", "stack")
                 .register_aggregation("blocks.0.attn", agg.LAST)  # the longest prefix wins
                 .register_aggregation("offset", "mean")
                 .register_aggregation("tokens", "list")
                 .register_aggregation("blocks.1.", keep_max))
    out = agg.combine(caches)
    assert out["blocks.0.hook_resid_pre"].shape == (3, 2, 4, 3)
    assert_close(out["blocks.0.attn.hook_pattern"], caches[2]["blocks.0.attn.hook_pattern"], "last")
    assert_close(out["offset"], 1.0, "mean")
    assert isinstance(out["tokens"], list) and len(out["tokens"]) == 3
    biggest = np.maximum.reduce([c["blocks.1.hook_resid_pre"] for c in caches])
    assert_close(out["blocks.1.hook_resid_pre"], biggest, "custom max")
    # pairwise chains agree with the one-shot combination (running mean weighted by batches seen)
    chain = caches[0].cat(caches[1]).cat(caches[2])
    for k in out.keys():
        jax.tree.map(lambda x, y, k=k: assert_close(x, y, k), chain[k], out[k])
    assert caches[0].remove_aggregation("offset").cat(caches[1])["offset"].shape == (2,)  # default: stacked
    with pytest.raises(ValueError, match="unknown aggregation strategy 'median'"):
        caches[0].register_aggregation("x", "median")


def test_mismatched_caches_name_the_problem():
    a, b = synthetic(0), synthetic(1)
    with pytest.raises(ValueError, match=r"lacks \['offset'\] and has extra \['extra'\]"):
        a.cat(ActivationCache({**{k: v for k, v in b.items() if k != "offset"}, "extra": 1.0}, weights=b.weights))
    with pytest.raises(ValueError, match="has_batch_dim"):
        a.cat(b._replace(has_batch_dim=False))
    with pytest.raises(ValueError, match="carries weights"):
        a.cat(b._replace(weights={}))
    cfg1 = jaxlens.ModelConfig("m", 3, 2, 1, 3, 4, 5, 8, model_name="one")
    with pytest.raises(ValueError, match="different model config"):
        a._replace(cfg=cfg1).cat(b._replace(cfg=cfg1.replace(model_name="two")))
    with pytest.raises(ValueError, match="at least one cache"):
        agg.combine([])
    with pytest.raises(ValueError, match="lacks"):
        agg.Deferred([a]).add(ActivationCache({"x": 1.0}))


# ---------------------------------------------------------------------------------------------
# Info, metadata, mapping index, memory
# ---------------------------------------------------------------------------------------------


def test_info_and_metadata_survive_combination_jit_and_pickle(tmp_path):
    a = (synthetic(0).add_with_info("probe", np.ones((2, 3), np.float32), "mean of the last 3 tokens")
         .add_metadata(target_token_positions=np.array([1, 3]), model_name="gpt2-test",
                       extraction_config={"layers": [0, 1]}, interventions=[],
                       mapping_index={"first": 0, "pair": (1, 3)}))
    b = synthetic(1).add_with_info("probe", np.zeros((2, 3), np.float32), "other info")
    out = a.cat(b)
    assert out.info("probe") == "mean of the last 3 tokens" and out["probe"].shape == (4, 3)
    md = out.metadata
    assert md["model_name"] == "gpt2-test" and md["extraction_config"] == {"layers": [0, 1]}
    np.testing.assert_array_equal(md["target_token_positions"], [1, 3])
    # the metadata is static structure: it survives jit and tree.map, and equal content is equal structure
    back = jax.jit(lambda c: c)(out)
    assert back.info("probe") == out.info("probe") and back.metadata.keys() == md.keys()
    def tagged(seed):
        return synthetic(seed).add_metadata(target_token_positions=np.array([1, 3]), model_name="gpt2-test")

    assert jax.tree.structure(tagged(5)) == jax.tree.structure(tagged(6))
    assert jax.tree.structure(tagged(5)) != jax.tree.structure(synthetic(5))
    summed = jax.tree.map(lambda x, y: x + y, tagged(5), tagged(6))  # needs equal structures
    assert summed.metadata["model_name"] == "gpt2-test"
    # and pickling (registered custom strategies too, when module-level)
    (tmp_path / "c.pkl").write_bytes(pickle.dumps(out.register_aggregation("probe", keep_max)))
    loaded = pickle.loads((tmp_path / "c.pkl").read_bytes())
    assert loaded.info("probe") == out.info("probe") and loaded.metadata["model_name"] == "gpt2-test"
    assert_close(loaded["blocks.0.hook_resid_pre"], out["blocks.0.hook_resid_pre"], "pickled")
    # mapping index: {name: cache[key][:, index].squeeze()}
    mapped = out.map_to_dict("blocks.0.hook_resid_pre")
    assert mapped["first"].shape == (4, 3) and mapped["pair"].shape == (4, 2, 3)
    assert_close(mapped["pair"], np.asarray(out["blocks.0.hook_resid_pre"])[:, [1, 3]], "pair")
    with pytest.raises(ValueError, match="needs a mapping index"):
        b.map_to_dict("blocks.0.hook_resid_pre")


def test_memory_size_and_tree():
    c = synthetic(0, batch=10, pos=50)
    assert c.memory_size("blocks.0.hook_resid_pre") == "6.00 KB"  # 10*50*3 float32
    assert c.memory_size("absent") == "Not present: 0 B"
    assert c.memory_size("offset") == "4.00 B"
    total = sum(agg.nbytes(v) for v in c.values())
    assert c.memory_size() == agg.human(total) and agg.human(2.5e9) == "2.50 GB" and agg.human(1.5e6) == "1.50 MB"
    tree = c.memory_tree(grouped=True)
    assert tree["blocks.*.hook_resid_pre"] == "12.00 KB (2 items)"
    assert tree["blocks.*.attn.hook_pattern"] == "200.00 KB (1 items)" and tree["weights"] == "60.00 B"
    flat = c.memory_tree(grouped=False)
    assert flat["blocks.1.hook_resid_pre"] == "6.00 KB"
    listed = c.cat(synthetic(1, batch=10, pos=3))  # list values are counted too
    assert listed.memory_size("blocks.0.attn.hook_pattern") == agg.human(10 * 2 * 50 * 50 * 4 + 10 * 2 * 9 * 4)


# ---------------------------------------------------------------------------------------------
# easyroutine, exactly: literal ports of its aggregation functions (numpy arrays for tensors)
# ---------------------------------------------------------------------------------------------


def er_default_aggregation(old, new):
    """easyroutine 1.1.5's `ActivationCache.default_aggregation`, line by line."""
    if old is None:
        return new
    tensor = (np.ndarray, np.generic)  # torch.Tensor, 0-d included
    if isinstance(old, tensor) and isinstance(new, tensor):
        try:
            if np.ndim(old) == 0 or np.ndim(new) == 0:
                raise ValueError("zero-dimensional tensor cannot be concatenated")  # torch.cat's rule
            return np.concatenate([old, new], axis=0)
        except ValueError:
            try:
                return np.stack([old, new], axis=0)
            except ValueError:
                return [old, new]
    if isinstance(old, list):
        return old + (new if isinstance(new, list) else [new])
    if isinstance(old, tuple):
        if isinstance(new, tuple):
            return [old, new]
        if isinstance(new, list):
            return [old] + new
        return [old, new]
    try:
        return old + new
    except Exception:
        return [old, new]


def er_sublist(old, new):
    out = []
    if old is not None:
        out.extend(old) if isinstance(old, list) else out.append(old)
    out.extend(new) if isinstance(new, list) else out.append(new)
    return out


def er_aggregate_last_layernorm(old, new):
    if old is None:
        return new
    return {k: new[k] if k not in old else np.concatenate([old[k], new[k]], 0) for k in new}


def er_fold(fn, values):
    acc = values[0]  # easyroutine's first batch: the value itself (cat into a non-empty cache)
    for v in values[1:]:
        acc = fn(acc, v)
    return acc


def assert_same(got, ref, name):
    if isinstance(ref, (list, tuple)):
        assert type(got) is type(ref) and len(got) == len(ref), f"{name}: {got!r} vs {ref!r}"
        for i, (g, r) in enumerate(zip(got, ref)):
            assert_same(g, r, f"{name}[{i}]")
    elif isinstance(ref, dict):
        assert isinstance(got, dict) and got.keys() == ref.keys(), f"{name}: {got!r} vs {ref!r}"
        for k in ref:
            assert_same(got[k], ref[k], f"{name}[{k}]")
    elif isinstance(ref, np.ndarray):
        assert_close(got, ref, name, rtol=0, atol=0)
    else:
        assert got == ref and type(got) is type(ref), f"{name}: {got!r} vs {ref!r}"


def _np(tree):
    """jax arrays as numpy, everything else as it is."""
    return jax.tree.map(lambda x: np.asarray(x) if isinstance(x, jax.Array) else x, tree)


def _f32(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


DEFAULT_SEQUENCES = {
    "concatenate": [_f32(2, 3), _f32(1, 3, seed=1), _f32(3, 3, seed=2)],
    "concatenate, then a list": [_f32(2, 3), _f32(1, 3, seed=1), _f32(2, 4, seed=2), _f32(1, 3, seed=3)],
    "list from the start": [_f32(2, 3), _f32(2, 5, seed=1), _f32(2, 3, seed=2)],
    "rank 0 then rank 1": [np.float32(1.0), _f32(2)],
    "two scalars stack": [np.float32(1.0), np.float32(2.0)],
    "python floats add": [1.5, 2.0, 3.0],
    "python ints add": [1, 2, 3],
    "strings add": ["a", "b", "c"],
    "tuples": [(1, 2), (3,), (4,)],
    "lists extend": [[1], [2, 3], 4],
    "dicts: + fails": [{"x": 1}, {"x": 2}, {"x": 3}],
    "mixed: + fails": [1.0, "a", 2.0],
}


@pytest.mark.parametrize("name", sorted(DEFAULT_SEQUENCES))
def test_default_aggregation_is_easyroutines_fold(name):
    """The chain of `cat`s, `combine` and `Deferred` all give easyroutine's default_aggregation
    folded over the batches (Python scalars and strings try `+` before a list)."""
    values = DEFAULT_SEQUENCES[name]
    caches = [ActivationCache({"k": v}) for v in values]
    ref = er_fold(er_default_aggregation, values)
    chain = caches[0]
    for c in caches[1:]:
        chain = chain.cat(c)
    for how, got in (("chain", chain), ("combine", agg.combine(caches)), ("deferred", agg.Deferred(caches).result())):
        assert got.n_batches == len(values)
        assert_same(_np(got["k"]), ref, f"{name} ({how})")
    # a chain of combinations of combinations agrees too
    halves = agg.combine([agg.combine(caches[:2]), agg.combine(caches[2:])]) if len(caches) > 2 else chain
    assert_same(_np(halves["k"]), ref, f"{name} (combine of combines)")


def test_default_aggregation_where_easyroutine_is_wrong():
    """A third 0-d value: easyroutine's torch.cat of the [2] stack and a 0-d tensor fails, so it
    makes [stack of two, third]; we keep stacking. An array then a Python scalar: easyroutine's
    `+` would broadcast-add the scalar onto the tensor; we keep both in a list."""
    scalars = [ActivationCache({"k": np.float32(i)}) for i in range(3)]
    assert isinstance(er_fold(er_default_aggregation, [np.float32(i) for i in range(3)]), list)
    for got in (scalars[0].cat(scalars[1]).cat(scalars[2]), agg.combine(scalars)):
        assert np.asarray(got["k"]).tolist() == [0.0, 1.0, 2.0]
    mixed = ActivationCache({"k": _f32(2, 3)}).cat(ActivationCache({"k": 1.0}))
    assert isinstance(mixed["k"], list) and mixed["k"][1] == 1.0


def test_easyroutine_preregistered_strategies(gpt2):
    """`offset` and `token_dict` are lists per batch, `mapping_index` the newest, `last_layernorm`
    concatenated field by field (here as `extract` returns it), as easyroutine registers them."""
    from jaxlens.edits import extraction as ex

    toks = np.array([[0, 5, 9, 30, 2, 7], [0, 17, 250, 8, 4, 61], [0, 1, 2, 3, 4, 5]], np.int32)
    batches = []
    for i, rows in enumerate((slice(0, 2), slice(2, 3))):
        out = ex.extract(gpt2, toks[rows], [(1,), (3, 4)], what=("resid_out", "last_layernorm"), layers=[0, 1])
        batches.append(ActivationCache({**out, "offset": i, "token_dict": {"last": [5]},
                                        "mapping_index": {"last": [i]}}))
    assert dict(batches[0].meta.strategies) == dict(agg.EASYROUTINE_STRATEGIES)
    ref = {"offset": er_fold(er_sublist, [0, 1]), "token_dict": er_fold(er_sublist, [{"last": [5]}] * 2),
           "mapping_index": {"last": [1]},
           "last_layernorm": er_fold(er_aggregate_last_layernorm,
                                     [jax.tree.map(np.asarray, b["last_layernorm"]) for b in batches])}
    for got in (batches[0].cat(batches[1]), agg.combine(batches)):
        for k, r in ref.items():
            assert_same(_np(got[k]), r, k)
        assert got["last_layernorm"]["mean"].shape == (3, 3) and got["resid_out_1"].shape == (3, 3, gpt2.cfg.d_model)
    # the grouped memory tree groups extract's keys as easyroutine's does
    tree = batches[0].memory_tree(grouped=True)
    assert tree["resid_out"].endswith("(2 items)") and "resid_out_0" not in tree and "last_layernorm" in tree
    with pytest.raises(ValueError, match="dicts of arrays"):
        agg.combine([ActivationCache({"last_layernorm": np.ones(2)})] * 2)


def test_cat_into_an_empty_cache():
    """easyroutine's idiom: an empty cache that batches are `cat` into (its strategies apply)."""
    parts = [synthetic(i) for i in range(3)]
    acc = ActivationCache({}).register_aggregation("blocks.1.", "stack")
    for p in parts:
        acc = acc.cat(p)
    assert acc.n_batches == 3 and list(acc.keys()) == list(parts[0].keys())
    assert acc["blocks.1.hook_resid_pre"].shape == (3, 2, 4, 3) and acc["offset"] == [0.0, 1.0, 2.0]
    assert_close(acc["blocks.0.hook_resid_pre"], np.concatenate([p["blocks.0.hook_resid_pre"] for p in parts]), "cat")
    d = agg.Deferred([ActivationCache({})])
    for p in parts:
        d.add(p)
    assert_close(d.result()["blocks.0.attn.hook_pattern"], agg.combine(parts)["blocks.0.attn.hook_pattern"], "d")
    with pytest.raises(ValueError, match="lacks"):
        parts[0].cat(ActivationCache({}))  # only an empty cache on the left is easyroutine's start


def test_add_and_update_merge_like_easyroutine():
    """`a + b` = a new cache of {**a, **b} (easyroutine's __add__: fresh strategies); `a.update(b)`
    the same keys keeping a's strategies; b may be a dict; anything else is a TypeError."""
    a = (synthetic(0).add_with_info("probe", np.ones((2, 3), np.float32), "a's probe")
         .register_aggregation("probe", "list").add_metadata(model_name="m", mapping_index={"x": 0}))
    b = ActivationCache({"probe": np.zeros((2, 3), np.float32), "extra": np.full((2,), 7.0, np.float32)}) \
        .add_with_info("extra", np.full((2,), 7.0, np.float32), "b's extra").add_metadata(model_name="n")
    ref = {**a.to_dict(), **b.to_dict()}  # easyroutine: {**self.cache, **other.cache}
    for merged in (a + b, a.update(b)):
        assert list(merged.keys()) == list(ref) and merged.weights.keys() == a.weights.keys()
        for k in ref:
            assert_close(merged[k], ref[k], k, rtol=0, atol=0)
        assert merged.info("probe") is None and merged.info("extra") == "b's extra"  # b's value, b's info
        assert merged.metadata["model_name"] == "n" and merged.metadata["mapping_index"] == {"x": 0}
    assert dict((a + b).meta.strategies) == dict(agg.EASYROUTINE_STRATEGIES)
    assert dict(a.update(b).meta.strategies)["probe"] is agg.LIST
    with_dict = a + {"new": 1.0}
    assert set(with_dict.keys()) == set(a.keys()) | {"new"} and with_dict.info("probe") == "a's probe"
    assert "extra" not in a.keys()  # immutable: a is unchanged
    with pytest.raises(TypeError, match="ActivationCache or a dict"):
        a + 3


# ---------------------------------------------------------------------------------------------
# Streaming statistics
# ---------------------------------------------------------------------------------------------


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), n_batches=st.integers(1, 4), masked=st.booleans(),
       over_positions=st.booleans())
def test_running_mean_and_variance_equal_numpy(seed, n_batches, masked, over_positions):
    rng = np.random.default_rng(seed)
    xs, ms = [], []
    stats = agg.RunningStats.empty()
    axes = (0, 1) if over_positions else (0,)
    for _ in range(n_batches):
        x = rng.normal(3.0, 2.0, (int(rng.choice([1, 3])), 5, 3)).astype(np.float32)  # uneven batches
        m = (rng.random(x.shape[:2]) < 0.7).astype(np.float32) if masked else np.ones(x.shape[:2], np.float32)
        xs.append(x)
        ms.append(m)
        stats = agg.update_stats(stats, {"resid": x, "twice": 2 * x}, jnp.asarray(m) if masked else None, axes=axes)
    x, m = np.concatenate(xs), np.concatenate(ms)
    w = np.broadcast_to(m[..., None], x.shape)
    n = w.sum(axes)
    mean = (w * x).sum(axes) / np.maximum(n, 1)
    var = (w * (x - np.expand_dims(mean, axes)) ** 2).sum(axes) / np.maximum(n, 1)
    ok = n > 0
    assert_close(np.asarray(stats.count["resid"]), n, "count")
    assert_close(np.asarray(stats.mean["resid"])[ok], mean[ok], "mean", rtol=1e-4, atol=1e-4)
    assert_close(np.asarray(stats.variance()["resid"])[ok], var[ok], "var", rtol=1e-4, atol=1e-4)
    assert_close(np.asarray(stats.variance()["twice"])[ok], 4 * var[ok], "var x2", rtol=1e-4, atol=1e-4)
    if not masked and not over_positions and x.shape[0] > 1:
        assert_close(np.asarray(stats.variance(ddof=1)["resid"]), x.var(0, ddof=1), "ddof=1", rtol=1e-4, atol=1e-4)


def easyroutine_blocks(pattern, row_groups, col_groups, method):
    """The reference: easyroutine's per-block loops, in numpy."""
    b, h = pattern.shape[:2]
    out = np.zeros((b, h, len(row_groups), len(col_groups)), np.float32)
    for i, g1 in enumerate(row_groups):
        for j, g2 in enumerate(col_groups):
            block = pattern[:, :, list(g1)][:, :, :, list(g2)]
            if method == "sum":
                out[:, :, i, j] = block.sum((-2, -1))
            else:
                out[:, :, i, j] = block.mean((-2, -1))
                if method == "baseline_ratio":
                    base = np.mean([sum(1 for jj in g2 if jj <= ii) / (ii + 1) for ii in g1])
                    with np.errstate(invalid="ignore"):  # a block with no allowed key: 0/0, NaN in both
                        out[:, :, i, j] /= base
    return out


@pytest.mark.parametrize("method", ["mean", "sum", "baseline_ratio"])
def test_group_pattern_matches_easyroutine(method):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 2, 7, 7))
    logits = np.where(np.tril(np.ones((7, 7))) > 0, logits, -np.inf)
    pattern = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    cols, rows = [(1, 2, 3), (4,)], [(0, 1), (4, 5, 6)]
    assert_close(agg.group_pattern(jnp.asarray(pattern), cols, rows, method),
                 easyroutine_blocks(pattern, rows, cols, method), method)
    assert_close(agg.group_pattern(jnp.asarray(pattern), cols, None, method),
                 easyroutine_blocks(pattern, cols, cols, method), f"{method} rows=cols")
    # a repeated position counts as often as listed (easyroutine's list indexing), in rows and columns
    rep_cols, rep_rows = [(1, 1, 3), (4, 2)], [(5, 5, 6), (2,)]
    assert_close(agg.group_pattern(pattern, rep_cols, rep_rows, method),
                 easyroutine_blocks(pattern, rep_rows, rep_cols, method), f"{method} repeated")
    # negative positions are resolved first (easyroutine's baseline is wrong on them)
    assert_close(agg.group_pattern(pattern, [(1, -6), (-3,)], [(-1, 0)], method),
                 easyroutine_blocks(pattern, [(6, 0)], [(1, 1), (4,)], method), f"{method} negative")
    # membership arrays (per-example positions) give the same blocks; entries are counts
    C = np.zeros((3, 2, 7), np.float32)
    for g, idx in enumerate(rep_cols):
        for p in idx:
            C[:, g, p] += 1
    R = np.zeros((2, 7), np.float32)
    for g, idx in enumerate(rep_rows):
        for p in idx:
            R[g, p] += 1
    assert_close(agg.group_pattern(pattern, jnp.asarray(C), R, method),
                 easyroutine_blocks(pattern, rep_rows, rep_cols, method), f"{method} membership arrays")


def test_running_pattern_average_over_batches():
    rng = np.random.default_rng(1)
    pats = [rng.random((n, 2, 6, 6)).astype(np.float32) for n in (2, 3, 1)]
    groups = [[0, 1], [2, 3, 4], [5]]
    stats = agg.RunningStats.empty()
    for p in pats:
        stats = agg.update_pattern_stats(stats, {"blocks.0.attn.hook_pattern": p, "other": p[:, 0]}, groups)
    assert list(stats.mean) == ["blocks.0.attn.hook_pattern"]
    every = np.concatenate([easyroutine_blocks(p, groups, groups, "mean") for p in pats])
    assert_close(stats.mean["blocks.0.attn.hook_pattern"], every.mean(0), "running mean", rtol=1e-5)
    assert stats.mean["blocks.0.attn.hook_pattern"].shape == (2, 3, 3)  # per head, per group pair
    # example_mask leaves padding examples of a fixed-size batch out
    masked = agg.update_pattern_stats(agg.RunningStats.empty(), {"p.hook_pattern": pats[1]}, groups,
                                      example_mask=jnp.array([1.0, 0.0, 1.0]))
    kept = easyroutine_blocks(pats[1][[0, 2]], groups, groups, "mean").mean(0)
    assert_close(masked.mean["p.hook_pattern"], kept, "example mask")
    with pytest.raises(ValueError, match="outside a sequence of length 6"):
        agg.group_pattern(jnp.asarray(pats[0]), [[0, 9]])
    with pytest.raises(ValueError, match="method="):
        agg.group_pattern(jnp.asarray(pats[0]), groups, method="median")
    with pytest.raises(ValueError, match="leading dims"):
        agg.update_stats(agg.RunningStats.empty(), {"x": jnp.ones((2, 3))}, jnp.ones((3,)))


@pytest.fixture(scope="module")
def gpt2(hf_root):
    return jaxlens.from_pretrained(built("gpt2", hf_root)[0])


def test_stats_accumulate_a_sweep_inside_jit(gpt2):
    """A sweep step: forward and statistics update in one compiled call; only summaries stay."""
    from jaxlens.model.forward import forward

    name = "blocks.1.hook_resid_post"
    toks = np.array([[0, 5, 9, 30, 2, 7], [0, 17, 250, 8, 4, 61], [0, 1, 2, 3, 4, 5], [0, 9, 9, 9, 1, 1]], np.int32)
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], np.int32)

    @jax.jit
    def step(stats, batch, batch_mask):
        _, acts, _ = forward(gpt2.params, gpt2.cfg, batch, batch_mask, capture=frozenset({name}))
        return agg.update_stats(stats, acts, batch_mask, axes=(0, 1))

    stats = agg.RunningStats.zeros({name: jax.ShapeDtypeStruct((2, 6, gpt2.cfg.d_model), jnp.float32)}, (0, 1))
    for i in (0, 2):
        stats = step(stats, toks[i:i + 2], mask[i:i + 2])
    assert step._cache_size() == 1
    _, whole = gpt2.run_with_cache(toks, names_filter=name, attention_mask=mask)
    x = np.asarray(whole[name])[mask.astype(bool)]
    assert float(stats.count[name][0]) == mask.sum()
    assert_close(stats.mean[name], x.mean(0), "sweep mean", rtol=1e-5, atol=1e-5)
    assert_close(stats.variance()[name], x.var(0), "sweep var", rtol=1e-4, atol=1e-5)
