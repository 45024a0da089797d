"""Helpers shared by the family converters: reading HF config fields and rotary settings."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, NamedTuple, get_args

from jaxlens.config import ACT_FNS, RopeScaling, RopeType
from jaxlens.conversion.io import CheckpointError

_ACT = {**{a: a for a in ACT_FNS}, "swish": "silu"}  # HF name -> ModelConfig.act_fn


def act_fn(name: str, model_type: str) -> str:
    if name not in _ACT:
        raise CheckpointError(f"{model_type}: activation {name!r} is not supported (supported: {sorted(_ACT)})")
    return _ACT[name]


def need(hf: dict[str, Any], key: str, model_type: str) -> Any:
    if key not in hf or hf[key] is None:
        raise CheckpointError(f"{model_type} config.json lacks {key!r}; the file is incomplete")
    return hf[key]


class Rope(NamedTuple):
    """A checkpoint's rotary settings: `config_kwargs(d_head)` gives the ModelConfig fields."""

    theta: float  # rotary_base
    partial: float  # partial_rotary_factor: the rotated fraction of each head
    scaling: RopeScaling | None  # None: plain RoPE
    base_local: float | None  # RoPE base of sliding-window layers (Gemma 3); None: as global

    def config_kwargs(self, d_head: int) -> dict[str, Any]:
        rotary_dim = int(d_head * self.partial)
        s = self.scaling
        if s is not None and s.rope_type == "longrope":
            for name in ("short_factor", "long_factor"):
                if len(getattr(s, name)) != rotary_dim // 2:
                    raise CheckpointError(f"longrope {name} has {len(getattr(s, name))} entries, but the rotary "
                                          f"dimension {rotary_dim} needs {rotary_dim // 2}; config.json is inconsistent")
        return {"rotary_dim": rotary_dim, "rotary_base": self.theta, "rope_scaling": s,
                "rotary_base_local": self.base_local}


SCALED_ROPE_TYPES = get_args(RopeType)  # what jaxlens.model.rope implements, besides "default"
LAYER_TYPES = ("full_attention", "sliding_attention")  # keys of per-layer-type rope_parameters
_FLOATS = ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
           "attention_factor")
# keys HF's rope functions do not read (or that are read elsewhere): accepted without a word
_NOT_SCALING = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}


def _rope_type(params: dict[str, Any]) -> str:
    return params.get("rope_type", params.get("type")) or "default"


def _scaling(params: dict[str, Any], hf: dict[str, Any], model_type: str, where: str) -> RopeScaling | None:
    """RopeScaling from one (flat) rope parameter dict, with HF's defaults filled in."""
    rope_type = _rope_type(params)
    if rope_type == "default":
        return None
    if rope_type not in SCALED_ROPE_TYPES:
        raise CheckpointError(
            f"{model_type}: {where} rope_type {rope_type!r} is not supported (supported: "
            f"{['default', *SCALED_ROPE_TYPES]}); running it would give wrong activations")
    known = {f.name for f in dataclasses.fields(RopeScaling)}
    unknown = sorted(set(params) - known - _NOT_SCALING)
    if unknown:
        warnings.warn(f"{model_type}: {where} has keys jaxlens does not read: {unknown} "
                      f"(rope_type {rope_type!r}); check that they do not change the computation", stacklevel=3)
    kw: dict[str, Any] = {k: params[k] for k in known & set(params) if params[k] is not None and k != "rope_type"}
    for k in _FLOATS:
        if k in kw:
            kw[k] = float(kw[k])
    if rope_type in ("llama3", "yarn", "longrope"):
        # HF: a top-level original_max_position_embeddings (Phi-3) wins, else the dict's, else the context
        orig = hf.get("original_max_position_embeddings") or kw.get("original_max_position_embeddings") \
            or need(hf, "max_position_embeddings", model_type)
        kw["original_max_position_embeddings"] = int(orig)
        if "factor" not in kw and rope_type in ("yarn", "longrope"):  # HF: the context extension ratio
            kw["factor"] = need(hf, "max_position_embeddings", model_type) / kw["original_max_position_embeddings"]
    if rope_type == "dynamic":  # HF's dynamic NTK scales relative to max_position_embeddings, whatever else is set
        kw["original_max_position_embeddings"] = int(need(hf, "max_position_embeddings", model_type))
    required = {"linear": ("factor",), "dynamic": ("factor",), "yarn": (),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
                "longrope": ("short_factor", "long_factor")}[rope_type]
    missing = [k for k in required if k not in kw]
    if missing:
        raise CheckpointError(f"{model_type}: {where} of rope_type {rope_type!r} lacks {missing}; the config is incomplete")
    return RopeScaling(rope_type=rope_type, **kw)


