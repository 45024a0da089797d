"""Mixture-of-experts MLP (Mixtral, Qwen3-MoE): top-k routed gated-SiLU experts, TransformerLens 4.3 hooks.

Routing is HF's: softmax over all experts (f32), top-k, then (Mixtral always, Qwen3-MoE if
`norm_topk_prob`) renormalise the k weights to sum to 1. Each token's k (token, expert) slots
are sorted by expert and each expert runs only on its own slots (`sorted_experts`): no expert
ever sees a token that was not routed to it, and no token is ever dropped.

Hooks (names and shapes of TransformerLens 4.3's bridge; tokens = batch*pos, flattened as TL):
- `mlp.hook_pre` [batch pos d_model]: the block's input; `mlp.hook_post` [batch pos d_model]: its output.
- `mlp.gate.hook_out` [tokens n_experts]: router logits. Unlike the bridge (which hooks them
  after HF has already routed), an edit here re-routes: softmax and top-k read the edited logits.
- `mlp.hook_expert_weights` [tokens n_experts]: the (renormalised) top-k weights scattered into
  the expert axis, zeros elsewhere. As in the bridge, an edit that changes it re-derives the
  selection as the top-k of the edited tensor and uses the edited values as they are (no
  renormalisation): zero a column to ablate that expert, raise one to force routing to it.
- `mlp.hook_expert_indices` [tokens k] int32: the selected experts; an edit forces routing, with
  each slot's weight read from `hook_expert_weights` at the new expert (as the bridge does).
  Edited values outside [0, n_experts) are clamped into it.
- `mlp.hook_expert_outputs` [tokens k d_model] (jaxlens only: HF's fused experts give the bridge
  no such hook): each selected expert's output before its routing weight.
"""

from __future__ import annotations

import math
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlens.config import ModelConfig
from jaxlens.hooks import RunCtx, hook_point
from jaxlens.model.layers import activation, param

_init = nn.initializers.normal(0.02)
P = "blocks.{l}.mlp"
Dispatch = Literal["auto", "sorted", "ragged", "dense"]
DISPATCHES: tuple[str, ...] = ("auto", "sorted", "ragged", "dense")


