"""Patching grids that run only the causal suffix of each cell (layers >= l, positions >= a window
start, the corrupted run's KV cache before it; logits only where the metric reads) equal a plain
loop of full patched forwards: every window start, padded prompts, GQA, scanned layers, sliding
windows. Also: the forward they rely on (start_at_layer with a cache, logit_positions), and the
metric-position detection (sound: anything it cannot prove reads every position)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlens
from conftest import assert_close, built
from jaxlens.edits import patching
from jaxlens.edits.metric_positions import detect_metric_positions, resolve_metric_reads
from jaxlens.fingerprint import Fn
from jaxlens.hooks import Hooks
from jaxlens.model.forward import forward, unstack_layers
from jaxlens.model.kv import KVCache
from jaxlens.model.packed import PackedRows

S = 8  # window starts 0, 4, 6: patch positions at the start, middle and end of each window
RNG = np.random.default_rng(1)
CLEAN = RNG.integers(1, 150, (2, S)).astype(np.int32)
CORRUPT = CLEAN.copy()
CORRUPT[:, [1, 4, 6]] = RNG.integers(1, 150, (2, 3))
A, B = 3, 4


@pytest.fixture(autouse=True)
def _windows_for_short_prompts(monkeypatch):
    """S = 8 is below the length where the grids add window starts: lower it so every start runs."""
    monkeypatch.setattr(patching, "MIN_WINDOW_LEN", 0)


def last_metric(logits):
    return (logits[:, -1, A] - logits[:, -1, B]).mean()


def two_pos_metric(logits):  # reads the middle and the end
    return (logits[:, 3, A] + 0.5 * logits[:, -1, A] - logits[:, -1, B]).mean()


def lsm_metric(logits):  # log_softmax over every position: detection must say "all"
    return jax.nn.log_softmax(logits, axis=-1)[:, -2:, A].mean()


@partial(jax.jit, static_argnames=("cfg", "name", "axes"))
def _patched_logits(params, toks, mask, index, clean, *, cfg, name, axes):
    hooks = Hooks(((frozenset({name}), patching.IndexPatch(index, clean, axes)),))
    return forward(params, cfg, toks, mask, hooks=hooks)[0]


def loop(m, act, layer, axes, sizes, metric, mask=None, cache=None):
    """The reference: one full forward per cell with the patch hook, full logits, the metric."""
    params = m.params if "blocks" not in m.params else unstack_layers(m.params, m.cfg.n_layers)
    name = jaxlens.get_act_name(act, layer)
    mask = np.ones(CORRUPT.shape, np.int32) if mask is None else mask
    out = np.zeros(sizes, np.float32)
    for cell in np.ndindex(*sizes):
        logits = _patched_logits(params, jnp.asarray(CORRUPT), jnp.asarray(mask), jnp.asarray(cell, jnp.int32),
                                 cache[name], cfg=m.cfg, name=name, axes=axes)
        out[cell] = metric(logits)
    return out


def _model(hf_root, family, **kw):
    return jaxlens.from_pretrained_no_processing(built(family, hf_root)[0], **kw)


@pytest.fixture(scope="module")
def gpt2(hf_root):
    m = _model(hf_root, "gpt2")
    return m, m.run_with_cache(CLEAN)[1]


def _check(m, cache, fn, act, layer, axes, metric, **kw):
    grid = np.asarray(fn(m, CORRUPT, cache, metric, layers=[layer], **kw))
    ref = loop(m, act, layer, axes, grid.shape[1:], metric, kw.get("attention_mask"), cache)
    assert np.isnan(grid[[l for l in range(m.cfg.n_layers) if l != layer]]).all()
    assert_close(grid[layer], ref, f"{act} layer {layer}")
    assert np.ptp(ref) > 1e-4, "the patches must matter, or the comparison proves nothing"
    return grid


def test_resid_pre_every_window_and_position(gpt2):
    m, cache = gpt2  # (layer 0 of resid_pre: the sliding-window test)
    _check(m, cache, patching.get_act_patch_resid_pre, "resid_pre", 1, (1,), two_pos_metric)


def test_mlp_out_and_all_positions_metric(gpt2):
    """A metric the detection cannot bound (log_softmax over all logits) still gets exact results."""
    m, cache = gpt2
    _check(m, cache, patching.get_act_patch_mlp_out, "mlp_out", 0, (1,), lsm_metric)


def test_z_by_pos_left_padded(hf_root):
    m = _model(hf_root, "gpt2")
    mask = np.ones_like(CORRUPT)
    mask[0, :3] = 0  # left padding of row 0 (positions come from the mask)
    cache = m.run_with_cache(CLEAN, attention_mask=mask)[1]
    _check(m, cache, patching.get_act_patch_attn_head_out_by_pos, "z", 1, (1, 2), last_metric, attention_mask=mask)


def test_pattern_by_dest_pos_right_padded(gpt2, hf_root):
    """Pattern patches see the cache's key length; the dest index is shifted by the window start."""
    m, _ = gpt2
    mask = np.ones_like(CORRUPT)
    mask[1, -2:] = 0  # right padding of row 1: its metric reads its last real position
    cache = m.run_with_cache(CLEAN, attention_mask=mask)[1]

    def metric(logits):
        return (logits[jnp.arange(2), jnp.array([S - 1, S - 3]), A]).mean()

    _check(m, cache, patching.get_act_patch_attn_head_pattern_by_pos, "pattern", 1, (1, 2), metric,
           attention_mask=mask)


