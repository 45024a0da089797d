"""Mixture-of-experts blocks (jaxlens.model.moe): HF parity of the block alone (Mixtral's and
Qwen3-MoE's), every dispatch equal to the naive every-expert computation, routing hooks against
TransformerLens 4.3's bridge, expert ablation and forced routing against a direct computation,
and a scanned model equal to the unrolled one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jaxlens
from conftest import PROMPTS, assert_close, boot_bridge, built, padded
from jaxlens.hooks import RunCtx
from jaxlens.model.moe import MoE, dense_experts, ragged_experts, route, scatter_weights, sorted_experts

D, F, E = 16, 12, 6
M = "blocks.{l}.mlp."


def _block_cfg(k: int, norm: bool) -> jaxlens.ModelConfig:
    return jaxlens.ModelConfig(model_type="moe-test", d_model=D, n_layers=1, n_heads=2, d_head=8, d_mlp=F,
                               d_vocab=10, n_ctx=16, act_fn="silu", gated_mlp=True, use_mlp_bias=False,
                               num_experts=E, experts_per_token=k, norm_topk_prob=norm)


def _hf_block(kind: str, k: int, norm: bool, seed: int):
    """A HF sparse-MoE block with random weights, and the same weights in MoE's layout."""
    if kind == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        blk = MixtralSparseMoeBlock(transformers.MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E,
                                                               num_experts_per_tok=k))
    else:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
        blk = Qwen3MoeSparseMoeBlock(transformers.Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=F, num_experts=E,
                                                                 num_experts_per_tok=k, norm_topk_prob=norm))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in blk.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    blk.eval()
    gu = blk.experts.gate_up_proj.detach().numpy()
    params = {"W_router": blk.gate.weight.detach().numpy().T, "W_gate": gu[:, :F].transpose(0, 2, 1),
              "W_in": gu[:, F:].transpose(0, 2, 1), "W_out": blk.experts.down_proj.detach().numpy().transpose(0, 2, 1)}
    return blk, jax.tree.map(jnp.asarray, params)


def _apply(cfg, params, x, dispatch="auto", capture=frozenset()):
    out, inter = MoE(cfg, dispatch=dispatch).apply({"params": params}, x, RunCtx(capture=capture, layer=0),
                                                   mutable=["intermediates"])
    return out, inter


BLOCKS = [("mixtral", 2, True), ("mixtral", 1, True), ("qwen3_moe", 2, True), ("qwen3_moe", 2, False),
          ("qwen3_moe", 3, False)]


@pytest.mark.parametrize("kind,k,norm", BLOCKS)
def test_block_matches_hf(kind, k, norm):
    blk, params = _hf_block(kind, k, norm, seed=k + 10 * norm)
    x = np.random.default_rng(0).normal(size=(3, 7, D)).astype(np.float32)
    with torch.no_grad():
        ref = blk(torch.tensor(x)).numpy()
    cfg = _block_cfg(k, norm)
    for dispatch in ("sorted", "ragged", "dense"):
        out, _ = _apply(cfg, params, jnp.asarray(x), dispatch)
        assert_close(out, ref, f"{kind} k={k} norm={norm} {dispatch}")
    # the switch is live: renormalising (or not) changes the output
    other, _ = _apply(_block_cfg(k, not norm), params, jnp.asarray(x))
    assert np.abs(np.asarray(other) - ref).max() > 1e-3


def test_routing_matches_hf_router():
    blk, params = _hf_block("qwen3_moe", 2, False, seed=3)
    x = np.random.default_rng(1).normal(size=(20, D)).astype(np.float32)
    with torch.no_grad():
        logits, w_ref, i_ref = blk.gate(torch.tensor(x))
    w, i = route(jnp.asarray(x) @ params["W_router"], 2, False)
    assert_close(w, w_ref.numpy(), "weights")
    np.testing.assert_array_equal(np.asarray(i), i_ref.numpy())


