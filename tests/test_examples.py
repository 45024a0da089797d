"""The TransformerLens notebooks ported in examples/ run, and find what the shipped model does.

Each example's `main()` runs once (module fixtures, output captured); the tests then assert on
its results: the induction heads and the previous-token head they rely on, the IOI logit
difference and where patching recovers it, the patching grids' TransformerLens shapes (and
that jaxlens's compiled grids equal the notebook's hand-written patching loops), and that each
file's docstring counts its `# changed:` lines correctly.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import sys
import tokenize
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FILES = ("main_demo.py", "exploratory_analysis_demo.py", "activation_patching_demo.py")
NOTEBOOKS = {"main_demo.py": "Main_Demo.ipynb", "exploratory_analysis_demo.py": "Exploratory_Analysis_Demo.ipynb",
             "activation_patching_demo.py": "Activation_Patching_in_TL_Demo.ipynb"}


def _load(name: str):
    mod_name = f"examples_{name.removesuffix('.py')}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, EXAMPLES / name)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    spec.loader.exec_module(mod)
    return mod


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


@pytest.fixture(scope="module")
def model():
    return _load("main_demo.py").load_model()


@pytest.fixture(scope="module")
def main_demo(model):
    return _quiet(_load("main_demo.py").main, model)


@pytest.fixture(scope="module")
def exploratory():
    return _quiet(_load("exploratory_analysis_demo.py").main)  # its own load: refactored weights


@pytest.fixture(scope="module")
def patching_demo(model):
    return _quiet(_load("activation_patching_demo.py").main, model)


# --- the files themselves -------------------------------------------------------------------

@pytest.mark.parametrize("name", FILES)
def test_docstring_counts_the_changed_lines(name):
    src = (EXAMPLES / name).read_text()
    doc = _load(name).__doc__
    assert NOTEBOOKS[name] in doc.splitlines()[0], "the docstring's first line names the TransformerLens notebook"
    m = re.search(r"Changed lines: (\d+) \((\d+) of them imports\)", doc)
    assert m, "the docstring says 'Changed lines: N (M of them imports)'"
    comments = [t.string for t in tokenize.generate_tokens(io.StringIO(src).readline)
                if t.type == tokenize.COMMENT and t.string.startswith("# changed:")]
    assert int(m.group(1)) == len(comments)
    assert int(m.group(2)) == sum(c.startswith("# changed: import") for c in comments)
    assert all(len(c) > len("# changed: ") + 3 for c in comments), "every change says why"
    assert 'if __name__ == "__main__":\n    main()' in src


# --- Main_Demo ------------------------------------------------------------------------------

def test_main_demo_loss_and_cache(main_demo):
    r = main_demo["loss_and_cache"]
    assert 0 < r["loss"] < 5
    assert r["pattern_shape"] == (4, r["n_tokens"], r["n_tokens"])  # remove_batch_dim: [head q k]
    assert r["attn_cache_keys"] == ["blocks.0.attn.hook_pattern"]  # names_filter + stop_at_layer keep only it


def test_main_demo_induction_heads(main_demo):
    r = main_demo["induction"]
    loss, score = np.asarray(r["loss_by_position"]), np.asarray(r["induction_score"])
    assert score.shape == (2, 4)
    assert loss[:49].mean() > 5 and loss[50:].mean() < 1, "random tokens are unpredictable until they repeat"
    assert score[1].max() > 0.7 and score[0].max() < 0.1, np.round(score, 3)


def test_main_demo_head_ablation_loop_reads_the_loop_variable(main_demo, model):
    r = main_demo["head_ablation"]
    ablated, original = np.asarray(r["ablated_loss"]), r["original_loss"]
    # the previous-token head L0H3 feeds every induction head: zeroing its values breaks induction
    assert np.unravel_index(ablated.argmax(), ablated.shape) == (0, 3)
    assert ablated[0, 3] > original + 1.0
    # each cell is its own head's ablation (no stale program from the first head of the loop)
    toks = _load("main_demo.py").repeated_random_tokens(model)
    for l, h in ((0, 3), (1, 1)):
        fresh = model.run_with_hooks(toks, return_type="loss",
                                     fwd_hooks=[(f"blocks.{l}.attn.hook_v", lambda v, hook, h=h: v.at[:, :, h].set(0.0))])
        np.testing.assert_allclose(ablated[l, h], float(fresh), rtol=1e-5)
    assert len(np.unique(np.round(ablated, 4))) == ablated.size


def test_main_demo_factored_matrix_and_ov_copying(main_demo):
    r = main_demo["factored"]
    np.testing.assert_allclose(*r["norm"], rtol=1e-4)
    np.testing.assert_allclose(*r["ABC_norm"], rtol=1e-4)
    ov, full = np.asarray(r["OV_copying_score"]), np.asarray(r["full_OV_copying_score"])
    assert ov.shape == full.shape == (2, 4)
    assert (np.abs(ov) <= 1 + 1e-5).all()
    assert ov[1].min() > 0.9 and full[1].min() > 0.9, "the induction heads copy"


def test_main_demo_tokens_and_generation(main_demo):
    r = main_demo["tokens"]
    assert r["greedy"].startswith("1 2 3 4 5 6 7 8 9 10")
    assert r["sampled"].startswith("When Mary and John went to the")
    assert r["multi_shape"][0] == 2
    assert r["with_bos"] == r["without_bos"] + 1


def test_main_demo_weights_and_stop_at_layer(main_demo):
    r = main_demo["weights"]
    assert r["W_Q0"] == (4, 128, 32) and r["W_Q"] == (2, 4, 128, 32) and r["W_U"] == (128, 1024)
    np.testing.assert_allclose(np.asarray(r["stop_resid"]), np.asarray(r["cache_resid_pre1"]), atol=1e-5)


# --- Exploratory_Analysis_Demo --------------------------------------------------------------

S2_POS = 10  # the second mention of a name: the one token where clean and corrupted prompts differ


def test_exploratory_ioi_logit_difference(exploratory):
    ioi = exploratory["ioi"]
    per_prompt = np.asarray(ioi["per_prompt"])
    assert per_prompt.shape == (8,) and (per_prompt > 2).all(), per_prompt
    assert float(ioi["original_average_logit_diff"]) > 4


def test_exploratory_direct_logit_attribution(exploratory):
    ld = float(exploratory["ioi"]["original_average_logit_diff"])
    dla = exploratory["dla"]
    np.testing.assert_allclose(float(dla["average_logit_diff"]), ld, rtol=1e-4)
    np.testing.assert_allclose(float(dla["logit_lens"][-1]), ld, rtol=1e-4)  # final_post, with the cached scale
    np.testing.assert_allclose(float(dla["logit_lens_ln"][-1]), ld, rtol=1e-4)  # apply_ln=True: the real final norm
    np.testing.assert_allclose(float(np.asarray(dla["per_layer"]).sum()), ld, rtol=1e-3)  # components sum to the total
    per_head = np.asarray(dla["per_head"])
    assert per_head.shape == (2, 4)
    # the head with the largest direct effect is the one whose patching recovers the task
    head_z = np.asarray(exploratory["patching"]["head_z"])
    assert int(dla["top_positive"][0]) == int(head_z.argmax())


def test_exploratory_patching_by_hand(exploratory):
    p = exploratory["patching"]
    resid, attn = np.asarray(p["resid"]), np.asarray(p["attn"])
    assert resid.shape == attn.shape == (2, 15)
    assert p["position_labels"][S2_POS].startswith(" ")
    np.testing.assert_allclose(resid[0, S2_POS], 1.0, atol=1e-3)  # before layer 0: all information sits at S2
    np.testing.assert_allclose(resid[1, -1], 1.0, atol=0.02)  # before layer 1: moved to the final position
    assert np.abs(np.delete(resid[0], S2_POS)).max() < 0.05
    assert attn[0, -1] > 0.9, "layer 0's attention moves it"
    assert float(p["corrupted_average_logit_diff"]) < 0


def test_exploratory_hand_loops_equal_jaxlens_patching(exploratory):
    """The notebook's hook-per-cell loops (TransformerLens's semantics) equal jaxlens's compiled grids."""
    from jaxlens.edits import patching

    ex = _load("exploratory_analysis_demo.py")
    model, ioi, p = exploratory["model"], exploratory["ioi"], exploratory["patching"]
    clean, corrupted = ioi["original_average_logit_diff"], p["corrupted_average_logit_diff"]
    answer_tokens = ioi["answer_tokens"]

    def metric(logits):
        return (ex.logits_to_ave_logit_diff(logits, answer_tokens) - corrupted) / (clean - corrupted)

    every = np.asarray(patching.get_act_patch_block_every(model, p["corrupted_tokens"], ioi["cache"], metric))
    assert every.shape == (3, 2, 15)  # TransformerLens: [resid_pre/attn_out/mlp_out, layer, pos]
    for i, key in enumerate(("resid", "attn", "mlp")):
        np.testing.assert_allclose(every[i], np.asarray(p[key]), atol=2e-4, err_msg=key)
    heads = patching.get_act_patch_attn_head_out_all_pos(model, p["corrupted_tokens"], ioi["cache"], metric)
    np.testing.assert_allclose(np.asarray(heads), np.asarray(p["head_z"]), atol=2e-4)


