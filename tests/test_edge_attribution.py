"""`jaxlens.attribution_patch` / `faithfulness` (TransformerLens 4.3's tools.analysis.attribution_patching)
against TL's own tool on the same processed weights: node and edge scores key by key and in TL's
order, top_edges, faithfulness with corrupt and mean replacements and its per-class breakout, the
parallel-block graph (GPT-NeoX), GQA and post-norm refusals, and every error path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jaxlens
from conftest import boot_bridge, built
from jaxlens.edits import edge_attribution as ea

CLEAN = np.array([[0, 5, 9, 30, 2, 7], [0, 17, 250, 8, 4, 61]])
CORRUPT = np.array([[0, 5, 9, 31, 2, 8], [0, 17, 251, 8, 3, 61]])
MEAN = np.array([[0, 3, 4, 5, 6, 7], [0, 8, 9, 10, 11, 12], [0, 40, 41, 42, 43, 44]])


def metric(logits):  # one row's logits [1 seq vocab] -> a scalar (a logit difference)
    return logits[0, -1, 5] - logits[0, -1, 7]


def _key(node):
    return (node.kind, node.position, node.layer, node.head)


def _tl_node(node):
    from transformer_lens.tools.analysis.attribution_patching import Node as TLNode
    return TLNode(node.kind, node.position, node.layer, node.head)


@pytest.fixture(scope="module", params=["gpt2", "gpt_neox"])
def pair(request, hf_root):
    path, _ = built(request.param, hf_root)
    return jaxlens.from_pretrained(path), boot_bridge(path, processed=True)


def _close(got: dict, want: dict, what: str, rel: float = 2e-6) -> None:
    assert list(got) == list(want), f"{what}: keys or their order differ"
    scale = max(abs(v) for v in want.values())
    worst = max(abs(got[k] - want[k]) for k in want)
    assert worst <= rel * scale + 1e-7, f"{what}: worst difference {worst:.3g} at scale {scale:.3g}"


@pytest.mark.parametrize("granularity", ["node", "edge"])
def test_scores_match_transformer_lens(pair, granularity):
    from transformer_lens.tools.analysis import attribution_patching as tap

    model, bridge = pair
    want = tap.attribution_patch(bridge, torch.tensor(CLEAN), torch.tensor(CORRUPT), metric,
                                 tap.EdgeAttributionConfig(granularity=granularity))
    got = jaxlens.attribution_patch(model, CLEAN, CORRUPT, metric, jaxlens.EdgeAttributionConfig(granularity))
    _close({_key(n): v for n, v in got.node_scores.items()}, {_key(n): v for n, v in want.node_scores.items()}, "nodes")
    assert all(isinstance(v, float) for v in got.node_scores.values())
    if granularity == "node":
        assert got.edge_scores == {}
        return
    _close({(_key(a), _key(b)): v for (a, b), v in got.edge_scores.items()},
           {(_key(a), _key(b)): v for (a, b), v in want.edge_scores.items()}, "edges")
    assert [(_key(a), _key(b)) for a, b, _ in got.top_edges(15)] == [(_key(a), _key(b)) for a, b, _ in want.top_edges(15)]
    assert [_key(n) for n, _ in got.top_nodes(5)] == [_key(n) for n, _ in want.top_nodes(5)]


def test_edges_sum_to_the_node_scores(pair):
    model, _ = pair
    nodes = jaxlens.attribution_patch(model, CLEAN, CORRUPT, metric).node_scores
    edges = jaxlens.attribution_patch(model, CLEAN, CORRUPT, metric, jaxlens.EdgeAttributionConfig("edge")).node_scores
    assert set(nodes) == set(edges)
    scale = max(abs(v) for v in nodes.values())
    assert max(abs(nodes[n] - edges[n]) for n in nodes) < 2e-6 * scale


@pytest.mark.parametrize("ablation", ["corrupt", "mean"])
def test_faithfulness_matches_transformer_lens(pair, ablation):
    from transformer_lens.tools.analysis import attribution_patching as tap

    model, bridge = pair
    circuit = jaxlens.attribution_patch(model, CLEAN, CORRUPT, metric, jaxlens.EdgeAttributionConfig("edge")).top_edges(30)
    kw = dict(mean_tokens=MEAN) if ablation == "mean" else {}
    want = tap.faithfulness(bridge, torch.tensor(CLEAN[:1]), torch.tensor(CORRUPT[:1]), metric,
                            [(_tl_node(w), _tl_node(r), s) for w, r, s in circuit], tap.FaithfulnessConfig(ablation),
                            **{k: torch.tensor(v) for k, v in kw.items()})
    got = jaxlens.faithfulness(model, CLEAN[:1], CORRUPT[:1], metric, circuit, jaxlens.FaithfulnessConfig(ablation), **kw)
    for field in ("recovered", "full_metric", "corrupt_metric"):
        assert abs(getattr(got, field) - getattr(want, field)) < 2e-5, field
    assert (got.circuit_size, got.total_edges, got.edge_class_counts) == (30, want.total_edges, want.edge_class_counts)
    assert list(got.edge_class_recovered) == list(want.edge_class_recovered)
    for c, v in want.edge_class_recovered.items():
        assert abs(got.edge_class_recovered[c] - v) < 2e-5, c


def test_faithfulness_of_no_circuit_and_of_the_whole_graph(pair):
    model, _ = pair
    edges = list(jaxlens.attribution_patch(model, CLEAN[:1], CORRUPT[:1], metric,
                                           jaxlens.EdgeAttributionConfig("edge")).edge_scores)
    none = jaxlens.faithfulness(model, CLEAN[:1], CORRUPT[:1], metric, [])
    assert abs(none.recovered) < 1e-5  # every edge ablated: the corrupted run, rebuilt exactly
    whole = jaxlens.faithfulness(model, CLEAN[:1], CORRUPT[:1], metric, edges + edges[:3])  # duplicates count once
    assert abs(whole.recovered - 1) < 1e-6 and whole.circuit_size == whole.total_edges == len(edges)


def test_cache_activation_and_gradient_matches_transformer_lens(pair):
    from transformer_lens.tools.analysis import attribution_patching as tap

    model, bridge = pair
    batch_metric = lambda lg: lg[:, -1, 5].sum() - lg[0, 2, 9]  # noqa: E731 - reads the whole batch
    want = tap.cache_activation_and_gradient(bridge, torch.tensor(CORRUPT), batch_metric)
    got = ea.cache_activation_and_gradient(model, CORRUPT, batch_metric)
    assert set(got.activations) == set(want.activations) and abs(float(got.metric) - float(want.metric)) < 1e-5
    for name in want.activations:
        np.testing.assert_allclose(np.asarray(got.activations[name]), want.activations[name].numpy(), atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(got.gradients[name]), want.gradients[name].numpy(), atol=2e-6, rtol=1e-4)
    plain = ea.cache_activation_and_gradient(model, CORRUPT, batch_metric, names_filter="hook_embed", compute_gradient=False)
    assert list(plain.activations) == ["hook_embed"] and plain.gradients == {"hook_embed": None}
    assert len(ea.enumerate_nodes(model, got)) == 6 * (1 + model.cfg.n_layers * (model.cfg.n_heads + 1))
    with pytest.raises(ValueError, match="edge graph requires hook points missing from the cache"):
        ea.enumerate_edges(model, got)


def test_node_scores_under_gqa_and_edge_refusals(hf_root):
    from transformer_lens.tools.analysis import attribution_patching as tap

    path, _ = built("llama", hf_root)
    model, bridge = jaxlens.from_pretrained(path), boot_bridge(path, processed=True)
    want = tap.attribution_patch(bridge, torch.tensor(CLEAN), torch.tensor(CORRUPT), metric)
    got = jaxlens.attribution_patch(model, CLEAN, CORRUPT, metric)
    _close({_key(n): v for n, v in got.node_scores.items()}, {_key(n): v for n, v in want.node_scores.items()}, "nodes")
    assert model.cfg.n_key_value_heads < model.cfg.n_heads  # the test config is GQA
    with pytest.raises(ValueError, match=r"\(GQA/MQA\), so its K/V inputs are not per query head"):
        jaxlens.attribution_patch(model, CLEAN, CORRUPT, metric, jaxlens.EdgeAttributionConfig("edge"))
    post, _ = built("olmo2", hf_root)
    with pytest.raises(ValueError, match="normalized or scaled before the residual add"):
        jaxlens.faithfulness(jaxlens.from_pretrained_no_processing(post), CLEAN[:1], CORRUPT[:1], metric, [])


def test_errors(pair):
    model, _ = pair
    ap, fa = jaxlens.attribution_patch, jaxlens.faithfulness
    with pytest.raises(ValueError, match="expects 2D"):
        ap(model, CLEAN[0], CORRUPT[0], metric)
    with pytest.raises(ValueError, match="same number of prompt pairs"):
        ap(model, CLEAN, CORRUPT[:1], metric)
    with pytest.raises(ValueError, match="same length"):
        ap(model, CLEAN, CORRUPT[:, :4], metric)
    with pytest.raises(ValueError, match="out of range|vocab"):
        ap(model, CLEAN, CORRUPT + 10**6, metric)
    with pytest.raises(ValueError, match="must return a scalar"):
        ap(model, CLEAN, CORRUPT, lambda lg: lg[0, -1])
    with pytest.raises(NotImplementedError, match="EAP-IG"):
        jaxlens.EdgeAttributionConfig("edge", ig_steps=3)
    with pytest.raises(ValueError, match="granularity must be one of"):
        jaxlens.EdgeAttributionConfig("neuron")
    with pytest.raises(ValueError, match="ablation must be one of"):
        jaxlens.FaithfulnessConfig("zero")
    for bad, msg in ((dict(kind="embed", position=0, layer=1), "neither layer nor head"),
                     (dict(kind="attn_head_out", position=0, layer=1), "need both layer and head"),
                     (dict(kind="mlp_in", position=0, layer=0, head=1), "take no head"),
                     (dict(kind="resid", position=0), "unknown node kind")):
        with pytest.raises(ValueError, match=msg):
            jaxlens.Node(**bad)
    assert jaxlens.Node("q_input", 0, 1, 2).hook_name == "blocks.1.hook_q_input"
    assert jaxlens.Node("attn_head_out", 0, 1, 2).hook_name == "blocks.1.attn.hook_z"
    with pytest.raises(ValueError, match="one clean/corrupt pair at a time"):
        fa(model, CLEAN, CORRUPT, metric, [])
    stranger = (jaxlens.Node("mlp_out", 3, 1), jaxlens.Node("mlp_in", 3, 0))  # upstream of its writer
    with pytest.raises(ValueError, match="not in the graph"):
        fa(model, CLEAN[:1], CORRUPT[:1], metric, [stranger])
    with pytest.raises(ValueError, match=r"\(writer, reader\) or \(writer, reader, score\)"):
        fa(model, CLEAN[:1], CORRUPT[:1], metric, [(stranger[0],)])
    with pytest.raises(ValueError, match="same metric"):
        fa(model, CLEAN[:1], CLEAN[:1], metric, [])
    with pytest.raises(ValueError, match="requires independent calibration via mean_tokens"):
        fa(model, CLEAN[:1], CORRUPT[:1], metric, [], jaxlens.FaithfulnessConfig("mean"))
    with pytest.raises(ValueError, match="only accepted with mean ablation"):
        fa(model, CLEAN[:1], CORRUPT[:1], metric, [], mean_tokens=MEAN)
    mean = jaxlens.FaithfulnessConfig("mean")
    for bad, msg in ((MEAN[:, :4], "same sequence length"), (MEAN[0], "2D"), (MEAN[:0], "at least one"),
                     (MEAN.astype(np.float32), "integer token ids"), (np.vstack([MEAN, CLEAN[:1]]), "endpoint")):
        with pytest.raises(ValueError, match=msg):
            fa(model, CLEAN[:1], CORRUPT[:1], metric, [], mean, mean_tokens=bad)


def test_scanned_layers_give_the_same(hf_root):
    path, _ = built("gpt2", hf_root)
    plain, scanned = jaxlens.from_pretrained(path), jaxlens.from_pretrained(path, scan_layers=True)
    edge = jaxlens.EdgeAttributionConfig("edge")
    a, b = (jaxlens.attribution_patch(m, CLEAN, CORRUPT, metric, edge) for m in (plain, scanned))
    assert max(abs(a.edge_scores[k] - b.edge_scores[k]) for k in a.edge_scores) < 1e-6
    circuit = a.top_edges(12)
    fa, fb = (jaxlens.faithfulness(m, CLEAN[:1], CORRUPT[:1], metric, circuit) for m in (plain, scanned))
    assert abs(fa.recovered - fb.recovered) < 1e-5 and fa.edge_class_recovered.keys() == fb.edge_class_recovered.keys()
