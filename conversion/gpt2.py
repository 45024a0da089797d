"""GPT-2: learned positions, LayerNorm, Conv1D weights stored [in, out], tied unembedding."""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxlens.config import ModelConfig
from jaxlens.conversion.common import act_fn, need, token_ids
from jaxlens.conversion.io import Tensors
from jaxlens.conversion.keys import check_keys, refuse_if

MODEL_TYPES = ("gpt2",)
IGNORE = (".attn.bias", ".attn.masked_bias")
USED = frozenset({"n_embd", "n_head", "n_layer", "n_inner", "vocab_size", "n_positions", "activation_function",
                  "layer_norm_epsilon", "scale_attn_weights", "tie_word_embeddings",
                  "reorder_and_upcast_attn"})  # upcasting: float32 here anyway
REFUSED = {"scale_attn_by_inverse_layer_idx": refuse_if(bool, "per-layer attention scaling"),
           "add_cross_attention": refuse_if(bool, "an encoder-decoder cross-attention block")}


def config_from_hf(hf: dict[str, Any], mt: str = MODEL_TYPES[0]) -> ModelConfig:
    check_keys(hf, "gpt2", USED, REFUSED, irrelevant={"n_ctx"})  # n_ctx: an old alias HF no longer reads
    d, h = need(hf, "n_embd", "gpt2"), need(hf, "n_head", "gpt2")
    return ModelConfig(
        model_type="gpt2", d_model=d, n_layers=need(hf, "n_layer", "gpt2"), n_heads=h, d_head=d // h,
        d_mlp=hf.get("n_inner") or 4 * d, d_vocab=need(hf, "vocab_size", "gpt2"),
        n_ctx=need(hf, "n_positions", "gpt2"), act_fn=act_fn(hf.get("activation_function", "gelu_new"), "gpt2"),
        normalization_type="LN", eps=hf.get("layer_norm_epsilon", 1e-5),
        attn_scale=None if hf.get("scale_attn_weights", True) else 1.0,
        tie_word_embeddings=hf.get("tie_word_embeddings", True), **token_ids(hf),
    )


def convert(t: Tensors, cfg: ModelConfig) -> dict[str, Any]:
    p = "transformer." if t.has("transformer.wte.weight") else ""
    D, H, dh, F, V = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab
    out: dict[str, Any] = {
        "W_E": t.take(f"{p}wte.weight", (V, D)),
        "W_pos": t.take(f"{p}wpe.weight", (cfg.n_ctx, D)),
        "ln_final": {"w": t.take(f"{p}ln_f.weight", (D,)), "b": t.take(f"{p}ln_f.bias", (D,))},
        "b_U": np.zeros((V,), np.float32),
    }
    if not cfg.tie_word_embeddings:
        out["W_U"] = t.take("lm_head.weight", (V, D)).T
    for l in range(cfg.n_layers):
        b = f"{p}h.{l}."
        qkv = t.take(b + "attn.c_attn.weight", (D, 3 * D)).reshape(D, 3, H, dh).transpose(1, 2, 0, 3)
        qkv_b = t.take(b + "attn.c_attn.bias", (3 * D,)).reshape(3, H, dh)
        out[f"blocks_{l}"] = {
            "ln1": {"w": t.take(b + "ln_1.weight", (D,)), "b": t.take(b + "ln_1.bias", (D,))},
            "ln2": {"w": t.take(b + "ln_2.weight", (D,)), "b": t.take(b + "ln_2.bias", (D,))},
            "attn": {
                "W_Q": qkv[0], "W_K": qkv[1], "W_V": qkv[2],
                "b_Q": qkv_b[0], "b_K": qkv_b[1], "b_V": qkv_b[2],
                "W_O": t.take(b + "attn.c_proj.weight", (D, D)).reshape(H, dh, D),
                "b_O": t.take(b + "attn.c_proj.bias", (D,)),
            },
            "mlp": {
                "W_in": t.take(b + "mlp.c_fc.weight", (D, F)), "b_in": t.take(b + "mlp.c_fc.bias", (F,)),
                "W_out": t.take(b + "mlp.c_proj.weight", (F, D)), "b_out": t.take(b + "mlp.c_proj.bias", (D,)),
            },
        }
    return out

__all__ = ["MODEL_TYPES", "IGNORE", "USED", "REFUSED", "config_from_hf", "convert"]
