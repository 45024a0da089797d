"""The ActivationCache analyses of TransformerLens as pure functions, and their jitted versions.

Each analysis is split in two:
- a *plan* (plain Python over the config and the cache's key names) that validates the arguments
  and lists the components and their TransformerLens labels ("3_attn_out", "L2H5", "L1N7", ...);
- a pure function of an `ActivationCache` (a pytree) that computes the stack. Layers are stacked
  and processed in single batched ops (one einsum for all head results, one broadcast for all
  neurons), never a Python loop of per-layer matmuls.

The `*_jit` versions are compiled with layer indices and flags static; `Slice`s are pytrees
whose indices are leaves, so a compiled program is reused for every position you ask about.
`ActivationCache` methods call them on the subset of the cache each analysis reads.

Semantics are TransformerLens 4.x `ActivationCache` (its compatibility mode), including its
inconsistencies, which are noted where they occur.
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
import jax.numpy as jnp

from jaxlens.config import ModelConfig
from jaxlens.hooks import RunCtx
from jaxlens.cache.slice import Slice

MODES = ("all", "mlp", "attn")


# ---------------------------------------------------------------------------------------------
# Plans: argument checks, labels, the cache keys each analysis reads
# ---------------------------------------------------------------------------------------------

def resolve_layer(cfg: ModelConfig, layer: int | None, what: str, lowest: int = 0) -> int:
    """None and -1 mean n_layers (the unembed input), as in TransformerLens; else [lowest, n_layers]."""
    if layer is None or layer == -1:
        return cfg.n_layers
    if not isinstance(layer, int) or isinstance(layer, bool) or not lowest <= layer <= cfg.n_layers:
        raise ValueError(f"{what}: layer={layer!r} must be an int in [{lowest}, {cfg.n_layers}] "
                         f"(or -1/None for n_layers={cfg.n_layers})")
    return layer


def uses_centering(cfg: ModelConfig) -> bool:
    return cfg.normalization_type in ("LN", "LNPre")


def scale_key(cfg: ModelConfig, layer: int, mlp_input: bool) -> str:
    """The cached norm scale read by `apply_ln_to_stack` for the input to `layer`."""
    if layer == cfg.n_layers:
        return "ln_final.hook_scale"
    n = 2 if mlp_input else 1
    if cfg.norm_placement == "post":  # as TransformerLens 4.3, which raises here too
        raise KeyError(f"layer {layer} has no ln{n} ({'pre-MLP' if mlp_input else 'pre-attention'} norm): this model "
                       f"normalises sublayer outputs (ln{n}_post) instead, so a mid-layer cached-scale norm is "
                       "undefined; use apply_ln=False, or apply the norm at the final layer (layer=None)")
    return f"blocks.{layer}.ln{n}.hook_scale"


def check_mlp_input(cfg: ModelConfig, layer: int, what: str) -> None:
    if layer >= cfg.n_layers:
        raise ValueError(f"{what}: mlp_input=True needs layer < n_layers={cfg.n_layers} (the unembed has no MLP)")


def accumulated_plan(cfg: ModelConfig, layer: int, incl_mid: bool, mlp_input: bool) -> list[tuple[str, str]]:
    """[(label, key)]: `{l}_pre`, optional `{l}_mid`, and `final_post` when layer == n_layers."""
    plan = []
    for l in range(layer + 1):
        if l == cfg.n_layers:
            plan.append(("final_post", f"blocks.{cfg.n_layers - 1}.hook_resid_post"))
            continue
        plan.append((f"{l}_pre", f"blocks.{l}.hook_resid_pre"))
        if (incl_mid and l < layer) or (mlp_input and l == layer):
            if cfg.parallel_attn_mlp:
                raise ValueError(f"{cfg.model_type} has parallel attention and MLP: there is no resid_mid "
                                 "(use incl_mid=False and mlp_input=False)")
            plan.append((f"{l}_mid", f"blocks.{l}.hook_resid_mid"))
    return plan


def decompose_plan(cfg: ModelConfig, keys: Iterable[str], layer: int, mlp_input: bool, mode: str,
                   incl_embeds: bool) -> list[tuple[str, str]]:
    """[(label, key)]: embed, pos_embed, then `{l}_attn_out` / `{l}_mlp_out` for l < layer.

    With mlp_input the current layer's attn_out is added (TransformerLens does this for parallel
    blocks too, although their MLP reads resid_pre; we match it).
    """
    if mode not in MODES:
        raise ValueError(f"decompose_resid: mode={mode!r} must be one of {MODES}")
    if mlp_input:
        check_mlp_input(cfg, layer, "decompose_resid")
    keys = set(keys)
    plan = []
    if incl_embeds:
        if "hook_embed" in keys:
            plan.append(("embed", "hook_embed"))
        if "hook_pos_embed" in keys:
            plan.append(("pos_embed", "hook_pos_embed"))
    for l in range(layer):
        if mode != "mlp":
            plan.append((f"{l}_attn_out", f"blocks.{l}.hook_attn_out"))
        if mode != "attn":
            plan.append((f"{l}_mlp_out", f"blocks.{l}.hook_mlp_out"))
    if mlp_input and mode != "mlp":
        plan.append((f"{layer}_attn_out", f"blocks.{layer}.hook_attn_out"))
    if not plan:
        raise ValueError("decompose_resid: nothing to stack (no embeddings in the cache and no layers selected)")
    return plan


def head_keys(cfg: ModelConfig, keys: Iterable[str], layer: int) -> list[str]:
    """Per layer < `layer`: the cached hook_result if present, else hook_z (results computed)."""
    keys = set(keys)
    out = []
    for l in range(layer):
        r = f"blocks.{l}.attn.hook_result"
        out.append(r if r in keys else f"blocks.{l}.attn.hook_z")
    return out


def head_labels(cfg: ModelConfig, layer: int) -> list[str]:
    return [f"L{l}H{h}" for l in range(layer) for h in range(cfg.n_heads)]


def neuron_labels(cfg: ModelConfig, layer: int, neuron_slice: Slice) -> list[str]:
    idx = [int(i) for i in neuron_slice.indices(cfg.d_mlp)]
    return [f"L{l}N{n}" for l in range(layer) for n in idx]


def remainder_key(cfg: ModelConfig, layer: int, mlp_input: bool = False) -> str:
    """What stack_{head,neuron}_results' remainder completes: resid_mid with mlp_input, else the
    resid_post of layer - 1 (layer 0 reads the final layer's, TransformerLens's negative index)."""
    if mlp_input:
        return f"blocks.{layer}.hook_resid_mid"
    return f"blocks.{(layer - 1) % cfg.n_layers}.hook_resid_post"


def residual_like_key(keys: Iterable[str]) -> str | None:
    """A [batch pos d_model] activation to take an empty stack's shape from (TL uses hook_embed)."""
    keys = list(keys)
    for k in ["hook_embed"] + keys:
        if k in keys and k.endswith(("hook_embed", "hook_resid_pre", "hook_resid_post", "hook_attn_out")):
            return k
    return None


