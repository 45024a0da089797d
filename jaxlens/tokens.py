"""Text <-> tokens, and the input checks every entry point shares (JAX gathers clamp silently)."""

from __future__ import annotations

import json
import warnings

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jaxlens.config import ModelConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model")


# `tokenizer_class` values that name transformers' generic tokenizers.json tokenizer, and the
# model types for which AutoTokenizer then returns exactly that class (checked against
# AutoTokenizer for each type by tests/test_tokens.py). For these folders load_tokenizer builds the
# class directly: AutoTokenizer's auto machinery imports torch (~1.8 s of every CLI run) only to
# arrive at the same object. Types AutoTokenizer remaps (qwen2, phi3: its "incorrect hub class"
# list) go through AutoTokenizer.
GENERIC_TOKENIZER_CLASSES = frozenset({"PreTrainedTokenizerFast", "TokenizersBackend"})
GENERIC_TOKENIZER_TYPES = frozenset({"gemma", "gemma2", "gemma3_text", "gpt2", "gpt_neox", "llama", "mistral",
                                     "mixtral", "olmo2", "qwen3", "qwen3_moe"})


def _generic_fast(path: Path) -> bool:
    """Would AutoTokenizer load `path` as the generic fast tokenizer (see GENERIC_TOKENIZER_TYPES)?"""
    try:
        tok_cfg = json.loads((path / "tokenizer_config.json").read_bytes())
        model_type = json.loads((path / "config.json").read_bytes()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return False
    return ((path / "tokenizer.json").is_file() and isinstance(tok_cfg, dict) and "auto_map" not in tok_cfg
            and tok_cfg.get("tokenizer_class") in GENERIC_TOKENIZER_CLASSES and model_type in GENERIC_TOKENIZER_TYPES)


def load_tokenizer(path: str | Path) -> Any | None:
    """The HF tokenizer saved in `path` (what `AutoTokenizer.from_pretrained` gives), or None if
    the folder holds none."""
    path = Path(path)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    from jaxlens.conversion.io import CheckpointError

    for f in TOKENIZER_FILES:  # a damaged JSON file: name it (transformers' own error does not)
        if f.endswith(".json") and (path / f).is_file():
            try:
                json.loads((path / f).read_bytes().decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"tokenizer file {path / f} is not valid UTF-8 JSON ({e}); re-save the "
                                      "tokenizer with save_pretrained, or pass tokenizer=...") from e
    try:
        if _generic_fast(path):
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(path))
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many kinds; all mean the saved tokenizer is unusable
        present = [f for f in TOKENIZER_FILES if (path / f).is_file()]
        raise CheckpointError(f"cannot load the tokenizer saved in {path} (files {present}): {type(e).__name__}: "
                              f"{e}; re-save it with save_pretrained, or pass tokenizer=...") from e


def host_array(x: Any, name: str) -> np.ndarray:
    """`x` as a numpy array for the host-side checks, with the fix named when it cannot be one:
    a traced value (these entry points run on the host: under jit/vmap call `jaxlens.forward` or
    `jaxlens.forward_jit`, which take traced tokens) or a ragged list (pad it: `model.to_tokens`
    pads text, or pad token lists yourself and pass an attention_mask)."""
    import jax

    if isinstance(x, jax.core.Tracer):
        raise TypeError(f"{name} is a traced value (inside jax.jit / vmap / grad): HookedTransformer methods check "
                        "their inputs on the host and cannot be traced; under a transformation call "
                        "jaxlens.forward(params, cfg, tokens, mask, ...) or jaxlens.forward_jit instead")
    try:
        return np.asarray(x)
    except ValueError as e:
        raise ValueError(f"{name} is a ragged list (rows of different lengths) and cannot be a [batch pos] array: "
                         "pad the rows to one length and pass an attention_mask (0 = padding), or give text to "
                         "model.to_tokens, which pads for you") from e


