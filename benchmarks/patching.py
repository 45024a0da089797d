"""Activation-patching grid: jaxlens vs TransformerLens's `get_act_patch_resid_pre`, same process.

GPT-2-small shape with random weights, one clean / corrupted prompt pair of 32 tokens, metric =
logit difference at the last position, every layer × position of resid_pre (12 × 32 = 384
patched runs). TransformerLens runs on a TransformerBridge of the same HF checkpoint (its
patching module loops over cells, one hooked forward each); jaxlens runs one vmapped program
per layer that starts at the patched layer. The two grids are checked to agree, then timed
interleaved; prints medians, the ratio, the first jaxlens call (compilation included) and
peak memory.

    .venv/bin/python benchmarks/patching.py [--rounds 3] [--seq 32] [--device cpu|cuda] [--chunk N]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--seq", type=int, default=32)
ap.add_argument("--device", default="cpu", help="torch device for TransformerLens (cuda on a GPU machine)")
ap.add_argument("--chunk", type=int, default=None, help="jaxlens chunk_size (patched runs vmapped at once)")
ap.add_argument("--precision", default="highest", help="jaxlens matmul precision (highest = true f32, as torch)")
ap.add_argument("--layers", default=None,
                help="comma-separated layers to patch (default all); e.g. 0,11 keeps the mean suffix depth of the "
                     "full grid (6.5 layers) when a slow CPU cannot afford TransformerLens's 384 runs per round")
args = ap.parse_args()
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch; measure real use
os.environ.setdefault("TQDM_DISABLE", "1")  # TransformerLens's per-cell progress bar

sys.path.insert(0, os.path.dirname(__file__))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import jaxlens  # noqa: E402
from common import fmt_table, gpt2_small_dir, interleaved, median  # noqa: E402
from jaxlens.edits import patching  # noqa: E402

ANSWER, WRONG = 11, 12


def jl_metric(logits):
    return logits[:, -1, ANSWER].mean() - logits[:, -1, WRONG].mean()


def tl_metric(logits):
    return logits[:, -1, ANSWER].mean() - logits[:, -1, WRONG].mean()


def main() -> None:
    path = gpt2_small_dir()
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 50257, (1, args.seq)).astype(np.int32)
    corrupt = clean.copy()
    corrupt[0, [3, args.seq // 2, args.seq - 4]] = rng.integers(0, 50257, 3)
    dev = args.device
    sync = (lambda: torch.cuda.synchronize()) if dev.startswith("cuda") else (lambda: None)

    from transformer_lens import patching as tlp
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(path), device=dev, dtype=torch.float32)
    bridge.enable_compatibility_mode(no_processing=True)
    clean_t = torch.tensor(clean, dtype=torch.long, device=dev)
    corrupt_t = torch.tensor(corrupt, dtype=torch.long, device=dev)
    with torch.no_grad():
        _, tl_cache = bridge.run_with_cache(clean_t, names_filter=lambda n: n.endswith("hook_resid_pre"))

    model = jaxlens.from_pretrained_no_processing(path, precision=args.precision)
    _, jl_cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))

    layers = None if args.layers is None else [int(x) for x in args.layers.split(",")]
    rows = list(range(model.cfg.n_layers)) if layers is None else layers
    index_df = __import__("pandas").DataFrame([(l, p) for l in rows for p in range(args.seq)], columns=["layer", "pos"])

    def run_jl():
        out = patching.get_act_patch_resid_pre(model, corrupt, jl_cache, jl_metric, chunk_size=args.chunk,
                                               layers=layers)
        return np.asarray(jax.block_until_ready(out))[rows]

    def run_tl():
        with torch.no_grad():
            if layers is None:
                out = tlp.get_act_patch_resid_pre(bridge, corrupt_t, tl_cache, tl_metric)
            else:  # the same function on a subset of cells (TransformerLens's index_df form)
                out = tlp.generic_activation_patch(bridge, corrupt_t, tl_cache, tl_metric, tlp.layer_pos_patch_setter,
                                                   "resid_pre", index_df=index_df).reshape(len(rows), args.seq)
        sync()
        return out.cpu().numpy()

    t0 = time.perf_counter()
    jl_grid = run_jl()
    first_jl = time.perf_counter() - t0
    tl_grid = run_tl()
    diff = float(np.abs(jl_grid - tl_grid).max())
    print(f"grid {jl_grid.shape} (layers {rows}): max |jaxlens - TransformerLens| = {diff:.2e} (metric range "
          f"{jl_grid.min():.3f} .. {jl_grid.max():.3f})")

    times = interleaved({"jaxlens": run_jl, "TransformerLens": run_tl}, rounds=args.rounds, warmup=0)
    jl, tl = median(times["jaxlens"]), median(times["TransformerLens"])
    n = jl_grid.size
    rows = [["jaxlens (vmap per layer, prefix reused)", f"{jl:.3f}", f"{n / jl:.1f}", "1.0x"],
            ["TransformerLens get_act_patch_resid_pre", f"{tl:.3f}", f"{n / tl:.1f}", f"{tl / jl:.1f}x slower"]]
    print(fmt_table(rows, ["", "median s / grid", "patched runs / s", "vs jaxlens"]))
    print(f"speed-up jaxlens over TransformerLens: {tl / jl:.1f}x  (first jaxlens call incl. compiling "
          f"{len(rows)} layer programs: {first_jl:.1f} s)")

    jdev = jax.devices()[0]
    stats = jdev.memory_stats() if hasattr(jdev, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        print(f"jaxlens peak device memory: {stats['peak_bytes_in_use'] / 2**20:.0f} MiB on {jdev.device_kind}")
    else:
        print("jaxlens peak device memory: not reported by this backend; largest layer program's compiled temp:"
              f" {_largest_temp(model, corrupt, jl_cache) / 2**20:.0f} MiB")
    if dev.startswith("cuda"):
        print(f"TransformerLens peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    print(f"process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB; "
          f"jax backend: {jdev.platform} ({jdev.device_kind}); torch device: {dev}; rounds: {args.rounds}")


def _largest_temp(model, corrupt, cache) -> int:
    """Compiled temp-buffer size of the layer-0 program (the longest suffix)."""
    name = "blocks.0.hook_resid_pre"
    toks = jnp.asarray(corrupt)
    cells = jnp.arange(corrupt.shape[1], dtype=jnp.int32)[:, None]
    c = patching._layer_grid.lower(model.params, toks, jnp.ones_like(toks), cache[name], cache[name], cells,
                                   cfg=model.cfg, resid_name=name, name=name, axes=(1,), metric=jl_metric,
                                   precision=model.precision, chunk_size=args.chunk).compile()
    ma = c.memory_analysis()
    return int(ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes)


if __name__ == "__main__":
    main()
