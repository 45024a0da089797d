"""`--stats`: statistics of a whole sweep computed on device; no per-prompt array leaves it.

Per layer and head, over every real query position except each prompt's first (BOS) position:
mean attention to the first token (BOS), mean attention to the previous token, and mean
pattern entropy (nats). Induction score per head on repeated random-token probes ([BOS] + r + r,
TransformerLens's head-detector definition: the mean attention from each second-half position q
to q - T + 1). For other hooks chosen with `--names`, per-feature Welford mean and variance over
all real tokens (`jaxlens.aggregate.update_stats`). Written as `<model>/stats.npz` and
`<model>/stats.json`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.cache.aggregate import RunningStats, update_stats
from jaxlens.model.forward import forward

__all__ = ["HEAD_STATS", "pattern_sums", "init_state", "stats_step", "induction_scores", "finalize", "write_stats"]

HEAD_STATS = ("bos_attention", "prev_token_attention", "entropy")


def pattern_sums(pattern: jax.Array, mask: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sums over batch and query positions of (attention to the first real token, attention to
    the previous token, entropy), per head: ([3 H], weight count). `pattern` [B H Q K], `mask`
    [B S] 0/1, `valid` [B] 0/1 (filler rows excluded). Works for left and right padding."""
    B, H, S, _ = pattern.shape
    m = mask.astype(jnp.float32)
    first = jnp.argmax(mask, axis=1)  # first real position (BOS) per row
    q = jnp.arange(S)
    w = m * (q[None, :] != first[:, None]) * valid[:, None].astype(jnp.float32)  # [B Q]
    p = pattern.astype(jnp.float32)
    to_first = jnp.take_along_axis(p, jnp.broadcast_to(first[:, None, None, None], (B, H, S, 1)), axis=-1)[..., 0]
    prev = jnp.concatenate([jnp.zeros((B, H, 1), p.dtype), jnp.diagonal(p, offset=-1, axis1=2, axis2=3)], axis=-1)
    ent = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
    sums = jnp.stack([jnp.einsum("bhq,bq->h", x, w) for x in (to_first, prev, ent)])
    return sums, w.sum()


def init_state(n_layers: int, n_heads: int) -> dict[str, Any]:
    """Zero running sums [L 3 H], a zero query count and empty Welford statistics."""
    return dict(sums=jnp.zeros((n_layers, 3, n_heads), jnp.float32), count=jnp.zeros((), jnp.float32),
                welford=RunningStats.empty())


@partial(jax.jit, static_argnames=("cfg", "capture", "pattern_names", "precision"))
def stats_step(state: dict[str, Any], params: Any, tokens: jax.Array, mask: jax.Array, valid: jax.Array, *,
               cfg: Any, capture: frozenset[str], pattern_names: tuple[str, ...],
               precision: str | None) -> dict[str, Any]:
    """One batch folded into the running statistics, all on device."""
    _, acts, _ = forward(params, cfg, tokens, mask, capture=capture, precision=precision)
    sums, count = state["sums"], state["count"]
    if pattern_names:
        per = [pattern_sums(acts[n], mask, valid) for n in pattern_names]
        sums = sums + jnp.stack([s for s, _ in per])
        count = count + per[0][1]
    other = {k: v for k, v in acts.items() if k not in pattern_names and v.ndim >= 2 and v.shape[1] == mask.shape[1]}
    welford = state["welford"]
    if other:
        welford = update_stats(welford, other, mask * valid[:, None], axes=(0, 1))
    return dict(sums=sums, count=count, welford=welford)


def induction_scores(params: Any, cfg: Any, bos: int | None, n_probes: int = 8, half: int | None = None,
                     seed: int = 0, precision: str | None = None) -> tuple[np.ndarray, int]:
    """Per layer and head [L H]: mean attention from second-half positions of [BOS] + r + r
    (r: `half` random tokens, `n_probes` probes) to the token after the earlier copy."""
    T = half if half is not None else max(1, min(32, (cfg.n_ctx - 1) // 2))
    rng = np.random.default_rng(seed)
    r = rng.integers(1, cfg.d_vocab, size=(n_probes, T))
    lead = [[bos]] * n_probes if (cfg.default_prepend_bos and bos is not None) else np.zeros((n_probes, 0), int)
    toks = np.concatenate([np.asarray(lead, np.int64).reshape(n_probes, -1), r, r], axis=1).astype(np.int32)
    off = toks.shape[1] - 2 * T
    names = frozenset(f"blocks.{l}.attn.hook_pattern" for l in range(cfg.n_layers))
    _, acts, _ = jax.jit(forward, static_argnames=("cfg", "capture", "precision"))(
        params, cfg, jnp.asarray(toks), jnp.ones(toks.shape, jnp.int32), capture=names, precision=precision)
    q = np.arange(off + T, off + 2 * T)
    out = np.zeros((cfg.n_layers, cfg.n_heads), np.float64)
    for l in range(cfg.n_layers):
        p = np.asarray(acts[f"blocks.{l}.attn.hook_pattern"], np.float64)  # [N H S S]
        out[l] = p[:, :, q, q - T + 1].mean(axis=(0, 2))
    return out.astype(np.float32), T


def finalize(state: dict[str, Any]) -> dict[str, np.ndarray]:
    """Means from the running sums, and each Welford hook's count, mean and variance."""
    sums = np.asarray(state["sums"], np.float64)
    count = float(state["count"])
    out = {name: (sums[:, i] / max(count, 1.0)).astype(np.float32) for i, name in enumerate(HEAD_STATS)}
    out["n_queries"] = np.asarray(count, np.float64)
    w: RunningStats = state["welford"]
    var = w.variance()
    for k in w.mean:
        out[f"{k}.mean"] = np.asarray(w.mean[k])
        out[f"{k}.var"] = np.asarray(var[k])
        out[f"{k}.count"] = np.asarray(w.count[k])
    return out


def write_stats(mdir: Any, summary: Any, state: dict[str, Any], params: Any, cfg: Any, bos: int | None, n_probes: int,
                precision: str | None) -> None:
    """`<model>/stats.npz` (arrays) and `<model>/stats.json` (the same, as lists, with the definitions)."""
    import json
    from pathlib import Path

    from jaxlens.sweep.writer import atomic_savez, atomic_write_text

    arrays = finalize(state)
    if n_probes > 0:
        arrays["induction_score"], half = induction_scores(params, cfg, bos, n_probes, seed=0, precision=precision)
    else:
        half = 0
    mdir = Path(mdir)
    atomic_savez(mdir / "stats.npz", arrays)
    doc = dict(model_name=summary.model_name, n_prompts=summary.n_computed, n_tokens=summary.n_tokens,
               n_queries=float(arrays["n_queries"]), induction_probes=dict(n=n_probes, half=half, seed=0),
               definitions=__doc__.strip(),
               head_stats={k: np.asarray(v).tolist() for k, v in arrays.items()
                           if k in HEAD_STATS or k == "induction_score"},
               hooks={k: np.asarray(v).tolist() for k, v in arrays.items() if "." in k and k.endswith((".mean", ".var"))})
    atomic_write_text(mdir / "stats.json", json.dumps(doc))
