"""Forward and run_with_cache throughput on a GPT-2-small shape, jaxlens vs HF PyTorch vs TransformerLens.

Random weights, batch 8 x 128 tokens, f32, interleaved in one process; prints tokens/s, the
ratios, and the compiled peak memory of a patterns-only cache vs no cache.

    .venv/bin/python benchmarks/forward.py [--rounds 5] [--batch 8] [--seq 128] [--devices N]

--devices N shards the batch over N host devices (XLA_FLAGS must be set before jax starts,
so this script sets it itself); the brief measured torch parity with 2 (one per core).
"""

from __future__ import annotations

import argparse
import os
import sys

ap = argparse.ArgumentParser()
ap.add_argument("--rounds", type=int, default=5)
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--seq", type=int, default=128)
ap.add_argument("--devices", type=int, default=1)
ap.add_argument("--no-tl", action="store_true", help="skip TransformerLens")
ap.add_argument("--device", default="cpu", help="torch device (cuda on a GPU machine)")
args = ap.parse_args()
if args.devices > 1:
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"

sys.path.insert(0, os.path.dirname(__file__))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import jaxlens  # noqa: E402
from common import fmt_table, gpt2_small_dir, interleaved, median  # noqa: E402
from jaxlens.model.forward import forward_jit  # noqa: E402


def main() -> None:
    path = gpt2_small_dir()
    B, T = args.batch, args.seq
    rng = np.random.default_rng(0)
    toks_np = rng.integers(0, 50257, (B, T)).astype(np.int32)
    dev = args.device

    hf = __import__("transformers").GPT2LMHeadModel.from_pretrained(str(path)).eval().to(dev)
    toks_t = torch.tensor(toks_np, dtype=torch.long, device=dev)
    sync = (lambda: torch.cuda.synchronize()) if dev.startswith("cuda") else (lambda: None)

    model = jaxlens.from_pretrained_no_processing(path, precision=None)
    toks = jnp.asarray(toks_np)
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
            out = forward_jit(model.params, cfg, toks, mask, capture=capture)
            jax.block_until_ready(out)
        return run

    def hf_fwd():
        with torch.no_grad():
            hf(toks_t).logits
        sync()

    fns = {"HF PyTorch forward": hf_fwd, "jaxlens forward": jl(frozenset()),
           "jaxlens run_with_cache (all)": jl(every), "jaxlens run_with_cache (patterns)": jl(pats)}
    if not args.no_tl:
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers(str(path), device=dev, dtype=torch.float32)
        bridge.enable_compatibility_mode(no_processing=True)

        def tl(names_filter):
            def run():
                with torch.no_grad():
                    bridge.run_with_cache(toks_t, names_filter=names_filter)
                sync()
            return run

        fns["TransformerLens run_with_cache (all)"] = tl(None)
        fns["TransformerLens run_with_cache (patterns)"] = tl(lambda n: n.endswith("hook_pattern"))

    times = interleaved(fns, rounds=args.rounds, warmup=1)
    med = {k: median(v) for k, v in times.items()}
    ntok = B * T
    rows = [[k, f"{med[k] * 1e3:.0f}", f"{ntok / med[k]:,.0f}"] for k in fns]
    print(f"\nGPT-2-small shape, random weights, batch {B}x{T}, f32, {args.rounds} interleaved rounds "
          f"(median), jax devices: {args.devices} x {jax.devices()[0].platform}, torch device {dev}\n")
    print(fmt_table(rows, ["run", "ms (median)", "tokens/s"]))

    def ratio(a, b):
        return med[b] / med[a]

    print("\nratios (>1 means jaxlens faster):")
    print(f"  jaxlens forward vs HF forward:                         {ratio('jaxlens forward', 'HF PyTorch forward'):.2f}x")
    if not args.no_tl:
        print(f"  jaxlens run_with_cache(all) vs TL run_with_cache(all): "
              f"{ratio('jaxlens run_with_cache (all)', 'TransformerLens run_with_cache (all)'):.2f}x  (target >= 1.2x)")
        print(f"  jaxlens patterns vs TL patterns:                       "
              f"{ratio('jaxlens run_with_cache (patterns)', 'TransformerLens run_with_cache (patterns)'):.2f}x")

    def peak(capture):
        ma = forward_jit.lower(model.params, cfg, toks, mask, capture=capture).compile().memory_analysis()
        return ma.temp_size_in_bytes + ma.output_size_in_bytes + ma.argument_size_in_bytes

    p0, p1, p2 = peak(frozenset()), peak(pats), peak(every)
    print(f"\ncompiled memory (arguments + temps + outputs, memory_analysis): no cache {p0 / 2**20:.0f} MiB, "
          f"patterns only {p1 / 2**20:.0f} MiB ({p1 / p0:.3f}x, target <= 1.15x), all hooks {p2 / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
