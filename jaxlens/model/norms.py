"""LayerNorm and RMSNorm with TransformerLens's hook_scale / hook_normalized."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlens.config import ModelConfig
from jaxlens.hooks import RunCtx, hook_point
from jaxlens.model.layers import param


class Norm(nn.Module):
    """LN: (x - mean)/scale * w + b. RMS: x/scale * w. LNPre/RMSPre: the same without w and b.
    `prefix` is the hook prefix ("blocks.{l}.ln1"); `foldable` norms lose their weight to fold_ln
    (TransformerLens's LNPre/RMSPre), the others keep it; `dim` the normalised (last) axis' length,
    d_model unless given (q/k norms: d_head, or n_heads*d_head when over the whole projection).

    Statistics are computed in float32 (as HF does for RMSNorm) and cast back.
    """

    cfg: ModelConfig
    prefix: str
    dim: int | None = None
    foldable: bool = True  # False: keeps its weight after fold_ln (post-norms, q/k norms)

    @nn.compact
    def __call__(self, x: jax.Array, ctx: RunCtx) -> jax.Array:
        cfg = self.cfg
        dtype = x.dtype
        # "LNPre"/"RMSPre" (after fold_ln) have no weight or bias: they were folded into the readers
        weighted = cfg.normalization_type in ("LN", "RMS") or not self.foldable
        dim = cfg.d_model if self.dim is None else self.dim
        w = param(self, "w", nn.initializers.ones, (dim,), dtype) if weighted else None
        xf = x.astype(jnp.float32)
        b = None
        if cfg.normalization_type in ("LN", "LNPre"):
            if weighted:
                b = param(self, "b", nn.initializers.zeros, (dim,), dtype)
            xf = xf - xf.mean(-1, keepdims=True)
        scale = jnp.sqrt((xf**2).mean(-1, keepdims=True) + cfg.eps)
        scale = hook_point(self, f"{self.prefix}.hook_scale", scale.astype(dtype), ctx)
        normalized = hook_point(self, f"{self.prefix}.hook_normalized", (xf / scale.astype(jnp.float32)).astype(dtype), ctx)
        out = normalized * w if w is not None else normalized
        return out + b if b is not None else out

__all__ = ["Norm"]
