"""Lazy tensors: a checkpoint tensor, or a conversion of one, read only when, and only where, a device asks.

`LazyArray` is what `conversion.io.read_tensors(path, lazy=True)` returns for safetensors files:
the family converters run on it unchanged, as on numpy arrays, and `jax.make_array_from_callback`
then reads each device's slice straight from the file. This module is the array algebra only
(index maps for reshape, transpose, indexing, split, stack, cast, scalar arithmetic); the file
readers and checks live in `conversion.io`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

Index = tuple[slice, ...]  # one slice per axis, bounds resolved, step 1
Reader = Callable[[Index], np.ndarray]


def full_index(shape: tuple[int, ...]) -> Index:
    return tuple(slice(0, int(d)) for d in shape)


def resolve_index(idx: Any, shape: tuple[int, ...]) -> Index | None:
    """`idx` (a tuple of slices, as `jax.make_array_from_callback` passes) with bounds resolved and one
    slice per axis; None when it has a step or is not made of slices (the caller reads all, then indexes)."""
    idx = tuple(idx) if isinstance(idx, tuple) else (idx,)
    if len(idx) > len(shape) or not all(isinstance(s, slice) for s in idx):
        return None
    out = []
    for s, d in zip(idx + (slice(None),) * (len(shape) - len(idx)), shape):
        start, stop, step = s.indices(int(d))
        if step != 1:
            return None
        out.append(slice(start, max(start, stop)))
    return tuple(out)


def _reshape_groups(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Axes of shape `a` and of its reshape `b` in groups of equal product (a split, a merge or 1:1)."""
    groups, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        ins, outs, pa, pb = [], [], 1, 1
        if i < len(a):
            ins, pa, i = [i], a[i], i + 1
        if j < len(b):
            outs, pb, j = [j], b[j], j + 1
        while pa != pb:
            if pa < pb:
                ins.append(i)
                pa, i = pa * a[i], i + 1
            else:
                outs.append(j)
                pb, j = pb * b[j], j + 1
        groups.append((ins, outs))
    return groups


