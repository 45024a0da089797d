"""Routed experts' weights in `jaxlens.model.moe.MoE`'s layout, from every checkpoint layout the
MoE families use (shared by conversion/llama.py's builder for Mixtral and Qwen3-MoE)."""

from __future__ import annotations

import numpy as np

from jaxlens.config import ModelConfig
from jaxlens.conversion.io import Tensors

# per-expert tensor names (gate, up, down) of the unfused layouts: Mixtral's, and Qwen3-MoE's / Llama-style
PER_EXPERT = {"block_sparse_moe.": ("w1", "w3", "w2"), "mlp.": ("gate_proj", "up_proj", "down_proj")}


def moe_params(t: Tensors, l: int, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Layer l's router and stacked experts in `MoE`'s layout (W_router [D E], W_gate / W_in [E D F],
    W_out [E F D]) from any of the layouts: per expert under `block_sparse_moe.` (Mixtral) or `mlp.`
    (Qwen3-MoE), or fused `mlp.experts.gate_up_proj` [E 2F D] (gate rows first) / `down_proj` [E D F]."""
    D, F, E = cfg.d_model, cfg.d_mlp, cfg.num_experts
    for sub, (g, u, d) in PER_EXPERT.items():
        b = f"model.layers.{l}.{sub}"
        if t.has(b + "experts.0." + g + ".weight"):
            stack = lambda w, shape, b=b: np.stack([t.take(f"{b}experts.{e}.{w}.weight", shape)  # noqa: E731
                                                    for e in range(E)])
            return {"W_router": t.take(b + "gate.weight", (E, D)).T,
                    "W_gate": stack(g, (F, D)).transpose(0, 2, 1), "W_in": stack(u, (F, D)).transpose(0, 2, 1),
                    "W_out": stack(d, (D, F)).transpose(0, 2, 1)}
    b = f"model.layers.{l}.mlp."
    gate_up = t.take(b + "experts.gate_up_proj", (E, 2 * F, D))  # HF's chunk(2): gate rows, then up rows
    return {"W_router": t.take(b + "gate.weight", (E, D)).T,
            "W_gate": gate_up[:, :F].transpose(0, 2, 1), "W_in": gate_up[:, F:].transpose(0, 2, 1),
            "W_out": t.take(b + "experts.down_proj", (E, D, F)).transpose(0, 2, 1)}


__all__ = ["PER_EXPERT", "moe_params"]
