"""A patching loop written TransformerLens's way, on the shipped model: jaxlens vs TransformerLens.

The notebook idiom: for each layer and position, a fresh `functools.partial(hook, pos=p)` patches
the clean residual stream into the corrupted run, then the logit difference is read with
`.item()` / `float()`. And a head-ablation loop whose hook reads the loop variable as a global.
jaxlens keys compiled programs by what the hook reads (`jaxlens.fingerprint`), so each loop
compiles one program; before that fix the partial loop recompiled every call and the global loop
returned stale results.

TransformerLens runs a `TransformerBridge` of the same checkpoint in compatibility mode (its
processed weights, as `HookedTransformer.from_pretrained`), under `torch.inference_mode`, with
torch's threads = cores. Run on a quiet machine: the load average is printed before and after,
and the ratio is withheld ("noisy") when other processes took more than ~10% of the cores.

    .venv/bin/python benchmarks/tl_loop.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
HEAD = 0  # read by the head-ablation hooks as a global, as in TransformerLens's demos


def machine() -> str:
    import jax
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return (f"{cpu}, {os.cpu_count()} cores; python {platform.python_version()}, jax {jax.__version__}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads)")


def loadavg() -> str:
    return open("/proc/loadavg").read().split()[0]


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

    torch.set_num_threads(os.cpu_count() or 1)
    bridge = TransformerBridge.boot_transformers(str(model_dir()), device="cpu", dtype=torch.float32)
    bridge.enable_compatibility_mode()
    clean, corrupt = bridge.to_tokens(CLEAN), bridge.to_tokens(CORRUPT)
    mary, john = bridge.to_single_token(" Mary"), bridge.to_single_token(" John")
    with torch.inference_mode():
        _, cache = bridge.run_with_cache(clean, names_filter=lambda n: n.endswith("resid_pre"))

    def patch(resid, hook, pos, name):  # the bridge's hook.name is an alias (blocks.0.hook_in)
        resid[:, pos] = cache[name][:, pos]
        return resid

    def ablate(z, hook):
        z[:, :, HEAD] = 0.0
        return z

    def patching_loop():
        out = np.zeros((bridge.cfg.n_layers, clean.shape[1]))
        with torch.inference_mode():
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
        with torch.inference_mode():
            for layer in range(bridge.cfg.n_layers):
                for HEAD in range(bridge.cfg.n_heads):
                    loss = bridge.run_with_hooks(clean, return_type="loss",
                                                 fwd_hooks=[(f"blocks.{layer}.attn.hook_z", ablate)])
                    out.append(loss.item())
        return np.asarray(out)

    return patching_loop, ablation_loop


def timed(fn, rounds: int) -> tuple[float, float, object]:
    """(median wall seconds, share of the cores this process used, last result)."""
    walls, cpus, out = [], [], None
    for _ in range(rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return float(np.median(walls)), float(np.median(cpus) / np.median(walls)), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print("machine:", machine())
    print("load average before:", loadavg())
    jl_patch, jl_ablate = jaxlens_side()
    tl_patch, tl_ablate = tl_side()
    t0 = time.perf_counter()
    first = jl_patch()
    print(f"jaxlens first patching loop (compiles {len(first)} layer programs): {time.perf_counter() - t0:.2f} s")
    rows = []
    for name, jl_fn, tl_fn in (("patching loop (partial per call)", jl_patch, tl_patch),
                               ("head-ablation loop (global head)", jl_ablate, tl_ablate)):
        jl_fn(), tl_fn()  # warm
        jl_t, jl_busy, jl_out = timed(jl_fn, args.rounds)
        tl_t, tl_busy, tl_out = timed(tl_fn, args.rounds)
        diff = float(np.abs(np.asarray(jl_out) - np.asarray(tl_out)).max())
        rows.append((name, jl_t, tl_t, diff))
        print(f"{name}: jaxlens {jl_t:.3f} s, TransformerLens {tl_t:.3f} s, max |diff| {diff:.1e}")
    load = float(loadavg())
    quiet = load <= (os.cpu_count() or 1) + 0.25  # the benchmark alone keeps the cores busy, no more
    print("load average after:", loadavg())
    for name, jl_t, tl_t, _ in rows:
        ratio = f"{jl_t / tl_t:.2f}x TransformerLens's time" if quiet else "noisy (machine not quiet)"
        print(f"  {name}: jaxlens / TransformerLens = {ratio}")


if __name__ == "__main__":
    main()
