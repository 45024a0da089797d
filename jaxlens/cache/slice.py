"""TransformerLens `Slice` semantics for `pos_slice`, `neuron_slice` and `batch_slice`, as a pytree.

A slice input is one of (TransformerLens `utils.Slice`):

- `None`: identity, leave the axis alone;
- an int (also a numpy integer or a 0-d integer array): index that position, dropping the axis;
- a tuple `(stop,)`, `(start, stop)` or `(start, stop, step)`, or a Python `slice`: a range;
- a list or 1-D array of indices (or a boolean mask): gather those positions, keeping the axis.

`Slice` is a registered pytree: the mode and any range are static, while an int or an index
array is a leaf. So a jitted analysis that takes a `Slice` compiles once per mode (and index
count) and is reused for every position, and an index computed inside `jit` (a tracer) works too.
"""

from __future__ import annotations

import numbers
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

SliceInput = Union[None, int, tuple, slice, list, np.ndarray, jax.Array, "Slice"]
_HELP = ("use None, an int, a (start, stop[, step]) tuple, a slice, or a 1-D list/array of indices "
         "(TransformerLens Slice semantics)")


def _int_scalar(x: Any) -> int | jax.Array | None:
    """A Python int for a concrete integer scalar, the tracer for a traced 0-d integer, else None."""
    if isinstance(x, (bool, np.bool_)):
        return None
    if isinstance(x, numbers.Integral):
        return int(x)
    if isinstance(x, (np.ndarray, jax.Array)) and x.ndim == 0 and jnp.issubdtype(x.dtype, jnp.integer):
        return x if isinstance(x, jax.core.Tracer) else int(x)
    return None



def wrap_negative(idx: Any, n: int) -> Any:
    """Negative indices count from the end (torch/numpy semantics), for traced index arrays too."""
    return jnp.where(idx < 0, idx + n, idx)

@jax.tree_util.register_pytree_node_class
class Slice:
    """A TransformerLens slice over one axis; `apply(x, dim)` applies it.

    `mode` is "identity", "int", "slice" or "array". In "int" mode `value` is an int (or a traced
    integer scalar); in "array" mode a 1-D integer array (numpy, or a jax array when traced).
    """

    def __init__(self, input_slice: SliceInput = None):
        self._mask_len: int | None = None
        if isinstance(input_slice, Slice):
            self.mode, self.value, self._mask_len = input_slice.mode, input_slice.value, input_slice._mask_len
            return
        as_int = _int_scalar(input_slice)
        if as_int is not None:
            self.mode, self.value = "int", as_int
        elif input_slice is None:
            self.mode, self.value = "identity", slice(None)
        elif isinstance(input_slice, tuple):
            if not 1 <= len(input_slice) <= 3 or not all(v is None or _int_scalar(v) is not None for v in input_slice):
                raise ValueError(f"invalid slice tuple {input_slice!r}: it must hold 1 to 3 ints; {_HELP}")
            self.mode, self.value = "slice", slice(*(None if v is None else int(v) for v in input_slice))
        elif isinstance(input_slice, slice):
            self.mode, self.value = "slice", input_slice
        elif isinstance(input_slice, (list, np.ndarray, jax.Array)):
            self.mode, self.value = "array", self._indices_array(input_slice)
        else:
            raise ValueError(f"invalid slice {input_slice!r} of type {type(input_slice).__name__}; {_HELP}")

    def _indices_array(self, x: Any) -> np.ndarray | jax.Array:
        if isinstance(x, jax.core.Tracer):
            if x.ndim != 1 or not jnp.issubdtype(x.dtype, jnp.integer):
                raise ValueError(f"a traced index array must be 1-D integers, got shape {x.shape} {x.dtype}; {_HELP}")
            return x
        a = np.asarray(x)
        if a.size == 0:
            return np.zeros((0,), np.int32)
        if a.ndim != 1:
            raise ValueError(f"index array must be 1-D, got shape {a.shape}; {_HELP}")
        if a.dtype == bool:
            self._mask_len = int(a.shape[0])
            return np.nonzero(a)[0].astype(np.int32)
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"index array must hold integers or booleans, got dtype {a.dtype}; {_HELP}")
        return a.astype(np.int32)

    # --- pytree -----------------------------------------------------------------------------
    def tree_flatten(self):
        if self.mode in ("int", "array"):
            return (self.value,), (self.mode, None, self._mask_len)
        sl = self.value
        return (), (self.mode, (sl.start, sl.stop, sl.step), None)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = cls.__new__(cls)
        obj.mode, rng, obj._mask_len = aux
        obj.value = children[0] if children else slice(*rng)
        return obj

    # --- use --------------------------------------------------------------------------------
    @property
    def is_concrete(self) -> bool:
        """False when the index is a tracer (then `indices` and `check` cannot look at it)."""
        return not isinstance(self.value, jax.core.Tracer)

    def apply(self, x: Any, dim: int = 0) -> Any:
        """Slice `x` along `dim` (negative dims count from the end, as in TransformerLens)."""
        if self.mode == "identity":
            return x
        axis = dim % x.ndim
        if self.mode == "slice" or (self.mode in ("int", "array") and self.is_concrete):
            index = [slice(None)] * x.ndim
            index[axis] = self.value
            return x[tuple(index)]
        n = x.shape[axis]
        idx = wrap_negative(jnp.asarray(self.value), n)
        if self.mode == "int":
            return jax.lax.dynamic_index_in_dim(x, idx, axis, keepdims=False)
        return jnp.take(x, idx, axis=axis)

    def indices(self, max_ctx: int | None = None) -> np.ndarray:
        """The selected indices as a numpy array (an int gives `array([i])`), as TransformerLens."""
        if not self.is_concrete:
            raise ValueError("this Slice holds a traced index; its indices are not known outside jit")
        if self.mode == "int":
            return np.array([self.value], dtype=np.int64)
        if max_ctx is None:
            raise ValueError("max_ctx must be given for a slice that is not an int")
        return np.arange(max_ctx, dtype=np.int64)[self.value]

    def check(self, size: int, what: str) -> "Slice":
        """Raise ValueError if a concrete index falls outside an axis of length `size`."""
        if self._mask_len is not None and self._mask_len != size:
            raise ValueError(f"{what} is a boolean mask of length {self._mask_len}, but the axis has length {size}")
        if self.mode in ("int", "array") and self.is_concrete:
            idx = np.atleast_1d(np.asarray(self.value))
            bad = idx[(idx < -size) | (idx >= size)]
            if bad.size:
                raise ValueError(f"{what} index {int(bad[0])} is out of range for an axis of length {size}; "
                                 f"use indices in [{-size}, {size})")
        return self

    def collapse_free(self) -> "Slice":
        """An int becomes a one-element index array, so the axis is kept (TransformerLens `unwrap`)."""
        if self.mode != "int":
            return self
        v = self.value
        return Slice(jnp.reshape(v, (1,)) if not self.is_concrete else [v])

    @classmethod
    def unwrap(cls, slice_input: SliceInput) -> "Slice":
        """TransformerLens `Slice.unwrap`: a raw int becomes `[int]` (the axis is kept); a Slice is kept."""
        if isinstance(slice_input, Slice):
            return slice_input
        s = cls(slice_input)
        return s.collapse_free() if s.mode == "int" else s

    def __repr__(self) -> str:
        return f"Slice: {self.value} Mode: {self.mode} "

__all__ = ["SliceInput", "wrap_negative", "Slice"]
