"""Mixtral: Mistral's attention (RMSNorm, rotary, grouped-query, sliding window) with a top-k routed
mixture of gated-SiLU experts in place of the MLP (`jaxlens.model.moe.MoE`).

Checkpoints name the experts either per expert (`block_sparse_moe.experts.{e}.w1/w2/w3`: what
transformers 5.24's save_pretrained still writes) or fused as transformers 5 holds them in memory
(`mlp.experts.gate_up_proj` [E 2F D], `mlp.experts.down_proj` [E D F]); conversion/experts.py reads
both (and Qwen3-MoE's per-expert names).
"""

from __future__ import annotations

from typing import Any

from jaxlens.config import ModelConfig
from jaxlens.conversion import llama
from jaxlens.conversion.common import need
from jaxlens.conversion.io import CheckpointError
from jaxlens.conversion.keys import refuse_if

MODEL_TYPES = ("mixtral",)
IGNORE = ("rotary_emb.inv_freq",)
USED = frozenset({"num_local_experts", "num_experts_per_tok"})
# router_jitter_noise (applied by HF in training only), router_aux_loss_coef and output_router_logits
# (the loss) do not change inference: conversion/keys.py lists them as irrelevant for every family.


def config_from_hf(hf: dict[str, Any], mt: str) -> ModelConfig:
    """Mistral's config (attention, sliding window) plus the experts: num_local_experts experts,
    num_experts_per_tok of them per token, the top-k weights always renormalised (as HF's Mixtral)."""
    E, k = need(hf, "num_local_experts", mt), need(hf, "num_experts_per_tok", mt)
    if not isinstance(E, int) or not isinstance(k, int) or not 1 <= k <= E:
        raise CheckpointError(f"{mt}: num_experts_per_tok={k!r} must be an integer in [1, num_local_experts={E!r}]")
    refused = {"attention_bias": refuse_if(bool, "Mixtral attention has no biases"),
               "mlp_bias": refuse_if(bool, "Mixtral experts have no biases")}
    return llama.llama_like(hf, mt, used=USED, refused=refused, num_experts=E, experts_per_token=k,
                            norm_topk_prob=True, use_mlp_bias=False)


convert = llama.convert  # Llama-like attention; the builder reads the experts (conversion/experts.py)

__all__ = ["MODEL_TYPES", "IGNORE", "USED", "config_from_hf", "convert"]
