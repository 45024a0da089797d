"""The pure functional entry point: params + cfg + tokens -> logits and captured activations.

`forward` is a plain traceable function (jit, vmap, grad or shard it yourself). `forward_jit`
is the same function compiled with its configuration static; compiled programs are cached
per (cfg, names, hooks' static parts, shapes).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from jaxlens.config import ModelConfig
from jaxlens.hooks import Hooks, RunCtx, collect_intermediates
from jaxlens.model import Transformer


def _is_stacked(params: dict[str, Any]) -> bool:
    return "blocks" in params


def forward(
    params: dict[str, Any],
    cfg: ModelConfig,
    tokens: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    capture: frozenset[str] = frozenset(),
    hooks: Hooks = Hooks(),
    kv: Any = None,
    precision: str | None = None,
) -> tuple[jax.Array, dict[str, jax.Array], Any]:
    """Run the model: returns (logits [batch pos vocab], {hook name: activation}, new kv).

    `params` is the tree under "params" (unrolled `blocks_{l}` or scanned `blocks`; the layout
    picks the implementation). `capture` names the activations to return (see
    `jaxlens.hooks.resolve_names`); under jit, everything else is never materialised.
    """
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, jnp.int32)
    module = Transformer(cfg, scan_layers=_is_stacked(params), dtype=params["W_E"].dtype)
    ctx = RunCtx(capture=capture, hooks=hooks)
    with jax.default_matmul_precision(precision) if precision else _null():
        if capture:
            (logits, new_kv), state = module.apply({"params": params}, tokens, attention_mask, ctx, kv,
                                                   mutable=["intermediates"])
            acts = collect_intermediates(state.get("intermediates", {}), capture)
        else:
            logits, new_kv = module.apply({"params": params}, tokens, attention_mask, ctx, kv)
            acts = {}
    return logits, acts, new_kv


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


@partial(jax.jit, static_argnames=("cfg", "capture", "precision", "return_logits"))
def forward_jit(params, cfg, tokens, attention_mask, hooks=Hooks(), kv=None, *, capture=frozenset(),
                precision=None, return_logits=True):
    """`forward` under jit; with return_logits=False the logits are not returned (nor kept)."""
    logits, acts, new_kv = forward(params, cfg, tokens, attention_mask, capture=capture, hooks=hooks, kv=kv,
                                   precision=precision)
    return (logits if return_logits else None), acts, new_kv


def stack_layers(params: dict[str, Any], n_layers: int) -> dict[str, Any]:
    """Unrolled params (`blocks_{l}`) -> scanned layout (`blocks/block`, leading layer axis)."""
    blocks = [params[f"blocks_{l}"] for l in range(n_layers)]
    out = {k: v for k, v in params.items() if not k.startswith("blocks_")}
    out["blocks"] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}
    return out


def unstack_layers(params: dict[str, Any], n_layers: int) -> dict[str, Any]:
    """Scanned layout -> unrolled `blocks_{l}`."""
    out = {k: v for k, v in params.items() if k != "blocks"}
    for l in range(n_layers):
        out[f"blocks_{l}"] = jax.tree.map(lambda x: x[l], params["blocks"]["block"])
    return out
