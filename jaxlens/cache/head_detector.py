"""Head detector: score every attention head against an expected attention pattern (TransformerLens).

`detect_head(model, seq, "induction_head")` runs the prompt, reads every layer's `hook_pattern` and
returns [n_layers n_heads] scores, as TransformerLens's `head_detector.detect_head`. The built-in
patterns are "previous_token_head", "duplicate_token_head" and "induction_head"; any lower-
triangular [pos pos] array works as a custom one. All heads are scored in one array expression
(TransformerLens loops over heads); the heads not asked for get -1, as there.

Error measures (TransformerLens's): "mul" = attention mass on the pattern's 1s, sum(A * P) / sum(A);
"abs" = 1 - round(sum|A - P| / pos, 3), which is 1 for a perfect match. Scores are float32.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

HEAD_NAMES = ("previous_token_head", "duplicate_token_head", "induction_head")
ERROR_MEASURES = ("abs", "mul")
Heads = Union[Sequence[tuple[int, int]], Mapping[int, Sequence[int]], None]

__all__ = ["detect_head", "HEAD_NAMES", "get_previous_token_head_detection_pattern",
           "get_duplicate_token_head_detection_pattern", "get_induction_head_detection_pattern",
           "get_supported_heads", "compute_head_attention_similarity_score"]


def _flat_tokens(tokens: Any) -> np.ndarray:
    t = np.asarray(tokens)
    if t.ndim == 2 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 1:
        raise ValueError(f"tokens must be [pos] or [1 pos] (one prompt), got shape {t.shape}")
    return t


def get_previous_token_head_detection_pattern(tokens: Any) -> jax.Array:
    """[pos pos] with 1s just below the diagonal: each token attends to the one before it."""
    n = _flat_tokens(tokens).shape[0]
    return jnp.asarray(np.eye(n, k=-1, dtype=np.float32))


def _duplicates(tokens: Any) -> np.ndarray:
    t = _flat_tokens(tokens)
    same = (t[:, None] == t[None, :]) & ~np.eye(t.shape[0], dtype=bool)
    return np.tril(same).astype(np.float32)


def get_duplicate_token_head_detection_pattern(tokens: Any) -> jax.Array:
    """[pos pos]: 1 where an earlier token equals the current one (not the token itself)."""
    return jnp.asarray(_duplicates(tokens))


def get_induction_head_detection_pattern(tokens: Any) -> jax.Array:
    """[pos pos]: 1 at the token just after an earlier copy of the current token (the duplicate
    pattern shifted one key to the right, nothing in the first column)."""
    dup = _duplicates(tokens)
    shifted = np.zeros_like(dup)
    shifted[:, 1:] = dup[:, :-1]
    return jnp.asarray(np.tril(shifted))


_BUILTIN = {"previous_token_head": get_previous_token_head_detection_pattern,
            "duplicate_token_head": get_duplicate_token_head_detection_pattern,
            "induction_head": get_induction_head_detection_pattern}


def get_supported_heads() -> None:
    """Print the built-in pattern names."""
    print(f"Supported heads: {list(HEAD_NAMES)}")


def _keep_mask(n: int, exclude_bos: bool, exclude_current_token: bool) -> np.ndarray:
    """[n n] True where attention counts: not the BOS column / not the diagonal when excluded."""
    keep = np.ones((n, n), bool)
    if exclude_bos:
        keep[:, 0] = False
    if exclude_current_token:
        keep &= ~np.eye(n, dtype=bool)
    return keep


@partial(jax.jit, static_argnames="error_measure")
def _scores(patterns: jax.Array, detection: jax.Array, keep: jax.Array, error_measure: str) -> jax.Array:
    """Raw scores over any leading dims of `patterns` [... q k] against `detection` [q k]; one program
    per shape and measure (the exclusions are a traced mask)."""
    p = patterns.astype(jnp.float32)
    d = detection.astype(jnp.float32)
    if error_measure == "mul":
        p = jnp.where(keep, p, 0.0)
        return (p * d).sum((-1, -2)) / p.sum((-1, -2))
    diff = jnp.where(keep, jnp.abs(p - d), 0.0)
    return diff.mean((-1, -2)) * p.shape[-1]  # the raw error; `_finish` turns it into TransformerLens's score


def _finish(raw: Any, error_measure: str) -> np.ndarray:
    """Host-side last step. For "abs", TransformerLens's 1 - round(error, 3), rounded in float64 as
    Python's round does (rounding the float32 value could land on the other side of a half)."""
    raw = np.asarray(raw, np.float64)
    return raw if error_measure == "mul" else 1.0 - np.round(raw, 3)


def compute_head_attention_similarity_score(attention_pattern: Any, detection_pattern: Any, *, exclude_bos: bool,
                                            exclude_current_token: bool, error_measure: str) -> float:
    """Score one head's [q k] pattern against `detection_pattern` (TransformerLens's function)."""
    a = jnp.asarray(attention_pattern)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"attention_pattern must be a square [q_pos k_pos] matrix, got shape {a.shape}")
    _check_measure(error_measure)
    keep = _keep_mask(a.shape[-1], exclude_bos, exclude_current_token)
    raw = _scores(a, jnp.asarray(detection_pattern), keep, error_measure)
    return float(_finish(raw, error_measure))


def _check_measure(error_measure: str) -> None:
    if error_measure not in ERROR_MEASURES:
        raise ValueError(f"error_measure must be one of {ERROR_MEASURES}, got {error_measure!r}")


