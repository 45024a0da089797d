"""easyroutine's extraction hooks as pure functions, and one compiled `extract` over a model.

Token positions are given as groups, a list of tuples (`[(1, 3), (4,)]`): without `avg` the
groups are flattened into one list of positions (easyroutine's default), with `avg` each group
is averaged into one position. Negative positions count from the end; a position listed twice
counts twice (easyroutine's list indexing).

- `select_tokens`: any [batch pos ...] activation at the token groups (`save_resid_hook`).
- `head_vectors`: per-head queries/keys/values (`query_key_value_hook`); grouped-query keys and
  values are repeated so query head h reads kv head h // (n_heads / n_kv_heads).
- `project_head_vectors`: per-head vectors through that head's block of W_O, plus b_O
  (`projected_value/key/query_vectors_head`, with GQA repeat for keys and values).
- `attention_pattern_head`: patterns at the token groups: flattened, easyroutine's raw blocks of
  a row partition (`'none'`), or block statistics ("mean", "sum", "baseline_ratio"), which are
  `jaxlens.aggregate.group_pattern`'s (the one implementation).
- `running_pattern_average`: running average of patterns across batches, optionally with
  value-norm weighting (`avg_attention_pattern_head`), kept as `aggregate.RunningStats`.
- `position_statistics`: mean, variance and second moment over the last axis
  (`compute_statistics`).
- `embedding_with_grad`: the embedding output and the gradient of a metric with respect to it
  (`input_embedding_hook(keep_gradient=True)`).
- `extract(model, input, token_groups, what=...)`: all of the above for many layers and heads in
  one jitted forward pass, returned under easyroutine's cache keys (see `extract`).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.cache.aggregate import PATTERN_METHODS, RunningStats, group_pattern, normalize_groups, update_stats
from jaxlens.config import ModelConfig
from jaxlens.model.forward import forward
from jaxlens.hooks import did_you_mean
from jaxlens.model.layers import repeat_kv
from jaxlens.model.views import block_param

Array = jax.Array
TokenGroups = Sequence[Sequence[int]]
PatternAvg = Literal["none", "mean", "sum", "baseline_ratio"]


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
    return repeat_kv(act, cfg.n_heads // cfg.n_kv_heads, axis=2)


def head_vectors(act: Array, cfg: ModelConfig, token_groups: Any, avg: bool = False, expand_kv: bool = True) -> Array:
    """Per-head q/k/v [batch pos head d_head] -> [batch head tokens d_head] at the token groups.

    Keys and values of grouped-query models are repeated to every query head (`expand_kv`), so
    query head h reads kv head h // (n_heads / n_kv_heads), as the model's attention does; with
    expand_kv=False they stay per kv head. easyroutine 1.1.5's `query_key_value_hook` computes
    that index as h // (n_kv_heads // (n_heads / n_kv_heads)) (and with head="all" lists only
    n_kv_heads heads), so depending on the ratio it reads the wrong kv head (kv head 0 for
    several heads) or divides by zero; we keep the model's own index.
    """
    if expand_kv:
        act = expand_kv_heads(act, cfg)
    return select_tokens(act, token_groups, avg, axis=1).transpose(0, 2, 1, 3)


def project_head_vectors(vecs: Array, W_O: Array, b_O: Array | None = None) -> Array:
    """Head vectors [batch head tokens d_head] through each head's W_O [head d_head d_model],
    plus `b_O` [d_model] on every head (easyroutine's projected q/k/v add the full b_O):
    [batch head tokens d_model]."""
    out = jnp.einsum("bhtd,hdm->bhtm", vecs, W_O.astype(vecs.dtype))
    return out if b_O is None else out + b_O.astype(out.dtype)


def attention_pattern_head(pattern: Array, token_groups: Any, row_partition: Any = None, avg: PatternAvg = "none",
                           attention_mask: Array | None = None) -> Array:
    """easyroutine's `attention_pattern_head` on patterns [batch head query key].

    - avg="none", no `row_partition`: the pattern at the flattened positions, rows and columns:
      [batch head T T].
    - avg="none" with a `row_partition`: easyroutine's raw blocks, rows `row_partition[i]` ×
      columns `token_groups[j]`, taken row group by row group, then column group by column
      group, and concatenated along the rows: [batch head n_col_groups·Σ|row group| |col group|]
      (so the column groups must have one size, as easyroutine's `torch.cat` requires).
    - avg="mean" / "sum" / "baseline_ratio": block statistics [batch head G_rows G_cols], see
      `jaxlens.aggregate.group_pattern` (rows default to the column groups, easyroutine's
      documented default; its code would return the flattened pattern there instead).
    """
    if avg not in ("none",) + PATTERN_METHODS:
        raise ValueError(f"avg must be 'none', 'mean', 'sum' or 'baseline_ratio', got {avg!r}")
    nq, nk = pattern.shape[-2:]
    cols = normalize_groups(token_groups, nk, "token_groups")
    if avg != "none":
        return group_pattern(pattern, cols, row_partition, avg, attention_mask)
    if row_partition is None:
        rows = jnp.asarray([p for g in normalize_groups(token_groups, nq, "token_groups") for p in g])
        return pattern[:, :, rows][:, :, :, jnp.asarray([p for g in cols for p in g])]
    rows = normalize_groups(row_partition, nq, "row_partition")
    if len({len(g) for g in cols}) > 1:
        raise ValueError(f"attention_pattern_head(avg='none') with a row partition concatenates the raw blocks along "
                         f"the rows (easyroutine's layout), which needs column groups of one size; got sizes "
                         f"{[len(g) for g in cols]}. Use no row partition (the flattened pattern) or a statistic")
    blocks = [pattern[:, :, jnp.asarray(g1)][:, :, :, jnp.asarray(g2)] for g1 in rows for g2 in cols]
    return jnp.concatenate(blocks, axis=2)


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


def running_pattern_average(state: RunningStats | None, pattern: Array, token_groups: Any,
                            projected_values: Array | None = None, weight_by: Literal["key", "query"] = "key"
                            ) -> RunningStats:
    """Fold one batch's patterns [batch head q k] into the running average (easyroutine's
    `avg_attention_pattern_head`); pure, returns new `aggregate.RunningStats` (None starts one).

    `mean["pattern"]` [batch head T T] is the pattern at the flattened token positions averaged
    element-wise over the batches seen (easyroutine keeps the batch axis: avg ← avg + (x − avg) /
    (batch_idx + 1)); `count["pattern"]` counts them; `variance()` comes with it. With
    `projected_values` [batch head k d_model] (all positions), `mean["value_weighted"]`
    [batch head T key] averages the value-norm-weighted pattern rows at the token positions
    (`value_weighted_pattern`).
    """
    groups = normalize_groups(token_groups, pattern.shape[-1])
    flat = jnp.asarray([p for g in groups for p in g])
    batch = {"pattern": pattern.astype(jnp.float32)[:, :, flat][:, :, :, flat]}
    if projected_values is not None:
        batch["value_weighted"] = value_weighted_pattern(pattern.astype(jnp.float32), projected_values,
                                                         weight_by)[:, :, flat]
    state = RunningStats.empty() if state is None else state
    if state.mean:
        if set(state.mean) != set(batch):
            raise ValueError("running_pattern_average: pass projected_values on every batch or on none")
        if state.mean["pattern"].shape != batch["pattern"].shape:
            raise ValueError(f"running_pattern_average: this batch gives {batch['pattern'].shape}, the running "
                             f"average holds {state.mean['pattern'].shape}; easyroutine averages batches of the "
                             "same size element-wise")
    return update_stats(state, batch, axes=())


# ---------------------------------------------------------------------------------------------
# Gradient of the embedding output
# ---------------------------------------------------------------------------------------------

def embedding_with_grad(model: Any, input: Any, metric: Callable[[Array], Array], token_groups: Any = None,
                        avg: bool = False, attention_mask: Any = None) -> tuple[Array, Array]:
    """(embedding output `hook_embed`, ∂metric/∂embedding), each [batch tokens d_model] at the
    token groups (all positions when None). easyroutine's `input_embedding_hook(keep_gradient=True)`."""
    from jaxlens.edits.gradients import run_with_cache_and_grad

    _, cache, grads = run_with_cache_and_grad(model, input, metric, "hook_embed", attention_mask)
    emb, g = cache["hook_embed"], grads["hook_embed"]
    if token_groups is None:
        return emb, g
    return select_tokens(emb, token_groups, avg), select_tokens(g, token_groups, avg)


# ---------------------------------------------------------------------------------------------
# One compiled extraction over a model
# ---------------------------------------------------------------------------------------------

# `what` names are easyroutine's ExtractionConfig flags without "extract_"; keys are its cache keys.
_LAYER_HOOKS = {"resid_in": "hook_resid_pre", "resid_out": "hook_resid_post", "attn_out": "hook_attn_out",
                "mlp_out": "hook_mlp_out"}
_NORM_OUTPUTS = {"resid_in_post_layernorm": "ln1", "attn_in": "ln1", "resid_mid": "ln2"}  # what -> norm
_QKV = {"q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v"}
_HEAD_VECTORS = {"head_queries": "q", "head_keys": "k", "head_values": "v"}  # key head_queries_L{l}H{h}
_LAYER_VECTORS = {"queries": "q", "keys": "k", "values": "v"}  # key queries_L{l}, heads not split
_PROJECTED = {"head_queries_projected": ("q", "projected_query"), "head_keys_projected": ("k", "projected_key"),
              "head_values_projected": ("v", "projected_value")}
_HOOK_OF = {**_LAYER_HOOKS, **{w: f"{n}.hook_normalized" for w, n in _NORM_OUTPUTS.items()},
            **{w: _QKV[c] for w, c in {**_HEAD_VECTORS, **_LAYER_VECTORS}.items()},
            **{w: _QKV[c] for w, (c, _) in _PROJECTED.items()}, "head_out": "attn.hook_z",
            "attn_pattern": "attn.hook_pattern"}  # what -> the hook read in each layer (blocks.{l}.*)
WHAT = ("embed",) + tuple(_HOOK_OF) + ("last_layernorm",)


def _norm_output(normalized: Array, w: Array | None, b: Array | None) -> Array:
    """A norm's output from its `hook_normalized`: × w (+ b), as `jaxlens.model.norms.Norm`."""
    out = normalized * w if w is not None else normalized
    return out + b if b is not None else out


@partial(jax.jit, static_argnames=("cfg", "capture", "what", "layers", "heads", "groups", "avg", "pattern_avg",
                                   "row_groups", "save_logits", "precision"))
def _extract(params, tokens, mask, weights, *, cfg, capture, what, layers, heads, groups, avg, pattern_avg, row_groups,
             save_logits, precision):
    logits, acts, _ = forward(params, cfg, tokens, mask, capture=capture, precision=precision)
    flat = [p for g in groups for p in g]
    out: dict[str, Array] = {}
    if "embed" in what:
        out["input_embeddings"] = select_tokens(acts["hook_embed"], groups, avg)
    for l in layers:
        B = f"blocks.{l}"
        for key, hook in _LAYER_HOOKS.items():
            if key in what:
                out[f"{key}_{l}"] = select_tokens(acts[f"{B}.{hook}"], groups, avg)
        for key, norm in _NORM_OUTPUTS.items():
            if key in what:
                w = weights["norms"][f"{norm}.{l}"]
                x = _norm_output(acts[f"{B}.{norm}.hook_normalized"], w["w"], w["b"])
                out[f"{key}_{l}"] = select_tokens(x, groups, avg)
        for key, kind in _HEAD_VECTORS.items():
            if key in what:
                v = head_vectors(acts[f"{B}.{_QKV[kind]}"], cfg, groups, avg)
                for h in heads:
                    out[f"{key}_L{l}H{h}"] = v[:, h]
        for key, kind in _LAYER_VECTORS.items():
            if key in what:
                x = acts[f"{B}.{_QKV[kind]}"]
                out[f"{key}_L{l}"] = select_tokens(x.reshape(x.shape[:2] + (-1,)), groups, avg)
        for key, (kind, name) in _PROJECTED.items():
            if key in what:
                v = head_vectors(acts[f"{B}.{_QKV[kind]}"], cfg, groups, avg)
                p = project_head_vectors(v, weights["W_O"][l], weights["b_O"][l])
                for h in heads:
                    out[f"{name}_L{l}H{h}"] = p[:, h]
        if "head_out" in what:
            z = head_vectors(acts[f"{B}.attn.hook_z"], cfg, groups, avg)
            p = project_head_vectors(z, weights["W_O"][l], weights["b_O"][l] / cfg.n_heads)
            for h in heads:
                out[f"head_out_L{l}H{h}"] = p[:, h]
        if "attn_pattern" in what:
            sel = attention_pattern_head(acts[f"{B}.attn.hook_pattern"], groups, row_groups, pattern_avg)
            for h in heads:
                out[f"pattern_L{l}H{h}"] = sel[:, h]
    if "last_layernorm" in what:
        final = acts[f"blocks.{cfg.n_layers - 1}.hook_resid_post"]
        stats = position_statistics(jnp.take(final, jnp.asarray(flat), axis=1))
        out["last_layernorm"] = dict(zip(("mean", "variance", "second_moment"), stats))
    if save_logits:
        out["logits"] = jnp.take(logits, jnp.asarray(flat), axis=1)
    return out


def extract(model: Any, input: Any, token_groups: Any, what: Sequence[str] = ("resid_out",), *,
            layers: Sequence[int] | None = None, heads: Any = "all", avg: bool = False,
            pattern_stat: PatternAvg | None = None, row_groups: Any = None, save_logits: bool = False,
            attention_mask: Any = None) -> dict[str, Array]:
    """easyroutine's `HookedModel.forward` extraction in one jitted pass; only the hooks needed are kept.

    `what` names easyroutine's `ExtractionConfig` flags without "extract_"; the keys are
    easyroutine's cache keys ([batch tokens ...]; tokens = the flattened positions, or one per
    group with `avg`):

    | what | key | value |
    |---|---|---|
    | embed | input_embeddings | the token embedding `hook_embed` (see below) |
    | resid_in / resid_out | resid_in_{l} / resid_out_{l} | block input / output |
    | resid_in_post_layernorm, attn_in | resid_in_post_layernorm_{l}, attn_in_{l} | ln1's output (the attention's input) |
    | resid_mid | resid_mid_{l} | ln2's output, the normalised MLP input (HF `post_attention_layernorm`) |
    | attn_out / mlp_out | attn_out_{l} / mlp_out_{l} | |
    | head_queries / head_keys / head_values | head_queries_L{l}H{h}, ... | [batch tokens d_head] |
    | queries / keys / values | queries_L{l}, ... | the projections, heads not split [batch tokens H·d_head] |
    | head_queries_projected, ... | projected_query_L{l}H{h}, ... | through W_O[h], plus b_O |
    | head_out | head_out_L{l}H{h} | the head's output in d_model: z_h @ W_O[h] + b_O / n_heads |
    | attn_pattern | pattern_L{l}H{h} | see `attention_pattern_head` |
    | last_layernorm | last_layernorm | {mean, variance, second_moment} [batch T] of the final norm's input |

    `save_logits` adds "logits" [batch T vocab] at the flattened target positions (even with
    `avg`, as easyroutine). `pattern_stat` (easyroutine's `attn_pattern_avg`: None / "none",
    "mean", "sum", "baseline_ratio") and `row_groups` (its `attn_pattern_row_positions`) select
    what `attn_pattern` returns. Patterns, `logits` and `last_layernorm` ignore `avg`.
    Per-layer keys are computed for `layers` (default all), per-head keys for `layers` × `heads`.

    Norm outputs use the model's own norm weights: after `from_pretrained`'s fold_ln they live in
    the next layer's weights, so `resid_mid` / `attn_in` are the bare normalised input, as that
    model's MLP / attention read it; `from_pretrained_no_processing` gives HF's (easyroutine's)
    values.

    Where we differ from easyroutine 1.1.5, on purpose: `input_embeddings` is `hook_embed` (its
    `model.layers[0].input` is the same tensor for every family it supports, which have no
    learned position embedding); `head_out`'s share of b_O is b_O / n_heads (its code floors it,
    `b_O // n_heads`), so the heads sum to `attn_out`; per-head keys/values read the kv head the
    model uses (see `head_vectors`); `save_logits` defaults to False (easyroutine: True), since
    nothing is computed that is not asked for.
    """
    cfg = model.cfg
    toks, mask = model._inputs(input, attention_mask, None, "right")
    groups = normalize_groups(token_groups, toks.shape[1])
    rows = None if row_groups is None else normalize_groups(row_groups, toks.shape[1], "row_groups")
    what = tuple(dict.fromkeys([what] if isinstance(what, str) else what))
    unknown = [w for w in what if w not in WHAT]
    if unknown:
        raise ValueError(f"extract: unknown what={unknown}{did_you_mean(unknown[0], WHAT)}; choose from {WHAT} "
                         "(easyroutine's ExtractionConfig flags without 'extract_')")
    pattern_avg = "none" if pattern_stat is None else pattern_stat
    if pattern_avg not in ("none",) + PATTERN_METHODS:
        raise ValueError(f"pattern_stat must be None, 'none', 'mean', 'sum' or 'baseline_ratio', got {pattern_stat!r}")
    layers = tuple(range(cfg.n_layers)) if layers is None else tuple(int(l) for l in layers)
    bad = [l for l in layers if not 0 <= l < cfg.n_layers]
    if bad:
        raise ValueError(f"extract: layers {bad} out of range for a model with {cfg.n_layers} layers")
    heads = tuple(range(cfg.n_heads)) if isinstance(heads, str) and heads == "all" else tuple(
        int(h) for h in ([heads] if isinstance(heads, (int, np.integer)) else heads))
    if any(not 0 <= h < cfg.n_heads for h in heads):
        raise ValueError(f"extract: heads {heads} out of range for a model with {cfg.n_heads} heads")
    capture = {"hook_embed"} if "embed" in what else set()
    if "last_layernorm" in what:
        capture.add(f"blocks.{cfg.n_layers - 1}.hook_resid_post")
    for l in layers:
        capture |= {f"blocks.{l}.{_HOOK_OF[w]}" for w in what if w in _HOOK_OF}
    weights: dict[str, Any] = {}
    if any(w in _PROJECTED or w == "head_out" for w in what):
        weights.update(W_O=model.W_O, b_O=model.b_O)
    norms = {_NORM_OUTPUTS[w] for w in what if w in _NORM_OUTPUTS}
    if norms:
        weights["norms"] = {f"{n}.{l}": {"w": block_param(model, l, n, "w"), "b": block_param(model, l, n, "b")}
                            for n in norms for l in layers}
    return _extract(model.params, toks, mask, weights, cfg=cfg, capture=frozenset(capture), what=what, layers=layers,
                    heads=heads, groups=groups, avg=avg, pattern_avg=pattern_avg, row_groups=rows,
                    save_logits=save_logits, precision=model.precision)


__all__ = ["normalize_groups", "select_tokens", "expand_kv_heads", "head_vectors", "project_head_vectors",
           "attention_pattern_head", "group_pattern", "position_statistics", "value_weighted_pattern",
           "running_pattern_average", "embedding_with_grad", "extract", "WHAT"]
