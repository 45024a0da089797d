"""Llama-like families (Llama, Mistral, Qwen2, Gemma): RMSNorm, rotary, gated MLP, grouped-query
attention. One builder; each family differs only in a few config switches."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from jaxlens.config import ModelConfig
from jaxlens.conversion.common import act_fn, need, rope, token_ids
from jaxlens.conversion.io import CheckpointError, Tensors

MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma")
IGNORE = ("rotary_emb.inv_freq",)


def _sliding_window(hf: dict[str, Any], mt: str) -> int | None:
    """Mistral applies `sliding_window` to every layer; Qwen2 only with use_sliding_window."""
    types = hf.get("layer_types")
    if mt == "qwen2" and not hf.get("use_sliding_window", False):
        return None
    w = hf.get("sliding_window")
    if w is None:
        return None
    if types and len(set(types)) > 1:
        raise CheckpointError(
            f"{mt}: mixed layer_types {sorted(set(types))} (sliding window on some layers only) are not supported"
        )
    if types and types[0] != "sliding_attention":
        return None
    return int(w)


def config_from_hf(hf: dict[str, Any], mt: str) -> ModelConfig:
    d, h = need(hf, "hidden_size", mt), need(hf, "num_attention_heads", mt)
    dh = hf.get("head_dim") or d // h
    theta, partial = rope(hf, mt)
    gemma = mt == "gemma"
    qkv_bias = mt == "qwen2" or bool(hf.get("attention_bias", False))
    act = hf.get("hidden_act", "silu")
    if gemma and act == "gelu":  # legacy value that means the tanh approximation (as HF does)
        act = "gelu_pytorch_tanh"
    return ModelConfig(
        model_type=mt, d_model=d, n_layers=need(hf, "num_hidden_layers", mt), n_heads=h, d_head=dh,
        n_kv_heads=hf.get("num_key_value_heads") or h, d_mlp=need(hf, "intermediate_size", mt),
        d_vocab=need(hf, "vocab_size", mt), n_ctx=need(hf, "max_position_embeddings", mt), act_fn=act_fn(act, mt),
        normalization_type="RMS", eps=hf.get("rms_norm_eps", 1e-6), positional_embedding_type="rotary",
        rotary_dim=int(dh * partial), rotary_base=theta, gated_mlp=True,
        use_qkv_bias=qkv_bias, use_o_bias=mt != "qwen2" and bool(hf.get("attention_bias", False)),
        use_mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_word_embeddings=hf.get("tie_word_embeddings", gemma),
        embed_scale=math.sqrt(d) if gemma else None, sliding_window=_sliding_window(hf, mt), **token_ids(hf),
    )


def convert(t: Tensors, cfg: ModelConfig) -> dict[str, Any]:
    D, H, K, dh, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab
    off = 1.0 if cfg.model_type == "gemma" else 0.0  # Gemma's RMSNorm multiplies by (1 + w): fold the 1 in

    def norm(name: str) -> dict[str, np.ndarray]:
        return {"w": t.take(name, (D,)) + np.float32(off)}

    out: dict[str, Any] = {"W_E": t.take("model.embed_tokens.weight", (V, D)), "ln_final": norm("model.norm.weight"),
                           "b_U": np.zeros((V,), np.float32)}
    if not cfg.tie_word_embeddings:
        out["W_U"] = t.take("lm_head.weight", (V, D)).T
    for l in range(cfg.n_layers):
        b = f"model.layers.{l}."
        a = b + "self_attn."
        attn = {
            "W_Q": t.take(a + "q_proj.weight", (H * dh, D)).reshape(H, dh, D).transpose(0, 2, 1),
            "W_K": t.take(a + "k_proj.weight", (K * dh, D)).reshape(K, dh, D).transpose(0, 2, 1),
            "W_V": t.take(a + "v_proj.weight", (K * dh, D)).reshape(K, dh, D).transpose(0, 2, 1),
            "W_O": t.take(a + "o_proj.weight", (D, H * dh)).T.reshape(H, dh, D),
        }
        if cfg.use_qkv_bias:
            attn.update(b_Q=t.take(a + "q_proj.bias", (H * dh,)).reshape(H, dh),
                        b_K=t.take(a + "k_proj.bias", (K * dh,)).reshape(K, dh),
                        b_V=t.take(a + "v_proj.bias", (K * dh,)).reshape(K, dh))
        if cfg.use_o_bias:
            attn["b_O"] = t.take(a + "o_proj.bias", (D,))
        m = b + "mlp."
        mlp = {"W_gate": t.take(m + "gate_proj.weight", (F, D)).T, "W_in": t.take(m + "up_proj.weight", (F, D)).T,
               "W_out": t.take(m + "down_proj.weight", (D, F)).T}
        if cfg.use_mlp_bias:
            mlp.update(b_gate=t.take(m + "gate_proj.bias", (F,)), b_in=t.take(m + "up_proj.bias", (F,)),
                       b_out=t.take(m + "down_proj.bias", (D,)))
        out[f"blocks_{l}"] = {"ln1": norm(b + "input_layernorm.weight"), "ln2": norm(b + "post_attention_layernorm.weight"),
                              "attn": attn, "mlp": mlp}
    return out

__all__ = ["MODEL_TYPES", "IGNORE", "config_from_hf", "convert"]