# ---------------------------------------------------------------------------------------------
# Pure analyses over an ActivationCache
# ---------------------------------------------------------------------------------------------

def _stack(xs: list[jax.Array]) -> jax.Array:
    return jnp.stack(xs, axis=0)


def ln_final(cache: Any, x: jax.Array) -> jax.Array:
    """The model's real final norm (fresh statistics, learned weight and bias) applied to x."""
    from jaxlens.model.norms import Norm

    cfg = cache.cfg
    params = {k.split(".")[-1]: cache.weights[k] for k in ("ln_final.w", "ln_final.b") if k in cache.weights}
    return Norm(cfg, "ln_final").apply({"params": params}, x, RunCtx())


def apply_ln_to_stack(cache: Any, residual_stack: jax.Array, pos_slice: Slice = Slice(), batch_slice: Slice = Slice(),
                      *, layer: int, mlp_input: bool = False, has_batch_dim: bool = True,
                      recompute_ln: bool = False) -> jax.Array:
    """Scale a stack as the input of `layer` would be scaled, using the cached norm scale.

    LN stacks are centred first. `recompute_ln` at the unembed instead runs the real final norm on
    each component (logit lens). `pos_slice` was already applied to the stack and is applied to the
    scale here; `batch_slice` is applied to both.
    """
    cfg = cache.cfg
    if has_batch_dim:
        residual_stack = batch_slice.apply(residual_stack, 1)
    if recompute_ln and layer == cfg.n_layers:
        return ln_final(cache, residual_stack)
    if uses_centering(cfg):
        residual_stack = residual_stack - residual_stack.mean(-1, keepdims=True)
    scale = pos_slice.apply(cache[scale_key(cfg, layer, mlp_input)], -2)
    if cache.has_batch_dim:
        scale = batch_slice.apply(scale, 0)
    return residual_stack / scale


