"""The ActivationCache surface a TransformerLens user reaches for: `cache_dict`, `to`/`cpu`,
`remove_batch_dim`, `compute_head_results` (new caches, with a warning when a TL-style statement
throws one away), `toggle_autodiff`, conversion to numpy/torch, and range-checked layer arguments.
Compared with TransformerLens 4.3 where it has the method."""

from __future__ import annotations

import logging
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxlens
from conftest import assert_close, boot_bridge, built
from jaxlens.cache import activation_cache as cache_mod
from jaxlens.cache.activation_cache import ActivationCache, DiscardedResultWarning, LayerIndexError

TOKS = np.array([[0, 5, 9, 30, 2, 7, 100, 44], [0, 17, 250, 8, 4, 61, 62, 63]], np.int32)


@pytest.fixture(scope="module")
def gpt2(hf_root):
    path = built("gpt2", hf_root)[0]
    return jaxlens.from_pretrained_no_processing(path), path


@pytest.fixture(scope="module")
def cache(gpt2):
    return gpt2[0].run_with_cache(TOKS)[1]


@pytest.fixture(scope="module")
def bridge(gpt2):
    return boot_bridge(gpt2[1], processed=False)


def tl_cache(bridge, toks):
    with torch.no_grad():
        return bridge.run_with_cache(torch.tensor(toks, dtype=torch.long))[1]


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Each test sees the once-per-method warnings afresh."""
    monkeypatch.setattr(cache_mod, "_DISCARD_WARNED", set())


def discard_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, DiscardedResultWarning)]


# --- cache_dict, to, cpu, toggle_autodiff -----------------------------------------------------

def test_cache_dict_is_a_read_only_view(cache):
    d = cache.cache_dict
    assert list(d) == list(cache.keys()) and d["blocks.0.attn.hook_pattern"] is cache["pattern", 0]
    with pytest.raises(TypeError):
        d["hook_embed"] = 0
    new = cache.set("extra", jnp.zeros(3))
    assert "extra" in new.cache_dict and "extra" not in d
    assert cache.has_embed and cache.has_pos_embed  # TransformerLens's attributes (GPT-2: learned positions)
    part = ActivationCache({"blocks.0.hook_resid_pre": cache["blocks.0.hook_resid_pre"]}, cache.cfg)
    assert not part.has_embed and not part.has_pos_embed


def test_to_accepts_devices_shardings_and_platform_strings(cache, fresh_warnings):
    cpu0 = jax.devices("cpu")[0]
    for dev in ("cpu", "CPU:0", cpu0, jax.sharding.SingleDeviceSharding(cpu0), torch.device("cpu")):
        moved = cache.to(dev)
        assert isinstance(moved, ActivationCache) and moved is not cache
        assert moved["pattern", 1].devices() == {cpu0}
        assert moved.weights["W_U"].devices() == {cpu0}
    assert cache.cpu()["hook_embed"].devices() == {cpu0}


@pytest.mark.parametrize("dev, match", [("mps", "device 'mps' is not a device name"),
                                        ("cuda:x", "is not a device name"),
                                        ("cpu:99", r"there are only \d+ cpu device"),
                                        (3, "device must be a jax.Device or a string")])
def test_to_rejects_unknown_devices(cache, dev, match):
    with pytest.raises(ValueError, match=match):
        cache.to(dev)


@pytest.mark.parametrize("platform", ["gpu", "cuda", "tpu"])
def test_to_an_absent_accelerator_names_it(cache, platform):
    try:
        jax.devices({"cuda": "gpu"}.get(platform, platform))
    except RuntimeError:
        with pytest.raises(ValueError, match=f"device '{platform}': JAX has no"):
            cache.to(platform)
    else:
        assert cache.to(platform)["hook_embed"].devices() <= set(jax.devices())


def test_toggle_autodiff_is_accepted_as_a_no_op(cache):
    assert hasattr(__import__("transformer_lens").ActivationCache, "toggle_autodiff")  # TL 4.3 has it
    assert cache.toggle_autodiff() is None and cache.toggle_autodiff(True) is None
    g = jax.grad(lambda x: (x ** 2).sum())(cache["hook_embed"])  # JAX autodiff is untouched
    assert_close(g, 2 * np.asarray(cache["hook_embed"]))


def test_activations_convert_to_numpy_and_torch(cache):
    x = cache["pattern", 1]
    a = np.asarray(x)
    np.testing.assert_array_equal(torch.from_numpy(np.array(x)).numpy(), a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "the given NumPy array is not writable"
        np.testing.assert_array_equal(torch.from_numpy(np.asarray(x)).numpy(), a)
    half = x.astype(jnp.bfloat16)
    assert torch.from_numpy(np.asarray(half, np.float32)).dtype == torch.float32
    assert "np.asarray(x)" in ActivationCache.__doc__ and "torch.from_numpy(np.asarray(x))" in ActivationCache.__doc__


# --- remove_batch_dim, compute_head_results: TransformerLens's values --------------------------

def test_remove_batch_dim_shapes_match_transformer_lens(gpt2, bridge, caplog):
    model, _ = gpt2
    one = model.run_with_cache(TOKS[:1])[1]
    ours = one.remove_batch_dim()
    ref = tl_cache(bridge, TOKS[:1])
    ref.remove_batch_dim()
    shared = [k for k in ref.keys() if k in ours]
    assert len(shared) >= 20 and not ours.has_batch_dim and one.has_batch_dim
    for k in shared:
        assert tuple(ours[k].shape) == tuple(ref[k].shape), k
        assert_close(ours[k], ref[k].numpy(), k)
    assert one["hook_embed"].shape[0] == 1  # the original is unchanged
    with caplog.at_level(logging.WARNING, logger="jaxlens.cache"):
        assert ours.remove_batch_dim() is ours  # TL: warns and does nothing
    assert "already having removed it" in caplog.text
    assert one.remove_batch_dim(batch_size=1).keys() == ours.keys()


def test_remove_batch_dim_needs_batch_size_one(cache):
    with pytest.raises(ValueError, match="needs batch size 1, but this cache's batch size is 2"):
        cache.remove_batch_dim()
    with pytest.raises(ValueError, match="apply_slice_to_batch_dim"):
        cache.apply_slice_to_batch_dim(slice(0, 1)).remove_batch_dim(batch_size=2)


def test_compute_head_results_matches_transformer_lens(gpt2, cache, bridge):
    model, _ = gpt2
    ref = tl_cache(bridge, TOKS)
    ref.compute_head_results()
    ours = cache.compute_head_results()
    for l in range(model.cfg.n_layers):
        k = f"blocks.{l}.attn.hook_result"
        assert k in ours and k not in cache
        assert_close(ours[k], ref[k].detach().numpy(), k)
    stack, labels = ours.stack_head_results(layer=-1, return_labels=True)
    ref_stack, ref_labels = ref.stack_head_results(layer=-1, return_labels=True)
    assert labels == ref_labels
    assert_close(stack, ref_stack.detach().numpy(), "stack_head_results after compute_head_results")
    # batchless, as TransformerLens allows; and a second call keeps the cache as it is
    one = cache.apply_slice_to_batch_dim(1).compute_head_results()
    assert_close(one["result", 1], ref["result", 1][1].detach().numpy(), "batchless result")
    assert ours.compute_head_results() is ours


# --- the discarded-result warning --------------------------------------------------------------

def test_statement_calls_warn_once_per_method(gpt2, cache, fresh_warnings):
    one = gpt2[0].run_with_cache(TOKS[:1])[1]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        cache.compute_head_results()
        cache.compute_head_results()
        one.remove_batch_dim()
        cache.cpu()
        cache.to("cpu")
        one.remove_batch_dim()
    msgs = discard_warnings(rec)
    assert len(msgs) == 4, msgs
    assert "cache = cache.compute_head_results()" in msgs[0] and "immutable" in msgs[0]
    assert "cache = cache.remove_batch_dim()" in msgs[1]
    assert [w.filename for w in rec if issubclass(w.category, DiscardedResultWarning)] == [__file__] * 4


def test_kept_results_do_not_warn(gpt2, cache, fresh_warnings):
    one = gpt2[0].run_with_cache(TOKS[:1])[1]

    def returned(c):
        return c.compute_head_results()

    with warnings.catch_warnings():
        warnings.simplefilter("error", DiscardedResultWarning)
        kept = cache.compute_head_results()
        returned(cache)
        assert "blocks.0.attn.hook_result" in kept
        shapes = [c.remove_batch_dim()["hook_embed"].shape for c in [one]]
        assert len(shapes) == 1 and list(cache.to("cpu").keys()) == list(cache.keys())
        moved = (cache.cpu(), one.remove_batch_dim())
        kept.compute_head_results()  # nothing new to lose: the results were already there
    assert moved[1].has_batch_dim is False


def test_repl_last_line_warns(cache, fresh_warnings):
    """A REPL line or a notebook cell's last line (compiled in 'single' mode) shows a repr and drops the cache."""
    with pytest.warns(DiscardedResultWarning, match="compute_head_results"):
        exec(compile("cache.compute_head_results()", "<cell>", "single"), {"cache": cache})


