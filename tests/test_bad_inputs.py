"""Bad input is never silent: every case gets an error (or a warning) of a stated type whose message
names the thing; conversion is atomic and exclusive (kill -9 and two-writer tests in subprocesses)."""

from __future__ import annotations

import errno
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jaxlens
from conftest import built
from jaxlens.apps import cli
from jaxlens.conversion import (CONVERTED_CONFIG, CONVERTED_PARAMS, MANIFEST, PAUSE_ENV, CheckpointError,
                                load_converted, write_manifest)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpt2_path(hf_root):
    return built("gpt2", hf_root)[0]


@pytest.fixture(scope="module")
def llama_path(hf_root):
    return built("llama", hf_root)[0]


@pytest.fixture(scope="module")
def model(gpt2_path):
    return jaxlens.from_pretrained_no_processing(gpt2_path)


@pytest.fixture(scope="module")
def llama(llama_path):
    return jaxlens.from_pretrained_no_processing(llama_path)


@pytest.fixture(scope="module")
def converted(gpt2_path, tmp_path_factory):
    """A jaxlens folder converted from the random GPT-2 by the CLI (float32, with its tokenizer)."""
    out = tmp_path_factory.mktemp("conv") / "gpt2"
    assert cli.main(["convert", str(gpt2_path), str(out)]) == 0
    return out


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def scratch_left(dst: Path) -> list[str]:
    """Temporary, replaced and lock files of writes to dst still beside it."""
    return sorted(p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}."))


# --- loading validates ------------------------------------------------------------------------

def _edit_json(d: Path, name: str, fn) -> None:
    f = d / name
    f.write_text(json.dumps(fn(json.loads(f.read_text()))))


def _edit_params(d: Path, name: str, fn) -> None:
    f = d / name
    t = load_file(str(f))
    fn(t)
    save_file(t, str(f))


def _fewer_layers(d):  # config says 1 layer, the params hold 2: the extra layer must not be dropped silently
    _edit_json(d, CONVERTED_CONFIG, lambda c: c | {"n_layers": 1})
    write_manifest(d)  # a self-consistent folder: only the tree check can catch it


def _more_layers(d):
    _edit_json(d, CONVERTED_CONFIG, lambda c: c | {"n_layers": 3})
    write_manifest(d)


def _int_weight(d):
    _edit_params(d, CONVERTED_PARAMS, lambda t: t.update(W_E=t["W_E"].astype(np.int32)))
    write_manifest(d)


def _nan_weight(d):
    def f(t):
        t["blocks_1/attn/W_Q"] = t["blocks_1/attn/W_Q"].copy()
        t["blocks_1/attn/W_Q"][0, 1, 2] = np.nan
    _edit_params(d, CONVERTED_PARAMS, f)
    write_manifest(d)


def _other_model_params(d):  # a param of the wrong shape beside the config (params from another model)
    _edit_params(d, CONVERTED_PARAMS, lambda t: t.update(W_pos=np.zeros((32, 32), np.float32)))
    write_manifest(d)


def _missing_tokenizer(d):
    (d / "tokenizer.json").unlink()


def _truncated_params(d):
    f = d / CONVERTED_PARAMS
    f.write_bytes(f.read_bytes()[:-100])


def _changed_params(d):
    f = d / CONVERTED_PARAMS
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))


def _bad_json_config(d):
    (d / CONVERTED_CONFIG).write_text("{not json")
    write_manifest(d)


def _config_missing_field(d):
    _edit_json(d, CONVERTED_CONFIG, lambda c: {k: v for k, v in c.items() if k != "d_model"})
    write_manifest(d)


def _config_list(d):
    (d / CONVERTED_CONFIG).write_text("[1, 2]")
    write_manifest(d)


def _bad_manifest(d):
    (d / MANIFEST).write_text("{}")


