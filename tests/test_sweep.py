"""jaxlens.sweep / `jaxlens patterns`: pattern_lens's files, equal numbers, resume after kill -9,
sharding over simulated devices, and pattern_lens 0.6 itself (in its own venv) on our output."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxlens
from jaxlens.assets import model_dir
from jaxlens.sweep import STACKED_FILE, load_prompts, prompt_hash, run
from jaxlens.sweep.batching import pad_batch, plan_batches
from jaxlens.sweep.layout import prompt_done
from jaxlens.sweep.prompts import PromptsError, chunk_prompts
from jaxlens.sweep.writer import BoundedWriter, atomic_savez

ROOT = Path(__file__).resolve().parents[1]
MODEL = model_dir()
PROMPTS = Path(jaxlens.assets.__file__).parent / "prompts.jsonl"
PLVENV_PY = ROOT / ".venv-patternlens" / "bin" / "python"
KW = dict(min_chars=10, max_chars=120, n_samples=10, batch_size=4)  # max_chars < some lines: chunking is exercised
N_LAYERS = 2


def tree(save: Path) -> dict[str, bytes]:
    """Every file under `save` (relative path -> bytes), npz by their arrays (zip timestamps differ)."""
    out = {}
    for p in sorted(save.rglob("*")):
        if p.is_file():
            rel = p.relative_to(save).as_posix()
            if p.suffix == ".npz":
                with np.load(p) as z:
                    out[rel] = b"".join(k.encode() + z[k].tobytes() for k in sorted(z.files))
            else:
                out[rel] = p.read_bytes()
    return out


def assert_same_files(a: Path, b: Path, atol: float = 0.0) -> None:
    """`a` and `b` hold the same files, byte for byte, except npz arrays: within `atol` (a batch
    padded to another length rounds differently in f32)."""
    ta, tb = tree(a), tree(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        if not k.endswith(".npz"):
            assert ta[k] == tb[k], k
            continue
        with np.load(a / k) as x, np.load(b / k) as y:
            assert sorted(x.files) == sorted(y.files), k
            for n in x.files:
                assert x[n].shape == y[n].shape and x[n].dtype == y[n].dtype, (k, n)
                np.testing.assert_allclose(x[n], y[n], atol=atol, rtol=0, err_msg=f"{k} {n}")


def prompt_dirs(save: Path, name: str = "tiny") -> dict[str, Path]:
    return {p.name: p for p in (save / name / "prompts").iterdir()}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One sweep of the shipped model (right padding, one device): (save path, summary)."""
    save = tmp_path_factory.mktemp("sweep") / "out"
    (summary,) = run(str(MODEL), str(PROMPTS), save, **KW)
    return save, summary


@pytest.fixture(scope="module")
def hooked():
    return jaxlens.HookedTransformer.from_pretrained(MODEL)


# --- prompts, batching, writer ------------------------------------------------------------------

def test_prompt_rules(tmp_path):
    assert prompt_hash("hello") == "XUFAKrxLKna5cZ2REBfFkg"  # urlsafe b64 of md5, '=' stripped
    rows = [{"text": "a" * 25, "meta": 1}, {"text": "short"}, {"text": "b" * 10, "hash": "mine"}]
    got = chunk_prompts(rows, 8, 10, "f.jsonl")
    assert [p["text"] for p in got] == ["a" * 10, "a" * 10, "b" * 10]  # the 5-char tail chunk is dropped
    assert got[0] == {"text": "a" * 10, "meta": 1, "source_fname": "f.jsonl"} and got[2]["hash"] == "mine"
    f = tmp_path / "p.jsonl"
    f.write_text('{"text": "x' + "y" * 20 + '"}\nnot json\n[1]\n{"no": 1}\n{"text": "x' + "y" * 20 + '"}\n'
                 '{"text": "zzzzzzzzzzzzzzz", "hash": "../escape"}\n')
    msgs = []
    ps, counts = load_prompts(f, 5, 100, report=msgs.append)
    assert len(ps) == 1 and counts == dict(lines=6, malformed=4, prompts=1, duplicates=1)
    assert [m.split(":")[1] for m in msgs] == ["2", "3", "4", "6"]  # line numbers
    with pytest.raises(PromptsError, match=r":2: not valid JSON"):
        load_prompts(f, 5, 100, strict=True)
    shuffled, _ = load_prompts(PROMPTS, 10, 1000, shuffle=True, seed=3)
    again, _ = load_prompts(PROMPTS, 10, 1000, shuffle=True, seed=3)
    plain, _ = load_prompts(PROMPTS, 10, 1000)
    assert shuffled == again and shuffled != plain and sorted(map(str, shuffled)) == sorted(map(str, plain))


def _padded_work(plan, attn_len):
    return sum(b.batch * b.length * (1 + b.length / attn_len) for b in plan)


