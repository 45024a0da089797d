"""easyroutine extraction, exactly: every `extract` key against the HF PyTorch model read the way
easyroutine's hooks read it (per-head q/k/v and projections on a grouped-query llama; the norm
outputs, head outputs, logits and final-norm statistics on four families); the attention-pattern
statistics, raw blocks, running averages and the single-row attention-matrix edit against literal
ports of easyroutine 1.1.5's code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jaxlens
from conftest import assert_close, built
from jaxlens.cache import aggregate as agg
from jaxlens.edits import extraction as ex
from jaxlens.edits import interventions as iv
from jaxlens.hooks import HookPoint

TOKS = np.array([[0, 5, 9, 30, 2, 7, 100, 44], [0, 17, 250, 8, 3, 3, 60, 61]], np.int32)
GROUPS = [(1, 3), (4,), (2, 2, 7)]
ROWS = [(0, 1), (6, 7), (5,)]
FLAT = [p for g in GROUPS for p in g]


@pytest.fixture(scope="module")
def llama(hf_root):
    path, model = built("llama", hf_root)
    return jaxlens.from_pretrained_no_processing(path), model


@pytest.fixture(scope="module")
def hf_proj(llama):
    """HF llama q/k/v projection outputs per layer ([b H|K p dh] and raw [b p H|K·dh]) and o_proj
    weights, by torch hooks."""
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
    return heads, o, [h.numpy() for h in out.hidden_states], store


def _select(x, groups, avg, axis):
    """easyroutine's token handling: flatten the tuples, or mean over each tuple (keepdim + cat)."""
    if avg:
        return torch.cat([x.index_select(axis, torch.tensor(g)).mean(axis, keepdim=True) for g in groups], axis)
    return x.index_select(axis, torch.tensor([p for g in groups for p in g]))