@pytest.mark.parametrize("damage,match", [
    (_fewer_layers, r"unexpected: blocks_1/.*half-written or from another model; convert again"),
    (_more_layers, r"missing: blocks_2/.*half-written or from another model"),
    (_other_model_params, r"mismatched: W_pos float32\[32, 32\] \(config: float32\[64, 32\]\)"),
    (_int_weight, r"weight 'W_E' .* has dtype int32, but weights must be floating point"),
    (_nan_weight, r"weight 'blocks_1/attn/W_Q' .* 1 NaN/inf value\(s\) \(first at \(0, 1, 2\).*allow_nonfinite"),
    (_missing_tokenizer, r"tokenizer\.json is listed in .*jaxlens_manifest\.json but missing"),
    (_truncated_params, r"params\.safetensors has \d+ bytes but jaxlens_manifest\.json says"),
    (_changed_params, r"params\.safetensors does not match its sha256"),
    (_bad_json_config, r"jaxlens_config\.json is not valid JSON"),
    (_config_missing_field, r"jaxlens_config\.json: .*'d_model'"),
    (_config_list, r"jaxlens_config\.json holds a JSON list, not an object"),
    (_bad_manifest, r"jaxlens_manifest\.json has no valid 'files' table"),
], ids=lambda v: getattr(v, "__name__", "")[1:] if callable(v) else "")
def test_converted_folder_is_validated(converted, tmp_path, damage, match):
    d = copy(converted, tmp_path / "m")
    damage(d)
    with pytest.raises(CheckpointError, match=match):
        jaxlens.from_pretrained(d)


def test_nonfinite_can_be_allowed(converted, tmp_path):
    d = copy(converted, tmp_path / "m")
    _nan_weight(d)
    m = jaxlens.from_pretrained_no_processing(d, allow_nonfinite=True)
    assert np.isnan(np.asarray(m.W_Q)).any()


def test_folder_without_manifest_warns_but_is_still_checked(converted, tmp_path):
    d = copy(converted, tmp_path / "m")
    (d / MANIFEST).unlink()
    with pytest.warns(UserWarning, match="no jaxlens_manifest.json"):
        cfg, _ = load_converted(d)
    assert cfg.n_layers == 2
    _edit_json(d, CONVERTED_CONFIG, lambda c: c | {"n_layers": 1})
    with pytest.raises(CheckpointError, match="half-written or from another model"):
        load_converted(d)


def _hf_int_weight(d):
    _edit_params(d, "model.safetensors", lambda t: t.update({"transformer.wte.weight":
                                                            t["transformer.wte.weight"].astype(np.int32)}))


def _hf_bool_weight(d):
    _edit_params(d, "model.safetensors", lambda t: t.update({"transformer.h.0.ln_1.weight":
                                                            t["transformer.h.0.ln_1.weight"] > 0}))


def _hf_inf_weight(d):
    def f(t):
        t["transformer.h.1.mlp.c_proj.weight"] = t["transformer.h.1.mlp.c_proj.weight"].copy()
        t["transformer.h.1.mlp.c_proj.weight"][3, 4] = np.inf
    _edit_params(d, "model.safetensors", f)


def _index(shard):
    def f(d):
        names = list(load_file(str(d / "model.safetensors")))
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: shard for n in names}}))
    return f


def _hf_config_text(text: bytes):
    def f(d):
        (d / "config.json").write_bytes(text)
    return f


def _hf_field(**kw):
    def f(d):
        _edit_json(d, "config.json", lambda c: c | kw)
    return f


