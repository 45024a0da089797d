"""`jaxlens.edits.interchange` against TransformerLens 4.3's `tools.analysis.interchange` on the same
processed GPT-2: the fixed bases (as subspaces), the interchange and its norm-matched placebo,
collecting activations at one position per example, intervened task logits in batches, gradients
through the basis, and the errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxlens
from conftest import boot_bridge, built
from jaxlens.edits import interchange as ic

BASE = np.array([[0, 5, 9, 30, 2, 7], [0, 17, 250, 8, 4, 61], [0, 3, 4, 5, 6, 7]])
SOURCE = np.array([[0, 5, 9, 31, 2, 8], [0, 17, 251, 8, 3, 61], [0, 8, 9, 10, 11, 12]])
POS = np.array([3, -1, 2])
IDS = [5, 7, 9]
NAME = "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module")
def pair(hf_root):
    path, _ = built("gpt2", hf_root)
    return jaxlens.from_pretrained(path), boot_bridge(path, processed=True)


def _projector(B):
    B = np.asarray(B, np.float64)
    return B @ B.T


def test_fixed_bases_span_transformer_lens_subspaces():
    from transformer_lens.tools.analysis import interchange as tic

    rng = np.random.default_rng(0)
    acts, labels = rng.normal(size=(12, 16)).astype(np.float32), [0, 1, 2] * 4
    got, want = ic.mean_difference_basis(acts, labels), tic.mean_difference_basis(torch.tensor(acts), labels)
    assert got.shape == (16, 2)
    np.testing.assert_allclose(_projector(got), _projector(want.numpy()), atol=1e-6)
    w = rng.normal(size=(3, 16)).astype(np.float32)
    for rows in (w, w[:1]):
        np.testing.assert_allclose(_projector(ic.probe_basis(rows)), _projector(tic.probe_basis(torch.tensor(rows)).numpy()),
                                   atol=1e-6)
    np.testing.assert_array_equal(np.asarray(ic.neuron_basis(10, [3, 1, 7])), tic.neuron_basis(10, [3, 1, 7]).numpy())


def test_random_bases_are_orthonormal_and_follow_the_key():
    a, b = ic.random_basis(16, 3, 0), ic.random_basis(16, 3, jax.random.key(0))
    np.testing.assert_allclose(np.asarray(a.T @ a), np.eye(3), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(a) - np.asarray(ic.random_basis(16, 3, 1))).max() > 0.1
    n = ic.random_neuron_basis(10, 4, 2, exclude=[0, 1, 2, 3, 4])
    chosen = np.nonzero(np.asarray(n))[0]
    assert n.shape == (10, 4) and set(chosen) <= {5, 6, 7, 8, 9} and len(set(chosen)) == 4


def test_interchange_and_placebo_match_transformer_lens():
    from transformer_lens.tools.analysis import interchange as tic

    rng = np.random.default_rng(1)
    B, B2 = np.asarray(ic.random_basis(16, 3, 0)), np.asarray(ic.random_basis(16, 3, 1))
    base, src = (rng.normal(size=(5, 16)).astype(np.float32) for _ in range(2))
    for strength in (1.0, 0.4):
        ours = ic.SubspaceInterchange(B, strength)
        theirs = tic.SubspaceInterchange(torch.tensor(B), strength)
        np.testing.assert_allclose(np.asarray(ours(jnp.asarray(base), jnp.asarray(src))),
                                   theirs(torch.tensor(base), torch.tensor(src)).numpy(), atol=1e-6)
        got = ic.NormMatchedPlacebo(ours, B2)(jnp.asarray(base), jnp.asarray(src))
        want = tic.NormMatchedPlacebo(theirs, torch.tensor(B2))(torch.tensor(base), torch.tensor(src))
        np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-6)


def test_collect_and_intervene_match_transformer_lens(pair):
    from transformer_lens.tools.analysis import interchange as tic

    model, bridge = pair
    task = lambda t: model(t)[:, -1, jnp.asarray(IDS)]  # noqa: E731
    tl_task = lambda t: bridge(t)[:, -1, IDS]  # noqa: E731
    got = ic.collect_activations(model, NAME, SOURCE, task, positions=POS, batch_size=2)
    want = tic.collect_activations(bridge, NAME, torch.tensor(SOURCE), tl_task, positions=torch.tensor(POS), batch_size=2)
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=2e-6)
    B = ic.random_basis(model.cfg.d_model, 3, 0)
    for ours, theirs in ((ic.SubspaceInterchange(B), tic.SubspaceInterchange(torch.tensor(np.asarray(B)))),
                         (ic.SubspaceInterchange(B, 0.5), tic.SubspaceInterchange(torch.tensor(np.asarray(B)), 0.5))):
        out = ic.intervened_logits(model, NAME, ours, BASE, got, task, positions=POS, batch_size=2)
        ref = tic.intervened_logits(bridge, NAME, theirs, torch.tensor(BASE), want, tl_task, positions=torch.tensor(POS),
                                    batch_size=2)
        np.testing.assert_allclose(np.asarray(out), ref.numpy(), atol=2e-5)
        # the intervention did something, and its hook left with the call (task(BASE) runs plain)
        assert np.abs(np.asarray(out) - np.asarray(task(BASE))).max() > 1e-3
    grad = jax.grad(lambda B: ic.run_with_intervention(model, NAME, ic.SubspaceInterchange(B), BASE, got, task,
                                                        positions=POS).sum())(B)
    assert grad.shape == B.shape and float(jnp.abs(grad).max()) > 0


def test_errors(pair):
    model, _ = pair
    task = lambda t: model(t)[:, -1, :3]  # noqa: E731
    src = jnp.zeros((3, model.cfg.d_model))
    iv = ic.SubspaceInterchange(ic.random_basis(model.cfg.d_model, 2, 0))
    with pytest.raises(ValueError, match="at least two classes"):
        ic.mean_difference_basis(np.ones((4, 8)), [1, 1, 1, 1])
    with pytest.raises(ValueError, match="one label per row"):
        ic.mean_difference_basis(np.ones((4, 8)), [0, 1])
    with pytest.raises(ValueError, match="rank must be in"):
        ic.random_basis(8, 9, 0)
    with pytest.raises(ValueError, match="key must be a jax.random.key or an int seed"):
        ic.random_basis(8, 2, "seed")
    for bad, msg in (([1.0, 2.0], "integers"), ([[1, 2]], "one-dimensional"), ([3, 12], r"in \[0, 10\)"),
                     ([2, 2], "must not repeat"), ([], "at least one neuron")):
        with pytest.raises(ValueError, match=msg):
            ic.neuron_basis(10, bad)
    with pytest.raises(ValueError, match=r"k must be in \[1, 2\]"):
        ic.random_neuron_basis(4, 3, 0, exclude=[0, 1])
    with pytest.raises(ValueError, match="one integer index per example"):
        ic.run_with_intervention(model, NAME, iv, BASE, src, task, positions=POS[:2])
    with pytest.raises(ValueError, match=r"positions must be in \[-6, 6\)"):
        ic.run_with_intervention(model, NAME, iv, BASE, src, task, positions=np.array([0, 6, 1]))
    with pytest.raises(ValueError, match="pass one position index per example"):
        ic.run_with_intervention(model, NAME, iv, BASE, src, task)
    with pytest.raises(ValueError, match="one row per base input"):
        ic.run_with_intervention(model, NAME, iv, BASE, src[:2], task, positions=POS)
    with pytest.raises(ValueError, match="not a hook point"):
        ic.run_with_intervention(model, "blocks.1.hook_nothing", iv, BASE, src, task, positions=POS)
    with pytest.raises(ValueError, match="pass one position index per example"):
        ic.collect_activations(model, NAME, SOURCE)
