"""KVCache: preallocated past keys and values as an immutable pytree.

TransformerLens keeps a per-layer list of growing tensors (concatenated every step) and a
`freeze` flag so a prefix can be reused. Here the buffers are allocated once,
`[layer batch max_len kv_head d_head]`, and each forward writes its new keys and values with
`dynamic_update_slice` at `length`, returning a *new* cache: the old one is untouched, so a
prefix cache built once serves any number of continuations (`fork` broadcasts it to a batch).

Rows share the buffer index (`length`, a traced scalar, so one compiled program serves every
step); each row's real tokens are marked in `mask`, and positions come from the cumulative
sum of the mask, so left-padded prompts keep the right rotary/learned positions when extended.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.fingerprint import retry_static
from jaxlens.config import ModelConfig
from jaxlens.forward import forward
from jaxlens.hooks import Hooks


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
        for name, v in (("batch", batch), ("max_len", max_len)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"KVCache.init: {name} must be a positive int, got {v!r}")
        shape = (cfg.n_layers, int(batch), int(max_len), cfg.kv_heads, cfg.d_head)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((int(batch), int(max_len)), jnp.int32),
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
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ValueError(f"KVCache.fork: n must be a positive int, got {n!r}")
        rep = lambda x, axis: jnp.repeat(x, int(n), axis=axis)  # noqa: E731
        return KVCache(rep(self.keys, 1), rep(self.values, 1), rep(self.mask, 0), self.length)

    # --- the model's tuple form -------------------------------------------------------------
    def as_tuple(self) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """(keys, values, mask, length): the form `Transformer.__call__(..., kv=)` takes."""
        return self.keys, self.values, self.mask, self.length

    @classmethod
    def from_tuple(cls, kv: tuple[jax.Array, jax.Array, jax.Array, jax.Array]) -> "KVCache":
        keys, values, mask, length = kv
        return cls(keys, values, mask, jnp.asarray(length, jnp.int32))


def check_cache(cache: KVCache, cfg: ModelConfig, batch: int, n_new: int) -> None:
    """Raise ValueError if `cache` does not fit the model, this batch, or `n_new` more tokens.

    Reads the (concrete) length from the device: overflow is an error, never a silent wrap
    (`dynamic_update_slice` would clamp the write index and overwrite the last slots).
    """
    if not isinstance(cache, KVCache):
        raise ValueError(f"kv_cache must be a jaxlens KVCache (KVCache.init(cfg, batch, max_len)), got {type(cache).__name__}")
    want = (cfg.n_layers, cfg.kv_heads, cfg.d_head)
    got = (cache.keys.shape[0], cache.keys.shape[3], cache.keys.shape[4])
    if got != want or cache.values.shape != cache.keys.shape:
        raise ValueError(f"KVCache has (layers, kv_heads, d_head)={got} but the model needs {want}; "
                         "build it with KVCache.init(model.cfg, batch, max_len)")
    if cache.batch_size != batch:
        raise ValueError(f"KVCache holds {cache.batch_size} rows but the tokens have {batch}; "
                         f"use cache.fork({batch}) for a batch-1 prefix, or init a cache with batch={batch}")
    if isinstance(cache.length, jax.core.Tracer):
        return
    length, mask = jax.device_get((cache.length, cache.mask))  # host-side: no small programs to compile
    length, longest = int(length), int(np.asarray(mask).sum(-1).max())
    if length + n_new > cache.max_len:
        raise ValueError(f"KVCache overflow: {length} slots used + {n_new} new tokens > max_len={cache.max_len}; "
                         f"build the cache with KVCache.init(cfg, batch, max_len>={length + n_new})")
    if cfg.has_pos_embed and longest + n_new > cfg.n_ctx:
        raise ValueError(f"{longest} cached + {n_new} new tokens exceed the model's context n_ctx={cfg.n_ctx} "
                         "(learned positions stop there); shorten the prompt or the continuation")


def forward_cached(params: dict[str, Any], cfg: ModelConfig, tokens: jax.Array, attention_mask: jax.Array | None,
                   cache: KVCache, *, capture: frozenset[str] = frozenset(), hooks: Hooks = Hooks(),
                   precision: str | None = None) -> tuple[jax.Array, dict[str, jax.Array], KVCache]:
    """Run `tokens` [batch q] after the cached ones: (logits [batch q vocab], acts, new cache).

    Pure and traceable. Attention sees the cached keys (by buffer index, causal) and the new
    ones; the new keys/values are written at `cache.length`. Activations of attention scores
    and patterns span the whole buffer: [batch head q max_len]. Under a trace the overflow
    check of `check_cache` cannot raise, so an overflowing call returns NaN logits instead.
    """
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, jnp.int32)
    logits, acts, kv = forward(params, cfg, tokens, attention_mask, capture=capture, hooks=hooks,
                               kv=cache.as_tuple(), precision=precision)
    overflow = cache.length + tokens.shape[1] > cache.max_len
    logits = jnp.where(overflow, jnp.asarray(jnp.nan, logits.dtype), logits)
    return logits, acts, KVCache.from_tuple(kv)


_forward_cached_compiled = retry_static(jax.jit(forward_cached, static_argnames=("cfg", "capture", "precision")))


def forward_cached_jit(params, cfg, tokens, attention_mask, cache, *, hooks=Hooks(), **kwargs):
    """`forward_cached` under jit (cfg, capture and precision static); edit indices checked first."""
    if hooks:
        hooks.check_indices(cfg, None, cache.max_len)
    return _forward_cached_compiled(params, cfg, tokens, attention_mask, cache, hooks=hooks, **kwargs)
