"""Generation: the functional KV cache driver (`kv_cache`) and the compiled sampling loop
(`generate`). The `KVCache` pytree itself lives in `jaxlens.model.kv`, beside the attention
that reads it."""

from jaxlens.model.kv import KVCache

__all__ = ["KVCache"]
