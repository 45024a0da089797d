"""A hook never returns a stale result, and a loop over heads or positions compiles once.

Every idiom of TransformerLens's notebooks: hooks that read globals, closure cells, default
arguments, `functools.partial` arguments, lambdas made in a loop, methods and callable objects.
Each call is compared with a fresh compilation (a new `jax.jit` tracing the hook as it is now,
i.e. what a fresh process would compute), and the number of programs compiled is counted.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlens
from jaxlens.assets import model_dir
from jaxlens.fingerprint import Fn

Z = "blocks.1.attn.hook_z"
RESID = "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module")
def model():
    return jaxlens.from_pretrained(model_dir())


@pytest.fixture(scope="module")
def toks(model):
    return model.to_tokens("When Mary and John went to the store, John gave a drink to")


def fresh(model, toks, fwd_hooks):
    """What a fresh process computes: a new jit that traces the hooks as they are now."""
    hooks = jaxlens.make_hooks(fwd_hooks, model.cfg)
    f = jax.jit(lambda p, t: jaxlens.forward(p, model.cfg, t, hooks=hooks, precision=model.precision)[0])
    return np.asarray(f(model.params, toks))


_COMPILES = [0]
jax.monitoring.register_event_duration_secs_listener(
    lambda name, _d, **_kw: _COMPILES.__setitem__(0, _COMPILES[0] + (name == "/jax/core/compile/backend_compile_duration")))


class Compiles:
    """Counts the XLA compilations inside the block (keep `fresh` runs outside it)."""

    def __enter__(self):
        self.start = _COMPILES[0]
        return self

    def __exit__(self, *exc):
        self.n = _COMPILES[0] - self.start
        return False


def check_loop(model, toks, make_hooks, values, compiles=1):
    """Run the hooks for each value as a TransformerLens loop; each result equals a fresh run,
    results differ between values, and `compiles` programs were built."""
    hooks = [make_hooks(v) for v in values]  # outside the count: building them may compile eager ops
    with Compiles() as c:
        outs = [np.asarray(model.run_with_hooks(toks, fwd_hooks=h)) for h in hooks]
    for v, out in zip(values, outs):
        np.testing.assert_allclose(out, fresh(model, toks, make_hooks(v)), rtol=1e-5, atol=1e-5, err_msg=f"value {v!r}")
    for v, o in zip(values[1:], outs[1:]):
        assert np.abs(o - outs[0]).max() > 1e-3, f"value {v!r} gave the same logits as {values[0]!r}"
    assert c.n == compiles, f"{c.n} programs compiled for {len(values)} calls, expected {compiles}"
    return outs


# --- globals ------------------------------------------------------------------------------------

HEAD = 0
SCALE = 1.0
DIRECTION = np.zeros(128, np.float32)


def ablate_global_head(z, hook):
    return z.at[:, :, HEAD].set(0.0)


def test_global_int_is_traced(model, toks):
    global HEAD
    with Compiles() as c:
        outs = []
        for HEAD in range(4):
            outs.append(np.asarray(model.run_with_hooks(toks, fwd_hooks=[(Z, ablate_global_head)])))
    for HEAD in range(4):
        np.testing.assert_allclose(outs[HEAD], fresh(model, toks, [(Z, ablate_global_head)]), rtol=1e-5, atol=1e-5)
    HEAD = 0
    assert c.n == 1
    assert all(np.abs(o - outs[0]).max() > 1e-3 for o in outs[1:])


def scale_global(x, hook):
    return x * SCALE


def test_global_float_is_traced(model, toks):
    global SCALE
    scales = (1.0, 0.5, 2.0)
    with Compiles() as c:
        outs = []
        for SCALE in scales:
            outs.append(np.asarray(model.run_with_hooks(toks, fwd_hooks=[(RESID, scale_global)])))
    for SCALE, out in zip(scales, outs):
        np.testing.assert_allclose(out, fresh(model, toks, [(RESID, scale_global)]), rtol=1e-5, atol=1e-5)
    SCALE = 1.0
    assert c.n == 1 and np.abs(outs[1] - outs[0]).max() > 1e-3


def steer_global(x, hook):
    return x + DIRECTION


def test_global_array_changed_in_place_and_rebound(model, toks):
    global DIRECTION
    base = np.asarray(model.run_with_hooks(toks, fwd_hooks=[(RESID, steer_global)]))
    DIRECTION = np.linspace(-1, 1, 128, dtype=np.float32)  # rebound (not constant: a norm would remove it)
    b = np.asarray(model.run_with_hooks(toks, fwd_hooks=[(RESID, steer_global)]))
    DIRECTION[:] = -DIRECTION  # mutated in place
    c = np.asarray(model.run_with_hooks(toks, fwd_hooks=[(RESID, steer_global)]))
    np.testing.assert_allclose(c, fresh(model, toks, [(RESID, steer_global)]), rtol=1e-5, atol=1e-5)
    assert np.abs(b - base).max() > 1e-3 and np.abs(c - b).max() > 1e-3
    DIRECTION = np.zeros(128, np.float32)


def _helper_reads_head(z):
    return z.at[:, :, HEAD].set(0.0)


def ablate_via_helper(z, hook):
    return _helper_reads_head(z)


def test_global_read_by_a_helper_function(model, toks):
    global HEAD
    outs = []
    for HEAD in (0, 2):
        outs.append(np.asarray(model.run_with_hooks(toks, fwd_hooks=[(Z, ablate_via_helper)])))
        np.testing.assert_allclose(outs[-1], fresh(model, toks, [(Z, ablate_via_helper)]), rtol=1e-5, atol=1e-5)
    HEAD = 0
    assert np.abs(outs[1] - outs[0]).max() > 1e-3


def test_redefined_function_with_another_body(model, toks):
    def hook(z, hook):
        return z.at[:, :, 0].set(0.0)

    a = np.asarray(model.run_with_hooks(toks, fwd_hooks=[(Z, hook)]))

    def hook(z, hook):  # noqa: F811 - a notebook cell run again with an edit
        return z.at[:, :, 1].set(0.0)

    b = np.asarray(model.run_with_hooks(toks, fwd_hooks=[(Z, hook)]))
    np.testing.assert_allclose(b, fresh(model, toks, [(Z, hook)]), rtol=1e-5, atol=1e-5)
    assert np.abs(a - b).max() > 1e-3


# --- closures, defaults, partials, lambdas ------------------------------------------------------

def test_closure_cell_that_changes(model, toks):
    head = 0

    def ablate(z, hook):
        return z.at[:, :, head].set(0.0)

    with Compiles() as c:
        outs = []
        for head in range(4):  # noqa: B007 - the hook reads the cell
            outs.append(np.asarray(model.run_with_hooks(toks, fwd_hooks=[(Z, ablate)])))
    for head in range(4):  # noqa: B007
        np.testing.assert_allclose(outs[head], fresh(model, toks, [(Z, ablate)]), rtol=1e-5, atol=1e-5)
    assert c.n == 1 and np.abs(outs[3] - outs[0]).max() > 1e-3


def test_default_argument(model, toks):
    def make(head):
        def ablate(z, hook, head=head):
            return z.at[:, :, head].set(0.0)
        return [(Z, ablate)]

    check_loop(model, toks, make, [0, 1, 2, 3])


def _ablate_pos(z, hook, pos):
    return z.at[:, pos].set(0.0)


def test_functools_partial_per_call(model, toks):
    check_loop(model, toks, lambda p: [(Z, functools.partial(_ablate_pos, pos=p))], [1, 3, 5, 7])


def test_jax_partial_with_array(model, toks):
    check_loop(model, toks, lambda p: [(Z, jax.tree_util.Partial(_ablate_pos, pos=jnp.asarray(p)))], [1, 4])


def test_lambdas_made_in_a_loop(model, toks):
    check_loop(model, toks, lambda h: [(Z, lambda z, hook: z.at[:, :, h].set(0.0))], [0, 1, 2, 3])


def test_hook_name_filter_and_layer_from_hook_point(model, toks):
    def make(layer):
        return [(lambda n: n.endswith("hook_z"), lambda z, hook: z * 0.0 if hook.layer() == layer else z)]

    # `hook.layer() == layer` needs the number at trace time: one program per value, all correct
    check_loop(model, toks, make, [0, 1], compiles=2)


def test_number_that_sets_a_shape_recompiles_per_value(model, toks):
    def make(n):
        return [(Z, lambda z, hook: z.at[:, :n].set(0.0))]  # a slice bound must be a constant

    check_loop(model, toks, make, [2, 4, 6], compiles=3)


# --- methods and callable objects ---------------------------------------------------------------

class Ablator:
    def __init__(self, head):
        self.head = head

    def hook(self, z, hook):
        return z.at[:, :, self.head].set(0.0)

    def __call__(self, z, hook):
        return self.hook(z, hook)


def test_bound_method_reads_attribute(model, toks):
    a = Ablator(0)
    with Compiles() as c:
        outs = []
        for h in (0, 1, 2):
            a.head = h  # the same object, mutated between calls
            outs.append(np.asarray(model.run_with_hooks(toks, fwd_hooks=[(Z, a.hook)])))
    for h, out in zip((0, 1, 2), outs):
        np.testing.assert_allclose(out, fresh(model, toks, [(Z, Ablator(h).hook)]), rtol=1e-5, atol=1e-5)
    assert c.n == 1 and np.abs(outs[2] - outs[0]).max() > 1e-3


def test_callable_object(model, toks):
    check_loop(model, toks, lambda h: [(Z, Ablator(h))], [0, 3])


# --- the patching idiom: a hook reading a clean cache -------------------------------------------

def test_patching_loop_reads_clean_cache(model, toks):
    clean = model.to_tokens("When Mary and John went to the store, Mary gave a drink to")
    _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("resid_pre"))

    def patch(x, hook, pos):
        return x.at[:, pos].set(clean_cache[hook.name][:, pos])

    def make(p):
        return [(RESID, functools.partial(patch, pos=p))]

    check_loop(model, toks, make, [10, 12, 14])  # from the token that differs on


# --- uncacheable values: correct, recompiled, with a warning ------------------------------------

class Opaque:
    __slots__ = ("head",)

    def __init__(self, head):
        self.head = head


def test_value_that_cannot_be_keyed_is_never_cached(model, toks):
    box = Opaque(0)

    def ablate(z, hook):
        return z.at[:, :, box.head].set(0.0)

    outs = []
    with pytest.warns(UserWarning, match="rebuilt on every call"):
        for h in (0, 2):
            box.head = h
            outs.append(np.asarray(model.run_with_hooks(toks, fwd_hooks=[(Z, ablate)])))
            np.testing.assert_allclose(outs[-1], fresh(model, toks, [(Z, ablate)]), rtol=1e-5, atol=1e-5)
    assert np.abs(outs[1] - outs[0]).max() > 1e-3


# --- generation and the KV cache use the same keys ----------------------------------------------

def test_generate_follows_a_changed_global(model):
    global HEAD
    out = []
    for HEAD in (0, 1):
        hooks = [(lambda n: n.endswith("hook_z"), ablate_global_head)]
        out.append(np.asarray(model.generate("1 2 3 1 2", max_new_tokens=4, do_sample=False, fwd_hooks=hooks,
                                             return_type="tokens")))
    HEAD = 0
    expect = []
    for h in (0, 1):
        hooks = [(lambda n: n.endswith("hook_z"), lambda z, hook, h=h: z.at[:, :, h].set(0.0))]
        expect.append(np.asarray(model.generate("1 2 3 1 2", max_new_tokens=4, do_sample=False, fwd_hooks=hooks,
                                                return_type="tokens")))
    np.testing.assert_array_equal(out[0], expect[0])
    np.testing.assert_array_equal(out[1], expect[1])


def test_patching_metric_reading_globals_is_not_stale(model, toks):
    from jaxlens.edits import patching

    clean = model.to_tokens("When Mary and John went to the store, Mary gave a drink to")
    _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("resid_pre"))
    answer = model.to_single_token(" Mary")
    global BASELINE
    results = []
    for BASELINE in (0.0, 1.0):
        results.append(np.asarray(patching.get_act_patch_resid_pre(model, toks, clean_cache, metric_with_baseline)))
    np.testing.assert_allclose(results[1], results[0] - 1.0, rtol=1e-5, atol=1e-5)
    assert answer >= 0


BASELINE = 0.0


def metric_with_baseline(logits):
    return logits[0, -1].max() - BASELINE


# --- side effects: hooks that store run eagerly (tests/test_storing_hooks.py) ----------------

def test_storing_into_a_torch_tensor_is_a_clear_error(model, toks):
    torch = pytest.importorskip("torch")
    scores = torch.zeros(4)

    def induction_score_hook(pattern, hook):
        scores[hook.layer()] = pattern.mean()  # TransformerLens's tutorials do this

    with pytest.raises(ValueError, match="torch"), pytest.warns(UserWarning, match="a torch.Tensor"):
        model.run_with_hooks(toks, fwd_hooks=[("blocks.1.attn.hook_pattern", induction_score_hook)])


def test_item_in_a_patching_metric_is_a_clear_error(model, toks):
    from jaxlens.edits import patching

    _, clean_cache = model.run_with_cache(toks, names_filter=lambda n: n.endswith("resid_pre"))
    with pytest.raises(ValueError, match=r"patching_metric 'item_metric' cannot run inside jit.*\.item\(\)"):
        patching.get_act_patch_resid_pre(model, toks, clean_cache, item_metric)


def item_metric(logits):
    return logits[0, -1, 0].item()


# --- the pytree itself --------------------------------------------------------------------------

def test_fn_key_follows_what_the_function_reads():
    global HEAD
    a_leaves, a_def = jax.tree_util.tree_flatten(Fn(ablate_global_head))
    HEAD = 3
    b_leaves, b_def = jax.tree_util.tree_flatten(Fn(ablate_global_head))
    HEAD = 0
    assert a_def == b_def and a_leaves == [0] and b_leaves == [3]  # same program, new value
    c_def = jax.tree_util.tree_structure(Fn(lambda z, hook: z))
    assert c_def != a_def
    rebuilt = jax.tree_util.tree_unflatten(b_def, b_leaves)
    z = jnp.ones((1, 2, 4, 3))
    assert float(rebuilt(z, None)[0, 0, 3].sum()) == 0.0 and float(rebuilt(z, None)[0, 0, 0].sum()) == 3.0


def test_no_warning_for_ordinary_hooks(model, toks):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.run_with_hooks(toks, fwd_hooks=[(Z, ablate_global_head), (RESID, scale_global)])


def test_hook_reading_the_model_follows_its_weights(model, toks):
    m = jaxlens.HookedTransformer(model.cfg, model.params, model.tokenizer, precision=model.precision)

    def add_unembed_direction(x, hook):
        return x + m.W_U[:, 5]

    a = np.asarray(m.run_with_hooks(toks, fwd_hooks=[(RESID, add_unembed_direction)]))
    m.params = dict(m.params, W_U=m.params["W_U"] * 2.0)  # the hook must read the new weights
    with Compiles() as c:
        b = np.asarray(m.run_with_hooks(toks, fwd_hooks=[(RESID, add_unembed_direction)]))
    np.testing.assert_allclose(b, fresh(m, toks, [(RESID, add_unembed_direction)]), rtol=1e-5, atol=1e-5)
    assert c.n == 0 and np.abs(a - b).max() > 1e-3  # new weights, same program


# --- indices that jaxlens builds are checked (JAX would drop them silently) ----------------------

@pytest.mark.parametrize("make, hook, match", [
    (lambda iv: iv.ablate_heads([7]), Z, r"HeadEdit.heads on 'blocks.1.attn.hook_z': index 7 .* 4 heads"),
    (lambda iv: iv.ablate_heads([-5]), Z, r"index -5 .*valid -4..3"),
    (lambda iv: iv.ablate_heads([1], positions=[40]), Z, r"HeadEdit.positions .* index 40 .* 15 positions"),
    (lambda iv: iv.intervention_resid([15]), RESID, r"ResidEdit.positions .* index 15"),
    (lambda iv: iv.intervention_attn_mat([0], [2], [99]), "blocks.0.attn.hook_pattern", r"k_positions .* 99"),
    (lambda iv: iv.ablate_keep_self_attn([4], [1]), "blocks.0.attn.hook_pattern", r"KeepSelfAttnAblation.heads"),
    (lambda iv: iv.steer(np.ones(128), positions=[20]), RESID, r"Steer.positions"),
])
def test_edit_index_out_of_range_is_an_error(model, toks, make, hook, match):
    from jaxlens.edits import interventions as iv

    with pytest.raises(ValueError, match=match):
        model.run_with_hooks(toks, fwd_hooks=[(hook, make(iv))])


def test_edit_indices_in_range_and_negative_run(model, toks):
    from jaxlens.edits import interventions as iv

    a = np.asarray(model.run_with_hooks(toks, fwd_hooks=[(Z, iv.ablate_heads([-1]))]))
    b = np.asarray(model.run_with_hooks(toks, fwd_hooks=[(Z, iv.ablate_heads([3]))]))
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_debug_callback_writes_into_the_very_list_it_reads(model, toks):
    """A list that holds arrays is traced in place, not copied: a run-time callback that appends
    to it keeps appending to the user's list on every call."""
    seen = []

    def record(z, hook):
        jax.debug.callback(lambda v: seen.append(np.asarray(v)), z.sum())
        return z

    for _ in range(3):
        model.run_with_hooks(toks, fwd_hooks=[(Z, record)])
    assert len(seen) == 3


