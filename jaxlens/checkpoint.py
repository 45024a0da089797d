"""Orbax checkpoints of converted models: written sharded (each host writes its own shards, through
tensorstore) and restored straight into the shardings of any mesh, whatever mesh wrote them.

A folder is `jaxlens_config.json` + `params.orbax/` (a `StandardCheckpointer` checkpoint of the
unrolled params tree) + the tokenizer + `jaxlens_manifest.json`, written like the safetensors
format (`jaxlens.conversion.save_converted`): into a temporary folder beside the target, the
manifest last, then renamed into place, so a killed write never leaves a folder that loads. The
single-file safetensors format stays the default (`HookedTransformer.save`); this one is for
models too large for one host's memory or one file.
"""

from __future__ import annotations

import contextlib
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from jaxlens.config import ModelConfig
from jaxlens.conversion import (MANIFEST, ORBAX_PARAMS, CheckpointError, check_destination, check_params, crash_point,
                                finish_folder, is_orbax, new_scratch, read_converted_config, remove_stale,
                                resolve_dtype, verify_manifest, write_lock)
from jaxlens.conversion.io import check_weights, is_float


def _checkpointer() -> Any:
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def _sync(name: str) -> None:
    """A barrier across processes (a no-op with one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _shared_scratch(path: Path) -> Path:
    """A temporary folder name beside `path` that every process agrees on (process 0 draws it)."""
    tmp = new_scratch(path, "tmp")
    if jax.process_count() == 1:
        return tmp
    import secrets

    from jax.experimental import multihost_utils

    token = int(multihost_utils.broadcast_one_to_all(np.int64(secrets.randbits(62))))
    return path.parent / f".{path.name}.tmp-mp-{token:x}"


def save_orbax(path: str | Path, cfg: ModelConfig, params: dict[str, Any], *, tokenizer: Any = None,
               overwrite: bool = False) -> Path:
    """Write `params` (unrolled tree of jax or numpy arrays, sharded or not) as an Orbax checkpoint
    folder at `path`, atomically; every process of a multi-host run calls it (each writes the
    shards it holds; process 0 writes the config, tokenizer and manifest and renames)."""
    path = Path(path)
    for name, leaf in _leaves(params).items():
        if not is_float(leaf.dtype):
            raise CheckpointError(f"parameter {name!r} has dtype {leaf.dtype}; weights must be floating point")
    check_params(params, cfg, "the params to save")  # never write a folder that would not load
    check_destination(path, overwrite)
    lead = jax.process_index() == 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with write_lock(path) if lead else contextlib.nullcontext():
        tmp = _shared_scratch(path)
        try:
            if lead:
                check_destination(path, overwrite)  # again: another writer may have finished meanwhile
                remove_stale(path)
                tmp.mkdir()
            _sync("jaxlens-orbax-save-start")
            with _checkpointer() as ckpt:
                ckpt.save(tmp / ORBAX_PARAMS, params)
                ckpt.wait_until_finished()
            crash_point("params")
            _sync("jaxlens-orbax-save-written")
            if lead:
                finish_folder(tmp, path, cfg, tokenizer)
        except BaseException:
            if lead:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        _sync("jaxlens-orbax-save-done")
    return path


def _leaves(tree: Any) -> dict[str, Any]:
    return {"/".join(str(getattr(k, "key", k)) for k in keys): leaf
            for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _metadata(folder: Path) -> Any:
    """The stored tree of (shape, dtype) array metadata; CheckpointError for a folder Orbax cannot read."""
    try:
        with _checkpointer() as ckpt:
            meta = ckpt.metadata(folder)
    except Exception as e:  # orbax's own error types for a missing or damaged checkpoint
        raise CheckpointError(f"{folder} is not a readable Orbax checkpoint ({type(e).__name__}: {e}); the folder is "
                              "half-written or from another program: convert again") from e
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", None)
    if not isinstance(tree, dict):
        raise CheckpointError(f"{folder} holds no params tree; the folder is from another program: convert again")
    return tree


def _check_finite(params: dict[str, Any], source: str) -> None:
    """No NaN/inf in any (sharded) parameter, checked on the devices; the host sees one bit per leaf,
    and the values of a bad leaf only to name the first bad position."""
    ok = jax.jit(lambda p: jax.tree.map(lambda x: jnp.isfinite(x).all(), p))(params)
    for name, good in _leaves(ok).items():
        if not bool(good):
            check_weights({name: np.asarray(_leaves(params)[name])}, source)


def restore_orbax(path: str | Path, mesh: Mesh | None = None, dtype: Any = None, *,
                  allow_nonfinite: bool = False) -> tuple[ModelConfig, dict[str, Any]]:
    """(cfg, params) of an Orbax folder, each parameter restored straight into its sharding on
    `mesh` (`jaxlens.distributed.param_shardings`; None: the default device), cast to `dtype` (None:
    as stored). Checked like the safetensors format: the manifest (every file complete), the
    config, the stored tree against the config's, the weights finite unless `allow_nonfinite`."""
    from jaxlens.distributed import check_fits, make_mesh, param_shardings

    path = Path(path)
    if not is_orbax(path):
        raise CheckpointError(f"{path} has no {ORBAX_PARAMS} folder: it is not a jaxlens Orbax checkpoint")
    if not verify_manifest(path):
        raise CheckpointError(f"{path} has no {MANIFEST}: the Orbax write did not finish (or the folder is from "
                              "another program); convert again")
    cfg = read_converted_config(path)
    folder = (path / ORBAX_PARAMS).resolve()
    meta = _metadata(folder)
    check_params(meta, cfg, str(path))
    for name, m in _leaves(meta).items():
        if not is_float(m.dtype):
            raise CheckpointError(f"parameter {name!r} in {folder} has dtype {m.dtype}; weights must be floating "
                                  "point: the folder is corrupt or from another program, convert again")
    dt = np.dtype(resolve_dtype(dtype)) if dtype is not None else None
    if mesh is not None:
        mesh = make_mesh(mesh)
        check_fits(cfg, mesh)
        shardings = param_shardings(meta, cfg, mesh)
    else:
        shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), meta)
    target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(tuple(m.shape), dt or m.dtype, sharding=s), meta, shardings)
    try:
        with warnings.catch_warnings():  # orbax warns that the target's sharding differs from the stored one
            warnings.simplefilter("ignore")
            with _checkpointer() as ckpt:
                params = ckpt.restore(folder, target)
    except Exception as e:
        raise CheckpointError(f"cannot restore {folder} ({type(e).__name__}: {e}); the checkpoint is damaged: "
                              "convert again") from e
    if not allow_nonfinite:
        _check_finite(params, str(folder))
    return cfg, params


def load_orbax(path: str | Path, dtype: Any = None, *,
               allow_nonfinite: bool = False) -> tuple[ModelConfig, dict[str, Any]]:
    """(cfg, params as host numpy arrays) of an Orbax folder: `load_converted`'s result for this format."""
    cfg, params = restore_orbax(path, None, dtype, allow_nonfinite=allow_nonfinite)
    return cfg, jax.tree.map(np.asarray, params)


__all__ = ["save_orbax", "restore_orbax", "load_orbax"]
