"""HF checkpoint -> (ModelConfig, params), without torch. Installed as `jaxlens.conversion`.

A registry keyed by HF `model_type`, assembled from the family modules of this package: each
declares `MODEL_TYPES` (the HF `model_type`s it reads), `config_from_hf(hf, mt)`, `convert(tensors,
cfg)` and `IGNORE` (tensor names that are not weights). Adding a family is adding its file. A converted model is saved as `jaxlens_config.json` plus
`params.safetensors` (the flat Flax tree), which loads with neither torch nor transformers.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from jaxlens.config import ModelConfig
from jaxlens.conversion.io import DTYPES, CheckpointError, Tensors, cast_tree, read_config, read_tensors

CONVERTED_CONFIG = "jaxlens_config.json"
CONVERTED_PARAMS = "params.safetensors"


class Family(NamedTuple):
    config_from_hf: Callable[[dict[str, Any]], ModelConfig]
    convert: Callable[[Tensors, ModelConfig], dict[str, Any]]
    ignore: tuple[str, ...]


NOT_FAMILIES = ("common", "io")  # helper modules of this package


def _registry() -> dict[str, Family]:
    out: dict[str, Family] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name in NOT_FAMILIES:
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        for mt in mod.MODEL_TYPES:
            if mt in out:
                raise RuntimeError(f"model_type {mt!r} is claimed by two conversion modules")
            out[mt] = Family(partial(mod.config_from_hf, mt=mt), mod.convert, mod.IGNORE)
    return out


REGISTRY: dict[str, Family] = _registry()


def resolve_dtype(dtype: Any) -> Any:
    if dtype is None:
        return np.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return np.dtype(dtype).type if not hasattr(dtype, "dtype") else dtype


def hf_config(path: str | Path) -> ModelConfig:
    """ModelConfig from a HF folder's config.json (no weights read)."""
    hf = read_config(Path(path))
    mt = hf.get("model_type")
    if mt not in REGISTRY:
        raise CheckpointError(
            f"model_type {mt!r} in {Path(path) / 'config.json'} is not supported; supported: {sorted(REGISTRY)}"
        )
    cfg = REGISTRY[mt].config_from_hf(hf)
    name = hf.get("_name_or_path") or Path(path).name
    arch = (hf.get("architectures") or [None])[0]  # None: ModelConfig fills in the family's usual class
    return cfg.replace(model_name=str(name), original_architecture=arch)


def convert_hf(path: str | Path, dtype: Any = None) -> tuple[ModelConfig, dict[str, Any]]:
    """Read a HF checkpoint folder and return (cfg, params) with params as numpy arrays."""
    path = Path(path)
    cfg = hf_config(path)
    fam = REGISTRY[cfg.model_type]
    t = Tensors(read_tensors(path), dtype, source=str(path))
    params = fam.convert(t, cfg)
    left = t.leftovers(fam.ignore + (("lm_head.weight",) if cfg.tie_word_embeddings else ()))
    if left:
        warnings.warn(f"{path}: {len(left)} tensors were not used by the {cfg.model_type} converter: {left[:8]}",
                      stacklevel=2)
    return cfg, cast_tree(params, resolve_dtype(dtype))


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


def save_converted(path: str | Path, cfg: ModelConfig, params: dict[str, Any]) -> Path:
    """Write `jaxlens_config.json` + `params.safetensors`; loadable without torch or transformers."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    flat = {k: np.ascontiguousarray(np.asarray(v)) for k, v in flatten(params).items()}
    tmp = path / (CONVERTED_PARAMS + ".tmp")
    save_file(flat, str(tmp), metadata={"format": "jaxlens"})
    tmp.replace(path / CONVERTED_PARAMS)
    (path / CONVERTED_CONFIG).write_text(cfg.to_json())
    return path


def load_converted(path: str | Path, dtype: Any = None) -> tuple[ModelConfig, dict[str, Any]]:
    from safetensors.numpy import load_file

    path = Path(path)
    cfg = ModelConfig.from_dict(json.loads((path / CONVERTED_CONFIG).read_text()))
    f = path / CONVERTED_PARAMS
    try:
        flat = load_file(str(f))
    except Exception as e:
        raise CheckpointError(f"cannot read {f}: {e}; the file is truncated or corrupt, convert again") from e
    params = unflatten(flat)
    return cfg, params if dtype is None else cast_tree(params, resolve_dtype(dtype))


def load_any(path: str | Path, dtype: Any = None) -> tuple[ModelConfig, dict[str, Any]]:
    """A jaxlens converted folder or a HF checkpoint folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model path {path} does not exist")
    if (path / CONVERTED_CONFIG).is_file():
        return load_converted(path, dtype)
    return convert_hf(path, dtype)


__all__ = ["REGISTRY", "Family", "NOT_FAMILIES", "CONVERTED_CONFIG", "CONVERTED_PARAMS", "resolve_dtype", "CheckpointError", "convert_hf", "hf_config", "save_converted", "load_converted", "load_any",
           "flatten", "unflatten"]
