"""The sweep benchmark (issue 12): jaxlens's `jaxlens.sweep.run` vs a pattern_lens-style
TransformerLens loop, on the same prompts and model, in the same run.

1,000 prompts of mixed length (10 to 1,000 characters, cut from `jaxlens.data` documents), a
GPT-2-small shape with random weights and the shipped model's tokenizer (about 5.8 characters
per token on this text, near GPT-2's on English), attention patterns of every layer.

- jaxlens: `jaxlens.sweep.run(model, prompts, out, min_chars=10, max_chars=1000)` in files mode
  (pattern_lens's layout, every file atomic), and again with `stats=True`.
- TransformerLens: pattern_lens 0.6's `activations_main` loop, written out here (pattern_lens
  itself needs transformer-lens < 3): a `TransformerBridge` of the same checkpoint in
  compatibility mode (processed weights, as `HookedTransformer.from_pretrained`), prompts
  sorted by token length (longest first), per batch `prompt.json` files, one
  `run_with_cache(texts, names_filter=<hook_pattern>, padding_side="right")`, then per prompt
  `np.savez_compressed` of each layer's `[1 n_heads S S]` float32 pattern into
  `prompts/<hash>/activations.npz`, and `prompts.jsonl` from the prompt folders at the end.

Each side runs in its own process (so each peak host memory, ru_maxrss, is its own), in order
jaxlens, TransformerLens, stats, `--runs` times alternating. Wall time runs from loading the model
to the last file (jaxlens's compilation included: the persistent compile cache is off, as
`import jaxlens` leaves it). Prints prompts/s of each side and the ratio (target >= 3x), the
compiled programs of the jaxlens run (target <= 8), peak host memory, the share of the sweep's
wall time the loop blocked on the writer and the writer's own host work, `--stats` prompts/s (target >= 10x files
mode), and checks that both sides wrote the same prompt folders with equal patterns. A ratio is
withheld ("noisy") when other processes took more than ~10% of the cores (`common.Quiet`).

    .venv/bin/python benchmarks/sweep.py                     # the measurement (quiet machine)
    .venv/bin/python benchmarks/sweep.py --n 16 --layers 2 --d-model 64 --heads 4 --max-chars 200   # proves it runs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import Quiet, emit_side, headline, machine_report, median, run_isolated, torch_best  # noqa: E402

SIDES = ("jaxlens", "tl", "stats")
PATTERN = "blocks.{l}.attn.hook_pattern"


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="prompts (default 1000)")
    ap.add_argument("--min-chars", type=int, default=10)
    ap.add_argument("--max-chars", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32, help="prompts per forward, both sides (pattern_lens: 32)")
    ap.add_argument("--layers", type=int, default=12, help="model layers (GPT-2-small: 12)")
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--runs", type=int, default=1, help="processes per side, alternating (default 1)")
    ap.add_argument("--no-tl", action="store_true", help="skip the TransformerLens side")
    ap.add_argument("--no-stats", action="store_true", help="skip the --stats side")
    ap.add_argument("--work", default=None, help="folder for the model's outputs (default: a temp folder, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the outputs")
    ap.add_argument("--seed", type=int, default=0)
    # internal: what a side's subprocess is given
    ap.add_argument("--side", choices=SIDES, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--prompts-file", default=None, help=argparse.SUPPRESS)
    return ap.parse_args()


# ---------------------------------------------------------------- inputs

def make_prompts(path: Path, n: int, lo: int, hi: int, seed: int) -> Path:
    """`n` prompts with lengths uniform in [lo, hi] characters, cut from concatenated
    `jaxlens.data` documents (every kind: IOI, stories, repeated words, counting, brackets...)."""
    from jaxlens.apps import data

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        target = int(rng.integers(lo, hi + 1))
        text = ""
        while len(text) < target:
            text += (" " if text else "") + data.document(rng)
        rows.append({"text": text[:target]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- the sides (each in its own process)

def side_jaxlens(a: argparse.Namespace, out: Path, stats: bool) -> dict:
    import jaxlens.sweep

    t0 = time.perf_counter()
    with Quiet() as q:
        [s] = jaxlens.sweep.run(a.model_dir, a.prompts_file, out, min_chars=a.min_chars, max_chars=a.max_chars,
                                batch_size=a.batch_size, force=True, no_index_html=True, progress=False, stats=stats)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "n": s.n_computed, "summary": s.as_dict(), "model_name": s.model_name,
            "quiet": q.as_dict()}


def side_tl(a: argparse.Namespace, out: Path) -> dict:
    """pattern_lens 0.6's `activations_main` + `compute_activations_batched`, on a TransformerBridge."""
    import dataclasses

    import torch
    from transformer_lens.model_bridge import TransformerBridge

    from jaxlens.sweep import load_prompts  # pattern_lens's load_text_data + augment_prompt_with_hash rules

    plist, _ = load_prompts(a.prompts_file, a.min_chars, a.max_chars, report=lambda m: None)
    model_name = Path(a.model_dir).resolve().name
    t0 = time.perf_counter()
    with Quiet() as q:
        torch_best()  # threads = cores
        bridge = TransformerBridge.boot_transformers(str(a.model_dir), device="cpu", dtype=torch.float32)
        bridge.enable_compatibility_mode()  # processed, as pattern_lens's HookedTransformer.from_pretrained
        n_layers = bridge.cfg.n_layers
        mdir = out / model_name
        mdir.mkdir(parents=True, exist_ok=True)
        cfg = bridge.cfg
        cfg_d = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(vars(cfg))
        (mdir / "model_cfg.json").write_text(json.dumps(cfg_d, default=str))
        keys = {PATTERN.format(l=l) for l in range(n_layers)}
        names_filter = lambda name: name in keys  # noqa: E731  (pattern_lens: ATTN_PATTERN_REGEX)
        with torch_best():  # pre-tokenise for length sorting, longest first
            lens = [bridge.to_tokens(p["text"]).shape[1] for p in plist]
        order = sorted(range(len(plist)), key=lambda i: lens[i], reverse=True)
        t_loop = time.perf_counter()
        for b0 in range(0, len(order), a.batch_size):
            idx = order[b0:b0 + a.batch_size]
            batch = [plist[i] for i in idx]
            for p in batch:  # Phase B: metadata first
                toks = bridge.tokenizer.tokenize(p["text"])
                p.update(n_tokens=len(toks), tokens=toks)
                pdir = mdir / "prompts" / p["hash"]
                pdir.mkdir(parents=True, exist_ok=True)
                with open(pdir / "prompt.json", "w") as f:
                    json.dump(p, f)
            with torch_best():  # Phase C: one batched forward, right-padded
                _, cache = bridge.run_with_cache([p["text"] for p in batch], names_filter=names_filter,
                                                 return_type=None, padding_side="right")
            for j, (p, i) in enumerate(zip(batch, idx)):  # Phase D: trim and save per prompt
                L = lens[i]
                arrays = {k: cache[k][j:j + 1, :, :L, :L].detach().cpu().numpy() for k in cache.keys()}
                np.savez_compressed(mdir / "prompts" / p["hash"] / "activations.npz", **arrays)
            del cache
        loop_s = time.perf_counter() - t_loop
        lines = []  # generate_prompts_jsonl: every prompt folder's prompt.json
        for d in sorted((mdir / "prompts").iterdir()):
            with open(d / "prompt.json") as f:
                lines.append(json.dumps(json.load(f)))
        (mdir / "prompts.jsonl").write_text("\n".join(lines) + "\n")
        (out / "models.jsonl").write_text(json.dumps(cfg_d, default=str) + "\n")
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "loop_s": loop_s, "n": len(plist), "model_name": model_name, "quiet": q.as_dict(),
            "tokens": int(sum(lens))}


