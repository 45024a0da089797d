"""Shared fixtures: random HF models of every family, built once per session, and their jaxlens twins."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The CLI turns on the persistent compilation cache (jaxlens.compile_cache): not in ~/.cache from tests.
os.environ.setdefault("JAXLENS_COMPILE_CACHE", "0")
# Compiling is ~70% of the suite's CPU time and the test programs are tiny: XLA's O0 with LLVM's expensive passes
# off cuts test_parity.py from 137 to 91 CPU-s, with the same results at the same tolerances. Benchmarks do not
# import this file, so they measure fully optimised programs. Subprocesses started by tests inherit it.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# Several simulated host devices for the sharding tests, and XLA:CPU's cheaper code generation (the elemental
# emitters instead of the fusion emitters, one LLVM module per program instead of parallel splits): the
# shipped-model notebooks' 140 small programs compile in 3.4 s instead of 8.4 s, same results at the same
# tolerances. Must be set before jax initialises; a flag already in XLA_FLAGS is left as the user set it.
_TEST_XLA_FLAGS = {"xla_force_host_platform_device_count": "8", "xla_cpu_use_fusion_emitters": "false",
                   "xla_cpu_parallel_codegen_split_count": "1"}
for _flag, _value in _TEST_XLA_FLAGS.items():
    if _flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --{_flag}={_value}").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from hf_models import FAMILIES, build  # noqa: E402


@pytest.fixture(scope="session")
def hf_root(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_models")


_BUILT: dict = {}

PROMPTS = [[0, 5, 9, 30, 2, 7, 100, 44, 12, 3], [0, 17, 250, 8], [0, 60, 61, 62, 63, 64, 65]]


def built(family, hf_root):
    """(path, torch model) for the family's random HF checkpoint under hf_root; built once per session.

    Shared by every test: read it, never change it (copy the folder or the model to modify one)."""
    if family not in _BUILT:
        _BUILT[family] = build(family, hf_root)
    return _BUILT[family]


def boot_bridge(path, processed: bool):
    """A fresh TransformerLens 4.x bridge on the checkpoint at path, in compatibility mode.

    processed=True: TL's default processing (fold_ln, center_writing_weights, center_unembed,
    fold_value_biases); False: HF's weights unchanged. Not cached: some tests add hooks to theirs."""
    import torch
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(path), device="cpu", dtype=torch.float32)
    if processed:
        bridge.enable_compatibility_mode()
    else:
        bridge.enable_compatibility_mode(no_processing=True)
    return bridge


def padded(side, prompts=PROMPTS):
    """(tokens, mask) int32 [batch, longest]: the prompts padded with 0 on the given side ("left"|"right")."""
    n = max(map(len, prompts))
    toks = np.zeros((len(prompts), n), np.int32)
    mask = np.zeros_like(toks)
    for i, p in enumerate(prompts):
        sl = slice(n - len(p), n) if side == "left" else slice(0, len(p))
        toks[i, sl], mask[i, sl] = p, 1
    return toks, mask


@pytest.fixture(scope="session", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="session")
def hf_model(family, hf_root):
    """(path, torch model) for the family; built once."""
    return built(family, hf_root)


@pytest.fixture(scope="session")
def jl_model(hf_model):
    import jaxlens

    path, _ = hf_model
    return jaxlens.from_pretrained_no_processing(path)  # HF's basis: parity tests compare with HF PyTorch / unprocessed TL


def assert_close(a, b, name="", rtol=1e-5, atol=1e-5):
    """Compare arrays where both are finite, and require the same pattern of infinities."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert a.shape == b.shape, f"{name}: shape {a.shape} != {b.shape}"
    fa, fb = np.isfinite(a), np.isfinite(b)
    assert (fa == fb).all(), f"{name}: different non-finite entries"
    np.testing.assert_allclose(np.where(fa, a, 0), np.where(fb, b, 0), rtol=rtol, atol=atol, err_msg=name)
