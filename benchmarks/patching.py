"""Activation-patching grids: jaxlens vs TransformerLens, same process; and attribution patching.

GPT-2-small shape with random weights, one clean / corrupted prompt pair of 32 tokens, metric =
logit difference at the last position. Grids (`--grid`, default both):
  resid_pre     every layer × position of resid_pre (12 × 32 = 384 patched runs), vs
                TransformerLens's `get_act_patch_resid_pre`;
  head_out      every layer × head of z over all positions (12 × 12 = 144), vs
                `get_act_patch_attn_head_out_all_pos`.
TransformerLens runs on a TransformerBridge of the same HF checkpoint (one hooked forward per
cell, torch at its best: threads = cores, inference_mode); jaxlens runs each cell's causal suffix
only (layers >= l, positions >= p, the corrupted run's KV cache before it, two cells' suffixes per
packed sequence, logits at the metric's position), cells vmapped. The grids are checked to agree, then timed
interleaved. Printed: the machine and load, medians, cells/s, the ratio (or "noisy" when other
processes shared the cores), the number of compiled programs, the first jaxlens call
(compilation included) vs later calls, and attribution patching's cells/s (one forward and one
backward score every resid_pre cell of the grid at once).

    .venv/bin/python benchmarks/patching.py [--grid resid_pre,head_out] [--rounds 3] [--seq 32]
        [--layers 0,11] [--chunk N] [--windows 0,0.5,0.75] [--shape 12x768x12] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--grid", default="resid_pre,head_out", help="comma-separated: resid_pre, head_out")
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--seq", type=int, default=32)
ap.add_argument("--device", default="cpu", help="torch device for TransformerLens (cuda on a GPU machine)")
ap.add_argument("--chunk", type=int, default=None, help="jaxlens chunk_size (patched runs vmapped at once)")
ap.add_argument("--precision", default="highest", help="jaxlens matmul precision (highest = true f32, as torch)")
ap.add_argument("--layers", default=None,
                help="comma-separated layers to patch (default all); e.g. 0,11 keeps the mean suffix depth of the "
                     "full grid (6.5 layers) when a slow CPU cannot afford TransformerLens's 384 runs per round")
ap.add_argument("--windows", default=None,
                help="suffix window starts as fractions of the prompt (default jaxlens's WINDOW_FRACTIONS)")
ap.add_argument("--shape", default="12x768x12", help="layers x d_model x heads of the random GPT-2 (smaller: a "
                                                     "quick proof that the script runs)")
ap.add_argument("--no-attribution", action="store_true", help="skip timing attribution patching")
args = ap.parse_args()
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch; measure real use
os.environ.setdefault("TQDM_DISABLE", "1")  # TransformerLens's per-cell progress bar

sys.path.insert(0, os.path.dirname(__file__))
import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import jaxlens  # noqa: E402
from common import (Quiet, fmt_table, gpt2_small_dir, headline, interleaved, machine_report, median,  # noqa: E402
                    peak_rss_mib, torch_best)
from jaxlens.edits import gradients, patching  # noqa: E402

ANSWER, WRONG = 11, 12
GRIDS = {  # name: (hook suffix, jaxlens / TransformerLens function name, TL patch setter, cells per layer)
    "resid_pre": ("hook_resid_pre", "get_act_patch_resid_pre", "layer_pos_patch_setter", "seq"),
    "head_out": ("hook_z", "get_act_patch_attn_head_out_all_pos", "layer_head_vector_patch_setter", "heads"),
}


def jl_metric(logits):
    return logits[:, -1, ANSWER].mean() - logits[:, -1, WRONG].mean()


def tl_metric(logits):
    return logits[:, -1, ANSWER].mean() - logits[:, -1, WRONG].mean()


def main() -> None:
    grids = [g.strip() for g in args.grid.split(",") if g.strip()]
    bad = [g for g in grids if g not in GRIDS]
    if bad:
        raise SystemExit(f"--grid: unknown {bad}; choose from {list(GRIDS)}")
    if args.windows is not None:
        patching.WINDOW_FRACTIONS = tuple(float(x) for x in args.windows.split(","))
    n_layer, n_embd, n_head = (int(x) for x in args.shape.split("x"))
    path = gpt2_small_dir(n_layer=n_layer, n_embd=n_embd, n_head=n_head)
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 50257, (1, args.seq)).astype(np.int32)
    corrupt = clean.copy()
    corrupt[0, [3, args.seq // 2, args.seq - 4]] = rng.integers(0, 50257, 3)
    dev = args.device
    sync = (lambda: torch.cuda.synchronize()) if dev.startswith("cuda") else (lambda: None)
    torch_best()  # threads = cores before anything runs

    from transformer_lens import patching as tlp
    from transformer_lens.model_bridge import TransformerBridge

    keep = lambda n: n.endswith(("hook_resid_pre", "hook_z"))  # noqa: E731
    bridge = TransformerBridge.boot_transformers(str(path), device=dev, dtype=torch.float32)
    bridge.enable_compatibility_mode(no_processing=True)
    clean_t = torch.tensor(clean, dtype=torch.long, device=dev)
    corrupt_t = torch.tensor(corrupt, dtype=torch.long, device=dev)
    with torch_best():
        _, tl_cache = bridge.run_with_cache(clean_t, names_filter=keep)

    model = jaxlens.from_pretrained_no_processing(path, precision=args.precision)
    _, jl_cache = model.run_with_cache(clean, names_filter=keep)
    print(machine_report())
    layers = None if args.layers is None else [int(x) for x in args.layers.split(",")]
    rows = list(range(model.cfg.n_layers)) if layers is None else layers
    table = []
    for g in grids:
        table.append(bench_grid(g, model, bridge, tlp, corrupt, corrupt_t, jl_cache, tl_cache, layers, rows, sync))
    if not args.no_attribution:
        table.append(bench_attribution(model, clean, corrupt))
    print(fmt_table(table, ["", "median s / grid", "cells / s", "vs TransformerLens"]))
    print(f"process peak RSS: {peak_rss_mib():.0f} MiB; jax backend: {jax.devices()[0].platform}; torch device: "
          f"{dev}; rounds: {args.rounds}; pattern grids' window starts for {args.seq} positions: {patching.window_starts(args.seq)}")


def bench_grid(g, model, bridge, tlp, corrupt, corrupt_t, jl_cache, tl_cache, layers, rows, sync) -> list[str]:
    _, fn_name, setter, per_layer = GRIDS[g]
    jl_fn, tl_fn = getattr(patching, fn_name), getattr(tlp, fn_name)
    n_per = args.seq if per_layer == "seq" else model.cfg.n_heads
    index_df = __import__("pandas").DataFrame([(l, i) for l in rows for i in range(n_per)],
                                              columns=["layer", "pos" if per_layer == "seq" else "head"])

    def run_jl():
        out = jl_fn(model, corrupt, jl_cache, jl_metric, chunk_size=args.chunk, layers=layers)
        return np.asarray(jax.block_until_ready(out))[rows]

    def run_tl():
        with torch_best():
            if layers is None:
                out = tl_fn(bridge, corrupt_t, tl_cache, tl_metric)
            else:  # the same function on a subset of cells (TransformerLens's index_df form)
                act = "resid_pre" if g == "resid_pre" else "z"
                out = tlp.generic_activation_patch(bridge, corrupt_t, tl_cache, tl_metric, getattr(tlp, setter), act,
                                                   index_df=index_df).reshape(len(rows), n_per)
        sync()
        return out.cpu().numpy()

    programs_now = lambda: patching._suffix_grid._cache_size() + patching._packed_grid._cache_size()  # noqa: E731
    before = programs_now()
    t0 = time.perf_counter()
    jl_grid = run_jl()
    first = time.perf_counter() - t0
    programs = programs_now() - before
    t0 = time.perf_counter()
    run_jl()
    second = time.perf_counter() - t0
    tl_grid = run_tl()
    diff = float(np.abs(jl_grid - tl_grid).max())
    print(f"\n[{g}] grid {jl_grid.shape} (layers {rows}): max |jaxlens - TransformerLens| = {diff:.2e} (metric range "
          f"{jl_grid.min():.3f} .. {jl_grid.max():.3f})")
    print(f"[{g}] jaxlens compiled {programs} programs; first call {first:.2f} s (compiling), second {second:.3f} s")
    with Quiet() as q:
        times = interleaved({"jaxlens": run_jl, "TransformerLens": run_tl}, rounds=args.rounds, warmup=0)
    jl, tl = median(times["jaxlens"]), median(times["TransformerLens"])
    print(f"[{g}] {q.summary()}")
    print(f"[{g}] " + headline(f"speed-up jaxlens over TransformerLens {fn_name}", tl / jl, q))
    n = jl_grid.size
    return [f"jaxlens {fn_name} (TL: {tl:.3f} s, {n / tl:.1f} cells/s)", f"{jl:.3f}", f"{n / jl:.1f}",
            "noisy" if q.noisy else f"{tl / jl:.2f}x"]


def bench_attribution(model, clean, corrupt) -> list[str]:
    """Attribution patching of every resid_pre cell (layers × positions) from one forward + one
    backward at the corrupted run and one forward at the clean run."""
    keep = lambda n: n.endswith("hook_resid_pre")  # noqa: E731

    def run():
        scores = gradients.attribution_patching(model, clean, corrupt, jl_metric, keep)
        return jax.block_until_ready([scores[k] for k in scores.keys()])

    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    with Quiet() as q:
        times = [_timed(run) for _ in range(max(args.rounds, 1))]
    t = median(times)
    n = model.cfg.n_layers * args.seq
    print(f"\n[attribution] {n} resid_pre cells; first call {first:.2f} s (compiling); {q.summary()}")
    return ["jaxlens attribution_patching (resid_pre, all cells)", f"{t:.4f}", f"{n / t:.0f}", "-"]


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
