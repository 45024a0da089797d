"""Activation-patching grids as compiled programs: TransformerLens's `transformer_lens.patching`.

`get_act_patch_resid_pre(model, corrupted_tokens, clean_cache, patching_metric)` and friends take
the same arguments, in the same order, and return the same shapes as TransformerLens's. The
difference is how they run: TransformerLens runs one hooked forward pass per cell of the grid
in a Python loop; here each layer's cells are one `vmap` (chunked with `lax.map` to bound
memory), and the corrupted run's prefix below the patched layer is computed once.

Prefix reuse: the corrupted run's `blocks.{L}.hook_resid_pre` is computed once for all L. The
program for layer L replaces `blocks.{L}.hook_resid_pre` by that value (a `Replace` edit that
ignores its input), so XLA removes the embedding and layers < L from the program, and then
patches the activation of layer L, vmapped over the patch indices. So layer L costs
n_layers - L layers per patch instead of n_layers. One program is compiled per layer.

`patching_metric(logits) -> scalar` must be a JAX function (it is traced, under vmap, once per
layer program); `logits` are [batch pos d_vocab] of the corrupted batch with one patch applied.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.fingerprint import Fn, call_metric, retry_static
from jaxlens.model.forward import forward, is_scanned, unstack_layers
from jaxlens.hooks import HookPoint, Hooks, get_act_name
from jaxlens.edits.interventions import Replace, register_edit
from jaxlens.tokens import check_tokens
from jaxlens.validate import indices

Metric = Callable[[jax.Array], jax.Array]
_PATTERN = ("pattern", "attn_scores")


@dataclass(frozen=True)
class IndexPatch:
    """Copy `values` into the activation at one grid cell: `index[i]` along activation axis
    `axes[i]` (all of the other axes, batch included, are copied whole). TransformerLens's
    `patch_setter`s, as one mask so the index can be traced and vmapped."""

    index: jax.Array
    values: jax.Array
    axes: tuple[int, ...] = ()
    _static = ("axes",)

    def __call__(self, x: jax.Array, hook: HookPoint) -> jax.Array:
        mask = jnp.ones((), bool)
        for i, ax in enumerate(self.axes):
            shape = [1] * x.ndim
            shape[ax] = x.shape[ax]
            mask = mask & (jnp.arange(x.shape[ax]) == self.index[i]).reshape(shape)
        return jnp.where(mask, self.values.astype(x.dtype), x)


register_edit(IndexPatch)


def _axis_layout(activation_name: str, index_axis_names: Sequence[str], cfg: Any, seq_len: int
                 ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(activation axis, size) of each non-layer grid axis, TransformerLens's axis names."""
    if not index_axis_names or index_axis_names[0] != "layer":
        raise ValueError(f"index_axis_names must start with 'layer', got {tuple(index_axis_names)}")
    n_heads = cfg.n_kv_heads if activation_name in ("k", "v", "rot_k") else cfg.n_heads
    pattern = activation_name in _PATTERN
    axes, sizes = [], []
    for a in index_axis_names[1:]:
        if a in ("head", "head_index"):
            axes.append(1 if pattern else 2)
            sizes.append(n_heads)
        elif a == "pos" and not pattern:
            axes.append(1)
            sizes.append(seq_len)
        elif a == "dest_pos" and pattern:
            axes.append(2)
            sizes.append(seq_len)
        elif a == "src_pos" and pattern:
            axes.append(3)
            sizes.append(seq_len)
        else:
            raise ValueError(f"axis {a!r} does not apply to activation {activation_name!r}: use pos/head for "
                             "[batch pos ...] activations and head_index/dest_pos/src_pos for patterns")
    return tuple(axes), tuple(sizes)


