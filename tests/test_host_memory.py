"""`jaxlens.host_memory.retain_freed_memory`: freed host memory stays in the process, so a second
large allocation of the same size takes no page faults; off by the env var; jax-free. Each case
runs in its own interpreter: the setting is process-wide and cannot be undone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MODULE = Path(__file__).resolve().parents[1] / "jaxlens" / "host_memory.py"
MIB = 64
# Loads the module from its file with jax made unimportable, then: malloc, touch, free, malloc
# again and touch again (ctypes, so no numpy hugepage advice blurs the count), counting the
# second allocation's minor page faults.
PROBE = f"""
import ctypes, importlib.util, json, resource, sys
sys.modules["jax"] = None
spec = importlib.util.spec_from_file_location("hm", {str(MODULE)!r})
hm = importlib.util.module_from_spec(spec); spec.loader.exec_module(hm)
on = hm.retain_freed_memory()
again = hm.retain_freed_memory()
libc = ctypes.CDLL("libc.so.6"); libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]
n = {MIB} << 20
p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(p)
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
p = libc.malloc(n); ctypes.memset(p, 2, n)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
print(json.dumps({{"on": on, "again": again, "retained": hm.retained(), "faults": faults}}))
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux")


def probe(**env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_without_page_faults():
    pages = (MIB << 20) // 4096
    on = probe()
    assert on["on"] and on["again"] and on["retained"]
    assert on["faults"] < pages // 20, on  # the freed block came back: (almost) no page touched afresh
    off = probe(JAXLENS_RETAIN_MEMORY="0")
    assert not off["on"] and not off["retained"]
    assert off["faults"] > pages // 2, off  # glibc's default: munmap on free, a fault per page again


def test_cli_retains_freed_memory():
    """`jaxlens` commands set it before they parse their arguments (in their own process: a subprocess here)."""
    code = ("import contextlib, io\nfrom jaxlens import host_memory\nfrom jaxlens.apps import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "    cli.main(['--help'])\n"
            "print(host_memory.retained())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "True"
