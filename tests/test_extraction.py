"""easyroutine extraction hooks: per-head q/k/v and projected vectors against the HF PyTorch model
(grouped-query llama), block statistics and running averages against explicit loops over
easyroutine's definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jaxlens
from conftest import assert_close
from jaxlens import extraction as ex

TOKS = np.array([[0, 5, 9, 30, 2, 7, 100, 44], [0, 17, 250, 8, 3, 3, 60, 61]], np.int32)
GROUPS = [(1, 3), (4,), (2, 2, 7)]
ROWS = [(0, 1), (6, 7), (5,)]


def _built(family, hf_root):
    import conftest
    from hf_models import build

    if family not in conftest._BUILT:
        conftest._BUILT[family] = build(family, hf_root)
    return conftest._BUILT[family]


@pytest.fixture(scope="module")
def llama(hf_root):
    path, model = _built("llama", hf_root)
    return jaxlens.from_pretrained_no_processing(path), model


@pytest.fixture(scope="module")
def hf_proj(llama):
    """HF llama q/k/v projection outputs per layer ([b H|K p dh]) and o_proj weights, by torch hooks."""
    _, model = llama
    cfg = model.config
    dh = cfg.hidden_size // cfg.num_attention_heads
    store, handles = {}, []
    for l, layer in enumerate(model.model.layers):
        for kind in ("q", "k", "v"):
            mod = getattr(layer.self_attn, f"{kind}_proj")
            handles.append(mod.register_forward_hook(
                lambda m, a, out, key=(kind, l): store.__setitem__(key, out.detach().clone())))
    with torch.no_grad():
        out = model(input_ids=torch.tensor(TOKS, dtype=torch.long), output_hidden_states=True)
    for h in handles:
        h.remove()
    heads = {k: v.view(*v.shape[:2], -1, dh).transpose(1, 2) for k, v in store.items()}
    o = [(layer.self_attn.o_proj.weight.detach().t().reshape(cfg.num_attention_heads, dh, cfg.hidden_size),
          layer.self_attn.o_proj.bias) for layer in model.model.layers]
    return heads, o, [h.numpy() for h in out.hidden_states]


def _select(x, groups, avg, axis):
    """easyroutine's token handling: flatten the tuples, or mean over each tuple (keepdim + cat)."""
    if avg:
        return torch.cat([x.index_select(axis, torch.tensor(g)).mean(axis, keepdim=True) for g in groups], axis)
    return x.index_select(axis, torch.tensor([p for g in groups for p in g]))


