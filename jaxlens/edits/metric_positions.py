"""Which positions and vocabulary columns of the logits does a metric read? A sound static answer.

A patching grid computes logits only where its metric looks (`jaxlens.edits.patching`). The
metric is traced on an abstract [batch pos vocab] input and every use of that input is
inspected: a `slice`, a `dynamic_slice` or a `gather` whose indices along the pos axis are
constants (literals, the jaxpr's constants, or values computed from them alone, which are
evaluated here) reads a known set of positions. A call to a sub-jaxpr (`jit`, `closed_call`,
custom derivatives) is followed inside. Any other use (a log_softmax over the whole logits, a
reshape, an index computed from the logits) means "every position": the answer is never a
guess, so a grid that trusts it computes exactly what the metric needs.

The same reads give the vocabulary columns (axis 2): a logit difference reads two, and a grid
then unembeds only those. A read whose columns are not constants, or any read of whole rows,
means every column; the positions stay known. `resolve_metric_reads` answers both from one trace.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.extend.core import Literal

from jaxlens.fingerprint import call_metric
from jaxlens.validate import indices

__all__ = ["detect_metric_positions", "detect_metric_reads", "resolve_metric_reads"]

_MISSING = object()
_ALIASES = ("convert_element_type", "copy", "copy_p")  # same axes, same positions: follow the result


class _All(Exception):
    """Some use of the logits is not a constant read along the pos axis."""


_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call", "checkpoint",
                    "remat", "remat2"})  # their sub-jaxpr sees the operands as they are (a scan slices them: not here)


def _sub_jaxpr(eqn: Any) -> tuple[Any, list[Any]] | None:
    """(jaxpr, its constants) of a call-like equation whose inputs are the equation's, else None."""
    if eqn.primitive.name not in _CALLS:
        return None
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if sub is None:
            continue
        jaxpr, consts = (sub.jaxpr, list(sub.consts)) if hasattr(sub, "consts") else (sub, [])
        if hasattr(jaxpr, "eqns") and len(jaxpr.invars) == len(eqn.invars):
            return jaxpr, consts
    return None


def _value(v: Any, known: dict[Any, Any]) -> Any:
    if isinstance(v, Literal):
        return v.val
    return known.get(v, _MISSING)


def _span(start: int, size: int, seq_len: int) -> range:
    """Positions read by a slice of `size` at `start`, clamped as XLA clamps dynamic slices and gathers."""
    s = min(max(int(start), 0), max(seq_len - size, 0))
    return range(s, s + size)


class _Reads:
    """What the metric reads of the logits so far: positions (axis 1), and vocabulary columns
    (axis 2; None once some read takes every column or columns not known here)."""

    def __init__(self) -> None:
        self.pos: set[int] = set()
        self.cols: set[int] | None = set()

    def add_cols(self, cols: Any) -> None:
        if self.cols is not None:
            self.cols = None if cols is None else self.cols | set(cols)

    def merge(self, other: "_Reads") -> None:
        self.pos |= other.pos
        self.add_cols(other.cols)


_WHOLE = object()  # an equation keeps the whole axis in its output (followed there)


def _axis_read(eqn: Any, axis: int, known: dict[Any, Any], extent: int) -> tuple[Any, int | None]:
    """What an equation whose first operand holds axis `axis` (`extent` long) reads along it:
    (indices, None); (None, None) for unknown, i.e. all; or (_WHOLE, the output's axis) when it
    keeps the whole axis, so the output's own uses decide."""
    name, prm = eqn.primitive.name, eqn.params
    if name in _ALIASES:
        return _WHOLE, axis
    if name == "squeeze":
        dims = prm["dimensions"]
        return (range(extent), None) if axis in dims else (_WHOLE, axis - sum(d < axis for d in dims))
    if name == "slice":
        start, limit = prm["start_indices"][axis], prm["limit_indices"][axis]
        stride = (prm["strides"] or (1,) * len(prm["start_indices"]))[axis]
        return (_WHOLE, axis) if (start, limit, stride) == (0, extent, 1) else (range(start, limit, stride), None)
    if name == "dynamic_slice":
        size = prm["slice_sizes"][axis]
        if size == extent:
            return _WHOLE, axis
        start = _value(eqn.invars[1 + axis], known)
        return (None, None) if start is _MISSING else (_span(start, size, extent), None)
    if name == "gather":
        dn, size = prm["dimension_numbers"], prm["slice_sizes"][axis]
        if axis in dn.operand_batching_dims:
            return None, None
        if axis in dn.start_index_map:
            idx = _value(eqn.invars[1], known)
            if idx is _MISSING:
                return None, None
            starts = np.asarray(idx)[..., dn.start_index_map.index(axis)].ravel()
            return set().union(*(_span(s, size, extent) for s in np.unique(starts))), None
        if size == extent and axis not in dn.collapsed_slice_dims:
            kept = [d for d in range(len(prm["slice_sizes"]))
                    if d not in dn.collapsed_slice_dims and d not in dn.operand_batching_dims]
            return _WHOLE, dn.offset_dims[kept.index(axis)]
        return range(size), None  # the window starts at 0 on axes the indices do not address
    return None, None


