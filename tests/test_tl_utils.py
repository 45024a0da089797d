"""TransformerLens's utility surface: jaxlens.utils, FactoredMatrix, head_detector, the `*_every` patching
helpers and HookedTransformer's analysis helpers, each compared with TransformerLens 4.3 on the same
weights (TL objects built from our arrays, or a TransformerBridge booted from the same checkpoint with
the same processing), plus their error paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

import jaxlens
from conftest import assert_close, built
from jaxlens.cache import head_detector as hd
from jaxlens import patching, utils
from jaxlens.model.factored_matrix import FactoredMatrix
from jaxlens.hooked import HookedTransformer

NO_PROCESSING = dict(fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False)
CLEAN = np.array([[0, 5, 9, 30, 2, 7], [0, 17, 250, 8, 3, 3]], np.int32)
CORRUPT = np.array([[0, 5, 9, 31, 2, 7], [0, 17, 251, 8, 3, 4]], np.int32)
INDUCTION_TEXT = "state new way door school time year people state new way door school time year people"
# Singular vectors come from different LAPACK paths (torch vs XLA) on f32 factors; they agree to ~1e-5
# of entries of size ~0.3, so these comparisons allow 2e-5.
SVD_TOL = dict(rtol=1e-5, atol=2e-5)


def _bridge(path, **processing):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(path), device="cpu", dtype=torch.float32)
    bridge.enable_compatibility_mode(**(processing or dict(no_processing=True)))
    return bridge


def _model(path):
    """Unprocessed (HF basis), whatever from_pretrained's default is."""
    return HookedTransformer.from_pretrained(path, **NO_PROCESSING)


@pytest.fixture(scope="module")
def gpt2(hf_root):
    path, _ = built("gpt2", hf_root)
    return _model(path), _bridge(path)


@pytest.fixture(scope="module")
def shipped():
    from jaxlens.assets import model_dir

    return _model(model_dir()), _bridge(model_dir())


def _t(x):
    return torch.tensor(np.asarray(x))


def _n(x):
    return x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


# ---------------------------------------------------------------------------------------------
# FactoredMatrix
# ---------------------------------------------------------------------------------------------

def _pair(shape_a, shape_b, seed=0):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal(shape_a).astype(np.float32)
    B = rng.standard_normal(shape_b).astype(np.float32)
    from transformer_lens import FactoredMatrix as TLFactoredMatrix

    return FactoredMatrix(A, B), TLFactoredMatrix(_t(A), _t(B))


def _signs(ours_u, tl_u):
    """Per singular vector sign that maps ours onto TransformerLens's (SVD signs are arbitrary)."""
    return np.sign((np.asarray(ours_u) * _n(tl_u)).sum(-2))


def test_factored_matrix_shapes_products_and_broadcasting():
    fm, tl = _pair((3, 6, 4), (2, 1, 4, 7))  # leading dims broadcast to [2 3]
    assert fm.shape == tuple(tl.shape) == (2, 3, 6, 7)
    assert (fm.ndim, fm.ldim, fm.mdim, fm.rdim) == (tl.ndim, tl.ldim, tl.mdim, tl.rdim) == (4, 6, 4, 7)
    assert fm.has_leading_dims and repr(fm) == "FactoredMatrix: Shape((2, 3, 6, 7)), Hidden Dim(4)"
    assert_close(fm.AB, _n(tl.AB), "AB")
    assert_close(fm.T.AB, _n(tl.T.AB), "T")
    assert_close(fm.get_corner(2), _n(tl.get_corner(2)), "get_corner")
    assert_close(utils.get_corner(fm, 2), _n(tl.get_corner(2)), "utils.get_corner(fm)")
    assert_close((fm * 2.5).AB, _n((tl * 2.5).AB), "scalar *")
    assert_close((0.5 * fm).AB, _n((0.5 * tl).AB), "scalar * (right)")
    assert fm.unsqueeze(0).shape == tuple(tl.unsqueeze(0).shape) == (1, 2, 3, 6, 7)
    sq, tsq = _pair((2, 5, 3), (2, 3, 5), 1)
    assert_close(sq.BA, _n(tsq.BA), "BA")
    assert [np.asarray(x).shape for x in sq.pair] == [tuple(x.shape) for x in tsq.pair]


