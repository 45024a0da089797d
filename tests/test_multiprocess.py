"""Two processes with 4 simulated CPU devices each form one 8-device mesh (jax.distributed, gloo):
a forward, run_with_cache, an analysis and greedy generation give the one-process numbers, and an
Orbax checkpoint both processes write restores onto a different mesh here with the same logits."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

import jaxlens
from conftest import assert_close
from jaxlens.assets import model_dir
from mp_worker import TOKS  # tests/ is on sys.path (conftest's folder); importing it has no side effects

WORKER = Path(__file__).with_name("mp_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(mode: str, out: Path) -> None:
    """Start the two worker processes (4 devices each, one 8-device job) in `mode`; wait for both."""
    port = str(free_port())
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), mode, str(i), port, str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)


def test_two_processes_equal_one(tmp_path):
    out = tmp_path / "out.npz"
    run_workers("run", out)
    got = np.load(out)
    m = jaxlens.from_pretrained(model_dir())
    logits, cache = m.run_with_cache(TOKS, names_filter=None)
    assert_close(got["logits"], logits, "logits")
    assert_close(got["pattern"], cache["blocks.1.attn.hook_pattern"], "pattern")
    assert_close(got["resid"], cache["blocks.0.hook_resid_post"], "resid")
    assert_close(got["accumulated"], cache.accumulated_resid(apply_ln=True), "accumulated_resid")
    gen = m.generate(TOKS[:1], max_new_tokens=5, do_sample=False, verbose=False)
    np.testing.assert_array_equal(got["generated"], np.asarray(gen))


def test_two_process_orbax_save_restores_on_another_mesh(tmp_path):
    """Each process writes the shards of a data=2,model=4 job; restored onto fsdp=8 in this process."""
    path = tmp_path / "ckpt"
    run_workers("save", path)
    restored = jaxlens.from_pretrained(path, mesh="fsdp=8")
    w_in = restored.params["blocks_0"]["mlp"]["W_in"]
    assert w_in.sharding.spec == jax.sharding.PartitionSpec("fsdp", None), w_in.sharding
    assert_close(restored(TOKS), jaxlens.from_pretrained(model_dir())(TOKS), "restored logits")
