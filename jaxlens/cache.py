"""ActivationCache: an immutable pytree of named activations with TransformerLens's mapping API.

Leaves are the activation arrays (and the few weights analyses need, under `weights`); the
static part is the key order, `has_batch_dim` and the model config. So a cache passes through
`jit`, `vmap`, `jax.tree.map`, `device_put` and `grad` like any pytree. Every method returns
arrays or a new cache.
"""

from __future__ import annotations

from typing import Any, Iterator

import jax
import numpy as np

from jaxlens.config import ModelConfig
from jaxlens.hooks import get_act_name


@jax.tree_util.register_pytree_node_class
class ActivationCache:
    """Activations keyed by TransformerLens hook name.

    `cache["blocks.3.attn.hook_pattern"]`, `cache["pattern", 3]` and
    `cache["scale", 3, "ln1"]` index the same way TransformerLens's cache does.
    """

    def __init__(self, cache_dict: dict[str, Any], cfg: ModelConfig | None = None, has_batch_dim: bool = True,
                 weights: dict[str, Any] | None = None):
        self._d = dict(cache_dict)
        self.cfg = cfg
        self.has_batch_dim = has_batch_dim
        self.weights = dict(weights or {})

    # --- pytree -----------------------------------------------------------------------------
    def tree_flatten(self):
        keys = tuple(self._d)
        wkeys = tuple(sorted(self.weights))
        children = (tuple(self._d[k] for k in keys), tuple(self.weights[k] for k in wkeys))
        return children, (keys, wkeys, self.cfg, self.has_batch_dim)

    @classmethod
    def tree_unflatten(cls, aux, children):
        keys, wkeys, cfg, has_batch_dim = aux
        acts, ws = children
        obj = cls.__new__(cls)
        obj._d = dict(zip(keys, acts))
        obj.weights = dict(zip(wkeys, ws))
        obj.cfg = cfg
        obj.has_batch_dim = has_batch_dim
        return obj

    def _replace(self, cache_dict: dict[str, Any] | None = None, **kw: Any) -> "ActivationCache":
        return ActivationCache(self._d if cache_dict is None else cache_dict, kw.get("cfg", self.cfg),
                               kw.get("has_batch_dim", self.has_batch_dim), kw.get("weights", self.weights))

    # --- mapping ----------------------------------------------------------------------------
    def _key(self, key: Any) -> str:
        if isinstance(key, str):
            return key if key in self._d else get_act_name(key)
        if isinstance(key, tuple):
            return get_act_name(*key)
        raise KeyError(f"cache keys are hook names or (name, layer[, layer_type]) tuples, not {type(key).__name__}")

    def __getitem__(self, key: Any) -> Any:
        name = self._key(key)
        if name not in self._d:
            import difflib

            close = difflib.get_close_matches(name, list(self._d), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise KeyError(f"{name!r} is not in this cache{hint}; it holds {len(self._d)} activations: "
                           "run with a names_filter that includes it")
        return self._d[name]

    def __contains__(self, key: Any) -> bool:
        try:
            return self._key(key) in self._d
        except (KeyError, TypeError, ValueError):
            return False

    def __len__(self) -> int:
        return len(self._d)

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def keys(self):
        return self._d.keys()

    def values(self):
        return self._d.values()

    def items(self):
        return self._d.items()

    def get(self, key: Any, default: Any = None) -> Any:
        return self[key] if key in self else default

    def to_dict(self) -> dict[str, Any]:
        return dict(self._d)

    def __repr__(self) -> str:
        return f"ActivationCache with keys {list(self._d)}"

    # --- batch handling (TransformerLens) ---------------------------------------------------
    def remove_batch_dim(self) -> "ActivationCache":
        """Drop a batch dimension of size 1 from every activation."""
        if not self.has_batch_dim:
            return self
        for k, v in self._d.items():
            if v.shape[0] != 1:
                raise ValueError(f"remove_batch_dim needs batch size 1, but {k!r} has batch {v.shape[0]}; "
                                 "use apply_slice_to_batch_dim(i) to pick one element")
        return self._replace({k: v[0] for k, v in self._d.items()}, has_batch_dim=False)

    def to_numpy(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in self._d.items()}
