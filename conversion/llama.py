"""Llama-like families (Llama, Mistral, Qwen2, Gemma): RMSNorm, rotary, gated MLP, grouped-query
attention. One builder, `llama_like`, that the newer families' files (gemma2.py, qwen3.py,
olmo2.py, ...) call with their few extra switches; `convert` reads every one of them."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from jaxlens.config import ModelConfig
from jaxlens.conversion.common import act_fn, need, rope, token_ids
from jaxlens.conversion.experts import moe_params
from jaxlens.conversion.io import CheckpointError, Tensors
from jaxlens.conversion.keys import check_keys, refuse_if

MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma")
IGNORE = ("rotary_emb.inv_freq",)
GEMMA_NORM = ("gemma", "gemma2", "gemma3_text")  # RMSNorm multiplies by (1 + w): the 1 is folded in at conversion
# keys llama_like reads (a family adds its own)
USED = frozenset({"hidden_size", "num_attention_heads", "head_dim", "num_hidden_layers", "num_key_value_heads",
                  "intermediate_size", "vocab_size", "max_position_embeddings", "hidden_act", "hidden_activation",
                  "rms_norm_eps", "attention_bias", "mlp_bias", "tie_word_embeddings", "sliding_window",
                  "use_sliding_window", "max_window_layers", "layer_types"})
REFUSED = {"use_bidirectional_attention": refuse_if(bool, "bidirectional (encoder-style) attention")}

def sliding(hf: dict[str, Any], mt: str) -> tuple[int | None, tuple[str, ...] | None]:
    """(sliding_window, attn_types) from `layer_types` (transformers 5), or the older switches:
    Mistral windows every layer; Qwen2/3 only with `use_sliding_window` (layers from
    `max_window_layers` on); Gemma 2 alternates (even layers local)."""
    w = hf.get("sliding_window")
    types = hf.get("layer_types")
    if mt in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        return None, None
    if w is None:
        return None, None
    n = need(hf, "num_hidden_layers", mt)
    if types is None:
        pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern"))
        if mt == "gemma3_text" and pattern:  # every `pattern`-th layer global (HF's rule before layer_types)
            types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]
        elif mt == "gemma2":
            types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
        elif mt in ("qwen2", "qwen3"):
            m = hf.get("max_window_layers", n)
            types = ["sliding_attention" if i >= m else "full_attention" for i in range(n)]
        else:
            return int(w), None
    if len(types) != n or not set(types) <= {"sliding_attention", "full_attention"}:
        raise CheckpointError(f"{mt}: layer_types={types!r} must name sliding_attention or full_attention "
                              f"for each of the {n} layers")
    kinds = tuple("local" if t == "sliding_attention" else "global" for t in types)
    if "local" not in kinds:
        return None, None
    return int(w), (None if set(kinds) == {"local"} else kinds)


def llama_like(hf: dict[str, Any], mt: str, *, used: frozenset[str] = frozenset(),
               refused: dict[str, Any] | None = None, **switches: Any) -> ModelConfig:
    """The ModelConfig of a Llama-like HF config; `switches` override or add ModelConfig fields
    (a family's features), `used`/`refused` extend the config keys it reads or refuses."""
    check_keys(hf, mt, USED | used, {**REFUSED, **(refused or {})})
    d, h = need(hf, "hidden_size", mt), need(hf, "num_attention_heads", mt)
    dh = hf.get("head_dim") or d // h
    rotary = rope(hf, mt)
    gemma = mt in GEMMA_NORM
    qkv_bias = mt == "qwen2" or bool(hf.get("attention_bias", False))
    act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
    if gemma and act == "gelu":  # legacy value that means the tanh approximation (as HF does)
        act = "gelu_pytorch_tanh"
    window, attn_types = sliding(hf, mt)
    fields = dict(
        model_type=mt, d_model=d, n_layers=need(hf, "num_hidden_layers", mt), n_heads=h, d_head=dh,
        n_kv_heads=hf.get("num_key_value_heads") or h, d_mlp=need(hf, "intermediate_size", mt),
        d_vocab=need(hf, "vocab_size", mt), n_ctx=need(hf, "max_position_embeddings", mt), act_fn=act_fn(act, mt),
        normalization_type="RMS", eps=hf.get("rms_norm_eps", 1e-6), positional_embedding_type="rotary",
        **rotary.config_kwargs(dh), gated_mlp=True,
        use_qkv_bias=qkv_bias, use_o_bias=mt != "qwen2" and bool(hf.get("attention_bias", False)),
        use_mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_word_embeddings=hf.get("tie_word_embeddings", gemma),
        embed_scale=math.sqrt(d) if gemma else None, sliding_window=window, attn_types=attn_types, **token_ids(hf),
        default_prepend_bos=not mt.startswith("qwen"),  # Qwen is trained without BOS: TransformerLens's rule
    )
    scaling = fields.get("rope_scaling")
    if scaling is not None and scaling.rope_type == "dynamic":  # NTK scaling exists to run past the trained context
        fields["n_ctx"] = int(fields["n_ctx"] * scaling.factor)
    fields.update(switches)
    return ModelConfig(**fields)


def config_from_hf(hf: dict[str, Any], mt: str) -> ModelConfig:
    return llama_like(hf, mt)


# our block norms -> HF's names, per norm placement (ModelConfig.norm_placement)
NORMS = {"pre": {"ln1": "input_layernorm", "ln2": "post_attention_layernorm"},
         "pre_post": {"ln1": "input_layernorm", "ln1_post": "post_attention_layernorm",
                      "ln2": "pre_feedforward_layernorm", "ln2_post": "post_feedforward_layernorm"},
         "post": {"ln1_post": "post_attention_layernorm", "ln2_post": "post_feedforward_layernorm"}}


def convert(t: Tensors, cfg: ModelConfig) -> dict[str, Any]:
    D, H, K, dh, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab
    off = 1.0 if cfg.model_type in GEMMA_NORM else 0.0  # Gemma's RMSNorm multiplies by (1 + w): fold the 1 in

    def norm(name: str, n: int = D) -> dict[str, np.ndarray]:
        return {"w": t.take(name, (n,)) + np.float32(off)}

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
        if cfg.use_qk_norm:
            whole = cfg.qk_norm_scope == "all"
            attn["q_norm"] = norm(a + "q_norm.weight", H * dh if whole else dh)
            attn["k_norm"] = norm(a + "k_norm.weight", K * dh if whole else dh)
        if cfg.num_experts:  # Mixtral, Qwen3-MoE: a router and stacked experts
            mlp = moe_params(t, l, cfg)
        else:
            m = b + "mlp."
            mlp = {"W_gate": t.take(m + "gate_proj.weight", (F, D)).T, "W_in": t.take(m + "up_proj.weight", (F, D)).T,
                   "W_out": t.take(m + "down_proj.weight", (D, F)).T}
            if cfg.use_mlp_bias:
                mlp.update(b_gate=t.take(m + "gate_proj.bias", (F,)), b_in=t.take(m + "up_proj.bias", (F,)),
                           b_out=t.take(m + "down_proj.bias", (D,)))
        out[f"blocks_{l}"] = {"attn": attn, "mlp": mlp,
                              **{ours: norm(b + hf + ".weight") for ours, hf in NORMS[cfg.norm_placement].items()}}
    return out

__all__ = ["MODEL_TYPES", "IGNORE", "GEMMA_NORM", "USED", "REFUSED", "NORMS", "sliding", "llama_like", "config_from_hf",
           "convert"]
