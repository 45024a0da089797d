"""Cache analyses and cache combination: jaxlens vs TransformerLens and an easyroutine-style loop.

1. Direct logit attribution on a GPT-2-small shape (random weights, 12 x 768, vocab 50257,
   batch 8 x 128, f32): `get_full_resid_decomposition(expand_neurons=True)` then `logit_attrs`,
   jaxlens vs TransformerLens 4.x (TransformerBridge, compatibility mode) on the same tokens,
   interleaved in one process. At every position the neuron-expanded stack would be
   37,011 components x 8 x 128 x 768 floats = 116 GB (TransformerLens too), so both take the last
   position (`pos_slice=-1`), as a DLA user does: a 0.9 GB stack. jaxlens is timed as two method
   calls (each a compiled program) and as one `jax.jit` around both; the printed compiled
   memory shows XLA still materialises the stack inside the single program, so the two are
   equally fast.
2. Combining 256 per-batch caches (12 layers x (last-position residual [8, 768] + last-query
   pattern [8, 12, 128]) + tokens [8, 128]; 0.9 MB each, 227 MB in all): jaxlens's deferred
   `combine` vs an easyroutine-style loop that `torch.cat`s every new cache onto the running one
   (written here as the baseline; easyroutine's `ActivationCache.cat` does this per key).

    .venv/bin/python benchmarks/cache_analysis.py [--rounds 5] [--caches 256] [--no-tl]

Prints the machine, medians (seconds) and ratios; the first call of each jaxlens program includes
compilation and is reported separately. A ratio is withheld ("noisy") when other processes took
more than ~10% of the cores while its section ran (`common.Quiet`); torch runs at its best
(`common.torch_best`: threads = cores, `inference_mode`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--rounds", type=int, default=5)
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--seq", type=int, default=128)
ap.add_argument("--caches", type=int, default=256)
ap.add_argument("--pairwise-rounds", type=int, default=1, help="rounds of the (slow, quadratic) baseline")
ap.add_argument("--no-tl", action="store_true", help="skip TransformerLens")
args = ap.parse_args()

sys.path.insert(0, os.path.dirname(__file__))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import jaxlens  # noqa: E402
from common import Quiet, fmt_table, gpt2_small_dir, headline, interleaved, machine_report, median, torch_best  # noqa: E402,E501
from jaxlens.cache import aggregate as agg  # noqa: E402
from jaxlens.cache import analysis as A  # noqa: E402
from jaxlens.cache.slice import Slice  # noqa: E402
from jaxlens.cache.activation_cache import ActivationCache  # noqa: E402


def timed_first(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def dla() -> tuple[list[list[str]], list[str]]:
    path = gpt2_small_dir()
    B, T = args.batch, args.seq
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 50257, (B, T)).astype(np.int32)
    answers = rng.integers(0, 50257, (B,)).astype(np.int32)

    model = jaxlens.from_pretrained_no_processing(path, precision=None)
    _, cache = model.run_with_cache(toks)
    jax.block_until_ready(cache)

    def ours_methods():
        stack = cache.get_full_resid_decomposition(expand_neurons=True, pos_slice=-1)
        return cache.logit_attrs(stack, answers, pos_slice=-1).block_until_ready()

    fused_fn = jax.jit(lambda c, a: c.logit_attrs(c.get_full_resid_decomposition(expand_neurons=True, pos_slice=-1),
                                                  a, pos_slice=-1))

    def ours_fused():
        return fused_fn(cache, answers).block_until_ready()

    ours, first_methods = timed_first(ours_methods)
    fused, first_fused = timed_first(ours_fused)
    np.testing.assert_allclose(np.asarray(fused), np.asarray(ours), rtol=1e-3, atol=1e-3)
    _, labels = cache.get_full_resid_decomposition(expand_neurons=True, pos_slice=-1, return_labels=True)
    n_comp = len(labels)
    print(f"DLA stack: {n_comp} components x batch {B} x d_model 768 at the last position "
          f"({n_comp * B * 768 * 4 / 1e9:.2f} GB); all positions would be "
          f"{n_comp * B * T * 768 * 4 / 1e9:.0f} GB")
    temp = lambda f, *a, **k: f.lower(*a, **k).compile().memory_analysis().temp_size_in_bytes / 1e9  # noqa: E731
    print(f"compiled temporary memory: one jit {temp(fused_fn, cache, answers):.2f} GB; the two methods "
          f"{temp(A.get_full_resid_decomposition_jit, cache, Slice(-1), layer=12, expand_neurons=True):.2f} GB "
          f"+ the {n_comp * B * 768 * 4 / 1e9:.2f} GB stack they hand over")
    fns = {"jaxlens (2 method calls)": ours_methods, "jaxlens (one jit)": ours_fused}
    if not args.no_tl:
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers(str(path), device="cpu", dtype=torch.float32)
        bridge.enable_compatibility_mode(no_processing=True)
        toks_t, ans_t = torch.tensor(toks, dtype=torch.long), torch.tensor(answers, dtype=torch.long)
        with torch_best():
            _, ref = bridge.run_with_cache(toks_t)

        def tl():
            with torch_best():
                stack = ref.get_full_resid_decomposition(expand_neurons=True, pos_slice=-1)
                return ref.logit_attrs(stack, ans_t, pos_slice=-1)

        ref_out = tl()
        with torch_best():  # the cache holds inference tensors: read it under inference_mode too
            _, ref_labels = ref.get_full_resid_decomposition(expand_neurons=True, pos_slice=-1, return_labels=True)
        assert ref_labels == labels, "labels differ from TransformerLens"
        # sums over 768 terms of a random model's large activations: compare at float32 resolution
        scale = float(np.abs(ref_out.numpy()).max())
        np.testing.assert_allclose(np.asarray(ours), ref_out.numpy(), rtol=1e-3, atol=1e-4 * scale)
        print("jaxlens == TransformerLens (labels identical; values within float32 rounding)")
        fns = {"TransformerLens": tl, **fns}
    with Quiet() as q:
        times = interleaved(fns, rounds=args.rounds, warmup=0 if args.no_tl else 1)
    base = median(times["TransformerLens"]) if "TransformerLens" in times else None
    rows = []
    for k, ts in times.items():
        first = {"jaxlens (2 method calls)": first_methods, "jaxlens (one jit)": first_fused}.get(k)
        ratio = "-" if not base else "noisy" if q.noisy else f"{base / median(ts):.2f}x"
        rows.append([k, f"{median(ts):.3f}", f"{first:.2f}" if first else "-", ratio])
    lines = [q.summary()]
    if base:
        lines.append(headline("DLA, jaxlens (one jit) vs TransformerLens", base / median(times["jaxlens (one jit)"]), q))
    return rows, lines


def make_caches(n: int):
    rng = np.random.default_rng(1)
    caches, torch_caches = [], []
    for _ in range(n):
        d = {}
        for l in range(12):
            d[f"blocks.{l}.hook_resid_post"] = rng.normal(size=(8, 768)).astype(np.float32)
            d[f"blocks.{l}.attn.hook_pattern"] = rng.random((8, 12, 128)).astype(np.float32)
        d["tokens"] = rng.integers(0, 50257, (8, 128)).astype(np.int32)
        caches.append(ActivationCache({k: jnp.asarray(v) for k, v in d.items()}))
        torch_caches.append({k: torch.from_numpy(v) for k, v in d.items()})
    return caches, torch_caches


def easyroutine_pairwise(torch_caches):
    """The baseline: easyroutine's `cat`, one cache at a time (torch.cat of old and new per key)."""
    acc: dict = {}
    for c in torch_caches:
        for k, v in c.items():
            acc[k] = v if k not in acc else torch.cat([acc[k], v], dim=0)
    return acc


