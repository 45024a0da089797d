"""HF checkpoint -> (ModelConfig, params), without torch. Installed as `jaxlens.conversion`.

A registry keyed by HF `model_type`, assembled from the family modules of this package: each
declares `MODEL_TYPES` (the HF `model_type`s it reads), `config_from_hf(hf, mt)`, `convert(tensors,
cfg)` and `IGNORE` (tensor names that are not weights). Adding a family is adding its file. A converted model is saved as `jaxlens_config.json` plus
`params.safetensors` (the flat Flax tree), which loads with neither torch nor transformers, or
with `params.orbax/` instead (an Orbax checkpoint, sharded: `jaxlens.checkpoint`).

`lazy=True` (what `from_pretrained(..., mesh=...)` uses) converts without reading: the leaves
are `conversion.lazy.LazyArray`s that read, convert, check and cast only the block a device asks for.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import pkgutil
import secrets
import shutil
import sys
import time
import warnings
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np

from jaxlens.config import ModelConfig
from jaxlens.conversion.io import (DTYPES, CheckpointError, Tensors, cast_tree, check_weights, checked,
                                   inside, is_float, lazy_safetensors, read_config, read_json, read_tensors)
from jaxlens.conversion.lazy import LazyArray

CONVERTED_CONFIG = "jaxlens_config.json"
CONVERTED_PARAMS = "params.safetensors"
ORBAX_PARAMS = "params.orbax"  # the Orbax format's parameters (a folder), instead of CONVERTED_PARAMS


class Family(NamedTuple):
    config_from_hf: Callable[[dict[str, Any]], ModelConfig]
    convert: Callable[[Tensors, ModelConfig], dict[str, Any]]
    ignore: tuple[str, ...]


NOT_FAMILIES = ("common", "io", "keys")  # helper modules of this package


def _registry() -> dict[str, Family]:
    out: dict[str, Family] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name in NOT_FAMILIES:
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        for mt in getattr(mod, "MODEL_TYPES", ()):  # helper modules declare none
            if mt in out:
                raise RuntimeError(f"model_type {mt!r} is claimed by two conversion modules")
            out[mt] = Family(partial(mod.config_from_hf, mt=mt), mod.convert, mod.IGNORE)
    return out


REGISTRY: dict[str, Family] = _registry()


def resolve_dtype(dtype: Any) -> Any:
    """The numpy scalar type for a `dtype` argument (None: float32); only floating dtypes are weights."""
    if dtype is None:
        return np.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    try:
        dt = np.dtype(getattr(dtype, "dtype", dtype) if not isinstance(dtype, type) else dtype)
    except TypeError as e:
        raise TypeError(f"dtype {dtype!r} is not a dtype; pass one of {sorted(DTYPES)}") from e
    if not is_float(dt):
        raise ValueError(f"dtype {dtype!r} is not a floating-point dtype: weights are loaded as one of "
                         f"{sorted(DTYPES)}")
    return dt.type


# HF config.json fields that are integers wherever they appear (checked before a family reads them,
# so "12" gives an error naming the field rather than a reshape error deep in the converter)
HF_INT_FIELDS = ("n_embd", "n_layer", "n_head", "n_positions", "n_ctx", "n_inner", "hidden_size",
                 "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                 "vocab_size", "max_position_embeddings", "head_dim", "sliding_window")
HF_HEAD_FIELDS = ("n_head", "num_attention_heads")


def check_hf_fields(hf: dict[str, Any], file: Path) -> None:
    """CheckpointError naming `file` and the field for an integer field holding another type or <= 0."""
    for k in HF_INT_FIELDS:
        v = hf.get(k)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int):
            raise CheckpointError(f"{file}: field {k!r} is {v!r} ({type(v).__name__}) but must be an integer; "
                                  "fix config.json")
        if v <= 0 and k != "sliding_window":
            raise CheckpointError(f"{file}: field {k!r} is {v} but must be a positive integer; fix config.json")


def hf_config(path: str | Path) -> ModelConfig:
    """ModelConfig from a HF folder's config.json (no weights read).

    Every problem with the file is a CheckpointError naming config.json and, where it can be told,
    the field: the family modules read fields directly, so their TypeError/ValueError/KeyError are
    turned into one here, at the boundary."""
    file = Path(path) / "config.json"
    hf = read_config(Path(path))
    mt = hf.get("model_type")
    if not isinstance(mt, str) or mt not in REGISTRY:
        raise CheckpointError(
            f"model_type {mt!r} in {file} is not supported; supported: {sorted(REGISTRY)}"
        )
    check_hf_fields(hf, file)
    try:
        cfg = REGISTRY[mt].config_from_hf(hf)
    except CheckpointError:
        raise
    except KeyError as e:
        raise CheckpointError(f"{file}: field {e.args[0]!r}, which {mt} models need, is missing; re-save the model "
                              "with save_pretrained") from e
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{file}: {e}; fix config.json or re-save the model with save_pretrained") from e
    if hf.get("head_dim") is None and cfg.n_heads * cfg.d_head != cfg.d_model:
        field = next((k for k in HF_HEAD_FIELDS if k in hf), "the head count")
        raise CheckpointError(f"{file}: {field}={cfg.n_heads} does not divide the hidden size {cfg.d_model}; "
                              "fix config.json (or give head_dim)")
    name = hf.get("_name_or_path") or Path(path).name
    arch = (hf.get("architectures") or [None])[0]  # None: ModelConfig fills in the family's usual class
    return cfg.replace(model_name=str(name), original_architecture=arch if isinstance(arch, str) else None)


def convert_hf(path: str | Path, dtype: Any = None, *, allow_nonfinite: bool = False,
               lazy: bool = False) -> tuple[ModelConfig, dict[str, Any]]:
    """Read a HF checkpoint folder and return (cfg, params) with params as numpy arrays.

    The weights must be floating point and finite (unless `allow_nonfinite`), and the tree must be
    the one the model builds for the config (`check_params`). `lazy`: the leaves are `LazyArray`s
    (conversion included) that read, check and cast only the block a device asks for, so placing
    them one at a time (`jaxlens.distributed.place`) never holds the whole model on the host."""
    path = Path(path)
    dt = resolve_dtype(dtype)
    cfg = hf_config(path)
    fam = REGISTRY[cfg.model_type]
    t = Tensors(read_tensors(path, lazy=lazy), dtype, source=str(path))
    params = fam.convert(t, cfg)
    left = t.leftovers(fam.ignore + (("lm_head.weight",) if cfg.tie_word_embeddings else ()))
    if left:
        warnings.warn(f"{path}: {len(left)} tensors were not used by the {cfg.model_type} converter: {left[:8]}",
                      stacklevel=2)
    params = check_tree(params, str(path), allow_nonfinite)
    params = cast_tree(params, dt)
    check_params(params, cfg, str(path))
    return cfg, params


def check_tree(params: dict[str, Any], source: str, allow_nonfinite: bool = False) -> dict[str, Any]:
    """`check_weights` on every leaf: at once for numpy leaves; for `LazyArray` leaves the dtype now and
    the values on each read (`conversion.io.checked`). Returns the (checked) tree."""
    flat = flatten(params)
    if not any(isinstance(v, LazyArray) for v in flat.values()):
        check_weights(flat, source, allow_nonfinite)
        return params
    return unflatten({k: checked(v, k, source, allow_nonfinite) for k, v in flat.items()})


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in flat.items():
        node = out
        *parents, leaf = k.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


MANIFEST = "jaxlens_manifest.json"
PAUSE_ENV = "JAXLENS_TEST_PAUSE_AT"
WRITE_STEPS = ("params", "tokenizer", "manifest", "swap")


def crash_point(step: str) -> None:
    """Test-only hook: with JAXLENS_TEST_PAUSE_AT=<step> (one of WRITE_STEPS) the writer prints
    `jaxlens-pause: <step>` on stderr and sleeps, so a test can kill -9 it exactly there."""
    if os.environ.get(PAUSE_ENV) == step:
        print(f"jaxlens-pause: {step}", file=sys.stderr, flush=True)
        time.sleep(3600)


def _params_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """{"a/b/c": (shape, dtype name)} for every leaf of a params tree (arrays or ShapeDtypeStructs)."""
    import jax

    out = {}
    for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys)
        out[name] = (tuple(int(d) for d in leaf.shape), str(np.dtype(leaf.dtype)))
    return out


@functools.lru_cache(maxsize=64)
def expected_params(cfg: ModelConfig, dtype: str, scanned: bool = False) -> dict[str, tuple[tuple[int, ...], str]]:
    """The params tree the model builds for `cfg` (names -> (shape, dtype)), read off the model
    itself: `jax.eval_shape` of `Transformer(cfg).init`, so no array is allocated and every
    feature the model has is included without a hand-written list."""
    import jax
    import jax.numpy as jnp

    from jaxlens.hooks import RunCtx
    from jaxlens.model import Transformer

    def init() -> Any:
        toks = jnp.zeros((1, 2), jnp.int32)
        module = Transformer(cfg, scan_layers=scanned, dtype=jnp.dtype(dtype))
        return module.init(jax.random.PRNGKey(0), toks, jnp.ones_like(toks), RunCtx())["params"]

    return _params_shapes(jax.eval_shape(init))


def check_params(params: dict[str, Any], cfg: ModelConfig, source: str) -> None:
    """CheckpointError naming the first mismatching parameters unless `params` has exactly the names,
    shapes and dtypes the model builds for `cfg` (a half-written folder, or params beside another
    model's config, would otherwise load and fail later or drop layers silently)."""
    from jaxlens.model.forward import is_scanned

    got = _params_shapes(params)
    first = got.get("W_E", next(iter(got.values()), ((), "float32")))
    want = expected_params(cfg, first[1], bool(is_scanned(params)))
    missing = [n for n in want if n not in got]
    extra = [n for n in got if n not in want]
    wrong = [f"{n} {got[n][1]}{list(got[n][0])} (config: {want[n][1]}{list(want[n][0])})"
             for n in want if n in got and got[n] != want[n]]
    if missing or extra or wrong:
        parts = [f"{what}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
                 for what, names in (("missing", missing), ("unexpected", extra), ("mismatched", wrong)) if names]
        raise CheckpointError(f"{source}: the parameters do not fit its config ({cfg.model_type}, {cfg.n_layers} "
                              f"layers, d_model {cfg.d_model}): {'; '.join(parts)}. The folder is half-written or "
                              "from another model; convert again")


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path) -> Path:
    """Write `jaxlens_manifest.json` (every file's name, size and sha256), after fsyncing each file.
    Written last, it marks a complete output; `verify_manifest` checks it on load."""
    folder = Path(folder)
    files = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name != MANIFEST:
            fsync_path(f)
            files[f.relative_to(folder).as_posix()] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    out = folder / MANIFEST
    out.write_text(json.dumps({"format": "jaxlens-manifest", "version": 1, "files": files}, indent=1))
    fsync_path(out)
    return out


