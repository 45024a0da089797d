"""Forward and run_with_cache throughput on a GPT-2-small shape, jaxlens vs HF PyTorch vs TransformerLens.

Random weights, batch 8 x 128 tokens, f32 (or `--dtype bfloat16`: every side's weights in bf16,
like with like), interleaved in one process; prints the machine, tokens/s,
the ratios (or "noisy" when other processes shared the cores), and the compiled peak memory of a
patterns-only cache vs no cache. torch runs at its best (`common.torch_best`: threads = cores,
`inference_mode`; HF with sdpa attention).

    .venv/bin/python benchmarks/forward.py [--rounds 5] [--batch 8] [--seq 128] [--devices N] [--dtype bfloat16]
    .venv/bin/python benchmarks/forward.py --isolate [--isolate-runs 2]   # each side in its own process

--isolate runs the jaxlens side and the torch side (HF + TransformerLens) each in a fresh process,
alternating, to show the in-process ratios are not skewed by sharing one process.
--devices N shards the batch over N host devices (XLA_FLAGS must be set before jax starts,
so this script sets it itself).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import add_isolate_args  # noqa: E402

SIDES = ("jaxlens", "torch")
ap = argparse.ArgumentParser()
ap.add_argument("--rounds", type=int, default=5)
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--seq", type=int, default=128)
ap.add_argument("--devices", type=int, default=1)
ap.add_argument("--no-tl", action="store_true", help="skip TransformerLens")
ap.add_argument("--device", default="cpu", help="torch device (cuda on a GPU machine)")
ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="every side's weight dtype")
add_isolate_args(ap, SIDES)
args = ap.parse_args()
if args.devices > 1:
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"

import numpy as np  # noqa: E402

from common import (Quiet, emit_side, fmt_table, gpt2_small_dir, headline, interleaved, machine_report,  # noqa: E402
                    median, merge_times, run_isolated, torch_best)

HF, JL, JL_ALL, JL_PAT = ("HF PyTorch forward", "jaxlens forward", "jaxlens run_with_cache (all)",
                          "jaxlens run_with_cache (patterns)")
TL_ALL, TL_PAT = "TransformerLens run_with_cache (all)", "TransformerLens run_with_cache (patterns)"
RATIOS = ((JL, HF, "jaxlens forward vs HF forward"),
          (JL_ALL, TL_ALL, "jaxlens run_with_cache(all) vs TL run_with_cache(all) (target >= 1.3x)"),
          (JL_PAT, TL_PAT, "jaxlens patterns vs TL patterns"))


def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 50257, (args.batch, args.seq)).astype(np.int32)


def jaxlens_fns() -> tuple[dict, object]:
    """The jaxlens runs, and a function printing their compiled memory."""
    import jax
    import jax.numpy as jnp

    import jaxlens
    from jaxlens.model.forward import forward_jit

    model = jaxlens.from_pretrained_no_processing(gpt2_small_dir(), args.dtype, precision=None)
    toks = jnp.asarray(tokens())
    mask = jnp.ones_like(toks)
    if args.devices > 1:
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

        mesh = Mesh(np.array(jax.devices()[: args.devices]), ("batch",))
        toks = jax.device_put(toks, NamedSharding(mesh, P("batch")))
        mask = jax.device_put(mask, NamedSharding(mesh, P("batch")))
        model.params = jax.device_put(model.params, NamedSharding(mesh, P()))
    cfg = model.cfg
    every = jaxlens.resolve_names(None, cfg)
    pats = jaxlens.resolve_names(lambda n: n.endswith("hook_pattern"), cfg)

    def jl(capture):
        def run():
            jax.block_until_ready(forward_jit(model.params, cfg, toks, mask, capture=capture))
        return run

    def memory() -> None:
        def peak(capture):
            ma = forward_jit.lower(model.params, cfg, toks, mask, capture=capture).compile().memory_analysis()
            return ma.temp_size_in_bytes + ma.output_size_in_bytes + ma.argument_size_in_bytes

        p0, p1, p2 = peak(frozenset()), peak(pats), peak(every)
        print(f"\ncompiled memory (arguments + temps + outputs, memory_analysis): no cache {p0 / 2**20:.0f} MiB, "
              f"patterns only {p1 / 2**20:.0f} MiB ({p1 / p0:.3f}x, target <= 1.15x), all hooks {p2 / 2**20:.0f} MiB")

    return {JL: jl(frozenset()), JL_ALL: jl(every), JL_PAT: jl(pats)}, memory


def torch_fns() -> dict:
    """HF PyTorch's forward and TransformerLens's run_with_cache, at their best configuration."""
    import torch
    import transformers

    dev = args.device
    path = gpt2_small_dir()
    torch_best()  # threads = cores before anything runs
    dtype = getattr(torch, args.dtype)
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(path), attn_implementation="sdpa").eval().to(dev, dtype)
    toks_t = torch.tensor(tokens(), dtype=torch.long, device=dev)
    sync = (lambda: torch.cuda.synchronize()) if dev.startswith("cuda") else (lambda: None)

    def hf_fwd():
        with torch_best():
            hf(toks_t).logits
        sync()

    fns = {HF: hf_fwd}
    if not args.no_tl:
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers(str(path), device=dev, dtype=dtype)
        bridge.enable_compatibility_mode(no_processing=True)

        def tl(names_filter):
            def run():
                with torch_best():
                    bridge.run_with_cache(toks_t, names_filter=names_filter)
                sync()
            return run

        fns[TL_ALL] = tl(None)
        fns[TL_PAT] = tl(lambda n: n.endswith("hook_pattern"))
    return fns


def report(med: dict[str, float], quiet: Quiet | bool, how: str) -> None:
    ntok = args.batch * args.seq
    rows = [[k, f"{v * 1e3:.0f}", f"{ntok / v:,.0f}"] for k, v in med.items()]
    print(f"\nGPT-2-small shape, random weights, batch {args.batch}x{args.seq}, {args.dtype} on every side, {how}\n")
    print(fmt_table(rows, ["run", "ms (median)", "tokens/s"]))
    print("\nratios (>1 means jaxlens faster):")
    for ours, theirs, label in RATIOS:
        if ours in med and theirs in med:
            print("  " + headline(label, med[theirs] / med[ours], quiet))


def side(name: str) -> None:
    """One side in this process (a `--isolate` subprocess): time its runs, emit them as JSON."""
    fns = jaxlens_fns()[0] if name == "jaxlens" else torch_fns()
    with Quiet() as q:
        times = interleaved(fns, rounds=args.rounds, warmup=1)
    emit_side({"times": times, "quiet": q.as_dict(), "machine": machine_report()})


def main() -> None:
    if args.side:
        return side(args.side)
    print(machine_report())
    if args.isolate:
        with Quiet() as q:
            res = run_isolated(__file__, SIDES, sys.argv[1:], runs=args.isolate_runs)
        med = {**merge_times(res["torch"]), **merge_times(res["jaxlens"])}
        for s, rs in res.items():
            print(f"{s} side {rs[0]['machine'].splitlines()[2]}")
            per = ", ".join(f"{r['process_wall_s']:.0f} s wall / {r['maxrss_mib']:.0f} MiB peak" for r in rs)
            print(f"{s} processes: {per}")
        noisy = q.noisy or any(r["quiet"]["noisy"] for rs in res.values() for r in rs)
        report(med, q if q.noisy else noisy, f"--isolate: {args.isolate_runs} processes per side, alternating, "
               f"{args.rounds} rounds each (median of process medians)")
        print(f"\n{q.summary()}")
        return
    jl, memory = jaxlens_fns()
    fns = {**torch_fns(), **jl}
    import jax

    print(machine_report().splitlines()[2])  # the thread counts, now that torch and jax are loaded

    with Quiet() as q:
        times = interleaved(fns, rounds=args.rounds, warmup=1)
    report({k: median(v) for k, v in times.items()}, q,
           f"{args.rounds} interleaved rounds in one process (median), jax devices: {args.devices} x "
           f"{jax.devices()[0].platform}, torch device {args.device}")
    print(f"\n{q.summary()}")
    memory()


if __name__ == "__main__":
    main()
