"""Causal suffixes packed into one row axis: what a patching grid's cells share a forward pass with.

A cell of a position grid (a patch at position p) needs only the positions >= p, after the
corrupted run's keys and values of the positions before p (`KVCache`). Cells starting late need
few rows: two cells whose suffixes fit in one prompt length run as one sequence of rows, each
row tagged with its prompt position, the first position its cell computes, and its segment
(cell). A row attends to the cached keys before its cell's start and to the rows of its own
segment at positions <= its own: the same keys, positions and mask the cell's own suffix run
would see, so the numbers are those of one run per cell (`jaxlens.edits.patching`).

The row axis is free of order (attention reads the explicit mask, positions come from the tags),
which lets `jaxlens.edits.patching` place every segment's metric positions at static rows.
This module imports nothing of the model but its helpers.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from jaxlens.model.layers import positions_from_mask

__all__ = ["PackedRows", "packed_attention"]


@partial(jax.tree_util.register_dataclass, data_fields=["positions", "starts", "segments"], meta_fields=[])
@dataclass(frozen=True)
class PackedRows:
    """The rows of one packed sequence, written after a cache of the prompt's keys and values.

    positions [rows] int32: each row's position in the prompt (an index of the cached slots).
    starts [rows] int32: the first prompt position its segment computes; the cached keys before
    it are read (a row with start = the prompt length reads every cached key: padding rows).
    segments [rows] int32: which segment the row belongs to; rows see only their own segment's.
    """

    positions: jax.Array
    starts: jax.Array
    segments: jax.Array


def packed_attention(full_mask: jax.Array, offset: jax.Array, rows: PackedRows
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(positions [batch rows], allowed [batch 1 rows key], key positions [batch key]) of packed
    `rows` written at cache slot `offset`; `full_mask` [batch key] is the cache's mask with the
    rows' own written at `offset` (slots before it: the prompt's positions, cached).

    A cached slot j is visible to a row when j < its start and slot j holds a real token; a
    packed slot when it holds a row of the same segment, at a position <= the row's, that is a
    real token. Position ids are the unpacked prompt's (the count of real tokens before)."""
    q, k_len = rows.positions.shape[0], full_mask.shape[1]
    prompt_pos = positions_from_mask(full_mask)  # slots < offset: the cached prompt's own ids
    positions = prompt_pos[:, rows.positions]  # [batch rows]
    slot = jnp.arange(k_len)
    cached = slot < offset  # [key]
    r = jnp.clip(slot - offset, 0, q - 1)  # the packed row behind each slot >= offset
    see_cached = cached[None, :] & (slot[None, :] < rows.starts[:, None])  # [rows key]
    see_packed = ~cached[None, :] & (rows.segments[r][None, :] == rows.segments[:, None]) & \
        (rows.positions[r][None, :] <= rows.positions[:, None])
    allowed = (see_cached | see_packed)[None, None] & (full_mask[:, None, None, :] > 0)
    key_pos = jnp.where(cached[None, :], prompt_pos, positions[:, r])
    return positions, allowed, key_pos
