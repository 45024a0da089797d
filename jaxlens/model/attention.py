"""Multi-head / grouped-query attention with TransformerLens hooks, in [batch head pos d_head] layout."""

from __future__ import annotations

from functools import partial
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlens.config import ModelConfig
from jaxlens.hooks import RunCtx, hook_point
from jaxlens.model.kv import LayerKV
from jaxlens.model.layers import (KEY_BLOCK, apply_rotary, blocked_attention, masked_softmax, param, query_rows, repeat_kv,
                                  takes_rows_kernel,
                                  soft_cap, weight_einsum)
from jaxlens.model.norms import Norm

_init = nn.initializers.normal(0.02)
P = "blocks.{l}.attn"


def _project(x: jax.Array, W: jax.Array) -> jax.Array:
    """x [batch pos d_model] @ W [head d_model d_head] -> [batch pos head d_head].

    XLA's CPU dot wants the weight as [d_model, head*d_head], so the plain einsum copies a
    transposed W on every call. When batch*pos < d_head (decoding) it is cheaper to broadcast x
    over heads and run a head-batched matmul that reads W where it lies; the result is the same
    contraction over d_model.
    """
    if W.dtype != jnp.float32 or takes_rows_kernel("bpm,hmd->bphd", x, W):  # see `weight_einsum`
        return weight_einsum("bpm,hmd->bphd", x, W)
    b, p, m = x.shape
    h, _, d = W.shape
    if b * p >= d:
        return jnp.einsum("bpm,hmd->bphd", x, W)
    xh = jnp.broadcast_to(x.reshape(1, b * p, m), (h, b * p, m))
    out = jax.lax.dot_general(xh, W, (((2,), (1,)), ((0,), (0,))))  # [head batch*pos d_head]
    return out.transpose(1, 0, 2).reshape(b, p, h, d)