@pytest.mark.parametrize("rdim", [3, 7], ids=["rdim<=mdim", "rdim>mdim"])
def test_factored_matrix_matmul_both_sides(rdim):
    """Products with matrices, vectors and FactoredMatrices, on either side; the result is factored
    the way TransformerLens factors it (same factor shapes)."""
    fm, tl = _pair((2, 5, 4), (2, 4, rdim), 2)
    rng = np.random.default_rng(3)
    right, left = rng.standard_normal((rdim, 6)).astype(np.float32), rng.standard_normal((3, 5)).astype(np.float32)
    vec_r, vec_l = rng.standard_normal(rdim).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    cases = {
        "fm @ M": (fm @ right, tl @ _t(right)),
        "fm @ jnp M": (fm @ jnp.asarray(right), tl @ _t(right)),
        "M @ fm": (left @ fm, _t(left) @ tl),
        "jnp M @ fm": (jnp.asarray(left) @ fm, _t(left) @ tl),
        "fm @ v": (fm @ vec_r, tl @ _t(vec_r)),
        "v @ fm": (vec_l @ fm, _t(vec_l) @ tl),
        "fm @ fm.T": (fm @ fm.T, tl @ tl.T),
    }
    for name, (ours, theirs) in cases.items():
        if isinstance(ours, FactoredMatrix):
            assert [np.shape(x) for x in ours.pair] == [tuple(x.shape) for x in theirs.pair], name
            ours, theirs = ours.AB, theirs.AB
        assert_close(ours, _n(theirs), name, rtol=2e-5)  # one extra f32 matmul in a different order


def test_factored_matrix_svd_norm_eigenvalues():
    fm, tl = _pair((2, 3, 6, 4), (2, 3, 4, 6), 4)
    U, S, V = fm.svd()
    tU, tS, tV = tl.svd()
    assert_close(S, _n(tS), "S", **SVD_TOL)
    s = _signs(U, tU)
    assert_close(U * s[..., None, :], _n(tU), "U", **SVD_TOL)
    assert_close(V * s[..., None, :], _n(tV), "V", **SVD_TOL)
    assert_close(jnp.einsum("...lk,...k,...rk->...lr", U, S, V), fm.AB, "U S V^T", **SVD_TOL)
    with pytest.warns(DeprecationWarning):
        assert_close(fm.Vh, np.asarray(V), "Vh is V, as in TransformerLens")
    assert_close(fm.collapse_r() * s[..., None, :], _n(tl.collapse_r()), "collapse_r", **SVD_TOL)
    assert_close(fm.collapse_l() * s[..., :, None], _n(tl.collapse_l()), "collapse_l", **SVD_TOL)
    even, teven = fm.make_even(), tl.make_even()
    assert_close(even.A * s[..., None, :], _n(teven.A), "make_even A", **SVD_TOL)
    assert_close(even.B * s[..., :, None], _n(teven.B), "make_even B", **SVD_TOL)
    assert_close(even.AB, fm.AB, "make_even keeps the product", **SVD_TOL)
    assert_close(fm.norm(), _n(tl.norm()), "norm")
    assert_close(fm.norm(), np.linalg.norm(np.asarray(fm.AB), axis=(-2, -1)), "Frobenius")
    ev, tev = np.asarray(fm.eigenvalues), _n(tl.eigenvalues)
    assert ev.shape == tev.shape == (2, 3, 4)
    dist = np.abs(ev[..., :, None] - tev[..., None, :]).min(-1)  # the same set, in any order
    assert dist.max() < 1e-4, dist.max()


def test_factored_matrix_indexing():
    fm, tl = _pair((2, 3, 5, 4), (2, 3, 4, 6), 5)
    indices = [0, -1, (1, 2), (slice(None), 1), (0, 1, 2), (0, 1, -1), (0, 1, slice(1, 3), 4),
               (Ellipsis, 2), (Ellipsis, 1, slice(None)), (0, Ellipsis, 3, 2), None, (0, None),
               (0, 0, None), (0, 0, slice(None), None), (0, 0, slice(None), slice(None), None), ([0, 1], 2)]
    for idx in indices:
        ours, theirs = fm[idx], tl[idx]
        assert ours.shape == tuple(theirs.shape), idx
        assert_close(ours.AB, _n(theirs.AB), f"fm[{idx}]")


