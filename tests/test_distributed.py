"""Parameters sharded over a mesh of 8 simulated devices (issue 13 item 1): `data`, `model`
(Megatron: heads, d_mlp, vocab) and `fsdp` (d_model) axes give the single-device numbers for seven
families (logits, every hook, the cache analyses, a patching grid, greedy generation), the large
matrices are really split, and a mesh that does not fit the model is a clear error."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jaxlens
from conftest import PROMPTS, assert_close, built, padded
from jaxlens.distributed import make_mesh, param_spec, parse_mesh_spec

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 simulated devices (set by conftest)")

FAMILIES = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "gemma", "qwen3")
MESHES = ("data=2,model=4", "fsdp=8")
TOKS, MASK = padded("left", PROMPTS)  # batch 3: divides no batch axis, padded internally
CORRUPT = TOKS.copy()  # the patching pair: TOKS clean, one real token changed in each row
CORRUPT[:, -3] = [44, 120, 201]
SCANNED = ("gpt2", "qwen3")
A, B = 3, 4
MODEL_DIM = {"W_E": 0, "W_U": 1, "W_Q": 0, "W_K": 0, "W_V": 0, "W_O": 0, "W_in": 1, "W_gate": 1, "W_out": 0}


def logit_diff(logits: jax.Array) -> jax.Array:
    return (logits[:, -1, A] - logits[:, -1, B]).mean()


def outputs(m: jaxlens.HookedTransformer) -> dict[str, np.ndarray]:
    """Everything compared between one device and a mesh: logits, every hook, the cache analyses,
    a resid_pre patching grid (padded, from the same cache) and greedy generation."""
    logits, c = m.run_with_cache(TOKS, attention_mask=MASK)
    out = {"logits": logits, **{f"cache {k}": c[k] for k in c.keys()},
           "accumulated_resid": c.accumulated_resid(apply_ln=True),
           "decompose_resid": c.decompose_resid(apply_ln=True),
           "stack_head_results": c.stack_head_results(apply_ln=True),
           "get_full_resid_decomposition": c.get_full_resid_decomposition(apply_ln=True),
           "logit_attrs": c.logit_attrs(c.decompose_resid(), np.array([5, 7, 2]), np.array([1, 2, 3])),
           "generate": m.generate(TOKS[:1], max_new_tokens=3, do_sample=False, verbose=False),
           "patch resid_pre": jaxlens.patching.get_act_patch_resid_pre(m, CORRUPT, c, logit_diff, attention_mask=MASK)}
    return {k: np.asarray(v) for k, v in out.items()}


@pytest.fixture(scope="module", params=FAMILIES)
def reference(request, hf_root):
    """(family, path, the one-device model's outputs), shared by every mesh of the family."""
    path = built(request.param, hf_root)[0]
    ref = outputs(jaxlens.from_pretrained(path))
    assert np.ptp(ref["patch resid_pre"]) > 1e-4, "the patches must matter, or the grid comparison proves nothing"
    return request.param, path, ref


@pytest.fixture(scope="module", params=MESHES)
def sharded(request, reference):
    """(spec, the model loaded onto that mesh, its outputs), built once per family and mesh."""
    m = jaxlens.from_pretrained(reference[1], mesh=request.param)
    return request.param, m, outputs(m)


def per_device_bytes(x) -> set[int]:
    return {s.data.nbytes for s in x.addressable_shards}


def test_sharded_model_equals_one_device(reference, sharded):
    ref, (spec, _, got) = reference[2], sharded
    assert set(got) == set(ref), (spec, set(got) ^ set(ref))
    for k in ref:
        if k == "generate":
            np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{reference[0]} {spec} generate")
        else:
            assert_close(got[k], ref[k], f"{reference[0]} {spec} {k}")


def test_large_matrices_are_split(reference, sharded):
    """fsdp=8 splits d_model of every large matrix; model=4 splits heads, kv heads, d_mlp and the
    vocabulary where 4 divides them (replicated otherwise: few kv heads)."""
    spec, m, _ = sharded
    blk = m.params["blocks_0"]
    mats = {"W_E": m.params["W_E"], "W_U": m.params["W_U"], **blk["attn"], **blk["mlp"]}
    mats = {k: v for k, v in mats.items() if k in MODEL_DIM}
    assert {"W_Q", "W_K", "W_V", "W_O", "W_in", "W_out"} <= set(mats), sorted(mats)
    for name, w in mats.items():
        if spec == "fsdp=8":
            want = w.nbytes // 8
        else:
            split = w.shape[MODEL_DIM[name]] % 4 == 0
            assert split or name in ("W_K", "W_V"), (reference[0], name, w.shape)
            want = w.nbytes // 4 if split else w.nbytes
        assert per_device_bytes(w) == {want}, (reference[0], spec, name, w.shape, per_device_bytes(w))


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


@pytest.mark.parametrize("family", SCANNED)  # the scanned path is family-independent: two keep the suite fast
def test_sharded_scanned_model_equals_one_device(family, hf_root):
    """Loaded lazily into the shards, then processed and stacked on the mesh (`transform_sharded`)."""
    path = built(family, hf_root)[0]
    one = jaxlens.from_pretrained(path)
    m = jaxlens.from_pretrained(path, mesh="data=2,model=4", scan_layers=True)
    w_q = m.params["blocks"]["block"]["attn"]["W_Q"]
    assert w_q.sharding.spec == jax.sharding.PartitionSpec(None, "model", None, None)
    assert per_device_bytes(w_q) == {w_q.nbytes // 4}
    toks, mask = padded("right", PROMPTS)
    assert_close(m(toks, attention_mask=mask), one(toks, attention_mask=mask), f"{family} scanned sharded logits")


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


def test_grid_cells_are_split_over_the_batch_axes():
    """map_cells gives each device its own cells: per-device FLOPs of a chunk fall by the batch
    axes' size (the model axis, with replicated weights, does not split them), results unchanged."""
    from jaxlens.edits.patching import map_cells

    W = jnp.asarray(np.random.default_rng(0).standard_normal((64, 64)), jnp.float32)
    cells = jnp.arange(16, dtype=jnp.float32) / 16

    def flops_and_out(mesh):
        f = jax.jit(lambda w, c: map_cells(lambda x: jnp.tanh((x * w) @ w).sum(), c, 8, mesh))
        ca = f.lower(W, cells).compile().cost_analysis()
        return (ca[0] if isinstance(ca, list) else ca)["flops"], np.asarray(f(W, cells))

    base, ref = flops_and_out(None)
    for spec, split in (("data=8", 8), ("data=2,model=4", 2), ("fsdp=4,model=2", 4)):
        flops, out = flops_and_out(make_mesh(spec))
        assert flops == pytest.approx(base / split, rel=0.05), spec
        np.testing.assert_allclose(out, ref, rtol=1e-6)
    # a cell count no chunk divides: the padded cells' results are dropped
    odd = jax.jit(lambda w, c: map_cells(lambda x: (x * w).sum(), c, 3, make_mesh("data=8")))(W, cells[:11])
    np.testing.assert_allclose(np.asarray(odd), np.asarray(cells[:11] * W.sum()), rtol=1e-5)


def test_run_grid_on_a_mesh_equals_one_device():
    from jaxlens.assets import model_dir
    from jaxlens.interventions import steer

    toks = np.array([[0, 5, 9, 11, 3, 7, 8, 2]])
    metric = lambda logits: logits[:, -1, 5].mean()  # noqa: E731
    v = jnp.asarray(np.random.default_rng(0).standard_normal(128), jnp.float32)  # not constant: LN centres that away
    build = lambda scale: [("blocks.0.hook_resid_post", steer(v, scale))]  # noqa: E731
    grid = jnp.linspace(-1.0, 1.0, 5)
    one = jaxlens.patching.run_grid(jaxlens.from_pretrained(model_dir()), toks, build, grid, metric, chunk_size=2)
    mesh = jaxlens.patching.run_grid(jaxlens.from_pretrained(model_dir(), mesh="data=4,model=2"), toks, build, grid,
                                     metric, chunk_size=2)
    assert np.ptp(np.asarray(one)) > 1e-3
    np.testing.assert_allclose(np.asarray(mesh), np.asarray(one), atol=1e-5)