def test_batches_and_padding():
    # longest first, batch_size rows rounded to the device multiple, each padded to a chosen length
    plan = plan_batches([5, 40, 7, 30, 100], batch_size=3, n_ctx=128, multiple=2)
    assert [(b.rows, b.length, b.batch) for b in plan] == [((4, 1, 3, 2), 104, 4), ((0,), 104, 4)]
    free = plan_batches([5, 40, 7, 30, 100], batch_size=1, n_ctx=128, program_cost=0)  # compiling costs nothing
    assert [(b.rows, b.length) for b in free] == [((4,), 104), ((1,), 40), ((3,), 32), ((2,), 8), ((0,), 8)]
    two = plan_batches([5, 40, 7, 30, 100], batch_size=1, n_ctx=128, program_cost=0, max_programs=2)
    assert [b.length for b in two] == [104, 40, 40, 40, 40]
    assert plan_batches([130, 3], batch_size=1, n_ctx=130)[0].length == 130  # capped at n_ctx, not 136
    assert plan_batches([], batch_size=4, n_ctx=128) == []
    for bad, msg in ((dict(lengths=[129]), "exceeds n_ctx"), (dict(lengths=[0]), "at least one token"),
                     (dict(batch_size=0), "batch_size"), (dict(max_programs=0), "max_programs")):
        with pytest.raises(ValueError, match=msg):
            plan_batches(**{**dict(lengths=[5], batch_size=2, n_ctx=128), **bad})
    toks, mask = pad_batch([[1, 2], [3]], 4, 3, 0, "left")
    assert toks.tolist() == [[0, 0, 1, 2], [0, 0, 0, 3], [0, 0, 0, 0]] and mask[2].tolist() == [0, 0, 0, 1]