@pytest.mark.parametrize("T,k,block", [(1, 1, None), (5, 2, None), (37, 2, 8), (64, 3, 16), (9, 6, 8)])
def test_dispatches_equal_every_expert_on_every_token(T, k, block):
    """The sorted (tiled) and ragged dispatches equal the naive computation, jitted, for skewed routing too
    (every token sent to expert 0 among its k: one expert's run spans several tiles)."""
    rng = np.random.default_rng(T)
    x = jnp.asarray(rng.normal(size=(T, D)).astype(np.float32))
    W = [jnp.asarray(rng.normal(0, 0.3, size=s).astype(np.float32)) for s in ((E, D, F), (E, D, F), (E, F, D))]
    rand = jnp.asarray(np.argsort(rng.random((T, E)), -1)[:, :k].astype(np.int32))
    skewed = rand.at[:, 0].set(0).at[:, 1:].set(jnp.maximum(rand[:, 1:], 1)) if k > 1 else jnp.zeros((T, 1), jnp.int32)
    for idx in (rand, skewed):
        ref = dense_experts(x, idx, *W, "silu")
        assert_close(jax.jit(sorted_experts, static_argnums=(5, 6))(x, idx, *W, "silu", block), ref, "sorted")
        assert_close(jax.jit(ragged_experts, static_argnums=5)(x, idx, *W, "silu"), ref, "ragged")


def test_sorted_dispatch_never_runs_every_expert_on_every_token():
    """The tiled dispatch multiplies at most ceil(T*k/block) + E tiles of `block` rows: far fewer
    rows than E*T for many tokens (the naive cost)."""
    T, k = 512, 2
    x = jnp.zeros((T, D))
    idx = jnp.zeros((T, k), jnp.int32)
    W = (jnp.zeros((E, D, F)), jnp.zeros((E, D, F)), jnp.zeros((E, F, D)))
    jaxpr = jax.make_jaxpr(sorted_experts, static_argnums=(5, 6))(x, idx, *W, "silu", 64).jaxpr
    scans = [q for q in jaxpr.eqns if q.primitive.name == "scan"]
    assert len(scans) == 1 and scans[0].params["length"] == (T * k + 63) // 64 + E

    body = scans[0].params["jaxpr"].jaxpr
    shapes = [tuple(v.aval.shape) for q in body.eqns if q.primitive.name == "dot_general" for v in q.invars]
    assert shapes and all(s[0] in (64, D, F) and s != (E, T, D) for s in shapes), shapes
    assert not [q for q in jaxpr.eqns if q.primitive.name == "dot_general"], "no matmul outside the tiles"


# --- the mixtral model: TL hooks, routing that matters, edits, scan -------------------------------

@pytest.fixture(scope="module")
def mixtral(hf_root):
    path, hf = built("mixtral", hf_root)
    return path, hf, jaxlens.from_pretrained_no_processing(path)


def test_mixtral_routing_changes_the_output(mixtral):
    path, hf, m = mixtral
    toks = np.array([PROMPTS[0]], np.int32)
    base = np.asarray(m(toks))
    top1 = jaxlens.HookedTransformer(m.cfg.replace(experts_per_token=1), m.params, None)
    assert np.abs(np.asarray(top1(toks)) - base).max() > 1e-2, "top-1 routing should change the logits"
    _, cache = m.run_with_cache(toks, names_filter=lambda n: "expert_indices" in n)
    used = np.unique(np.concatenate([np.asarray(cache[f"blocks.{l}.mlp.hook_expert_indices"]).ravel()
                                     for l in range(m.cfg.n_layers)]))
    assert len(used) == m.cfg.num_experts, "the random config should route to every expert somewhere"


def test_mixtral_hooks_match_bridge(mixtral):
    """Every MoE hook the bridge has (its gate.* aliases included) equals ours, with its shape."""
    path, _, m = mixtral
    toks = np.array([PROMPTS[0]], np.int32)
    bridge = boot_bridge(path, processed=False)
    with torch.no_grad():
        ref_logits, ref = bridge.run_with_cache(torch.tensor(toks, dtype=torch.long))
    logits, cache = m.run_with_cache(toks)
    assert_close(logits, ref_logits.numpy(), "logits")
    for l in range(m.cfg.n_layers):
        p = M.format(l=l)
        pairs = {p + "hook_pre": p + "hook_pre", p + "hook_post": p + "hook_post", p + "gate.hook_out": p + "gate.hook_out",
                 p + "hook_expert_weights": p + "hook_expert_weights", p + "gate.hook_expert_weights": p + "hook_expert_weights",
                 p + "hook_expert_indices": p + "hook_expert_indices", p + "gate.hook_expert_indices": p + "hook_expert_indices",
                 p + "hook_in": p + "hook_pre", p + "hook_out": p + "hook_post"}
        for theirs, ours in pairs.items():
            assert_close(cache[ours], ref[theirs].numpy(), theirs)
        assert cache[p + "hook_expert_weights"].shape == (toks.size, m.cfg.num_experts)
        assert cache[p + "hook_expert_indices"].shape == (toks.size, m.cfg.experts_per_token)
        assert cache[p + "hook_expert_outputs"].shape == (toks.size, m.cfg.experts_per_token, m.cfg.d_model)
        assert_close(cache[f"blocks.{l}.hook_mlp_out"], cache[p + "hook_post"], "mlp_out")


