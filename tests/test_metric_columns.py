"""Grids unembed only the vocabulary columns their metric reads: the detection (sound: a read it
cannot prove takes every column), forward's `logit_columns`, and grids that equal the
whole-vocabulary computation (and the loop, in test_patching_suffix / test_patching_starts, whose
logit-difference metrics take this path)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlens
from conftest import assert_close, built
from jaxlens.edits import metric_positions, patching
from jaxlens.edits.metric_positions import detect_metric_reads, resolve_metric_reads
from jaxlens.model.forward import forward

SHAPE, DT = (2, 8, 100), jnp.float32


@pytest.mark.parametrize("metric, pos, cols", [
    (lambda lg: lg[:, -1, 11].mean() - lg[:, -1, 12].mean(), (7,), (11, 12)),
    (lambda lg: lg[:, -1, jnp.array([3, 7])].sum(), (7,), (3, 7)),
    (lambda lg: lg[jnp.arange(2), np.array([5, 1]), np.array([9, 4])].sum(), (1, 5), (4, 9)),
    (lambda lg: lg[:, 2:4, 10:13].sum(), (2, 3), (10, 11, 12)),
    (lambda lg: lg[:, -1, -1].sum(), (7,), (99,)),
    (jax.jit(lambda lg: (lg[:, -2, 50] - lg[:, -2, 51]).sum()), (6,), (50, 51)),  # inside a jit
    (lambda lg: jnp.take(lg[:, -1], jnp.array([1, 2]), axis=-1).sum(), (7,), (1, 2)),  # a row, then its columns
    (lambda lg: jnp.take_along_axis(lg[:, -1], jnp.array([[4], [6]]), axis=-1).sum(), (7,), (4, 6)),
    (lambda lg: lg[:, -1].astype(jnp.float16)[:, 3].sum(), (7,), (3,)),  # through a cast
    (lambda lg: jax.nn.log_softmax(lg[:, -1])[:, 5].sum(), (7,), None),  # a softmax reads every column
    (lambda lg: lg[:, 2].sum(), (2,), None),
    (lambda lg: lg[:, -1, jnp.argmax(lg[0, 0])].sum(), (0, 7), None),  # a column chosen by the logits
    (lambda lg: jax.jit(lambda row: row)(lg[:, -1])[:, 3].sum(), (7,), None),  # a view returned by a call
    (lambda lg: jax.jit(lambda r: jax.lax.slice(r, (0, 0), (2, 100)))(lg[:, -1])[:, 3].sum(), (7,), None),  # made inside
    (lambda lg: jax.jit(lambda row: row[:, 3])(lg[:, -1]).sum(), (7,), (3,)),  # columns read inside a call
    (lambda lg: jax.nn.log_softmax(lg, axis=-1)[:, -1, 3].sum(), None, None),  # positions unknown: columns too
])
def test_detect_metric_reads(metric, pos, cols):
    assert detect_metric_reads(metric, SHAPE, DT) == (pos, cols)


def columns(metric):
    return resolve_metric_reads(metric, None, SHAPE, DT)[1]


def test_metric_columns_only_when_few():
    assert columns(lambda lg: lg[:, -1, 11] - lg[:, -1, 12]) == (11, 12)
    assert columns(lambda lg: lg[:, -1, :60].sum()) is None  # over half: the whole unembedding
    assert columns(lambda lg: lg[:, -1, :50].sum()) == tuple(range(50))


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # untied W_U; tied W_E with Gemma 2's logit soft cap
def test_forward_logit_columns(family, hf_root):
    m = jaxlens.from_pretrained_no_processing(built(family, hf_root)[0])
    params = dict(m.params, b_U=jax.random.normal(jax.random.key(0), m.params["b_U"].shape))  # a bias that matters
    toks = jnp.asarray([[1, 5, 9, 30, 2, 7]], jnp.int32)
    fwd = jax.jit(forward, static_argnames=("cfg", "logit_positions", "logit_columns"))
    full = fwd(params, m.cfg, toks)[0]
    V = m.cfg.d_vocab
    assert (m.cfg.output_logits_soft_cap is not None) == (family == "gemma2")
    assert_close(fwd(params, m.cfg, toks, logit_columns=(5, -1, 2))[0], full[..., [5, V - 1, 2]], "columns")
    assert_close(fwd(params, m.cfg, toks, logit_positions=(-1, 1), logit_columns=(7,))[0], full[:, [5, 1]][..., [7]],
                 "positions and columns")
    with pytest.raises(ValueError, match=r"logit_columns\[0\].*vocabulary of"):
        forward(params, m.cfg, toks, logit_columns=(V,))
    with pytest.raises(ValueError, match="logit_columns cannot be combined with stop_at_layer"):
        forward(params, m.cfg, toks, logit_columns=(1,), stop_at_layer=1)


def test_grids_with_columns_equal_the_whole_vocabulary(hf_root, monkeypatch):
    """Both grid layouts (layer x head suffixes; packed position suffixes) give the same metric
    with the unembedding cut to the metric's columns as with every column, and ask for them."""
    m = jaxlens.from_pretrained_no_processing(built("gpt2", hf_root)[0])
    rng = np.random.default_rng(3)
    clean = rng.integers(1, 150, (2, 8)).astype(np.int32)
    corrupt = clean.copy()
    corrupt[:, [2, 5]] = rng.integers(1, 150, (2, 2))
    _, cache = m.run_with_cache(clean)

    def answer_metric(logits):  # this test's own function: its programs are traced here
        return jnp.take_along_axis(logits[:, -1], jnp.array([[3], [4]]), axis=-1).mean() - logits[:, 6, 9].mean()

    asked = []
    real_forward = patching.forward

    def spy(*a, **kw):
        if kw.get("start_at_layer") is not None:  # a cell's suffix (not the corrupted run)
            asked.append(kw.get("logit_columns"))
        return real_forward(*a, **kw)

    traces = []
    real_detect = metric_positions.detect_metric_reads

    def counted(*a):
        traces.append(1)
        return real_detect(*a)

    monkeypatch.setattr(patching, "forward", spy)
    monkeypatch.setattr(metric_positions, "detect_metric_reads", counted)
    fns = (patching.get_act_patch_attn_head_out_all_pos, patching.get_act_patch_resid_pre)
    cut = [np.asarray(fn(m, corrupt, cache, answer_metric)) for fn in fns]
    assert set(asked) == {(3, 4, 9)}, asked
    assert len(traces) == len(fns), "one trace of the metric per grid call answers both positions and columns"
    real_resolve = patching.resolve_metric_reads
    monkeypatch.setattr(patching, "resolve_metric_reads", lambda *a: (real_resolve(*a)[0], None))
    asked.clear()
    whole = [np.asarray(fn(m, corrupt, cache, answer_metric)) for fn in fns]
    assert set(asked) == {None}
    for c, w, fn in zip(cut, whole, fns):
        assert_close(c, w, fn.__name__)
        assert np.ptp(w) > 1e-4, "the patches must matter"
