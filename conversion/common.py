"""Helpers shared by the family converters: reading HF config fields and rotary settings."""

from __future__ import annotations

from typing import Any

from jaxlens.config import ACT_FNS
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


def rope(hf: dict[str, Any], model_type: str, default_partial: float = 1.0) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) from transformers-5 `rope_parameters` or older keys.

    Only plain RoPE is supported; a scaled variant (linear, dynamic, yarn, llama3, ...) would
    run with wrong positions, so it raises.
    """
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise CheckpointError(f"{model_type}: per-layer-type rope_parameters are not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise CheckpointError(
            f"{model_type}: rope scaling type {rope_type!r} is not supported (only plain RoPE); "
            "running it would give wrong activations"
        )
    theta = params.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct", default_partial)))
    return float(theta), float(partial)


def token_ids(hf: dict[str, Any]) -> dict[str, int | None]:
    def one(v: Any) -> int | None:
        if isinstance(v, list):
            return v[0] if v else None
        return v

    return {"bos_token_id": one(hf.get("bos_token_id")), "eos_token_id": one(hf.get("eos_token_id")),
            "pad_token_id": one(hf.get("pad_token_id"))}


def reject(hf: dict[str, Any], model_type: str, checks: dict[str, tuple[Any, str]]) -> None:
    """Raise for config attributes whose non-default values we cannot run faithfully."""
    bad = [f"{k}={hf[k]!r} ({why})" for k, (ok, why) in checks.items() if k in hf and hf[k] not in ok]
    if bad:
        raise CheckpointError(f"{model_type}: unsupported config: " + "; ".join(bad))

__all__ = ["act_fn", "need", "rope", "token_ids", "reject"]