@retry_static
@partial(jax.jit, static_argnames=("cfg", "resid_name", "name", "axes", "precision", "chunk_size"))
def _layer_grid(params, tokens, mask, resid_in, clean_act, indices, metric, *, cfg, resid_name, name, axes,
                precision, chunk_size):
    """Metric for every patch index of one layer: [n_cells]. Layers below the patch are not computed.
    `metric` is an `Fn`: keyed by what it reads, so a metric reading changed globals recompiles."""

    def one(index):
        hooks = Hooks(((frozenset({resid_name}), Replace(resid_in)),
                       (frozenset({name}), IndexPatch(index, clean_act, axes))))
        logits, _, _ = forward(params, cfg, tokens, mask, hooks=hooks, precision=precision)
        out = call_metric(metric, logits)
        if jnp.ndim(out) != 0:
            raise ValueError(f"patching_metric must return a scalar, got shape {jnp.shape(out)}; reduce over the "
                             "batch inside the metric (e.g. .mean())")
        return out.astype(jnp.float32)

    return jax.lax.map(one, indices, batch_size=chunk_size)


@partial(jax.jit, static_argnames=("cfg", "capture", "precision"))
def _resid_pres(params, tokens, mask, *, cfg, capture, precision):
    _, acts, _ = forward(params, cfg, tokens, mask, capture=capture, precision=precision)
    return acts


def generic_activation_patch(model: Any, corrupted_tokens: Any, clean_cache: Any, patching_metric: Metric,
                             activation_name: str, index_axis_names: Sequence[str], *,
                             attention_mask: Any = None, chunk_size: int | None = None,
                             layers: Sequence[int] | None = None) -> jax.Array:
    """Patch `activation_name` from `clean_cache` into the corrupted run at every grid cell.

    Returns [n_layers, *sizes of index_axis_names[1:]] of `patching_metric` (float32), as
    TransformerLens's `generic_activation_patch` with `index_axis_names`. `chunk_size` bounds how
    many patched runs are vmapped at once (None: all cells of a layer). `layers` restricts the
    sweep (other rows are NaN).
    """
    cfg = model.cfg
    toks, mask = check_tokens(np.asarray(corrupted_tokens), cfg, attention_mask)
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    axes, sizes = _axis_layout(activation_name, index_axis_names, cfg, toks.shape[1])
    params = unstack_layers(model.params, cfg.n_layers) if is_scanned(model.params) else model.params
    layer_list = range(cfg.n_layers) if layers is None else _check_layers(layers, cfg.n_layers)
    names = [get_act_name(activation_name, l) for l in layer_list]
    for n in names:
        if n not in clean_cache:
            raise ValueError(f"clean_cache has no {n!r}: run the clean prompt with run_with_cache and a names_filter "
                             f"that includes {activation_name!r} for every layer")
    resid_names = frozenset(f"blocks.{l}.hook_resid_pre" for l in layer_list)
    toks_j, mask_j = jnp.asarray(toks), jnp.asarray(mask)
    resid = _resid_pres(params, toks_j, mask_j, cfg=cfg, capture=resid_names, precision=model.precision)
    cells = np.array(list(itertools.product(*[range(s) for s in sizes])), np.int32).reshape(-1, len(sizes))
    out = np.full((cfg.n_layers, int(np.prod(sizes, dtype=np.int64))), np.nan, np.float32)
    for l, name in zip(layer_list, names):
        clean = jnp.asarray(clean_cache[name])
        seq_axis = -1 if activation_name in _PATTERN else 1
        if clean.ndim < 3 or clean.shape[0] != toks.shape[0] or clean.shape[seq_axis] != toks.shape[1]:
            raise ValueError(f"clean_cache[{name!r}] has shape {clean.shape}, which does not match corrupted_tokens "
                             f"{toks.shape}: clean and corrupted prompts must have the same batch size and length")
        vals = _layer_grid(params, toks_j, mask_j, resid[f"blocks.{l}.hook_resid_pre"], clean, jnp.asarray(cells),
                           Fn(patching_metric), cfg=cfg, resid_name=f"blocks.{l}.hook_resid_pre", name=name,
                           axes=axes, precision=model.precision, chunk_size=chunk_size)
        out[l] = np.asarray(vals)
    return jnp.asarray(out.reshape((cfg.n_layers, *sizes)))


def _check_layers(layers: Any, n_layers: int) -> list[int]:
    """The `layers` argument as ints in [0, n_layers); ValueError naming any other (JAX would not complain)."""
    return indices(layers, n_layers, "layers", negative=False, context=f"for a model of {n_layers} layers")


