"""The KV cache as the model sees it: `KVCache` (every layer) and `LayerKV` (one layer's view).

TransformerLens keeps a per-layer list of growing tensors (concatenated every step) and a
`freeze` flag so a prefix can be reused. Here the buffers are allocated once,
`[layer batch max_len kv_head d_head]`, and each forward writes its new keys and values with
`dynamic_update_slice` at `length`, returning a *new* cache: the old one is untouched, so a
prefix cache built once serves any number of continuations (`fork` broadcasts it to a batch).

Rows share the buffer index (`length`, a traced scalar, so one compiled program serves every
step); each row's real tokens are marked in `mask`, and positions come from the cumulative
sum of the mask, so left-padded prompts keep the right rotary/learned positions when extended.

The same `KVCache` goes from the public API (`forward(..., kv=)`, `HookedTransformer(...,
kv_cache=)`, `generate`) into `Transformer.__call__`, which hands each block a `LayerKV`: the
buffers that block's attention writes, and the write index. This module imports nothing of
the model, so the model can import it (`jaxlens.kv_cache` re-exports `KVCache`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.config import ModelConfig

__all__ = ["KVCache", "LayerKV"]


def _positive_int(who: str, name: str, v: Any) -> int:
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{who}: {name} must be a positive int, got {v!r}")
    return int(v)


@partial(jax.tree_util.register_dataclass, data_fields=["keys", "values", "mask", "length"], meta_fields=[])
@dataclass(frozen=True)
class KVCache:
    """Past keys/values of every layer.

    keys, values: [layer batch max_len kv_head d_head] in the model dtype (rotary already
    applied to keys). mask: [batch max_len] int32, 1 where a real token was written.
    length: int32 scalar, the number of buffer slots written so far (same for every row).
    """

    keys: jax.Array
    values: jax.Array
    mask: jax.Array
    length: jax.Array

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype: Any = jnp.float32) -> "KVCache":
        """An empty cache for `batch` rows of up to `max_len` tokens each."""
        batch, max_len = _positive_int("KVCache.init", "batch", batch), _positive_int("KVCache.init", "max_len", max_len)
        shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.d_head)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, max_len), jnp.int32),
                   jnp.zeros((), jnp.int32))

    # --- shape ------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def max_len(self) -> int:
        return self.keys.shape[2]

    @property
    def dtype(self) -> Any:
        return self.keys.dtype

    @property
    def lengths(self) -> jax.Array:
        """[batch] real tokens per row so far, which is also the position of each row's next token."""
        return self.mask.sum(axis=-1)

    # --- prefix reuse -----------------------------------------------------------------------
    def fork(self, n: int) -> "KVCache":
        """Repeat every row `n` times (row i -> rows i*n .. i*n+n-1): one prefix, many continuations.

        A batch-1 prefix cache forked to n rows is the broadcast of that prefix to a batch.
        """
        n = _positive_int("KVCache.fork", "n", n)
        rep = lambda x, axis: jnp.repeat(x, n, axis=axis)  # noqa: E731
        return KVCache(rep(self.keys, 1), rep(self.values, 1), rep(self.mask, 0), self.length)

    # --- the model's side -------------------------------------------------------------------
    def at_layer(self, layer: int) -> "LayerKV":
        """Layer `layer`'s view for an unrolled model: the stacked buffers, written in place."""
        return LayerKV(self.keys, self.values, self.length, layer)


@partial(jax.tree_util.register_dataclass, data_fields=["keys", "values", "index"], meta_fields=["layer"])
@dataclass(frozen=True)
class LayerKV:
    """One layer's view of a `KVCache`: what its attention reads and writes.

    keys, values: with `layer` an int, every layer's buffers [layer batch max_len kv_head d_head]
    (the unrolled model writes its slice in place: no per-layer copies re-stacked); with
    `layer=None`, this layer's own [batch max_len kv_head d_head] (a scan's per-layer slice).
    index: int32 scalar, the buffer slot where the new keys/values go (`KVCache.length`).
    """

    keys: jax.Array
    values: jax.Array
    index: jax.Array
    layer: int | None = None

    def update(self, k: jax.Array, v: jax.Array, dtype: Any) -> tuple["LayerKV", jax.Array, jax.Array]:
        """Write k, v [batch q kv_head d_head] at `index`: (new view, this layer's keys and values
        [batch max_len kv_head d_head] in `dtype`, the cached ones and the new)."""
        if self.layer is None:
            at = (0, self.index, 0, 0)
            keys = jax.lax.dynamic_update_slice(self.keys, k.astype(self.keys.dtype), at)
            values = jax.lax.dynamic_update_slice(self.values, v.astype(self.values.dtype), at)
            k_all, v_all = keys, values
        else:
            at = (self.layer, 0, self.index, 0, 0)
            keys = jax.lax.dynamic_update_slice(self.keys, k[None].astype(self.keys.dtype), at)
            values = jax.lax.dynamic_update_slice(self.values, v[None].astype(self.values.dtype), at)
            k_all, v_all = keys[self.layer], values[self.layer]
        return LayerKV(keys, values, self.index, self.layer), k_all.astype(dtype), v_all.astype(dtype)