def test_factored_matrix_is_a_pytree():
    fm, _ = _pair((2, 5, 4), (2, 4, 6), 6)
    out = jax.jit(lambda m, x: (m @ x).T)(fm, jnp.ones((6, 3)))
    assert isinstance(out, FactoredMatrix) and out.shape == (2, 3, 5)
    assert_close(out.AB, np.swapaxes(np.asarray(fm.AB) @ np.ones((6, 3)), -1, -2), "jit")
    assert_close(jax.jit(lambda m: m.norm())(fm), fm.norm(), "jit norm")
    per = jax.vmap(lambda m: m.AB)(fm)
    assert_close(per, fm.AB, "vmap over the leading dim")
    g = jax.grad(lambda m: m.AB.sum())(fm)
    assert isinstance(g, FactoredMatrix) and g.A.shape == fm.A.shape
    assert len(jax.tree.leaves(fm)) == 2
    assert_close(jax.tree.map(lambda x: 2 * x, fm).AB, 4 * np.asarray(fm.AB), "tree.map")


def test_factored_matrix_errors():
    with pytest.raises(ValueError, match="inner dimension"):
        FactoredMatrix(np.ones((3, 4)), np.ones((5, 2)))
    with pytest.raises(ValueError, match="do not broadcast"):
        FactoredMatrix(np.ones((2, 3, 4)), np.ones((3, 4, 2)))
    with pytest.raises(ValueError, match="matrices"):
        FactoredMatrix(np.ones(4), np.ones((4, 2)))
    fm = FactoredMatrix(np.ones((2, 5, 4)), np.ones((2, 4, 6)))
    with pytest.raises(ValueError, match="square"):
        fm.BA
    with pytest.raises(ValueError, match="needs 6 rows"):
        fm @ np.ones((5, 2))
    with pytest.raises(ValueError, match="needs 5 columns"):
        np.ones((2, 6)) @ fm
    with pytest.raises(ValueError, match="6 entries"):
        fm @ np.ones(5)
    with pytest.raises(ValueError, match="scalar"):
        fm * np.ones(3)
    with pytest.raises(IndexError, match="index 2 is out of range for axis 0"):
        fm[2]  # JAX would clamp it to the last element
    with pytest.raises(IndexError, match="index 7 is out of range for axis 2"):
        fm[0, :, 7]
    with pytest.raises(IndexError, match="out of range for axis 1"):
        fm[0, [1, 5]]
    with pytest.raises(IndexError, match="too long"):
        fm[0, 0, 0, 0]
    with pytest.raises(IndexError, match="single ellipsis"):
        fm[..., 0, ...]


# ---------------------------------------------------------------------------------------------
# jaxlens.utils
# ---------------------------------------------------------------------------------------------

def test_utils_basics():
    from transformer_lens import utilities as tlu

    for args in [("pattern", 1), ("resid_pre", 0), ("scale", 1, "ln2"), ("embed",), ("k6q",), ("mlp_out", 3)]:
        assert utils.get_act_name(*args) == tlu.get_act_name(*args), args
    assert utils.get_act_name is jaxlens.hooks.get_act_name and utils.Slice is jaxlens.slice.Slice
    x = jnp.arange(24.0).reshape(2, 3, 4)
    assert_close(utils.get_corner(x, 2), tlu.get_corner(torch.arange(24.0).reshape(2, 3, 4), 2).numpy(), "corner")
    assert utils.to_numpy(x).dtype == np.float32 and isinstance(utils.to_numpy(x), np.ndarray)
    assert utils.to_numpy(x.astype(jnp.bfloat16)).dtype == np.float32
    assert utils.to_numpy(torch.ones(2, dtype=torch.bfloat16)).dtype == np.float32
    for v in ([1, 2], (1.0,), 3, "a", np.ones(2)):
        np.testing.assert_array_equal(utils.to_numpy(v), tlu.to_numpy(v))
    with pytest.raises(ValueError, match="invalid type"):
        utils.to_numpy({"a": 1})
    assert utils.remove_batch_dim(jnp.ones((1, 3))).shape == (3,)
    assert utils.remove_batch_dim(jnp.ones((2, 3))).shape == (2, 3)
    assert isinstance(utils.get_device(), jax.Device)
    assert set(utils.__all__) <= set(dir(utils))


