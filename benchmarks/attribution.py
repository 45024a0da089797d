"""Attribution patching (TransformerLens 4.3's `tools.analysis.attribution_patching`): jaxlens vs TL.

Node and edge sweeps over a batch of clean/corrupt pairs on the GPT-2-small shape (random weights),
then faithfulness of the top edges. TransformerLens runs its own tool on a `TransformerBridge` of
the same checkpoint (compatibility mode), torch threads = cores (autograd on: the tool needs it);
it scores each pair with its own forward + backward. jaxlens runs the batch in one compiled forward
+ backward. Both build the same Python dictionaries of scores (timed). Interleaved rounds, the
machine and the load printed, the ratio withheld when other processes shared the cores.

    .venv/bin/python benchmarks/attribution.py [--rounds 3] [--pairs 4] [--seq 16] [--n-layer 12]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import Quiet, gpt2_small_dir, headline, machine_report, median, torch_best  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--n-layer", type=int, default=12, help="fewer layers: a smoke test of the script, not a figure")
    ap.add_argument("--top", type=int, default=200, help="edges kept for faithfulness")
    args = ap.parse_args()
    import torch
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.tools.analysis import attribution_patching as tap

    import jaxlens

    print(machine_report())
    path = gpt2_small_dir(n_layer=args.n_layer)
    model = jaxlens.from_pretrained(path)
    torch_best()
    bridge = TransformerBridge.boot_transformers(str(path), device="cpu", dtype=torch.float32)
    bridge.enable_compatibility_mode()
    rng = np.random.default_rng(0)
    clean = rng.integers(1, model.cfg.d_vocab, (args.pairs, args.seq))
    corrupt = clean.copy()
    corrupt[:, args.seq // 2] = rng.integers(1, model.cfg.d_vocab, args.pairs)
    a, b = 5, 7

    def jm(lg):
        return lg[0, -1, a] - lg[0, -1, b]

    def tm(lg):
        return lg[0, -1, a] - lg[0, -1, b]

    ct, kt = torch.tensor(clean), torch.tensor(corrupt)
    edge_j, edge_t = jaxlens.EdgeAttributionConfig("edge"), tap.EdgeAttributionConfig(granularity="edge")
    circuit: dict = {}

    def j_edge():
        circuit["j"] = jaxlens.attribution_patch(model, clean, corrupt, jm, edge_j)
        return circuit["j"]

    def t_edge():
        circuit["t"] = tap.attribution_patch(bridge, ct, kt, tm, edge_t)
        return circuit["t"]

    fns = {
        "node: jaxlens": lambda: jaxlens.attribution_patch(model, clean, corrupt, jm),
        "node: TL": lambda: tap.attribution_patch(bridge, ct, kt, tm),
        "edge: jaxlens": j_edge,
        "edge: TL": t_edge,
        "faithfulness: jaxlens": lambda: jaxlens.faithfulness(model, clean[:1], corrupt[:1], jm,
                                                              circuit["j"].top_edges(args.top)),
        "faithfulness: TL": lambda: tap.faithfulness(bridge, ct[:1], kt[:1], tm, circuit["t"].top_edges(args.top)),
    }
    t0 = time.perf_counter()
    for name, f in fns.items():  # warm (jaxlens compiles here)
        f()
        if name == "faithfulness: jaxlens":
            print(f"first jaxlens calls (compiling): {time.perf_counter() - t0:.1f} s")
    times = {k: [] for k in fns}
    with Quiet() as q:
        for _ in range(args.rounds):
            for k, f in fns.items():
                s = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - s)
    n_edges = len(circuit["j"].edge_scores)
    ej = {(w.kind, w.position, w.layer, w.head, r.kind, r.position, r.layer, r.head): v
          for (w, r), v in circuit["j"].edge_scores.items()}
    et = {(w.kind, w.position, w.layer, w.head, r.kind, r.position, r.layer, r.head): v
          for (w, r), v in circuit["t"].edge_scores.items()}
    diff = max(abs(ej[k] - et[k]) for k in et)
    print(f"\nGPT-2-small shape ({args.n_layer} layers), {args.pairs} pairs x {args.seq} tokens, {n_edges} edges; "
          f"max |edge score diff| {diff:.1e}; {args.rounds} rounds alternating (median)")
    for k in fns:
        print(f"  {k}: {median(times[k]):.3f} s")
    print(q.summary())
    for what in ("node", "edge", "faithfulness"):
        ratio = median(times[f"{what}: TL"]) / median(times[f"{what}: jaxlens"])
        print("  " + headline(f"{what}: jaxlens vs TransformerLens speed", ratio, q, unit="x TransformerLens"))


if __name__ == "__main__":
    main()