def _layer_heads(heads: Heads, n_layers: int, n_heads: int) -> dict[int, list[int]]:
    """{layer: [heads]} from None (all), a list of (layer, head) pairs, or a {layer: heads} mapping."""
    if heads is None:
        return {l: list(range(n_heads)) for l in range(n_layers)}
    if isinstance(heads, Mapping):
        pairs = [(l, h) for l, hs in heads.items() for h in hs]
    else:
        pairs = list(heads)
    out: dict[int, list[int]] = {}
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"heads must be (layer, head) pairs or a {{layer: [heads]}} mapping; got item {pair!r}")
        l, h = pair
        if not (0 <= int(l) < n_layers):
            raise ValueError(f"heads: layer {l} is out of range: the model has layers 0..{n_layers - 1}")
        if not (0 <= int(h) < n_heads):
            raise ValueError(f"heads: head {h} (layer {l}) is out of range: each layer has heads 0..{n_heads - 1}")
        out.setdefault(int(l), []).append(int(h))
    return out


def _prompt_tokens(model: Any, seq: Any) -> np.ndarray:
    if isinstance(seq, str):
        return np.asarray(model.to_tokens(seq))[0]
    return _flat_tokens(seq)


def _layer_patterns(model: Any, tokens: np.ndarray, cache: Any, layers: Sequence[int]) -> list[jax.Array]:
    """[n_heads q k] pattern of each layer, from `cache` (batch of one, or batch dim removed) or a run."""
    names = [f"blocks.{l}.attn.hook_pattern" for l in layers]
    if cache is None:
        _, cache = model.run_with_cache(tokens[None], names_filter=names)
    out = []
    for name in names:
        if name not in cache:
            raise ValueError(f"cache has no {name!r}: run the prompt with run_with_cache and a names_filter that "
                             "includes every layer's hook_pattern, or pass cache=None")
        p = jnp.asarray(cache[name])
        if p.ndim == 4:
            if p.shape[0] != 1:
                raise ValueError(f"cache[{name!r}] has batch size {p.shape[0]}; detect_head takes a cache of one "
                                 "prompt (batch 1, or run_with_cache(..., remove_batch_dim=True))")
            p = p[0]
        if p.ndim != 3 or p.shape[-1] != tokens.shape[0] or p.shape[-2] != tokens.shape[0]:
            raise ValueError(f"cache[{name!r}] has shape {p.shape}, which does not fit the prompt's {tokens.shape[0]} "
                             "tokens: the cache must come from this same prompt")
        out.append(p)
    return out


def detect_head(model: Any, seq: Union[str, Sequence[str], Any], detection_pattern: Union[str, Any],
                heads: Heads = None, cache: Any = None, *, exclude_bos: bool = False,
                exclude_current_token: bool = False, error_measure: str = "mul") -> jax.Array:
    """Score every attention head (or the given `heads`; the others get -1): [n_layers n_heads].

    `seq` is a prompt (a string, tokenized with the model's default BOS, or its token ids); a list
    of strings averages the scores of each prompt (built-in patterns only, and without `cache`).
    `detection_pattern` is a name in HEAD_NAMES or a lower-triangular [pos pos] array. `cache`
    (from `run_with_cache` on this prompt) saves the forward pass.
    """
    cfg = model.cfg
    _check_measure(error_measure)
    if isinstance(detection_pattern, str) and detection_pattern not in HEAD_NAMES:
        raise ValueError(f"unknown detection_pattern {detection_pattern!r}: use one of {list(HEAD_NAMES)} or a "
                         "lower-triangular [pos pos] array")
    if isinstance(seq, (list, tuple)) and seq and all(isinstance(s, str) for s in seq):
        if not isinstance(detection_pattern, str):
            raise ValueError("a custom detection_pattern is [pos pos] for one prompt: pass one string as seq "
                             "(a built-in pattern name can be averaged over a list of prompts)")
        if cache is not None:
            raise ValueError("cache holds one prompt's activations, so it cannot be used with a list of prompts: "
                             "pass one prompt at a time, or cache=None")
        return jnp.stack([detect_head(model, s, detection_pattern, heads, exclude_bos=exclude_bos,
                                      exclude_current_token=exclude_current_token, error_measure=error_measure)
                          for s in seq]).mean(0)
    tokens = _prompt_tokens(model, seq)
    n = tokens.shape[0]
    if not 1 < n <= cfg.n_ctx:
        raise ValueError(f"the prompt has {n} tokens; detect_head needs 2..n_ctx={cfg.n_ctx}")
    pattern = np.asarray(_BUILTIN[detection_pattern](tokens) if isinstance(detection_pattern, str)
                         else detection_pattern, np.float32)
    if pattern.shape != (n, n):
        raise ValueError(f"detection_pattern has shape {pattern.shape}, but the prompt has {n} tokens: it must be "
                         f"[{n} {n}] (check prepend_bos: the prompt is tokenized with the model's default)")
    if np.any(np.triu(pattern, 1) != 0):
        raise ValueError("detection_pattern must be lower triangular (a query cannot attend to later keys)")
    if error_measure == "mul" and not np.all((pattern == 0) | (pattern == 1)):
        logging.warning("Using detection pattern with values other than 0 or 1 with error_measure 'mul'")
    layer_heads = _layer_heads(heads, cfg.n_layers, cfg.n_heads)
    layers = sorted(layer_heads)
    patterns = jnp.stack(_layer_patterns(model, tokens, cache, layers))  # [layers head q k]
    raw = _scores(patterns, pattern, _keep_mask(n, exclude_bos, exclude_current_token), error_measure)
    every = _finish(raw, error_measure)  # all heads of those layers in one program; keep the asked ones
    scores = np.full((cfg.n_layers, cfg.n_heads), -1.0, np.float32)
    for i, l in enumerate(layers):
        scores[l, layer_heads[l]] = every[i, layer_heads[l]]
    return jnp.asarray(scores)
