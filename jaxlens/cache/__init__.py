"""The activation cache: `ActivationCache` (a pytree), its jit-compiled analyses, `Slice`,
easyroutine's aggregation across batches, and TransformerLens's head detector."""

from jaxlens.cache.activation_cache import ActivationCache

__all__ = ["ActivationCache"]
