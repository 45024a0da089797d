"""Which HF config.json keys a family reads, which are irrelevant to inference, and which are
refused: `check_keys` runs for every family, so no key that changes the computation is ignored
in silence (Penzai-style validation, without rejecting benign attributes)."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping

from jaxlens.conversion.io import CheckpointError

# Keys every HF config may carry that do not change a forward pass (bookkeeping, training-only
# settings, generation defaults, the tokens, the runtime dtype we choose ourselves).
IRRELEVANT = frozenset({
    "_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
    "chunk_size_feed_forward", "id2label", "label2id", "is_encoder_decoder", "problem_type", "return_dict",
    "output_attentions", "output_hidden_states", "use_cache", "initializer_range", "attention_dropout",
    "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_activation", "summary_first_dropout",
    "summary_proj_to_labels", "summary_type", "summary_use_proj", "pretraining_tp", "bos_token_id",
    "eos_token_id", "pad_token_id", "tokenizer_class", "max_length", "cache_implementation",
    "router_aux_loss_coef", "output_router_logits", "router_jitter_noise", "classifier_dropout",
    "_attn_implementation_autoset", "attn_implementation", "use_return_dict", "task_specific_params",
    "rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor", "rope_local_base_freq",
    # (the rope keys are read by conversion/common.py::rope, which refuses what it cannot run)
})


def refuse_if(pred: Callable[[Any], bool], why: str) -> tuple[Callable[[Any], bool], str]:
    """A refusal rule: the key's value is refused when `pred(value)` is true, for the reason `why`."""
    return pred, why


ALWAYS_REFUSED: Mapping[str, tuple[Callable[[Any], bool], str]] = {
    "quantization_config": refuse_if(lambda v: bool(v), "quantized checkpoints are not supported; use the "
                                     "unquantized weights"),
    "auto_map": refuse_if(lambda v: bool(v), "the checkpoint needs remote code; jaxlens never runs it"),
}


def _default_like(v: Any) -> bool:
    return v is None or v is False or v == 0 or v in ("", [], {})


def check_keys(hf: Mapping[str, Any], model_type: str, used: set[str] | frozenset[str],
               refused: Mapping[str, tuple[Callable[[Any], bool], str]] | None = None,
               irrelevant: set[str] | frozenset[str] = frozenset()) -> None:
    """Raise for refused values (naming key and value); warn for keys nobody reads.

    `used`: keys the family's converter reads; `irrelevant`: family-specific keys that do not
    change inference; `refused`: key -> (is-refused predicate, reason)."""
    rules = {**ALWAYS_REFUSED, **(refused or {})}
    bad = [f"{k}={hf[k]!r} ({why})" for k, (pred, why) in rules.items() if k in hf and pred(hf[k])]
    if bad:
        raise CheckpointError(f"{model_type}: config.json sets what jaxlens cannot run faithfully: " + "; ".join(bad))
    unknown = sorted(set(hf) - set(used) - set(irrelevant) - IRRELEVANT - set(rules))
    if unknown:
        quiet = [k for k in unknown if _default_like(hf[k])]
        loud = [f"{k}={hf[k]!r}" for k in unknown if k not in quiet]
        msg = f"{model_type}: config.json keys that jaxlens does not read: "
        if loud:
            msg += ", ".join(loud) + " (if one of these changes the computation, results will differ from HF: report it)"
        if quiet:
            msg += ("; " if loud else "") + ", ".join(quiet) + " (default-like values)"
        warnings.warn(msg, stacklevel=3)


__all__ = ["IRRELEVANT", "ALWAYS_REFUSED", "refuse_if", "check_keys"]