@pytest.mark.parametrize("damage,match", [
    (_hf_int_weight, r"'transformer\.wte\.weight' .* has dtype int32, but weights must be floating point"),
    (_hf_bool_weight, r"'transformer\.h\.0\.ln_1\.weight' .* has dtype bool"),
    (_hf_inf_weight, r"'blocks_1/mlp/W_out' .* NaN/inf"),
    (_index("../../x.safetensors"), r"names shard '\.\./\.\./x\.safetensors', which is outside"),
    (_index("/etc/passwd"), r"names shard '/etc/passwd', which is outside"),
    (_hf_config_text(b"[1, 2, 3]"), r"config\.json holds a JSON list, not an object"),
    (_hf_config_text(b'{"model_type": "gpt2\xff"}'), r"config\.json is not UTF-8 text"),
    (_hf_config_text(b"{oops"), r"config\.json is not valid JSON"),
    (_hf_field(n_head="4"), r"config\.json: field 'n_head' is '4' \(str\) but must be an integer"),
    (_hf_field(n_layer=0), r"config\.json: field 'n_layer' is 0 but must be a positive integer"),
    (_hf_field(n_head=5), r"config\.json: n_head=5 does not divide the hidden size 32"),
    (_hf_field(model_type=["gpt2"]), r"model_type \['gpt2'\] in .*config\.json is not supported"),
    (_hf_field(model_type="mamba"), r"model_type 'mamba' in .*config\.json is not supported"),
], ids=["int", "bool", "inf", "index-up", "index-abs", "list", "utf8", "json", "str-field", "zero-field",
        "heads", "type-list", "unknown-type"])
def test_hf_folder_is_validated(gpt2_path, tmp_path, damage, match):
    d = copy(gpt2_path, tmp_path / "m")
    damage(d)
    if (d / "model.safetensors.index.json").exists():
        os.replace(d / "model.safetensors", d / "shard.safetensors")
    with pytest.raises(CheckpointError, match=match):
        jaxlens.from_pretrained(d)


def test_bad_tokenizer_file_is_named(gpt2_path, tmp_path):
    d = copy(gpt2_path, tmp_path / "m")
    (d / "tokenizer.json").write_text("{broken")
    with pytest.raises(CheckpointError, match=r"tokenizer file .*tokenizer\.json is not valid UTF-8 JSON"):
        jaxlens.from_pretrained(d)


def test_model_path_that_is_a_file(gpt2_path):
    with pytest.raises(CheckpointError, match="is a file; pass the folder"):
        jaxlens.from_pretrained(gpt2_path / "config.json")


# --- entry points check their arguments --------------------------------------------------------

@pytest.mark.parametrize("kw,exc,match", [
    (dict(dtype=np.int32), ValueError, r"dtype .*int32.* is not a floating-point dtype"),
    (dict(dtype=bool), ValueError, "not a floating-point dtype"),
    (dict(dtype="float8"), ValueError, r"dtype 'float8' is not one of"),
    (dict(dtype=object()), TypeError, "is not a dtype"),
    (dict(precision="bogus"), ValueError, r"precision='bogus' is not a matmul precision"),
    (dict(precision=3), TypeError, "precision must be None or a string"),
])
def test_load_arguments(gpt2_path, kw, exc, match):
    with pytest.raises(exc, match=match):
        jaxlens.from_pretrained(gpt2_path, **kw)


def test_constructor_checks_precision(model):
    with pytest.raises(ValueError, match="precision='fastest'"):
        jaxlens.HookedTransformer(model.cfg, model.params, precision="fastest")


@pytest.mark.parametrize("names_filter,match", [
    (3, "names_filter must be None, a hook name.*got int 3"),
    (b"hook_embed", "got bytes"),
    ([1], r"hold hook names \(strings\); got 1 \(int\)"),
    (["hook_embed", None], "got None"),
])
def test_names_filter_types(model, names_filter, match):
    with pytest.raises(TypeError, match=match):
        model.run_with_cache(np.array([[0, 1]]), names_filter=names_filter)


@pytest.mark.parametrize("tokens,exc,match", [
    ([[0, 1, 2], [3]], ValueError, r"ragged list .*attention_mask.*to_tokens"),
    ([[0, 1], ["a"]], ValueError, r"ragged list|integer"),
    (np.array([[0, 1, 300]]), ValueError, r"token id 300 .* outside the vocabulary"),
    (np.zeros((1, 65), np.int32), ValueError, r"sequence length 65 exceeds .* n_ctx=64"),
])
def test_bad_token_inputs(model, tokens, exc, match):
    with pytest.raises(exc, match=match):
        model.run_with_cache(tokens)


