"""One process of the two-process test (tests/test_multiprocess.py): 4 simulated CPU devices here,
8 in the job; runs the shipped model on a data=2,model=4 mesh spanning both processes."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jaxlens  # noqa: E402
import jaxlens.distributed as D  # noqa: E402
from jax.experimental import multihost_utils as mu  # noqa: E402
from jaxlens.assets import model_dir  # noqa: E402

TOKS = np.array([[0, 5, 9, 30, 2, 7, 100, 44], [0, 17, 250, 8, 4, 61, 62, 63], [0, 1, 2, 3, 4, 5, 6, 7]], np.int32)


def main(pid: int, port: str, out: str) -> None:
    D.initialize(f"127.0.0.1:{port}", 2, pid)
    jax.config.update("jax_default_matmul_precision", "highest")
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    m = jaxlens.from_pretrained(model_dir(), mesh="data=2,model=4")
    logits, cache = m.run_with_cache(TOKS, names_filter=None)
    got = {"logits": logits, "pattern": cache["blocks.1.attn.hook_pattern"], "resid": cache["blocks.0.hook_resid_post"],
           "accumulated": cache.accumulated_resid(apply_ln=True)}
    got = {k: np.asarray(mu.process_allgather(v, tiled=True)) for k, v in got.items()}
    gen = m.generate(TOKS[:1], max_new_tokens=5, do_sample=False, verbose=False)
    got["generated"] = np.asarray(gen)  # generation's tokens come back to every process whole
    if pid == 0:
        np.savez(out, **got)
    mu.sync_global_devices("done")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
