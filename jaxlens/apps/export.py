"""jaxlens params -> a standard HF GPT-2 checkpoint: the exact inverse of `conversion/gpt2.py`.

Lets a model trained in JAX ship as an ordinary `GPT2LMHeadModel` folder (config.json +
model.safetensors) that transformers loads and jaxlens converts back like any other. No torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from jaxlens.config import ModelConfig
from jaxlens.model.forward import is_scanned


def _check_gpt2(cfg: ModelConfig, params: dict[str, Any]) -> None:
    want = dict(model_type="gpt2", normalization_type="LN", positional_embedding_type="standard",
                parallel_attn_mlp=False, gated_mlp=False, use_qkv_bias=True, use_o_bias=True, use_mlp_bias=True,
                embed_scale=None, sliding_window=None)
    problems = [f"cfg.{k}={getattr(cfg, k)!r} (GPT-2 needs {v!r})" for k, v in want.items() if getattr(cfg, k) != v]
    if cfg.n_kv_heads != cfg.n_heads:
        problems.append(f"cfg.n_kv_heads={cfg.n_kv_heads} (GPT-2 has no grouped-query attention)")
    if cfg.d_head * cfg.n_heads != cfg.d_model:
        problems.append(f"n_heads*d_head={cfg.n_heads * cfg.d_head} != d_model={cfg.d_model}")
    if cfg.attn_scale not in (None, cfg.d_head**0.5, 1.0):
        problems.append(f"cfg.attn_scale={cfg.attn_scale} (GPT-2 divides by sqrt(d_head) or by 1)")
    if is_scanned(params):
        problems.append("params are in the scanned layout; call jaxlens.forward.unstack_layers first")
    if "b_U" in params and np.any(np.asarray(params["b_U"], np.float32) != 0):
        problems.append("b_U is not zero (GPT-2 has no unembedding bias); train with b_U frozen at 0")
    if problems:
        raise ValueError("cannot export as HF GPT-2: " + "; ".join(problems))


def gpt2_state_dict(cfg: ModelConfig, params: dict[str, Any]) -> dict[str, np.ndarray]:
    """HF `GPT2LMHeadModel` tensors (numpy, float32) from jaxlens GPT-2 params (unrolled layout).

    Conv1D weights are [in, out]; c_attn holds q|k|v on the output axis, head-major within each.
    The lm_head is tied to wte unless `cfg.tie_word_embeddings` is False.
    """
    _check_gpt2(cfg, params)
    f = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))  # noqa: E731
    D = cfg.d_model
    sd = {"transformer.wte.weight": f(params["W_E"]), "transformer.wpe.weight": f(params["W_pos"]),
          "transformer.ln_f.weight": f(params["ln_final"]["w"]), "transformer.ln_f.bias": f(params["ln_final"]["b"])}
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = f(np.asarray(params["W_U"]).T)
    for l in range(cfg.n_layers):
        blk, b = params[f"blocks_{l}"], f"transformer.h.{l}."
        at, mlp = blk["attn"], blk["mlp"]
        qkv = np.stack([np.asarray(at[k]) for k in ("W_Q", "W_K", "W_V")])  # [3 H D dh]
        sd.update({
            b + "ln_1.weight": f(blk["ln1"]["w"]), b + "ln_1.bias": f(blk["ln1"]["b"]),
            b + "attn.c_attn.weight": f(qkv.transpose(2, 0, 1, 3).reshape(D, 3 * D)),
            b + "attn.c_attn.bias": f(np.stack([np.asarray(at[k]) for k in ("b_Q", "b_K", "b_V")]).reshape(3 * D)),
            b + "attn.c_proj.weight": f(np.asarray(at["W_O"]).reshape(D, D)), b + "attn.c_proj.bias": f(at["b_O"]),
            b + "ln_2.weight": f(blk["ln2"]["w"]), b + "ln_2.bias": f(blk["ln2"]["b"]),
            b + "mlp.c_fc.weight": f(mlp["W_in"]), b + "mlp.c_fc.bias": f(mlp["b_in"]),
            b + "mlp.c_proj.weight": f(mlp["W_out"]), b + "mlp.c_proj.bias": f(mlp["b_out"]),
        })
    return sd


def gpt2_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json for HF GPT-2 matching `cfg` (dropouts 0: the model is for inference)."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.d_vocab, "n_positions": cfg.n_ctx, "n_embd": cfg.d_model, "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads, "n_inner": cfg.d_mlp, "activation_function": cfg.act_fn,
        "layer_norm_epsilon": cfg.eps, "scale_attn_weights": cfg.attn_scale != 1.0,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "initializer_range": 0.02,
        "tie_word_embeddings": cfg.tie_word_embeddings, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id, "torch_dtype": "float32",
    }


def save_hf_gpt2(path: str | Path, cfg: ModelConfig, params: dict[str, Any], tokenizer: Any = None) -> Path:
    """Write `path/config.json` and `path/model.safetensors` (and the tokenizer, if given)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = gpt2_state_dict(cfg, params)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "model.safetensors").chmod(0o644)  # safetensors writes 0600; a shipped file must be world-readable
    (path / "config.json").write_text(json.dumps(gpt2_config(cfg), indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path

__all__ = ["gpt2_state_dict", "gpt2_config", "save_hf_gpt2"]