def side(a: argparse.Namespace) -> None:
    out = Path(tempfile.mkdtemp(prefix=f"{a.side}-", dir=a.work))
    res = side_tl(a, out) if a.side == "tl" else side_jaxlens(a, out, stats=a.side == "stats")
    emit_side({**res, "out": str(out), "machine": machine_report()})


# ---------------------------------------------------------------- the parent

def compare(jl: dict, tl: dict, k: int = 8) -> str:
    """Do both sides' folders hold the same prompts, and do `k` of them hold equal patterns?"""
    jdir = Path(jl["out"]) / jl["model_name"] / "prompts"
    tdir = Path(tl["out"]) / tl["model_name"] / "prompts"
    jh, th = {p.name for p in jdir.iterdir()}, {p.name for p in tdir.iterdir()}
    if jh != th:
        return f"DIFFERENT prompt folders: {len(jh - th)} only in jaxlens's, {len(th - jh)} only in TL's"
    worst = 0.0
    for h in sorted(jh)[:k]:
        with np.load(jdir / h / "activations.npz") as x, np.load(tdir / h / "activations.npz") as y:
            if set(x.files) != set(y.files):
                return f"DIFFERENT npz keys in {h}: {sorted(set(x.files) ^ set(y.files))}"
            for key in x.files:
                if x[key].shape != y[key].shape or x[key].dtype != y[key].dtype:
                    return f"DIFFERENT {key} in {h}: {x[key].shape} {x[key].dtype} vs {y[key].shape} {y[key].dtype}"
                worst = max(worst, float(np.abs(x[key] - y[key]).max()))
    return f"same {len(jh)} prompt folders; {min(k, len(jh))} checked: same keys, shapes, dtypes, max |diff| {worst:.1e}"