def verify_manifest(folder: Path) -> bool:
    """True if `folder` has a manifest and every file in it is present with its size and hash;
    False if it has none (written before manifests existed); CheckpointError otherwise."""
    folder = Path(folder)
    m = folder / MANIFEST
    if not m.is_file():
        return False
    files = read_json(m, "the folder is damaged; convert again").get("files")
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        raise CheckpointError(f"{m} has no valid 'files' table; the folder is damaged: convert again")
    orbax = is_orbax(folder)
    for name in (CONVERTED_CONFIG, *(() if orbax else (CONVERTED_PARAMS,))):
        if name not in files:
            raise CheckpointError(f"{m} does not list {name}; the folder is damaged: convert again")
    if orbax and not any(n.startswith(ORBAX_PARAMS + "/") for n in files):
        raise CheckpointError(f"{m} lists no file of {ORBAX_PARAMS}; the folder is damaged: convert again")
    for name, info in files.items():
        f = inside(folder, name, m)
        if not f.is_file():
            raise CheckpointError(f"{f} is listed in {m} but missing: the folder is incomplete; convert again")
        size = f.stat().st_size
        if size != info.get("size"):
            raise CheckpointError(f"{f} has {size} bytes but {m.name} says {info.get('size')}: it was truncated or "
                                  "changed after conversion; convert again")
        if _sha256(f) != info.get("sha256"):
            raise CheckpointError(f"{f} does not match its sha256 in {m.name}: it was changed or corrupted after "
                                  "conversion; convert again")
    return True


