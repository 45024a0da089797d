"""TransformerLens 4's direct logit attribution (`transformer_lens.tools.analysis.direct_logit_attribution`):
one call that decomposes the residual stream (by component, layer or head) and projects each part
on the answer's (or the answer-minus-incorrect) unembedding direction, through `logit_attrs`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.cache.slice import SliceInput

UNITS = ("component", "layer", "head")


@dataclass
class DirectLogitAttribution:
    """`attribution` [component *batch_and_pos] aligned with `labels` ("embed", "0_attn_out",
    "L3H7", ...); one position selected (the default) drops the position axis."""

    attribution: jax.Array
    labels: list[str]
    unit: str

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """The k highest-attribution (label, value) pairs (the mean over any batch/position axes)."""
        flat = jnp.asarray(self.attribution)
        if flat.ndim > 1:
            flat = flat.reshape(flat.shape[0], -1).mean(-1)
        values, idx = jax.lax.top_k(flat, min(int(k), flat.shape[0]))
        return [(self.labels[int(i)], float(v)) for v, i in zip(values, idx)]


def _check_final_norm(cache: Any) -> None:
    """The unembedding direction is only right when the final norm has no learned affine part
    (folded into W_U / b_U by fold_ln), as TransformerLens requires."""
    w, b = cache.weights.get("ln_final.w"), cache.weights.get("ln_final.b")
    if w is not None and not bool(np.all(np.asarray(w) == 1)):
        raise ValueError("direct logit attribution needs an identity final norm weight: the learned scale is not "
                         "folded into W_U; load with jaxlens.from_pretrained (fold_ln=True, TransformerLens's default)")
    if b is not None and bool(np.any(np.asarray(b) != 0)):
        raise ValueError("direct logit attribution needs a zero final norm bias: the learned bias is not folded into "
                         "b_U; load with jaxlens.from_pretrained (fold_ln=True)")


def direct_logit_attribution(model: Any, input: Any = None, answer_tokens: Any = None, incorrect_tokens: Any = None,
                             *, unit: str = "component", pos: SliceInput = -1, cache: Any = None) -> DirectLogitAttribution:
    """Attribution of the answer's logit (minus the incorrect one's, when given) to
    unit="component" (embeddings, each attn_out / mlp_out: `decompose_resid`), "layer" (the
    accumulated stream after each sublayer) or "head" (each head, plus the remainder), at
    positions `pos` (default: the last). Runs `model` on `input` unless a `cache` is given
    (`model` may then be None). b_U is a per-token constant no component writes, so a complete
    decomposition sums to logit - b_U."""
    from jaxlens.cache.activation_cache import ActivationCache

    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    if answer_tokens is None:
        raise ValueError("answer_tokens is required")
    if isinstance(model, ActivationCache) and cache is None:
        model, cache = None, model
    if cache is None:
        if input is None or model is None:
            raise ValueError("provide either `input` to run the model, or a precomputed `cache`")
        _, cache = model.run_with_cache(input)
    _check_final_norm(cache)
    if unit == "component":
        stack, labels = cache.decompose_resid(apply_ln=False, pos_slice=pos, return_labels=True)
    elif unit == "layer":
        stack, labels = cache.accumulated_resid(apply_ln=False, incl_mid=not cache.cfg.parallel_attn_mlp,
                                                pos_slice=pos, return_labels=True)
    else:
        stack, labels = cache.stack_head_results(apply_ln=False, pos_slice=pos, incl_remainder=True,
                                                 return_labels=True)
    attribution = cache.logit_attrs(stack, tokens=answer_tokens, incorrect_tokens=incorrect_tokens, pos_slice=pos,
                                    has_batch_dim=cache.has_batch_dim)
    return DirectLogitAttribution(attribution=attribution, labels=list(labels), unit=unit)


__all__ = ["UNITS", "DirectLogitAttribution", "direct_logit_attribution"]
