"""Reading HF checkpoint folders with numpy: config.json, (sharded) safetensors, .bin via torch."""

from __future__ import annotations

import json
from pathlib import Path
import math
from typing import Any, Callable, Iterable, Sequence

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, needed by safetensors.numpy)
import numpy as np

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be converted; the message says what and how to fix."""


def read_json(file: Path, fix: str) -> dict[str, Any]:
    """A JSON object from `file`; every failure (unreadable, not UTF-8, bad JSON, not an object) is a
    CheckpointError naming the file, what is wrong and `fix`."""
    file = Path(file)
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{file} is not UTF-8 text (byte {e.start}): {fix}") from e
    except OSError as e:
        raise CheckpointError(f"cannot read {file}: {e.strerror or e}; check the path and its permissions") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}): {fix}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} holds a JSON {type(data).__name__}, not an object of fields: {fix}")
    return data


def read_config(path: Path) -> dict[str, Any]:
    """The fields of a HF folder's config.json (CheckpointError naming the file if it is absent or bad)."""
    f = Path(path) / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{path} has no config.json: pass a HuggingFace model folder (save_pretrained output) or a jaxlens converted folder")
    return read_json(f, "re-save the model with save_pretrained")


def _read_safetensors(file: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(
            f"cannot read {file}: {e}. The file is truncated or corrupt; re-download or re-save it"
        ) from e


def _load_bin(file: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(
            f"{file} is a PyTorch .bin checkpoint and torch is not installed: pip install 'jaxlens[torch]', "
            "or convert the checkpoint to safetensors"
        ) from e
    try:
        sd = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {file} with torch.load(weights_only=True): {e}") from e
    out = {}
    for k, v in sd.items():
        if v.dtype == torch.bfloat16:
            out[k] = v.float().numpy().astype(ml_dtypes.bfloat16)
        else:
            out[k] = v.numpy()
    return out


def inside(folder: Path, name: str, listed_in: Path) -> Path:
    """`folder / name`, refused unless it stays inside `folder` (an index naming `../x` or `/etc/passwd`
    must not read files from elsewhere)."""
    root = Path(folder).resolve()
    f = (root / name).resolve()
    if Path(name).is_absolute() or not f.is_relative_to(root):
        raise CheckpointError(f"{listed_in} names shard {name!r}, which is outside {folder}; shard names must be "
                              "file names inside the checkpoint folder (the index is corrupt or malicious)")
    return f


def read_tensors(path: Path, lazy: bool = False) -> dict[str, Any]:
    """All tensors of a checkpoint folder: model.safetensors, a sharded index, or .bin files.

    `lazy`: safetensors tensors come as `LazyArray`s (header read now, data when a device asks);
    .bin files cannot be read in parts and are read whole either way."""
    path = Path(path)
    _load_safetensors = lazy_safetensors if lazy else _read_safetensors
    idx = path / "model.safetensors.index.json"
    if idx.is_file():
        weight_map = read_json(idx, "re-save the model with save_pretrained").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{idx} is not a valid safetensors index: it needs a 'weight_map' object of "
                                  "tensor name -> shard file name")
        out: dict[str, Any] = {}
        for shard in sorted(set(weight_map.values())):
            f = inside(path, shard, idx)
            if not f.is_file():
                raise CheckpointError(f"{idx} names shard {shard!r}, which is missing from {path}")
            out.update(_load_safetensors(f))
        missing = sorted(set(weight_map) - set(out))
        if missing:
            raise CheckpointError(f"tensors listed in {idx.name} are in no shard: {missing[:5]}")
        return out
    single = path / "model.safetensors"
    if single.is_file():
        return _load_safetensors(single)
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        out = {}
        for f in bins:
            out.update(_load_bin(f))
        return out
    raise CheckpointError(f"{path} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


# --- lazy tensors: read only when, and only where, a device asks -------------------------------------

Index = tuple[slice, ...]  # one slice per axis, bounds resolved, step 1
Reader = Callable[[Index], np.ndarray]

ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
             "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


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


def lazy_safetensors(file: Path) -> dict[str, LazyArray]:
    """Every tensor of a safetensors file as a LazyArray: the header is read now, the data only by
    `read` (each read opens the file, copies the block out and closes it, so no mapping of the
    whole file stays resident)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), "np") as f:
            meta = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"cannot read {file}: {e}. The file is truncated or corrupt; re-download or re-save it") from e

    def tensor(name: str, shape: tuple[int, ...], st_dtype: str) -> LazyArray:
        if st_dtype not in ST_DTYPES:
            raise CheckpointError(f"tensor {name!r} in {file} has dtype {st_dtype}, which jaxlens cannot read; "
                                  "convert the checkpoint to float32, bfloat16 or float16")

        def reader(idx: Index) -> np.ndarray:
            try:
                with safe_open(str(file), "np") as f:
                    return np.asarray(f.get_slice(name)[idx] if shape else f.get_tensor(name))
            except Exception as e:
                raise CheckpointError(f"cannot read tensor {name!r} from {file}: {e}. The file is truncated or "
                                      "corrupt (or changed while loading); re-download or re-save it") from e

        return LazyArray(shape, ST_DTYPES[st_dtype], reader)

    return {k: tensor(k, shape, dt) for k, (shape, dt) in meta.items()}


def checked(a: Any, name: str, source: str, allow_nonfinite: bool = False) -> Any:
    """`a` with `check_weights` applied: now for a numpy array, on every block read for a LazyArray
    (so each device checks the slice it reads, and an error names the global position)."""
    if not isinstance(a, LazyArray):
        check_weights({name: a}, source, allow_nonfinite)
        return a
    if not is_float(a.dtype):
        check_weights({name: np.zeros((0,), a.dtype)}, source)  # the dtype error, without reading
    if allow_nonfinite:
        return a

    def reader(idx: Index) -> np.ndarray:
        block = a._reader(idx)
        check_weights({name: block}, source, offset=tuple(s.start for s in idx))
        return block

    return LazyArray(a.shape, a.dtype, reader)


class Tensors:
    """Checked access to a checkpoint's tensors: each `take` verifies shape and marks it used."""

    def __init__(self, tensors: dict[str, Any], dtype: Any, source: str = "checkpoint"):
        self._t = tensors
        self._used: set[str] = set()
        self.dtype = dtype
        self.source = source

    def has(self, name: str) -> bool:
        return name in self._t

    def take(self, name: str, shape: Iterable[int]) -> np.ndarray:
        shape = tuple(int(s) for s in shape)
        if name not in self._t:
            raise CheckpointError(
                f"tensor {name!r} is missing from {self.source}; the file is incomplete or its "
                "config.json describes a different model"
            )
        a = self._t[name]
        if tuple(a.shape) != shape:
            raise CheckpointError(
                f"tensor {name!r} in {self.source} has shape {tuple(a.shape)} but config.json implies {shape}; "
                "the weights and config.json disagree"
            )
        if not is_float(a.dtype):
            raise CheckpointError(f"tensor {name!r} in {self.source} has dtype {a.dtype}, but weights must be floating "
                                  "point; the file is corrupt or is not a model checkpoint")
        self._used.add(name)
        if isinstance(a, LazyArray):  # converted lazily: read when a device asks for its slice
            return a.astype(np.float32)
        return np.asarray(a).astype(np.float32) if a.dtype != np.float32 else np.asarray(a)

    def leftovers(self, ignore: tuple[str, ...] = ()) -> list[str]:
        return sorted(k for k in self._t if k not in self._used and not any(s in k for s in ignore))


def is_float(dtype: Any) -> bool:
    """A floating-point dtype, bfloat16 included (numpy's own `issubdtype` does not know ml_dtypes')."""
    return np.issubdtype(dtype, np.floating) or np.dtype(dtype) in (np.dtype(ml_dtypes.bfloat16),)


def check_weights(flat: dict[str, Any], source: str, allow_nonfinite: bool = False,
                  offset: tuple[int, ...] | None = None) -> None:
    """Every weight floating point and (unless `allow_nonfinite`) free of NaN/inf; CheckpointError naming
    the first bad tensor. An int or bool weight cast to float would run and give nonsense. `offset`:
    the arrays are blocks of larger ones starting there (positions in errors are the whole array's)."""
    for name, a in flat.items():
        a = np.asarray(a)
        if not is_float(a.dtype):
            raise CheckpointError(f"weight {name!r} in {source} has dtype {a.dtype}, but weights must be floating "
                                  "point; the folder is corrupt or from another program: convert again")
        if not allow_nonfinite:
            bad = ~np.isfinite(a)
            if bad.any():
                where = tuple(int(i) for i in np.argwhere(bad)[0])
                at = where if offset is None else tuple(w + o for w, o in zip(where, offset))
                raise CheckpointError(f"weight {name!r} in {source} holds {int(bad.sum())} NaN/inf value(s) (first "
                                      f"at {at}, {a[where]}); the checkpoint is broken. Pass allow_nonfinite=True "
                                      "(--allow-nonfinite) to load it anyway")


def cast_tree(tree: Any, dtype: Any) -> Any:
    """Every leaf as `dtype` (a LazyArray stays lazy: cast as it is read)."""
    if isinstance(tree, dict):
        return {k: cast_tree(v, dtype) for k, v in tree.items()}
    return tree.astype(dtype) if isinstance(tree, LazyArray) else np.asarray(tree).astype(dtype)

__all__ = ["DTYPES", "ST_DTYPES", "CheckpointError", "read_json", "read_config", "inside", "read_tensors", "Tensors",
           "is_float", "check_weights", "cast_tree", "LazyArray", "full_index", "resolve_index", "stack", "split",
           "lazy_safetensors", "checked"]
