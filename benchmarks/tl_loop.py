"""A patching loop written TransformerLens's way, on the shipped model: jaxlens vs TransformerLens.

The notebook idiom: for each layer and position, a fresh `functools.partial(hook, pos=p)` patches
the clean residual stream into the corrupted run, then the logit difference is read with
`.item()` / `float()`. And a head-ablation loop whose hook reads the loop variable as a global.
jaxlens keys compiled programs by what the hook reads (`jaxlens.fingerprint`), so each loop
compiles one program; before that fix the partial loop recompiled every call and the global loop
returned stale results.

TransformerLens runs a `TransformerBridge` of the same checkpoint in compatibility mode (its
processed weights, as `HookedTransformer.from_pretrained`), under `torch.inference_mode`, with
torch's threads = cores (`common.torch_best`). Run on a quiet machine: the machine and the load
are printed, and the ratio is withheld ("noisy") when other processes took more than ~10% of the
cores (`common.Quiet`).

    .venv/bin/python benchmarks/tl_loop.py [--rounds 3]
    .venv/bin/python benchmarks/tl_loop.py --isolate [--isolate-runs 2]   # each side in its own process
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import (Quiet, add_isolate_args, emit_side, headline, machine_report, median, merge_times,  # noqa: E402
                    run_isolated, torch_best)

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
HEAD = 0  # read by the head-ablation hooks as a global, as in TransformerLens's demos


def jaxlens_side():
    import jax.numpy as jnp

    import jaxlens
    from jaxlens.assets import model_dir

    model = jaxlens.HookedTransformer.from_pretrained(model_dir())
    clean, corrupt = model.to_tokens(CLEAN), model.to_tokens(CORRUPT)
    mary, john = model.to_single_token(" Mary"), model.to_single_token(" John")
    _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("resid_pre"))

    def patch(resid, hook, pos, name):
        return resid.at[:, pos].set(cache[name][:, pos])

    def ablate(z, hook):
        return z.at[:, :, HEAD].set(0.0)

    def patching_loop():
        out = np.zeros((model.cfg.n_layers, clean.shape[1]))
        for layer in range(model.cfg.n_layers):
            for pos in range(clean.shape[1]):
                name = f"blocks.{layer}.hook_resid_pre"
                logits = model.run_with_hooks(corrupt, fwd_hooks=[(name, functools.partial(patch, pos=pos, name=name))])
                out[layer, pos] = float(logits[0, -1, mary] - logits[0, -1, john])
        return out

    def ablation_loop():
        global HEAD
        out = []
        for layer in range(model.cfg.n_layers):
            for HEAD in range(model.cfg.n_heads):
                loss = model.run_with_hooks(clean, return_type="loss",
                                            fwd_hooks=[(f"blocks.{layer}.attn.hook_z", ablate)])
                out.append(float(loss))
        return np.asarray(out)

    _ = jnp.zeros(())
    return patching_loop, ablation_loop


def tl_side():
    import torch
    from transformer_lens.model_bridge import TransformerBridge

    from jaxlens.assets import model_dir

    torch_best()  # threads = cores
    bridge = TransformerBridge.boot_transformers(str(model_dir()), device="cpu", dtype=torch.float32)
    bridge.enable_compatibility_mode()
    clean, corrupt = bridge.to_tokens(CLEAN), bridge.to_tokens(CORRUPT)
    mary, john = bridge.to_single_token(" Mary"), bridge.to_single_token(" John")
    with torch_best():
        _, cache = bridge.run_with_cache(clean, names_filter=lambda n: n.endswith("resid_pre"))

    def patch(resid, hook, pos, name):  # the bridge's hook.name is an alias (blocks.0.hook_in)
        resid[:, pos] = cache[name][:, pos]
        return resid

    def ablate(z, hook):
        z[:, :, HEAD] = 0.0
        return z

    def patching_loop():
        out = np.zeros((bridge.cfg.n_layers, clean.shape[1]))
        with torch_best():
            for layer in range(bridge.cfg.n_layers):
                for pos in range(clean.shape[1]):
                    name = f"blocks.{layer}.hook_resid_pre"
                    logits = bridge.run_with_hooks(corrupt, fwd_hooks=[(name, functools.partial(patch, pos=pos,
                                                                                                name=name))])
                    out[layer, pos] = (logits[0, -1, mary] - logits[0, -1, john]).item()
        return out

    def ablation_loop():
        global HEAD
        out = []
        with torch_best():
            for layer in range(bridge.cfg.n_layers):
                for HEAD in range(bridge.cfg.n_heads):
                    loss = bridge.run_with_hooks(clean, return_type="loss",
                                                 fwd_hooks=[(f"blocks.{layer}.attn.hook_z", ablate)])
                    out.append(loss.item())
        return np.asarray(out)

    return patching_loop, ablation_loop


LOOPS = ("patching loop (partial per call)", "head-ablation loop (global head)")
SIDES = ("jaxlens", "tl")


def setup(side: str) -> tuple[list, float]:
    """A side's two loops, and the wall time of its first patching loop (jaxlens: compiling
    one program per layer; TransformerLens: its first hooked runs)."""
    fns = jaxlens_side() if side == "jaxlens" else tl_side()
    t0 = time.perf_counter()
    fns[0]()
    return fns, time.perf_counter() - t0


def measure(sides: dict[str, list], rounds: int) -> tuple[dict, dict, Quiet]:
    """Each loop: every side warmed, then `rounds` rounds alternating the sides; seconds of each
    round per side and loop, and each side's last results (for the cross-check)."""
    times = {s: {n: [] for n in LOOPS} for s in sides}
    outs: dict[str, dict] = {s: {} for s in sides}
    with Quiet() as q:
        for i, name in enumerate(LOOPS):
            for fns in sides.values():
                fns[i]()  # warm
            for _ in range(rounds):
                for s, fns in sides.items():
                    t0 = time.perf_counter()
                    out = fns[i]()
                    times[s][name].append(time.perf_counter() - t0)
                    outs[s][name] = np.asarray(out).tolist()
    return times, outs, q


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    add_isolate_args(ap, SIDES)
    args = ap.parse_args()
    if args.side:
        fns, first = setup(args.side)
        times, outs, q = measure({args.side: fns}, args.rounds)
        return emit_side({"times": times[args.side], "out": outs[args.side], "first_s": first,
                          "quiet": q.as_dict(), "machine": machine_report()})
    print(machine_report())
    if args.isolate:
        with Quiet() as q:
            res = run_isolated(__file__, SIDES, sys.argv[1:], runs=args.isolate_runs)
        jl, tl = merge_times(res["jaxlens"]), merge_times(res["tl"])
        outs = {s: res[s][-1]["out"] for s in SIDES}
        first = res["jaxlens"][0]["first_s"]
        noisy = q.noisy or any(r["quiet"]["noisy"] for rs in res.values() for r in rs)
        how = f"--isolate: {args.isolate_runs} processes per side, alternating, {args.rounds} rounds each"
    else:
        (jl_fns, first), (tl_fns, _) = setup("jaxlens"), setup("tl")
        print(machine_report().splitlines()[2])  # the thread counts, now that torch and jax are loaded
        times, outs, q = measure({"jaxlens": jl_fns, "tl": tl_fns}, args.rounds)
        jl, tl = ({k: median(v) for k, v in times[s].items()} for s in SIDES)
        noisy = q.noisy
        how = f"one process, {args.rounds} rounds alternating (median)"
    print(f"jaxlens first patching loop (compiles one program per layer): {first:.2f} s")
    print(f"\n{how}")
    for name in LOOPS:
        diff = float(np.abs(np.asarray(outs["jaxlens"][name]) - np.asarray(outs["tl"][name])).max())
        print(f"{name}: jaxlens {jl[name]:.3f} s, TransformerLens {tl[name]:.3f} s, max |diff| {diff:.1e}")
    print(q.summary())
    for name in LOOPS:
        print("  " + headline(f"{name}: jaxlens / TransformerLens time", jl[name] / tl[name],
                              q if q.noisy else noisy, unit="x TransformerLens's time"))


if __name__ == "__main__":
    main()
