"""The persistent compilation cache (`jaxlens.compile_cache`): a second process compiles nothing new,
a changed computation is compiled afresh, `JAXLENS_COMPILE_CACHE=0` turns it off, and importing
jaxlens leaves it off.

Each case runs `jaxlens run` (the CLI, which calls `compile_cache.enable()`) on the shipped model in
a fresh subprocess, counting JAX's own cache events (`/jax/compilation_cache/cache_hits`,
`cache_misses`) with `jax.monitoring`, and the files in the cache folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxlens.compile_cache import cache_dir

TAG = "COMPILE_CACHE_PROBE "

# Runs in the subprocess: a jitted forward after a bare `import jaxlens` (the cache must still be
# off), then `jaxlens run` once per argv given (each phase's cache events are counted separately).
PROBE = r"""
import contextlib, io, json, sys
import jax
import numpy as np

events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))

import jaxlens
from jaxlens.assets import model_dir

m = jaxlens.from_pretrained_no_processing(model_dir())
m.run_with_cache(np.array([[0, 5, 9]]), names_filter="blocks.0.hook_resid_pre")
out = {"dir_after_import": jax.config.jax_compilation_cache_dir,
       "import_lookups": sum(e.endswith(("/cache_hits", "/cache_misses")) for e in events), "phases": []}
from jaxlens.apps.cli import main
for argv in json.loads(sys.argv[1]):
    n0 = len(events)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    new = events[n0:]
    out["phases"].append({"rc": rc, "stdout": buf.getvalue(),
                          "hits": sum(e.endswith("/cache_hits") for e in new),
                          "misses": sum(e.endswith("/cache_misses") for e in new)})
out["dir"] = jax.config.jax_compilation_cache_dir
print("TAG" + json.dumps(out))
""".replace("TAG", TAG)

RUN = ["run", "--tokens", "0,5,9,30,2", "--top-k", "2"]
RUN_OTHER = ["run", "--tokens", "0,5,9,30,2", "--top-k", "2", "--names-filter", "blocks.1.attn.hook_pattern"]


def probe(env_extra: dict[str, str], tmp: Path, *argvs: list[str]) -> dict:
    """Run PROBE in a fresh interpreter with HOME/XDG_CACHE_HOME inside `tmp` plus `env_extra`."""
    env = {k: v for k, v in os.environ.items() if k != "JAXLENS_COMPILE_CACHE"}
    env.update(HOME=str(tmp / "home"), XDG_CACHE_HOME=str(tmp / "xdg"), JAX_PLATFORMS="cpu", **env_extra)
    env.pop("XLA_FLAGS", None)  # one device: what a user's CLI run sees
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(list(argvs))], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith(TAG))
    return json.loads(line[len(TAG):])


def files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def user_cache_writes(tmp: Path) -> list[str]:
    """Files the probe wrote under its HOME and XDG_CACHE_HOME, less the CPU kernels' build
    (`cpu_kernels`: a separate cache in the same user folder, written whatever the compile cache)."""
    kernels = tmp / "xdg" / "jaxlens" / "kernels"
    return [str(p) for top in (tmp / "xdg", tmp / "home") if top.exists() for p in top.rglob("*")
            if p.is_file() and kernels not in p.parents]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two processes sharing one cache folder: the first fills it, the second reruns, then changes the hooks."""
    tmp = tmp_path_factory.mktemp("compile_cache")
    folder = tmp / "cache"
    first = probe({"JAXLENS_COMPILE_CACHE": str(folder)}, tmp, RUN)
    after_first = files(folder)
    second = probe({"JAXLENS_COMPILE_CACHE": str(folder)}, tmp, RUN, RUN_OTHER)
    return tmp, folder, first, after_first, second, files(folder)


def test_second_process_compiles_nothing_new(runs):
    _, folder, first, after_first, second, _ = runs
    p1, p2 = first["phases"][0], second["phases"][0]
    assert p1["rc"] == p2["rc"] == 0
    assert first["dir"] == str(folder)
    assert p1["misses"] > 0 and after_first, "the first run wrote nothing to the cache"
    assert p2["misses"] == 0, f"the second run compiled {p2['misses']} programs again"
    assert p2["hits"] >= p1["misses"]
    assert p2["stdout"] == p1["stdout"], "a cached program gave a different result"


def test_changed_computation_is_compiled_not_served(runs):
    _, _, _, after_first, second, after_second = runs
    other = second["phases"][1]
    assert other["rc"] == 0
    assert other["misses"] > 0, "another names filter was served from the cache instead of compiled"
    assert after_second > after_first  # its programs were added, none replaced


def test_importing_jaxlens_leaves_the_cache_off(runs):
    tmp, _, first, _, _, _ = runs
    assert first["dir_after_import"] is None
    assert first["import_lookups"] == 0  # nothing before the CLI call looked in a persistent cache
    assert user_cache_writes(tmp) == []


def test_env_zero_turns_it_off(tmp_path):
    out = probe({"JAXLENS_COMPILE_CACHE": "0"}, tmp_path, RUN)
    assert out["phases"][0]["rc"] == 0
    assert out["dir"] is None
    assert out["phases"][0]["hits"] == out["phases"][0]["misses"] == 0
    assert user_cache_writes(tmp_path) == []


def test_default_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("JAXLENS_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "jaxlens" / "xla"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert cache_dir() == tmp_path / "h" / ".cache" / "jaxlens" / "xla"
    monkeypatch.setenv("JAXLENS_COMPILE_CACHE", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x"
    assert cache_dir(tmp_path / "y") == tmp_path / "y"  # an explicit folder wins
    for off in ("0", "OFF", "off", " false "):
        monkeypatch.setenv("JAXLENS_COMPILE_CACHE", off)
        assert cache_dir() is None


def test_unwritable_folder_is_a_clear_error(tmp_path, capsys):
    from jaxlens.compile_cache import enable

    (tmp_path / "file").write_text("")
    bad = tmp_path / "file" / "cache"  # under a plain file: cannot be created
    with pytest.raises(OSError, match="JAXLENS_COMPILE_CACHE=DIR"):
        enable(bad)
    assert enable(bad, warn=True) is None  # the CLI goes on without the cache
    assert "running without it" in capsys.readouterr().err
