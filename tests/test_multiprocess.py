"""Two processes with 4 simulated CPU devices each form one 8-device mesh (jax.distributed, gloo):
a forward, run_with_cache, an analysis and greedy generation give the one-process numbers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

import jaxlens
from conftest import assert_close
from jaxlens.assets import model_dir

WORKER = Path(__file__).with_name("mp_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    out = tmp_path / "out.npz"
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(i), port, str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    got = np.load(out)
    sys.path.insert(0, str(WORKER.parent))
    from mp_worker import TOKS

    m = jaxlens.from_pretrained(model_dir())
    logits, cache = m.run_with_cache(TOKS, names_filter=None)
    assert_close(got["logits"], logits, "logits")
    assert_close(got["pattern"], cache["blocks.1.attn.hook_pattern"], "pattern")
    assert_close(got["resid"], cache["blocks.0.hook_resid_post"], "resid")
    assert_close(got["accumulated"], cache.accumulated_resid(apply_ln=True), "accumulated_resid")
    gen = m.generate(TOKS[:1], max_new_tokens=5, do_sample=False, verbose=False)
    np.testing.assert_array_equal(got["generated"], np.asarray(gen))