def test_gqa_k_by_pos(hf_root):
    m = _model(hf_root, "llama")
    cache = m.run_with_cache(CLEAN)[1]
    grid = _check(m, cache, patching.get_act_patch_attn_head_k_by_pos, "k", 1, (1, 2), last_metric)
    assert grid.shape == (m.cfg.n_layers, S, m.cfg.n_kv_heads) and m.cfg.n_kv_heads < m.cfg.n_heads


def test_sliding_window_scanned(hf_root):
    """Gemma 2: local layers with a window (4) shorter than the prompt; scanned params (unstacked by the grid)."""
    m = _model(hf_root, "gemma2", scan_layers=True)
    assert "blocks" in m.params and m.cfg.sliding_window < S and any(m.cfg.is_local(l) for l in range(m.cfg.n_layers))
    cache = m.run_with_cache(CLEAN)[1]
    _check(m, cache, patching.get_act_patch_resid_pre, "resid_pre", 0, (1,), two_pos_metric)


def test_declared_metric_positions(gpt2):
    m, cache = gpt2
    # declared = detected: the programs of test_resid_pre_every_window_and_position serve it
    ref = _check(m, cache, patching.get_act_patch_resid_pre, "resid_pre", 1, (1,), two_pos_metric,
                 metric_positions=[3, -1])[1]
    # a metric reading a position it did not declare gets NaN, not a silent number: cells at
    # 1 <= p < 4 did not compute position 3; cells at p >= 4 read the corrupted run's logits there,
    # which no patch at p >= 4 changes, so they stay exact; and so does the cell at p = 0, before
    # the prompts' first difference (its patch changes nothing: it is the corrupted run, all of it)
    wrong = np.asarray(patching.get_act_patch_resid_pre(m, CORRUPT, cache, two_pos_metric, layers=[1],
                                                        metric_positions=[S - 1]))
    assert np.isnan(wrong[1, 1:4]).all()
    assert_close(wrong[1, 4:], ref[4:], "cells whose window starts after the undeclared position")
    assert_close(wrong[1, :1], ref[:1], "the cell before the first difference")
    with pytest.raises(ValueError, match="metric_positions"):
        patching.get_act_patch_resid_pre(m, CORRUPT, cache, last_metric, layers=[1], metric_positions=[S])
    with pytest.raises(ValueError, match="metric_positions"):
        patching.get_act_patch_resid_pre(m, CORRUPT, cache, last_metric, layers=[1], metric_positions=[1.5])


