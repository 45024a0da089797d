"""A transformer block: sequential (GPT-2, Llama, Gemma) or parallel (GPT-NeoX)."""

from __future__ import annotations

import flax.linen as nn

from jaxlens.config import ModelConfig
from jaxlens.hooks import RunCtx, hook_point
from jaxlens.model.attention import Attention
from jaxlens.model.kv import LayerKV
from jaxlens.model.mlp import MLP
from jaxlens.model.norms import Norm

B = "blocks.{l}"


class Block(nn.Module):
    """resid_pre -> ln1 -> attn -> (+) resid_mid -> ln2 -> mlp -> (+) resid_post.

    Parallel blocks add attn and mlp outputs of the same resid_pre (no hook_resid_mid).
    Returns (resid_post, the attention's updated `LayerKV` or None).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, allowed, rotary, ctx: RunCtx, kv: LayerKV | None = None):
        cfg = self.cfg
        x = hook_point(self, f"{B}.hook_resid_pre", x, ctx)
        attn_out, new_kv = Attention(cfg, name="attn")(Norm(cfg, f"{B}.ln1", name="ln1")(x, ctx), allowed, rotary, ctx, kv)
        attn_out = hook_point(self, f"{B}.hook_attn_out", attn_out, ctx)
        if cfg.parallel_attn_mlp:
            mlp_out = MLP(cfg, name="mlp")(Norm(cfg, f"{B}.ln2", name="ln2")(x, ctx), ctx)
            mlp_out = hook_point(self, f"{B}.hook_mlp_out", mlp_out, ctx)
            out = x + attn_out + mlp_out
        else:
            mid = hook_point(self, f"{B}.hook_resid_mid", x + attn_out, ctx)
            mlp_out = MLP(cfg, name="mlp")(Norm(cfg, f"{B}.ln2", name="ln2")(mid, ctx), ctx)
            mlp_out = hook_point(self, f"{B}.hook_mlp_out", mlp_out, ctx)
            out = mid + mlp_out
        out = hook_point(self, f"{B}.hook_resid_post", out, ctx)
        return out, new_kv

__all__ = ["Block"]
