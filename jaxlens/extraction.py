"""easyroutine's extraction hooks as pure functions, and one compiled `extract` over a model.

Token positions are given as groups, a list of tuples (`[(1, 3), (4,)]`): without `avg` the
groups are flattened into one list of positions (easyroutine's default), with `avg` each group
is averaged into one position. Negative positions count from the end.

- `select_tokens`: any [batch pos ...] activation at the token groups (`save_resid_hook`).
- `head_vectors`: per-head queries/keys/values (`query_key_value_hook`); grouped-query keys and
  values are repeated so query head h reads kv head h // (n_heads / n_kv_heads).
- `project_head_vectors`: per-head vectors through that head's block of W_O, plus b_O
  (`projected_value/key/query_vectors_head`, with GQA repeat for keys and values).
- `pattern_block_stats`: attention-pattern block statistics for row groups × column groups:
  "mean", "sum" and "baseline_ratio" (`attention_pattern_head`), with easyroutine's definitions.
- `running_pattern_average`: running average of patterns across batches, optionally with
  value-norm weighting (`avg_attention_pattern_head`).
- `position_statistics`: mean, variance and second moment over the last axis
  (`compute_statistics`).
- `embedding_with_grad`: the embedding output and the gradient of a metric with respect to it
  (`input_embedding_hook(keep_gradient=True)`).
- `extract(model, input, token_groups, what=...)`: all of the above for many layers and heads in
  one jitted forward pass, returned under easyroutine's cache keys (`resid_out_3`,
  `projected_value_L3H1`, `pattern_L3H1`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.config import ModelConfig
from jaxlens.forward import forward

Array = jax.Array
TokenGroups = Sequence[Sequence[int]]
Stat = Literal["mean", "sum", "baseline_ratio"]


def normalize_groups(token_groups: Any, n: int | None = None, what: str = "token_groups") -> tuple[tuple[int, ...], ...]:
    """Check and freeze token groups into a tuple of int tuples (static, hashable).

    An int or a flat list of ints is accepted as groups of one. With `n` (the sequence length),
    negative positions are resolved and out-of-range ones raise ValueError.
    """
    if isinstance(token_groups, (int, np.integer)):
        token_groups = [(int(token_groups),)]
    groups = []
    for g in token_groups:
        g = (g,) if isinstance(g, (int, np.integer)) else tuple(g)
        if not g:
            raise ValueError(f"{what}: empty group; every group needs at least one position")
        for p in g:
            if not isinstance(p, (int, np.integer)):
                raise ValueError(f"{what}: positions must be ints, got {p!r} ({type(p).__name__})")
        if n is not None:
            bad = [p for p in g if not -n <= p < n]
            if bad:
                raise ValueError(f"{what}: positions {bad} are outside a sequence of length {n}")
            g = tuple(int(p) % n for p in g)
        groups.append(tuple(int(p) for p in g))
    if not groups:
        raise ValueError(f"{what} is empty: give a list of position tuples, e.g. [(0,), (3, 4)]")
    return tuple(groups)


def _group_matrix(groups: tuple[tuple[int, ...], ...], n: int, avg: bool) -> Array:
    """[n_out, n] selection matrix: one-hot rows (flatten) or per-group averaging rows (avg)."""
    if avg:
        m = np.zeros((len(groups), n), np.float32)
        for i, g in enumerate(groups):
            for p in g:
                m[i, p] += 1.0 / len(g)
        return jnp.asarray(m)
    flat = [p for g in groups for p in g]
    return jnp.asarray(np.eye(n, dtype=np.float32)[flat])


def select_tokens(x: Array, token_groups: Any, avg: bool = False, axis: int = 1) -> Array:
    """x at the token groups along `axis`: flattened positions, or one mean per group (`avg`)."""
    axis = axis % x.ndim
    groups = normalize_groups(token_groups, x.shape[axis])
    if not avg:
        return jnp.take(x, jnp.asarray([p for g in groups for p in g]), axis=axis)
    parts = [jnp.take(x, jnp.asarray(g), axis=axis).mean(axis=axis, keepdims=True) for g in groups]
    return jnp.concatenate(parts, axis=axis)


def expand_kv_heads(act: Array, cfg: ModelConfig) -> Array:
    """[batch pos kv_head d] -> [batch pos head d]: query head h uses kv head h // group."""
    if act.shape[2] == cfg.n_heads:
        return act
    return jnp.repeat(act, cfg.n_heads // cfg.kv_heads, axis=2)


def head_vectors(act: Array, cfg: ModelConfig, token_groups: Any, avg: bool = False, expand_kv: bool = True) -> Array:
    """Per-head q/k/v [batch pos head d_head] -> [batch head tokens d_head] at the token groups.

    Keys and values of grouped-query models are repeated to every query head (`expand_kv`);
    with expand_kv=False they stay per kv head.
    """
    if expand_kv:
        act = expand_kv_heads(act, cfg)
    return select_tokens(act, token_groups, avg, axis=1).transpose(0, 2, 1, 3)


def project_head_vectors(vecs: Array, W_O: Array, b_O: Array | None = None) -> Array:
    """Head vectors [batch head tokens d_head] through each head's W_O [head d_head d_model],
    plus the full b_O on every head as easyroutine does: [batch head tokens d_model]."""
    out = jnp.einsum("bhtd,hdm->bhtm", vecs, W_O.astype(vecs.dtype))
    return out if b_O is None else out + b_O.astype(out.dtype)


def pattern_block_stats(pattern: Array, col_groups: Any, row_groups: Any = None, stat: Stat = "mean") -> Array:
    """Block statistics of attention patterns [batch head query key] -> [batch head G_row G_col].

    Block (i, j) holds rows `row_groups[i]` (default: `col_groups`) and columns
    `col_groups[j]`; repeated positions count as often as listed (as with easyroutine's list
    indexing). "mean"/"sum" are the block's mean/sum; "baseline_ratio" is the mean divided by
    the mean over the block's rows of (#columns ≤ row) / (row + 1), the value a uniform causal
    pattern would give; a block wholly above the diagonal has baseline 0 and gives NaN, as in
    easyroutine. Positions are buffer indices (padding is not discounted), as in easyroutine.
    easyroutine's code computes block statistics only when a row partition is given; its
    docstring's default (rows = the column groups) is what `row_groups=None` does here.
    """
    if stat not in ("mean", "sum", "baseline_ratio"):
        raise ValueError(f"stat must be 'mean', 'sum' or 'baseline_ratio', got {stat!r}")
    nq, nk = pattern.shape[-2:]
    cols = normalize_groups(col_groups, nk, "col_groups")
    rows = normalize_groups(row_groups if row_groups is not None else col_groups, nq, "row_groups")
    R = np.zeros((len(rows), nq), np.float32)
    C = np.zeros((len(cols), nk), np.float32)
    for i, g in enumerate(rows):
        for p in g:
            R[i, p] += 1
    for j, g in enumerate(cols):
        for p in g:
            C[j, p] += 1
    sums = jnp.einsum("iq,bhqk,jk->bhij", jnp.asarray(R), pattern.astype(jnp.float32), jnp.asarray(C))
    if stat == "sum":
        return sums
    counts = np.array([[len(r) * len(c) for c in cols] for r in rows], np.float32)
    mean = sums / jnp.asarray(counts)
    if stat == "mean":
        return mean
    base = np.array([[np.mean([sum(1 for j in c if j <= i) / (i + 1) for i in r]) for c in cols] for r in rows],
                    np.float32)
    return mean / jnp.asarray(base)


def position_statistics(x: Array, axis: int = -1) -> tuple[Array, Array, Array]:
    """(mean, variance, second moment) of x over `axis` (easyroutine's `compute_statistics`:
    variance = E[x²] − E[x]², so per token position for a [batch pos d] activation)."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(axis)
    second = (xf**2).mean(axis)
    return mean, second - mean**2, second


# ---------------------------------------------------------------------------------------------
# Running average of patterns across batches
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PatternAverage:
    """Running averages over batches (easyroutine's `avg_attention_pattern_head`).

    `pattern` [batch head T T]: the patterns at the flattened token positions, averaged over
    the batches seen so far (element-wise per batch row, as easyroutine keeps the batch axis).
    `value_weighted` [batch head T key] (or None): value-norm-weighted patterns at those query
    rows. `count`: batches seen.
    """

    pattern: Array
    value_weighted: Array | None
    count: Array


jax.tree_util.register_dataclass(PatternAverage, data_fields=["pattern", "value_weighted", "count"], meta_fields=[])


def value_weighted_pattern(pattern: Array, projected_values: Array, weight_by: Literal["key", "query"] = "key") -> Array:
    """Pattern [batch head q k] weighted by the norm of the projected value vectors
    [batch head k d_model]: ||f(v_k)|| · A[q, k] (Kobayashi et al., 2020) with weight_by="key";
    weight_by="query" reproduces easyroutine's code, which (through a transpose) multiplies
    row q by the norm at position q instead."""
    norm = jnp.linalg.norm(projected_values.astype(jnp.float32), axis=-1)  # [b h s]
    if weight_by == "key":
        return pattern * norm[:, :, None, :]
    if weight_by == "query":
        return pattern * norm[:, :, :, None]
    raise ValueError(f"weight_by must be 'key' or 'query', got {weight_by!r}")


def running_pattern_average(state: PatternAverage | None, pattern: Array, token_groups: Any,
                            projected_values: Array | None = None, weight_by: Literal["key", "query"] = "key"
                            ) -> PatternAverage:
    """Fold one batch's patterns [batch head q k] into the running average (pure; returns a new
    state). avg ← avg + (x − avg) / (count + 1), as easyroutine with count = batch index.
    With `projected_values` [batch head k d_model] (all positions), also averages the
    value-norm-weighted pattern rows at the token positions (`value_weighted_pattern`)."""
    groups = normalize_groups(token_groups, pattern.shape[-1])
    flat = jnp.asarray([p for g in groups for p in g])
    x = pattern.astype(jnp.float32)[:, :, flat][:, :, :, flat]
    vw = None
    if projected_values is not None:
        vw = value_weighted_pattern(pattern.astype(jnp.float32), projected_values, weight_by)[:, :, flat]
    if state is None:
        state = PatternAverage(jnp.zeros_like(x), None if vw is None else jnp.zeros_like(vw), jnp.zeros((), jnp.int32))
    if state.pattern.shape != x.shape:
        raise ValueError(f"running_pattern_average: this batch gives {x.shape}, the running average holds "
                         f"{state.pattern.shape}; easyroutine averages batches of the same size element-wise")
    if (vw is None) != (state.value_weighted is None):
        raise ValueError("running_pattern_average: pass projected_values on every batch or on none")
    step = 1.0 / (state.count + 1).astype(jnp.float32)
    new_vw = None if vw is None else state.value_weighted + (vw - state.value_weighted) * step
    return PatternAverage(state.pattern + (x - state.pattern) * step, new_vw, state.count + 1)


# ---------------------------------------------------------------------------------------------
# Gradient of the embedding output
# ---------------------------------------------------------------------------------------------

def embedding_with_grad(model: Any, input: Any, metric: Callable[[Array], Array], token_groups: Any = None,
                        avg: bool = False, attention_mask: Any = None) -> tuple[Array, Array]:
    """(embedding output `hook_embed`, ∂metric/∂embedding), each [batch tokens d_model] at the
    token groups (all positions when None). easyroutine's `input_embedding_hook(keep_gradient=True)`."""
    from jaxlens.gradients import run_with_cache_and_grad

    _, cache, grads = run_with_cache_and_grad(model, input, metric, "hook_embed", attention_mask)
    emb, g = cache["hook_embed"], grads["hook_embed"]
    if token_groups is None:
        return emb, g
    return select_tokens(emb, token_groups, avg), select_tokens(g, token_groups, avg)


# ---------------------------------------------------------------------------------------------
# One compiled extraction over a model
# ---------------------------------------------------------------------------------------------

_LAYER_HOOKS = {"resid_in": "hook_resid_pre", "resid_mid": "hook_resid_mid", "resid_out": "hook_resid_post",
                "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out"}
_HEAD_HOOKS = {"queries": "attn.hook_q", "keys": "attn.hook_k", "values": "attn.hook_v", "head_out": "attn.hook_z",
               "projected_query": "attn.hook_q", "projected_key": "attn.hook_k", "projected_value": "attn.hook_v",
               "pattern": "attn.hook_pattern"}
WHAT = ("embed",) + tuple(_LAYER_HOOKS) + tuple(_HEAD_HOOKS)


@partial(jax.jit, static_argnames=("cfg", "capture", "what", "layers", "heads", "groups", "avg", "stat", "row_groups",
                                   "precision"))
def _extract(params, tokens, mask, weights, *, cfg, capture, what, layers, heads, groups, avg, stat, row_groups,
             precision):
    _, acts, _ = forward(params, cfg, tokens, mask, capture=capture, precision=precision)
    out: dict[str, Array] = {}
    if "embed" in what:
        out["embed"] = select_tokens(acts["hook_embed"], groups, avg)
    for l in layers:
        for key, hook in _LAYER_HOOKS.items():
            if key in what:
                out[f"{key}_{l}"] = select_tokens(acts[f"blocks.{l}.{hook}"], groups, avg)
        for key in ("queries", "keys", "values", "head_out"):
            if key in what:
                v = head_vectors(acts[f"blocks.{l}.{_HEAD_HOOKS[key]}"], cfg, groups, avg)
                for h in heads:
                    out[f"{key}_L{l}H{h}"] = v[:, h]
        for key in ("projected_query", "projected_key", "projected_value"):
            if key in what:
                v = head_vectors(acts[f"blocks.{l}.{_HEAD_HOOKS[key]}"], cfg, groups, avg)
                p = project_head_vectors(v, weights["W_O"][l], weights["b_O"][l])
                for h in heads:
                    out[f"{key}_L{l}H{h}"] = p[:, h]
        if "pattern" in what:
            pat = acts[f"blocks.{l}.attn.hook_pattern"]
            if stat is None:
                flat = jnp.asarray([p for g in groups for p in g])
                sel = pat[:, :, flat][:, :, :, flat]
            else:
                sel = pattern_block_stats(pat, groups, row_groups, stat)
            for h in heads:
                out[f"pattern_L{l}H{h}"] = sel[:, h]
    return out


def extract(model: Any, input: Any, token_groups: Any, what: Sequence[str] = ("resid_out",), *,
            layers: Sequence[int] | None = None, heads: Any = "all", avg: bool = False,
            pattern_stat: Stat | None = None, row_groups: Any = None, attention_mask: Any = None) -> dict[str, Array]:
    """easyroutine-style extraction in one jitted forward pass; only the hooks needed are kept.

    `what` ⊂ {embed, resid_in, resid_mid, resid_out, attn_out, mlp_out, queries, keys, values,
    head_out, projected_query, projected_key, projected_value, pattern}. Per-layer keys are
    `{what}_{layer}` ([batch tokens d_model]); per-head keys `{what}_L{layer}H{head}`
    ([batch tokens d], patterns [batch tokens tokens], or [batch G_row G_col] with
    `pattern_stat`). `avg` averages each token group instead of flattening them (patterns are
    always flattened, or summarised by `pattern_stat`, as in easyroutine).
    """
    cfg = model.cfg
    toks, mask = model._inputs(input, attention_mask, None, "right")
    groups = normalize_groups(token_groups, toks.shape[1])
    rows = None if row_groups is None else normalize_groups(row_groups, toks.shape[1], "row_groups")
    what = tuple(dict.fromkeys([what] if isinstance(what, str) else what))
    unknown = [w for w in what if w not in WHAT]
    if unknown:
        raise ValueError(f"extract: unknown what={unknown}; choose from {WHAT}")
    if "resid_mid" in what and cfg.parallel_attn_mlp:
        raise ValueError(f"{cfg.model_type} has parallel attention and MLP: there is no resid_mid")
    if pattern_stat is not None and pattern_stat not in ("mean", "sum", "baseline_ratio"):
        raise ValueError(f"pattern_stat must be None, 'mean', 'sum' or 'baseline_ratio', got {pattern_stat!r}")
    layers = tuple(range(cfg.n_layers)) if layers is None else tuple(int(l) for l in layers)
    bad = [l for l in layers if not 0 <= l < cfg.n_layers]
    if bad:
        raise ValueError(f"extract: layers {bad} out of range for a model with {cfg.n_layers} layers")
    heads = tuple(range(cfg.n_heads)) if isinstance(heads, str) and heads == "all" else tuple(
        int(h) for h in ([heads] if isinstance(heads, (int, np.integer)) else heads))
    if any(not 0 <= h < cfg.n_heads for h in heads):
        raise ValueError(f"extract: heads {heads} out of range for a model with {cfg.n_heads} heads")
    capture = {"hook_embed"} if "embed" in what else set()
    for l in layers:
        capture |= {f"blocks.{l}.{_LAYER_HOOKS[w]}" for w in what if w in _LAYER_HOOKS}
        capture |= {f"blocks.{l}.{_HEAD_HOOKS[w]}" for w in what if w in _HEAD_HOOKS}
    weights = {}
    if any(w.startswith("projected_") for w in what):
        weights = {"W_O": model.W_O, "b_O": model.b_O}
    return _extract(model.params, toks, mask, weights, cfg=cfg, capture=frozenset(capture), what=what, layers=layers,
                    heads=heads, groups=groups, avg=avg, stat=pattern_stat, row_groups=rows, precision=model.precision)


__all__ = ["normalize_groups", "select_tokens", "expand_kv_heads", "head_vectors", "project_head_vectors",
           "pattern_block_stats", "position_statistics", "PatternAverage", "value_weighted_pattern",
           "running_pattern_average", "embedding_with_grad", "extract", "WHAT"]