def test_exploratory_head_detector(exploratory):
    h = exploratory["heads"]
    prev, induction = np.asarray(h["previous_token"]), np.asarray(h["induction"])
    assert prev.shape == induction.shape == (2, 4)
    assert np.unravel_index(prev.argmax(), prev.shape) == (0, 3) and prev[0, 3] > 0.7
    assert induction[1].max() > 0.3 > induction[0].max()


# --- Activation_Patching_in_TL_Demo ---------------------------------------------------------

def test_patching_demo_baselines(patching_demo):
    ioi = patching_demo["ioi"]
    assert ioi["clean_logit_diff"] > 4 and ioi["corrupted_logit_diff"] < -4
    np.testing.assert_allclose([ioi["clean_metric"], ioi["corrupted_metric"]], [1.0, 0.0], atol=1e-5)


def test_patching_demo_shapes_are_transformer_lens(patching_demo, model):
    r = patching_demo["ioi_patching"]
    n_layers, n_heads, pos = model.cfg.n_layers, model.cfg.n_heads, 15
    assert r["resid_pre"].shape == (n_layers, pos)
    assert r["head_out_all_pos"].shape == (n_layers, n_heads)
    assert r["head_out_by_pos"].shape == (n_layers * n_heads, pos)  # after the notebook's rearrange
    assert r["block_every"].shape == (3, n_layers, pos)
    assert r["head_all_pos_every"].shape == (5, n_layers, n_heads)
    # the stacks are the single grids, in TransformerLens's order
    np.testing.assert_allclose(np.asarray(r["block_every"][0]), np.asarray(r["resid_pre"]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(r["head_all_pos_every"][0]), np.asarray(r["head_out_all_pos"]), atol=1e-6)


def test_patching_demo_finds_the_circuit(patching_demo):
    r = patching_demo["ioi_patching"]
    resid, every = np.asarray(r["resid_pre"]), np.asarray(r["head_all_pos_every"])
    np.testing.assert_allclose(resid[0, S2_POS], 1.0, atol=1e-3)
    np.testing.assert_allclose(resid[1, -1], 1.0, atol=0.02)
    assert every[0, 0, 3] > 0.9 and every[3, 0, 3] > 0.9, "L0H3's output, through its values, carries the name"
    assert np.abs(every[2]).max() < 0.05, "keys do not matter"


def test_patching_demo_metric_reads_the_current_globals(patching_demo, model):
    """ioi_metric reads CLEAN_BASELINE / CORRUPTED_BASELINE, as in the notebook: changing them changes
    the next grid (a compiled program must not keep the old values)."""
    ap = _load("activation_patching_demo.py")
    ioi, before = patching_demo["ioi"], np.asarray(patching_demo["ioi_patching"]["resid_pre"])
    clean, corrupted = ap.CLEAN_BASELINE, ap.CORRUPTED_BASELINE
    try:
        ap.CLEAN_BASELINE, ap.CORRUPTED_BASELINE = 2 * clean, 0.0
        after = np.asarray(ap.patching.get_act_patch_resid_pre(model, ioi["corrupted_tokens"], ioi["clean_cache"],
                                                               ap.ioi_metric))
    finally:
        ap.CLEAN_BASELINE, ap.CORRUPTED_BASELINE = clean, corrupted
    logit_diff = before * (clean - corrupted) + corrupted
    np.testing.assert_allclose(after, logit_diff / (2 * clean), atol=1e-4)


def test_patching_demo_induction(patching_demo, model):
    r = patching_demo["induction"]
    assert r["clean_baseline"] < 3 < r["corrupted_baseline"], "repeated tokens are predictable, fresh ones are not"
    assert r["resid_pre"].shape == (model.cfg.n_layers, r["tokens"].shape[1])
    heads = np.asarray(r["head_out_all_pos"])
    assert heads.shape == (2, 4)
    assert heads[1].min() > 0.05 and np.abs(heads[0]).max() < 0.05, "the induction heads are in layer 1"