def test_dict_of_arrays_is_traced(model, toks):
    clean = model.to_tokens("When Mary and John went to the store, Mary gave a drink to")
    _, cache = model.run_with_cache(clean, names_filter=RESID)
    acts = {RESID: cache[RESID]}

    def patch(x, hook):
        return x.at[:, -1].set(acts[hook.name][:, -1])

    a = np.asarray(model.run_with_hooks(toks, fwd_hooks=[(RESID, patch)]))
    acts[RESID] = acts[RESID] * 0.0
    with Compiles() as c:
        b = np.asarray(model.run_with_hooks(toks, fwd_hooks=[(RESID, patch)]))
    np.testing.assert_allclose(b, fresh(model, toks, [(RESID, patch)]), rtol=1e-5, atol=1e-5)
    assert c.n == 0 and np.abs(a - b).max() > 1e-3
    assert not isinstance(acts[RESID], jax.core.Tracer)


def test_attribute_of_a_user_module_is_keyed(model, toks, tmp_path, monkeypatch):
    (tmp_path / "knobs_for_hooks.py").write_text("HEAD = 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import knobs_for_hooks

    def ablate(z, hook):
        return z.at[:, :, knobs_for_hooks.HEAD].set(0.0)

    outs = []  # the module reaches the hook as a closure cell here; as a global it is keyed the same way
    for h in (0, 2):
        knobs_for_hooks.HEAD = h
        outs.append(np.asarray(model.run_with_hooks(toks, fwd_hooks=[(Z, ablate)])))
        np.testing.assert_allclose(outs[-1], fresh(model, toks, [(Z, ablate)]), rtol=1e-5, atol=1e-5)
    assert np.abs(outs[1] - outs[0]).max() > 1e-3


def _scaled_by_global(x):
    return x * SCALE


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class UserEdit:
    """A user's own pytree edit that keeps a function in a static field."""

    bias: jax.Array
    transform: object = dataclasses.field(metadata={"static": True})

    def __call__(self, x, hook):
        return self.transform(x) + self.bias


def test_function_in_a_static_pytree_field_is_keyed(model, toks):
    global SCALE
    edit = UserEdit(jnp.zeros(128), _scaled_by_global)
    outs = []
    for SCALE in (1.0, 0.5):
        outs.append(np.asarray(model.run_with_hooks(toks, fwd_hooks=[(RESID, edit)])))
        np.testing.assert_allclose(outs[-1], fresh(model, toks, [(RESID, edit)]), rtol=1e-5, atol=1e-5)
    SCALE = 1.0
    assert np.abs(outs[1] - outs[0]).max() > 1e-3


@dataclasses.dataclass(frozen=True)
class AddDeltas:
    """A hook that is a pytree (its arrays are data fields), as jaxlens's own Perturb is."""

    deltas: dict

    def __call__(self, x, hook):
        return x + self.deltas[hook.name]


jax.tree_util.register_dataclass(AddDeltas, data_fields=["deltas"], meta_fields=[])


def test_scanned_model_reads_this_calls_arrays(toks):
    """nn.scan re-flattens the hooks it broadcasts; a hook that reads a dict (a closure's, or a pytree
    hook's field) once handed it the first call's arrays, which became constants of the program:
    every later call returned the first result."""
    scanned = jaxlens.from_pretrained(model_dir(), scan_layers=True)
    names = ["blocks.0.hook_resid_pre", RESID]
    shape = (1, toks.shape[1], scanned.cfg.d_model)
    table = {}

    def from_table(x, hook):
        return x + table[hook.name]

    outs = {"closure": [], "pytree": []}
    for scale in (1.0, 0.0, 2.0):
        deltas = {n: jax.random.normal(jax.random.key(i), shape) * scale for i, n in enumerate(names)}
        table.update(deltas)
        for kind, fn in (("closure", from_table), ("pytree", AddDeltas(deltas))):
            hooks = [(n, fn) for n in names]
            out = np.asarray(scanned.run_with_hooks(toks, fwd_hooks=hooks))
            np.testing.assert_allclose(out, fresh(scanned, toks, hooks), rtol=1e-5, atol=1e-5, err_msg=f"{kind} {scale}")
            outs[kind].append(out)
    for kind, (a, zero, b) in outs.items():
        assert np.abs(a - zero).max() > 1e-3 and np.abs(b - a).max() > 1e-3, kind
