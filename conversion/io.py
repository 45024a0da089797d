"""Reading HF checkpoint folders with numpy: config.json, (sharded) safetensors, .bin via torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, needed by safetensors.numpy)
import numpy as np

from jaxlens.conversion.lazy import Index, LazyArray

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


# --- lazy reading (the array algebra is conversion/lazy.py) --------------------------------------------

ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
             "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


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
           "is_float", "check_weights", "cast_tree", "lazy_safetensors", "checked"]