def accumulated_resid(cache: Any, pos_slice: Slice = Slice(), *, layer: int, incl_mid: bool = False,
                      apply_ln: bool = False, mlp_input: bool = False) -> jax.Array:
    """[components *batch_and_pos d_model]: resid_pre of each layer up to `layer` (+ mids, final)."""
    plan = accumulated_plan(cache.cfg, layer, incl_mid, mlp_input)
    comps = _stack([pos_slice.apply(cache[k], -2) for _, k in plan])
    if apply_ln:
        # TransformerLens: at the unembed the real ln_final (weights and fresh statistics) is
        # applied; at an inner layer only the cached scale (no weights). decompose_resid and
        # logit_attrs always use the cached scale. We match both.
        comps = apply_ln_to_stack(cache, comps, pos_slice, layer=layer, mlp_input=mlp_input,
                                  has_batch_dim=cache.has_batch_dim, recompute_ln=layer == cache.cfg.n_layers)
    return comps


def decompose_resid(cache: Any, pos_slice: Slice = Slice(), *, layer: int, mlp_input: bool = False,
                    mode: str = "all", apply_ln: bool = False, incl_embeds: bool = True) -> jax.Array:
    """[components *batch_and_pos d_model]: embeddings and each block output up to `layer`."""
    plan = decompose_plan(cache.cfg, cache.keys(), layer, mlp_input, mode, incl_embeds)
    comps = _stack([pos_slice.apply(cache[k], -2) for _, k in plan])
    if apply_ln:
        comps = apply_ln_to_stack(cache, comps, pos_slice, layer=layer, mlp_input=mlp_input)
    return comps


def _heads_first(x: jax.Array) -> jax.Array:
    """[L *bp H d] -> [(L H) *bp d] (TransformerLens's concatenated head/neuron index)."""
    x = jnp.moveaxis(x, -2, 1)
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def head_results(cache: Any, pos_slice: Slice, layer: int) -> jax.Array:
    """[layer *bp head d_model]: each head's write to the residual stream (z W_O, or hook_result)."""
    keys = head_keys(cache.cfg, cache.keys(), layer)
    if all(k.endswith("hook_result") for k in keys):
        return _stack([pos_slice.apply(cache[k], -3) for k in keys])
    if all(k.endswith("hook_z") for k in keys):
        z = _stack([pos_slice.apply(cache[k], -3) for k in keys])  # [L *bp H dh]
        return jnp.einsum("l...hd,lhdm->l...hm", z, cache.weights["W_O"][:layer])
    return _stack([pos_slice.apply(cache[k], -3) if k.endswith("hook_result")
                   else jnp.einsum("...hd,hdm->...hm", pos_slice.apply(cache[k], -3), cache.weights["W_O"][l])
                   for l, k in enumerate(keys)])


def _empty_stack(cache: Any, pos_slice: Slice) -> jax.Array:
    src = pos_slice.apply(cache[residual_like_key(cache.keys())], -2)
    return jnp.zeros((0,) + src.shape, src.dtype)


def stack_head_results(cache: Any, pos_slice: Slice = Slice(), *, layer: int, incl_remainder: bool = False,
                       apply_ln: bool = False) -> jax.Array:
    """[(layer head) *bp d_model] head results of every layer < `layer` (+ the remainder)."""
    cfg = cache.cfg
    if layer > 0:
        comps = _heads_first(head_results(cache, pos_slice, layer))
    else:
        comps = None if incl_remainder else _empty_stack(cache, pos_slice)
    if incl_remainder:
        rest = pos_slice.apply(cache[remainder_key(cfg, layer)], -2)
        comps = rest[None] if comps is None else jnp.concatenate([comps, (rest - comps.sum(0))[None]], 0)
    if apply_ln:
        comps = apply_ln_to_stack(cache, comps, pos_slice, layer=layer)
    return comps


def check_neuron_basis(cfg: ModelConfig, what: str, fix: str = "decompose by layer instead (decompose_resid, "
                       "hook_mlp_out) or read blocks.{l}.mlp.hook_expert_outputs") -> None:
    """Neuron analyses need one MLP neuron basis per layer; a mixture-of-experts MLP has none (its
    hook_post is the routed sum, [batch pos d_model]). TransformerLens 4.3 cannot expand MoE neurons
    either (its MoE bridge has no W_out), so this is an error naming the fix."""
    if cfg.num_experts:
        raise ValueError(f"{what}: a mixture-of-experts MLP (num_experts={cfg.num_experts}) has no single neuron "
                         f"basis to expand; {fix}")