def test_no_frame_means_no_warning(cache, fresh_warnings, monkeypatch):
    monkeypatch.setattr(cache_mod, "sys", types.SimpleNamespace())  # an interpreter without _getframe
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiscardedResultWarning)
        cache.compute_head_results()
    assert cache_mod._DISCARD_WARNED == set()


def test_methods_document_the_difference_from_transformer_lens():
    for name in ("compute_head_results", "remove_batch_dim", "to", "cpu"):
        assert "NEW cache" in getattr(ActivationCache, name).__doc__, name
    assert "IMMUTABLE" in ActivationCache.__doc__


# --- layer arguments -----------------------------------------------------------------------------

def test_cache_lookup_layers_are_checked(cache):
    assert cache["pattern", -1] is cache["pattern", 1] is cache["pattern", np.int64(1)]
    assert cache["scale", -2, "ln1"] is cache["blocks.0.ln1.hook_scale"]
    for bad in (2, 7, -3):
        with pytest.raises(ValueError, match=rf"layer={bad} is out of range for this 2-layer model; "
                                             r"valid -2..1 \(negative counts from the end\)"):
            cache["pattern", bad]
    with pytest.raises(KeyError):  # TransformerLens code that catches KeyError still does
        cache["pattern", 7]
    assert issubclass(LayerIndexError, KeyError) and ("pattern", 7) not in cache
    assert cache.get(("pattern", 7)) is None
    with pytest.raises(KeyError, match="is not in this cache"):  # a real layer whose hook was not cached
        ActivationCache({"hook_embed": cache["hook_embed"]}, cache.cfg)["pattern", 0]