def test_detect_metric_positions():
    shape, dt = (2, S, 10), jnp.float32
    assert detect_metric_positions(last_metric, shape, dt) == (S - 1,)
    assert detect_metric_positions(two_pos_metric, shape, dt) == (3, S - 1)
    assert detect_metric_positions(lsm_metric, shape, dt) is None
    assert detect_metric_positions(jax.jit(lambda lg: lg[:, 2:4].sum()), shape, dt) == (2, 3)  # inside a jit
    assert detect_metric_positions(lambda lg: lg[jnp.arange(2), np.array([5, 1]), 0].sum(), shape, dt) == (1, 5)
    assert detect_metric_positions(lambda lg: lg[:, [-1, -2]].sum(), shape, dt) == (S - 2, S - 1)
    data_dependent = lambda lg: lg[:, jnp.argmax(lg[:, 0, 0])].sum()  # noqa: E731
    assert detect_metric_positions(data_dependent, shape, dt) is None
    assert detect_metric_positions(lambda lg: lg.reshape(-1)[0], shape, dt) is None
    scanned = lambda lg: jax.lax.scan(lambda c, x: (c + x[-1, 0], None), 0.0, lg)[0]  # noqa: E731  (x: [pos vocab])
    assert detect_metric_positions(scanned, shape, dt) is None
    assert detect_metric_positions(jax.checkpoint(lambda lg: lg[:, 1, 0].sum()), shape, dt) == (1,)
    assert resolve_metric_reads(last_metric, [-1, 2, 2], shape, dt) == ((2, S - 1), (A, B))  # given positions win
    assert resolve_metric_reads(last_metric, 3, shape, dt)[0] == (3,)


def test_forward_suffix_with_cache_and_logit_positions(gpt2, hf_root):
    """forward(start_at_layer=l, kv=cache of the first w positions) on the residual at positions
    >= w equals the full run there; logit_positions picks logits; scanned params too."""
    m, _ = gpt2
    scanned = _model(hf_root, "gpt2", scan_layers=True)
    assert "blocks" in scanned.params
    fwd = jax.jit(forward, static_argnames=("cfg", "capture", "start_at_layer", "logit_positions"))
    w = 5
    for mm in (m, scanned):
        params, cfg = mm.params, mm.cfg
        toks = jnp.asarray(CORRUPT)
        mask = jnp.ones_like(toks)
        full, acts, kv = fwd(params, cfg, toks, mask, capture=frozenset({"blocks.1.hook_resid_pre"}),
                             kv=KVCache.init(cfg, 2, S))
        kv = KVCache(kv.keys, kv.values, kv.mask, jnp.asarray(w, jnp.int32))
        out, _, new = fwd(params, cfg, acts["blocks.1.hook_resid_pre"][:, w:], mask[:, w:], kv=kv,
                          start_at_layer=1, logit_positions=(0, -1))
        assert_close(out, full[:, [w, S - 1]], "suffix logits")
        assert int(new.length) == S
        assert_close(new.keys, kv.keys, "the suffix rewrites the keys it was given")
    with pytest.raises(ValueError, match="logit_positions"):
        forward(m.params, m.cfg, jnp.asarray(CORRUPT), logit_positions=(S,))


@pytest.mark.parametrize("family", ["gpt_neox", "llama", "gemma2", "olmo2", "qwen3", "qwen3_moe"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_last_block_at_logit_positions_only(family, side, hf_root):
    """With logit_positions and no hook in the last block, that block runs its queries, output
    and MLP at those positions only (keys/values everywhere): logits equal the full run's there
    (parallel blocks, GQA, sliding windows and soft-caps, post-norms, q/k norms, MoE; padded on
    either side), and the compiled program does less work than one forced to run the whole block."""
    from conftest import padded

    m = jaxlens.from_pretrained_no_processing(built(family, hf_root)[0])
    toks, mask = (jnp.asarray(a) for a in padded(side))
    fwd = jax.jit(forward, static_argnames=("cfg", "capture", "logit_positions"))
    full, _, _ = fwd(m.params, m.cfg, toks, mask)
    pos = (0, 3, -1)
    part, _, _ = fwd(m.params, m.cfg, toks, mask, logit_positions=pos)
    assert_close(part, full[:, [0, 3, toks.shape[1] - 1]], f"{family} logits at {pos}")

    def flops(capture):
        c = fwd.lower(m.params, m.cfg, toks, mask, capture=capture, logit_positions=pos).compile().cost_analysis()
        return (c[0] if isinstance(c, list) else c)["flops"]

    last = f"blocks.{m.cfg.n_layers - 1}"  # capturing a hook inside the last block needs every position
    assert flops(frozenset({f"{last}.hook_resid_pre"})) < flops(frozenset({f"{last}.hook_attn_out"})), family


def test_resid_mid_right_padded(hf_root):
    """Packed suffixes (two cells per sequence) with a right-padded row: pad keys stay invisible."""
    m = _model(hf_root, "gpt2")
    mask = np.ones_like(CORRUPT)
    mask[1, -2:] = 0
    cache = m.run_with_cache(CLEAN, attention_mask=mask)[1]

    def metric(logits):
        return (logits[jnp.arange(2), jnp.array([S - 1, S - 3]), A]).mean()

    _check(m, cache, patching.get_act_patch_resid_mid, "resid_mid", 1, (1,), metric, attention_mask=mask)


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 32])
def test_pack_suffixes_pairs_every_cell_once_and_fits(n):
    starts = np.arange(n)
    pairs = patching.pack_suffixes(starts, n)
    used = np.concatenate([pairs[:, 0], pairs[pairs[:, 1] >= 0, 1]])
    assert sorted(used.tolist()) == list(range(n))  # every cell, once
    two = pairs[pairs[:, 1] >= 0]
    assert (starts[two[:, 0]] + starts[two[:, 1]] >= n).all()  # the two suffixes fit in n rows
    assert len(pairs) == n // 2 + 1 or n == 1


