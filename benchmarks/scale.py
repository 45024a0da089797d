"""Scale-out figures (issue 13): loading straight into the shards vs whole-file, forward throughput
on 1 vs N devices, and long-sequence compiled memory with and without the blocked attention.

A random Llama-shaped checkpoint of about `--size-mb` (float32 on disk, HF `save_pretrained`,
safetensors) is built once under $JAXLENS_BENCH_DIR. Each measurement runs in a fresh process with
N simulated host devices (`--devices`, default 8), so each peak RSS is that mode's own (the
kernel's high-water mark, reset after the imports: /proc/self/clear_refs, VmHWM):

- `lazy`: `jaxlens.from_pretrained(path, mesh=--mesh)`: every parameter read (and converted,
  checked) only for the slices the devices hold, one parameter at a time; weight processing on
  the mesh.
- `whole`: the path before lazy loading: the whole checkpoint read into host memory
  (`conversion.load_any`), processed on the host, then placed on the mesh.

On CPU the simulated devices' buffers are host memory, so a loaded model costs its own size in RSS
whatever the mode; the issue's bound is "peak RSS above the process's baseline < model size +
the largest tensor". Then forward tokens/s with one device vs the mesh (interleaved), and the
temp memory XLA compiles for a 1 x `--long-seq` forward capturing nothing (blocked attention) vs
capturing one pattern (the plain [batch head query key] path).

    .venv/bin/python benchmarks/scale.py                      # ~1 GB, 8 devices, mesh model=8
    .venv/bin/python benchmarks/scale.py --size-mb 50 --rounds 1 --long-seq 2048   # a quick check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import CACHE, add_isolate_args, emit_side, fmt_table, interleaved, machine_report, median, \
    peak_rss_mib, run_isolated  # noqa: E402

SIDES = ("lazy", "whole", "forward", "memory")
MAX_POSITIONS = 32768  # n_ctx of the random checkpoint: --long-seq may be up to this
ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--size-mb", type=float, default=1000.0, help="checkpoint size (float32), MB")
ap.add_argument("--devices", type=int, default=8, help="simulated host devices per process")
ap.add_argument("--mesh", default="model=8", help="the mesh to load onto and run on")
ap.add_argument("--no-processing", action="store_true", help=argparse.SUPPRESS)  # set per load row by main()
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--seq", type=int, default=128)
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--long-seq", type=int, default=8192, help="sequence length of the compiled-memory comparison")
add_isolate_args(ap, SIDES)
args = ap.parse_args()
if not 1 <= args.long_seq <= MAX_POSITIONS:
    ap.error(f"--long-seq must be in 1..{MAX_POSITIONS}")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={args.devices}").strip()


def shape_for(size_mb: float) -> dict[str, int]:
    """A Llama shape of about `size_mb` MB in float32: width and vocabulary by size, then layers."""
    d, vocab, heads = (1024, 32000, 16) if size_mb >= 400 else (512, 8000, 16) if size_mb >= 40 else (256, 2000, 8)
    d_mlp = int(d * 2.75) // 64 * 64
    kv = heads // 2
    per_layer = d * d * 2 + 2 * d * (d // heads) * kv + 3 * d * d_mlp + 2 * d
    layers = max(2, round((size_mb * 1e6 / 4 - 2 * vocab * d) / per_layer))
    return dict(hidden_size=d, intermediate_size=d_mlp, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=MAX_POSITIONS)


def checkpoint() -> Path:
    """The random checkpoint (built once; torch only here, in the parent process)."""
    shape = shape_for(args.size_mb)
    path = CACHE / ("llama-random-" + "-".join(f"{v}" for v in shape.values()))
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**shape, tie_word_embeddings=False, torch_dtype="float32")
    with torch.no_grad():
        model = transformers.LlamaForCausalLM(cfg)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def file_stats(path: Path) -> tuple[int, int, str]:
    """(bytes on disk, bytes of the largest tensor, its name)."""
    from safetensors import safe_open

    total, big, name = 0, 0, ""
    for f in sorted(path.glob("*.safetensors")):
        total += f.stat().st_size
        with safe_open(str(f), "np") as h:
            for k in h.keys():
                n = math.prod(h.get_slice(k).get_shape()) * 4  # float32 checkpoints
                if n > big:
                    big, name = n, k
    return total, big, name


def _status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak() -> float:
    """Reset the kernel's peak-RSS mark (Linux: `5 > /proc/self/clear_refs`), so the imports' own
    transient peak does not hide the load's; returns the resident MiB now (the baseline)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_mib("VmRSS") or peak_rss_mib()


def side_load(path: Path, lazy: bool) -> dict:
    import jax

    import jaxlens

    jax.devices()  # the runtime up before the baseline
    base = reset_peak()
    flags = dict(fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False) \
        if args.no_processing else {}
    t0 = time.perf_counter()
    if lazy:
        m = jaxlens.from_pretrained(path, mesh=args.mesh, **flags)
    else:  # before lazy loading: everything on the host first, then placed
        from jaxlens.conversion import load_any
        from jaxlens.model.processing import process_params

        cfg, params = load_any(path)
        if not args.no_processing:
            params, cfg = process_params(params, cfg)
        m = jaxlens.HookedTransformer(cfg, params, mesh=args.mesh)
    jax.block_until_ready(m.params)
    load_s = time.perf_counter() - t0
    return {"load_s": load_s, "base_mib": base, "peak_mib": _status_mib("VmHWM") or peak_rss_mib()}