def test_flattened_hooks_padded_equal_alone(mixtral):
    """[tokens ...] hooks (tokens = batch*pos) of a padded batch equal each prompt run alone, at real tokens."""
    _, _, m = mixtral
    for side in ("left",):  # (right padding: tests/test_parity.py's padded test, every hook)
        toks, mask = padded(side)
        _, batch = m.run_with_cache(toks, attention_mask=mask, names_filter=lambda n: ".mlp.h" in n or "gate" in n)
        B, n = toks.shape
        for i, p in enumerate(PROMPTS):
            _, alone = m.run_with_cache(np.array([p], np.int32), names_filter=lambda n: ".mlp.h" in n or "gate" in n)
            off = n - len(p) if side == "left" else 0
            for name in alone.keys():
                b = np.asarray(batch[name])
                if name.endswith(("hook_pre", "hook_post")):
                    b, a = b[i], np.asarray(alone[name])[0]
                else:
                    b, a = b.reshape(B, n, *b.shape[1:])[i], np.asarray(alone[name])
                assert_close(b[off:off + len(p)], a, f"{name} {side} row {i}")


def _expert_fn(params, l):
    mp = params[f"blocks_{l}"]["mlp"]
    return lambda x, idx: dense_experts(x, idx, mp["W_gate"], mp["W_in"], mp["W_out"], "silu")


def test_ablate_an_expert(mixtral):
    """Zeroing column e of hook_expert_weights removes expert e and keeps the other weights (the
    bridge's rule: the edited weights are used as they are)."""
    _, _, m = mixtral
    toks = np.array([PROMPTS[0]], np.int32)
    l, e = 1, 2
    p = M.format(l=l)
    _, clean = m.run_with_cache(toks)

    def ablate(w, hook):
        return w.at[:, e].set(0.0)

    _, cache = m.run_with_cache(toks, fwd_hooks=[(p + "hook_expert_weights", ablate)])
    x = np.asarray(cache[p + "hook_pre"]).reshape(-1, m.cfg.d_model)
    w = np.asarray(clean[p + "hook_expert_weights"]).copy()
    w[:, e] = 0
    idx = np.asarray(clean[p + "hook_expert_indices"])
    ys = np.asarray(_expert_fn(m.params, l)(jnp.asarray(x), jnp.asarray(idx)))
    direct = np.einsum("tk,tkd->td", np.take_along_axis(w, idx, -1), ys)
    assert_close(np.asarray(cache[p + "hook_post"]).reshape(-1, m.cfg.d_model), direct, "ablated output")
    hit = (idx == e).any(-1)
    assert hit.any(), "expert e should be routed to by some token"
    assert not np.allclose(np.asarray(cache[p + "hook_post"]), np.asarray(clean[p + "hook_post"]))
    ew = np.asarray(cache[p + "hook_expert_weights"])
    assert (ew[:, e] == 0).all()
    # the same ablation through hook_expert_outputs [tokens k d_model]: zero the slots routed to e
    sel = jnp.asarray(idx == e)

    def zero_outputs(y, hook):
        return jnp.where(sel[..., None], 0.0, y)

    _, by_outputs = m.run_with_cache(toks, names_filter=[p + "hook_post"], fwd_hooks=[(p + "hook_expert_outputs", zero_outputs)])
    assert_close(by_outputs[p + "hook_post"], cache[p + "hook_post"], "ablation through hook_expert_outputs")


def test_force_routing_through_router_logits(mixtral):
    """Raising expert e's router logit re-routes every token to e (softmax and top-k read the edit)."""
    _, _, m = mixtral
    toks = np.array([PROMPTS[0]], np.int32)
    l, e = 0, 3
    p = M.format(l=l)

    def force(z, hook):
        return z.at[:, e].add(5.0)

    _, cache = m.run_with_cache(toks, fwd_hooks=[(p + "gate.hook_out", force)])
    logits = np.asarray(cache[p + "gate.hook_out"])
    w, idx = route(jnp.asarray(logits), m.cfg.experts_per_token, True)
    assert (np.asarray(idx)[:, 0] == e).all()
    np.testing.assert_array_equal(np.asarray(cache[p + "hook_expert_indices"]), np.asarray(idx))
    x = jnp.asarray(np.asarray(cache[p + "hook_pre"]).reshape(-1, m.cfg.d_model))
    direct = jnp.einsum("tk,tkd->td", w, _expert_fn(m.params, l)(x, idx))
    assert_close(np.asarray(cache[p + "hook_post"]).reshape(-1, m.cfg.d_model), direct, "re-routed output")
    assert_close(cache[p + "hook_expert_weights"], scatter_weights(w, idx, m.cfg.num_experts), "weights")