def test_padded_lengths_are_optimal():
    """The planner's lengths against every subset of the candidates (brute force)."""
    import itertools

    rng = np.random.default_rng(0)
    for trial in range(30):
        lengths = rng.integers(1, 200, size=int(rng.integers(1, 40)))
        bs, k, cost = int(rng.integers(1, 5)), int(rng.integers(1, 5)), float(rng.choice([0, 50, 500]))
        plan = plan_batches(lengths, bs, 200, max_programs=k, attn_len=64, program_cost=cost)
        assert sorted(i for b in plan for i in b.rows) == list(range(len(lengths)))
        assert all(b.length >= max(lengths[i] for i in b.rows) and b.length % 8 == 0 for b in plan)
        need = [min(-(-max(lengths[i] for i in b.rows) // 8) * 8, 200) for b in plan]
        cands = sorted(set(need))
        best = min(_padded_work([type(b)(b.rows, min(c for c in sub if c >= n), b.batch) for b, n in zip(plan, need)],
                                64) + len(sub) * cost
                   for r in range(1, min(k, len(cands)) + 1) for sub in itertools.combinations(cands, r)
                   if max(cands) in sub)
        got = _padded_work(plan, 64) + len({b.length for b in plan}) * cost
        assert len({b.length for b in plan}) <= k and got == pytest.approx(best), trial


def test_writer_back_pressure_and_errors(tmp_path):
    done = []
    with BoundedWriter(max_pending=1) as w:
        for i in range(4):
            w.submit(lambda i=i: (time.sleep(0.05), done.append(i)))
    assert done == [0, 1, 2, 3] and w.wait_s > 0.05  # the producer was held back
    w = BoundedWriter(1)
    w.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        w.close()
    atomic_savez(tmp_path / "a.npz", {"x": np.ones(3)})
    assert sorted(os.listdir(tmp_path)) == ["a.npz"]  # no temp file is left behind


def test_npz_files_are_numpys(tmp_path, monkeypatch):
    """write_npz's files: what np.savez_compressed writes (np.load, zip CRCs, about its size),
    deflated by ISA-L when installed, by zlib otherwise; stored (np.savez) when not compressed."""
    import io
    import zipfile

    from jaxlens.sweep import writer

    rng = np.random.default_rng(0)
    x = np.tril(rng.random((1, 4, 64, 64), dtype=np.float32))
    arrays = {"blocks.0.attn.hook_pattern": x, "blocks.1.attn.hook_pattern": x[:, ::-1].copy(), "i": np.arange(5)}
    ref = io.BytesIO()
    np.savez_compressed(ref, **arrays)
    assert writer.DEFLATE == "isal"  # installed by the sweep extra: the fast path is the tested one
    for deflater in ("isal", "zlib", "stored"):
        if deflater == "zlib":
            monkeypatch.setattr(writer, "_isal", None)
        path = writer.atomic_savez(tmp_path / f"{deflater}.npz", arrays, compressed=deflater != "stored")
        with zipfile.ZipFile(path) as z:
            assert z.testzip() is None and z.namelist() == [k + ".npy" for k in arrays]
            kinds = {i.compress_type for i in z.infolist()}
        assert kinds == {zipfile.ZIP_STORED if deflater == "stored" else zipfile.ZIP_DEFLATED}
        with np.load(path) as got:
            assert sorted(got.files) == sorted(arrays)
            for k, v in arrays.items():
                assert got[k].dtype == v.dtype and np.array_equal(got[k], v)
        if deflater != "stored":
            assert path.stat().st_size < 1.05 * len(ref.getvalue()), deflater
        assert writer.npz_complete(path, set(arrays))
    assert (tmp_path / "isal.npz").read_bytes() != (tmp_path / "zlib.npz").read_bytes()  # ISA-L really ran


# --- the files ------------------------------------------------------------------------------------

def test_layout(base):
    save, s = base
    assert (save / "index.html").is_file() and (save / "single.html").is_file()
    models = [json.loads(line) for line in (save / "models.jsonl").read_text().splitlines()]
    cfg = json.loads((save / "tiny" / "model_cfg.json").read_text())
    assert models == [cfg]
    assert {k: cfg[k] for k in ("model_name", "n_layers", "n_heads", "d_model", "d_head", "n_ctx", "d_vocab")} == \
        dict(model_name="tiny", n_layers=2, n_heads=4, d_model=128, d_head=32, n_ctx=128, d_vocab=1024)
    assert (cfg["act_fn"], cfg["normalization_type"], cfg["positional_embedding_type"]) == ("gelu_new", "LN", "standard")
    expected, _ = load_prompts(PROMPTS, KW["min_chars"], KW["max_chars"], KW["n_samples"])
    listed = [json.loads(line) for line in (save / "tiny" / "prompts.jsonl").read_text().splitlines()]
    assert [p["hash"] for p in listed] == [p["hash"] for p in expected] and s.n_computed == len(expected) == 10
    assert any(len(p["text"]) == KW["max_chars"] for p in listed)  # a chunked line
    tok = jaxlens.HookedTransformer.from_pretrained_no_processing(MODEL).tokenizer
    for p in listed:
        d = save / "tiny" / "prompts" / p["hash"]
        on_disk = json.loads((d / "prompt.json").read_text())
        assert list(on_disk) == ["text", "source_fname", "hash", "n_tokens", "tokens"] and on_disk == p
        assert p["tokens"] == tok.tokenize(p["text"]) and p["n_tokens"] == len(p["tokens"])
        with np.load(d / "activations.npz") as z:
            assert sorted(z.files) == [f"blocks.{l}.attn.hook_pattern" for l in range(N_LAYERS)]
            S = p["n_tokens"] + 1
            for k in z.files:
                assert z[k].dtype == np.float32 and z[k].shape == (1, 4, S, S)
                np.testing.assert_allclose(z[k].sum(-1), 1.0, atol=1e-5)
    assert 1 <= s.n_programs <= 3 and s.n_programs == len(s.shapes)


def test_patterns_equal_run_with_cache(base, hooked):
    save, _ = base
    for line in (save / "tiny" / "prompts.jsonl").read_text().splitlines()[:4]:
        p = json.loads(line)
        _, cache = hooked.run_with_cache(p["text"], names_filter=lambda n: n.endswith("hook_pattern"))
        with np.load(save / "tiny" / "prompts" / p["hash"] / "activations.npz") as z:
            for l in range(N_LAYERS):
                k = f"blocks.{l}.attn.hook_pattern"
                np.testing.assert_allclose(z[k], np.asarray(cache[k]), atol=1e-5, rtol=0)


def test_left_padding_mesh_and_stacked(base, tmp_path):
    """Left padding, a data=8 mesh of simulated devices and stacked heads give the same numbers."""
    save, _ = base
    assert jax.device_count() >= 8
    (s8,) = run(str(MODEL), str(PROMPTS), tmp_path / "m", padding_side="left", mesh="data=8",
                **{**KW, "batch_size": 3}, no_index_html=True)
    assert s8.shapes and all(b % 8 == 0 for b, _ in s8.shapes)  # batches rounded to the data axis
    a, b = tree(save), tree(tmp_path / "m")
    assert {k for k in a if k.endswith("html")} == {"index.html", "single.html"}
    for k in b:
        assert b[k] == a[k] or k.endswith(".npz"), k
    for h, d in prompt_dirs(tmp_path / "m").items():
        with np.load(d / "activations.npz") as z8, np.load(save / "tiny" / "prompts" / h / "activations.npz") as z1:
            for k in z1.files:
                np.testing.assert_allclose(z8[k], z1[k], atol=1e-5, rtol=0)  # f32 standard: padding changes reduction order
    run(str(MODEL), str(PROMPTS), tmp_path / "st", stacked_heads=True, **KW)
    for h, d in prompt_dirs(tmp_path / "st").items():
        st = np.load(d / STACKED_FILE)
        with np.load(save / "tiny" / "prompts" / h / "activations.npz") as z1:
            ref = np.stack([z1[f"blocks.{l}.attn.hook_pattern"] for l in range(N_LAYERS)], axis=1)
        assert st.shape == ref.shape and st.shape[:3] == (1, N_LAYERS, 4) and st.dtype == np.float32
        np.testing.assert_array_equal(st, ref)
    with pytest.raises(ValueError, match="stacked-heads"):
        run(str(MODEL), str(PROMPTS), tmp_path / "bad", stacked_heads=True, names="blocks.0.hook_resid_post", **KW)


def test_names_and_truncation(tmp_path):
    raw = jaxlens.HookedTransformer.from_pretrained_no_processing(MODEL)
    long = tmp_path / "long.jsonl"
    text = " ".join(["Grace went to the kitchen"] * 40)  # ~200 tokens > n_ctx = 128
    long.write_text(json.dumps({"text": text, "meta": {"id": 7}}) + "\n" + json.dumps({"text": "Sam and Rose met."}) + "\n")
    (s,) = run(str(MODEL), str(long), tmp_path / "o", names="hook_embed,blocks.0.hook_resid_post,blocks\\.1\\.attn\\.hook_[qk]",
               min_chars=5, max_chars=100000, batch_size=2)
    assert s.n_truncated == 1 and s.n_computed == 2
    for d in prompt_dirs(tmp_path / "o").values():
        p = json.loads((d / "prompt.json").read_text())
        with np.load(d / "activations.npz") as z:
            assert sorted(z.files) == ["blocks.0.hook_resid_post", "blocks.1.attn.hook_k", "blocks.1.attn.hook_q",
                                       "hook_embed"]
            S = min(p["n_tokens"] + 1, 128)
            assert z["blocks.0.hook_resid_post"].shape == (1, S, 128) and z["blocks.1.attn.hook_q"].shape == (1, S, 4, 32)
            if p.get("truncated"):
                assert p["meta"] == {"id": 7} and p["n_tokens"] > 127 and S == 128
                with pytest.warns(UserWarning, match="n_ctx=128"):  # TransformerLens truncates to n_ctx as well
                    toks = raw.to_tokens(p["text"])
            else:
                assert "truncated" not in p
                toks = raw.to_tokens(p["text"])
            # the sweep runs HF's weights (patterns do not depend on TL's processing, resid/q/k do)
            _, cache = raw.run_with_cache(toks, names_filter=list(z.files))
            for k in z.files:
                np.testing.assert_allclose(z[k], np.asarray(cache[k]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="matches no hook"):
        run(str(MODEL), str(long), tmp_path / "x", names="blocks.9.nothing", min_chars=5)


def test_resume_and_partial_files(base, tmp_path):
    import shutil

    save, _ = base
    work = tmp_path / "w"
    shutil.copytree(save, work)
    dirs = prompt_dirs(work)
    h_trunc, h_nojson, h_tmp, h_keep = list(dirs)[:4]
    # a truncated npz (as if a non-atomic writer died), a missing prompt.json, a stray temp file
    data = (dirs[h_trunc] / "activations.npz").read_bytes()
    (dirs[h_trunc] / "activations.npz").write_bytes(data[: len(data) // 2])
    (dirs[h_nojson] / "prompt.json").unlink()
    (dirs[h_tmp] / "activations.npz").unlink()
    (dirs[h_tmp] / ".tmp-activations.npz.123.456").write_bytes(b"half")
    assert not any(prompt_done(dirs[h], frozenset({"blocks.0.attn.hook_pattern"}), False)
                   for h in (h_trunc, h_nojson, h_tmp))
    keep = (dirs[h_keep] / "activations.npz").stat().st_mtime_ns
    (s,) = run(str(MODEL), str(PROMPTS), work, **KW)
    assert (s.n_cached, s.n_computed) == (7, 3)
    assert (dirs[h_keep] / "activations.npz").stat().st_mtime_ns == keep  # finished prompts are not rewritten
    assert tree(work) == tree(save)
    (s,) = run(str(MODEL), str(PROMPTS), work, **KW, force=True)
    assert (s.n_cached, s.n_computed) == (0, 10)


def test_kill_9_and_resume(base, tmp_path):
    """Kill a CLI sweep with SIGKILL at a random moment, rerun: finished prompts are kept as they
    were, nothing half-written counts, and the result equals an uninterrupted run."""
    save, _ = base
    out = tmp_path / "k"
    cmd = [sys.executable, "-m", "jaxlens.apps.cli", "patterns", "--model", str(MODEL), "--prompts", str(PROMPTS),
           "--save-path", str(out), "--min-chars", "10", "--max-chars", "120", "-n", "10", "-b", "1",
           "--no-progress"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    rng = random.Random()
    delay = rng.uniform(0.0, 0.3)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        root = out / "tiny" / "prompts"
        if root.is_dir() and any((d / "activations.npz").exists() for d in root.iterdir()):
            time.sleep(delay)
            break
        time.sleep(0.01)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed or proc.returncode == 0, proc.stderr.read().decode()[-2000:]
    before = {h: (d / "activations.npz").stat().st_mtime_ns for h, d in prompt_dirs(out).items()
              if (d / "activations.npz").exists()}
    for h in before:  # every activations file under its final name is complete
        with zipfile.ZipFile(prompt_dirs(out)[h] / "activations.npz") as z:
            assert z.testzip() is None
    assert before, "the sweep was killed before finishing any prompt"
    print(f"killed={killed} after {delay:.2f}s: {len(before)} of 10 prompts were finished")
    (s,) = run(str(MODEL), str(PROMPTS), out, **KW)
    assert s.n_cached >= len(before) and s.n_cached + s.n_computed == 10
    after = {h: (d / "activations.npz").stat().st_mtime_ns for h, d in prompt_dirs(out).items()}
    assert all(after[h] == t for h, t in before.items())
    assert_same_files(out, save, atol=1e-6)  # -b 1 pads each prompt to its own length, `base` batches of 4


def test_cli(tmp_path, capsys):
    from jaxlens.apps.cli import main

    rc = main(["patterns", "--model", str(MODEL), "--prompts", str(PROMPTS), "--save-path", str(tmp_path / "c"),
               "--min-chars", "10", "-n", "3", "-b", "1", "--raw-prompts", "--no-index-html", "--no-progress",
               "--name", "mine", "--max-programs", "1"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["model_name"] == "mine" and summary["n_computed"] == 3
    assert summary["n_batches"] == 3 and summary["n_programs"] == 1  # three batches of one, one padded length
    assert not (tmp_path / "c" / "index.html").exists() and (tmp_path / "c" / "mine" / "model_cfg.json").is_file()
    with pytest.raises(ValueError, match="safe folder name"):
        run(str(MODEL), str(PROMPTS), tmp_path / "c", name="../up", n_samples=1)


def test_viewer_escapes(tmp_path):
    f = tmp_path / "evil.jsonl"
    f.write_text(json.dumps({"text": "<script>alert(1)</script> and more text here"}) + "\n")
    run(str(MODEL), str(f), tmp_path / "v", min_chars=5)
    page = (tmp_path / "v" / "index.html").read_text()
    assert "<script>alert" not in page and "&lt;script&gt;" in page
    single = (tmp_path / "v" / "single.html").read_text()
    assert "<script>alert" not in single and "</script> and" not in single and "\\u003cscript\\u003ealert" in single


def _chromium() -> str | None:
    import shutil

    return next((p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))), None)


def test_viewer_renders_heatmaps_in_headless_chromium(base, tmp_path):
    """single.html draws the embedded patterns as heatmaps (blue = attention) from file://."""
    exe = _chromium()
    if exe is None:
        pytest.skip("Chromium is not installed (`make chromium` or apt-get install chromium); cannot render the viewer")
    save, _ = base
    first = json.loads((save / "tiny" / "prompts.jsonl").read_text().splitlines()[0])["hash"]
    shot = tmp_path / "viewer.png"
    url = (save / "single.html").resolve().as_uri() + f"#tiny/{first}"
    subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1400,900",
                    "--virtual-time-budget=3000", f"--screenshot={shot}", url], check=True, capture_output=True,
                   timeout=120)
    plt = pytest.importorskip("matplotlib.pyplot")
    img = plt.imread(str(shot))[..., :3]
    assert img.shape[:2] == (900, 1400)
    blue = (img[..., 2] > 0.8) & (img[..., 0] < 0.4)  # strongly attended cells
    pale = (img[..., 2] > 0.9) & (img[..., 0] > 0.6) & (img[..., 0] < 0.97)  # weaker ones
    assert blue.mean() > 0.001 and pale.mean() > 0.001, (blue.mean(), pale.mean())


# --- pattern_lens 0.6 itself ----------------------------------------------------------------------

PL_SCRIPT = r'''
import json, os, shutil, sys
from pathlib import Path
import torch


def compute(original, src, prompts, save, name, min_c, max_c, n, bs):
    """pattern_lens's own activations_main; HookedTransformer 2.17 built from a local checkpoint
    (`original`: TL's own from_pretrained, which each job's loader replaces on the class)."""
    from transformer_lens import HookedTransformer
    import pattern_lens.activations as pla

    ref = Path(save).parent / "refmodel"  # a path without "llama": TL 2.17 special-cases such names
    shutil.copytree(src, ref, dirs_exist_ok=True)
    c = json.loads((ref / "config.json").read_text())  # transformers 5's rope_parameters -> 4.x's fields
    rp = c.get("rope_parameters") or {}
    if c["model_type"] == "gpt_neox":
        c["rotary_pct"], c["rotary_emb_base"] = rp.get("partial_rotary_factor", 1.0), rp.get("rope_theta", 1e4)
    elif rp:
        c["rope_theta"] = rp.get("rope_theta", 1e4)
    (ref / "config.json").write_text(json.dumps(c))
    tc = json.loads((ref / "tokenizer_config.json").read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"  # transformers 5's TokenizersBackend is unknown to 4.x
    (ref / "tokenizer_config.json").write_text(json.dumps(tc))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(ref), torch_dtype=torch.float32, attn_implementation="eager")

    tok = AutoTokenizer.from_pretrained(str(ref))

    def load(model_name, device=None, **kw):  # HF's weights, no processing
        if c["model_type"] == "gpt2":  # TL 2.17 reads GPT-2's d_mlp as 4 d_model (ignores n_inner): build it here
            from transformer_lens import HookedTransformerConfig
            from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

            cfg = HookedTransformerConfig(
                n_layers=c["n_layer"], d_model=c["n_embd"], d_head=c["n_embd"] // c["n_head"], n_heads=c["n_head"],
                d_mlp=c.get("n_inner") or 4 * c["n_embd"], d_vocab=c["vocab_size"], n_ctx=c["n_positions"],
                act_fn=c["activation_function"], normalization_type="LN", eps=c["layer_norm_epsilon"],
                model_name=name, default_prepend_bos=True, original_architecture="GPT2LMHeadModel")
            m = HookedTransformer(cfg, tokenizer=tok)
            m.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                          center_unembed=False, fold_value_biases=False)
            return m.to(device or "cpu")
        return original(str(ref), hf_model=hf, device=device or "cpu", tokenizer=tok, dtype=torch.float32,
                        fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False)

    pla.HookedTransformer.from_pretrained = staticmethod(load)
    pla.activations_main(model_name=name, save_path=save, prompts_path=prompts, raw_prompts=True,
                         min_chars=int(min_c), max_chars=int(max_c), force=False, n_samples=int(n),
                         no_index_html=False, device="cpu", batch_size=int(bs))


mode = sys.argv[1]
if mode == "compute":  # one interpreter for every job (booting this venv costs ~8 s): [cwd, args...] each
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer

    official = loading.get_official_model_name  # a local folder is its own official name
    loading.get_official_model_name = lambda m: m if (Path(m) / "config.json").exists() else official(m)
    original = HookedTransformer.from_pretrained
    for cwd, *args in json.loads(sys.argv[2]):
        os.chdir(cwd)
        compute(original, *args)
elif mode == "load":  # pattern_lens's loaders on a folder, then its figures (argv[4:]) on the same folder
    save, name = Path(sys.argv[2]), sys.argv[3]
    from pattern_lens.load_activations import activations_exist, load_activations
    out = {}
    for line in (save / name / "prompts.jsonl").read_text().splitlines():
        p = json.loads(line)
        assert activations_exist(name, p, save)
        _, cache = load_activations(name, p, save, return_fmt="numpy")
        out[p["hash"]] = {k: [list(v.shape), str(v.dtype), float(v.astype("float64").sum())] for k, v in cache.items()}
    import pattern_lens.figures as plf

    sys.argv = ["pattern_lens.figures", *sys.argv[4:]]
    plf.main()  # it prints progress: the result is the last line
    print("\n" + json.dumps(out))
'''

needs_pl = pytest.mark.skipif(not PLVENV_PY.exists(),
                              reason="pattern_lens venv missing: `make patternlens-venv` builds .venv-patternlens")


def _pl(*args: str, cwd: Path) -> str:
    script = cwd / "pl_script.py"
    script.write_text(PL_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    r = subprocess.run([str(PLVENV_PY), str(script), *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def _random_checkpoint(family: str, root: Path) -> Path:
    """A random small HF checkpoint of `family` (tests/hf_models.py's config). Llama without q/k/v
    biases: HookedTransformer 2.17's Llama conversion drops them, so with them pattern_lens itself
    would not match HF (jaxlens's Llama parity with biases is tested in test_parity.py)."""
    import torch
    import transformers
    from hf_models import hf_config, make_tokenizer, perturb

    path = root / family
    path.mkdir(parents=True)
    tok = make_tokenizer(path)
    cfg = hf_config(family, len(tok))
    if family == "llama":
        cfg.attention_bias = False
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    perturb(model, 0)
    model.save_pretrained(str(path))
    return path


PL_FAMILIES = ("gpt2", "gpt_neox", "llama")
PL_ARGS = dict(min_chars=10, max_chars=120, n_samples=12, batch_size=4)


@pytest.fixture(scope="module")
def pattern_lens_runs(tmp_path_factory):
    """pattern_lens's output for each family (folder -> (checkpoint, name)), from one interpreter of its venv."""
    root = tmp_path_factory.mktemp("pattern_lens")
    jobs, out = [], {}
    for family in PL_FAMILIES:
        d = root / family
        d.mkdir()
        src = MODEL if family == "gpt2" else _random_checkpoint(family, d / "ckpt")
        name = "tiny" if family == "gpt2" else family
        (d / "prompts.jsonl").write_bytes(PROMPTS.read_bytes())  # relative path: source_fname is written as given
        jobs.append([str(d), str(src), "prompts.jsonl", "pl", name, *(str(v) for v in PL_ARGS.values())])
        out[family] = (d, src, name)
    _pl("compute", json.dumps(jobs), cwd=root)
    return out


@needs_pl
@pytest.mark.parametrize("family", PL_FAMILIES)
def test_same_files_as_pattern_lens(pattern_lens_runs, family):
    """pattern_lens 0.6 (HookedTransformer 2.17) and jaxlens on the same weights, prompts and flags:
    the shipped GPT-2, and random NeoX (parallel block, partial rotary) and Llama (RMSNorm, RoPE,
    grouped-query: patterns per query head) checkpoints, whose n_ctx = 64 truncates some prompts."""
    tmp_path, src, name = pattern_lens_runs[family]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        (s,) = run(str(src), "prompts.jsonl", "ours", name=name, **PL_ARGS)
    finally:
        os.chdir(cwd)
    pl, ours = tmp_path / "pl" / name, tmp_path / "ours" / name
    a, b = prompt_dirs(tmp_path / "pl", name), prompt_dirs(tmp_path / "ours", name)
    assert sorted(a) == sorted(b) and len(a) == 12
    n_trunc = 0
    for h in a:
        mine = json.loads((b[h] / "prompt.json").read_text())
        if mine.pop("truncated", False):  # pattern_lens truncates silently; we say so, and nothing else differs
            n_trunc += 1
            assert json.dumps(mine) == (a[h] / "prompt.json").read_text()
        else:
            assert (a[h] / "prompt.json").read_bytes() == (b[h] / "prompt.json").read_bytes()
        with np.load(a[h] / "activations.npz") as za, np.load(b[h] / "activations.npz") as zb:
            assert sorted(za.files) == sorted(zb.files)
            for k in za.files:
                assert za[k].shape == zb[k].shape and za[k].dtype == zb[k].dtype == np.float32
                np.testing.assert_allclose(zb[k], za[k], atol=1e-5, rtol=0)
    assert n_trunc == s.n_truncated and (family == "gpt2") == (n_trunc == 0)
    strip = lambda t: sorted(json.dumps({k: v for k, v in json.loads(x).items() if k != "truncated"})
                             for x in t.splitlines())
    assert strip((pl / "prompts.jsonl").read_text()) == strip((ours / "prompts.jsonl").read_text())
    cfg_pl, cfg_ours = json.loads((pl / "model_cfg.json").read_text()), json.loads((ours / "model_cfg.json").read_text())
    shared = set(cfg_ours) & set(cfg_pl)
    assert {"model_name", "n_layers", "n_heads", "d_model", "d_head", "n_ctx", "d_vocab", "act_fn",
            "normalization_type", "positional_embedding_type"} <= shared
    assert {k: cfg_ours[k] for k in shared} == {k: cfg_pl[k] for k in shared}
    for f in ("index.html", "single.html", "models.jsonl"):
        assert (tmp_path / "pl" / f).is_file() and (tmp_path / "ours" / f).is_file()

    if family != "gpt2":
        return
    # pattern_lens's loaders, then its figures (`pattern_lens.figures --model tiny --save-path ours -n 2`)
    out = _pl("load", "ours", "tiny", "--model", "tiny", "--save-path", "ours", "-n", "2", cwd=tmp_path)
    loaded = json.loads(out.strip().splitlines()[-1])
    assert sorted(loaded) == sorted(b)
    for h, keys in loaded.items():
        assert sorted(keys) == [f"blocks.{l}.attn.hook_pattern" for l in range(N_LAYERS)]
        assert all(dt == "float32" and shape[:2] == [1, 4] for shape, dt, _ in keys.values())
    first = json.loads((ours / "prompts.jsonl").read_text().splitlines()[0])["hash"]
    assert (ours / "prompts" / first / "L1" / "H3" / "raw.png").is_file()


def test_stats_equal_the_files(base, tmp_path):
    """--stats (on device, no per-prompt files) equals the same numbers computed from the files."""
    save, _ = base
    (s,) = run(str(MODEL), str(PROMPTS), tmp_path / "s", stats=True, mesh="data=2",
               names="blocks.*.attn.hook_pattern,blocks.1.hook_resid_post", **KW)
    assert s.n_computed == 10 and not (tmp_path / "s" / "tiny" / "prompts").exists()
    st = dict(np.load(tmp_path / "s" / "tiny" / "stats.npz"))
    doc = json.loads((tmp_path / "s" / "tiny" / "stats.json").read_text())
    sums, n, resid = np.zeros((3, N_LAYERS, 4)), 0, []
    raw = jaxlens.HookedTransformer.from_pretrained_no_processing(MODEL)
    for d in prompt_dirs(save).values():
        p = json.loads((d / "prompt.json").read_text())
        with np.load(d / "activations.npz") as z:
            for l in range(N_LAYERS):
                a = z[f"blocks.{l}.attn.hook_pattern"][0].astype(np.float64)[:, 1:]  # queries after BOS
                S = a.shape[-1]
                sums[0, l] += a[:, :, 0].sum(-1)
                sums[1, l] += np.stack([a[:, i, i] for i in range(S - 1)], -1).sum(-1)
                sums[2, l] += -(np.where(a > 0, a * np.log(np.where(a > 0, a, 1)), 0)).sum((-1, -2))
        n += S - 1
        _, c = raw.run_with_cache(p["text"], names_filter="blocks.1.hook_resid_post")
        resid.append(np.asarray(c["blocks.1.hook_resid_post"])[0])
    for i, k in enumerate(("bos_attention", "prev_token_attention", "entropy")):
        np.testing.assert_allclose(st[k], sums[i] / n, rtol=1e-5, atol=1e-6)
        assert np.asarray(doc["head_stats"][k]).shape == (N_LAYERS, 4)
    assert float(st["n_queries"]) == n
    r = np.concatenate(resid)
    np.testing.assert_allclose(st["blocks.1.hook_resid_post.mean"], r.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(st["blocks.1.hook_resid_post.var"], r.var(0), rtol=1e-4, atol=1e-5)
    ind = st["induction_score"]
    assert ind.shape == (N_LAYERS, 4) and ind.max() > 0.5 > np.median(ind)  # the shipped model's induction head


@pytest.mark.parametrize("dtype,triangle", [("float32", False), ("bfloat16", True)])
def test_zarr_store(base, tmp_path, dtype, triangle):
    """--store zarr: one chunked store equals the files (bf16: within bf16 rounding); resumable,
    and an index line torn by a kill is cut off and its prompts recomputed."""
    from jaxlens.sweep import open_store

    save, _ = base
    out = tmp_path / "z"
    (s,) = run(str(MODEL), str(PROMPTS), out, store="zarr", store_dtype=dtype, store_triangle=triangle, **KW)
    assert s.n_computed == 10 and not (out / "tiny" / "prompts").exists()
    st = open_store(out / "tiny")
    assert sorted(st) == sorted(prompt_dirs(save)) and len(st) == 10
    tol = 1e-7 if dtype == "float32" else 4e-3
    for h, d in prompt_dirs(save).items():
        with np.load(d / "activations.npz") as z:
            got = st[h]
            assert sorted(got) == sorted(z.files)
            for k in z.files:
                assert got[k].shape == z[k].shape and got[k].dtype == np.float32
                np.testing.assert_allclose(got[k], z[k], atol=tol, rtol=0)
    assert (out / "tiny" / "prompts.jsonl").read_text() == (save / "tiny" / "prompts.jsonl").read_text()
    idx = out / "tiny" / "patterns.zarr" / "index.jsonl"
    lines = idx.read_bytes().splitlines(keepends=True)
    idx.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # a torn last line
    (s2,) = run(str(MODEL), str(PROMPTS), out, store="zarr", store_dtype=dtype, store_triangle=triangle, **KW)
    last = json.loads(lines[-1])["prompts"]
    assert (s2.n_cached, s2.n_computed) == (10 - len(last), len(last))
    st = open_store(out / "tiny")
    # the recomputed prompts form a batch of their own, padded to another length than in `base`,
    # which changes XLA's reduction order: f32 rounding, hence 1e-6 rather than 1e-7
    tol = max(tol, 1e-6)
    for h, _, _, _ in last:
        with np.load(prompt_dirs(save)[h] / "activations.npz") as z:
            np.testing.assert_allclose(st[h]["blocks.1.attn.hook_pattern"], z["blocks.1.attn.hook_pattern"], atol=tol)
    with pytest.raises(ValueError, match="was written with"):
        run(str(MODEL), str(PROMPTS), out, store="zarr", store_dtype=dtype, store_triangle=not triangle, **KW)


def test_mesh_specs_and_disk_full(tmp_path, monkeypatch):
    import errno

    from jaxlens.sweep import writer
    from jaxlens.distributed import make_mesh, parse_mesh_spec

    assert parse_mesh_spec("data=4,model=2", 8) == {"data": 4, "model": 2}
    assert make_mesh("data=4,model=2").devices.shape == (4, 2)
    for bad in ("data", "data=0", "tensor=2", "data=2,data=2"):
        with pytest.raises(ValueError, match="mesh spec"):
            parse_mesh_spec(bad, 8)
    with pytest.raises(ValueError, match="needs 64 devices"):
        make_mesh("data=64")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer.os, "replace", full)
    with pytest.raises(writer.DiskFullError, match="disk full .* rerun"):
        writer.atomic_write_text(tmp_path / "x.json", "{}")
    assert os.listdir(tmp_path) == []  # the temp file is removed


def test_two_processes_write_the_same_files(base, tmp_path):
    """Two jax.distributed processes (CPU collectives, 4 simulated devices each, data=4 mesh each)
    split the prompts and give the same files as one process on one device."""
    import socket

    save, _ = base
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "mh"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-m", "jaxlens.apps.cli", "patterns", "--model", str(MODEL),
                               "--prompts", str(PROMPTS), "--save-path", str(out), "--min-chars", "10",
                               "--max-chars", "120", "-n", "10", "-b", "4", "--mesh", "data=4", "--no-progress",
                               "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e.decode()[-2000:] for _, e in outs]
    done = [json.loads([ln for ln in o.decode().splitlines() if ln.startswith('{"model_name"')][-1])["n_computed"]
            for o, _ in outs]  # (Gloo prints to stdout too)
    assert done == [5, 5]  # disjoint halves
    a, b = tree(save), tree(out)
    assert sorted(a) == sorted(b)
    for k in a:
        assert b[k] == a[k] or k.endswith((".npz", ".html")), k
    for h, d in prompt_dirs(out).items():
        with np.load(d / "activations.npz") as z2, np.load(save / "tiny" / "prompts" / h / "activations.npz") as z1:
            for k in z1.files:
                np.testing.assert_allclose(z2[k], z1[k], atol=1e-5, rtol=0)  # f32 standard: padding changes reduction order