def test_traced_input_points_to_forward(model):
    with pytest.raises(TypeError, match=r"traced value .*jaxlens\.forward"):
        jax.jit(lambda t: model(t))(np.zeros((1, 3), np.int32))
    with pytest.raises(TypeError, match=r"traced value .*jaxlens\.forward"):
        jax.vmap(lambda t: model.run_with_cache(t[None])[0])(np.zeros((2, 3), np.int32))


def test_all_zero_mask_warns(model):
    toks = np.array([[0, 1, 2], [3, 4, 5]])
    with pytest.warns(UserWarning, match=r"attention_mask row\(s\) \[1\] are all 0"):
        model.run_with_cache(toks, attention_mask=np.array([[1, 1, 1], [0, 0, 0]]),
                             names_filter="blocks.0.attn.hook_pattern")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(toks, attention_mask=np.array([[1, 1, 1], [0, 1, 1]]))  # padding alone does not warn


@pytest.mark.parametrize("which", ["model", "llama"])  # learned positions and rotary: one rule
def test_generation_length_one_rule(request, which):
    m = request.getfixturevalue(which)
    n = m.cfg.n_ctx
    with pytest.raises(ValueError, match=rf"prompt of 60 tokens \+ max_new_tokens=10 exceeds .* n_ctx={n}"):
        m.generate(np.zeros((1, 60), np.int32), 10, do_sample=False, verbose=False)
    with pytest.raises(ValueError, match=r"sequence length 70 exceeds"):  # run_with_cache refuses the same
        m.run_with_cache(np.zeros((1, 70), np.int32))
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"max_new_tokens=100000 exceeds"):
        m.generate(np.zeros((1, 3), np.int32), 10**5, do_sample=False, verbose=False)
    assert time.perf_counter() - t0 < 5  # refused at once, not after a long run
    _, cache = m(np.zeros((1, 30), np.int32), kv_cache=m.init_kv_cache(1, n))  # a cache is at most n_ctx long
    with pytest.raises(ValueError, match=rf"30 slots used \+ 36 new tokens > max_len={n}"):
        m.generate(np.zeros((1, 5), np.int32), 32, do_sample=False, verbose=False, kv_cache=cache)
    out = m.generate(np.zeros((1, 4), np.int32), n - 4, do_sample=False, stop_at_eos=False, verbose=False)
    assert out.shape == (1, n)  # exactly the context is allowed


def test_generate_cache_is_bounded(model):
    with pytest.raises(ValueError, match=r"max_len=100000 must be an int in 1\.\.n_ctx=64"):
        model.generate(np.zeros((1, 3), np.int32), 2, do_sample=False, max_len=10**5, verbose=False)


@pytest.mark.parametrize("key", [0, np.zeros(3, np.uint32), "seed"])
def test_prng_key_hint(model, key):
    with pytest.raises(TypeError, match=r"key must be a JAX PRNG key such as jax\.random\.key\(0\)"):
        model.generate(np.array([[0, 1]]), 2, key=key, verbose=False)


def test_good_keys_accepted(model):
    for key in (jax.random.key(1), jax.random.PRNGKey(1)):
        assert model.generate(np.array([[0, 1]]), 2, key=key, stop_at_eos=False, verbose=False).shape == (1, 4)


# --- the CLI: `jaxlens: error: ...`, exit 2, no traceback ------------------------------------

def run_cli(capsys, *argv) -> tuple[int, str]:
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize("args,match", [
    (["--tokens", ""], r"argument --tokens: '' is not a comma-separated list of token ids"),
    (["--tokens", "0,,5"], "not a comma-separated list"),
    (["--tokens", "0,x"], r"'x' is not a token id"),
    (["--tokens", "1099511627776"], r"token id 1099511627776 is outside any vocabulary"),
    (["--tokens", "-3"], r"token id -3 is outside any vocabulary"),
    (["--tokens", "0,299999"], r"jaxlens: error: token id 299999 .* outside the vocabulary \[0, 300\)"),
    (["--top-k", "0"], r"argument --top-k: must be at least 1, got 0"),
    (["--top-k", "-1"], r"must be at least 1, got -1"),
    (["--top-k", "two"], r"'two' is not an integer"),
    (["--names-filter", "blocks.0.hook_resid_prex"], r"jaxlens: error: names_filter names no hook"),
])
def test_cli_run_bad_flags(capsys, gpt2_path, args, match):
    code, err = run_cli(capsys, "run", "--model", gpt2_path, *args)
    assert code == 2
    assert "error:" in err and __import__("re").search(match, err), err