def test_analysis_layer_arguments_are_checked(cache):
    stack = cache.decompose_resid()
    calls = {
        "stack_head_results": lambda l: cache.stack_head_results(layer=l),
        "decompose_resid": lambda l: cache.decompose_resid(layer=l),
        "accumulated_resid": lambda l: cache.accumulated_resid(layer=l),
        "stack_neuron_results": lambda l: cache.stack_neuron_results(layer=l),
        "get_full_resid_decomposition": lambda l: cache.get_full_resid_decomposition(layer=l),
        "stack_activation": lambda l: cache.stack_activation("pattern", layer=l),
        "apply_ln_to_stack": lambda l: cache.apply_ln_to_stack(stack, layer=l),
    }
    for what, fn in calls.items():
        for bad in (3, 5, -2):
            with pytest.raises(ValueError, match=rf"{what}: layer={bad} must be an int in \[0, 2\]"):
                fn(bad)
        fn(-1)  # -1 and None mean n_layers, as TransformerLens
    for bad in (2, 5, -3):
        with pytest.raises(ValueError, match=rf"get_neuron_results: layer={bad} is out of range for this "
                                             r"2-layer model; use an int in \[-2, 2\)"):
            cache.get_neuron_results(bad)


def test_negative_layers_match_transformer_lens(cache, bridge):
    ref = tl_cache(bridge, TOKS)
    assert_close(cache.get_neuron_results(-1, neuron_slice=[0, 3]),
                 ref.get_neuron_results(-1, neuron_slice=[0, 3]).detach().numpy(), "get_neuron_results(-1)")
    assert_close(cache["resid_post", -1], ref["resid_post", -1].numpy(), "resid_post -1")
    assert_close(cache.stack_activation("scale", layer=-1, sublayer_type="ln1"),
                 ref.stack_activation("scale", layer=-1, sublayer_type="ln1").numpy(), "stack_activation(-1)")