def main() -> None:
    a = parse()
    if a.side:
        return side(a)
    from common import gpt2_small_dir

    from jaxlens.assets import model_dir

    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="jaxlens-sweep-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model = gpt2_small_dir(n_layer=a.layers, n_embd=a.d_model, n_head=a.heads, tokenizer_from=model_dir())
    prompts = make_prompts(work / "prompts.jsonl", a.n, a.min_chars, a.max_chars, a.seed)
    sides = [s for s in SIDES if not (s == "tl" and a.no_tl) and not (s == "stats" and a.no_stats)]
    argv = ["--model-dir", str(model), "--prompts-file", str(prompts), "--work", str(work),
            "--min-chars", str(a.min_chars), "--max-chars", str(a.max_chars), "--batch-size", str(a.batch_size)]
    print(machine_report())
    print(f"\n{a.n} prompts of {a.min_chars}-{a.max_chars} characters, model {model.name} "
          f"({a.layers} layers, d_model {a.d_model}, {a.heads} heads), batch size {a.batch_size}, "
          f"{a.runs} process(es) per side, alternating {' / '.join(sides)}")
    try:
        with Quiet() as q:
            res = run_isolated(__file__, sides, argv, runs=a.runs)
        report(res, q)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"outputs kept in {work}")


def report(res: dict[str, list[dict]], q: Quiet) -> None:
    noisy = q.noisy or any(r["quiet"]["noisy"] for rs in res.values() for r in rs)
    verdict = q if q.noisy else noisy
    rate = {s: median([r["n"] / r["wall_s"] for r in rs]) for s, rs in res.items()}
    jl = res["jaxlens"][-1]
    summ = jl["summary"]
    print()
    for s, rs in res.items():
        label = {"jaxlens": "jaxlens sweep (files)", "tl": "TransformerLens loop (pattern_lens-style)",
                 "stats": "jaxlens sweep --stats"}[s]
        extra = f", loop alone {median([r['loop_s'] for r in rs]):.1f} s" if s == "tl" else ""
        print(f"{label}: {rs[-1]['n']} prompts, {median([r['wall_s'] for r in rs]):.1f} s wall{extra}, "
              f"{rate[s]:.2f} prompts/s, peak host memory {max(r['maxrss_mib'] for r in rs):.0f} MiB")
    print(f"jaxlens: {summ['n_programs']} compiled programs (target <= 8; shapes {summ['shapes']}), "
          f"{summ['n_batches']} batches, {summ['n_tokens']} tokens, {summ['n_truncated']} truncated; "
          f"the loop blocked on the writer's queue {summ['writer_wait_s']:.1f} s "
          f"({summ['writer_wait_s'] / max(summ['wall_s'], 1e-9):.0%} of the sweep's wall time, waiting for the device "
          f"included); the writer's host work (trim, compress, write) {summ['writer_host_s']:.1f} s = "
          f"{summ['writer_host_s'] / max(summ['wall_s'], 1e-9):.0%} (near 100%: writer-bound; low: device-bound)")
    if "tl" in res:
        print(f"files: {compare(jl, res['tl'][-1])}")
    print(q.summary())
    if "tl" in res:
        print(headline("jaxlens files mode vs TransformerLens loop, prompts/s (target >= 3x)",
                       rate["jaxlens"] / rate["tl"], verdict))
    if "stats" in res:
        print(headline("jaxlens --stats vs files mode, prompts/s (target >= 10x)",
                       rate["stats"] / rate["jaxlens"], verdict))


if __name__ == "__main__":
    main()