class Attention(nn.Module):
    """Attention of one block. Weights in TransformerLens layout: W_Q [head d_model d_head],
    W_K/W_V [kv_head d_model d_head], W_O [head d_head d_model].

    Call with x [batch pos d_model], `allowed` [batch 1|head query key] (causal & padding),
    rotary (cos, sin) or None, and optionally this layer's `LayerKV` (its cached keys/values
    and the write index; then `allowed` spans the cache: key = buffer slot).
    Returns (attn_out [batch pos d_model] before hook_attn_out, the updated LayerKV or None).

    `heads_in` (q, k, v inputs [batch pos head|kv_head d_model], normed): per-head inputs in place
    of x for the projections (TransformerLens's split q/k/v input; see `Block._forked_inputs`).

    `rows` (static positions of this call, or None for all): queries only there, keys and values
    at every position; attn_out is then [batch len(rows) d_model] (the last block when only some
    positions' logits are read; no hook of the block may be captured or edited).

    `z_given` ([batch pos head d_head]): the z that these inputs give, from an earlier run of the
    same residual (a patching cell that edits this layer's z): the projections and the scores
    are skipped, hook_z sees it, and `kv` is returned unwritten.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, allowed, rotary, ctx: RunCtx, kv: LayerKV | None = None, rows: tuple[int, ...] | None = None,
                 heads_in: tuple[jax.Array, jax.Array, jax.Array] | None = None, z_given: jax.Array | None = None):
        cfg = self.cfg
        H, K, D, M = cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_model
        dt = x.dtype
        W_Q = param(self, "W_Q", _init, (H, M, D), dt)
        W_K = param(self, "W_K", _init, (K, M, D), dt)
        W_V = param(self, "W_V", _init, (K, M, D), dt)
        W_O = param(self, "W_O", _init, (H, D, M), dt)
        take = partial(query_rows, rows=rows)
        if z_given is not None:
            return self._output(take(z_given).astype(dt), W_O, ctx), kv
        if heads_in is None:
            q, k, v = _project(take(x), W_Q), _project(x, W_K), _project(x, W_V)
        else:  # per-head inputs [batch pos head|kv_head d_model] (`Block._forked_inputs`)
            q_in, k_in, v_in = heads_in
            q = weight_einsum("bphm,hmd->bphd", take(q_in), W_Q)
            k, v = weight_einsum("bphm,hmd->bphd", k_in, W_K), weight_einsum("bphm,hmd->bphd", v_in, W_V)
        if cfg.use_qkv_bias:
            q = q + param(self, "b_Q", nn.initializers.zeros, (H, D), dt)
            k = k + param(self, "b_K", nn.initializers.zeros, (K, D), dt)
            v = v + param(self, "b_V", nn.initializers.zeros, (K, D), dt)
        q = hook_point(self, f"{P}.hook_q", q, ctx)
        k = hook_point(self, f"{P}.hook_k", k, ctx)
        v = hook_point(self, f"{P}.hook_v", v, ctx)
        if cfg.use_qk_norm:
            q, k = self._qk_norm("q", q, ctx), self._qk_norm("k", k, ctx)
        if rotary is not None:
            cos, sin = rotary
            q = hook_point(self, f"{P}.hook_rot_q", apply_rotary(q, take(cos), take(sin), cfg.rotary_dim), ctx)
            k = hook_point(self, f"{P}.hook_rot_k", apply_rotary(k, cos, sin, cfg.rotary_dim), ctx)
        b, q_len = q.shape[:2]
        if kv is not None:  # write the new keys/values; attend to the cached ones and the new
            kv, kn, vn = kv.update(k, v, dt)  # [batch*kv_head max_len d_head], as a split buffer lies
        else:
            kn, vn = (a.transpose(0, 2, 1, 3).reshape(b * K, a.shape[1], D) for a in (k, v))
        if rows is not None:
            allowed = allowed[:, :, jnp.asarray(rows, jnp.int32)]
        # grouped heads: query head h reads kv head h // group, so [batch head q d_head] reshapes to
        # [batch*kv_head group*q d_head] and every dot has one batch axis, that of the buffer
        G, n_k = H // K, kn.shape[1]
        long = q_len >= KEY_BLOCK and n_k >= 2 * KEY_BLOCK  # (a decode step's row is small anyway)
        if long and not (ctx.wants(f"{P}.hook_attn_scores") or ctx.wants(f"{P}.hook_pattern")):
            # long sequences and nobody reads or edits the scores: never materialise [batch head query key]
            heads = lambda a: repeat_kv(a.reshape(b, K, n_k, D), G, axis=1)  # noqa: E731
            z = blocked_attention(q.transpose(0, 2, 1, 3), heads(kn), heads(vn), allowed, cfg.scale,
                                  cfg.attn_scores_soft_cap)
        else:
            # scores, their scaling, cap and softmax in float32 whatever the model dtype (a bf16
            # model keeps 8 mantissa bits in its weights, not in its softmax statistics), so
            # hook_attn_scores is float32; the pattern is cast back to the model dtype
            f32 = jnp.float32
            qn = q.transpose(0, 2, 1, 3).reshape(b * K, G * q_len, D)
            scores = jnp.einsum("nqd,nkd->nqk", qn, kn, preferred_element_type=f32).reshape(b, H, q_len, n_k)
            scores = scores / jnp.asarray(cfg.scale, f32)
            if cfg.attn_scores_soft_cap is not None:  # Gemma 2: after scaling, before the mask
                scores = soft_cap(scores, cfg.attn_scores_soft_cap)
            scores = hook_point(self, f"{P}.hook_attn_scores", jnp.where(allowed, scores, -jnp.inf), ctx)
            pattern = hook_point(self, f"{P}.hook_pattern", masked_softmax(scores, allowed).astype(dt), ctx)
            z = jnp.einsum("nqk,nkd->nqd", pattern.reshape(b * K, G * q_len, n_k), vn, preferred_element_type=f32)
            z = z.astype(dt).reshape(b, H, q_len, D).transpose(0, 2, 1, 3)
        return self._output(z, W_O, ctx), kv

    def _output(self, z: jax.Array, W_O: jax.Array, ctx: RunCtx) -> jax.Array:
        """hook_z, then z [batch pos head d_head] through W_O (and b_O) -> [batch pos d_model]."""
        cfg = self.cfg
        b, q_len, H, D = z.shape
        M = W_O.shape[-1]
        z = hook_point(self, f"{P}.hook_z", z, ctx)
        if ctx.wants(f"{P}.hook_result"):
            result = hook_point(self, f"{P}.hook_result", jnp.einsum("bqhd,hdm->bqhm", z, W_O), ctx)
            out = result.sum(axis=2)
        else:  # contract (head, d_head) as one axis of length H*D: W_O is read in place, not transposed
            out = weight_einsum("rk,km->rm", z.reshape(b * q_len, H * D), W_O.reshape(H * D, M)).reshape(b, q_len, M)
        if cfg.use_o_bias:
            out = out + param(self, "b_O", nn.initializers.zeros, (M,), z.dtype)
        return out

    def _qk_norm(self, which: str, x: jax.Array, ctx: RunCtx) -> jax.Array:
        """RMSNorm of queries or keys x [batch pos head d_head] before RoPE, hooked as TransformerLens
        4.3 does: per head (Qwen3, Gemma 3) in [batch head pos ...] layout, or over the whole
        projection (OLMo 2) in [batch pos head*d_head] layout."""
        b, p, h, d = x.shape
        if self.cfg.qk_norm_scope == "head":
            y = Norm(self.cfg, f"{P}.{which}_norm", d, foldable=False, name=f"{which}_norm")(x.transpose(0, 2, 1, 3), ctx)
            y = hook_point(self, f"{P}.hook_{which}_normed", y, ctx)
            return y.transpose(0, 2, 1, 3)
        y = Norm(self.cfg, f"{P}.{which}_norm", h * d, foldable=False, name=f"{which}_norm")(x.reshape(b, p, h * d), ctx)
        return hook_point(self, f"{P}.hook_{which}_normed", y, ctx).reshape(b, p, h, d)

__all__ = ["Attention"]
