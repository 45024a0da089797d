"""GPT-NeoX / Pythia: partial rotary, parallel attention+MLP, fused per-head qkv."""

from __future__ import annotations

from typing import Any

from jaxlens.config import ModelConfig
from jaxlens.conversion.common import act_fn, need, rope, token_ids
from jaxlens.conversion.io import Tensors
from jaxlens.conversion.keys import check_keys
import numpy as np

MODEL_TYPES = ("gpt_neox",)
IGNORE = (".attention.bias", ".attention.masked_bias", "rotary_emb.inv_freq")
USED = frozenset({"hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size",
                  "max_position_embeddings", "hidden_act", "layer_norm_eps", "attention_bias", "use_parallel_residual",
                  "tie_word_embeddings", "rotary_pct", "rotary_emb_base", "is_decoder"})


def config_from_hf(hf: dict[str, Any], mt: str = MODEL_TYPES[0]) -> ModelConfig:
    mt = "gpt_neox"
    check_keys(hf, mt, USED)
    d, h = need(hf, "hidden_size", mt), need(hf, "num_attention_heads", mt)
    rotary = rope(hf, mt, default_partial=0.25)
    bias = hf.get("attention_bias", True)
    return ModelConfig(
        model_type=mt, d_model=d, n_layers=need(hf, "num_hidden_layers", mt), n_heads=h, d_head=d // h,
        d_mlp=need(hf, "intermediate_size", mt), d_vocab=need(hf, "vocab_size", mt),
        n_ctx=need(hf, "max_position_embeddings", mt), act_fn=act_fn(hf.get("hidden_act", "gelu"), mt),
        normalization_type="LN", eps=hf.get("layer_norm_eps", 1e-5), positional_embedding_type="rotary",
        **rotary.config_kwargs(d // h),
        parallel_attn_mlp=hf.get("use_parallel_residual", True), use_qkv_bias=bias, use_o_bias=bias,
        tie_word_embeddings=hf.get("tie_word_embeddings", False), **token_ids(hf),
        default_prepend_bos=False,  # NeoX/Pythia were trained without BOS (TransformerLens 4's adapter)
    )


def convert(t: Tensors, cfg: ModelConfig) -> dict[str, Any]:
    D, H, dh, F, V = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab
    out: dict[str, Any] = {
        "W_E": t.take("gpt_neox.embed_in.weight", (V, D)),
        "ln_final": {"w": t.take("gpt_neox.final_layer_norm.weight", (D,)), "b": t.take("gpt_neox.final_layer_norm.bias", (D,))},
        "b_U": np.zeros((V,), np.float32),
    }
    if not cfg.tie_word_embeddings:
        out["W_U"] = t.take("embed_out.weight", (V, D)).T
    for l in range(cfg.n_layers):
        b = f"gpt_neox.layers.{l}."
        # HF views the fused output as [head, 3 * d_head] and chunks it into q, k, v per head
        qkv = t.take(b + "attention.query_key_value.weight", (3 * D, D)).reshape(H, 3, dh, D).transpose(1, 0, 3, 2)
        attn = {"W_Q": qkv[0], "W_K": qkv[1], "W_V": qkv[2],
                "W_O": t.take(b + "attention.dense.weight", (D, D)).T.reshape(H, dh, D)}
        if cfg.use_qkv_bias:
            qb = t.take(b + "attention.query_key_value.bias", (3 * D,)).reshape(H, 3, dh).transpose(1, 0, 2)
            attn.update(b_Q=qb[0], b_K=qb[1], b_V=qb[2], b_O=t.take(b + "attention.dense.bias", (D,)))
        out[f"blocks_{l}"] = {
            "ln1": {"w": t.take(b + "input_layernorm.weight", (D,)), "b": t.take(b + "input_layernorm.bias", (D,))},
            "ln2": {"w": t.take(b + "post_attention_layernorm.weight", (D,)), "b": t.take(b + "post_attention_layernorm.bias", (D,))},
            "attn": attn,
            "mlp": {
                "W_in": t.take(b + "mlp.dense_h_to_4h.weight", (F, D)).T, "b_in": t.take(b + "mlp.dense_h_to_4h.bias", (F,)),
                "W_out": t.take(b + "mlp.dense_4h_to_h.weight", (D, F)).T, "b_out": t.take(b + "mlp.dense_4h_to_h.bias", (D,)),
            },
        }
    return out

__all__ = ["MODEL_TYPES", "IGNORE", "USED", "config_from_hf", "convert"]
