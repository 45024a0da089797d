"""Argument checks shared by every entry point: an index JAX would clamp or drop silently is an error.

Each check names the argument, its value and the valid range, so the message says the fix.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["index", "indices", "check_precision", "check_key"]


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


PRECISIONS = ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32")
_VALID_PRECISIONS: set[str] = set()  # those JAX has accepted once (the check runs per model construction)


def check_precision(precision: Any) -> None:
    """`precision` must be None or a matmul precision JAX accepts ("highest", "default", ...);
    checked up front, since JAX would only refuse it at the first run."""
    if precision is None:
        return
    if not isinstance(precision, str):
        raise TypeError(f"precision must be None or a string such as 'highest', got {precision!r}")
    if precision in _VALID_PRECISIONS:
        return
    import jax

    try:
        with jax.default_matmul_precision(precision):
            pass
    except ValueError:
        raise ValueError(f"precision={precision!r} is not a matmul precision; use None (the backend default) or "
                         f"one of {list(PRECISIONS)}") from None
    _VALID_PRECISIONS.add(precision)


def check_key(key: Any, name: str = "key") -> None:
    """`key` must be a JAX PRNG key: a typed key (`jax.random.key(0)`) or a legacy uint32 [2]
    (`jax.random.PRNGKey(0)`); an int or other array gives a TypeError with that hint."""
    import jax
    import jax.numpy as jnp

    dtype = getattr(key, "dtype", None)
    shape = getattr(key, "shape", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key) and shape == ():
        return
    if dtype is not None and dtype == jnp.uint32 and shape == (2,):
        return
    raise TypeError(f"{name} must be a JAX PRNG key such as jax.random.key(0), got {key!r}"
                    + (f" (dtype {dtype}, shape {shape})" if dtype is not None else ""))