def check_destination(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse an output path that cannot take a converted folder: a file, a non-empty folder (unless
    `overwrite`), or a non-empty folder that is not a jaxlens converted folder (never replaced)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"output {path} exists and is a file, not a folder; choose a new folder path")
    if path.is_dir() and any(path.iterdir()):
        if not ((path / CONVERTED_CONFIG).exists() or (path / MANIFEST).exists()):
            raise CheckpointError(f"output folder {path} is not empty and is not a jaxlens converted folder; "
                                  "refusing to replace it: choose a new path")
        if not overwrite:
            raise CheckpointError(f"output folder {path} already holds a converted model; pass overwrite=True "
                                  "(jaxlens convert --overwrite) to replace it, or choose a new path")
    return path


@contextmanager
def write_lock(path: Path) -> Iterator[Path]:
    """Exclusive right to write `path`: an flock on `.<name>.jaxlens-lock` beside it, refused at once
    (CheckpointError) while another process holds it. The kernel drops the lock when its holder
    dies, so a kill -9 never leaves a stale lock; the file is removed when the lock is released."""
    import fcntl

    lock = path.parent / f".{path.name}.jaxlens-lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CheckpointError(f"another process is writing {path} now (it holds {lock}); wait for it to "
                                  "finish, or write to another folder") from None
        try:
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:  # else its previous holder removed the file after we opened it: take the new one
            break
        os.close(fd)
    try:
        yield lock
    finally:
        os.unlink(lock)  # before unlocking, so a process that opened this file sees it is stale
        os.close(fd)


