"""Shape buckets: prompts sorted by length, lengths and batch sizes rounded so that a whole
sweep compiles a handful of programs, and batches padded with a real attention mask."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Batch", "bucket_length", "plan_batches", "pad_batch"]

MIN_BUCKET = 16


def bucket_length(n: int, n_ctx: int, min_bucket: int = MIN_BUCKET) -> int:
    """The padded length of a sequence of `n` tokens: the next power of two (at least
    `min_bucket`), capped at `n_ctx`. Powers of two keep the number of programs logarithmic in
    the longest prompt, at under 2x padding."""
    if n < 1:
        raise ValueError(f"a sequence needs at least one token, got {n}")
    if n > n_ctx:
        raise ValueError(f"a sequence of {n} tokens exceeds n_ctx={n_ctx}; truncate it first")
    b = max(min_bucket, 1 << (n - 1).bit_length())
    return min(b, n_ctx)


@dataclass(frozen=True)
class Batch:
    """One compiled-program call: `rows` index the prompts (real rows first), padded to
    `batch` rows of `length` tokens."""

    rows: tuple[int, ...]
    length: int
    batch: int


def plan_batches(lengths: list[int] | np.ndarray, batch_size: int, n_ctx: int, multiple: int = 1) -> list[Batch]:
    """Batches over prompts of these token lengths (BOS included): longest first (out-of-memory
    shows at once, as in pattern_lens), grouped by bucket length, each batch `batch_size`
    rows rounded up to a multiple of `multiple` (the data-parallel device count), so the
    number of programs equals the number of length buckets used."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    rows = -(-batch_size // multiple) * multiple
    lengths = np.asarray(lengths, dtype=np.int64)
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    buckets: dict[int, list[int]] = {}
    for i in order:
        buckets.setdefault(bucket_length(int(lengths[i]), n_ctx), []).append(i)
    out = []
    for length in sorted(buckets, reverse=True):
        idx = buckets[length]
        out.extend(Batch(tuple(idx[s:s + rows]), length, rows) for s in range(0, len(idx), rows))
    return out


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