def _specialise(activation_name: str, index_axis_names: tuple[str, ...], shape_doc: str) -> Callable[..., jax.Array]:
    def fn(model: Any, corrupted_tokens: Any, clean_cache: Any, patching_metric: Metric, **kw: Any) -> jax.Array:
        return generic_activation_patch(model, corrupted_tokens, clean_cache, patching_metric, activation_name,
                                        index_axis_names, **kw)

    fn.__doc__ = (f"Patch clean `{activation_name}` into the corrupted run for every {' × '.join(index_axis_names)}; "
                  f"returns {shape_doc} (TransformerLens's shape). Keywords: attention_mask, chunk_size, layers.")
    return fn


get_act_patch_resid_pre = _specialise("resid_pre", ("layer", "pos"), "[n_layers, pos]")
get_act_patch_resid_mid = _specialise("resid_mid", ("layer", "pos"), "[n_layers, pos]")
get_act_patch_attn_out = _specialise("attn_out", ("layer", "pos"), "[n_layers, pos]")
get_act_patch_mlp_out = _specialise("mlp_out", ("layer", "pos"), "[n_layers, pos]")
get_act_patch_attn_head_out_by_pos = _specialise("z", ("layer", "pos", "head"), "[n_layers, pos, n_heads]")
get_act_patch_attn_head_q_by_pos = _specialise("q", ("layer", "pos", "head"), "[n_layers, pos, n_heads]")
get_act_patch_attn_head_k_by_pos = _specialise("k", ("layer", "pos", "head"), "[n_layers, pos, n_kv_heads]")
get_act_patch_attn_head_v_by_pos = _specialise("v", ("layer", "pos", "head"), "[n_layers, pos, n_kv_heads]")
get_act_patch_attn_head_pattern_by_pos = _specialise("pattern", ("layer", "head_index", "dest_pos"),
                                                     "[n_layers, n_heads, dest_pos]")
get_act_patch_attn_head_pattern_dest_src_pos = _specialise("pattern", ("layer", "head_index", "dest_pos", "src_pos"),
                                                           "[n_layers, n_heads, dest_pos, src_pos]")
get_act_patch_attn_head_out_all_pos = _specialise("z", ("layer", "head"), "[n_layers, n_heads]")
get_act_patch_attn_head_q_all_pos = _specialise("q", ("layer", "head"), "[n_layers, n_heads]")
get_act_patch_attn_head_k_all_pos = _specialise("k", ("layer", "head"), "[n_layers, n_kv_heads]")
get_act_patch_attn_head_v_all_pos = _specialise("v", ("layer", "head"), "[n_layers, n_kv_heads]")
get_act_patch_attn_head_pattern_all_pos = _specialise("pattern", ("layer", "head_index"), "[n_layers, n_heads]")


# ---------------------------------------------------------------------------------------------
# Any grid of edits
# ---------------------------------------------------------------------------------------------

@retry_static
@partial(jax.jit, static_argnames=("cfg", "precision", "chunk_size"))
def _grid(params, tokens, mask, grid, shared, build, metric, *, cfg, precision, chunk_size):
    from jaxlens.hooks import make_hooks

    def one(item):
        hooks = make_hooks(build(item, *shared), cfg)
        logits, _, _ = forward(params, cfg, tokens, mask, hooks=hooks, precision=precision)
        return call_metric(metric, logits)

    return jax.lax.map(one, grid, batch_size=chunk_size)


