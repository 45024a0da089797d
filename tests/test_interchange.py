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


@pytest.fixture(scope="module")
def das_task(pair):
    """Pairs whose high-level label is the base's prediction with the logit-difference direction
    of the final residual taken from the source: the aligned subspace is known."""
    model, _ = pair
    rng = np.random.default_rng(0)
    n, name = 32, f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    base, src = (np.concatenate([np.zeros((n, 1), int), rng.integers(1, 290, (n, 5))], 1) for _ in range(2))
    ids, sign = jnp.asarray([5, 7]), jnp.array([1.0, -1.0])
    offset = jnp.median(model(np.concatenate([base, src]))[:, -1, ids] @ sign)  # balance the two classes
    task = lambda t: model(t)[:, -1, ids] - jnp.array([offset, 0.0])  # noqa: E731
    W_U = np.asarray(model.W_U)
    true = jnp.asarray((W_U[:, 5] - W_U[:, 7]) / np.linalg.norm(W_U[:, 5] - W_U[:, 7]))[:, None]
    pos = np.full(n, 5)
    source = ic.collect_activations(model, name, src, positions=pos)
    targets = np.asarray(jnp.argmax(ic.intervened_logits(model, name, ic.SubspaceInterchange(true), base, source, task,
                                                         positions=pos), -1))
    assert 0.3 < targets.mean() < 0.7  # both classes
    accuracy = lambda B: float((np.asarray(jnp.argmax(ic.intervened_logits(  # noqa: E731
        model, name, ic.SubspaceInterchange(B), base, source, task, positions=pos), -1)) == targets).mean())
    return dict(model=model, name=name, base=base, src=src, targets=targets, task=task, pos=pos, true=true,
                accuracy=accuracy)


def test_das_learns_the_aligned_direction(das_task):
    t = das_task
    res = ic.fit_das(t["model"], t["name"], t["base"], t["src"], t["targets"], t["task"], rank=1, base_positions=t["pos"],
                     source_positions=t["pos"], epochs=15, batch_size=16, lr=0.05, seed=0)
    assert res.basis.shape == (t["model"].cfg.d_model, 1) and res.rank == 1 and res.hook_name == t["name"]
    np.testing.assert_allclose(np.asarray(res.basis.T @ res.basis), [[1.0]], atol=1e-5)
    assert len(res.losses) == 15 and res.losses[-1] < res.losses[0] - 0.15
    assert t["accuracy"](res.basis) >= 0.85 > 0.75 >= t["accuracy"](ic.random_basis(t["model"].cfg.d_model, 1, 3))
    assert float(jnp.abs(res.basis.T @ t["true"]).squeeze()) > 0.6


def test_das_micro_batches_take_the_same_steps(das_task):
    t = das_task
    kw = dict(rank=2, base_positions=t["pos"], source_positions=t["pos"], epochs=2, batch_size=16, lr=0.05, seed=1)
    whole = ic.fit_das(t["model"], t["name"], t["base"], t["src"], t["targets"], t["task"], **kw)
    split = ic.fit_das(t["model"], t["name"], t["base"], t["src"], t["targets"], t["task"], micro_batch_size=5, **kw)
    np.testing.assert_allclose(whole.losses, split.losses, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(whole.basis), np.asarray(split.basis), atol=1e-5)
    with pytest.raises(ValueError, match="same length"):
        ic.fit_das(t["model"], t["name"], t["base"], t["src"][:3], t["targets"], t["task"], rank=1)
    with pytest.raises(ValueError, match="one integer class per pair"):
        ic.fit_das(t["model"], t["name"], t["base"], t["src"], t["targets"] * 1.0, t["task"], rank=1)
    with pytest.raises(ValueError, match="rank must be in"):
        ic.fit_das(t["model"], t["name"], t["base"], t["src"], t["targets"], t["task"], rank=0, base_positions=t["pos"],
                   source_positions=t["pos"])


def test_controls(pair):
    from transformer_lens.tools.analysis import interchange as tic

    keys = ["a cat", "a dog", "a cat", 3, (1, 2)]
    np.testing.assert_array_equal(ic.arbitrary_targets(keys, 3, 7), tic.arbitrary_targets(keys, 3, 7).numpy())
    model, _ = pair
    before = jax.tree.map(np.asarray, model.params)
    fresh, again, other = ic.reinitialized(model, 0), ic.reinitialized(model, 0), ic.reinitialized(model, 1)
    assert jax.tree.structure(fresh.params) == jax.tree.structure(model.params)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, model.params), before)  # untouched
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, fresh.params), jax.tree.map(np.asarray, again.params))
    out = [np.asarray(m(BASE)) for m in (model, fresh, other)]
    assert np.abs(out[0] - out[1]).max() > 0.1 and np.abs(out[1] - out[2]).max() > 0.1
