"""Phi-3 / 3.5 / 4-mini: a Llama-like model whose checkpoint fuses `qkv_proj` (Q, then the
grouped K, then V) and `gate_up_proj` (gate, then up); partial rotary, `longrope` scaling, an
optional sliding window on every layer (HF's Phi3 masks with `sliding_window` when it is set),
and no biases (HF's Phi3 has none). The fused tensors are split here and the rest is
`jaxlens.conversion.llama`'s."""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from jaxlens.config import ModelConfig
from jaxlens.conversion.io import CheckpointError, Tensors
from jaxlens.conversion.llama import IGNORE, llama_like
from jaxlens.conversion.llama import convert as llama_convert

MODEL_TYPES = ("phi3",)
# Phi3Config keys beyond the Llama-like builder's: the pre-extension context longrope reads
USED = frozenset({"original_max_position_embeddings"})
LEGACY_LONGROPE = ("su", "yarn")  # HF's Phi3Config renames these old rope types to longrope


def _legacy(params: Any) -> Any:
    """HF's Phi3Config reads rope types "su" and "yarn" as "longrope" (old Phi-3 configs)."""
    if isinstance(params, dict) and params.get("rope_type", params.get("type")) in LEGACY_LONGROPE:
        return {**{k: v for k, v in params.items() if k != "type"}, "rope_type": "longrope"}
    return params


def config_from_hf(hf: dict[str, Any], mt: str) -> ModelConfig:
    hf = {**hf, **{k: _legacy(hf[k]) for k in ("rope_scaling", "rope_parameters") if k in hf}}
    # HF's Phi3 projections have no biases, whatever attention_bias / mlp_bias say
    cfg = llama_like(hf, mt, used=USED, use_qkv_bias=False, use_o_bias=False, use_mlp_bias=False)
    s = cfg.rope_scaling
    if s is not None and s.rope_type not in ("longrope",):
        raise CheckpointError(f"{mt}: rope_type {s.rope_type!r} is not one HF's Phi3 accepts (default or longrope)")
    return cfg


class _Unfused(Tensors):
    """The checkpoint's tensors with the fused projections split into Llama's names."""

    def __init__(self, t: Tensors, split: dict[str, np.ndarray]):
        self._inner, self._split = t, split
        self.dtype, self.source = t.dtype, t.source

    def has(self, name: str) -> bool:
        return name in self._split or self._inner.has(name)

    def take(self, name: str, shape: Iterable[int]) -> np.ndarray:
        if name not in self._split:
            return self._inner.take(name, shape)
        a = self._split[name]
        if a.shape != tuple(shape):  # cannot happen: the fused tensor's shape was checked against config.json
            raise CheckpointError(f"{self.source}: split {name!r} has shape {a.shape}, expected {tuple(shape)}")
        return a

    def leftovers(self, ignore: tuple[str, ...] = ()) -> list[str]:
        return self._inner.leftovers(ignore)


def convert(t: Tensors, cfg: ModelConfig) -> dict[str, Any]:
    D, H, K, dh, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_mlp
    split: dict[str, np.ndarray] = {}
    for l in range(cfg.n_layers):
        a, m = f"model.layers.{l}.self_attn.", f"model.layers.{l}.mlp."
        qkv = t.take(a + "qkv_proj.weight", ((H + 2 * K) * dh, D))  # rows: Q heads, then K, then V
        q, k, v = np.split(qkv, [H * dh, (H + K) * dh])
        gate, up = np.split(t.take(m + "gate_up_proj.weight", (2 * F, D)), 2)  # HF: gate, up = chunk(2)
        split.update({a + "q_proj.weight": q, a + "k_proj.weight": k, a + "v_proj.weight": v,
                      m + "gate_proj.weight": gate, m + "up_proj.weight": up})
    return llama_convert(_Unfused(t, split), cfg)


__all__ = ["MODEL_TYPES", "IGNORE", "USED", "LEGACY_LONGROPE", "config_from_hf", "convert"]
