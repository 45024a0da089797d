"""Multi-head / grouped-query attention with TransformerLens hooks, in [batch head pos d_head] layout."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlens.config import ModelConfig
from jaxlens.hooks import RunCtx, hook_point
from jaxlens.model.layers import apply_rotary, masked_softmax

_init = nn.initializers.normal(0.02)
P = "blocks.{l}.attn"


class Attention(nn.Module):
    """Attention of one block. Weights in TransformerLens layout: W_Q [head d_model d_head],
    W_K/W_V [kv_head d_model d_head], W_O [head d_head d_model].

    Call with x [batch pos d_model], `allowed` [batch 1|head query key] (causal & padding),
    rotary (cos, sin) or None, and an optional (keys, values, write_index) KV slot.
    Returns (attn_out [batch pos d_model] before hook_attn_out, new KV slot or None).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, allowed, rotary, ctx: RunCtx, kv=None):
        cfg = self.cfg
        H, K, D, M = cfg.n_heads, cfg.kv_heads, cfg.d_head, cfg.d_model
        dt = x.dtype
        W_Q = self.param("W_Q", _init, (H, M, D), dt)
        W_K = self.param("W_K", _init, (K, M, D), dt)
        W_V = self.param("W_V", _init, (K, M, D), dt)
        W_O = self.param("W_O", _init, (H, D, M), dt)
        q = jnp.einsum("bpm,hmd->bphd", x, W_Q)
        k = jnp.einsum("bpm,hmd->bphd", x, W_K)
        v = jnp.einsum("bpm,hmd->bphd", x, W_V)
        if cfg.use_qkv_bias:
            q = q + self.param("b_Q", nn.initializers.zeros, (H, D), dt)
            k = k + self.param("b_K", nn.initializers.zeros, (K, D), dt)
            v = v + self.param("b_V", nn.initializers.zeros, (K, D), dt)
        q = hook_point(self, f"{P}.hook_q", q, ctx)
        k = hook_point(self, f"{P}.hook_k", k, ctx)
        v = hook_point(self, f"{P}.hook_v", v, ctx)
        if rotary is not None:
            cos, sin = rotary
            q = hook_point(self, f"{P}.hook_rot_q", apply_rotary(q, cos, sin, cfg.rotary_dim), ctx)
            k = hook_point(self, f"{P}.hook_rot_k", apply_rotary(k, cos, sin, cfg.rotary_dim), ctx)
        new_kv = None
        if kv is not None:
            keys, values, index = kv
            keys = jax.lax.dynamic_update_slice(keys, k.astype(keys.dtype), (0, index, 0, 0))
            values = jax.lax.dynamic_update_slice(values, v.astype(values.dtype), (0, index, 0, 0))
            new_kv = (keys, values)
            k, v = keys.astype(dt), values.astype(dt)
        # [batch head pos d_head]; grouped heads repeat their kv head (query head h uses h // group)
        qh = q.transpose(0, 2, 1, 3)
        kh = jnp.repeat(k.transpose(0, 2, 1, 3), H // K, axis=1)
        vh = jnp.repeat(v.transpose(0, 2, 1, 3), H // K, axis=1)
        scores = jnp.einsum("bhqd,bhkd->bhqk", qh, kh) / jnp.asarray(cfg.scale, dt)
        scores = hook_point(self, f"{P}.hook_attn_scores", jnp.where(allowed, scores, -jnp.inf), ctx)
        pattern = hook_point(self, f"{P}.hook_pattern", masked_softmax(scores, allowed).astype(dt), ctx)
        z = jnp.einsum("bhqk,bhkd->bqhd", pattern, vh)
        z = hook_point(self, f"{P}.hook_z", z, ctx)
        if ctx.wants(f"{P}.hook_result"):
            result = hook_point(self, f"{P}.hook_result", jnp.einsum("bqhd,hdm->bqhm", z, W_O), ctx)
            out = result.sum(axis=2)
        else:
            out = jnp.einsum("bqhd,hdm->bqm", z, W_O)
        if cfg.use_o_bias:
            out = out + self.param("b_O", nn.initializers.zeros, (M,), dt)
        return out, new_kv
