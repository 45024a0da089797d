"""One process of the two-process tests (tests/test_multiprocess.py): 4 simulated CPU devices here,
8 in the job; loads the shipped model onto a data=2,model=4 mesh spanning both processes, then
either runs it ("run": results to an .npz) or saves it as Orbax, each process its own shards ("save").

Usage: XLA_FLAGS=--xla_force_host_platform_device_count=4 mp_worker.py MODE PROCESS_ID PORT OUT (the test
sets the flag in the workers' environment: importing this module, as the test does for TOKS, must
not change the test process's own device count)."""

import sys

import jax
import numpy as np

import jaxlens
import jaxlens.distributed as D
from jax.experimental import multihost_utils as mu
from jaxlens.assets import model_dir

TOKS = np.array([[0, 5, 9, 30, 2, 7, 100, 44], [0, 17, 250, 8, 4, 61, 62, 63], [0, 1, 2, 3, 4, 5, 6, 7]], np.int32)


MODES = ("run", "save")


def run(m: jaxlens.HookedTransformer, pid: int, out: str) -> None:
    """Forward, cache, an analysis and greedy generation, gathered; process 0 writes them to `out`."""
    logits, cache = m.run_with_cache(TOKS, names_filter=None)
    got = {"logits": logits, "pattern": cache["blocks.1.attn.hook_pattern"], "resid": cache["blocks.0.hook_resid_post"],
           "accumulated": cache.accumulated_resid(apply_ln=True)}
    got = {k: np.asarray(mu.process_allgather(v, tiled=True)) for k, v in got.items()}
    gen = m.generate(TOKS[:1], max_new_tokens=5, do_sample=False, verbose=False)
    got["generated"] = np.asarray(gen)  # generation's tokens come back to every process whole
    if pid == 0:
        np.savez(out, **got)


def main(mode: str, pid: int, port: str, out: str) -> None:
    if mode not in MODES:
        raise SystemExit(f"mp_worker: mode {mode!r} is not one of {MODES}")
    D.initialize(f"127.0.0.1:{port}", 2, pid)
    jax.config.update("jax_default_matmul_precision", "highest")
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    m = jaxlens.from_pretrained(model_dir(), mesh="data=2,model=4")
    if mode == "run":
        run(m, pid, out)
    else:
        m.save(out, format="orbax")  # every process calls it and writes the shards it holds
    mu.sync_global_devices("done")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