def test_force_routing_through_weights_and_indices(mixtral):
    """Boosting a weight re-derives the top-k from the edited weights; editing the indices picks
    each slot's weight from hook_expert_weights at the new expert."""
    _, _, m = mixtral
    toks = np.array([PROMPTS[0]], np.int32)
    p = M.format(l=0)
    _, clean = m.run_with_cache(toks)
    x = jnp.asarray(np.asarray(clean[p + "hook_pre"]).reshape(-1, m.cfg.d_model))
    run = _expert_fn(m.params, 0)
    T = x.shape[0]

    def boost(w, hook):
        return w.at[:, 1].set(2.0)

    _, c1 = m.run_with_cache(toks, fwd_hooks=[(p + "hook_expert_weights", boost)])
    w = np.asarray(clean[p + "hook_expert_weights"]).copy()
    w[:, 1] = 2.0
    idx = np.asarray(jax.lax.top_k(jnp.asarray(w), 2)[1])
    assert (idx[:, 0] == 1).all()
    np.testing.assert_array_equal(np.asarray(c1[p + "hook_expert_indices"]), idx)
    direct = np.einsum("tk,tkd->td", np.take_along_axis(w, idx, -1), np.asarray(run(x, jnp.asarray(idx))))
    assert_close(np.asarray(c1[p + "hook_post"]).reshape(T, -1), direct, "boosted")

    forced = np.tile(np.array([[0, 3]], np.int32), (T, 1))

    def set_indices(i, hook):
        return jnp.zeros_like(i) + jnp.asarray([0, 3], i.dtype)

    _, c2 = m.run_with_cache(toks, fwd_hooks=[(p + "hook_expert_indices", set_indices)])
    w = np.asarray(clean[p + "hook_expert_weights"])
    direct = np.einsum("tk,tkd->td", np.take_along_axis(w, forced, -1), np.asarray(run(x, jnp.asarray(forced))))
    assert_close(np.asarray(c2[p + "hook_post"]).reshape(T, -1), direct, "forced indices")
    assert not np.allclose(direct, np.asarray(clean[p + "hook_post"]).reshape(T, -1))


def test_mixtral_scan_equals_unrolled(mixtral):
    path, _, m = mixtral
    toks, mask = padded("left")
    scanned = jaxlens.from_pretrained_no_processing(path, scan_layers=True)
    la, ca = m.run_with_cache(toks, attention_mask=mask)
    lb, cb = scanned.run_with_cache(toks, attention_mask=mask)
    assert_close(la, lb, "logits")
    assert set(ca.keys()) == set(cb.keys())
    for k in ca.keys():
        assert_close(ca[k], cb[k], k)

    def ablate(w, hook):
        return w.at[:, 2].set(0.0)

    hooks = [("blocks.1.mlp.hook_expert_weights", ablate)]
    assert_close(m.run_with_hooks(toks, fwd_hooks=hooks, attention_mask=mask),
                 scanned.run_with_hooks(toks, fwd_hooks=hooks, attention_mask=mask), "edited, scanned")