def check_tokens(tokens: Any, cfg: ModelConfig, attention_mask: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Validate token ids and mask; returns int32 [batch pos] tokens and mask.

    Raises ValueError naming the problem: empty input, wrong rank, non-integer ids, ids
    outside [0, d_vocab), sequences longer than n_ctx, a mask of another shape.
    """
    t = host_array(tokens, "tokens")
    if t.dtype == object:
        raise ValueError(f"tokens must be integer ids, got {type(tokens).__name__} holding non-numbers")
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2:
        raise ValueError(f"tokens must be [batch pos] (or [pos]); got shape {t.shape}")
    if t.size == 0:
        raise ValueError(f"tokens are empty (shape {t.shape}); give at least one token")
    if not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"tokens must be integers, got dtype {t.dtype}")
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= cfg.d_vocab:
        bad = lo if lo < 0 else hi
        where = tuple(int(i) for i in np.argwhere(t == bad)[0])
        raise ValueError(f"token id {bad} at {where} is outside the vocabulary [0, {cfg.d_vocab}); "
                         "check the tokenizer matches the model")
    if t.shape[1] > cfg.n_ctx:
        raise ValueError(f"sequence length {t.shape[1]} exceeds the model's context n_ctx={cfg.n_ctx}; "
                         "truncate the input")
    if attention_mask is None:
        m = np.ones(t.shape, np.int32)
    else:
        m = host_array(attention_mask, "attention_mask")
        if m.ndim == 1:
            m = m[None]
        if m.shape != t.shape:
            raise ValueError(f"attention_mask shape {m.shape} differs from tokens shape {t.shape}")
        if not np.isin(m, (0, 1)).all():
            raise ValueError("attention_mask must hold only 0 and 1")
        m = m.astype(np.int32)
    return t.astype(np.int32), m


def warn_empty_rows(mask: Any) -> None:
    """Warn if a run's attention_mask has rows of all 0 (no real token: zero attention patterns and
    meaningless outputs). Not part of `check_tokens`: a KV-cache chunk of left padding is such a row."""
    m = np.asarray(mask)
    empty = np.flatnonzero(m.reshape(-1, m.shape[-1]).sum(axis=1) == 0) if m.size else np.array([], int)
    if empty.size:
        warnings.warn(f"attention_mask row(s) {empty[:8].tolist()} are all 0: those rows have no real token, so "
                      "their attention patterns are all zero and their outputs mean nothing", stacklevel=4)


def is_text(input: Any) -> bool:
    """Is `input` a string or a non-empty list of strings (rather than token ids)?"""
    return isinstance(input, str) or (isinstance(input, (list, tuple)) and len(input) > 0
                                      and all(isinstance(s, str) for s in input))


def parse_input(tokenizer: Any, input: Any, cfg: ModelConfig, attention_mask: Any = None,
                prepend_bos: bool | None = None, padding_side: str = "right", *,
                truncate: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The one input path of every run method: text (a string or strings) or token ids (and an
    optional mask) -> checked int32 [batch pos] tokens and mask (see `encode`, `check_tokens`)."""
    if is_text(input):
        if attention_mask is not None:
            raise ValueError("attention_mask is computed from text input; pass it only with token ids")
        toks, mask = encode(tokenizer, input, cfg, prepend_bos, padding_side, truncate=truncate)
    else:
        if isinstance(input, (list, tuple)) and len(input) == 0:
            raise ValueError("input is empty: give a string, a list of strings or token ids")
        toks, mask = input, attention_mask
    return check_tokens(toks, cfg, mask)


def encode(tokenizer: Any, text: str | Sequence[str], cfg: ModelConfig, prepend_bos: bool | None = None,
           padding_side: str = "right", *, truncate: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize a string or list of strings to padded [batch pos] tokens and mask.

    BOS is added by us (not the tokenizer), once, when `prepend_bos` (default: the family's
    `default_prepend_bos`, as TransformerLens has it). With `truncate`, sequences longer than
    `n_ctx` keep their first `n_ctx` tokens and a warning says how many were dropped.
    """
    if truncate:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        toks, mask = encode(tokenizer, text, cfg, prepend_bos, "right")
        return _truncate(toks, mask, cfg.n_ctx, padding_side)
    if tokenizer is None:
        raise ValueError("this model has no tokenizer (none was saved beside it): pass token ids instead of text")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    texts = [text] if isinstance(text, str) else list(text)
    if not texts:
        raise ValueError("input is an empty list of strings")
    if not all(isinstance(s, str) for s in texts):
        raise ValueError("text input must be a string or a list of strings")
    prepend_bos = cfg.default_prepend_bos if prepend_bos is None else prepend_bos
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else cfg.bos_token_id
    if prepend_bos and bos is None:
        raise ValueError("prepend_bos=True but the tokenizer has no BOS token; pass prepend_bos=False")
    seqs = []
    for s in texts:
        ids = list(tokenizer(s, add_special_tokens=False)["input_ids"])
        seqs.append(([bos] if prepend_bos else []) + ids)
    if any(len(s) == 0 for s in seqs):
        raise ValueError("an input string encodes to no tokens (empty string without BOS)")
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    n = max(len(s) for s in seqs)
    toks = np.full((len(seqs), n), pad, np.int32)
    mask = np.zeros((len(seqs), n), np.int32)
    for i, s in enumerate(seqs):
        sl = slice(n - len(s), n) if padding_side == "left" else slice(0, len(s))
        toks[i, sl] = s
        mask[i, sl] = 1
    return toks, mask


def _truncate(toks: np.ndarray, mask: np.ndarray, n_ctx: int, padding_side: str) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded rows cut to their first `n_ctx` tokens (a warning says how many went), then
    padded on `padding_side`."""
    lengths = mask.sum(axis=1)
    dropped = int(np.maximum(lengths - n_ctx, 0).sum())
    if dropped:
        long = int((lengths > n_ctx).sum())
        warnings.warn(f"to_tokens: {dropped} token(s) past the model's context n_ctx={n_ctx} were dropped from "
                      f"{long} sequence(s), as TransformerLens truncates; pass truncate=False for an error instead",
                      stacklevel=5)
        toks, mask = toks[:, :n_ctx], mask[:, :n_ctx]
    if padding_side == "left":
        shift = mask.shape[1] - mask.sum(axis=1)
        toks = np.stack([np.roll(t, s) for t, s in zip(toks, shift)])
        mask = np.stack([np.roll(m, s) for m, s in zip(mask, shift)])
    return toks, mask

__all__ = ["TOKENIZER_FILES", "load_tokenizer", "host_array", "check_tokens", "warn_empty_rows", "is_text", "parse_input", "encode"]
