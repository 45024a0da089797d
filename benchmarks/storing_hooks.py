"""Hooks that store values, TransformerLens's way, on a GPT-2-small shape: jaxlens vs TransformerLens.

Random weights, batch 1 x 16 tokens (`--batch`, `--seq`), f32, interleaved in one process.
Three ways to get every layer's attention pattern out of one forward:
  - a hook that stores (`store[hook.name] = pattern`), which jaxlens runs eagerly;
  - TransformerLens's caching hooks (`get_caching_hooks`), which jaxlens serves from its
    compiled capture;
  - `run_with_cache(names_filter=...)`, for reference;
each against TransformerLens 4.3's bridge running the same code (torch at its best:
`inference_mode`, threads = cores). Prints the machine, the load, the medians and the ratios
(or "noisy" when other processes shared the cores).

    .venv/bin/python benchmarks/storing_hooks.py [--rounds 7] [--batch 1] [--seq 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(__file__))
import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import jaxlens  # noqa: E402
from common import Quiet, fmt_table, gpt2_small_dir, headline, interleaved, machine_report, median, torch_best  # noqa: E402

PATTERN = lambda n: n.endswith("hook_pattern")  # noqa: E731


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=16)
    args = ap.parse_args()
    print(machine_report())
    path = gpt2_small_dir()
    toks = np.random.default_rng(0).integers(0, 50257, (args.batch, args.seq)).astype(np.int32)
    model = jaxlens.from_pretrained_no_processing(path, precision=None)
    torch_best()
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(path), device="cpu")
    bridge.enable_compatibility_mode(no_processing=True)
    toks_t = torch.tensor(toks, dtype=torch.long)
    warnings.filterwarnings("ignore", message=".*stores values")

    def jl_store():
        store = {}

        def keep(p, hook):
            store[hook.name] = p

        model.run_with_hooks(toks, fwd_hooks=[(PATTERN, keep)])
        jax.block_until_ready(store)

    def jl_caching():
        cache, fwd, _ = model.get_caching_hooks(PATTERN)
        model.run_with_hooks(toks, fwd_hooks=fwd)
        jax.block_until_ready(cache)

    def jl_cache():
        jax.block_until_ready(model.run_with_cache(toks, names_filter=PATTERN))

    def tl_store():
        store = {}

        def keep(p, hook):
            store[hook.name] = p

        with torch_best():
            bridge.run_with_hooks(toks_t, fwd_hooks=[(PATTERN, keep)])

    def tl_caching():
        with torch_best():
            cache, fwd, _ = bridge.get_caching_hooks(PATTERN)
            bridge.run_with_hooks(toks_t, fwd_hooks=fwd)

    def tl_cache():
        with torch_best():
            bridge.run_with_cache(toks_t, names_filter=PATTERN)

    fns = {"jaxlens storing hook (eager)": jl_store, "TL storing hook": tl_store,
           "jaxlens caching hooks (compiled)": jl_caching, "TL caching hooks": tl_caching,
           "jaxlens run_with_cache": jl_cache, "TL run_with_cache": tl_cache}
    with Quiet() as quiet:
        times = interleaved(fns, rounds=args.rounds)
    med = {k: median(v) for k, v in times.items()}
    rows = [[k, f"{med[k] * 1e3:.1f}"] for k in fns]
    print(f"\nGPT-2-small shape, random weights, {args.batch} x {args.seq} tokens, every layer's pattern; "
          f"medians of {args.rounds} interleaved rounds\n")
    print(fmt_table(rows, ["run", "ms (median)"]))
    print()
    for ours, theirs in (("jaxlens storing hook (eager)", "TL storing hook"),
                         ("jaxlens caching hooks (compiled)", "TL caching hooks"),
                         ("jaxlens run_with_cache", "TL run_with_cache")):
        print(headline(f"{ours} vs {theirs}", med[theirs] / med[ours], quiet))
    print(headline("jaxlens eager storing hook vs jaxlens compiled caching hooks (slowdown)",
                   med["jaxlens storing hook (eager)"] / med["jaxlens caching hooks (compiled)"], quiet))
    print("  " + quiet.summary())


if __name__ == "__main__":
    main()
