"""A transformer block: sequential (GPT-2, Llama, Gemma) or parallel (GPT-NeoX), with its norms
before each sublayer (`pre`), before and after (`pre_post`: Gemma 2/3) or after only (`post`: OLMo 2)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlens.config import ModelConfig
from jaxlens.hooks import RunCtx, hook_point
from jaxlens.model.attention import Attention
from jaxlens.model.kv import LayerKV
from jaxlens.model.mlp import MLP
from jaxlens.model.moe import MoE
from jaxlens.model.norms import Norm

B = "blocks.{l}"


class Block(nn.Module):
    """resid_pre -> [ln1] -> attn -> [ln1_post] -> (+) resid_mid -> [ln2] -> mlp -> [ln2_post] -> (+) resid_post.

    `hook_attn_out` / `hook_mlp_out` are what is added to the residual (after a post-norm, as
    TransformerLens 4.3). Parallel blocks add attn and mlp outputs of the same resid_pre (no
    hook_resid_mid). `allowed` and `rotary` are this layer's (local or global).
    Returns (resid_post, the attention's updated `LayerKV` or None). With `rows` (static
    positions) only those positions leave the block (resid_post [batch len(rows) d_model]):
    keys and values are computed at every position, the rest only at `rows` (see `Attention`).
    """

    cfg: ModelConfig

    def _normed(self, n: int, sublayer, y: jax.Array, ctx: RunCtx):
        """Run `sublayer` on `y` with block norm `ln{n}` before and/or `ln{n}_post` after it."""
        cfg = self.cfg
        if cfg.norm_placement != "post":
            y = Norm(cfg, f"{B}.ln{n}", name=f"ln{n}")(y, ctx)
        out, extra = sublayer(y)
        if cfg.norm_placement != "pre":
            out = Norm(cfg, f"{B}.ln{n}_post", foldable=False, name=f"ln{n}_post")(out, ctx)
        return out, extra

    @nn.compact
    def __call__(self, x, allowed, rotary, ctx: RunCtx, kv: LayerKV | None = None, rows: tuple[int, ...] | None = None):
        cfg = self.cfg
        attn = Attention(cfg, name="attn")
        mlp = (MoE if cfg.num_experts else MLP)(cfg, name="mlp")
        x = hook_point(self, f"{B}.hook_resid_pre", x, ctx)
        attn_out, new_kv = self._normed(1, lambda y: attn(y, allowed, rotary, ctx, kv, rows), x, ctx)
        if rows is not None:  # the residual stream continues at the query rows only
            x = x[:, jnp.asarray(rows, jnp.int32)]
        attn_out = hook_point(self, f"{B}.hook_attn_out", attn_out, ctx)
        if cfg.parallel_attn_mlp:
            mid = x
        else:
            mid = hook_point(self, f"{B}.hook_resid_mid", x + attn_out, ctx)
        mlp_in = hook_point(self, f"{B}.hook_mlp_in", mid, ctx)  # the MLP branch's input (an edit leaves the residual)
        mlp_out, _ = self._normed(2, lambda y: (mlp(y, ctx), None), mlp_in, ctx)
        mlp_out = hook_point(self, f"{B}.hook_mlp_out", mlp_out, ctx)
        out = (x + attn_out + mlp_out) if cfg.parallel_attn_mlp else mid + mlp_out
        out = hook_point(self, f"{B}.hook_resid_post", out, ctx)
        return out, new_kv


__all__ = ["Block"]