def rope(hf: dict[str, Any], model_type: str, default_partial: float = 1.0) -> Rope:
    """Rotary settings from transformers-5 `rope_parameters` or older `rope_scaling` + `rope_theta`.

    Scaled variants (linear, dynamic, yarn, llama3, longrope) become a `RopeScaling`; per-layer-type
    parameters (`{"full_attention": {...}, "sliding_attention": {...}}`, Gemma 3) give the global
    settings plus `base_local` from the sliding one, which must be plain RoPE. Anything else
    raises: it would run with wrong positions.
    """
    # HF's precedence: a legacy rope_scaling dict replaces rope_parameters; rope_theta fills in
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise CheckpointError(f"{model_type}: rope parameters must be a JSON object, got {params!r}")
    top_theta = next((hf[k] for k in ("rope_theta", "rotary_emb_base") if hf.get(k) is not None), 10000.0)
    top_partial = next((hf[k] for k in ("partial_rotary_factor", "rotary_pct") if hf.get(k) is not None),
                       default_partial)
    base_local = hf.get("rope_local_base_freq")  # Gemma 3 before transformers 5
    if any(isinstance(v, dict) for v in params.values()):  # per layer type (HF skips a None entry)
        odd = sorted(k for k, v in params.items() if k not in LAYER_TYPES or not isinstance(v, (dict, type(None))))
        if odd:
            raise CheckpointError(f"{model_type}: per-layer-type rope_parameters have keys {odd}; only "
                                  f"{list(LAYER_TYPES)} (each a JSON object) are supported")
        params = {k: v for k, v in params.items() if v is not None}
        sliding = params.get("sliding_attention")
        if sliding is not None:
            kind = _rope_type(sliding)
            if kind != "default":
                raise CheckpointError(
                    f"{model_type}: rope_parameters['sliding_attention'] has rope_type={kind!r}; only plain RoPE "
                    "is supported on sliding-window layers")
            base_local = sliding.get("rope_theta", top_theta)
        full = params.get("full_attention") or {}
        partials = {float(p.get("partial_rotary_factor", top_partial)) for p in params.values()}
        if len(partials) > 1:
            raise CheckpointError(f"{model_type}: per-layer-type partial_rotary_factor {sorted(partials)} differ; "
                                  "one rotary dimension for all layers is supported")
        params, where = full, "rope_parameters['full_attention']"
    else:
        where = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    theta = float(params["rope_theta"] if params.get("rope_theta") is not None else top_theta)
    partial = float(params["partial_rotary_factor"] if params.get("partial_rotary_factor") is not None else top_partial)
    return Rope(theta, partial, _scaling(params, hf, model_type, where),
                None if base_local is None else float(base_local))


def token_ids(hf: dict[str, Any]) -> dict[str, int | None]:
    def one(v: Any) -> int | None:
        if isinstance(v, list):
            return v[0] if v else None
        return v

    return {"bos_token_id": one(hf.get("bos_token_id")), "eos_token_id": one(hf.get("eos_token_id")),
            "pad_token_id": one(hf.get("pad_token_id"))}


__all__ = ["act_fn", "need", "Rope", "SCALED_ROPE_TYPES", "LAYER_TYPES", "rope", "token_ids"]
