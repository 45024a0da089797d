"""Qwen3-MoE: Qwen3's attention (per-head q/k RMSNorm, decoupled head_dim) with a top-k routed
mixture of gated-SiLU experts of width `moe_intermediate_size` in every layer."""

from __future__ import annotations

from typing import Any

from jaxlens.config import ModelConfig
from jaxlens.conversion.common import need
from jaxlens.conversion.io import CheckpointError
from jaxlens.conversion.keys import refuse_if
from jaxlens.conversion.llama import IGNORE, convert, llama_like

MODEL_TYPES = ("qwen3_moe",)
USED = frozenset({"num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                  "decoder_sparse_step", "mlp_only_layers"})
REFUSED = {"decoder_sparse_step": refuse_if(lambda v: v not in (None, 1), "dense layers between MoE layers"),
           "mlp_only_layers": refuse_if(bool, "dense MLP layers among the MoE layers")}


def config_from_hf(hf: dict[str, Any], mt: str) -> ModelConfig:
    E = hf.get("num_local_experts", hf.get("num_experts"))  # transformers 5's name, then the older one
    if E is None:
        raise CheckpointError(f"{mt} config.json lacks 'num_local_experts' (or 'num_experts'); the file is incomplete")
    k = need(hf, "num_experts_per_tok", mt)
    if not isinstance(E, int) or not isinstance(k, int) or not 1 <= k <= E:
        raise CheckpointError(f"{mt}: num_experts_per_tok={k!r} must be an integer in [1, num_experts={E!r}]")
    # every layer is routed (mlp_only_layers is refused): the experts' width is the MLP width
    return llama_like({**hf, "intermediate_size": need(hf, "moe_intermediate_size", mt)}, mt, used=USED,
                      refused=REFUSED, use_qk_norm=True, qk_norm_scope="head", num_experts=E, experts_per_token=k,
                      norm_topk_prob=bool(hf.get("norm_topk_prob", False)), use_mlp_bias=False)


__all__ = ["MODEL_TYPES", "IGNORE", "USED", "REFUSED", "config_from_hf", "convert"]
