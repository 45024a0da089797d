"""OLMo 2: the Llama-like builder with norms after attention and after the MLP only (their
outputs are what the residual adds) and q/k RMSNorm over the whole projection."""

from __future__ import annotations

from typing import Any

from jaxlens.config import ModelConfig
from jaxlens.conversion.llama import IGNORE, convert, llama_like

MODEL_TYPES = ("olmo2",)


def config_from_hf(hf: dict[str, Any], mt: str) -> ModelConfig:
    return llama_like(hf, mt, norm_placement="post", use_qk_norm=True, qk_norm_scope="all")


__all__ = ["MODEL_TYPES", "IGNORE", "config_from_hf", "convert"]
