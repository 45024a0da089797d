"""A transformer block: sequential (GPT-2, Llama, Gemma) or parallel (GPT-NeoX), with its norms
before each sublayer (`pre`), before and after (`pre_post`: Gemma 2/3) or after only (`post`: OLMo 2)."""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlens.config import ModelConfig
from jaxlens.hooks import RunCtx, hook_point
from jaxlens.model.attention import Attention
from jaxlens.model.kv import LayerKV
from jaxlens.model.layers import query_rows
from jaxlens.model.mlp import MLP
from jaxlens.model.moe import MoE
from jaxlens.model.norms import Norm

B = "blocks.{l}"
FORKS = ("attn_in", "q_input", "k_input", "v_input")  # per-head copies of the attention input


class Resume(NamedTuple):
    """Where a block starts when it resumes an earlier run of the same input: `at` "z" (before
    hook_z: queries, keys, values and pattern skipped) or "attn_out" (before hook_attn_out: the
    whole attention sublayer skipped), with that run's `value` there (rows as this call's)."""

    at: str
    value: jax.Array


RESUME_POINTS = ("z", "attn_out")


class Block(nn.Module):
    """resid_pre -> [ln1] -> attn -> [ln1_post] -> (+) resid_mid -> [ln2] -> mlp -> [ln2_post] -> (+) resid_post.

    `hook_attn_out` / `hook_mlp_out` are what is added to the residual (after a post-norm, as
    TransformerLens 4.3). Parallel blocks add attn and mlp outputs of the same resid_pre (no
    hook_resid_mid). `allowed` and `rotary` are this layer's (local or global).
    Returns (resid_post, the attention's updated `LayerKV` or None). With `rows` (static
    positions) only those positions leave the block (resid_post [batch len(rows) d_model]):
    keys and values are computed at every position, the rest only at `rows` (see `Attention`).

    `resume` (`Resume`): the block starts inside, from what an earlier run of the same resid_pre
    gave at `resume.at` (the patching cells that edit a later hook of this block).
    """

    cfg: ModelConfig

    def _normed(self, n: int, sublayer, y: jax.Array, ctx: RunCtx):
        """Run `sublayer(normed y, ln{n} or None)` with block norm `ln{n}` before and/or
        `ln{n}_post` after it (the norm is passed on for inputs it must norm again: `_forked_inputs`)."""
        cfg = self.cfg
        norm = Norm(cfg, f"{B}.ln{n}", name=f"ln{n}") if cfg.norm_placement != "post" else None
        out, extra = sublayer(y if norm is None else norm(y, ctx), norm)
        if cfg.norm_placement != "pre":
            out = Norm(cfg, f"{B}.ln{n}_post", foldable=False, name=f"ln{n}_post")(out, ctx)
        return out, extra

    def _forked_inputs(self, x: jax.Array, ln1: Norm | None, ctx: RunCtx) -> tuple[jax.Array, jax.Array, jax.Array]:
        """TransformerLens's per-head copies of the attention input (its use_split_qkv_input /
        use_attn_in), built only when one of them is captured or edited: resid_pre repeated over
        heads [batch pos head d_model] as `hook_attn_in` (query heads; keys and values read its
        first n_kv_heads) or `hook_q_input` / `hook_k_input` / `hook_v_input` (kv heads for K/V),
        each then normed by ln1 per head (ln1's own hooks see the shared input, once), so an edit
        reaches one path. Unedited, the numbers are the plain path's. Returns the (q, k, v) inputs."""
        cfg = self.cfg
        b, p, m = x.shape
        split = any(ctx.wants(f"{B}.hook_{w}_input") for w in "qkv")
        if split and ctx.hooks and any(ctx.hooks.touches(n) for n in ctx.names_for(f"{B}.hook_attn_in")):
            raise ValueError("hook_attn_in cannot be edited in a run that also reads hook_q_input / hook_k_input / "
                             "hook_v_input: they are two ways to fork the same input (TransformerLens makes its "
                             "use_attn_in and use_split_qkv_input switches exclusive)")

        def fork(name: str, n: int) -> jax.Array:
            return hook_point(self, f"{B}.{name}", jnp.broadcast_to(x[:, :, None], (b, p, n, m)), ctx)

        def norm(f: jax.Array) -> jax.Array:  # ln1 per head, its hooks silent (they saw the shared input)
            return f if ln1 is None else ln1(f, RunCtx())

        heads = fork("hook_attn_in", cfg.n_heads) if ctx.wants(f"{B}.hook_attn_in") else None
        if split:
            return tuple(norm(fork(f"hook_{w}_input", n)) for w, n in
                         (("q", cfg.n_heads), ("k", cfg.n_kv_heads), ("v", cfg.n_kv_heads)))
        q_in = norm(heads)
        return q_in, q_in[:, :, :cfg.n_kv_heads], q_in[:, :, :cfg.n_kv_heads]

    @nn.compact
    def __call__(self, x, allowed, rotary, ctx: RunCtx, kv: LayerKV | None = None, rows: tuple[int, ...] | None = None,
                 resume: Resume | None = None):
        cfg = self.cfg
        attn = Attention(cfg, name="attn")
        mlp = (MoE if cfg.num_experts else MLP)(cfg, name="mlp")
        x = hook_point(self, f"{B}.hook_resid_pre", x, ctx)
        forked = any(ctx.wants(f"{B}.hook_{n}") for n in FORKS)
        take = partial(query_rows, rows=rows)
        if resume is not None and resume.at == "attn_out":
            attn_out, new_kv = take(resume.value).astype(x.dtype), kv
        else:
            z_given = None if resume is None else resume.value
            attn_out, new_kv = self._normed(1, lambda y, ln1: attn(
                y, allowed, rotary, ctx, kv, rows, heads_in=self._forked_inputs(x, ln1, ctx) if forked else None,
                z_given=z_given), x, ctx)
        x = take(x)  # the residual stream continues at the query rows only
        attn_out = hook_point(self, f"{B}.hook_attn_out", attn_out, ctx)
        if cfg.parallel_attn_mlp:
            mid = x
        else:
            mid = hook_point(self, f"{B}.hook_resid_mid", x + attn_out, ctx)
        mlp_in = hook_point(self, f"{B}.hook_mlp_in", mid, ctx)  # the MLP branch's input (an edit leaves the residual)
        mlp_out, _ = self._normed(2, lambda y, _: (mlp(y, ctx), None), mlp_in, ctx)
        mlp_out = hook_point(self, f"{B}.hook_mlp_out", mlp_out, ctx)
        out = (x + attn_out + mlp_out) if cfg.parallel_attn_mlp else mid + mlp_out
        out = hook_point(self, f"{B}.hook_resid_post", out, ctx)
        return out, new_kv


__all__ = ["Block", "Resume", "RESUME_POINTS"]