def test_losses_match_transformer_lens():
    from transformer_lens import utilities as tlu

    rng = np.random.default_rng(7)
    logits = rng.standard_normal((2, 5, 11)).astype(np.float32)
    tokens = rng.integers(0, 11, (2, 5))
    mask = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    tl_args = (_t(logits), torch.tensor(tokens))
    for per_token in (False, True):
        assert_close(utils.lm_cross_entropy_loss(logits, tokens, per_token=per_token),
                     _n(tlu.lm_cross_entropy_loss(*tl_args, per_token=per_token)), f"loss per_token={per_token}")
        assert_close(utils.lm_cross_entropy_loss(logits, tokens, mask, per_token=per_token),
                     _n(tlu.lm_cross_entropy_loss(*tl_args, torch.tensor(mask), per_token=per_token)),
                     f"masked loss per_token={per_token}")
        assert_close(utils.lm_accuracy(logits, tokens, per_token), _n(tlu.lm_accuracy(*tl_args, per_token)),
                     f"accuracy per_token={per_token}")
    assert_close(utils.lm_cross_entropy_loss(logits[0], tokens[0], per_token=True),
                 _n(tlu.lm_cross_entropy_loss(_t(logits[0]), torch.tensor(tokens[0]), per_token=True)), "unbatched")
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        utils.lm_cross_entropy_loss(logits, tokens, mask[:, :3])
    with pytest.raises(ValueError, match="tokens"):
        utils.lm_cross_entropy_loss(logits, tokens[:, :3])


@pytest.mark.parametrize("answer", ["way", [" way", " door", "new"]], ids=["one answer", "three answers"])
def test_test_prompt_prints_what_transformer_lens_prints(shipped, capsys, answer):
    from transformer_lens.utilities import exploratory_utils

    model, bridge = shipped
    prompt = "state new way door school state new"
    utils.test_prompt(prompt, answer, model, top_k=4)
    ours = capsys.readouterr().out
    with torch.no_grad():
        exploratory_utils.test_prompt(prompt, answer, bridge, top_k=4)
    theirs = capsys.readouterr().out
    assert "Performance on answer token" in ours and "Ranks of the answer tokens:" in ours
    assert ours == theirs
    utils.test_prompt(prompt, "way", model, print_details=False)
    assert capsys.readouterr().out.startswith("Ranks of the answer tokens: [(' way', ")
    with pytest.raises(ValueError, match="answer must be"):
        utils.test_prompt(prompt, [], model)


# ---------------------------------------------------------------------------------------------
# HookedTransformer helpers
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_qk_ov_circuits(hf_root, family):
    """[n_layers n_heads d_model d_model] factored circuits, grouped keys/values expanded (llama: GQA)."""
    path, _ = built(family, hf_root)
    model, bridge = _model(path), _bridge(path)
    cfg = model.cfg
    for name in ("QK", "OV"):
        ours, theirs = getattr(model, name), getattr(bridge, name)
        assert ours.shape == tuple(theirs.shape) == (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_model)
        assert_close(ours.A, _n(theirs.A), f"{name}.A")
        assert_close(ours.B, _n(theirs.B), f"{name}.B")
        assert_close(ours.AB, _n(theirs.AB), f"{name}.AB")
    # composition scores (Elhage et al.): every head pair, Q / K / V, and the utils function
    from transformer_lens import utilities as tl_utils

    for mode in "QKV":
        with torch.no_grad():
            want = bridge.all_composition_scores(mode).scores.numpy()
        got = model.all_composition_scores(mode)
        assert got.shape == (cfg.n_layers, cfg.n_heads, cfg.n_layers, cfg.n_heads)
        assert_close(got, want, f"{mode} composition scores", atol=1e-6)
        assert np.asarray(got)[0, :, 1].min() > 0 and not np.asarray(got)[1].any()  # only later layers
    with torch.no_grad():
        want = tl_utils.composition_scores(bridge.OV[0], bridge.QK[1]).numpy()
    assert_close(jaxlens.utils.composition_scores(model.OV[0], model.QK[1]), want, "utils.composition_scores",
                 atol=1e-6)
    with pytest.raises(ValueError, match="mode must be one of"):
        model.all_composition_scores("O")


def test_tokens_to_residual_directions(shipped):
    model, bridge = shipped
    word = model.to_str_tokens("state", prepend_bos=False)[0]
    cases = [word, 7, np.array(7), np.array([7]), np.array([3, 5, 7]), np.array([[1, 2], [3, 4]]), jnp.array([9, 8])]
    for tokens in cases:
        arg = torch.tensor(np.asarray(tokens)) if isinstance(tokens, (np.ndarray, jax.Array)) else tokens
        ours, theirs = model.tokens_to_residual_directions(tokens), bridge.tokens_to_residual_directions(arg)
        assert_close(ours, _n(theirs), f"tokens_to_residual_directions({tokens!r})")
    traced = jax.jit(model.tokens_to_residual_directions)(jnp.array([[3, 5]]))
    assert_close(traced, _n(bridge.tokens_to_residual_directions(torch.tensor([[3, 5]]))), "under jit")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.tokens_to_residual_directions(np.array([1, model.cfg.d_vocab]))
    with pytest.raises(ValueError, match="token ids"):
        model.tokens_to_residual_directions(np.array([1.5, 2.0]))
    with pytest.raises(ValueError, match="not one"):
        model.tokens_to_residual_directions("state new way")


