"""Edits as pytrees: ablation, patching, steering and attention-matrix edits.

Every edit is a frozen dataclass registered as a pytree: its arrays (positions, heads, patch
values, multipliers, steering vectors) are leaves and its flags are static and hashable. Each
is callable as a hook function, `edit(activation, hook) -> activation`, so it goes straight into
`fwd_hooks=[(name, edit), ...]`. Because the arrays are leaves, a stack of edits (see
`stack_edits`) can be `vmap`-ed: a whole ablation or patching grid is one compiled call.

Positions and heads are integer arrays (negative values count from the end, as in torch
indexing); they may be traced, so the same compiled program serves every choice of them.
Edits select with masks and `jnp.where`, never with data-dependent shapes.

Semantics follow easyroutine's hooks (`intervention_resid_hook`, `intervention_heads_hook`,
`intervention_attn_mat_hook`, `ablate_pos_keep_self_attn_hook`) on TransformerLens's hook
names; where easyroutine's literal code does something we consider a bug, the docstring says
what we do instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.hooks import HookPoint
from jaxlens.model.layers import masked_softmax
from jaxlens.cache.slice import wrap_negative

Array = jax.Array
_PATTERN_HOOKS = ("hook_pattern", "hook_attn_scores")
_HEAD_VECTOR_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_z", "hook_result")


def register_edit(cls: type) -> type:
    """Register a frozen dataclass as a pytree: fields in `_static` are static, the rest leaves."""
    static = tuple(getattr(cls, "_static", ()))
    fields = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(
        cls, data_fields=[f for f in fields if f not in static], meta_fields=[f for f in fields if f in static])


def _ints(x: Any, what: str) -> Array:
    """An integer index array (scalar or 1-d), checked when concrete."""
    a = jnp.asarray(x)
    if not jnp.issubdtype(a.dtype, jnp.integer):
        raise ValueError(f"{what} must be integers, got dtype {a.dtype}")
    if a.ndim > 1:
        raise ValueError(f"{what} must be an int or a 1-d list of ints, got shape {a.shape}")
    return a.reshape(-1)


def _float(x: Any) -> Array:
    return jnp.asarray(x, jnp.float32)


def index_mask(idx: Array, n: int) -> Array:
    """Boolean [n]: True where some entry of `idx` (negative counts from the end) points."""
    idx = wrap_negative(jnp.asarray(idx).reshape(-1), n)
    return (jnp.arange(n)[:, None] == idx[None, :]).any(-1)


_KV_HOOKS = ("attn.hook_k", "attn.hook_v", "attn.hook_rot_k")


class IndexChecked:
    """Mixin: `_index_fields` maps a field to the axis it indexes ("head", "pos", "query" or
    "key"); `check_indices` raises a ValueError naming any concrete index out of range."""

    _index_fields: dict[str, str] = {}

    def check_indices(self, name: str, cfg: Any, q_len: int | None, k_len: int | None) -> None:
        heads = cfg.n_kv_heads if name.endswith(_KV_HOOKS) else cfg.n_heads
        sizes = {"head": heads, "pos": q_len, "query": q_len, "key": k_len}
        for field, axis in self._index_fields.items():
            idx, n = getattr(self, field), sizes[axis]
            if idx is None or n is None or isinstance(idx, jax.core.Tracer):
                continue
            a = np.asarray(idx)
            bad = a[(a < -n) | (a >= n)]
            if bad.size:
                what = {"head": "heads", "pos": "positions", "query": "query positions", "key": "key positions"}[axis]
                raise ValueError(f"{type(self).__name__}.{field} on {name!r}: index {int(bad.reshape(-1)[0])} is out "
                                 f"of range: the activation has {n} {what} (valid {-n}..{n - 1}); JAX would drop "
                                 "it silently")


def _kind(hook: HookPoint) -> str:
    if hook.name.endswith(_PATTERN_HOOKS):
        return "pattern"
    if hook.name.endswith(_HEAD_VECTOR_HOOKS):
        return "head"
    return "vector"


def _apply_values(x: Array, mask: Array, values: Array | None, what: str, hook: HookPoint) -> Array:
    """x where not mask; `values` (zeros if None) where mask. `values` must broadcast to x."""
    if values is None:
        return jnp.where(mask, jnp.zeros((), x.dtype), x)
    try:
        jnp.broadcast_shapes(values.shape, x.shape)
    except ValueError:
        raise ValueError(f"{what} on {hook.name!r}: values of shape {values.shape} do not broadcast to the "
                         f"activation's shape {x.shape}; pass the full activation (e.g. clean_cache[name])") from None
    return jnp.where(mask, values.astype(x.dtype), x)


# ---------------------------------------------------------------------------------------------
# Residual-stream style edits at token positions
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ResidEdit(IndexChecked):
    """Ablate (zero) or patch an activation at token positions: easyroutine's `intervention_resid`.

    Works on any [batch pos ...] activation (resid_pre/mid/post, attn_out, mlp_out, q/k/v/z, ...).
    `positions` [n] ints. `values` None zeroes them; otherwise `values` is either the full
    activation (e.g. `clean_cache[name]`, shape [batch pos ...]: its entries at `positions` are
    copied) or, when `at_positions`, shaped [batch n ...] with one slice per listed position
    (easyroutine's `b[..., positions, :] = patching_values`).
    """

    positions: Array
    values: Array | None = None
    at_positions: bool = False
    _static = ("at_positions",)
    _index_fields = {"positions": "pos"}

    def __call__(self, x: Array, hook: HookPoint) -> Array:
        if _kind(hook) == "pattern":
            raise ValueError(f"ResidEdit edits [batch pos ...] activations, not {hook.name!r}; use AttnMatEdit "
                             "or HeadEdit for attention patterns")
        if self.at_positions and self.values is not None:
            pos = wrap_negative(self.positions, x.shape[1])
            return x.at[:, pos].set(jnp.broadcast_to(self.values, x[:, pos].shape).astype(x.dtype))
        mask = index_mask(self.positions, x.shape[1]).reshape((1, x.shape[1]) + (1,) * (x.ndim - 2))
        return _apply_values(x, mask, self.values, "ResidEdit", hook)


def intervention_resid(positions: Any, values: Any = None, *, at_positions: bool = False) -> ResidEdit:
    """Zero (values=None) or patch an activation at `positions`; see `ResidEdit`."""
    return ResidEdit(_ints(positions, "positions"), None if values is None else jnp.asarray(values), at_positions)


# ---------------------------------------------------------------------------------------------
# Whole heads
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeadEdit(IndexChecked):
    """Zero or patch whole heads (easyroutine's `intervention_heads`), optionally only at positions.

    On head-vector hooks (`hook_q/k/v/z/result`, [batch pos head ...]) the head axis is 2 and
    `positions` select token positions; on `hook_pattern` / `hook_attn_scores` ([batch head
    query key]) the head axis is 1 and `positions` select query rows. `values` None zeroes;
    otherwise it is an array broadcastable to the activation (a clean run's activation, or a
    mean from `mean_ablation`) whose selected entries are copied. For grouped-query models,
    `hook_k`/`hook_v` heads are kv heads. Every batch row is edited (easyroutine 1.1.5's
    `intervention_heads` edits batch row 0 only, which we consider a bug).
    """

    heads: Array
    values: Array | None = None
    positions: Array | None = None
    _index_fields = {"heads": "head", "positions": "pos"}

    def __call__(self, x: Array, hook: HookPoint) -> Array:
        kind = _kind(hook)
        if kind == "vector":
            raise ValueError(f"HeadEdit needs a per-head activation (hook_q/k/v/z/result/pattern/attn_scores), "
                             f"not {hook.name!r}; use ResidEdit for [batch pos d] activations")
        head_axis, pos_axis = (1, 2) if kind == "pattern" else (2, 1)
        shape = [1] * x.ndim
        shape[head_axis] = x.shape[head_axis]
        mask = index_mask(self.heads, x.shape[head_axis]).reshape(shape)
        if self.positions is not None:
            pshape = [1] * x.ndim
            pshape[pos_axis] = x.shape[pos_axis]
            mask = mask & index_mask(self.positions, x.shape[pos_axis]).reshape(pshape)
        return _apply_values(x, mask, self.values, "HeadEdit", hook)


def ablate_heads(heads: Any, positions: Any = None) -> HeadEdit:
    """Zero `heads` (at `positions`, or everywhere) of a per-head activation; see `HeadEdit`."""
    return HeadEdit(_ints(heads, "heads"), None, None if positions is None else _ints(positions, "positions"))


def patch_heads(heads: Any, values: Any, positions: Any = None) -> HeadEdit:
    """Copy `heads` (at `positions`, or everywhere) from `values` (e.g. a clean activation)."""
    return HeadEdit(_ints(heads, "heads"), jnp.asarray(values), None if positions is None else _ints(positions, "positions"))


# ---------------------------------------------------------------------------------------------
# Attention-matrix edits
# ---------------------------------------------------------------------------------------------

Normalize = Literal[None, "softmax", "renorm"]


@dataclass(frozen=True)
class AttnMatEdit(IndexChecked):
    """Edit attention entries at (query, key) positions of some heads: easyroutine's
    `intervention_attn_mat`.

    Applies at `hook_pattern` (after softmax) or `hook_attn_scores` (before it). The edited set
    is heads × q_positions × k_positions. With `values` None each entry is multiplied by
    `multiplier` (0 ablates); otherwise entries are set from `values` (broadcastable to
    [batch head query key], e.g. a clean pattern, or [query key]).

    `normalize` (only at `hook_pattern`; the model itself softmaxes after `hook_attn_scores`)
    re-normalises the rows of the edited heads: "softmax" takes a softmax of the edited
    probabilities over the keys the row may attend to (easyroutine's `apply_softmax`, whose
    literal code also spreads mass onto masked future keys; we keep masked keys at zero), and
    "renorm" divides each row by its sum so it again sums to one. Allowed keys are those with a
    non-zero probability before the edit.
    """

    heads: Array
    q_positions: Array
    k_positions: Array
    multiplier: Array = dataclasses.field(default_factory=lambda: jnp.float32(0.0))
    values: Array | None = None
    normalize: Normalize = None
    _static = ("normalize",)
    _index_fields = {"heads": "head", "q_positions": "query", "k_positions": "key"}

    def __call__(self, x: Array, hook: HookPoint) -> Array:
        if _kind(hook) != "pattern":
            raise ValueError(f"AttnMatEdit edits hook_pattern or hook_attn_scores, not {hook.name!r}")
        _, n_heads, nq, nk = x.shape
        head_m = index_mask(self.heads, n_heads)[:, None, None]
        # A single query row (a generation step with a KV cache) is the newest token: easyroutine
        # maps the query positions onto row 0 there (its `seq_len_q < len(q_positions)`; with one
        # listed position it indexes the row directly, which only 0 / -1 survive), and so do we.
        # Its condition also fires on a full prompt listing more positions than rows; we do not.
        q_m = jnp.full((1,), jnp.size(self.q_positions) > 0) if nq == 1 else index_mask(self.q_positions, nq)
        mask = head_m & q_m[None, :, None] & index_mask(self.k_positions, nk)[None, None, :]
        if self.values is None:
            y = jnp.where(mask, x * self.multiplier.astype(x.dtype), x)
        else:
            y = _apply_values(x, mask, self.values, "AttnMatEdit", hook)
        if self.normalize is None:
            return y
        if not hook.name.endswith("hook_pattern"):
            raise ValueError(f"AttnMatEdit(normalize={self.normalize!r}) applies at hook_pattern only; at "
                             f"{hook.name!r} the model's own softmax follows the edit")
        allowed = x > 0
        if self.normalize == "softmax":
            z = masked_softmax(y, allowed)
        elif self.normalize == "renorm":
            s = y.astype(jnp.float32).sum(-1, keepdims=True)
            z = y.astype(jnp.float32) / jnp.where(s == 0, 1.0, s)
        else:
            raise ValueError(f"normalize must be None, 'softmax' or 'renorm', got {self.normalize!r}")
        return jnp.where(head_m, z.astype(x.dtype), y)


def intervention_attn_mat(heads: Any, q_positions: Any, k_positions: Any, multiplier: float = 0.0,
                          values: Any = None, normalize: Normalize = None) -> AttnMatEdit:
    """Multiply (default ×0) or set attention entries at heads × queries × keys; see `AttnMatEdit`."""
    if normalize not in (None, "softmax", "renorm"):
        raise ValueError(f"normalize must be None, 'softmax' or 'renorm', got {normalize!r}")
    return AttnMatEdit(_ints(heads, "heads"), _ints(q_positions, "q_positions"), _ints(k_positions, "k_positions"),
                       _float(multiplier), None if values is None else jnp.asarray(values), normalize)


@dataclass(frozen=True)
class KeepSelfAttnAblation(IndexChecked):
    """easyroutine's `ablate_pos_keep_self_attn`: for each (head, query position) pair, zero the
    pattern row except its last key column, so the last position keeps attending to itself.

    `heads` and `positions` are paired element-wise (same length), as easyroutine zips its
    dataframe's `head` and `pos_token_to_ablate` columns. Applies at `hook_pattern`, to every
    batch row (easyroutine 1.1.5 edits batch row 0 only, which we consider a bug).
    """

    heads: Array
    positions: Array
    _index_fields = {"heads": "head", "positions": "query"}

    def __call__(self, x: Array, hook: HookPoint) -> Array:
        if not hook.name.endswith("hook_pattern"):
            raise ValueError(f"KeepSelfAttnAblation applies at hook_pattern, not {hook.name!r}")
        _, n_heads, nq, nk = x.shape
        h, q = wrap_negative(self.heads, n_heads), wrap_negative(self.positions, nq)
        pairs = ((jnp.arange(n_heads)[:, None, None] == h) & (jnp.arange(nq)[None, :, None] == q)).any(-1)
        mask = pairs[:, :, None] & (jnp.arange(nk) < nk - 1)[None, None, :]
        return jnp.where(mask[None], jnp.zeros((), x.dtype), x)


def ablate_keep_self_attn(heads: Any, positions: Any) -> KeepSelfAttnAblation:
    """Zero pattern rows (head, position) except the last key; see `KeepSelfAttnAblation`."""
    h, p = _ints(heads, "heads"), _ints(positions, "positions")
    if h.shape != p.shape:
        raise ValueError(f"heads and positions are paired element-wise: got {h.shape[0]} heads and {p.shape[0]} positions")
    return KeepSelfAttnAblation(h, p)


# ---------------------------------------------------------------------------------------------
# Steering and mean ablation
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Steer(IndexChecked):
    """Add `scale * vector` to a [batch pos d] activation, at `positions` (or every position).

    `vector` is [d] (the same at every position), [pos d] or [batch pos d].
    """

    vector: Array
    scale: Array = dataclasses.field(default_factory=lambda: jnp.float32(1.0))
    positions: Array | None = None
    _index_fields = {"positions": "pos"}

    def __call__(self, x: Array, hook: HookPoint) -> Array:
        if _kind(hook) == "pattern":
            raise ValueError(f"Steer adds to [batch pos d] activations, not {hook.name!r}")
        if self.vector.shape[-1] != x.shape[-1]:
            raise ValueError(f"Steer on {hook.name!r}: vector has width {self.vector.shape[-1]}, the activation "
                             f"{x.shape[-1]}")
        add = (self.scale * self.vector).astype(x.dtype)
        if self.positions is None:
            return x + add
        mask = index_mask(self.positions, x.shape[1]).reshape((1, x.shape[1]) + (1,) * (x.ndim - 2))
        return jnp.where(mask, x + add, x)


def steer(vector: Any, scale: float = 1.0, positions: Any = None) -> Steer:
    """A steering edit: add `scale * vector` to the residual stream; see `Steer`."""
    return Steer(jnp.asarray(vector), _float(scale), None if positions is None else _ints(positions, "positions"))


@dataclass(frozen=True)
class Replace:
    """Replace the activation by `values` (broadcastable to it), wherever `mask` is True (everywhere
    when `mask` is None). Downstream of a full replacement, XLA drops the computation above."""

    values: Array
    mask: Array | None = None

    def __call__(self, x: Array, hook: HookPoint) -> Array:
        if self.mask is None:
            return jnp.broadcast_to(self.values, x.shape).astype(x.dtype)
        return _apply_values(x, self.mask, self.values, "Replace", hook)


def mean_ablation(cache: Any, names: str | Iterable[str], *, over_positions: bool = False,
                  heads: Any = None, positions: Any = None) -> list[tuple[str, Any]]:
    """fwd_hooks that replace activations by their mean over the batch of `cache`.

    `over_positions` also averages over token positions (one vector for every position). With
    `heads` (per-head hooks only) only those heads are replaced (`HeadEdit`), with
    `positions` only those positions; otherwise the whole activation is replaced.
    """
    names = [names] if isinstance(names, str) else list(names)
    hooks: list[tuple[str, Any]] = []
    for name in names:
        if name not in cache:
            raise ValueError(f"mean_ablation: {name!r} is not in the cache; run_with_cache with a names_filter "
                             "that includes it")
        act = jnp.asarray(cache[name])
        pattern = name.endswith(_PATTERN_HOOKS)
        if pattern and over_positions:
            raise ValueError(f"over_positions does not apply to {name!r} (query and key positions are not interchangeable)")
        mean = act.mean(0, keepdims=True)
        if over_positions:
            mean = mean.mean(1, keepdims=True)
        if heads is not None:
            edit: Any = HeadEdit(_ints(heads, "heads"), mean, None if positions is None else _ints(positions, "positions"))
        elif positions is not None:
            edit = ResidEdit(_ints(positions, "positions"), mean)
        else:
            edit = Replace(mean)
        hooks.append((name, edit))
    return hooks


# ---------------------------------------------------------------------------------------------
# Batches of edits
# ---------------------------------------------------------------------------------------------

def stack_edits(edits: Sequence[Any]) -> Any:
    """Stack edits of one type (same static fields, same leaf shapes) along a new leading axis,
    ready for `jax.vmap`: e.g. `stack_edits([intervention_resid([p]) for p in range(n)])`."""
    if not edits:
        raise ValueError("stack_edits needs at least one edit")
    first = jax.tree.structure(edits[0])
    for i, e in enumerate(edits[1:], 1):
        if jax.tree.structure(e) != first:
            raise ValueError(f"stack_edits: edit {i} differs in type or static fields from edit 0 ({first} vs "
                             f"{jax.tree.structure(e)})")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *edits)


for _cls in (ResidEdit, HeadEdit, AttnMatEdit, KeepSelfAttnAblation, Steer, Replace):
    register_edit(_cls)

__all__ = ["register_edit", "ResidEdit", "HeadEdit", "AttnMatEdit", "KeepSelfAttnAblation", "Steer", "Replace", "index_mask",
           "intervention_resid", "ablate_heads", "patch_heads", "intervention_attn_mat", "ablate_keep_self_attn",
           "steer", "mean_ablation", "stack_edits"]