def _scratch(path: Path, kind: str) -> list[Path]:
    prefix = f".{path.name}.{kind}-"
    return [p for p in path.parent.iterdir() if p.name.startswith(prefix)]


def remove_stale(path: Path) -> None:
    """Temporary and replaced folders of writes to `path` that died (called under its lock)."""
    for p in _scratch(path, "tmp") + _scratch(path, "old"):
        shutil.rmtree(p, ignore_errors=True)


def new_scratch(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def swap_into_place(tmp: Path, path: Path) -> None:
    """Rename the finished `tmp` to `path`, moving an existing output aside first and deleting it
    after: at every instant `path` is the old output, the new one, or absent."""
    old = None
    if path.is_dir():
        if any(path.iterdir()):
            old = new_scratch(path, "old")
            os.rename(path, old)
        else:
            path.rmdir()
    crash_point("swap")
    try:
        os.rename(tmp, path)
    except BaseException:
        if old is not None and not path.exists():
            os.rename(old, path)
        raise
    fsync_path(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_converted(path: str | Path, cfg: ModelConfig, params: dict[str, Any], *, tokenizer: Any = None,
                   overwrite: bool = False) -> Path:
    """Write `jaxlens_config.json` + `params.safetensors` (+ the tokenizer) atomically; loadable
    without torch or transformers.

    Everything is written and fsynced into a fresh temporary folder beside `path`, a manifest
    (names, sizes, sha256) last, then the folder is renamed into place; an existing converted
    folder is replaced only with `overwrite`. A lock refuses a second writer of the same path; a
    failed write removes its temporary folder, and the next write removes those of killed ones.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    flat = {k: np.ascontiguousarray(np.asarray(v)) for k, v in flatten(params).items()}
    check_weights(flat, "the params to save", allow_nonfinite=True)
    check_params(unflatten(flat), cfg, "the params to save")  # never write a folder that would not load
    check_destination(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    with write_lock(path):
        check_destination(path, overwrite)  # again: another writer may have finished meanwhile
        remove_stale(path)
        tmp = new_scratch(path, "tmp")
        tmp.mkdir()
        try:
            save_file(flat, str(tmp / CONVERTED_PARAMS), metadata={"format": "jaxlens"})
            crash_point("params")
            finish_folder(tmp, path, cfg, tokenizer)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return path


def finish_folder(tmp: Path, path: Path, cfg: ModelConfig, tokenizer: Any = None) -> None:
    """The common end of every converted-folder write: config, tokenizer, manifest last, fsync,
    then the scratch folder `tmp` (its weights already written) is renamed into place at `path`."""
    (tmp / CONVERTED_CONFIG).write_text(cfg.to_json())
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    crash_point("tokenizer")
    write_manifest(tmp)
    crash_point("manifest")
    fsync_path(tmp)
    swap_into_place(tmp, path)


def read_converted_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a converted folder; CheckpointError naming the file and the problem."""
    f = Path(path) / CONVERTED_CONFIG
    d = read_json(f, "the folder is damaged; convert again")
    try:
        return ModelConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{f}: {e}; the file is damaged or was edited: convert again") from e


_WARNED_NO_MANIFEST: set[str] = set()


def load_converted(path: str | Path, dtype: Any = None, *, allow_nonfinite: bool = False,
                   lazy: bool = False) -> tuple[ModelConfig, dict[str, Any]]:
    """(cfg, params) of a jaxlens converted folder, checked: the manifest (every file complete),
    the config, the weights (floating point, finite unless `allow_nonfinite`) and the params tree
    against the config's (`check_params`). `lazy`: `LazyArray` leaves (see `convert_hf`)."""
    from safetensors.numpy import load_file

    path = Path(path)
    if is_orbax(path):
        from jaxlens.checkpoint import load_orbax

        return load_orbax(path, dtype, allow_nonfinite=allow_nonfinite)
    dt = None if dtype is None else resolve_dtype(dtype)
    if not verify_manifest(path) and str(path) not in _WARNED_NO_MANIFEST:
        _WARNED_NO_MANIFEST.add(str(path))
        warnings.warn(f"{path} has no {MANIFEST} (written by an older jaxlens), so it cannot be checked for "
                      "completeness; convert it again to add one", stacklevel=2)
    cfg = read_converted_config(path)
    f = path / CONVERTED_PARAMS
    if lazy:
        params = check_tree(unflatten(lazy_safetensors(f)), str(f), allow_nonfinite)
    else:
        try:
            flat = load_file(str(f))
        except Exception as e:
            raise CheckpointError(f"cannot read {f}: {e}; the file is truncated or corrupt, convert again") from e
        check_weights(flat, str(f), allow_nonfinite)
        params = unflatten(flat)
    check_params(params, cfg, str(path))
    return cfg, params if dt is None else cast_tree(params, dt)


def is_orbax(path: str | Path) -> bool:
    """A jaxlens converted folder whose parameters are an Orbax checkpoint (`jaxlens.checkpoint`)."""
    return (Path(path) / ORBAX_PARAMS).is_dir()


def load_any(path: str | Path, dtype: Any = None, *, allow_nonfinite: bool = False,
             lazy: bool = False) -> tuple[ModelConfig, dict[str, Any]]:
    """A jaxlens converted folder or a HF checkpoint folder (see `load_converted`, `convert_hf`).

    `lazy`: `LazyArray` leaves read a block at a time (safetensors only; .bin is read whole)."""
    path = Path(path)
    resolve_dtype(dtype)  # a bad dtype fails before anything is read
    if not path.exists():
        raise CheckpointError(f"model path {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"model path {path} is a file; pass the folder that holds config.json "
                              f"(HuggingFace) or {CONVERTED_CONFIG} (jaxlens)")
    if (path / CONVERTED_CONFIG).is_file():
        return load_converted(path, dtype, allow_nonfinite=allow_nonfinite, lazy=lazy)
    return convert_hf(path, dtype, allow_nonfinite=allow_nonfinite, lazy=lazy)


__all__ = ["REGISTRY", "Family", "NOT_FAMILIES", "CONVERTED_CONFIG", "CONVERTED_PARAMS", "ORBAX_PARAMS", "MANIFEST", "PAUSE_ENV",
           "WRITE_STEPS", "HF_INT_FIELDS", "resolve_dtype", "CheckpointError", "check_hf_fields", "convert_hf",
           "hf_config", "expected_params", "check_params", "write_manifest", "verify_manifest", "check_destination",
           "write_lock", "save_converted", "read_converted_config", "load_converted", "load_any", "flatten", "check_tree",
           "is_orbax",
           "unflatten", "crash_point", "fsync_path", "finish_folder", "remove_stale", "new_scratch", "swap_into_place"]
