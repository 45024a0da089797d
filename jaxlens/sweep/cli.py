"""`jaxlens patterns`: pattern_lens's `python -m pattern_lens.activations` flags, and ours."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from jaxlens.sweep.batching import MAX_PROGRAMS

__all__ = ["add_parser", "cmd_patterns"]


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the `patterns` subcommand on an argparse subparsers object."""
    p = sub.add_parser("patterns", help="attention patterns (or any hooks) of many prompts, in pattern_lens's layout")
    p.add_argument("--model", "-m", default=None,
                   help="HF or jaxlens folder(s), comma-separated (default: the shipped model)")
    p.add_argument("--name", default=None, help="output folder name(s) of the model(s) (default: the folder's basename)")
    p.add_argument("--prompts", "-p", default=None,
                   help="jsonl file, one object with 'text' per line (default: the shipped prompts)")
    p.add_argument("--save-path", "-s", default="attn_data", help="output folder (default: attn_data)")
    p.add_argument("--min-chars", type=int, default=100, help="drop prompts (and chunks) shorter than this")
    p.add_argument("--max-chars", type=int, default=1000, help="cut longer prompts into chunks of this many characters")
    p.add_argument("--n-samples", "-n", type=int, default=None, help="at most this many prompts")
    p.add_argument("--batch-size", "-b", type=int, default=32, help="prompts per forward pass")
    p.add_argument("--max-programs", type=int, default=MAX_PROGRAMS,
                   help=f"at most this many padded lengths, one compiled program each (default {MAX_PROGRAMS}; "
                        "fewer: less compiling, more padding)")
    p.add_argument("--force", "-f", action="store_true", help="recompute prompts that are already done")
    p.add_argument("--no-index-html", action="store_true", help="do not write index.html / single.html")
    p.add_argument("--raw-prompts", "-r", action="store_true",
                   help="accepted for pattern_lens compatibility; --prompts is always read and chunked")
    p.add_argument("--shuffle", action="store_true", help="shuffle the prompts (seeded by --seed)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    p.add_argument("--stacked-heads", action="store_true",
                   help="one activations-blocks.-.attn.hook_pattern.npy [1 n_layers n_heads S S] per prompt")
    p.add_argument("--names", default=None,
                   help="hooks to save: comma-separated names or regexes (default: every attn.hook_pattern)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--mesh", default=None, help="device mesh, e.g. data=8, data=4,model=2 or fsdp=8: batches split over data/fsdp, parameters over model/fsdp (default: one device)")
    p.add_argument("--stats", action="store_true",
                   help="on-device statistics of the whole set (stats.npz, stats.json) instead of per-prompt files")
    p.add_argument("--n-probes", type=int, default=8, help="repeated-token probes for --stats's induction score")
    p.add_argument("--store", default="files", choices=["files", "zarr"],
                   help="files: pattern_lens's per-prompt npz; zarr: one chunked store <model>/patterns.zarr")
    p.add_argument("--store-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--store-triangle", action="store_true", help="store only the causal lower triangle")
    p.add_argument("--coordinator", default=None,
                   help="multi-host: HOST:PORT of process 0 for jax.distributed (with --num-processes, --process-id); "
                        "on TPU pods pass --coordinator auto")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--padding-side", default="right", choices=["right", "left"])
    p.add_argument("--strict", action="store_true", help="fail on a malformed prompts line instead of skipping it")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty(),
                   help="progress bar with prompts/s, tokens/s and ETA")
    p.set_defaults(fn=cmd_patterns)
    return p


def cmd_patterns(a: argparse.Namespace) -> int:
    """Run the sweep; print one JSON summary line per model."""
    from jaxlens.assets import model_dir
    from jaxlens.sweep.run import run

    if a.coordinator:
        import jax

        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts; other backends ignore it
        if a.coordinator == "auto":  # TPU pods / managed clusters detect their peers
            jax.distributed.initialize()
        else:
            if a.num_processes is None or a.process_id is None:
                raise ValueError("--coordinator HOST:PORT needs --num-processes N and --process-id I")
            jax.distributed.initialize(a.coordinator, a.num_processes, a.process_id)
    model = a.model if a.model is not None else str(model_dir())
    prompts = a.prompts
    if prompts is None:
        from pathlib import Path

        import jaxlens.assets as assets

        prompts = str(Path(assets.__file__).parent / "prompts.jsonl")
    out = run(model, prompts, a.save_path, name=a.name, no_index_html=a.no_index_html, min_chars=a.min_chars,
              max_chars=a.max_chars, n_samples=a.n_samples, batch_size=a.batch_size, force=a.force,
              shuffle=a.shuffle, seed=a.seed, stacked_heads=a.stacked_heads, names=a.names, dtype=a.dtype,
              mesh=a.mesh, padding_side=a.padding_side, stats=a.stats, n_probes=a.n_probes, store=a.store,
              store_dtype=a.store_dtype, store_triangle=a.store_triangle, strict=a.strict, progress=a.progress,
              max_programs=a.max_programs)
    for s in out:
        print(json.dumps(s.as_dict()))
    return 0