def test_get_token_position(shipped):
    model, bridge = shipped
    text = "state new way door state new way"
    toks = np.asarray(model.to_tokens(text))
    for single in (" new", " way", int(toks[0, 2])):
        for mode in ("first", "last"):
            expected = bridge.get_token_position(single, text, mode=mode)
            assert model.get_token_position(single, text, mode=mode) == expected, (single, mode)
            assert model.get_token_position(single, toks, mode=mode) == expected
            assert model.get_token_position(single, toks[0], mode=mode) == expected
    assert (model.get_token_position(" new", text, prepend_bos=False)
            == bridge.get_token_position(" new", text, prepend_bos=False))
    with pytest.raises(ValueError, match="does not occur"):
        model.get_token_position(" door", "state new")
    with pytest.raises(ValueError, match="'first' or 'last'"):
        model.get_token_position(" new", text, mode="middle")
    with pytest.raises(ValueError, match=r"\[1, seq_len\]"):
        model.get_token_position(" new", np.concatenate([toks, toks]))


def test_all_head_labels_and_accumulated_bias(gpt2):
    model, bridge = gpt2
    assert model.all_head_labels == bridge.all_head_labels == model.all_head_labels()
    assert model.all_head_labels[:5] == ["L0H0", "L0H1", "L0H2", "L0H3", "L1H0"]
    n = model.cfg.n_layers
    for layer in range(n + 1):
        for mlp_input in (False, True) if layer < n else (False,):
            for include in (True, False):
                with torch.no_grad():
                    theirs = bridge.accumulated_bias(layer, mlp_input=mlp_input, include_mlp_biases=include)
                ours = model.accumulated_bias(layer, mlp_input=mlp_input, include_mlp_biases=include)
                assert_close(ours, _n(theirs), f"accumulated_bias({layer}, {mlp_input}, {include})")
    with pytest.raises(ValueError, match="mlp_input=True needs layer < n_layers"):
        model.accumulated_bias(n, mlp_input=True)
    with pytest.raises(ValueError, match="out of range"):
        model.accumulated_bias(n + 1)


def test_refactor_factored_attn_matrices(hf_root, gpt2):
    """As TransformerLens's refactor step alone (no other processing): every weight equal up to the
    sign of each singular vector, the QK/OV products and the logits unchanged."""
    model, _ = gpt2
    path, _ = built("gpt2", hf_root)
    bridge = _bridge(path, **NO_PROCESSING, refactor_factored_attn_matrices=True)
    new = model.refactor_factored_attn_matrices()
    assert isinstance(new, HookedTransformer) and new is not model
    with torch.no_grad():
        tl = {n: _n(getattr(bridge, n)) for n in ("W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V", "W_O", "b_O")}
        tl_logits = bridge(torch.tensor(CLEAN, dtype=torch.long)).numpy()
    qk = np.sign((np.asarray(new.W_Q) * tl["W_Q"]).sum(-2))  # [L H d_head]: per singular vector
    ov = np.sign((np.asarray(new.W_V) * tl["W_V"]).sum(-2))
    assert_close(new.W_Q * qk[:, :, None], tl["W_Q"], "W_Q", **SVD_TOL)
    assert_close(new.b_Q * qk, tl["b_Q"], "b_Q", **SVD_TOL)
    assert_close(new.W_K * qk[:, :, None], tl["W_K"], "W_K", **SVD_TOL)
    assert_close(new.b_K * qk, tl["b_K"], "b_K", **SVD_TOL)
    assert_close(new.W_V * ov[:, :, None], tl["W_V"], "W_V", **SVD_TOL)
    assert_close(new.W_O * ov[..., None], tl["W_O"], "W_O", **SVD_TOL)
    assert_close(new.b_V, tl["b_V"], "b_V")
    assert_close(new.b_O, tl["b_O"], "b_O")
    assert_close(new.QK.AB, model.QK.AB, "QK unchanged", **SVD_TOL)
    assert_close(new.OV.AB, model.OV.AB, "OV unchanged", **SVD_TOL)
    assert_close(new(CLEAN), model(CLEAN), "logits unchanged", **SVD_TOL)
    assert_close(new(CLEAN), tl_logits, "logits = TransformerLens's", **SVD_TOL)
    from jaxlens.model.forward import stack_layers

    scanned = HookedTransformer(model.cfg, stack_layers(model.params, model.cfg.n_layers))
    assert_close(scanned.refactor_factored_attn_matrices().W_Q, new.W_Q, "scanned layout")