def test_mixtral_fused_checkpoint_layout(mixtral, tmp_path):
    """transformers 5's in-memory layout (mlp.experts.gate_up_proj / down_proj) converts to the same model."""
    from safetensors.numpy import load_file, save_file
    import shutil

    path, _, m = mixtral
    t = load_file(str(path / "model.safetensors"))
    out = {}
    for name, v in t.items():
        if ".block_sparse_moe." not in name:
            out[name] = v
    E, L = m.cfg.num_experts, m.cfg.n_layers
    for l in range(L):
        b = f"model.layers.{l}.block_sparse_moe."
        out[f"model.layers.{l}.mlp.gate.weight"] = t[b + "gate.weight"]
        w = lambda n, b=b: np.stack([t[f"{b}experts.{e}.{n}.weight"] for e in range(E)])  # noqa: E731
        out[f"model.layers.{l}.mlp.experts.gate_up_proj"] = np.concatenate([w("w1"), w("w3")], axis=1)
        out[f"model.layers.{l}.mlp.experts.down_proj"] = w("w2")
    for f in path.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, tmp_path / f.name)
    save_file(out, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    fused = jaxlens.from_pretrained_no_processing(tmp_path)
    toks = np.array([PROMPTS[0]], np.int32)
    assert_close(fused(toks), m(toks), "fused layout")


def test_mixtral_bad_config(mixtral, tmp_path):
    import json
    import shutil

    from jaxlens.conversion import CheckpointError, hf_config

    path, _, _ = mixtral
    for f in path.iterdir():
        shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((path / "config.json").read_text())
    for change, needle in (({"num_experts_per_tok": 9}, "num_experts_per_tok"), ({"mlp_bias": True}, "mlp_bias")):
        (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(CheckpointError, match=needle):
            hf_config(tmp_path)


def test_mixtral_processed_weights_and_hooks_match_bridge(mixtral):
    """fold_ln scales the router and every expert's W_gate / W_in by ln2 (TransformerLens 4.3's
    batched-expert fold); the processed model's MoE hooks equal the processed bridge's."""
    path, _, _ = mixtral
    m = jaxlens.from_pretrained(path)
    assert m.cfg.normalization_type == "RMSPre"
    bridge = boot_bridge(path, processed=True)
    F = m.cfg.d_mlp
    for l in range(m.cfg.n_layers):
        hf = bridge.blocks[l].mlp.original_component
        ours = m.params[f"blocks_{l}"]["mlp"]
        gu = hf.experts.gate_up_proj.detach().numpy()
        assert_close(ours["W_router"], hf.gate.weight.detach().numpy().T, "W_router")
        assert_close(ours["W_gate"], gu[:, :F].transpose(0, 2, 1), "W_gate")
        assert_close(ours["W_in"], gu[:, F:].transpose(0, 2, 1), "W_in")
        assert_close(ours["W_out"], hf.experts.down_proj.detach().numpy().transpose(0, 2, 1), "W_out")
    toks = np.array([PROMPTS[0]], np.int32)
    with torch.no_grad():
        ref_logits, ref = bridge.run_with_cache(torch.tensor(toks, dtype=torch.long))
    logits, cache = m.run_with_cache(toks)
    assert_close(logits, ref_logits.numpy(), "processed logits")
    for l in range(m.cfg.n_layers):
        p = M.format(l=l)
        for n in ("hook_pre", "gate.hook_out", "hook_expert_weights", "hook_expert_indices", "hook_post"):
            assert_close(cache[p + n], ref[p + n].numpy(), p + n)


def test_mixtral_neuron_analyses_name_the_fix(mixtral):
    """A routed MLP has no neuron basis: expanding neurons is an error naming expand_neurons=False
    (TransformerLens 4.3 fails there too); the per-layer decomposition works and sums to the residual."""
    _, _, m = mixtral
    _, cache = m.run_with_cache(np.array([PROMPTS[0]], np.int32))
    with pytest.raises(ValueError, match="expand_neurons=False"):
        cache.get_full_resid_decomposition()
    with pytest.raises(ValueError, match="mixture-of-experts"):
        cache.stack_neuron_results(1)
    with pytest.raises(ValueError, match="mixture-of-experts"):
        cache.get_neuron_results(0)
    full = cache.get_full_resid_decomposition(expand_neurons=False)
    assert_close(full.sum(0), cache["resid_post", m.cfg.n_layers - 1], "full decomposition sums")


def test_moe_params_reads_qwen3_moe_per_expert_names():
    """`conversion.experts.moe_params` (shared with the Qwen3-MoE converter) reads per-expert
    gate_proj / up_proj / down_proj under `mlp.experts.{e}` into MoE's layout."""
    from jaxlens.conversion.io import Tensors
    from jaxlens.conversion.experts import moe_params

    blk, params = _hf_block("qwen3_moe", 2, True, seed=5)
    gu, down = blk.experts.gate_up_proj.detach().numpy(), blk.experts.down_proj.detach().numpy()
    b = "model.layers.0.mlp."
    tensors = {b + "gate.weight": blk.gate.weight.detach().numpy()}
    for e in range(E):
        tensors.update({f"{b}experts.{e}.gate_proj.weight": gu[e, :F], f"{b}experts.{e}.up_proj.weight": gu[e, F:],
                        f"{b}experts.{e}.down_proj.weight": down[e]})
    t = Tensors(tensors, None, source="test")
    got = moe_params(t, 0, _block_cfg(2, True))
    for name in ("W_router", "W_gate", "W_in", "W_out"):
        np.testing.assert_array_equal(got[name], np.asarray(params[name]), err_msg=name)
    assert not t.leftovers(), "every expert tensor is read"
