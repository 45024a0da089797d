"""Argument checks shared by every entry point: an index JAX would clamp or drop silently is an error.

Each check names the argument, its value and the valid range, so the message says the fix.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["index", "indices"]


def index(value: Any, size: int, name: str, *, negative: bool = True, end: bool = False, context: str = "",
          error: type[Exception] = ValueError) -> int:
    """`value` as an index into `size` things, negative counting from the end when `negative`;
    `end` also allows `size` itself (e.g. the residual stream after the last layer)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise error(f"{name} must be an int index, got {value!r}")
    v, hi, lo = int(value), size if end else size - 1, -size if negative else 0
    if not lo <= v <= hi:
        where = f" {context}" if context else ""
        raise error(f"{name}={v} is out of range{where}; valid {lo}..{hi}"
                    + (" (negative counts from the end)" if negative else ""))
    return v + size if v < 0 else v


def indices(values: Any, size: int, name: str, **kw: Any) -> list[int]:
    """A non-empty sequence of indices, each checked by `index`."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{name} must be a sequence of indices such as [0, 1], got {values!r}")
    out = [index(v, size, f"{name}[{i}]", **kw) for i, v in enumerate(values)]
    if not out:
        raise ValueError(f"{name} is empty: name at least one, or pass None for all")
    return out