def combination() -> tuple[list[list[str]], list[str]]:
    caches, torch_caches = make_caches(args.caches)
    total = sum(agg.nbytes(c.to_dict()) for c in caches)
    print(f"combining {args.caches} caches of {agg.human(total / args.caches)} ({agg.human(total)} in all)")

    def deferred():
        d = agg.Deferred()
        for c in caches:
            d.add(c)
        return jax.block_until_ready(d.result())

    out, first = timed_first(deferred)
    ref = easyroutine_pairwise(torch_caches[:8])
    for k in ref:
        np.testing.assert_array_equal(np.asarray(out[k])[: ref[k].shape[0]], ref[k].numpy())
    torch_best()  # threads = cores for the baseline's torch.cat
    with Quiet() as q:
        times = interleaved({"jaxlens deferred combine": deferred}, rounds=args.rounds, warmup=0)
        pair = interleaved({"easyroutine-style pairwise torch.cat": lambda: easyroutine_pairwise(torch_caches)},
                           rounds=args.pairwise_rounds, warmup=0)
    base = median(pair["easyroutine-style pairwise torch.cat"])
    ours = median(times["jaxlens deferred combine"])
    rows = [["easyroutine-style pairwise torch.cat", f"{base:.3f}", "-", "1.00x"],
            ["jaxlens deferred combine", f"{ours:.3f}", f"{first:.2f}", "noisy" if q.noisy else f"{base / ours:.1f}x"]]
    return rows, [q.summary(), headline("combine, jaxlens deferred vs easyroutine-style pairwise cat", base / ours, q)]


def main() -> None:
    torch_best()
    print(machine_report())
    print(f"rounds={args.rounds}")
    header = ["", "median s", "first call s (compile)", "speed-up vs baseline"]
    print("\n1. get_full_resid_decomposition(expand_neurons=True, pos_slice=-1) + logit_attrs, "
          f"GPT-2-small shape, batch {args.batch} x {args.seq}")
    rows, lines = dla()
    print(fmt_table(rows, header))
    print("\n".join(lines))
    print(f"\n2. combining {args.caches} batch caches")
    rows, lines = combination()
    print(fmt_table(rows, header))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
