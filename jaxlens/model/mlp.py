"""Plain and gated MLPs with TransformerLens hooks."""

from __future__ import annotations

import flax.linen as nn
import jax

from jaxlens.config import ModelConfig
from jaxlens.hooks import RunCtx, hook_point
from jaxlens.model.layers import activation, param, weight_einsum

_init = nn.initializers.normal(0.02)
P = "blocks.{l}.mlp"


def _mm(x: jax.Array, W: jax.Array) -> jax.Array:
    """x [... k] @ W [k n] -> [... n] through `weight_einsum` (on CPU: bf16 weights read as bf16,
    a few f32 rows through jaxlens's kernel)."""
    return weight_einsum("rk,kn->rn", x.reshape(-1, x.shape[-1]), W).reshape(*x.shape[:-1], W.shape[1])


class MLP(nn.Module):
    """Plain: post = act(x W_in + b_in). Gated (Llama): pre = x W_gate, pre_linear = x W_in,
    post = act(pre) * pre_linear. Output post W_out + b_out."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, ctx: RunCtx) -> jax.Array:
        cfg = self.cfg
        dt = x.dtype
        W_in = param(self, "W_in", _init, (cfg.d_model, cfg.d_mlp), dt)
        W_out = param(self, "W_out", _init, (cfg.d_mlp, cfg.d_model), dt)
        bias = cfg.use_mlp_bias
        if cfg.gated_mlp:
            W_gate = param(self, "W_gate", _init, (cfg.d_model, cfg.d_mlp), dt)
            pre = _mm(x, W_gate)
            lin = _mm(x, W_in)
            if bias:
                pre = pre + param(self, "b_gate", nn.initializers.zeros, (cfg.d_mlp,), dt)
                lin = lin + param(self, "b_in", nn.initializers.zeros, (cfg.d_mlp,), dt)
            pre = hook_point(self, f"{P}.hook_pre", pre, ctx)
            lin = hook_point(self, f"{P}.hook_pre_linear", lin, ctx)
            post = activation(cfg.act_fn, pre) * lin
        else:
            pre = _mm(x, W_in)
            if bias:
                pre = pre + param(self, "b_in", nn.initializers.zeros, (cfg.d_mlp,), dt)
            pre = hook_point(self, f"{P}.hook_pre", pre, ctx)
            post = activation(cfg.act_fn, pre)
        post = hook_point(self, f"{P}.hook_post", post, ctx)
        out = _mm(post, W_out)
        if bias:
            out = out + param(self, "b_out", nn.initializers.zeros, (cfg.d_model,), dt)
        return out

__all__ = ["MLP"]