def route(logits: jax.Array, k: int, renormalise: bool) -> tuple[jax.Array, jax.Array]:
    """HF's top-k routing of router logits [tokens n_experts] -> (weights [tokens k] f32, indices [tokens k]).

    Softmax over all experts first, then top-k, then optional renormalisation, in Mixtral's /
    Qwen3-MoE's order. Exact ties between experts' probabilities go to the lowest expert index
    (`lax.top_k`); torch.topk's order for exact ties is unspecified (on CPU it is not lowest-first),
    so only there can the selection differ from HF's (e.g. a router with identical rows)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    w, idx = jax.lax.top_k(probs, k)
    if renormalise:
        w = w / w.sum(-1, keepdims=True)
    return w, idx.astype(jnp.int32)


def scatter_weights(w: jax.Array, idx: jax.Array, n_experts: int) -> jax.Array:
    """[tokens k] weights at `idx` -> [tokens n_experts] with zeros elsewhere (TL's layout)."""
    return jnp.sum(jax.nn.one_hot(idx, n_experts, dtype=w.dtype) * w[..., None], axis=-2)


def _expert(h_gate: jax.Array, h_in: jax.Array, act_fn: str) -> jax.Array:
    return activation(act_fn, h_gate) * h_in


def dense_experts(x: jax.Array, idx: jax.Array, W_gate: jax.Array, W_in: jax.Array, W_out: jax.Array,
                  act_fn: str) -> jax.Array:
    """Naive reference: every expert on every token, then pick each slot's expert.
    x [T d_model], idx [T k] -> [T k d_model]. E/k times the work of `sorted_experts`; for tests and
    the benchmark."""
    h = _expert(jnp.einsum("td,edf->etf", x, W_gate), jnp.einsum("td,edf->etf", x, W_in), act_fn)
    y = jnp.einsum("etf,efd->etd", h, W_out)  # [E T D]
    return jnp.take_along_axis(y.transpose(1, 0, 2), idx[..., None], axis=1)


def _sort_slots(idx: jax.Array, n_experts: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(order, sorted expert ids, slots per expert) of the flattened [T*k] slots, sorted by expert."""
    e = idx.reshape(-1)
    order = jnp.argsort(e, stable=True)
    counts = jnp.bincount(e, length=n_experts).astype(jnp.int32)
    return order, e[order], counts


def tile_rows(n_slots: int, n_experts: int) -> int:
    """Rows per tile of `sorted_experts`: about one tile per expert's fair share, a power of two in [8, 128]."""
    return int(min(128, max(8, 2 ** math.ceil(math.log2(max(1, math.ceil(n_slots / n_experts)))))))


def sorted_experts(x: jax.Array, idx: jax.Array, W_gate: jax.Array, W_in: jax.Array, W_out: jax.Array,
                   act_fn: str, block: int | None = None) -> jax.Array:
    """Group-by-expert dispatch with static shapes, on any backend. x [T d_model], idx [T k] -> [T k d_model].

    The T*k slots are sorted by expert; each expert's run is padded up to a multiple of `block`
    rows, so every tile of `block` rows belongs to one expert. A `lax.scan` over the (static)
    number of tiles, at most ceil(T*k / block) + n_experts, multiplies each tile by its expert's
    weights only. Padding rows are zeros and are never read back."""
    T, D = x.shape
    k = idx.shape[-1]
    E = W_gate.shape[0]
    S = T * k
    B = block or tile_rows(S, E)
    order, e_sorted, counts = _sort_slots(idx, E)
    padded = (counts + B - 1) // B * B
    pstart = jnp.cumsum(padded) - padded  # where each expert's tiles begin
    start = jnp.cumsum(counts) - counts  # where each expert's slots begin in sorted order
    dest = pstart[e_sorted] + (jnp.arange(S, dtype=jnp.int32) - start[e_sorted])  # row of each sorted slot
    n_tiles = -(-S // B) + E
    rows = jnp.zeros((n_tiles * B, D), x.dtype).at[dest].set(x[order // k])
    tile_start = jnp.arange(n_tiles, dtype=jnp.int32) * B
    # tiles past the last expert's run hold only zero rows: give them any valid expert (its output is unread)
    tile_expert = jnp.minimum(jnp.searchsorted(jnp.cumsum(padded), tile_start, side="right"), E - 1)

    def one_tile(_, args):
        r, e = args
        h = _expert(r @ W_gate[e], r @ W_in[e], act_fn)
        return None, h @ W_out[e]

    _, out = jax.lax.scan(one_tile, None, (rows.reshape(n_tiles, B, D), tile_expert))
    y_sorted = out.reshape(n_tiles * B, D)[dest]
    return jnp.zeros((S, D), x.dtype).at[order].set(y_sorted).reshape(T, k, D)


def ragged_experts(x: jax.Array, idx: jax.Array, W_gate: jax.Array, W_in: jax.Array, W_out: jax.Array,
                   act_fn: str) -> jax.Array:
    """Group-by-expert dispatch through `jax.lax.ragged_dot` (a grouped-matmul kernel on GPU and TPU;
    XLA:CPU lowers it densely, so on CPU it costs as much as `dense_experts`). Same contract as
    `sorted_experts`."""
    T, D = x.shape
    k = idx.shape[-1]
    order, _, counts = _sort_slots(idx, W_gate.shape[0])
    xs = x[order // k]
    h = _expert(jax.lax.ragged_dot(xs, W_gate, counts), jax.lax.ragged_dot(xs, W_in, counts), act_fn)
    y_sorted = jax.lax.ragged_dot(h, W_out, counts)
    return jnp.zeros((T * k, D), x.dtype).at[order].set(y_sorted).reshape(T, k, D)


def run_experts(dispatch: str, x: jax.Array, idx: jax.Array, W_gate: jax.Array, W_in: jax.Array,
                W_out: jax.Array, act_fn: str) -> jax.Array:
    """Each slot's expert output [T k d_model] by the named dispatch ("auto": ragged_dot on GPU/TPU,
    the tiled sort elsewhere)."""
    if dispatch not in DISPATCHES:
        raise ValueError(f"MoE dispatch={dispatch!r} must be one of {DISPATCHES}")
    if dispatch == "auto":
        dispatch = "ragged" if jax.default_backend() in ("gpu", "tpu") else "sorted"
    fn = {"sorted": sorted_experts, "ragged": ragged_experts, "dense": dense_experts}[dispatch]
    return fn(x, idx, W_gate, W_in, W_out, act_fn)


class MoE(nn.Module):
    """Top-k routed gated experts: out = sum_k w_k · W_out[e_k](act(x W_gate[e_k]) * x W_in[e_k]).

    Params: `W_router` [d_model n_experts], `W_gate` / `W_in` [n_experts d_model d_mlp],
    `W_out` [n_experts d_mlp d_model] (d_mlp is each expert's hidden size). Same call as `MLP`."""

    cfg: ModelConfig
    dispatch: Dispatch = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, ctx: RunCtx) -> jax.Array:
        cfg = self.cfg
        E, k, D, F = cfg.num_experts, cfg.experts_per_token, cfg.d_model, cfg.d_mlp
        if not E:
            raise ValueError("MoE needs cfg.num_experts; a dense model uses jaxlens.model.mlp.MLP")
        if cfg.use_mlp_bias:
            raise ValueError("MoE experts have no biases (Mixtral, Qwen3-MoE); set use_mlp_bias=False")
        dt = x.dtype
        W_router = param(self, "W_router", _init, (D, E), dt)
        W_gate = param(self, "W_gate", _init, (E, D, F), dt)
        W_in = param(self, "W_in", _init, (E, D, F), dt)
        W_out = param(self, "W_out", _init, (E, F, D), dt)
        x = hook_point(self, f"{P}.hook_pre", x, ctx)
        lead = x.shape[:-1]
        xt = x.reshape(-1, D)
        # router logits in float32 (bf16 models too): the top-k choice reads them, and HF's routing
        # softmax is float32 as well
        logits = hook_point(self, f"{P}.gate.hook_out", jnp.dot(xt, W_router, preferred_element_type=jnp.float32), ctx)
        w, idx = route(logits, k, cfg.norm_topk_prob)
        scattered = scatter_weights(w, idx, E).astype(dt)
        edited = hook_point(self, f"{P}.hook_expert_weights", scattered, ctx)
        # an edit of the weights re-derives the selection from them (the bridge's rule, globally as it does)
        idx = jnp.where(jnp.any(edited != scattered), jax.lax.top_k(edited, k)[1].astype(jnp.int32), idx)
        # an edited index outside [0, E) is clamped (traced values cannot raise), the same for every dispatch
        idx = jnp.clip(hook_point(self, f"{P}.hook_expert_indices", idx, ctx), 0, E - 1)
        w = jnp.take_along_axis(edited, idx, axis=-1)
        ys = run_experts(self.dispatch, xt, idx, W_gate, W_in, W_out, cfg.act_fn)
        ys = hook_point(self, f"{P}.hook_expert_outputs", ys, ctx)
        out = jnp.einsum("tk,tkd->td", w, ys).reshape(*lead, D)
        return hook_point(self, f"{P}.hook_post", out, ctx)


__all__ = ["MoE", "Dispatch", "DISPATCHES", "route", "scatter_weights", "dense_experts", "sorted_experts",
           "ragged_experts", "run_experts", "tile_rows"]
