"""KVCache: preallocated past keys and values as an immutable pytree, and running after it.

`KVCache` itself lives in `jaxlens.model.kv` (the model takes it; see there for the layout and
why it is immutable) and is re-exported here. This module adds the checks a cache must pass
before a run (`check_cache`) and the cached forward (`forward_cached`, `forward_cached_jit`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.config import ModelConfig
from jaxlens.fingerprint import retry_static
from jaxlens.model.forward import forward
from jaxlens.hooks import Hooks
from jaxlens.model.kv import KVCache

__all__ = ["KVCache", "check_cache", "forward_cached", "forward_cached_jit"]


def check_cache(cache: KVCache, cfg: ModelConfig, batch: int, n_new: int) -> None:
    """Raise ValueError if `cache` does not fit the model, this batch, or `n_new` more tokens.

    Reads the (concrete) length from the device: overflow is an error, never a silent wrap
    (`dynamic_update_slice` would clamp the write index and overwrite the last slots).
    """
    if not isinstance(cache, KVCache):
        raise ValueError(f"kv_cache must be a jaxlens KVCache (KVCache.init(cfg, batch, max_len)), got {type(cache).__name__}")
    want = (cfg.n_layers, cfg.n_kv_heads, cfg.d_head)
    got = (cache.keys.shape[0], cache.keys.shape[2], cache.keys.shape[4])
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
    if longest + n_new > cfg.n_ctx:  # every positional scheme: the same rule as run_with_cache and generate
        raise ValueError(f"{longest} cached + {n_new} new tokens exceed the model's context n_ctx={cfg.n_ctx}; "
                         "shorten the prompt or the continuation")


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
    logits, acts, new_cache = forward(params, cfg, tokens, attention_mask, capture=capture, hooks=hooks,
                                      kv=cache, precision=precision)
    overflow = cache.length + tokens.shape[1] > cache.max_len
    logits = jnp.where(overflow, jnp.asarray(jnp.nan, logits.dtype), logits)
    return logits, acts, new_cache


_forward_cached_compiled = retry_static(jax.jit(forward_cached, static_argnames=("cfg", "capture", "precision")))


def forward_cached_jit(params, cfg, tokens, attention_mask, cache, *, hooks=Hooks(), **kwargs):
    """`forward_cached` under jit (cfg, capture and precision static); edit indices checked first."""
    if hooks:
        hooks.check_indices(cfg, None, cache.max_len)
    return _forward_cached_compiled(params, cfg, tokens, attention_mask, cache, hooks=hooks, **kwargs)