class LazyArray:
    """A checkpoint tensor, or a conversion of one (reshape, transpose, indexing, split, stack, cast,
    arithmetic with a scalar), read only when asked and only the part asked for.

    `read(index)` returns the block at `index` (one slice per axis): each operation maps the index
    back to its input's, so a device's slice of a converted parameter reads only the matching part of
    the file. The family converters run on these unchanged, as they would on numpy arrays; any numpy
    function they call that is not one of the above reads the whole array (correct, just not lazy)."""

    def __init__(self, shape: tuple[int, ...], dtype: Any, reader: Reader):
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self._reader = reader

    ndim = property(lambda self: len(self.shape))
    size = property(lambda self: math.prod(self.shape))
    nbytes = property(lambda self: self.size * self.dtype.itemsize)

    def __repr__(self) -> str:
        return f"LazyArray(shape={self.shape}, dtype={self.dtype})"

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, index: Any = None) -> np.ndarray:
        """The block at `index` (None: everything), as a numpy array."""
        if index is None:
            return self._reader(full_index(self.shape))
        idx = resolve_index(index, self.shape)
        return self._reader(full_index(self.shape))[index] if idx is None else self._reader(idx)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self.read()
        return a if dtype is None else a.astype(dtype)

    # elementwise ------------------------------------------------------------------------------------
    def _map(self, fn: Callable[[np.ndarray], np.ndarray]) -> "LazyArray":
        dtype = fn(np.zeros((0,), self.dtype)).dtype
        return LazyArray(self.shape, dtype, lambda idx: fn(self._reader(idx)))

    def astype(self, dtype: Any, copy: bool = True) -> "LazyArray":
        dtype = np.dtype(dtype)
        return self if dtype == self.dtype else self._map(lambda a: a.astype(dtype))

    def _scalar_op(self, other: Any, op: Callable[[Any, Any], Any]) -> Any:
        if np.ndim(other) != 0 or isinstance(other, LazyArray):
            return op(np.asarray(self), np.asarray(other))  # not a conversion step we know: read it all
        return self._map(lambda a: op(a, other))

    __add__ = lambda self, o: self._scalar_op(o, lambda a, b: a + b)  # noqa: E731
    __radd__ = lambda self, o: self._scalar_op(o, lambda a, b: b + a)  # noqa: E731
    __sub__ = lambda self, o: self._scalar_op(o, lambda a, b: a - b)  # noqa: E731
    __rsub__ = lambda self, o: self._scalar_op(o, lambda a, b: b - a)  # noqa: E731
    __mul__ = lambda self, o: self._scalar_op(o, lambda a, b: a * b)  # noqa: E731
    __rmul__ = lambda self, o: self._scalar_op(o, lambda a, b: b * a)  # noqa: E731
    __neg__ = lambda self: self._map(lambda a: -a)  # noqa: E731

    # layout -----------------------------------------------------------------------------------------
    def transpose(self, *axes: Any) -> "LazyArray":
        axes = tuple(axes[0]) if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else tuple(axes)
        axes = axes or tuple(reversed(range(self.ndim)))
        axes = tuple(int(a) % self.ndim for a in axes)
        if sorted(axes) != list(range(self.ndim)):
            raise ValueError(f"axes {axes} are not a permutation of {self.ndim} axes")

        def reader(idx: Index) -> np.ndarray:
            src = list(full_index(self.shape))
            for k, ax in enumerate(axes):
                src[ax] = idx[k]
            return self._reader(tuple(src)).transpose(axes)

        return LazyArray(tuple(self.shape[a] for a in axes), self.dtype, reader)

    T = property(lambda self: self.transpose())

    def reshape(self, *shape: Any) -> "LazyArray":
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else tuple(shape)
        shape = tuple(int(d) for d in shape)
        if shape.count(-1) == 1:
            known = math.prod(d for d in shape if d != -1)
            shape = tuple(self.size // known if d == -1 and known else d for d in shape)
        if math.prod(shape) != self.size:
            raise ValueError(f"cannot reshape an array of shape {self.shape} into {shape}")
        if 0 in self.shape:
            return LazyArray(shape, self.dtype, lambda idx: self.read().reshape(shape)[idx])
        groups = _reshape_groups(self.shape, shape)

        def reader(idx: Index) -> np.ndarray:
            src, block, inner = [], [], []
            for ins, outs in groups:
                if len(ins) == 1 and outs:  # one axis split into several: read the rows that cover the block
                    s, rest = idx[outs[0]], math.prod(shape[o] for o in outs[1:])
                    src.append(slice(s.start * rest, s.stop * rest))
                    block += [s.stop - s.start, *(shape[o] for o in outs[1:])]
                    inner += [slice(None), *(idx[o] for o in outs[1:])]
                else:  # a merge (or size-1 axes): read those axes whole
                    src += [slice(0, self.shape[i]) for i in ins]
                    block += [shape[o] for o in outs]
                    inner += [idx[o] for o in outs]
            return self._reader(tuple(src)).reshape(block)[tuple(inner)]

        return LazyArray(shape, self.dtype, reader)

    def __getitem__(self, key: Any) -> "LazyArray":
        key = key if isinstance(key, tuple) else (key,)
        if Ellipsis in key:
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (self.ndim - len(key) + 1) + key[i + 1:]
        key = key + (slice(None),) * (self.ndim - len(key))
        if len(key) != self.ndim or not all(isinstance(k, (slice, int, np.integer)) for k in key):
            raise IndexError(f"LazyArray supports int and slice indexing only, got {key!r}")
        src_of, shape, ints = [], [], []
        for k, d in zip(key, self.shape):
            if isinstance(k, slice):
                start, stop, step = k.indices(d)
                if step != 1:
                    raise IndexError(f"LazyArray slices need step 1, got {k!r}")
                src_of.append(start)
                shape.append(max(0, stop - start))
                ints.append(None)
            else:
                i = int(k) + d if int(k) < 0 else int(k)
                if not 0 <= i < d:
                    raise IndexError(f"index {k} is out of bounds for an axis of size {d}")
                src_of.append(None)
                ints.append(i)

        def reader(idx: Index) -> np.ndarray:
            it, src, squeeze = iter(idx), [], []
            for start, i in zip(src_of, ints):
                if i is not None:
                    src.append(slice(i, i + 1))
                    squeeze.append(0)
                else:
                    s = next(it)
                    src.append(slice(start + s.start, start + s.stop))
                    squeeze.append(slice(None))
            return self._reader(tuple(src))[tuple(squeeze)]

        return LazyArray(tuple(shape), self.dtype, reader)

    # numpy functions the converters use -------------------------------------------------------------
    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        """`scalar + lazy` (and -, *) stays lazy; any other ufunc reads its lazy inputs whole."""
        if method == "__call__" and not kwargs and ufunc in (np.add, np.subtract, np.multiply) and len(inputs) == 2:
            a, b = inputs
            if isinstance(b, LazyArray) and not isinstance(a, LazyArray) and np.ndim(a) == 0:
                return b._map(lambda x: ufunc(a, x))
            if isinstance(a, LazyArray) and not isinstance(b, LazyArray) and np.ndim(b) == 0:
                return a._map(lambda x: ufunc(x, b))
        real = [np.asarray(x) if isinstance(x, LazyArray) else x for x in inputs]
        return getattr(ufunc, method)(*real, **kwargs)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        if func is np.stack:
            return stack(*args, **kwargs)
        if func is np.split:
            return split(*args, **kwargs)
        if func is np.shape:
            return self.shape
        real = lambda x: np.asarray(x) if isinstance(x, LazyArray) else x  # noqa: E731
        args = [[real(a) for a in x] if isinstance(x, (list, tuple)) else real(x) for x in args]
        return func(*args, **{k: real(v) for k, v in kwargs.items()})  # anything else: read whole


def stack(arrays: Sequence[Any], axis: int = 0) -> LazyArray:
    """`np.stack` of lazy arrays: a block reads only the members (and parts) it covers."""
    parts = [a if isinstance(a, LazyArray) else LazyArray(np.shape(a), np.asarray(a).dtype,
                                                          lambda idx, a=np.asarray(a): a[idx]) for a in arrays]
    if not parts or len({p.shape for p in parts}) != 1:
        raise ValueError("stack needs arrays of one shape")
    dtype = np.result_type(*(p.dtype for p in parts))
    shape = list(parts[0].shape)
    axis = axis % (len(shape) + 1)
    shape.insert(axis, len(parts))

    def reader(idx: Index) -> np.ndarray:
        rest = idx[:axis] + idx[axis + 1:]
        return np.stack([parts[i]._reader(rest).astype(dtype, copy=False) for i in range(idx[axis].start,
                                                                                           idx[axis].stop)], axis)

    return LazyArray(tuple(shape), dtype, reader)


def split(a: LazyArray, indices_or_sections: Any, axis: int = 0) -> list[LazyArray]:
    """`np.split` of a lazy array into lazy pieces."""
    n = a.shape[axis]
    if isinstance(indices_or_sections, (int, np.integer)):
        if n % int(indices_or_sections):
            raise ValueError("array split does not result in an equal division")
        step = n // int(indices_or_sections)
        cuts = list(range(step, n, step))
    else:
        cuts = [int(c) for c in indices_or_sections]
    bounds = [0, *cuts, n]
    pre = (slice(None),) * (axis % a.ndim)
    return [a[pre + (slice(lo, max(lo, hi)),)] for lo, hi in zip(bounds[:-1], bounds[1:])]


__all__ = ["Index", "Reader", "LazyArray", "full_index", "resolve_index", "stack", "split"]
