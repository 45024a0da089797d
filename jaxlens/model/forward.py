"""The pure functional entry point: params + cfg + tokens -> logits and captured activations.

`forward` is a plain traceable function (jit, vmap, grad or shard it yourself). `forward_jit`
is the same function compiled with its configuration static; compiled programs are cached
per (cfg, names, hooks' static parts, shapes).
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from jaxlens.config import ModelConfig
from jaxlens.fingerprint import eager_active, retry_static
from jaxlens.hooks import WILDCARD, Hooks, RunCtx, collect_intermediates
from jaxlens.model import Transformer
from jaxlens.validate import index, indices
from jaxlens.model.kv import KVCache
from jaxlens.model.packed import PackedRows
from jaxlens.model.block import Resume


def is_scanned(params: dict[str, Any]) -> bool:
    """Is this params tree in the scanned layout (`blocks/block`, stacked over layers)?"""
    return "blocks" in params


def resolve_layer_range(cfg: ModelConfig, start_at_layer: int | None = None,
                        stop_at_layer: int | None = None) -> tuple[int | None, int | None]:
    """TransformerLens's `start_at_layer` / `stop_at_layer`, negative values counted from the end,
    checked: 0 <= start < n_layers, 0 <= stop <= n_layers, start <= stop. None stays None."""
    n = cfg.n_layers

    def one(name: str, v: int | None, end: bool) -> int | None:
        return None if v is None else index(v, n, name, end=end, context=f"for a model of {n} layers")

    start, stop = one("start_at_layer", start_at_layer, False), one("stop_at_layer", stop_at_layer, True)
    if start is not None and stop is not None and start > stop:
        raise ValueError(f"start_at_layer={start_at_layer} comes after stop_at_layer={stop_at_layer}: "
                         "the run covers blocks [start, stop), so start must be <= stop")
    return start, stop


def _run_layers(params: dict[str, Any], start: int | None, stop: int | None) -> dict[str, Any]:
    """Scanned params holding only blocks [start, stop) (unrolled params need no change)."""
    if not is_scanned(params) or (start is None and stop is None):
        return params
    sl = slice(start or 0, stop)
    return {**params, "blocks": jax.tree.map(lambda x: x[sl], params["blocks"])}


def _shift_scanned(inter: Any, offset: int) -> Any:
    """Name the stacked (`*`) activations of a scan that began at block `offset` per layer."""
    out = {}
    for k, v in inter.items():
        if isinstance(v, dict) or hasattr(v, "items"):
            out[k] = _shift_scanned(v, offset)
        elif WILDCARD in k:
            out.update({k.replace(WILDCARD, str(offset + i)): v[i] for i in range(v.shape[0])})
        else:
            out[k] = v
    return out


def forward(
    params: dict[str, Any],
    cfg: ModelConfig,
    tokens: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    capture: frozenset[str] = frozenset(),
    hooks: Hooks = Hooks(),
    kv: KVCache | None = None,
    precision: str | None = None,
    start_at_layer: int | None = None,
    stop_at_layer: int | None = None,
    logit_positions: tuple[int, ...] | None = None,
    logit_columns: tuple[int, ...] | None = None,
    packed: PackedRows | None = None,
    resume: Resume | None = None,
) -> tuple[jax.Array, dict[str, jax.Array], KVCache | None]:
    """Run the model: returns (logits [batch pos vocab], {hook name: activation}, new KVCache or None).

    `params` is the tree under "params" (unrolled `blocks_{l}` or scanned `blocks`; the layout
    picks the implementation). `capture` names the activations to return (see
    `jaxlens.hooks.resolve_names`); under jit, everything else is never materialised.

    `start_at_layer=k`: `tokens` is the residual stream [batch pos d_model] entering block k
    (positions still come from `attention_mask`). `stop_at_layer=k`: the first output is the
    residual entering block k (k = n_layers: after the last block, before the final norm).
    Only the blocks in between are computed (TransformerLens's semantics; negative values count
    from the end). `stop_at_layer` does not work with `kv`; `start_at_layer` does: the residual
    continues the cached positions, whose keys/values every run layer reads from the cache (a
    causal suffix: `jaxlens.edits.patching` runs each patch from its layer and position on).

    `kv`: a `jaxlens.kv_cache.KVCache`; the tokens continue its cached ones and the returned
    cache holds them too (`jaxlens.kv_cache.forward_cached` also guards against overflow).

    `logit_positions`: static indices into this call's positions (negative from the end); the
    logits are [batch len(logit_positions) vocab], only there (final-norm hooks see those
    positions). Not with `stop_at_layer`. `logit_columns`: static vocabulary indices (negative
    from the end); the logits' last axis holds only those columns (the unembedding computes no
    other), in that order. Not with `stop_at_layer`.

    `packed`: with `start_at_layer` and `kv`, the rows of `tokens` are several causal suffixes
    after the cached positions, each row tagged with its prompt position and its suffix's start
    (`jaxlens.model.packed.PackedRows`; the patching grids run two cells per sequence so).

    `resume` (`jaxlens.model.block.Resume`, with `start_at_layer`): block `start_at_layer` starts
    at its hook_z or hook_attn_out from the value an earlier run of the same residual gave there
    (`tokens` rows), skipping what precedes it (a patch of that hook cannot change it); that
    block's cache layer is not written.
    """
    if kv is not None and not isinstance(kv, KVCache):
        raise ValueError(f"kv must be a jaxlens KVCache (KVCache.init(cfg, batch, max_len)), got {type(kv).__name__}")
    start, stop = resolve_layer_range(cfg, start_at_layer, stop_at_layer)
    if kv is not None and stop is not None:
        raise ValueError("stop_at_layer cannot be combined with a KV cache; run without kv")
    if logit_positions is not None:
        if stop is not None:
            raise ValueError("logit_positions cannot be combined with stop_at_layer (no logits are computed)")
        q_len = jnp.shape(tokens)[1]
        logit_positions = tuple(indices(logit_positions, q_len, "logit_positions", context=f"for {q_len} positions"))
    if logit_columns is not None:
        if stop is not None:
            raise ValueError("logit_columns cannot be combined with stop_at_layer (no logits are computed)")
        logit_columns = tuple(indices(logit_columns, cfg.d_vocab, "logit_columns",
                                      context=f"for a vocabulary of {cfg.d_vocab}"))
    if start is not None and (jnp.ndim(tokens) != 3 or tokens.shape[-1] != cfg.d_model):
        raise ValueError(f"with start_at_layer the input is the residual stream [batch pos d_model={cfg.d_model}], "
                         f"got shape {jnp.shape(tokens)}")
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape[:2], jnp.int32)
    if eager_active() and is_scanned(params):  # nn.scan traces its body even eagerly: hooks that store
        params = unstack_layers(params, cfg.n_layers)  # must see concrete values, so run the layers unrolled
    module = Transformer(cfg, scan_layers=is_scanned(params), dtype=params["W_E"].dtype,
                         start_at_layer=start, stop_at_layer=stop, logit_positions=logit_positions,
                         logit_columns=logit_columns)
    params = _run_layers(params, start, stop)
    ctx = RunCtx(capture=capture, hooks=hooks)
    with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
        if capture:
            (logits, new_kv), state = module.apply({"params": params}, tokens, attention_mask, ctx, kv, packed, resume,
                                                   mutable=["intermediates"])
            inter = state.get("intermediates", {})
            if start and is_scanned(params):
                inter = _shift_scanned(inter, start)
            acts = collect_intermediates(inter, capture)
        else:
            logits, new_kv = module.apply({"params": params}, tokens, attention_mask, ctx, kv, packed, resume)
            acts = {}
    return logits, acts, new_kv


@retry_static
@partial(jax.jit, static_argnames=("cfg", "capture", "precision", "return_logits", "start_at_layer",
                                   "stop_at_layer", "logit_positions"))
def _forward_compiled(params, cfg, tokens, attention_mask, hooks=Hooks(), kv=None, *, capture=frozenset(),
                      precision=None, return_logits=True, start_at_layer=None, stop_at_layer=None,
                      logit_positions=None):
    logits, acts, new_kv = forward(params, cfg, tokens, attention_mask, capture=capture, hooks=hooks, kv=kv,
                                   precision=precision, start_at_layer=start_at_layer, stop_at_layer=stop_at_layer,
                                   logit_positions=logit_positions)
    return (logits if return_logits else None), acts, new_kv


def forward_jit(params, cfg, tokens, attention_mask, hooks=Hooks(), kv=None, **kwargs):
    """`forward` under jit; with return_logits=False the logits (or, with stop_at_layer, the
    residual) are not returned (nor kept). Layer bounds are static: one program per value.
    Edit indices are checked against the activations' sizes first (JAX would drop them)."""
    if hooks:
        q_len = jnp.shape(tokens)[1]
        hooks.check_indices(cfg, q_len, q_len if kv is None else kv.max_len)
    return _forward_compiled(params, cfg, tokens, attention_mask, hooks, kv, **kwargs)


forward_jit.lower = _forward_compiled.lower
forward_jit._cache_size = _forward_compiled._cache_size


def stack_layers(params: dict[str, Any], n_layers: int, xp: Any = jnp) -> dict[str, Any]:
    """Unrolled params (`blocks_{l}`) -> scanned layout (`blocks/block`, leading layer axis);
    `xp=np` keeps host arrays on the host."""
    blocks = [params[f"blocks_{l}"] for l in range(n_layers)]
    out = {k: v for k, v in params.items() if not k.startswith("blocks_")}
    out["blocks"] = {"block": jax.tree.map(lambda *xs: xp.stack(xs), *blocks)}
    return out


def unstack_layers(params: dict[str, Any], n_layers: int) -> dict[str, Any]:
    """Scanned layout -> unrolled `blocks_{l}`."""
    out = {k: v for k, v in params.items() if k != "blocks"}
    for l in range(n_layers):
        out[f"blocks_{l}"] = jax.tree.map(lambda x, l=l: x[l], params["blocks"]["block"])
    return out

__all__ = ["is_scanned", "resolve_layer_range", "forward", "forward_jit", "stack_layers", "unstack_layers"]
