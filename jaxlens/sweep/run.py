"""`jaxlens.sweep.run`: pattern_lens's activation sweep on a device mesh, kill-safe.

One model at a time: load it, write `model_cfg.json`, load and hash the prompts, skip the
finished ones (resume), tokenise the rest once, plan the batches and their padded lengths (a
few, chosen for the least padding), and run one compiled program per padded shape with only
the requested hooks leaving the device. A bounded writer thread fetches each batch's results,
trims the padding, and writes each prompt's files atomically while the device runs the next
batches.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from jaxlens.sweep.batching import MAX_PROGRAMS, Batch, pad_batch, plan_batches
from jaxlens.sweep.layout import (NPZ_FILE, PATTERN, STACKED_FILE, check_model_name, clean_partial, model_dir,
                                  prompt_dir, prompt_done, write_model_cfg, write_models_jsonl, write_prompts_jsonl)
from jaxlens.config import ModelConfig
from jaxlens.distributed import batch_multiple, batch_sharding, make_mesh, shard_params
from jaxlens.sweep.prompts import load_prompts
from jaxlens.sweep.writer import BoundedWriter, atomic_save_npy, atomic_savez, atomic_write_json

__all__ = ["DATA_DIR", "SweepSummary", "resolve_sweep_names", "run", "run_model"]

DATA_DIR = "attn_data"  # pattern_lens's default save path


@dataclass
class SweepSummary:
    """What one model's sweep did."""

    model_name: str
    save_path: str
    n_prompts: int = 0
    n_cached: int = 0
    n_computed: int = 0
    n_truncated: int = 0
    n_malformed: int = 0
    n_duplicates: int = 0
    n_programs: int = 0
    n_batches: int = 0
    n_tokens: int = 0
    wall_s: float = 0.0
    writer_wait_s: float = 0.0  # the loop blocked on a full writer queue (device results pending included)
    writer_host_s: float = 0.0  # the writer's host work once results arrived: trim, compress, write
    shapes: list[tuple[int, int]] = field(default_factory=list)

    @property
    def prompts_per_s(self) -> float:
        """Computed prompts per second of wall time (loading and compiling included)."""
        return self.n_computed / self.wall_s if self.wall_s else 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields (what `jaxlens patterns` prints)."""
        return {**asdict(self), "prompts_per_s": self.prompts_per_s}


def resolve_sweep_names(names: Any, cfg: Any) -> frozenset[str]:
    """The hooks to keep: None -> every layer's `hook_pattern` (pattern_lens's default); a string
    -> comma-separated items, each an exact hook name or a regex matched against whole names; a
    list -> those items by the same rule; a re.Pattern or callable -> as `resolve_names`."""
    from jaxlens.hooks import hook_names, resolve_names

    if names is None:
        return frozenset(PATTERN.format(l=l) for l in range(cfg.n_layers))
    if isinstance(names, (re.Pattern,)) or callable(names):
        return resolve_names(names, cfg)
    items = [s.strip() for s in names.split(",")] if isinstance(names, str) else list(names)
    items = [s for s in items if s]
    if not items:
        raise ValueError("--names is empty: give hook names or regexes, e.g. 'blocks.*.attn.hook_pattern'")
    every = hook_names(cfg, include_result=True)
    chosen: set[str] = set()
    for item in items:
        if item in every:
            chosen.add(item)
            continue
        try:
            rx = re.compile(item)
        except re.error as e:
            raise ValueError(f"--names item {item!r} is neither a hook name nor a valid regex ({e})") from None
        hit = {n for n in every if rx.fullmatch(n)}
        if not hit:
            from jaxlens.hooks import did_you_mean

            raise ValueError(f"--names item {item!r} matches no hook of this model{did_you_mean(item, every)}; "
                             "see `jaxlens run --model DIR` for the names")
        chosen |= hit
    return frozenset(chosen)


def _trim(name: str, a: np.ndarray, row: int, offset: int, n: int, length: int) -> np.ndarray:
    """One prompt's activation out of a padded batch, batch axis kept ([1 ...]): patterns and
    scores lose padding on both position axes, other [batch pos ...] hooks on the first."""
    x = a[row:row + 1]
    if name.endswith(("attn.hook_pattern", "attn.hook_attn_scores")):
        x = x[:, :, offset:offset + n, offset:offset + n]
    elif x.ndim >= 2 and x.shape[1] == length:
        x = x[:, offset:offset + n]
    x = np.ascontiguousarray(x)
    return x.astype(np.float32) if np.issubdtype(x.dtype, np.floating) or x.dtype.kind == "V" else x


def _name_order(name: str) -> tuple[int, str]:
    """Hooks by layer, then name: `hook_embed` (-1), `blocks.{l}.*` (l), `ln_final.*` (after)."""
    parts = name.split(".")
    if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit():
        return int(parts[1]), name
    return (-1 if name.startswith("hook_") else 1 << 30), name


def _to_host(v: Any) -> np.ndarray:
    """A device array on the host (bf16 as float32: numpy files cannot hold bf16 portably)."""
    a = np.asarray(jax.device_get(v))
    if a.dtype.name == "bfloat16":
        a = a.astype(np.float32)
    return a


def _progress(total: int, enabled: bool) -> Any:
    """A tqdm bar on stderr (prompts/s and ETA), or None."""
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="patterns", unit="prompt", file=sys.stderr, dynamic_ncols=True)


def run_model(model: str | Path, prompts: str | Path, save_path: str | Path = DATA_DIR, *, name: str | None = None,
              min_chars: int | None = 100, max_chars: int | None = 1000, n_samples: int | None = None,
              batch_size: int = 32, force: bool = False, shuffle: bool = False, seed: int | None = 0,
              stacked_heads: bool = False, names: Any = None, dtype: str = "float32", mesh: Any = None,
              padding_side: str = "right", strict: bool = False, progress: bool = False,
              max_programs: int = MAX_PROGRAMS,
              precision: str | None = "highest", max_pending: int = 4, stats: bool = False, n_probes: int = 8,
              store: str = "files", store_dtype: str = "float32", store_triangle: bool = False,
              report: Callable[[str], None] | None = None) -> SweepSummary:
    """Sweep one model (a HF or jaxlens folder) over a prompts file; see `run`."""
    from jaxlens.hooked import HookedTransformer
    from jaxlens.model.forward import forward_jit

    report = report or (lambda msg: print(msg, file=sys.stderr))
    t0 = time.perf_counter()
    model = Path(model)
    if not model.is_dir():
        raise FileNotFoundError(f"model folder {model} does not exist; pass --model DIR (a HF or jaxlens folder)")
    model_name = check_model_name(name if name is not None else model.resolve().name)
    save = Path(save_path)
    save.mkdir(parents=True, exist_ok=True)
    summary = SweepSummary(model_name=model_name, save_path=str(save))

    # weights as HF has them: attention patterns do not depend on TransformerLens's processing
    hm = HookedTransformer.from_pretrained_no_processing(model, dtype)
    cfg, tok = sweep_config(hm.cfg), hm.tokenizer
    if tok is None:
        raise ValueError(f"model folder {model} has no tokenizer; a sweep needs one to tokenise the prompts")
    capture = resolve_sweep_names(names, cfg)
    if stacked_heads and capture != frozenset(PATTERN.format(l=l) for l in range(cfg.n_layers)):
        raise ValueError("--stacked-heads stacks every layer's attn.hook_pattern into one array; it cannot be "
                         "combined with --names selecting other hooks")
    write_model_cfg(save, model_name, cfg)
    mdir = model_dir(save, model_name)
    pattern_keys = [PATTERN.format(l=l) for l in range(cfg.n_layers)]

    plist, counts = load_prompts(prompts, min_chars, max_chars, n_samples, shuffle, seed, strict, report)
    pi, pc = jax.process_index(), jax.process_count()
    if pc > 1 and (stats or store != "files"):
        raise ValueError("--stats and --store zarr run on one host for now; multi-host sweeps write files")
    summary.n_prompts, summary.n_malformed, summary.n_duplicates = counts["prompts"], counts["malformed"], \
        counts["duplicates"]
    if stacked_heads and stats:
        raise ValueError("--stats writes statistics, not per-prompt files; drop --stacked-heads")
    if store not in ("files", "zarr"):
        raise ValueError(f"--store must be 'files' or 'zarr', got {store!r}")
    pstore = None
    if store == "zarr":
        from jaxlens.sweep.store import STORE_DIR, PatternStore

        if capture != frozenset(pattern_keys) or stacked_heads or stats:
            raise ValueError("--store zarr holds every layer's attn.hook_pattern; it cannot be combined with --names "
                             "selecting other hooks, --stacked-heads or --stats")
        pstore = PatternStore.create_or_open(mdir / STORE_DIR, model_name, cfg.n_layers, cfg.n_heads, store_dtype,
                                             store_triangle)
    todo = []
    for p in plist[pi::pc]:  # multi-host: each process takes a disjoint slice of the prompts
        folder = prompt_dir(save, model_name, p["hash"])
        done = (p["hash"] in pstore) if pstore is not None else \
            (not stats and prompt_done(folder, capture, stacked_heads))
        if done and not force:
            summary.n_cached += 1
        else:
            todo.append(p)
    if summary.n_cached:
        report(f"{model_name}: {summary.n_cached} prompts already done, {len(todo)} to compute")

    # tokenise once: BOS (pattern_lens's rule, see `sweep_config`) + the tokenizer's ids
    bos = tok.bos_token_id if tok.bos_token_id is not None else cfg.bos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    ids = tok([p["text"] for p in todo], add_special_tokens=False)["input_ids"] if todo else []
    seqs, records = [], []
    for p, t in zip(todo, ids):
        s = ([bos] if cfg.default_prepend_bos else []) + list(t)
        if not s:
            report(f"skipping prompt {p['hash']}: its text encodes to no tokens")
            continue
        rec = dict(p)
        if not stats:  # prompt.json's metadata, as pattern_lens writes it
            given = rec.get("tokens")
            toks = given if isinstance(given, list) else tok.tokenize(p["text"])
            rec.update(n_tokens=len(toks), tokens=toks)
        if len(s) > cfg.n_ctx:  # pattern_lens truncates silently; we say so
            s = s[:cfg.n_ctx]
            rec["truncated"] = True
            summary.n_truncated += 1
        seqs.append(s)
        records.append(rec)
    if summary.n_truncated:
        report(f"{model_name}: {summary.n_truncated} prompts are longer than n_ctx={cfg.n_ctx} tokens and were "
               "truncated (prompt.json says truncated: true)")

    m = make_mesh(mesh or "data=1", jax.local_devices())  # each host sweeps its share of the prompts
    # attn_len: on GPT-2 small (XLA:CPU, batch 32, patterns kept) a token's cost grows as 1 + S / (0.4 d_model)
    batches: list[Batch] = plan_batches([len(s) for s in seqs], batch_size, cfg.n_ctx, multiple=batch_multiple(m),
                                        max_programs=max_programs, attn_len=0.4 * cfg.d_model)
    params = shard_params(hm.params, cfg, m)  # model / fsdp axes split the parameters (jaxlens.distributed)
    in_sharding = batch_sharding(m)  # axis 0 split; any trailing axes replicated
    names_sorted = sorted(capture, key=_name_order)
    shapes: set[tuple[int, int]] = set()
    bar = _progress(len(records), progress)

    def write_batch(batch: Batch, acts: dict[str, Any]) -> None:
        host = {k: _to_host(v) for k, v in acts.items()}  # waits for the device
        t_host = time.perf_counter()
        if pstore is not None:  # one store write and one index line per batch
            items = []
            for r, i in enumerate(batch.rows):
                n = len(seqs[i])
                offset = batch.length - n if padding_side == "left" else 0
                pats = np.stack([_trim(k, host[k], r, offset, n, batch.length)[0] for k in pattern_keys])
                items.append((records[i]["hash"], pats, records[i]))
            pstore.append(items)
        for r, i in enumerate(batch.rows if pstore is None else ()):
            rec, n = records[i], len(seqs[i])
            offset = batch.length - n if padding_side == "left" else 0
            per = {k: _trim(k, host[k], r, offset, n, batch.length) for k in names_sorted}
            folder = prompt_dir(save, model_name, rec["hash"])
            clean_partial(folder)
            atomic_write_json(folder / "prompt.json", rec)  # first: the activations file marks the prompt done
            if stacked_heads:
                atomic_save_npy(folder / STACKED_FILE, np.stack([per[k] for k in pattern_keys], axis=1))
            else:
                atomic_savez(folder / NPZ_FILE, per)
        summary.writer_host_s += time.perf_counter() - t_host
        summary.n_computed += len(batch.rows)
        summary.n_tokens += sum(len(seqs[i]) for i in batch.rows)
        if bar is not None:  # tqdm shows prompts/s and the ETA; tokens/s beside them
            bar.update(len(batch.rows))
            el = max(time.perf_counter() - t_run, 1e-9)
            bar.set_postfix(tok_s=f"{summary.n_tokens / el:.0f}", n_ctx=batch.length)

    t_run = time.perf_counter()
    if stats:
        from jaxlens.sweep.stats import write_stats

        state = _run_stats(summary, batches, seqs, params, cfg, capture, pad, padding_side, in_sharding, precision, bar,
                   shapes, t_run)
        write_stats(mdir, summary, state, params, cfg, bos, n_probes, precision)
        summary.n_batches, summary.shapes, summary.n_programs = len(batches), sorted(shapes), len(shapes)
        write_models_jsonl(save)
        summary.wall_s = time.perf_counter() - t0
        return summary
    try:
        with BoundedWriter(max_pending) as writer:
            for batch in batches:
                toks, mask = pad_batch([seqs[i] for i in batch.rows], batch.length, batch.batch, pad, padding_side)
                toks, mask = jax.device_put(toks, in_sharding), jax.device_put(mask, in_sharding)
                shapes.add((batch.batch, batch.length))
                # dispatch is asynchronous: the writer thread waits for the results while we go on
                _, acts, _ = forward_jit(params, cfg, toks, mask, capture=capture, precision=precision,
                                         return_logits=False)
                writer.submit(lambda b=batch, a=acts: write_batch(b, a))
            summary.writer_wait_s = writer.wait_s
    finally:
        if bar is not None:
            bar.close()
    summary.n_batches = len(batches)
    summary.shapes = sorted(shapes)
    summary.n_programs = len(shapes)
    if pc > 1:  # the index files are written once, by process 0, after every process has finished
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"jaxlens-sweep-{model_name}")
        if pi != 0:
            summary.wall_s = time.perf_counter() - t0
            return summary
    if pstore is not None:  # the store's records, in the prompts file's order, then the others
        from jaxlens.sweep.writer import atomic_write_text

        order = [p["hash"] for p in plist if p["hash"] in pstore]
        order += sorted(set(pstore.keys()) - set(order))
        atomic_write_text(mdir / "prompts.jsonl", "".join(json.dumps(pstore.record(h)) + "\n" for h in order))
    else:
        write_prompts_jsonl(mdir, [p["hash"] for p in plist])
    write_models_jsonl(save)
    summary.wall_s = time.perf_counter() - t0
    return summary


def _run_stats(summary: SweepSummary, batches: list[Batch], seqs: list[list[int]], params: Any, cfg: Any,
               capture: frozenset[str], pad: int, padding_side: str, in_sharding: Any, precision: str | None,
               bar: Any, shapes: set, t_run: float) -> dict[str, Any]:
    """The statistics loop: every batch folded into on-device running sums (see `stats`)."""
    from jaxlens.sweep.stats import init_state, stats_step

    pattern_names = tuple(PATTERN.format(l=l) for l in range(cfg.n_layers) if PATTERN.format(l=l) in capture)
    state = init_state(cfg.n_layers, cfg.n_heads)
    for batch in batches:
        toks, mask = pad_batch([seqs[i] for i in batch.rows], batch.length, batch.batch, pad, padding_side)
        valid = (np.arange(batch.batch) < len(batch.rows)).astype(np.int32)
        toks, mask, valid = (jax.device_put(x, in_sharding) for x in (toks, mask, valid))
        shapes.add((batch.batch, batch.length))
        state = stats_step(state, params, toks, mask, valid, cfg=cfg, capture=capture, pattern_names=pattern_names,
                           precision=precision)
        summary.n_computed += len(batch.rows)
        summary.n_tokens += sum(len(seqs[i]) for i in batch.rows)
        if bar is not None:
            bar.update(len(batch.rows))
            bar.set_postfix(tok_s=f"{summary.n_tokens / max(time.perf_counter() - t_run, 1e-9):.0f}")
    return jax.block_until_ready(state)



def sweep_config(cfg: ModelConfig) -> ModelConfig:
    """The config a sweep tokenises with: pattern_lens 0.6 runs HookedTransformer 2.17, which
    prepends BOS for every family but Qwen; TransformerLens 4 (our model API's default) also
    drops it for GPT-NeoX. A sweep follows pattern_lens, so its files and `model_cfg.json` match."""
    return cfg.replace(default_prepend_bos=True) if cfg.model_type == "gpt_neox" else cfg

def run(model: str | Path | Sequence[str | Path], prompts: str | Path, save_path: str | Path = DATA_DIR, *,
        name: str | Sequence[str] | None = None, no_index_html: bool = False, raw_prompts: bool = True,
        **kw: Any) -> list[SweepSummary]:
    """Run pattern_lens's sweep with jaxlens: for each model (a folder, a list, or a
    comma-separated string), write `<save>/<model>/prompts/<hash>/{prompt.json, activations.npz}`
    and the index files (`models.jsonl`, `<model>/prompts.jsonl`, `index.html`, `single.html`).

    Flags are pattern_lens's (`min_chars`, `max_chars`, `n_samples`, `batch_size`, `force`,
    `shuffle` with `seed`, `stacked_heads`), plus `names` (any hooks), `dtype`, `mesh`
    ("data=8"), `padding_side`, `strict` (a malformed line fails instead of being skipped),
    `progress`, `max_programs` (padded lengths to compile, see `batching.plan_batches`),
    `precision`, `stats` (on-device statistics instead of per-prompt files, see
    `jaxlens.sweep.stats`; `n_probes` induction probes), `store="zarr"` (one chunked store,
    `store_dtype` float32/bfloat16, `store_triangle`; read with `jaxlens.sweep.open_store`). `raw_prompts` is accepted for pattern_lens compatibility: the
    prompts file is always read (and chunked). Multi-host (after `jax.distributed.initialize`):
    each process sweeps a disjoint slice of the prompts on its local devices, and process 0
    writes the index files once all are done. Finished prompts are not recomputed unless
    `force`; a killed run resumes where it stopped. Returns one summary per model.
    """
    del raw_prompts
    models = [s for s in model.split(",") if s] if isinstance(model, str) else \
        [model] if isinstance(model, Path) else list(model)
    if not models:
        raise ValueError("no model given; pass --model DIR (comma-separated for several)")
    names_ = [None] * len(models) if name is None else ([s for s in name.split(",")] if isinstance(name, str)
                                                          else list(name))
    if len(names_) != len(models):
        raise ValueError(f"--name gives {len(names_)} names for {len(models)} models; give one per model, "
                         "comma-separated")
    out = [run_model(m, prompts, save_path, name=n, **kw) for m, n in zip(models, names_)]
    if not no_index_html and jax.process_index() == 0:
        from jaxlens.sweep.viewer import write_index_html

        write_index_html(Path(save_path))
    return out
