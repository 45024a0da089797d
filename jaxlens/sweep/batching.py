"""Shape buckets: prompts sorted by length into batches, each padded to one of a few lengths
chosen for the least padded work (a whole sweep compiles a handful of programs), and padded with
a real attention mask."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Batch", "MAX_PROGRAMS", "PROGRAM_COST", "plan_batches", "pad_batch"]

MAX_PROGRAMS = 8  # padded lengths a sweep may compile (issue 12's budget)
PROGRAM_COST = 4096  # a compile's price in padded tokens: about one 32 x 128 GPT-2-small batch on a CPU
LENGTH_STEP = 8  # padded lengths are multiples of this (or n_ctx)


@dataclass(frozen=True)
class Batch:
    """One compiled-program call: `rows` index the prompts (real rows first), padded to
    `batch` rows of `length` tokens."""

    rows: tuple[int, ...]
    length: int
    batch: int


def _round_up(n: int, step: int, n_ctx: int) -> int:
    return min(-(-n // step) * step, n_ctx)


def _choose_lengths(cands: np.ndarray, counts: np.ndarray, cost: np.ndarray, max_programs: int,
                    program_cost: float) -> np.ndarray:
    """The padded lengths, a subset of the sorted candidates `cands` that always holds the largest,
    minimising padded work plus `program_cost` per length: `counts[i]` batches need at least
    `cands[i]`, each pads to the smallest chosen length >= its need, and a batch padded to
    `cands[j]` costs `cost[j]`. Exact: a dynamic program over (lengths used, largest so far)."""
    m = len(cands)
    c = np.cumsum(counts).astype(np.float64)  # batches needing <= cands[j]
    f = c * cost  # f[j]: least work covering cands[:j+1] with k lengths, the largest cands[j]
    back = [np.full(m, -1)]
    best_k, best = 1, f[-1] + program_cost
    for k in range(2, min(max_programs, m) + 1):
        # t[i, j] = f[i] + (batches in (cands[i], cands[j]]) * cost[j], for i < j
        t = f[:, None] + (c[None, :] - c[:, None]) * cost[None, :]
        t[np.tril_indices(m)] = np.inf
        arg = t.argmin(axis=0)
        f = t[arg, np.arange(m)]
        back.append(arg)
        if f[-1] + k * program_cost < best:
            best_k, best = k, f[-1] + k * program_cost
    picked, j = [], m - 1
    for k in range(best_k, 0, -1):
        picked.append(j)
        j = int(back[k - 1][j])
    return cands[np.array(picked[::-1])]


def plan_batches(lengths: list[int] | np.ndarray, batch_size: int, n_ctx: int, multiple: int = 1,
                 max_programs: int = MAX_PROGRAMS, attn_len: float = 512.0,
                 program_cost: float = PROGRAM_COST) -> list[Batch]:
    """Batches over prompts of these token lengths (BOS included), as pattern_lens forms them:
    longest first (an out-of-memory shows at once), `batch_size` consecutive prompts per batch,
    rounded up to a multiple of `multiple` (the data-parallel device count). Each batch is padded
    to one of at most `max_programs` lengths, chosen to minimise the padded work (rows x
    `length * (1 + length / attn_len)`: per-token matmuls plus attention's quadratic part) plus
    `program_cost` padded tokens per compiled program, so a small sweep compiles one or two
    programs and a large one pads each batch to within a few tokens of its longest prompt."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    if max_programs < 1:
        raise ValueError(f"max_programs must be >= 1, got {max_programs}")
    rows = -(-batch_size // multiple) * multiple
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        return []
    if lengths.min() < 1:
        raise ValueError(f"a sequence needs at least one token, got {int(lengths.min())}")
    if lengths.max() > n_ctx:
        raise ValueError(f"a sequence of {int(lengths.max())} tokens exceeds n_ctx={n_ctx}; truncate it first")
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    groups = [tuple(order[s:s + rows]) for s in range(0, len(order), rows)]
    step = max(LENGTH_STEP, 1 << max(0, (n_ctx // 1024 - 1).bit_length()))  # at most ~1024 candidates
    need = np.array([_round_up(int(lengths[g[0]]), step, n_ctx) for g in groups])
    cands, per = np.unique(need, return_counts=True)
    chosen = _choose_lengths(cands, per, rows * cands * (1 + cands / attn_len), max_programs, program_cost)
    pick = chosen[np.searchsorted(chosen, need)]
    return [Batch(g, int(n), rows) for g, n in zip(groups, pick)]


def pad_batch(seqs: list[list[int]], length: int, batch: int, pad_id: int,
              padding_side: str = "right") -> tuple[np.ndarray, np.ndarray]:
    """int32 tokens and 0/1 mask [batch length]: each sequence on the `padding_side`-padded
    side; rows past `len(seqs)` are filler (one real token, so no softmax row is empty) and
    are never written out."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    toks = np.full((batch, length), pad_id, np.int32)
    mask = np.zeros((batch, length), np.int32)
    for r in range(batch):
        s = seqs[r] if r < len(seqs) else [pad_id]
        if len(s) > length:
            raise ValueError(f"sequence of {len(s)} tokens does not fit a bucket of {length}")
        sl = slice(length - len(s), length) if padding_side == "left" else slice(0, len(s))
        toks[r, sl] = s
        mask[r, sl] = 1
    return toks, mask