def side_forward(path: Path) -> dict:
    import jax
    import numpy as np

    import jaxlens

    one = jaxlens.from_pretrained(path)
    many = jaxlens.from_pretrained(path, mesh=args.mesh)
    toks = np.random.default_rng(0).integers(1, one.cfg.d_vocab, (args.batch, args.seq)).astype(np.int32)
    times = interleaved({"1 device": lambda: jax.block_until_ready(one(toks)),
                         f"mesh {args.mesh}": lambda: jax.block_until_ready(many(toks))}, rounds=args.rounds)
    return {"times": times}


def side_memory(path: Path) -> dict:
    """Compiled temp bytes of a 1 x long_seq forward: nothing captured vs one pattern captured (no
    parameters are allocated: the program is lowered from shapes)."""
    import jax
    import jax.numpy as jnp

    from jaxlens.conversion import hf_config
    from jaxlens.hooks import RunCtx
    from jaxlens.model import Transformer
    from jaxlens.model.forward import forward

    cfg = hf_config(path)
    toks = jax.ShapeDtypeStruct((1, args.long_seq), jnp.int32)
    small = jnp.zeros((1, 2), jnp.int32)
    params = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.PRNGKey(0), small, small, RunCtx())["params"])

    def temp(capture: frozenset) -> int:
        f = jax.jit(lambda p, t, m: forward(p, cfg, t, m, capture=capture)[0])
        return int(f.lower(params, toks, toks).compile().memory_analysis().temp_size_in_bytes)

    return {"blocked": temp(frozenset()), "plain": temp(frozenset({"blocks.0.attn.hook_pattern"}))}


def main() -> None:
    path = checkpoint()
    if args.side is not None:
        fn = {"lazy": lambda: side_load(path, True), "whole": lambda: side_load(path, False),
              "forward": lambda: side_forward(path), "memory": lambda: side_memory(path)}[args.side]
        emit_side(fn())
        return
    disk, big, big_name = file_stats(path)
    print(machine_report())
    print(f"\ncheckpoint {path}: {disk / 2**20:.0f} MiB on disk, largest tensor {big_name} {big / 2**20:.0f} MiB "
          f"(float32); {args.devices} simulated devices, mesh {args.mesh}\n")
    argv = [a for a in sys.argv[1:] if a not in ("--isolate", "--no-processing")]
    n_runs = args.isolate_runs if args.isolate else 1
    bound = (disk + big) / 2**20
    rows, verdicts = [], []
    for processing in (False, True):
        runs = run_isolated(__file__, ("lazy", "whole"), argv + ([] if processing else ["--no-processing"]), n_runs)
        for mode in ("lazy", "whole"):
            extra = median([r["peak_mib"] - r["base_mib"] for r in runs[mode]])
            rows.append([mode, "TL default" if processing else "none", f"{median([r['load_s'] for r in runs[mode]]):.2f}",
                         f"{median([r['base_mib'] for r in runs[mode]]):.0f}",
                         f"{median([r['peak_mib'] for r in runs[mode]]):.0f}", f"{extra:.0f}"])
            if mode == "lazy":
                verdicts.append(f"lazy, processing {'TL default' if processing else 'none'}: {extra:.0f} MiB "
                                f"{'within' if extra < bound else 'ABOVE'} model + largest tensor = {bound:.0f} MiB")
    print(fmt_table(rows, ["load", "weight processing", "seconds", "baseline MiB", "peak RSS MiB",
                           "peak - baseline MiB"]))
    print("\n".join(verdicts))
    print("(on CPU the devices' buffers and the processing program's temporaries are host memory too; on a GPU/TPU "
          "they are device memory and the host holds only the slices being read)\n")
    fwd = run_isolated(__file__, ("forward",), argv, runs=1)["forward"][0]
    toks = args.batch * args.seq
    rows = [[k, f"{median(v) * 1e3:.1f}", f"{toks / median(v):,.0f}"] for k, v in fwd["times"].items()]
    print(fmt_table(rows, [f"forward {args.batch}x{args.seq}", "ms", "tokens/s"]))
    mem = run_isolated(__file__, ("memory",), argv, runs=1)["memory"][0]
    print(f"\ncompiled temp memory, 1 x {args.long_seq} forward: blocked attention (no pattern captured) "
          f"{mem['blocked'] / 2**20:.1f} MiB, plain (a pattern captured) {mem['plain'] / 2**20:.1f} MiB "
          f"({mem['plain'] / max(mem['blocked'], 1):.1f}x)")
    print(json.dumps({"load": rows, "forward": fwd, "memory": mem}))


if __name__ == "__main__":
    main()