def test_packed_rows_layout():
    cells = np.array([[0, 1], [5, 0], [3, 2]], np.int32)  # (pos, head); seq_len 6
    rows = patching.packed_rows(cells, np.array([[0, 1], [2, -1]]), 0, 6)
    assert rows["positions"][0].tolist() == [5, 4, 3, 2, 1, 5]  # cell 0 from the end down; cell 1 at row 5
    assert rows["segments"][0].tolist() == [0, 0, 0, 0, 0, 1]
    assert rows["starts"][0].tolist() == [0] * 5 + [5]
    assert rows["cells"][0, :, 1].tolist() == [1] * 5 + [0]
    assert rows["positions"][1, :3].tolist() == [5, 4, 3] and (rows["segments"][1, 3:] == 2).all()
    assert (rows["cells"][1, 3:] == -1).all() and rows["cell_starts"][1].tolist() == [3, 6]


def test_packed_grid_does_less_work_than_one_run_per_cell(gpt2):
    """A layer's position grid as packed sequences (S/2 + 1 of S rows: 62% of the rows of one full
    run per cell) costs at most 85% of the flops (XLA's count; 77% here: this tiny model's
    unembedding runs at two rows per sequence, and the keys are twice as many), the metric at the
    last position. One cell per sequence would cost more than the plain runs."""
    m, cache = gpt2
    mask = jnp.ones(CORRUPT.shape, jnp.int32)
    logits, resid, kv = patching._corrupted_run(m.params, jnp.asarray(CORRUPT), mask, cfg=m.cfg,
                                                capture=frozenset({"blocks.0.hook_resid_pre"}),
                                                precision=m.precision, with_kv=True)
    name, cells = "blocks.0.hook_resid_pre", np.arange(S, dtype=np.int32)[:, None]
    pairs = patching.pack_suffixes(cells[:, 0], S)
    seqs = {k: jnp.asarray(v) for k, v in patching.packed_rows(cells, pairs, 0, S).items()}
    common = (m.params, mask, resid[name])
    kw = dict(cfg=m.cfg, name=name, axes=(1,), layer=0, metric_positions=(S - 1,), precision=m.precision)

    def flops(c):
        ca = c.cost_analysis()
        return (ca[0] if isinstance(ca, list) else ca)["flops"]

    packed = patching._packed_grid.lower(*common, patching._with_room(kv, S), logits, cache[name], seqs, Fn(last_metric),
                                         chunk_size=len(pairs), **kw).compile()
    plain = patching._suffix_grid.lower(*common, None, logits, cache[name], jnp.asarray(cells), Fn(last_metric),
                                        window=0, window_axis=0, chunk_size=S, **kw).compile()
    assert len(pairs) == S // 2 + 1
    assert flops(packed) < 0.85 * flops(plain), (flops(packed), flops(plain))


def test_packed_rows_need_a_cache_and_a_start_layer(gpt2):
    m, _ = gpt2
    rows = PackedRows(*(jnp.zeros(S, jnp.int32) for _ in range(3)))
    x = jnp.zeros((2, S, m.cfg.d_model))
    with pytest.raises(ValueError, match="packed rows continue a KV cache"):
        forward(m.params, m.cfg, x, start_at_layer=1, packed=rows)  # no kv
    kv = KVCache.init(m.cfg, 2, 2 * S)
    with pytest.raises(ValueError, match="packed rows continue a KV cache"):
        forward(m.params, m.cfg, jnp.asarray(CORRUPT), kv=kv, packed=rows)  # tokens, no start layer