def test_refactor_refuses_rotary(hf_root):
    path, _ = built("llama", hf_root)
    with pytest.raises(ValueError, match="rotary"):
        _model(path).refactor_factored_attn_matrices()


# ---------------------------------------------------------------------------------------------
# head_detector
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tl_detect(shipped):
    from transformer_lens import head_detector as tlhd

    _, bridge = shipped

    def run(*args, **kw):
        if len(args) > 1 and isinstance(args[1], np.ndarray):
            args = (args[0], torch.tensor(args[1]), *args[2:])
        with torch.no_grad():
            return tlhd.detect_head(bridge, *args, **kw).numpy()

    return run


def test_detect_head_builtin_patterns(shipped, tl_detect):
    """Every built-in pattern, error measure and exclusion, on one cached run each (ours and TL's)."""
    model, bridge = shipped
    _, cache = model.run_with_cache(INDUCTION_TEXT)
    with torch.no_grad():
        _, tl_cache = bridge.run_with_cache(bridge.to_tokens(INDUCTION_TEXT), remove_batch_dim=True)
    for name in hd.HEAD_NAMES:
        for error_measure in ("mul", "abs"):
            for exclude_bos, exclude_current in ((False, False), (True, False), (True, True)):
                kw = dict(exclude_bos=exclude_bos, exclude_current_token=exclude_current, error_measure=error_measure)
                ours = hd.detect_head(model, INDUCTION_TEXT, name, cache=cache, **kw)
                assert ours.shape == (model.cfg.n_layers, model.cfg.n_heads) and ours.dtype == jnp.float32
                assert_close(ours, tl_detect(INDUCTION_TEXT, name, cache=tl_cache, **kw), f"{name} {kw}")
    assert_close(hd.detect_head(model, INDUCTION_TEXT, "induction_head"), tl_detect(INDUCTION_TEXT, "induction_head"),
                 "without a cache")


def test_detect_head_finds_the_induction_circuit(shipped, tl_detect):
    """The shipped model: layer 1's heads are induction heads and L0H3 is the previous-token head
    below them. On BOS + r + r (distinct r) the induction pattern is the probe's diagonal, so the
    "mul" score is `jaxlens.probes`' induction score times seq_len / n."""
    from jaxlens.apps.probes import model_induction_scores

    model, _ = shipped
    seq_len = 50
    r = np.random.default_rng(0).permutation(np.arange(1, model.cfg.d_vocab))[:seq_len]
    toks = np.concatenate([[0], r, r])
    scores = np.asarray(hd.detect_head(model, toks, "induction_head"))
    assert (scores[1] > 0.35).all() and (scores[0] < 0.05).all(), scores
    probe = model_induction_scores(model.params, model.cfg, toks[None])
    assert_close(scores * (2 * seq_len + 1) / seq_len, probe, "detect_head vs probes.induction_scores")
    prev = np.asarray(hd.detect_head(model, INDUCTION_TEXT, "previous_token_head"))
    assert np.unravel_index(prev.argmax(), prev.shape) == (0, 3) and prev[0, 3] > 0.8, prev
    prompts = [INDUCTION_TEXT, "a b c d e a b c d e"]
    assert_close(hd.detect_head(model, prompts, "induction_head"), tl_detect(prompts, "induction_head"), "list")