def get_neuron_results(cache: Any, neuron_slice: Slice = Slice(), pos_slice: Slice = Slice(), *,
                       layer: int) -> jax.Array:
    """[*bp neurons d_model]: each neuron's write (post activation times its W_out row)."""
    check_neuron_basis(cache.cfg, "get_neuron_results")
    acts = neuron_slice.apply(pos_slice.apply(cache[f"blocks.{layer}.mlp.hook_post"], -2), -1)
    W_out = neuron_slice.apply(cache.weights["W_out"][layer], 0)
    return acts[..., None] * W_out


def _all_neuron_results(cache: Any, pos_slice: Slice, neuron_slice: Slice, layer: int) -> jax.Array:
    """[(layer neuron) *bp d_model] for every layer < `layer` in one broadcast."""
    check_neuron_basis(cache.cfg, "stack_neuron_results")
    post = _stack([neuron_slice.apply(pos_slice.apply(cache[f"blocks.{l}.mlp.hook_post"], -2), -1)
                   for l in range(layer)])  # [L *bp N]
    W_out = neuron_slice.apply(cache.weights["W_out"][:layer], 1)  # [L N m]
    W_out = W_out.reshape((layer,) + (1,) * (post.ndim - 2) + W_out.shape[1:])
    return _heads_first(post[..., None] * W_out)


def stack_neuron_results(cache: Any, pos_slice: Slice = Slice(), neuron_slice: Slice = Slice(), *, layer: int,
                         incl_remainder: bool = False, apply_ln: bool = False, mlp_input: bool = False) -> jax.Array:
    """[(layer neuron) *bp d_model] neuron results of every layer < `layer` (+ the remainder)."""
    neuron_slice = neuron_slice.collapse_free()
    if layer > 0:
        comps = _all_neuron_results(cache, pos_slice, neuron_slice, layer)
    else:
        comps = None if incl_remainder else _empty_stack(cache, pos_slice)
    if incl_remainder:
        rest = pos_slice.apply(cache[remainder_key(cache.cfg, layer, mlp_input)], -2)
        comps = rest[None] if comps is None else jnp.concatenate([comps, (rest - comps.sum(0))[None]], 0)
    if apply_ln:
        comps = apply_ln_to_stack(cache, comps, pos_slice, layer=layer, mlp_input=mlp_input)
    return comps