@pytest.mark.parametrize("avg", [False, True])
def test_head_vectors_and_projections_match_hf(llama, hf_proj, avg):
    m, model = llama
    heads, o_proj, hidden, raw = hf_proj
    H, K = m.cfg.n_heads, m.cfg.n_kv_heads
    assert K < H  # grouped-query
    what = ("embed", "resid_in", "head_queries", "head_keys", "head_values", "queries", "keys", "values",
            "head_queries_projected", "head_keys_projected", "head_values_projected")
    out = ex.extract(m, TOKS, GROUPS, what=what, avg=avg)
    for l in range(m.cfg.n_layers):
        assert_close(out[f"resid_in_{l}"], _select(torch.tensor(hidden[l]), GROUPS, avg, 1).numpy(), f"resid_in_{l}")
        W, b = o_proj[l]
        for kind, name in (("q", "queries"), ("k", "keys"), ("v", "values")):
            x = heads[(kind, l)]  # [b heads p dh]
            # easyroutine's extract_{queries,keys,values}: the projection output, heads not split
            assert_close(out[f"{name}_L{l}"], _select(raw[(kind, l)], GROUPS, avg, 1).numpy(), f"{name}_L{l}")
            full = x if kind == "q" else x.repeat_interleave(H // K, dim=1)  # HF repeat_kv
            proj = torch.einsum("bhpd,hdm->bhpm", full, W) + b
            for h in range(H):
                src = x[:, h] if kind == "q" else x[:, h // (H // K)]  # the kv head the model reads
                assert_close(out[f"head_{name}_L{l}H{h}"], _select(src, GROUPS, avg, 1).numpy(), f"{name} L{l}H{h}")
                assert_close(out[f"projected_{ {'q': 'query', 'k': 'key', 'v': 'value'}[kind]}_L{l}H{h}"],
                             _select(proj[:, h], GROUPS, avg, 1).detach().numpy(), f"projected {kind} L{l}H{h}")
    n_tok = len(GROUPS) if avg else sum(map(len, GROUPS))
    assert out["input_embeddings"].shape == (2, n_tok, m.cfg.d_model)
    assert_close(out["input_embeddings"], _select(torch.tensor(hidden[0]), GROUPS, avg, 1).numpy(), "embeddings")


# family: (blocks, attention-input norm, MLP-input norm, attention output projection, final norm)
HF_MODULES = {
    "gpt2": (lambda m: m.transformer.h, "ln_1", "ln_2", "attn.c_proj", lambda m: m.transformer.ln_f),
    "gpt_neox": (lambda m: m.gpt_neox.layers, "input_layernorm", "post_attention_layernorm", "attention.dense",
                 lambda m: m.gpt_neox.final_layer_norm),
    "llama": (lambda m: m.model.layers, "input_layernorm", "post_attention_layernorm", "self_attn.o_proj",
              lambda m: m.model.norm),
    "gemma": (lambda m: m.model.layers, "input_layernorm", "post_attention_layernorm", "self_attn.o_proj",
              lambda m: m.model.norm),
}


def _module(root, dotted):
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


@pytest.mark.parametrize("family", sorted(HF_MODULES))
@pytest.mark.parametrize("avg", [False, True])
def test_norm_outputs_head_out_logits_and_last_layernorm_match_hf(hf_root, family, avg):
    """easyroutine's module outputs, read from HF: `attn_in` / `resid_in_post_layernorm` =
    self_attn's input (the attention norm's output), `resid_mid` = post_attention_layernorm's
    output (the MLP input; parallel GPT-NeoX too), `head_out_L{l}H{h}` = the o_proj input of head
    h through its W_O block plus b_O / n_heads, `logits` at the flattened positions, and
    `last_layernorm` = compute_statistics of the final norm's input."""
    path, model = built(family, hf_root)
    m = jaxlens.from_pretrained_no_processing(path)
    blocks, ln1, ln2, o_name, final = HF_MODULES[family]
    store, handles = {}, []
    for l, block in enumerate(blocks(model)):
        for key, name, take in (("ln1", ln1, "out"), ("ln2", ln2, "out"), ("o_in", o_name, "in"),
                                ("o_out", o_name, "out")):
            handles.append(_module(block, name).register_forward_hook(
                lambda mod, a, out, key=(key, l), take=take: store.__setitem__(
                    key, (a[0] if take == "in" else out).detach().clone())))
    handles.append(final(model).register_forward_hook(lambda mod, a, out: store.__setitem__("final", a[0].detach())))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(TOKS, dtype=torch.long)).logits
    for h in handles:
        h.remove()
    what = ("resid_in_post_layernorm", "attn_in", "resid_mid", "attn_out", "head_out", "last_layernorm")
    out = ex.extract(m, TOKS, GROUPS, what=what, avg=avg, save_logits=True)
    H, dh, D = m.cfg.n_heads, m.cfg.d_head, m.cfg.d_model
    for l, block in enumerate(blocks(model)):
        for key in ("resid_in_post_layernorm", "attn_in"):
            assert_close(out[f"{key}_{l}"], _select(store[("ln1", l)], GROUPS, avg, 1).numpy(), f"{family} {key}_{l}")
        assert_close(out[f"resid_mid_{l}"], _select(store[("ln2", l)], GROUPS, avg, 1).numpy(), f"{family} resid_mid")
        proj = _module(block, o_name)
        W = proj.weight.detach()
        W = (W if family == "gpt2" else W.t()).reshape(H, dh, D)  # GPT-2's Conv1D stores [in, out]
        z = store[("o_in", l)].view(*TOKS.shape, H, dh)
        head_out = torch.einsum("bphd,hdm->bphm", z, W)
        if proj.bias is not None:
            head_out = head_out + proj.bias.detach() / H  # easyroutine's code: `// H`, which floors
        total = 0
        for h in range(H):
            ref = _select(head_out[:, :, h], GROUPS, avg, 1).numpy()
            assert_close(out[f"head_out_L{l}H{h}"], ref, f"{family} head_out_L{l}H{h}", atol=1e-5)
            total = total + out[f"head_out_L{l}H{h}"]
        assert_close(total, out[f"attn_out_{l}"], f"{family}: the heads sum to attn_out", atol=1e-5)
        assert_close(out[f"attn_out_{l}"], _select(store[("o_out", l)], GROUPS, avg, 1).numpy(), f"{family} attn_out")
    assert_close(out["logits"], logits[:, FLAT].numpy(), f"{family} logits (flattened even with avg)", atol=1e-4)
    x = store["final"][:, FLAT].double()  # layernom_hook: always the flattened positions
    mean, second = x.mean(-1), (x**2).mean(-1)
    stats = out["last_layernorm"]
    assert sorted(stats) == ["mean", "second_moment", "variance"]
    assert_close(stats["mean"], mean.numpy(), "mean", atol=1e-5)
    assert_close(stats["second_moment"], second.numpy(), "second moment", atol=1e-4)
    assert_close(stats["variance"], (second - mean**2).numpy(), "variance", atol=1e-4)


def easyroutine_attention_pattern_head(pattern, token_indexes, row_partition, avg):
    """A literal port of easyroutine 1.1.5's `attention_pattern_head` (numpy): {head: value}."""
    b, n_heads = pattern.shape[:2]
    out = {}
    for h in range(n_heads):
        if row_partition is None:  # its code: no row partition -> the flattened pattern, whatever avg says
            flat = [i for tup in token_indexes for i in tup]
            out[h] = pattern[:, h, flat][:, :, flat]
            continue
        group_avgs = []
        for group1 in row_partition:
            for group2 in token_indexes:
                block = pattern[:, h, list(group1), :][:, :, list(group2)]
                if avg == "mean":
                    val = block.mean(axis=(-2, -1))
                elif avg == "sum":
                    val = block.sum(axis=(-2, -1))
                elif avg == "baseline_ratio":
                    observed = block.mean(axis=(-2, -1))
                    baseline_list = []
                    for i in group1:
                        allowed_count = sum(1 for j in group2 if j <= i)
                        total_allowed = i + 1
                        baseline_list.append(allowed_count / total_allowed if total_allowed > 0 else 0.0)
                    with np.errstate(invalid="ignore", divide="ignore"):
                        val = observed / (sum(baseline_list) / len(baseline_list))
                else:
                    val = block
                group_avgs.append(val[:, None] if avg != "none" else block)
        if avg != "none":
            out[h] = np.concatenate(group_avgs, 1).reshape(b, len(row_partition), len(token_indexes))
        else:
            out[h] = np.concatenate(group_avgs, 1)
    return out


def _stack_heads(d):
    return np.stack([d[h] for h in sorted(d)], 1)


@pytest.fixture(scope="module")
def patterns(llama):
    m, _ = llama
    _, cache = m.run_with_cache(TOKS, names_filter=lambda n: n.endswith(("hook_pattern", "hook_v")))
    return cache


@pytest.mark.parametrize("stat", ["mean", "sum", "baseline_ratio"])
def test_pattern_statistics_match_easyroutine(patterns, stat):
    """One implementation (`aggregate.group_pattern`), reached from `attention_pattern_head`, from
    `extract` and from the streaming statistics, with easyroutine's definitions: a repeated
    position (2, 2, 7) counts twice; rows default to the column groups (its docstring)."""
    p = np.asarray(patterns["pattern", 1])
    ref = _stack_heads(easyroutine_attention_pattern_head(p, GROUPS, ROWS, stat))
    got = ex.attention_pattern_head(patterns["pattern", 1], GROUPS, ROWS, stat)
    assert got.shape == (2, p.shape[1], len(ROWS), len(GROUPS))
    assert_close(got, ref, stat)
    assert_close(agg.group_pattern(p, GROUPS, ROWS, stat), ref, f"{stat} via group_pattern")
    rows_default = _stack_heads(easyroutine_attention_pattern_head(p, GROUPS, GROUPS, stat))
    assert_close(ex.attention_pattern_head(p, GROUPS, avg=stat), rows_default, f"{stat}, rows = column groups")


def test_negative_positions_are_resolved_first(patterns):
    """easyroutine computes baseline_ratio on the positions as given, so -1 (the last row) gets the
    baseline of a row that may attend to nothing; ours resolves positions first. Mean and sum
    (plain indexing) agree with easyroutine either way."""
    p = np.asarray(patterns["pattern", 1])
    neg_cols, neg_rows = [(1, -5), (-4,)], [(0, -1), (-3,)]
    cols, rows = [(1, 3), (4,)], [(0, 7), (5,)]
    for stat in ("mean", "sum", "baseline_ratio"):
        ref = _stack_heads(easyroutine_attention_pattern_head(p, cols, rows, stat))
        assert_close(ex.attention_pattern_head(p, neg_cols, neg_rows, stat), ref, f"{stat} (negative positions)")
    literal = _stack_heads(easyroutine_attention_pattern_head(p, neg_cols, neg_rows, "baseline_ratio"))
    assert not np.allclose(literal, ex.attention_pattern_head(p, neg_cols, neg_rows, "baseline_ratio"))


def test_pattern_raw_blocks_and_flattened(patterns):
    """'none': the flattened pattern without a row partition; with one, easyroutine's raw blocks
    concatenated along the rows (column groups of one size, as its torch.cat needs)."""
    p = np.asarray(patterns["pattern", 0])
    assert_close(ex.attention_pattern_head(p, GROUPS), _stack_heads(easyroutine_attention_pattern_head(p, GROUPS, None,
                                                                                                     "none")), "flat")
    cols = [(1, 3), (4, 4), (2, -1)]
    ref = _stack_heads(easyroutine_attention_pattern_head(p, cols, ROWS, "none"))
    got = ex.attention_pattern_head(p, cols, ROWS, "none")
    assert got.shape == (2, p.shape[1], len(cols) * sum(map(len, ROWS)), 2)
    assert_close(got, ref, "raw blocks")
    with pytest.raises(ValueError, match="column groups of one size"):
        ex.attention_pattern_head(p, GROUPS, ROWS, "none")
    with pytest.raises(ValueError, match="avg must be"):
        ex.attention_pattern_head(p, GROUPS, avg="median")


def test_extract_patterns(llama, patterns):
    m, _ = llama
    full = np.asarray(patterns["pattern", 1])
    out = ex.extract(m, TOKS, GROUPS, what="attn_pattern", layers=[1], heads=[0, 3], pattern_stat="baseline_ratio",
                     row_groups=ROWS)
    assert sorted(out) == ["pattern_L1H0", "pattern_L1H3"]
    ref = easyroutine_attention_pattern_head(full, GROUPS, ROWS, "baseline_ratio")
    assert_close(out["pattern_L1H3"], ref[3], "baseline ratio via extract")
    for stat in (None, "none"):
        flat = ex.extract(m, TOKS, GROUPS, what="attn_pattern", layers=[1], heads=2, pattern_stat=stat)
        assert_close(flat["pattern_L1H2"], full[:, 2][:, FLAT][:, :, FLAT], "flattened")
    cols = [(1, 3), (4, 5)]
    raw = ex.extract(m, TOKS, cols, what="attn_pattern", layers=[1], heads=1, pattern_stat="none", row_groups=ROWS)
    assert_close(raw["pattern_L1H1"], easyroutine_attention_pattern_head(full, cols, ROWS, "none")[1], "raw blocks")


def test_running_pattern_average_matches_easyroutine(llama, patterns):
    """Three batches through the running mean (`RunningStats`, one sample per batch); value
    weighting by key norms and, as easyroutine's code does it, by query norms."""
    m, _ = llama
    groups = [(1, 2), (5,)]
    idx = [1, 2, 5]
    W_O, b_O = np.asarray(m.W_O), np.asarray(m.b_O)
    batches = []
    for scale in (1.0, 0.5, 2.0):  # three "batches": patterns and values scaled differently
        pat = np.asarray(patterns["pattern", 1]) ** scale
        pat = pat / pat.sum(-1, keepdims=True)
        v = np.repeat(np.asarray(patterns["v", 1]) * scale, m.cfg.n_heads // m.cfg.n_kv_heads, axis=2)
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
        assert isinstance(state, agg.RunningStats)
        assert (np.asarray(state.count["pattern"]) == 3).all()
        for h in ref_avg:
            assert_close(state.mean["pattern"][:, h], ref_avg[h], f"avg pattern H{h}")
            assert_close(state.mean["value_weighted"][:, h], ref_val[h], f"value weighted H{h} ({weight_by})")
        three = np.stack([pat[:, :, idx][:, :, :, idx] for pat, _ in batches])
        assert_close(state.variance()["pattern"], three.var(0), "variance over the batches", atol=1e-6)


def test_position_statistics():
    x = np.random.default_rng(0).normal(size=(2, 5, 16)).astype(np.float32)
    mean, var, second = ex.position_statistics(x)
    assert mean.shape == var.shape == second.shape == (2, 5)
    assert_close(mean, x.mean(-1), "mean")
    assert_close(second, (x**2).mean(-1), "second moment")
    assert_close(var, x.var(-1), "variance", atol=1e-5)


def test_embedding_with_grad_matches_torch(hf_root):
    path, model = built("gpt2", hf_root)
    m = jaxlens.from_pretrained_no_processing(path)
    metric = lambda lg: lg[:, -1, 3].sum()
    emb, grad = ex.embedding_with_grad(m, TOKS, metric, [(1, 2), (6,)], avg=True)
    e = model.get_input_embeddings()(torch.tensor(TOKS, dtype=torch.long)).detach().requires_grad_(True)
    model(inputs_embeds=e).logits[:, -1, 3].sum().backward()
    assert_close(emb, _select(e.detach(), [(1, 2), (6,)], True, 1).numpy(), "embedding")
    assert_close(grad, _select(e.grad, [(1, 2), (6,)], True, 1).numpy(), "gradient")


def easyroutine_attn_mat(b, q_positions, k_positions, heads, multiplication_value):
    """A literal port of easyroutine's `intervention_attn_mat_hook` (ablation branch), numpy."""
    b = np.array(b)
    _, _, seq_len_q, seq_len_k = b.shape
    if seq_len_q < len(q_positions):  # "Used during generation"
        q_positions = 0
    q_mask = np.zeros(seq_len_q, bool)
    q_mask[q_positions] = True
    k_mask = np.zeros(seq_len_k, bool)
    k_mask[k_positions] = True
    head_mask = np.outer(q_mask, k_mask)
    for head in heads:
        b[:, head, head_mask] = b[:, head, head_mask] * multiplication_value
    return b


def test_attention_matrix_edit_on_a_single_query_row():
    """A generation step's pattern has one query row (the newest token): easyroutine maps the
    query positions onto row 0; so do we. Full patterns are edited at the listed rows."""
    rng = np.random.default_rng(0)
    hook = HookPoint("blocks.0.attn.hook_pattern", 0)
    step = rng.random((2, 4, 1, 9)).astype(np.float32)
    edit = iv.intervention_attn_mat([1, 3], [3, 5], [0, 2, -1], multiplier=0.3)
    ref = easyroutine_attn_mat(step, [3, 5], [0, 2, -1], [1, 3], 0.3)
    assert_close(edit(step, hook), ref, "one query row")
    assert not np.allclose(ref, step)
    # one listed position: easyroutine indexes the row directly (only 0 / -1 exist); ours maps it onto row 0 too
    assert_close(iv.intervention_attn_mat([2], [-1], [4], 0.0)(step, hook), easyroutine_attn_mat(step, [-1], [4], [2], 0.0),
                 "q = -1")
    assert_close(iv.intervention_attn_mat([2], [6], [4], 0.0)(step, hook), easyroutine_attn_mat(step, [0], [4], [2], 0.0),
                 "q = 6 in a generation step")
    full = rng.random((2, 4, 9, 9)).astype(np.float32)
    assert_close(edit(full, hook), easyroutine_attn_mat(full, [3, 5], [0, 2, -1], [1, 3], 0.3), "full pattern")


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
    with pytest.raises(ValueError, match="unknown what.*did you mean 'attn_pattern'.*ExtractionConfig"):
        ex.extract(m, TOKS, [(1,)], what="pattern")  # easyroutine's flag is extract_attn_pattern
    with pytest.raises(ValueError, match="pattern_stat must be"):
        ex.extract(m, TOKS, [(1,)], what="attn_pattern", pattern_stat="median")
    with pytest.raises(ValueError, match="layers \\[5\\] out of range"):
        ex.extract(m, TOKS, [(1,)], layers=[5])
    with pytest.raises(ValueError, match="heads"):
        ex.extract(m, TOKS, [(1,)], what="head_queries", heads=[7])
    with pytest.raises(ValueError, match="method="):
        agg.group_pattern(np.zeros((1, 1, 4, 4)), [(0,)], method="max")
    state = ex.running_pattern_average(None, np.ones((1, 2, 4, 4)) / 4, [(0, 1)])
    with pytest.raises(ValueError, match="same size"):
        ex.running_pattern_average(state, np.ones((2, 2, 4, 4)) / 4, [(0, 1)])
    with pytest.raises(ValueError, match="on every batch or on none"):
        ex.running_pattern_average(state, np.ones((1, 2, 4, 4)) / 4, [(0, 1)], np.ones((1, 2, 4, 3)))
    with pytest.raises(ValueError, match="weight_by"):
        ex.value_weighted_pattern(np.ones((1, 1, 2, 2)), np.ones((1, 1, 2, 3)), weight_by="both")