def test_detect_head_heads_custom_pattern_and_cache(shipped, tl_detect):
    model, _ = shipped
    text = "state new way door state new"
    sel = [(0, 1), (1, 2), (1, 3)]
    assert_close(hd.detect_head(model, text, "previous_token_head", heads=sel),
                 tl_detect(text, "previous_token_head", heads=sel), "heads list")
    by_layer = {1: [0, 2]}
    ours = np.asarray(hd.detect_head(model, text, "duplicate_token_head", heads=by_layer))
    assert_close(ours, tl_detect(text, "duplicate_token_head", heads=by_layer), "heads dict")
    assert (ours[0] == -1).all() and (ours[1, [1, 3]] == -1).all()
    n = np.asarray(model.to_tokens(text)).shape[1]
    custom = np.tril(np.ones((n, n), np.float32)) / np.arange(1, n + 1)[:, None]  # uniform attention
    for measure in ("abs", "mul"):
        assert_close(hd.detect_head(model, text, custom, error_measure=measure),
                     tl_detect(text, torch.tensor(custom), error_measure=measure), f"custom {measure}")
    _, cache = model.run_with_cache(text)
    assert_close(hd.detect_head(model, text, "induction_head", cache=cache),
                 hd.detect_head(model, text, "induction_head"), "with a cache")
    assert_close(hd.detect_head(model, text, "induction_head", cache=cache.remove_batch_dim()),
                 hd.detect_head(model, text, "induction_head"), "with a batch-free cache")
    toks = np.asarray(model.to_tokens(text))[0]
    assert_close(hd.detect_head(model, toks, "induction_head"), hd.detect_head(model, text, "induction_head"),
                 "token ids as seq")


def test_detection_patterns_match_transformer_lens():
    from transformer_lens import head_detector as tlhd

    toks = np.array([[0, 5, 6, 5, 6, 7, 5]])
    for name in hd.HEAD_NAMES:
        ours = getattr(hd, f"get_{name}_detection_pattern")(toks)
        theirs = getattr(tlhd, f"get_{name}_detection_pattern")(torch.tensor(toks))
        assert_close(ours, _n(theirs), name)


def test_detect_head_errors(shipped):
    model, _ = shipped
    text = "state new way door"
    n = np.asarray(model.to_tokens(text)).shape[1]
    with pytest.raises(ValueError, match="unknown detection_pattern 'induction'"):
        hd.detect_head(model, text, "induction")
    with pytest.raises(ValueError, match=rf"it must be \[{n} {n}\]"):
        hd.detect_head(model, text, np.zeros((n + 1, n + 1)))
    with pytest.raises(ValueError, match="lower triangular"):
        hd.detect_head(model, text, np.ones((n, n)))
    with pytest.raises(ValueError, match="layer 2 is out of range"):
        hd.detect_head(model, text, "induction_head", heads=[(2, 0)])
    with pytest.raises(ValueError, match="head 4 .* out of range"):
        hd.detect_head(model, text, "induction_head", heads={1: [4]})
    with pytest.raises(ValueError, match=r"\(layer, head\) pairs"):
        hd.detect_head(model, text, "induction_head", heads=[1, 2])
    with pytest.raises(ValueError, match="error_measure"):
        hd.detect_head(model, text, "induction_head", error_measure="l2")
    with pytest.raises(ValueError, match="one string"):
        hd.detect_head(model, [text, text], np.zeros((n, n)))
    _, cache = model.run_with_cache(text)
    with pytest.raises(ValueError, match="list of prompts"):
        hd.detect_head(model, [text, text], "induction_head", cache=cache)
    with pytest.raises(ValueError, match="does not fit"):
        hd.detect_head(model, text + " school", "induction_head", cache=cache)
    with pytest.raises(ValueError, match="2..n_ctx"):
        hd.detect_head(model, "", "induction_head")


# ---------------------------------------------------------------------------------------------
# patching: the *_every helpers and index checks
# ---------------------------------------------------------------------------------------------

def _metric(logits):
    return (logits[:, -1, 3] - logits[:, -1, 4]).mean()


EVERY = ("get_act_patch_block_every", "get_act_patch_attn_head_all_pos_every", "get_act_patch_attn_head_by_pos_every")
P_CLEAN, P_CORRUPT = CLEAN[:, :4], CORRUPT[:, :4]  # TransformerLens runs one forward pass per cell: keep it small


@pytest.fixture(scope="module")
def tl_every(gpt2):
    from transformer_lens import patching as tlp

    model, bridge = gpt2
    with torch.no_grad():
        _, tl_cache = bridge.run_with_cache(torch.tensor(P_CLEAN, dtype=torch.long))
        corrupt = torch.tensor(P_CORRUPT, dtype=torch.long)
        return {name: getattr(tlp, name)(bridge, corrupt, tl_cache, _metric).numpy() for name in EVERY}