def accumulated_bias(cache: Any, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> jax.Array:
    """[d_model]: b_O (and b_out) of every layer < `layer`, plus b_O of `layer` with mlp_input."""
    w = cache.weights
    total = w["b_O"][:layer].sum(0)
    if include_mlp_biases:
        total = total + w["b_out"][:layer].sum(0)
    if mlp_input:
        total = total + w["b_O"][layer]
    return total


def get_full_resid_decomposition(cache: Any, pos_slice: Slice = Slice(), *, layer: int, mlp_input: bool = False,
                                 expand_neurons: bool = True, apply_ln: bool = False) -> jax.Array:
    """[components *bp d_model]: heads, neurons (or MLP outputs), embed, pos_embed, biases."""
    heads = stack_head_results(cache, pos_slice, layer=layer + (1 if mlp_input else 0))
    comps = [heads]
    if layer > 0:
        if expand_neurons:
            check_neuron_basis(cache.cfg, "get_full_resid_decomposition(expand_neurons=True)",
                               "pass expand_neurons=False (one component per layer's MLP output)")
            comps.append(stack_neuron_results(cache, pos_slice, layer=layer))
        else:
            comps.append(decompose_resid(cache, pos_slice, layer=layer, mlp_input=mlp_input, mode="mlp",
                                         incl_embeds=False))
    if "hook_embed" in cache:
        comps.append(pos_slice.apply(cache["hook_embed"], -2)[None])
    if "hook_pos_embed" in cache:
        comps.append(pos_slice.apply(cache["hook_pos_embed"], -2)[None])
    bias = accumulated_bias(cache, layer, mlp_input, include_mlp_biases=expand_neurons)
    comps.append(jnp.broadcast_to(bias, (1,) + heads.shape[1:]).astype(heads.dtype))
    stack = jnp.concatenate(comps, 0)
    if apply_ln:
        stack = apply_ln_to_stack(cache, stack, pos_slice, layer=layer, mlp_input=mlp_input)
    return stack


def full_decomposition_labels(cfg: ModelConfig, keys: Iterable[str], layer: int, mlp_input: bool,
                              expand_neurons: bool) -> list[str]:
    keys = set(keys)
    labels = head_labels(cfg, layer + (1 if mlp_input else 0))
    if layer > 0:
        labels += (neuron_labels(cfg, layer, Slice()) if expand_neurons
                   else [lab for lab, _ in decompose_plan(cfg, keys, layer, mlp_input, "mlp", False)])
    labels += [n for n, k in (("embed", "hook_embed"), ("pos_embed", "hook_pos_embed")) if k in keys]
    return labels + ["bias"]


def logit_attrs(cache: Any, residual_stack: jax.Array, tokens: jax.Array, incorrect_tokens: jax.Array | None = None,
                pos_slice: Slice = Slice(), batch_slice: Slice = Slice(), *, has_batch_dim: bool = True,
                single: bool = False, incorrect_single: bool = False) -> jax.Array:
    """[components *bp]: each component's (final-norm-scaled) dot with the tokens' unembed directions.

    `single` marks a one-token target (str, int or one-element array), whose direction is a single
    [d_model] vector shared by every position, as in TransformerLens.
    """
    W_U = cache.weights["W_U"]

    def directions(t: jax.Array, one: bool) -> jax.Array:
        if one:
            return W_U[:, jnp.reshape(t, ())]
        return jnp.moveaxis(W_U[:, t], 0, -1)

    dirs = directions(tokens, single)
    if incorrect_tokens is not None:
        dirs = dirs - directions(incorrect_tokens, incorrect_single)
    scaled = apply_ln_to_stack(cache, residual_stack, pos_slice, batch_slice, layer=cache.cfg.n_layers,
                               has_batch_dim=has_batch_dim)
    if (has_batch_dim and batch_slice.mode != "int" and scaled.ndim == 4 and dirs.ndim == 2
            and dirs.shape[0] == scaled.shape[1]):
        dirs = dirs[:, None, :]  # per-example directions broadcast over positions, not the batch
    return (scaled * dirs).sum(-1)


def compute_head_results(cache: Any) -> dict[str, jax.Array]:
    """{blocks.{l}.attn.hook_result: [*bp head d_model]} for every layer, from z and W_O."""
    res = head_results(cache, Slice(), cache.cfg.n_layers)
    return {f"blocks.{l}.attn.hook_result": res[l] for l in range(cache.cfg.n_layers)}


# ---------------------------------------------------------------------------------------------
# Compiled versions (flags static; Slices and arrays are traced)
# ---------------------------------------------------------------------------------------------

apply_ln_to_stack_jit = jax.jit(apply_ln_to_stack,
                                static_argnames=("layer", "mlp_input", "has_batch_dim", "recompute_ln"))
accumulated_resid_jit = jax.jit(accumulated_resid, static_argnames=("layer", "incl_mid", "apply_ln", "mlp_input"))
decompose_resid_jit = jax.jit(decompose_resid,
                              static_argnames=("layer", "mlp_input", "mode", "apply_ln", "incl_embeds"))
stack_head_results_jit = jax.jit(stack_head_results, static_argnames=("layer", "incl_remainder", "apply_ln"))
get_neuron_results_jit = jax.jit(get_neuron_results, static_argnames=("layer",))
stack_neuron_results_jit = jax.jit(stack_neuron_results,
                                   static_argnames=("layer", "incl_remainder", "apply_ln", "mlp_input"))
get_full_resid_decomposition_jit = jax.jit(get_full_resid_decomposition,
                                           static_argnames=("layer", "mlp_input", "expand_neurons", "apply_ln"))
logit_attrs_jit = jax.jit(logit_attrs, static_argnames=("has_batch_dim", "single", "incorrect_single"))
compute_head_results_jit = jax.jit(compute_head_results)

__all__ = ["MODES", "resolve_layer", "uses_centering", "scale_key", "check_mlp_input", "accumulated_plan",
           "decompose_plan", "head_keys", "head_labels", "neuron_labels", "remainder_key",
           "residual_like_key", "ln_final", "apply_ln_to_stack", "accumulated_resid", "decompose_resid",
           "head_results", "stack_head_results", "check_neuron_basis", "get_neuron_results", "stack_neuron_results",
           "accumulated_bias", "get_full_resid_decomposition", "full_decomposition_labels", "logit_attrs",
           "compute_head_results", "apply_ln_to_stack_jit", "accumulated_resid_jit", "decompose_resid_jit",
           "stack_head_results_jit", "get_neuron_results_jit", "stack_neuron_results_jit",
           "get_full_resid_decomposition_jit", "logit_attrs_jit", "compute_head_results_jit"]