def test_cli_run_tokens_work(capsys, gpt2_path):
    assert cli.main(["run", "--model", str(gpt2_path), "--tokens", "0,5,9", "--top-k", "2",
                     "--names-filter", "blocks.0.hook_resid_pre"]) == 0
    out = capsys.readouterr().out
    assert "top-2 next tokens" in out and "blocks.0.hook_resid_pre" in out


def test_console_script_exit_codes(gpt2_path, tmp_path):
    """The `jaxlens` command (`cli.script`, which freezes the heap before the exit) keeps main's
    exit code and output: 0 with the result printed, 2 with the error and no traceback."""
    assert 'jaxlens = "jaxlens.apps.cli:script"' in (REPO / "pyproject.toml").read_text()
    run = [sys.executable, "-c", "import sys; from jaxlens.apps.cli import script; sys.exit(script())", "run"]
    ok = subprocess.run([*run, "--model", str(gpt2_path), "--tokens", "0,5", "--top-k", "2"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and "top-2 next tokens" in ok.stdout, ok.stderr
    bad = subprocess.run([*run, "--model", str(tmp_path / "nope")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "jaxlens: error:" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("case", ["missing", "file", "unreadable"])
def test_cli_bad_model_path(capsys, gpt2_path, tmp_path, monkeypatch, case):
    if case == "missing":
        path, match = tmp_path / "nope", "does not exist"
    elif case == "file":
        path, match = gpt2_path / "config.json", "is a file"
    else:
        path, match = copy(gpt2_path, tmp_path / "m"), r"cannot read .*config\.json: Permission denied"
        real = Path.read_bytes

        def denied(self):  # the tests run as root, whom chmod does not stop
            if self.name == "config.json":
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real(self)
        monkeypatch.setattr(Path, "read_bytes", denied)
    for cmd in (["run", "--model", path], ["convert", path, tmp_path / "out"]):
        code, err = run_cli(capsys, *cmd)
        assert code == 2 and err.startswith("jaxlens: error:") and __import__("re").search(match, err), err


def test_cli_convert_destinations(capsys, gpt2_path, converted, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    code, err = run_cli(capsys, "convert", gpt2_path, f)
    assert code == 2 and "exists and is a file" in err
    d = copy(converted, tmp_path / "old")
    code, err = run_cli(capsys, "convert", gpt2_path, d)
    assert code == 2 and "already holds a converted model; pass overwrite=True (jaxlens convert --overwrite)" in err
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    code, err = run_cli(capsys, "convert", gpt2_path, other, "--overwrite")
    assert code == 2 and "is not a jaxlens converted folder; refusing to replace it" in err
    assert (other / "mine.txt").read_text() == "keep me"
    assert run_cli(capsys, "convert", gpt2_path, d, "--overwrite", "--dtype", "float16")[0] == 0
    assert load_converted(d)[1]["W_E"].dtype == np.float16 and scratch_left(d) == []


def test_cli_full_disk(capsys, gpt2_path, converted, tmp_path, monkeypatch):
    import safetensors.numpy

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", a[1] if len(a) > 1 else None)
    monkeypatch.setattr(safetensors.numpy, "save_file", full)
    new = tmp_path / "new"
    code, err = run_cli(capsys, "convert", gpt2_path, new)
    assert code == 2 and err.startswith("jaxlens: error: no space left on the device")
    assert not new.exists() and scratch_left(new) == []
    old = copy(converted, tmp_path / "old")
    code, err = run_cli(capsys, "convert", gpt2_path, old, "--overwrite")
    assert code == 2 and "no space left" in err
    assert load_converted(old)[0].n_layers == 2 and scratch_left(old) == []  # the old output is untouched


def test_save_refuses_a_broken_tree_and_needs_overwrite(model, tmp_path):
    from jaxlens.conversion import save_converted

    params = jax.tree.map(np.asarray, model.params)
    with pytest.raises(CheckpointError, match=r"the params to save: .*missing: blocks_1/"):
        save_converted(tmp_path / "x", model.cfg, {k: v for k, v in params.items() if k != "blocks_1"})
    assert not (tmp_path / "x").exists() and scratch_left(tmp_path / "x") == []
    out = model.save(tmp_path / "m")
    with pytest.raises(CheckpointError, match="already holds a converted model"):
        model.save(out)
    model.save(out, overwrite=True)
    assert load_converted(out)[0] == model.cfg and scratch_left(out) == []


# --- atomic, exclusive conversion: kill -9 and two writers ------------------------------------

def start_writer(src: Path, dst: Path, pause: str, *extra: str) -> subprocess.Popen:
    """`jaxlens convert src dst` in a subprocess that pauses at `pause` (returns once it is there)."""
    env = dict(os.environ, **{PAUSE_ENV: pause})
    p = subprocess.Popen([sys.executable, "-m", "jaxlens.apps.cli", "convert", str(src), str(dst), *extra],
                         cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline, seen = time.monotonic() + 120, b""
    while time.monotonic() < deadline:
        if select.select([p.stderr], [], [], 1.0)[0]:
            line = p.stderr.readline()
            seen += line
            if line.strip() == f"jaxlens-pause: {pause}".encode():
                return p
            if not line and p.poll() is not None:
                break
    p.kill()
    raise AssertionError(f"the writer never reached {pause!r}: {seen.decode(errors='replace')[-2000:]}")


def kill9(p: subprocess.Popen) -> None:
    os.kill(p.pid, signal.SIGKILL)
    p.wait(30)
    p.stderr.close()


def state(dst: Path) -> str:
    """'absent', 'old' (float32) or 'new' (float16), each only if complete; anything else fails."""
    if not dst.exists():
        return "absent"
    from jaxlens.tokens import load_tokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a folder without a manifest would be a mixture: refuse it
        _, params = load_converted(dst)  # the manifest and the params tree are checked
    assert load_tokenizer(dst) is not None
    return {np.dtype(np.float32): "old", np.dtype(np.float16): "new"}[np.dtype(params["W_E"].dtype)]


@pytest.mark.parametrize("pause,expect", [("params", "old"), ("manifest", "old"), ("swap", "absent")])
def test_kill9_leaves_old_new_or_nothing(capsys, gpt2_path, converted, tmp_path, pause, expect):
    dst = copy(converted, tmp_path / "out")
    p = start_writer(gpt2_path, dst, pause, "--overwrite", "--dtype", "float16")
    assert scratch_left(dst)  # mid-write: its temporary folder and lock are there
    kill9(p)
    assert state(dst) == expect
    code, err = run_cli(capsys, "convert", gpt2_path, dst, "--overwrite", "--dtype", "float16")
    assert code == 0, err
    assert state(dst) == "new" and scratch_left(dst) == []  # the retry removed the killed write's leftovers


def test_second_writer_is_refused(capsys, gpt2_path, tmp_path):
    dst = tmp_path / "out"
    p = start_writer(gpt2_path, dst, "tokenizer")
    try:
        code, err = run_cli(capsys, "convert", gpt2_path, dst)
        assert code == 2 and f"another process is writing {dst} now" in err
        assert not dst.exists()
    finally:
        kill9(p)
    code, err = run_cli(capsys, "convert", gpt2_path, dst)  # the dead writer's lock is gone with it
    assert code == 0, err
    assert state(dst) == "old" and scratch_left(dst) == []
