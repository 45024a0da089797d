"""Projection Kernel against TransformerLens 4.3's (`transformer_lens.tools.analysis.projection_kernel`):
subspace extraction (spectrum, ranks, threshold, the basis up to sign), PK and principal angles
(basis-invariant, so compared directly), the random-plane moments, and the OQ/OK/OV head
affinities of a bridge on the same checkpoint (MHA and grouped-query: K and V per kv head); and
the errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jaxlens.model.projection_kernel as pk
from conftest import assert_close, boot_bridge, built

tlpk = pytest.importorskip("transformer_lens.tools.analysis.projection_kernel")


def _matrix(seed, shape, rank=None):
    rng = np.random.default_rng(seed)
    m = rng.standard_normal(shape).astype(np.float32)
    if rank is not None:  # an exactly rank-deficient matrix: repeated columns
        m[:, rank:] = m[:, :1]
    return m


@pytest.mark.parametrize("shape,rank,kw", [((20, 6), None, {}), ((20, 6), 3, {}), ((12, 5), None, {"rank": 2}),
                                           ((9, 9), None, {"rtol": 0.3})])
def test_orthonormal_subspace_and_projection_kernel_match(shape, rank, kw):
    a, b = _matrix(0, shape, rank), _matrix(1, shape)
    ours = [pk.orthonormal_subspace(x, **kw) for x in (a, b)]
    theirs = [tlpk.orthonormal_subspace(torch.from_numpy(x), **kw) for x in (a, b)]
    for o, t in zip(ours, theirs):
        assert (o.rank, o.measured_rank, o.input_shape) == (t.rank, t.measured_rank, t.input_shape)
        np.testing.assert_allclose(o.rtol, t.rtol, rtol=1e-12)
        np.testing.assert_allclose(o.threshold, t.threshold, rtol=1e-5)
        assert_close(o.singular_values, t.singular_values.numpy(), "spectrum")
        for i in range(o.rank):  # each singular vector up to sign
            ob, tb = np.asarray(o.basis[:, i]), t.basis[:, i].numpy()
            assert_close(np.sign(ob @ tb) * ob, tb, f"basis column {i}", rtol=1e-4, atol=1e-5)
    ro, rt = pk.projection_kernel(*ours), tlpk.projection_kernel(*theirs)
    for f in ("score", "normalized", "cosines"):
        assert_close(getattr(ro, f), getattr(rt, f).numpy(), f, rtol=1e-4, atol=1e-5)
    # arccos is ill-conditioned at 1: a cosine 1e-6 below 1 is an angle of 1.4e-3 (two float32 SVDs
    # of nearly shared directions round differently), so angles match to the cosines' precision only
    assert_close(ro.angles, rt.angles.numpy(), "angles", rtol=1e-4, atol=2e-3)
    assert (ro.rank_a, ro.rank_b, ro.ambient_dim) == (rt.rank_a, rt.rank_b, rt.ambient_dim)
    same = pk.projection_kernel(ours[0], ours[0])
    np.testing.assert_allclose(float(same.score), ours[0].rank, rtol=1e-5)  # a subspace overlaps itself fully


def test_random_moments_match():
    for d, r in ((2, 1), (64, 8), (768, 64)):
        o, t = pk.random_projection_kernel_moments(d, r), tlpk.random_projection_kernel_moments(d, r)
        assert (o.ambient_dim, o.rank) == (t.ambient_dim, t.rank)
        np.testing.assert_allclose([o.mean, o.variance], [t.mean, t.variance], rtol=1e-12)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pair(request, hf_root):
    import jaxlens

    path, _ = built(request.param, hf_root)
    return request.param, jaxlens.from_pretrained_no_processing(path), boot_bridge(path, processed=False)


@pytest.mark.parametrize("target,order,rank", [("Q", "forward", None), ("K", "all", None), ("V", "forward", 3)])
def test_head_affinity_matches_transformer_lens(pair, target, order, rank):
    family, model, bridge = pair
    o = pk.attention_head_subspace_affinity(model, target_role=target, layer_order=order, rank=rank)
    t = tlpk.attention_head_subspace_affinity(bridge, target_role=target, layer_order=order, rank=rank)
    name = f"{family} O{target} {order} rank={rank}"
    assert o.scores.shape == tuple(t.scores.shape), name
    if target != "Q":  # K and V keep the model's kv heads
        assert o.scores.shape[3] == model.cfg.n_kv_heads
    assert_close(o.scores, t.scores.numpy(), f"{name} scores", rtol=1e-4, atol=1e-5)
    assert_close(o.normalized, t.normalized.numpy(), f"{name} normalized", rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(o.valid_mask), t.valid_mask.numpy())
    np.testing.assert_array_equal(np.asarray(o.source_ranks), t.source_ranks.numpy())
    np.testing.assert_array_equal(np.asarray(o.target_ranks), t.target_ranks.numpy())
    assert (o.source_rank, o.target_rank, o.rank, o.source_head_kind, o.target_head_kind,
            o.source_layer_indices) == (t.source_rank, t.target_rank, t.rank, t.source_head_kind,
                                        t.target_head_kind, t.source_layer_indices)
    np.testing.assert_allclose(o.rtol, t.rtol, rtol=1e-12)
    for normalized in (False, True):
        po, pt = o.top_pairs(5, normalized=normalized), t.top_pairs(5, normalized=normalized)
        fields = lambda pairs: [tuple((r.layer, r.head, r.role, r.kind, r.label) for r in (p.source, p.target))
                                for p in pairs]
        assert fields(po) == fields(pt), name
        np.testing.assert_allclose([p.score for p in po], [p.score for p in pt], rtol=1e-4)


def test_bad_arguments_raise_clear_errors(pair):
    _, model, _ = pair
    with pytest.raises(ValueError, match="target_role must be one of"):
        pk.attention_head_subspace_affinity(model, target_role="O")
    with pytest.raises(ValueError, match="source_role must be 'O'"):
        pk.attention_head_subspace_affinity(model, source_role="Q", target_role="K")
    with pytest.raises(ValueError, match="layer_order must be one of"):
        pk.attention_head_subspace_affinity(model, target_role="K", layer_order="backward")
    with pytest.raises(ValueError, match="rank must be between 1 and"):
        pk.attention_head_subspace_affinity(model, target_role="K", rank=10**6)
    with pytest.raises(ValueError, match="rtol must be a finite non-negative"):
        pk.attention_head_subspace_affinity(model, target_role="K", rtol=-1.0)
    with pytest.raises(ValueError, match="Could not extract role O at layer 0, head 0: requested rank"):
        pk.attention_head_subspace_affinity(model, target_role="K", rtol=0.999)  # every head rank-deficient
    with pytest.raises(ValueError, match="requested rank 3 exceeds measured rank 2"):
        pk.orthonormal_subspace(_matrix(0, (10, 5), rank=2), rank=3)
    for bad, msg in ((np.ones((3,), np.float32), "two-dimensional"), (np.ones((3, 2), np.int32), "floating-point"),
                     (np.full((3, 2), np.nan, np.float32), "finite"), ([[1.0]], "jax or numpy array"),
                     (np.zeros((3, 2), np.float32), "numerical rank is zero")):
        with pytest.raises(ValueError, match=msg):
            pk.orthonormal_subspace(bad)
    sub = pk.orthonormal_subspace(_matrix(0, (10, 3)))
    with pytest.raises(ValueError, match="equal ambient dimensions"):
        pk.projection_kernel(sub, pk.orthonormal_subspace(_matrix(0, (11, 3))))
    with pytest.raises(ValueError, match="must be a SubspaceBasis"):
        pk.projection_kernel(sub, np.eye(10, 3))
    with pytest.raises(ValueError, match="k must be a positive integer"):
        pk.attention_head_subspace_affinity(model, target_role="Q").top_pairs(0)
