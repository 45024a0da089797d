"""LayerNorm and RMSNorm with TransformerLens's hook_scale / hook_normalized."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlens.config import ModelConfig
from jaxlens.hooks import RunCtx, hook_point


class Norm(nn.Module):
    """LN: (x - mean)/scale * w + b. RMS: x/scale * w. LNPre/RMSPre: the same without w and b.
    `prefix` is the hook prefix ("blocks.{l}.ln1").

    Statistics are computed in float32 (as HF does for RMSNorm) and cast back.
    """

    cfg: ModelConfig
    prefix: str

    @nn.compact
    def __call__(self, x: jax.Array, ctx: RunCtx) -> jax.Array:
        cfg = self.cfg
        dtype = x.dtype
        # "LNPre"/"RMSPre" (after fold_ln) have no weight or bias: they were folded into the readers
        weighted = cfg.normalization_type in ("LN", "RMS")
        w = self.param("w", nn.initializers.ones, (cfg.d_model,), dtype) if weighted else None
        xf = x.astype(jnp.float32)
        b = None
        if cfg.normalization_type in ("LN", "LNPre"):
            if weighted:
                b = self.param("b", nn.initializers.zeros, (cfg.d_model,), dtype)
            xf = xf - xf.mean(-1, keepdims=True)
        scale = jnp.sqrt((xf**2).mean(-1, keepdims=True) + cfg.eps)
        scale = hook_point(self, f"{self.prefix}.hook_scale", scale.astype(dtype), ctx)
        normalized = hook_point(self, f"{self.prefix}.hook_normalized", (xf / scale.astype(jnp.float32)).astype(dtype), ctx)
        out = normalized * w if w is not None else normalized
        return out + b if b is not None else out

__all__ = ["Norm"]