# One compiled program per (activation, layer): the grids are compared on their last layer (layer 0's
# rows are NaN), which keeps this file fast; layer 0 runs the same code.
@pytest.mark.parametrize("name,shape", list(zip(EVERY, [(3, 2, 4), (5, 2, 4), (5, 2, 4, 4)])), ids=EVERY)
def test_every_helpers_match_transformer_lens(gpt2, tl_every, name, shape):
    model, _ = gpt2
    _, cache = model.run_with_cache(P_CLEAN)
    ours = np.asarray(getattr(patching, name)(model, P_CORRUPT, cache, _metric, layers=[1]))
    theirs = tl_every[name]
    assert ours.shape == theirs.shape == shape
    assert_close(ours[:, 1], theirs[:, 1], name)
    assert np.isnan(ours[:, 0]).all()


def test_every_stacking_order_padding_and_pattern_axes(monkeypatch):
    """With each grid replaced by a labelled stub: TransformerLens's order, grouped-query k/v zero-padded to
    n_heads, the by-pos pattern grid [layer head dest_pos] moved to [layer pos head], keywords passed on."""
    from types import SimpleNamespace

    L, P, H, KV = 2, 3, 4, 2
    model = SimpleNamespace(cfg=SimpleNamespace(n_layers=L, n_heads=H, n_kv_heads=KV))
    seen = []

    def stub(value, shape):
        def fn(model, corrupted_tokens, clean_cache, metric, **kw):
            seen.append(kw)
            return value + jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
        return fn

    grids = {"resid_pre": (100, (L, P)), "attn_out": (200, (L, P)), "mlp_out": (300, (L, P)),
             "attn_head_out_all_pos": (100, (L, H)), "attn_head_q_all_pos": (200, (L, H)),
             "attn_head_k_all_pos": (300, (L, KV)), "attn_head_v_all_pos": (400, (L, KV)),
             "attn_head_pattern_all_pos": (500, (L, H)), "attn_head_out_by_pos": (100, (L, P, H)),
             "attn_head_q_by_pos": (200, (L, P, H)), "attn_head_k_by_pos": (300, (L, P, KV)),
             "attn_head_v_by_pos": (400, (L, P, KV)), "attn_head_pattern_by_pos": (500, (L, H, P))}
    for short, (value, shape) in grids.items():
        monkeypatch.setattr(patching, f"get_act_patch_{short}", stub(value, shape))
    block = np.asarray(patching.get_act_patch_block_every(model, None, None, None, chunk_size=2))
    assert block.shape == (3, L, P) and (block[:, 0, 0] == [100, 200, 300]).all()
    assert seen and all(kw == {"chunk_size": 2} for kw in seen)
    heads = np.asarray(patching.get_act_patch_attn_head_all_pos_every(model, None, None, None))
    assert heads.shape == (5, L, H) and (heads[:, 0, 0] == [100, 200, 300, 400, 500]).all()
    assert (heads[2:4, :, KV:] == 0).all() and (heads[2, :, :KV] == 300 + np.arange(L * KV).reshape(L, KV)).all()
    by_pos = np.asarray(patching.get_act_patch_attn_head_by_pos_every(model, None, None, None))
    assert by_pos.shape == (5, L, P, H) and (by_pos[2:4, ..., KV:] == 0).all()
    pattern = 500 + np.arange(L * H * P).reshape(L, H, P)
    assert (by_pos[4] == pattern.transpose(0, 2, 1)).all()


@pytest.mark.parametrize("layers,message", [
    ([2], r"layers\[0\]=2 is out of range for a model of 2 layers; valid 0..1"),
    ([-1], r"layers\[0\]=-1 is out of range"),
    ([0, 1.0], r"layers\[1\] must be an int index, got 1.0"),
    (1, "must be a sequence of indices"),
    ("1", "must be a sequence of indices"),
    ([], "layers is empty"),
])
def test_patching_layer_indices_are_checked(gpt2, layers, message):
    model, _ = gpt2
    _, cache = model.run_with_cache(CLEAN, names_filter=lambda n: n.endswith("hook_resid_pre"))
    with pytest.raises(ValueError, match=message):
        patching.get_act_patch_resid_pre(model, CORRUPT, cache, _metric, layers=layers)
    with pytest.raises(ValueError, match=message):
        patching.get_act_patch_block_every(model, CORRUPT, cache, _metric, layers=layers)


def test_top_level_names():
    assert jaxlens.FactoredMatrix is FactoredMatrix
    for mod in ("utils", "patching", "head_detector", "factored_matrix"):
        assert mod in jaxlens.__all__ and getattr(jaxlens, mod).__name__ == jaxlens.SHORT_NAMES.get(mod, f"jaxlens.{mod}")
