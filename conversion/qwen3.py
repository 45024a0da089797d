"""Qwen3 (dense): the Llama-like builder plus per-head q/k RMSNorm; `head_dim` is independent
of d_model / n_heads (read by the builder)."""

from __future__ import annotations

from typing import Any

from jaxlens.config import ModelConfig
from jaxlens.conversion.llama import IGNORE, convert, llama_like

MODEL_TYPES = ("qwen3",)


def config_from_hf(hf: dict[str, Any], mt: str) -> ModelConfig:
    return llama_like(hf, mt, use_qk_norm=True, qk_norm_scope="head")


__all__ = ["MODEL_TYPES", "IGNORE", "config_from_hf", "convert"]
