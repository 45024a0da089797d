"""Gemma 2 and Gemma 3 (text): the Llama-like builder plus soft-capping, `query_pre_attn_scalar`,
pre- and post-norms around attention and MLP, local (sliding-window) and global layers, and for
Gemma 3 per-head q/k RMSNorm and a separate RoPE base for local layers."""

from __future__ import annotations

import math
from typing import Any

from jaxlens.config import ModelConfig
from jaxlens.conversion.llama import IGNORE, convert, llama_like

MODEL_TYPES = ("gemma2", "gemma3_text")
USED = frozenset({"query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                  "sliding_window_pattern", "_sliding_window_pattern"})


def config_from_hf(hf: dict[str, Any], mt: str) -> ModelConfig:
    scalar = hf.get("query_pre_attn_scalar")
    return llama_like(
        hf, mt, used=USED, norm_placement="pre_post",
        attn_scale=math.sqrt(scalar) if scalar is not None else None,
        attn_scores_soft_cap=hf.get("attn_logit_softcapping"),
        output_logits_soft_cap=hf.get("final_logit_softcapping"),
        use_qk_norm=mt == "gemma3_text", qk_norm_scope="head",
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
    )


__all__ = ["MODEL_TYPES", "IGNORE", "USED", "config_from_hf", "convert"]
