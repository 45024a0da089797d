"""Mixture-of-experts dispatch on a Mixtral-shaped layer: the tiled sort-by-expert dispatch
(`sorted_experts`, several tile sizes) and `jax.lax.ragged_dot` (`ragged_experts`) against the naive
every-expert-on-every-token computation (`dense_experts`), and HF PyTorch's MixtralSparseMoeBlock.

Random weights and tokens, f32, each jitted and timed interleaved in one process; prints the machine,
ms per call and the ratio to dense, or "noisy" instead of the ratios when other processes took more
than ~10% of the cores meanwhile (`common.Quiet`; benchmarks need a quiet machine). torch runs at
its best (`common.torch_best`: threads = cores, `inference_mode`).
On CPU, XLA lowers ragged_dot densely (masked), so "ragged" there costs about as much as "dense";
on GPU/TPU it is a grouped-matmul kernel.

    .venv/bin/python benchmarks/moe.py [--tokens 2048] [--d-model 1024] [--d-mlp 3584] [--experts 8] [--k 2]
    .venv/bin/python benchmarks/moe.py --quick      # tiny sizes: checks that it runs
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import Quiet, fmt_table, headline, interleaved, machine_report, median, torch_best  # noqa: E402
from jaxlens.model.moe import dense_experts, ragged_experts, route, sorted_experts, tile_rows  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048, help="batch * pos")
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--d-mlp", type=int, default=3584, help="each expert's hidden size (Mixtral: 3.5 d_model)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-torch", action="store_true", help="skip HF PyTorch's MixtralSparseMoeBlock")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds (a smoke run, not a measurement)")
    a = ap.parse_args()
    if a.quick:
        a.tokens, a.d_model, a.d_mlp, a.experts, a.k, a.rounds = 64, 32, 112, 8, 2, 2
    T, D, F, E, k = a.tokens, a.d_model, a.d_mlp, a.experts, a.k
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(T, D)).astype(np.float32))
    Wr = jnp.asarray(rng.normal(0, D ** -0.5, size=(D, E)).astype(np.float32))
    Wg, Wi = (jnp.asarray(rng.normal(0, D ** -0.5, size=(E, D, F)).astype(np.float32)) for _ in range(2))
    Wo = jnp.asarray(rng.normal(0, F ** -0.5, size=(E, F, D)).astype(np.float32))

    def layer(experts):
        """The routed layer (router, top-k, experts, weighted sum) with the given dispatch, jitted."""
        @jax.jit
        def run(x):
            w, idx = route(x @ Wr, k, True)
            return jnp.einsum("tk,tkd->td", w, experts(x, idx, Wg, Wi, Wo, "silu"))
        return run

    fns = {"dense (every expert, every token)": layer(dense_experts),
           "ragged_dot": layer(ragged_experts)}
    default_tile = tile_rows(T * k, E)
    for tile in sorted({default_tile, 32, 128}):
        label = f"sorted, tile {tile}" + (" (default)" if tile == default_tile else "")
        fns[label] = layer(lambda x, idx, *w, tile=tile: sorted_experts(x, idx, *w, block=tile))
    ref = np.asarray(fns["dense (every expert, every token)"](x))
    for name, f in fns.items():  # every dispatch computes the same layer
        np.testing.assert_allclose(np.asarray(f(x)), ref, rtol=2e-3, atol=2e-3, err_msg=name)
    calls = {n: (lambda f=f: f(x).block_until_ready()) for n, f in fns.items()}
    if not a.no_torch:
        import torch
        import transformers
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        blk = MixtralSparseMoeBlock(transformers.MixtralConfig(hidden_size=D, intermediate_size=F,
                                                               num_local_experts=E, num_experts_per_tok=k)).eval()
        with torch.no_grad():
            blk.gate.weight.copy_(torch.tensor(np.asarray(Wr).T))
            blk.experts.gate_up_proj.copy_(torch.tensor(np.concatenate([np.asarray(Wg), np.asarray(Wi)], -1)
                                                        .transpose(0, 2, 1)))
            blk.experts.down_proj.copy_(torch.tensor(np.asarray(Wo).transpose(0, 2, 1)))
        xt = torch.tensor(np.asarray(x))[None]

        def hf() -> object:
            with torch_best():
                return blk(xt)

        np.testing.assert_allclose(hf()[0].numpy(), ref, rtol=2e-3, atol=2e-3, err_msg="HF")
        calls["HF PyTorch MixtralSparseMoeBlock"] = hf
    print(machine_report())
    with Quiet() as q:
        times = interleaved(calls, rounds=a.rounds)
    dense = median(times["dense (every expert, every token)"])
    rows = [[n, f"{median(t) * 1e3:.2f}", "noisy" if q.noisy else f"{dense / median(t):.2f}x"]
            for n, t in times.items()]
    print(f"MoE layer: tokens={T} d_model={D} d_mlp={F} experts={E} k={k} f32, backend={jax.default_backend()}, "
          f"{a.rounds} rounds (median)")
    print(fmt_table(rows, ["dispatch", "ms / call", "speed-up vs dense"]))
    print(q.summary())
    best = min((n for n in times if n.startswith("sorted")), key=lambda n: median(times[n]))
    print(headline(f"best sorted dispatch ({best}) vs dense", dense / median(times[best]), q))
    if "HF PyTorch MixtralSparseMoeBlock" in times:
        hf_t = median(times["HF PyTorch MixtralSparseMoeBlock"])
        print(headline(f"best sorted dispatch ({best}) vs HF PyTorch", hf_t / median(times[best]), q))


if __name__ == "__main__":
    main()