@pytest.mark.parametrize("avg", [False, True])
def test_head_vectors_and_projections_match_hf(llama, hf_proj, avg):
    m, model = llama
    heads, o_proj, hidden = hf_proj
    H, K = m.cfg.n_heads, m.cfg.kv_heads
    assert K < H  # grouped-query
    what = ("embed", "resid_in", "queries", "keys", "values", "projected_query", "projected_key", "projected_value")
    out = ex.extract(m, TOKS, GROUPS, what=what, avg=avg)
    for l in range(m.cfg.n_layers):
        assert_close(out[f"resid_in_{l}"], _select(torch.tensor(hidden[l]), GROUPS, avg, 1).numpy(), f"resid_in_{l}")
        W, b = o_proj[l]
        for kind, key in (("q", "queries"), ("k", "keys"), ("v", "values")):
            x = heads[(kind, l)]  # [b heads p dh]
            full = x if kind == "q" else x.repeat_interleave(H // K, dim=1)  # HF repeat_kv
            proj = torch.einsum("bhpd,hdm->bhpm", full, W) + b
            for h in range(H):
                src = x[:, h] if kind == "q" else x[:, h // (H // K)]  # easyroutine's group index
                assert_close(out[f"{key}_L{l}H{h}"], _select(src, GROUPS, avg, 1).numpy(), f"{key}_L{l}H{h}")
                assert_close(out[f"projected_{ {'q': 'query', 'k': 'key', 'v': 'value'}[kind]}_L{l}H{h}"],
                             _select(proj[:, h], GROUPS, avg, 1).detach().numpy(), f"projected {kind} L{l}H{h}")
    n_tok = len(GROUPS) if avg else sum(map(len, GROUPS))
    assert out["embed"].shape == (2, n_tok, m.cfg.d_model)


def easyroutine_block_stats(pattern, token_indexes, row_partition, avg):
    """A literal loop over easyroutine's attention_pattern_head definitions (numpy)."""
    b, n_heads = pattern.shape[:2]
    out = np.zeros((b, n_heads, len(row_partition), len(token_indexes)))
    for h in range(n_heads):
        for i, g1 in enumerate(row_partition):
            for j, g2 in enumerate(token_indexes):
                block = pattern[:, h, list(g1), :][:, :, list(g2)]
                if avg == "mean":
                    val = block.mean(axis=(-2, -1))
                elif avg == "sum":
                    val = block.sum(axis=(-2, -1))
                else:  # a block wholly above the diagonal has baseline 0: 0/0 = NaN, as in easyroutine
                    observed = block.mean(axis=(-2, -1))
                    baseline = [sum(1 for k in g2 if k <= r) / (r + 1) for r in g1]
                    with np.errstate(invalid="ignore", divide="ignore"):
                        val = observed / (sum(baseline) / len(baseline))
                out[:, h, i, j] = val
    return out


@pytest.fixture(scope="module")
def patterns(llama):
    m, _ = llama
    _, cache = m.run_with_cache(TOKS, names_filter=lambda n: n.endswith(("hook_pattern", "hook_v")))
    return cache


@pytest.mark.parametrize("stat", ["mean", "sum", "baseline_ratio"])
def test_pattern_block_stats_match_easyroutine_loop(patterns, stat):
    p = np.asarray(patterns["pattern", 1])
    got = ex.pattern_block_stats(patterns["pattern", 1], GROUPS, ROWS, stat)
    assert got.shape == (2, p.shape[1], len(ROWS), len(GROUPS))
    assert_close(got, easyroutine_block_stats(p, GROUPS, ROWS, stat), stat)
    # rows default to the column groups (easyroutine's docstring)
    assert_close(ex.pattern_block_stats(p, GROUPS, stat=stat), easyroutine_block_stats(p, GROUPS, GROUPS, stat), stat)


def test_extract_patterns(llama, patterns):
    m, _ = llama
    out = ex.extract(m, TOKS, GROUPS, what="pattern", layers=[1], heads=[0, 3], pattern_stat="baseline_ratio",
                     row_groups=ROWS)
    assert sorted(out) == ["pattern_L1H0", "pattern_L1H3"]
    ref = easyroutine_block_stats(np.asarray(patterns["pattern", 1]), GROUPS, ROWS, "baseline_ratio")
    assert_close(out["pattern_L1H3"], ref[:, 3], "baseline ratio via extract")
    flat = ex.extract(m, TOKS, GROUPS, what="pattern", layers=[1], heads=2)
    idx = [p for g in GROUPS for p in g]
    assert_close(flat["pattern_L1H2"], np.asarray(patterns["pattern", 1])[:, 2][:, idx][:, :, idx], "flattened")


def test_running_pattern_average_matches_easyroutine(llama, patterns):
    """Three batches through the running mean; value weighting by key norms and, as easyroutine's
    code does it, by query norms."""
    m, _ = llama
    groups = [(1, 2), (5,)]
    idx = [1, 2, 5]
    W_O, b_O = np.asarray(m.W_O), np.asarray(m.b_O)
    batches = []
    for scale in (1.0, 0.5, 2.0):  # three "batches": patterns and values scaled differently
        pat = np.asarray(patterns["pattern", 1]) ** scale
        pat = pat / pat.sum(-1, keepdims=True)
        v = np.repeat(np.asarray(patterns["v", 1]) * scale, m.cfg.n_heads // m.cfg.kv_heads, axis=2)
        proj = np.einsum("bphd,hdm->bhpm", v, W_O[1]) + b_O[1]
        batches.append((pat, proj))
    for weight_by in ("key", "query"):
        state = None
        ref_avg, ref_val = {}, {}
        for batch_idx, (pat, proj) in enumerate(batches):
            state = ex.running_pattern_average(state, pat, groups, proj, weight_by=weight_by)
            for h in range(pat.shape[1]):  # easyroutine's avg_attention_pattern_head, per head
                x = pat[:, h][:, idx][:, :, idx]
                ref_avg[h] = x if batch_idx == 0 else ref_avg[h] + (x - ref_avg[h]) / (batch_idx + 1)
                norm = np.linalg.norm(proj[:, h], axis=-1)  # [b s]
                if weight_by == "query":  # the literal expand_as(...).transpose(1, 2)
                    norm_matrix = np.broadcast_to(norm[:, None, :], pat[:, h].shape).transpose(0, 2, 1) * pat[:, h]
                else:
                    norm_matrix = norm[:, None, :] * pat[:, h]
                y = norm_matrix[..., idx, :]
                ref_val[h] = y if batch_idx == 0 else ref_val[h] + (y - ref_val[h]) / (batch_idx + 1)
        assert int(state.count) == 3
        for h in ref_avg:
            assert_close(state.pattern[:, h], ref_avg[h], f"avg pattern H{h}")
            assert_close(state.value_weighted[:, h], ref_val[h], f"value weighted H{h} ({weight_by})")


def test_position_statistics():
    x = np.random.default_rng(0).normal(size=(2, 5, 16)).astype(np.float32)
    mean, var, second = ex.position_statistics(x)
    assert mean.shape == var.shape == second.shape == (2, 5)
    assert_close(mean, x.mean(-1), "mean")
    assert_close(second, (x**2).mean(-1), "second moment")
    assert_close(var, x.var(-1), "variance", atol=1e-5)


def test_embedding_with_grad_matches_torch(hf_root):
    path, model = _built("gpt2", hf_root)
    m = jaxlens.from_pretrained_no_processing(path)
    metric = lambda lg: lg[:, -1, 3].sum()
    emb, grad = ex.embedding_with_grad(m, TOKS, metric, [(1, 2), (6,)], avg=True)
    e = model.get_input_embeddings()(torch.tensor(TOKS, dtype=torch.long)).detach().requires_grad_(True)
    model(inputs_embeds=e).logits[:, -1, 3].sum().backward()
    assert_close(emb, _select(e.detach(), [(1, 2), (6,)], True, 1).numpy(), "embedding")
    assert_close(grad, _select(e.grad, [(1, 2), (6,)], True, 1).numpy(), "gradient")


def test_extraction_errors(llama):
    m, _ = llama
    with pytest.raises(ValueError, match="outside a sequence of length 8"):
        ex.extract(m, TOKS, [(1, 9)])
    with pytest.raises(ValueError, match="empty group"):
        ex.select_tokens(np.zeros((1, 4, 2)), [()])
    with pytest.raises(ValueError, match="must be ints"):
        ex.select_tokens(np.zeros((1, 4, 2)), [(1.0,)])
    with pytest.raises(ValueError, match="unknown what"):
        ex.extract(m, TOKS, [(1,)], what=("resid_post",))
    with pytest.raises(ValueError, match="pattern_stat must be"):
        ex.extract(m, TOKS, [(1,)], what="pattern", pattern_stat="median")
    with pytest.raises(ValueError, match="layers \\[5\\] out of range"):
        ex.extract(m, TOKS, [(1,)], layers=[5])
    with pytest.raises(ValueError, match="heads"):
        ex.extract(m, TOKS, [(1,)], what="queries", heads=[7])
    neox_like = jaxlens.HookedTransformer(m.cfg.replace(parallel_attn_mlp=True), m.params, m.tokenizer)
    with pytest.raises(ValueError, match="no resid_mid"):
        ex.extract(neox_like, TOKS, [(1,)], what="resid_mid")
    with pytest.raises(ValueError, match="stat must be"):
        ex.pattern_block_stats(np.zeros((1, 1, 4, 4)), [(0,)], stat="max")
    state = ex.running_pattern_average(None, np.ones((1, 2, 4, 4)) / 4, [(0, 1)])
    with pytest.raises(ValueError, match="same size"):
        ex.running_pattern_average(state, np.ones((2, 2, 4, 4)) / 4, [(0, 1)])
    with pytest.raises(ValueError, match="weight_by"):
        ex.value_weighted_pattern(np.ones((1, 1, 2, 2)), np.ones((1, 1, 2, 3)), weight_by="both")