def _reads(jaxpr: Any, targets: set[Any], views: dict[Any, int], known: dict[Any, Any],
           shape: Sequence[int]) -> _Reads:
    """Positions (axis 1) and columns (axis 2) of the logits that `jaxpr` reads: `targets` are
    the logits and their aliases, `views` arrays cut from them that still hold every column (on
    the axis given), whose uses decide which columns are read. _All if the positions are unknown."""
    targets, views = set(targets), dict(views)
    seq_len, vocab = int(shape[1]), int(shape[2])
    out = _Reads()
    for eqn in jaxpr.eqns:
        uses = [i for i, v in enumerate(eqn.invars) if not isinstance(v, Literal) and v in targets]
        viewed = [i for i, v in enumerate(eqn.invars) if not isinstance(v, Literal) and v in views]
        if not uses and not viewed:  # constant folding: indices computed from constants are constants
            vals = [_value(v, known) for v in eqn.invars]
            if all(x is not _MISSING for x in vals) and not eqn.effects:
                try:
                    res = eqn.primitive.bind(*vals, **eqn.params)
                except Exception:  # not evaluable here: its outputs stay unknown (so never trusted)
                    continue
                res = res if eqn.primitive.multiple_results else [res]
                known.update({o: np.asarray(r) for o, r in zip(eqn.outvars, res)})
            continue
        if (sub := _sub_jaxpr(eqn)) is not None:
            inner, consts = sub
            inner_known = dict(zip(inner.constvars, consts))
            for v_out, v_in in zip(eqn.invars, inner.invars):
                val = _value(v_out, known)
                if val is not _MISSING:
                    inner_known[v_in] = val
            inner_targets = {inner.invars[i] for i in uses}
            inner_views = {inner.invars[i]: views[eqn.invars[i]] for i in viewed}
            if any(v in inner_targets for v in inner.outvars if not isinstance(v, Literal)):
                raise _All  # the logits pass through the call: its result would need following too
            out.merge(_reads(inner, inner_targets, inner_views, inner_known, shape))  # a view it returns: all
            continue
        if viewed:  # a use of a column view: only its columns are in question
            cols, axis = _axis_read(eqn, views[eqn.invars[0]], known, vocab) if viewed == [0] else (None, None)
            if cols is _WHOLE:
                views[eqn.outvars[0]] = axis
            else:
                out.add_cols(cols)
        if not uses:
            continue
        name = eqn.primitive.name
        if name in _ALIASES and uses == [0]:
            targets.update(eqn.outvars)
            continue
        if uses != [0] or name not in ("slice", "dynamic_slice", "gather"):
            raise _All
        pos, _ = _axis_read(eqn, 1, known, seq_len)
        if pos is None:
            raise _All
        out.pos.update(range(seq_len) if pos is _WHOLE else pos)
        cols, axis = _axis_read(eqn, 2, known, vocab)
        if cols is _WHOLE:
            views[eqn.outvars[0]] = axis
        else:
            out.add_cols(cols)
    if any(not isinstance(v, Literal) and v in targets for v in jaxpr.outvars):
        raise _All
    if any(not isinstance(v, Literal) and v in views for v in jaxpr.outvars):
        out.add_cols(None)  # a view returned whole: every column is in the result
    return out


def detect_metric_reads(metric: Callable[[jax.Array], Any], shape: Sequence[int], dtype: Any
                        ) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
    """(the sorted positions, axis 1, and the sorted vocabulary columns, axis 2) of logits of
    `shape` that `metric` reads; either is None when it cannot be proven (every position, every
    column). Columns are known only where positions are."""
    closed = jax.make_jaxpr(lambda x: call_metric(metric, x))(jax.ShapeDtypeStruct(tuple(shape), dtype))
    jaxpr = closed.jaxpr
    known = dict(zip(jaxpr.constvars, (np.asarray(c) if hasattr(c, "shape") else c for c in closed.consts)))
    try:
        reads = _reads(jaxpr, {jaxpr.invars[0]}, {}, known, tuple(shape))
    except _All:
        return None, None
    pos = tuple(sorted(p for p in reads.pos if 0 <= p < shape[1]))
    cols = None if reads.cols is None else tuple(sorted(c for c in reads.cols if 0 <= c < shape[2]))
    return pos, cols


def detect_metric_positions(metric: Callable[[jax.Array], Any], shape: Sequence[int], dtype: Any
                            ) -> tuple[int, ...] | None:
    """The sorted positions (axis 1) of logits of `shape` that `metric` reads, or None when they
    cannot be proven (then a grid computes every position)."""
    return detect_metric_reads(metric, shape, dtype)[0]


def resolve_metric_reads(metric: Callable[[jax.Array], Any], metric_positions: Any, shape: Sequence[int],
                         dtype: Any) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
    """(positions, columns) a grid computes for `metric` on logits of `shape`, from one trace of it.

    positions: `metric_positions` checked and made non-negative (sorted, unique), or detected when
    None; columns: those the metric provably reads, kept only when at most half the vocabulary
    (fewer are worth an unembedding of their own). None in either means all of that axis."""
    seq_len = int(shape[1])
    if metric_positions is not None:  # checked before the trace: a bad argument fails first, clearly
        if isinstance(metric_positions, (int, np.integer)) and not isinstance(metric_positions, bool):
            metric_positions = [metric_positions]
        given = indices(metric_positions, seq_len, "metric_positions", context=f"for prompts of {seq_len} positions")
        metric_positions = tuple(sorted(set(given)))
    pos, cols = detect_metric_reads(metric, shape, dtype)
    cols = None if cols is None or 2 * len(cols) > shape[2] else cols
    return (pos if metric_positions is None else metric_positions), cols
