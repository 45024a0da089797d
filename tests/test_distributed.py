"""Parameters sharded over a mesh of 8 simulated devices (issue 13 item 1): `data`, `model`
(Megatron: heads, d_mlp, vocab) and `fsdp` (d_model) axes give the single-device numbers, the
large matrices are really split, and a mesh that does not fit the model is a clear error."""

from __future__ import annotations

import numpy as np
import pytest

import jax

import jaxlens
from conftest import PROMPTS, assert_close, built, padded
from jaxlens.distributed import make_mesh, param_spec, parse_mesh_spec

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 simulated devices (set by conftest)")

FAMILIES = ("gpt2", "qwen3")  # LN + learned positions + tied; GQA (2 kv heads < model=4) + q/k norm + rotary
MESHES = ("data=2,model=4", "fsdp=8")


@pytest.fixture(scope="module", params=FAMILIES)
def single(request, hf_root):
    path = built(request.param, hf_root)[0]
    return path, jaxlens.from_pretrained(path)


def per_device_bytes(x) -> set[int]:
    return {s.data.nbytes for s in x.addressable_shards}


@pytest.mark.parametrize("spec", MESHES)
def test_sharded_model_equals_one_device(single, spec):
    path, one = single
    m = jaxlens.from_pretrained(path, mesh=spec)
    toks, mask = padded("left", PROMPTS)  # batch 3: divides no batch axis, padded internally
    la, ca = one.run_with_cache(toks, attention_mask=mask)
    lb, cb = m.run_with_cache(toks, attention_mask=mask)
    assert lb.shape == la.shape and set(cb.keys()) == set(ca.keys())
    assert_close(lb, la, "logits")
    for k in ca.keys():
        assert_close(cb[k], ca[k], k)
    # analyses on the sharded cache, and the loss
    assert_close(cb.accumulated_resid(apply_ln=True), ca.accumulated_resid(apply_ln=True), "accumulated_resid")
    assert_close(cb.stack_head_results(apply_ln=True), ca.stack_head_results(apply_ln=True), "stack_head_results")
    assert_close(m(toks, attention_mask=mask, return_type="loss"), one(toks, attention_mask=mask, return_type="loss"),
                 "loss")
    # greedy generation with sharded parameters
    ga = one.generate(toks[:1], max_new_tokens=4, do_sample=False, verbose=False)
    gb = m.generate(toks[:1], max_new_tokens=4, do_sample=False, verbose=False)
    np.testing.assert_array_equal(np.asarray(gb), np.asarray(ga))


@pytest.mark.parametrize("spec,axis", [("data=2,model=4", 4), ("fsdp=8", 8)])
def test_large_matrices_are_split(single, spec, axis):
    path, one = single
    m = jaxlens.from_pretrained(path, mesh=spec)
    attn, mlp = m.params["blocks_0"]["attn"], m.params["blocks_0"]["mlp"]
    for w in (attn["W_Q"], attn["W_O"], mlp["W_in"], mlp["W_out"]):
        assert per_device_bytes(w) == {w.nbytes // axis}, (spec, w.shape, per_device_bytes(w))
    if m.cfg.n_kv_heads % 4 and spec.startswith("data"):  # fewer kv heads than the model axis: replicated
        assert per_device_bytes(attn["W_K"]) == {attn["W_K"].nbytes}


def test_mesh_specs():
    assert parse_mesh_spec("data=2,model=4", 8) == {"data": 2, "model": 4}
    assert parse_mesh_spec("data=-1", 8) == {"data": 8}
    assert parse_mesh_spec("model=2,data=-1", 8) == {"model": 2, "data": 4}
    mesh = make_mesh("fsdp=4")
    assert mesh.shape == {"fsdp": 4} and mesh.devices.size == 4


@pytest.mark.parametrize("spec,match", [
    ("data=16", "needs 16 devices but only 8 exist"),
    ("tensor=2", "axis one of"),
    ("data=2,data=2", "given twice"),
    ("data=-1,model=-1", "only one axis"),
    ("data=x", "not an int"),
    ("data=3,model=-1", "do not divide"),
    ("", "mesh spec must be"),
])
def test_bad_mesh_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        make_mesh(spec)


def test_mesh_that_does_not_fit_the_model(hf_root):
    path = built("gpt2", hf_root)[0]  # 4 heads, d_model 32
    with pytest.raises(ValueError, match=r"model=8 does not divide n_heads=4"):
        jaxlens.from_pretrained(path, mesh="model=8")
    with pytest.raises(ValueError, match="device= or mesh="):
        jaxlens.from_pretrained(path, mesh="data=2", device="cpu")


def test_partition_rules():
    cfg = jaxlens.ModelConfig("llama", 32, 2, 4, 8, 48, 100, 64, n_kv_heads=2, positional_embedding_type="rotary",
                              rotary_dim=8)
    mesh = make_mesh("data=2,model=4")
    P = jax.sharding.PartitionSpec
    assert param_spec(("blocks_0", "attn", "W_Q"), (4, 32, 8), cfg, mesh) == P("model", None, None)
    assert param_spec(("blocks_0", "attn", "W_K"), (2, 32, 8), cfg, mesh) == P(None, None, None)  # 2 kv heads
    assert param_spec(("blocks", "block", "mlp", "W_out"), (2, 48, 32), cfg, mesh) == P(None, "model", None)
    assert param_spec(("W_E",), (100, 32), cfg, mesh) == P("model", None)
    assert param_spec(("W_E",), (101, 32), cfg, mesh) == P(None, None)  # a vocabulary 4 does not divide


def test_sharded_scanned_model_equals_one_device(single):
    """Loaded lazily into the shards, then processed and stacked on the mesh (`transform_sharded`)."""
    path, one = single
    m = jaxlens.from_pretrained(path, mesh="data=2,model=4", scan_layers=True)
    w_q = m.params["blocks"]["block"]["attn"]["W_Q"]
    assert w_q.sharding.spec == jax.sharding.PartitionSpec(None, "model", None, None)
    assert per_device_bytes(w_q) == {w_q.nbytes // 4}
    toks, mask = padded("right", PROMPTS)
    assert_close(m(toks, attention_mask=mask), one(toks, attention_mask=mask), "scanned sharded logits")


def test_cli_run_on_a_mesh(capsys, hf_root):
    from jaxlens.apps import cli

    path = built("gpt2", hf_root)[0]
    argv = ["run", "--model", str(path), "--tokens", "0,5,9,30", "--top-k", "3", "--names-filter", "blocks.1.attn.hook_z"]
    assert cli.main(argv) == 0
    plain = capsys.readouterr().out
    assert cli.main([*argv, "--mesh", "data=2,model=4"]) == 0
    sharded = capsys.readouterr().out
    assert "mesh {'data': 2, 'model': 4}" in sharded.splitlines()[0]
    assert sharded.splitlines()[1:] == plain.splitlines()[1:]  # the same predictions and cached shapes
    assert cli.main([*argv, "--mesh", "tensor=2"]) == 2
    assert "jaxlens: error: mesh spec 'tensor=2'" in capsys.readouterr().err
