"""Gradients of a scalar metric with respect to any hook's activation, and attribution patching.

The gradient with respect to an activation is taken the JAX way: a hook adds a zero
"perturbation" array at each requested hook point (`Perturb`, a pytree edit) and `jax.grad`
differentiates the metric with respect to those zeros. The result is a gradient cache keyed
like the forward cache (TransformerLens's `run_with_cache(..., incl_bwd=True)` gives the same
gradients under `name + "_grad"`). All of it is one jitted program.

Attribution patching (Nanda, 2023) is the first-order estimate of activation patching:
    denoising (default): (clean − corrupted) · ∂metric/∂act at the corrupted run, which estimates
        patching the clean activation into the corrupted run (what `jaxlens.patching` computes);
    noising: (corrupted − clean) · ∂metric/∂act at the clean run, which estimates patching the
        corrupted activation into the clean run.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp

from jaxlens.fingerprint import Fn, call_metric, retry_static
from jaxlens.cache.activation_cache import ActivationCache
from jaxlens.model.forward import forward
from jaxlens.hooks import HookPoint, Hooks, NamesFilter, make_hooks, resolve_names
from jaxlens.edits.hook_points import has_backward_hooks

Metric = Callable[[jax.Array], jax.Array]
_ELEMENTWISE = ("hook_pattern", "hook_attn_scores")


@dataclass(frozen=True)
class Perturb:
    """Add `deltas[hook.name]` to the activation. With zero deltas it changes nothing, and
    `jax.grad` with respect to `deltas` is the gradient with respect to the activations."""

    deltas: dict[str, jax.Array]

    def __call__(self, x: jax.Array, hook: HookPoint) -> jax.Array:
        return x + self.deltas[hook.name].astype(x.dtype)


jax.tree_util.register_dataclass(Perturb, data_fields=["deltas"], meta_fields=[])


def _default_metric(logits: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    from jaxlens.hooked import lm_loss

    return lm_loss(logits, tokens, mask)


@retry_static
@partial(jax.jit, static_argnames=("cfg", "capture", "grad_names", "precision", "start_at_layer", "wrt_params"))
def value_and_grads(params, tokens, mask, hooks, metric, targets=None, *, cfg, capture, grad_names, precision,
                     start_at_layer=None, wrt_params=False):
    """(metric, logits, activations, {name: d metric / d activation}) in one program.

    `tokens` is the model input (the residual stream with `start_at_layer`); `targets` are the
    tokens the default metric (the LM loss) scores when they are not the input. With
    `wrt_params` the backward pass also runs through every parameter (TransformerLens's
    `.backward()`), so backward hooks at every point see their gradient; those parameter
    gradients are dropped.
    """
    run = partial(forward, cfg=cfg, precision=precision, start_at_layer=start_at_layer)
    # hooks keep shapes, so the shapes are taken without them (a storing hook must not run abstractly)
    shapes = jax.eval_shape(lambda: run(params, tokens=tokens, attention_mask=mask, capture=grad_names)[1])
    # integer hooks (MoE expert indices) have no gradient, as in torch
    deltas = {n: jnp.zeros(s.shape, s.dtype) for n, s in shapes.items() if jnp.issubdtype(s.dtype, jnp.inexact)}
    scored = tokens if targets is None else targets

    def f(deltas, params):
        h = Hooks(hooks.entries + ((frozenset(deltas), Perturb(deltas)),))
        logits, acts, _ = run(params, tokens=tokens, attention_mask=mask, capture=capture, hooks=h)
        value = call_metric(metric, logits, "metric") if metric is not None else _default_metric(logits, scored, mask)
        if jnp.ndim(value) != 0:
            raise ValueError(f"the metric must return a scalar to differentiate, got shape {jnp.shape(value)}; "
                             "reduce it (e.g. .sum() or .mean())")
        return value, (logits, acts)

    argnums = (0, 1) if wrt_params else 0
    (value, (logits, acts)), grads = jax.value_and_grad(f, argnums=argnums, has_aux=True)(deltas, params)
    return value, logits, acts, (grads[0] if wrt_params else grads)


def run_with_cache_and_grad(model: Any, input: Any, metric: Metric | None = None, names_filter: NamesFilter = None,
                            attention_mask: Any = None, *, grad_filter: NamesFilter = "same", fwd_hooks: Any = None,
                            prepend_bos: bool | None = None, padding_side: str = "right"
                            ) -> tuple[jax.Array, ActivationCache, ActivationCache]:
    """(metric value, forward cache, gradient cache) in one compiled forward+backward pass.

    `metric(logits [batch pos vocab]) -> scalar` (default: the language-model loss). The forward
    cache holds `names_filter`'s activations; the gradient cache holds ∂metric/∂activation for
    `grad_filter`'s names ("same": the same names), keyed by the same hook names. `fwd_hooks`
    edits apply as in `run_with_hooks`; gradients are taken after them (an activation that an
    edit overwrites downstream gets a zero gradient there). A `HookedTransformer`'s stored hooks
    (`model.add_hook`, `model.hooks(...)`, backward ones included) apply before `fwd_hooks`. The
    compiled program is keyed by what `metric` reads (`jaxlens.fingerprint`): a fresh lambda
    reuses it, a changed global does not.
    """
    cfg = model.cfg
    capture = resolve_names(names_filter, cfg)
    grad_names = capture if (isinstance(grad_filter, str) and grad_filter == "same") else resolve_names(grad_filter, cfg)
    toks, mask = model._inputs(input, attention_mask, prepend_bos, padding_side)
    compose = getattr(model, "_compose_hooks", None)  # a HookedTransformer's stored hooks apply first
    hooks = compose(fwd_hooks, (), backward=True) if compose else make_hooks(fwd_hooks, cfg)
    value, _, acts, grads = value_and_grads(model.params, toks, mask, hooks,
                                             None if metric is None else Fn(metric), cfg=cfg,
                                             capture=capture, grad_names=grad_names,
                                             precision=model.precision, wrt_params=has_backward_hooks(hooks))
    weights = model.cache_weights()
    return value, ActivationCache(acts, cfg, True, weights), ActivationCache(grads, cfg, True, weights)


def attribution_patching(model: Any, clean_input: Any, corrupted_input: Any, metric: Metric,
                         names_filter: NamesFilter = None, *, direction: Literal["denoise", "noise"] = "denoise",
                         attention_mask: Any = None, reduce_last_axis: bool = True) -> ActivationCache:
    """Attribution-patching scores for every activation `names_filter` selects.

    direction="denoise": (clean − corrupted) · grad at the corrupted run; "noise":
    (corrupted − clean) · grad at the clean run (see the module docstring). With
    `reduce_last_axis` the product is summed over the last axis (d_model, d_head, d_mlp): scores
    are [batch pos] per residual-like hook and [batch pos head] per head hook; patterns and
    attention scores stay elementwise [batch head query key] (masked entries score 0).
    Returns an ActivationCache of scores keyed by hook name.
    """
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' or 'noise', got {direction!r}")
    clean, clean_mask = model._inputs(clean_input, attention_mask, None, "right")
    corrupt, corrupt_mask = model._inputs(corrupted_input, attention_mask, None, "right")
    if clean.shape != corrupt.shape:
        raise ValueError(f"clean input {tuple(clean.shape)} and corrupted input {tuple(corrupt.shape)} tokenize to "
                         "different shapes: the two inputs must have the same batch size and length")
    base, other = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    base_mask, other_mask = (corrupt_mask, clean_mask) if direction == "denoise" else (clean_mask, corrupt_mask)
    _, base_cache, grads = run_with_cache_and_grad(model, base, metric, names_filter, base_mask)
    _, other_cache = model.run_with_cache(other, names_filter, other_mask, return_type=None)
    scores = {}
    for name in grads:
        diff = jnp.asarray(other_cache[name]) - jnp.asarray(base_cache[name])
        prod = jnp.where(jnp.isfinite(diff), diff * grads[name], 0.0)
        if reduce_last_axis and not name.endswith(_ELEMENTWISE):
            prod = prod.sum(-1)
        scores[name] = prod
    return ActivationCache(scores, model.cfg, True, model.cache_weights())


__all__ = ["Perturb", "run_with_cache_and_grad", "attribution_patching", "value_and_grads"]
