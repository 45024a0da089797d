"""The KV cache as the model sees it: `KVCache` (every layer) and `LayerKV` (one layer's view).

TransformerLens keeps a per-layer list of growing tensors (concatenated every step) and a
`freeze` flag so a prefix can be reused. Here the buffers are allocated once,
`[layer batch kv_head max_len d_head]` (head-major, the layout attention reads: a decode step
transposes its new keys, never the whole buffer), and each forward writes its new keys and
values with `dynamic_update_slice` at `length`, returning a *new* cache: the old one is untouched, so a
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

    keys, values: [layer batch kv_head max_len d_head] in the model dtype (rotary already
    applied to keys); inside a decode loop, per-layer tuples of [batch*kv_head max_len d_head]
    (`split`). mask: [batch max_len] int32, 1 where a real token was written.
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
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.d_head)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, max_len), jnp.int32),
                   jnp.zeros((), jnp.int32))

    # --- shape ------------------------------------------------------------------------------
    @property
    def is_split(self) -> bool:
        """Whether keys/values are per-layer tuples (`split`) rather than stacked arrays."""
        return isinstance(self.keys, tuple)

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    @property
    def max_len(self) -> int:
        return self.mask.shape[1]

    @property
    def dtype(self) -> Any:
        return (self.keys[0] if self.is_split else self.keys).dtype

    @property
    def lengths(self) -> jax.Array:
        """[batch] real tokens per row so far, which is also the position of each row's next token."""
        return self.mask.sum(axis=-1)

    # --- the two forms ----------------------------------------------------------------------
    def split(self) -> "KVCache":
        """The same cache as one buffer per layer: tuples of [batch*kv_head max_len d_head].

        What a compiled decode loop carries. Each layer's attention then reads its buffer as it
        lies, with one batch axis (`Attention`'s grouped dots), and XLA updates it in place; a
        layer's slice of the stacked buffer, or any reshape between the update and the dot, costs
        a copy of that layer's whole cache on every step. `stacked` undoes it."""
        if self.is_split:
            return self
        lay = lambda a: tuple(x.reshape(-1, *x.shape[2:]) for x in a)  # noqa: E731
        return KVCache(lay(self.keys), lay(self.values), self.mask, self.length)

    def stacked(self) -> "KVCache":
        """The public form: keys/values stacked [layer batch kv_head max_len d_head]."""
        if not self.is_split:
            return self
        lay = lambda a: jnp.stack(a).reshape(len(a), self.batch_size, -1, *a[0].shape[1:])  # noqa: E731
        return KVCache(lay(self.keys), lay(self.values), self.mask, self.length)

    # --- prefix reuse -----------------------------------------------------------------------
    def fork(self, n: int) -> "KVCache":
        """Repeat every row `n` times (row i -> rows i*n .. i*n+n-1): one prefix, many continuations.

        A batch-1 prefix cache forked to n rows is the broadcast of that prefix to a batch.
        """
        n = _positive_int("KVCache.fork", "n", n)
        c = self.stacked()
        rep = lambda x, axis: jnp.repeat(x, n, axis=axis)  # noqa: E731
        return KVCache(rep(c.keys, 1), rep(c.values, 1), rep(c.mask, 0), c.length)

    # --- the model's side -------------------------------------------------------------------
    def at_layer(self, layer: int) -> "LayerKV":
        """Layer `layer`'s view for an unrolled model, written in place: the stacked buffers (the
        layer's slot), or a split cache's own buffer of that layer."""
        if self.is_split:
            return LayerKV(self.keys[layer], self.values[layer], self.length)
        return LayerKV(self.keys, self.values, self.length, layer)

    def written(self, layer: int, view: "LayerKV") -> "KVCache":
        """This cache after `at_layer(layer)`'s view was updated to `view` (mask and length as they were)."""
        if not self.is_split:
            return KVCache(view.keys, view.values, self.mask, self.length)
        put = lambda bufs, buf: bufs[:layer] + (buf,) + bufs[layer + 1:]  # noqa: E731
        return KVCache(put(self.keys, view.keys), put(self.values, view.values), self.mask, self.length)


@partial(jax.tree_util.register_dataclass, data_fields=["keys", "values", "index"], meta_fields=["layer"])
@dataclass(frozen=True)
class LayerKV:
    """One layer's view of a `KVCache`: what its attention reads and writes.

    keys, values: with `layer` an int, every layer's buffers [layer batch kv_head max_len d_head]
    (the unrolled model writes its slice in place: no per-layer copies re-stacked); with
    `layer=None`, this layer's own: [batch kv_head max_len d_head] (a scan's per-layer slice) or
    [batch*kv_head max_len d_head] (a `split` cache's).
    index: int32 scalar, the buffer slot where the new keys/values go (`KVCache.length`).
    """

    keys: jax.Array
    values: jax.Array
    index: jax.Array
    layer: int | None = None

    def update(self, k: jax.Array, v: jax.Array, dtype: Any) -> tuple["LayerKV", jax.Array, jax.Array]:
        """Write k, v [batch q kv_head d_head] at `index`: (new view, this layer's keys and values
        [batch*kv_head max_len d_head] in `dtype`, the cached ones and the new).

        Only the q new rows are moved to the buffer's head-major layout: a split buffer is then
        read by attention as it lies (see `KVCache.split`)."""
        b, q, n_kv, d = k.shape
        k, v = k.transpose(0, 2, 1, 3).astype(self.keys.dtype), v.transpose(0, 2, 1, 3).astype(self.values.dtype)
        if self.layer is None:  # this layer's own buffer: a split cache's (3-D) or a scan's slice (4-D)
            lead = self.keys.shape[:-2]  # (batch*kv_head,) or (batch, kv_head)
            at = (0,) * len(lead) + (self.index, 0)
            keys = jax.lax.dynamic_update_slice(self.keys, k.reshape(*lead, q, d), at)
            values = jax.lax.dynamic_update_slice(self.values, v.reshape(*lead, q, d), at)
            k_all, v_all = keys, values
        else:
            at = (self.layer, 0, 0, self.index, 0)
            keys = jax.lax.dynamic_update_slice(self.keys, k[None], at)
            values = jax.lax.dynamic_update_slice(self.values, v[None], at)
            k_all, v_all = keys[self.layer], values[self.layer]
        flat = lambda a: a.reshape(b * n_kv, *a.shape[-2:]).astype(dtype)  # noqa: E731
        return LayerKV(keys, values, self.index, self.layer), flat(k_all), flat(v_all)