def run_grid(model: Any, tokens: Any, build_hooks: Callable[..., Any], grid: Any, metric: Metric,
             shared: Sequence[Any] = (), *, attention_mask: Any = None, chunk_size: int | None = None) -> Any:
    """One compiled call over a grid of experiments.

    `grid` is a pytree whose leaves share a leading axis of length n; for each i,
    `build_hooks(grid[i], *shared)` returns TransformerLens-style `fwd_hooks` (typically edits from
    `jaxlens.interventions`) and `metric(logits)` is evaluated on the run with those hooks. The
    items are vmapped (`chunk_size` at a time); `shared` arrays are passed once, not per item.
    Returns the metric stacked over the grid. The compiled program is keyed by what `build_hooks`
    and `metric` read (see `jaxlens.fingerprint`), so fresh lambdas reuse it and changed globals
    do not.
    """
    cfg = model.cfg
    toks, mask = check_tokens(np.asarray(tokens), cfg, attention_mask)
    leaves = jax.tree.leaves(grid)
    if not leaves:
        raise ValueError("run_grid: grid has no arrays; give arrays with a leading grid axis")
    n = {int(jnp.shape(x)[0]) if jnp.ndim(x) else -1 for x in leaves}
    if len(n) != 1 or -1 in n:
        raise ValueError(f"run_grid: every grid leaf needs the same leading (grid) axis; got leading sizes {sorted(n)}")
    return _grid(model.params, jnp.asarray(toks), jnp.asarray(mask), grid, tuple(shared), Fn(build_hooks), Fn(metric),
                 cfg=cfg, precision=model.precision, chunk_size=chunk_size)


__all__ = ["generic_activation_patch", "run_grid", "IndexPatch"] + [n for n in dir() if n.startswith("get_act_patch_")]


# ---------------------------------------------------------------------------------------------
# Every activation type at once (TransformerLens's `*_every` helpers)
# ---------------------------------------------------------------------------------------------

def _pad_heads(grid: jax.Array, n_heads: int) -> jax.Array:
    """Zero-pad the last (head) axis to n_heads: grouped-query k/v grids have n_kv_heads (as TransformerLens)."""
    return jnp.pad(grid, [(0, 0)] * (grid.ndim - 1) + [(0, n_heads - grid.shape[-1])])


def get_act_patch_block_every(model: Any, corrupted_tokens: Any, clean_cache: Any, metric: Metric,
                              **kw: Any) -> jax.Array:
    """resid_pre, attn_out and mlp_out patched at every (layer, pos): [3, n_layers, pos], in that order
    (TransformerLens's). Keywords (attention_mask, chunk_size, layers) go to each grid."""
    grids = [fn(model, corrupted_tokens, clean_cache, metric, **kw)
             for fn in (get_act_patch_resid_pre, get_act_patch_attn_out, get_act_patch_mlp_out)]
    return jnp.stack(grids)


def get_act_patch_attn_head_all_pos_every(model: Any, corrupted_tokens: Any, clean_cache: Any, metric: Metric,
                                          **kw: Any) -> jax.Array:
    """Every head's output, q, k, v and pattern patched across all positions: [5, n_layers, n_heads], in
    TransformerLens's order (out, q, k, v, pattern). Grouped-query k/v rows are zero-padded to n_heads."""
    fns = (get_act_patch_attn_head_out_all_pos, get_act_patch_attn_head_q_all_pos, get_act_patch_attn_head_k_all_pos,
           get_act_patch_attn_head_v_all_pos, get_act_patch_attn_head_pattern_all_pos)
    grids = [fn(model, corrupted_tokens, clean_cache, metric, **kw) for fn in fns]
    return jnp.stack([_pad_heads(g, model.cfg.n_heads) for g in grids])


def get_act_patch_attn_head_by_pos_every(model: Any, corrupted_tokens: Any, clean_cache: Any, metric: Metric,
                                         **kw: Any) -> jax.Array:
    """Every head's output, q, k, v and pattern patched at every position: [5, n_layers, pos, n_heads], in
    TransformerLens's order (out, q, k, v, pattern; the pattern grid, [layer head dest_pos], is moved to
    [layer pos head]). Grouped-query k/v are zero-padded to n_heads."""
    fns = (get_act_patch_attn_head_out_by_pos, get_act_patch_attn_head_q_by_pos, get_act_patch_attn_head_k_by_pos,
           get_act_patch_attn_head_v_by_pos)
    grids = [fn(model, corrupted_tokens, clean_cache, metric, **kw) for fn in fns]
    pattern = get_act_patch_attn_head_pattern_by_pos(model, corrupted_tokens, clean_cache, metric, **kw)
    grids.append(jnp.swapaxes(pattern, 1, 2))
    return jnp.stack([_pad_heads(g, model.cfg.n_heads) for g in grids])


__all__ += ["get_act_patch_block_every", "get_act_patch_attn_head_all_pos_every",
            "get_act_patch_attn_head_by_pos_every"]
