"""Which positions of the logits does a metric read? A sound static answer, from its jaxpr.

A patching grid computes logits only where its metric looks (`jaxlens.edits.patching`). The
metric is traced on an abstract [batch pos vocab] input and every use of that input is
inspected: a `slice`, a `dynamic_slice` or a `gather` whose indices along the pos axis are
constants (literals, the jaxpr's constants, or values computed from them alone, which are
evaluated here) reads a known set of positions. A call to a sub-jaxpr (`jit`, `closed_call`,
custom derivatives) is followed inside. Any other use (a log_softmax over the whole logits, a
reshape, an index computed from the logits) means "every position": the answer is never a
guess, so a grid that trusts it computes exactly what the metric needs.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.extend.core import Literal

from jaxlens.fingerprint import call_metric
from jaxlens.validate import indices

__all__ = ["detect_metric_positions", "resolve_metric_positions"]

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


def _reads(jaxpr: Any, targets: set[Any], known: dict[Any, Any], seq_len: int) -> set[int]:
    """Positions (axis 1) of the `targets` (the logits and its aliases) that `jaxpr` reads; _All if unknown."""
    targets = set(targets)
    out: set[int] = set()
    for eqn in jaxpr.eqns:
        uses = [i for i, v in enumerate(eqn.invars) if not isinstance(v, Literal) and v in targets]
        if not uses:  # constant folding: indices computed from constants are constants
            vals = [_value(v, known) for v in eqn.invars]
            if all(x is not _MISSING for x in vals) and not eqn.effects:
                try:
                    res = eqn.primitive.bind(*vals, **eqn.params)
                except Exception:  # not evaluable here: its outputs stay unknown (so never trusted)
                    continue
                res = res if eqn.primitive.multiple_results else [res]
                known.update({o: np.asarray(r) for o, r in zip(eqn.outvars, res)})
            continue
        name = eqn.primitive.name
        if name in _ALIASES and uses == [0]:
            targets.update(eqn.outvars)
        elif name == "slice" and uses == [0]:
            stride = (eqn.params["strides"] or (1,) * len(eqn.params["start_indices"]))[1]
            out.update(range(eqn.params["start_indices"][1], eqn.params["limit_indices"][1], stride))
        elif name == "dynamic_slice" and uses == [0]:
            start = _value(eqn.invars[2], known)
            if start is _MISSING:
                raise _All
            out.update(_span(start, eqn.params["slice_sizes"][1], seq_len))
        elif name == "gather" and uses == [0]:
            idx = _value(eqn.invars[1], known)
            dn = eqn.params["dimension_numbers"]
            if idx is _MISSING or 1 in dn.operand_batching_dims:
                raise _All
            size = eqn.params["slice_sizes"][1]
            if 1 in dn.start_index_map:
                starts = np.asarray(idx)[..., dn.start_index_map.index(1)].ravel()
                for s in np.unique(starts):
                    out.update(_span(s, size, seq_len))
            else:
                out.update(range(size))
        elif (sub := _sub_jaxpr(eqn)) is not None:
            inner, consts = sub
            inner_known = dict(zip(inner.constvars, consts))
            for v_out, v_in in zip(eqn.invars, inner.invars):
                val = _value(v_out, known)
                if val is not _MISSING:
                    inner_known[v_in] = val
            inner_targets = {inner.invars[i] for i in uses}
            if any(v in inner_targets for v in inner.outvars if not isinstance(v, Literal)):
                raise _All  # the logits pass through the call: its result would need following too
            out |= _reads(inner, inner_targets, inner_known, seq_len)
        else:
            raise _All
    if any(not isinstance(v, Literal) and v in targets for v in jaxpr.outvars):
        raise _All
    return out


def detect_metric_positions(metric: Callable[[jax.Array], Any], shape: Sequence[int], dtype: Any
                            ) -> tuple[int, ...] | None:
    """The sorted positions (axis 1) of logits of `shape` that `metric` reads, or None when they
    cannot be proven (then a grid computes every position)."""
    closed = jax.make_jaxpr(lambda x: call_metric(metric, x))(jax.ShapeDtypeStruct(tuple(shape), dtype))
    jaxpr = closed.jaxpr
    known = dict(zip(jaxpr.constvars, (np.asarray(c) if hasattr(c, "shape") else c for c in closed.consts)))
    try:
        pos = _reads(jaxpr, {jaxpr.invars[0]}, known, int(shape[1]))
    except _All:
        return None
    return tuple(sorted(p for p in pos if 0 <= p < shape[1]))


def resolve_metric_positions(metric: Callable[[jax.Array], Any], metric_positions: Any, shape: Sequence[int],
                             dtype: Any) -> tuple[int, ...] | None:
    """`metric_positions` checked and made non-negative (sorted, unique), or detected when None;
    None in the result means every position."""
    seq_len = int(shape[1])
    if metric_positions is None:
        return detect_metric_positions(metric, shape, dtype)
    if isinstance(metric_positions, (int, np.integer)) and not isinstance(metric_positions, bool):
        metric_positions = [metric_positions]
    pos = indices(metric_positions, seq_len, "metric_positions", context=f"for prompts of {seq_len} positions")
    return tuple(sorted(set(pos)))
