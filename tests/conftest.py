"""Shared fixtures: random HF models of every family, built once per session, and their jaxlens twins."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Several simulated host devices for the sharding tests; must be set before jax initialises.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from hf_models import FAMILIES, build  # noqa: E402


@pytest.fixture(scope="session")
def hf_root(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_models")


_BUILT: dict = {}


@pytest.fixture(scope="session", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="session")
def hf_model(family, hf_root):
    """(path, torch model) for the family; built once."""
    if family not in _BUILT:
        _BUILT[family] = build(family, hf_root)
    return _BUILT[family]


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
