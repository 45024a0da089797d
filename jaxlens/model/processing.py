"""TransformerLens weight processing on a jaxlens params tree: fold_ln, centring, value-bias folding.

`process_params(params, cfg, ...)` returns new `(params, cfg)` whose model computes the same
log-probabilities in TransformerLens's "processed" coordinates, the ones its analyses (logit lens,
direct logit attribution) are read in. Each step follows TransformerLens 4.x
`ProcessWeights.process_weights`, in its order:

1. `fold_ln`: norm weights (and LN biases) move into the weights that read the norm's output
   (W_Q/W_K/W_V, W_in/W_gate, W_U); for LN the reading weights are then centred over d_model.
   Those norms become weightless: `normalization_type` "LN" -> "LNPre", "RMS" -> "RMSPre".
   Post-norms (Gemma 2/3) and q/k norms keep their weights (nothing reads them linearly); a
   model with post-norms only (OLMo 2) is not folded, as TransformerLens does not fold it.
2. `center_writing_weights` (LN models only, as TransformerLens): W_E, W_pos, W_O, b_O, W_out,
   b_out lose their mean over d_model, so the residual stream has zero mean.
3. `center_unembed`: W_U and b_U lose their mean over the vocabulary; logits move by a constant
   per position, log-softmax is unchanged. Skipped with a final logit soft-cap (as TransformerLens).
4. `fold_value_biases`: b_O += sum_h b_V[h] W_O[h] and b_V = 0 (grouped heads repeated), then
   b_O is re-centred on LN models.

Tied embeddings are untied first (W_U becomes a separate array). Biases that folding creates
(Q/K/V and MLP-in biases on LN models without them, b_O on Qwen2) switch the config's bias flags on.
All arithmetic is in float32 and cast back, as TransformerLens does. A tree of numpy arrays (as
`from_pretrained` loads it) is processed with numpy on the host, with no compilation; a tree of jax
arrays with jax.numpy (so `process_params` can also run under `jit`).
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.config import ModelConfig
from jaxlens.model.forward import is_scanned, stack_layers, unstack_layers


def _is_ln(cfg: ModelConfig) -> bool:
    return cfg.normalization_type in ("LN", "LNPre")


def process_params(params: dict[str, Any], cfg: ModelConfig, *, fold_ln: bool = True,
                   center_writing_weights: bool = True, center_unembed: bool = True,
                   fold_value_biases: bool = True) -> tuple[dict[str, Any], ModelConfig]:
    """Apply TransformerLens's default weight processing; returns new (params, cfg).

    Works on either params layout (unrolled `blocks_{l}` or scanned `blocks`) and returns the same
    layout. Pure: the input tree is not modified.
    """
    if fold_ln and cfg.normalization_type in ("LNPre", "RMSPre"):
        fold_ln = False  # already folded: a second pass would be a no-op in TransformerLens too
    if fold_ln and cfg.norm_placement == "post":  # no norm reads the residual before a sublayer (OLMo 2)
        warnings.warn(f"{cfg.model_type}: fold_ln skipped: the model has norms after its sublayers only, which no "
                      "weight reads linearly (TransformerLens skips it too)", stacklevel=2)
        fold_ln = False
    if center_unembed and cfg.output_logits_soft_cap is not None:
        center_unembed = False  # tanh is not shift-invariant; TransformerLens disables it as well
    xp = np if all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params)) else jnp
    scanned = is_scanned(params)
    stacked = params if scanned else stack_layers(params, cfg.n_layers, xp)
    dtypes = jax.tree.map(lambda x: x.dtype, stacked)
    p = _to_f32(stacked, xp)
    blk = p["blocks"]["block"]
    changes: dict[str, Any] = {}
    untie = cfg.tie_word_embeddings and (fold_ln or center_unembed or (center_writing_weights and _is_ln(cfg)))
    if untie:
        p["W_U"] = p["W_E"].T
        dtypes["W_U"] = dtypes["W_E"]
        changes["tie_word_embeddings"] = False
    if fold_ln:
        changes.update(_fold_ln(p, blk, cfg, dtypes, xp))
    centre_writers = center_writing_weights and _is_ln(cfg)
    if centre_writers:
        _center_writing(p, blk, cfg)
    if center_unembed:
        p["W_U"] = p["W_U"] - p["W_U"].mean(-1, keepdims=True)
        p["b_U"] = p["b_U"] - p["b_U"].mean()
    if fold_value_biases and "b_V" in blk["attn"]:
        changes.update(_fold_value_biases(blk, cfg, dtypes, centre_writers, xp))
    out = jax.tree.map(lambda x, d: x.astype(d), p, dtypes)
    new_cfg = cfg.replace(**changes)
    return (out if scanned else unstack_layers(out, cfg.n_layers)), new_cfg


def _to_f32(tree: dict[str, Any], xp: Any) -> dict[str, Any]:
    """A mutable copy of the nested dict with float32 leaves."""
    if isinstance(tree, dict):
        return {k: _to_f32(v, xp) for k, v in tree.items()}
    return xp.asarray(tree, xp.float32)


def _fold_ln(p: dict[str, Any], blk: dict[str, Any], cfg: ModelConfig, dtypes: dict[str, Any],
             xp: Any) -> dict[str, Any]:
    """Fold ln1 into Q/K/V, ln2 into the MLP input, ln_final into the unembed (stacked layers)."""
    ln = _is_ln(cfg)
    attn, mlp = blk["attn"], blk["mlp"]
    ln1, ln2, lnf = blk.pop("ln1"), blk.pop("ln2"), p.pop("ln_final")
    dt_attn, dt_mlp = dtypes["blocks"]["block"]["attn"], dtypes["blocks"]["block"]["mlp"]
    for dt in (dtypes["blocks"]["block"], dtypes):
        for name in ("ln1", "ln2", "ln_final"):
            dt.pop(name, None)
    # attention: W [L, heads, d_model, d_head], ln [L, d_model]
    for w, b in (("W_Q", "b_Q"), ("W_K", "b_K"), ("W_V", "b_V")):
        W = attn[w]
        if ln:
            bias = attn.get(b, xp.zeros((W.shape[0], W.shape[1], W.shape[3]), W.dtype))
            attn[b] = bias + xp.einsum("lhmd,lm->lhd", W, ln1["b"])
            dt_attn.setdefault(b, dt_attn[w])
        W = W * ln1["w"][:, None, :, None]
        attn[w] = W - W.mean(2, keepdims=True) if ln else W
    if cfg.num_experts:  # MoE: ln2 scales every reader of the block input, as TransformerLens 4.3's
        # _fold_layer_norms_into_batched_experts: the router W_router [L, d_model, E], W_in / W_gate [L, E, d_model, d_mlp]
        if ln:
            raise ValueError("fold_ln of a LayerNorm mixture-of-experts model is not supported (TransformerLens 4.3 "
                             "does not fold a norm with a bias into experts either); pass fold_ln=False")
        mlp["W_router"] = mlp["W_router"] * ln2["w"][:, :, None]
        for w in ("W_in", "W_gate"):
            mlp[w] = mlp[w] * ln2["w"][:, None, :, None]
    # MLP: W_in / W_gate [L, d_model, d_mlp]; TransformerLens centres W_in only
    for w, b in (() if cfg.num_experts else (("W_in", "b_in"), ("W_gate", "b_gate"))):
        if w not in mlp:
            continue
        W = mlp[w]
        if ln:
            bias = mlp.get(b, xp.zeros((W.shape[0], W.shape[2]), W.dtype))
            mlp[b] = bias + xp.einsum("lmn,lm->ln", W, ln2["b"])
            dt_mlp.setdefault(b, dt_mlp[w])
        W = W * ln2["w"][:, :, None]
        mlp[w] = W - W.mean(1, keepdims=True) if (ln and w == "W_in") else W
    changes: dict[str, Any] = {"normalization_type": "LNPre" if ln else "RMSPre"}
    if ln:
        changes["use_qkv_bias"] = True
        if not cfg.use_mlp_bias:  # b_in was created; the rest of the MLP biases start at zero
            L = mlp["W_in"].shape[0]
            mlp["b_out"] = xp.zeros((L, cfg.d_model), xp.float32)
            dt_mlp["b_out"] = dt_mlp["W_out"]
            if "W_gate" in mlp and "b_gate" not in mlp:
                mlp["b_gate"] = xp.zeros((L, cfg.d_mlp), xp.float32)
                dt_mlp["b_gate"] = dt_mlp["W_gate"]
            changes["use_mlp_bias"] = True
        p["b_U"] = p["b_U"] + lnf["b"] @ p["W_U"]
    W_U = p["W_U"] * lnf["w"][:, None]
    p["W_U"] = W_U - W_U.mean(0, keepdims=True) if ln else W_U
    return changes


def _center_writing(p: dict[str, Any], blk: dict[str, Any], cfg: ModelConfig) -> None:
    """Remove the d_model mean of every weight (and bias) that writes to the residual stream."""
    def centre(x: jax.Array) -> jax.Array:
        return x - x.mean(-1, keepdims=True)

    p["W_E"] = centre(p["W_E"])
    if "W_pos" in p:
        p["W_pos"] = centre(p["W_pos"])
    for sub, names in (("attn", ("W_O", "b_O")), ("mlp", ("W_out", "b_out"))):
        for n in names:
            if n in blk[sub]:
                blk[sub][n] = centre(blk[sub][n])


def _fold_value_biases(blk: dict[str, Any], cfg: ModelConfig, dtypes: dict[str, Any], centre: bool,
                       xp: Any) -> dict[str, Any]:
    """b_O += sum over heads of b_V W_O (grouped value heads repeated); b_V = 0."""
    attn = blk["attn"]
    b_V = xp.repeat(attn["b_V"], cfg.n_heads // cfg.n_kv_heads, axis=1)  # [L, H, d_head]
    L = b_V.shape[0]
    b_O = attn.get("b_O", xp.zeros((L, cfg.d_model), xp.float32)) + xp.einsum("lhd,lhdm->lm", b_V, attn["W_O"])
    attn["b_O"] = b_O - b_O.mean(-1, keepdims=True) if centre else b_O
    dtypes["blocks"]["block"]["attn"].setdefault("b_O", dtypes["blocks"]["block"]["attn"]["W_O"])
    attn["b_V"] = xp.zeros_like(attn["b_V"])
    return {"use_o_bias": True}

__all__ = ["process_params"]
