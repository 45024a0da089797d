"""Sweeps: pattern_lens's job in jaxlens. Many prompts through a model, shape-bucketed batches
on a device mesh, a bounded background writer, every file atomic and resumable after kill -9,
in pattern_lens's layout so its loaders and figures read the output.

`jaxlens.sweep.run(model, prompts, save_path, ...)` is the API; `jaxlens patterns` the CLI.
Modules: `prompts` (loading, chunking, hashing), `batching` (shape buckets, padding) (meshes: `jaxlens.distributed`),
`writer` (atomic files, the writer thread), `layout` (pattern_lens's files), `stats` (--stats),
`store` (--store zarr), `viewer`, `run`.
"""

from jaxlens.sweep.layout import NPZ_FILE, PATTERN, STACKED_FILE
from jaxlens.sweep.prompts import load_prompts, prompt_hash
from jaxlens.sweep.store import PatternStore, open_store
from jaxlens.sweep.run import DATA_DIR, SweepSummary, resolve_sweep_names, run, run_model

__all__ = ["run", "run_model", "SweepSummary", "DATA_DIR", "load_prompts", "prompt_hash", "resolve_sweep_names",
           "PATTERN", "STACKED_FILE", "NPZ_FILE", "open_store", "PatternStore"]
