"""TransformerLens 4's logit lens (`transformer_lens.tools.analysis.logit_lens`): every entry of
the accumulated residual stream read through the model's final norm and unembedding (and
Gemma 2's final soft cap), so each layer answers "what would the model predict if it stopped
here?". `logit_readout` is the kernel: any [... d_model] vectors through the same path.

The logits are produced `chunk_size` rows at a time by one compiled program, so
[layers batch pos d_vocab] never exists unless the full vocabulary is asked for; the softmax
normaliser, the entropy and the targets' full-vocabulary ranks are computed per chunk.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.cache.slice import Slice, SliceInput
from jaxlens.model.layers import soft_cap

RETURN_TYPES = ("logits", "log_probs", "probs")
_VALUE_COLUMNS = {"logits": "logit", "log_probs": "log_prob", "probs": "probability"}


def _decode_nested(ids: Any, decode: Callable[[list[int]], str]) -> Any:
    ids = np.asarray(ids)
    if ids.ndim == 0:
        return str(decode([int(ids)]))
    if ids.ndim == 1:
        return [str(decode([int(i)])) for i in ids.tolist()]
    return [_decode_nested(row, decode) for row in ids]


@dataclass
class LogitReadout:
    """What `logit_readout` returns. At most one selector shapes the trailing axis of `values`:
    targets ([..., n_targets], [..., 1] per row), top_k ([..., k] with `top_ids`), vocab
    ([..., len(vocab)]); none: the full vocabulary. `entropy` [...] (nats) and `target_ranks`
    (0 = the argmax; only strictly larger logits count) are over the full vocabulary."""

    values: jax.Array
    return_type: str
    entropy: jax.Array
    top_ids: jax.Array | None = None
    vocab_ids: jax.Array | None = None
    target_ids: jax.Array | None = None
    target_ranks: jax.Array | None = None
    per_row_targets: bool = False
    applied_ln: bool = True
    applied_output_transform: bool = False

    @property
    def selected_ids(self) -> jax.Array | None:
        """Token ids along the trailing axis of `values` when it is not the full vocabulary."""
        if self.target_ids is not None:
            return self.target_ids
        if self.vocab_ids is not None:
            return self.vocab_ids
        return self.top_ids

    def row_ids(self, index: tuple[int, ...]) -> jax.Array | None:
        """Trailing-axis token ids for one row of `values` (None: the full vocabulary)."""
        if self.top_ids is not None:
            return self.top_ids[index]
        if self.target_ids is not None and self.per_row_targets:
            return self.target_ids[index].reshape(1)
        return self.selected_ids

    def decode(self, tokenizer: Any) -> Any:
        """The trailing-axis token ids as strings, keeping the leading structure."""
        decode = getattr(tokenizer, "decode", None)
        if not callable(decode):
            raise TypeError("tokenizer must provide a callable decode method")
        if self.top_ids is not None:
            return _decode_nested(self.top_ids, decode)
        if self.target_ids is not None and self.per_row_targets:
            return _decode_nested(self.target_ids, decode)
        ids = self.selected_ids
        if ids is None:
            raise ValueError("decode needs a targets, vocab or top_k readout; this one is full-vocabulary")
        return [str(decode([int(i)])) for i in np.asarray(ids).tolist()]


@dataclass
class LogitLensResult:
    """What `logit_lens` returns: the readout over the accumulated stack (leading axis = stack
    entry, aligned with `labels` such as "0_pre", "3_mid", "final_post"; then [batch pos] after
    `positions` / `batch_slice`, an int selection dropping its axis)."""

    readout: LogitReadout
    labels: list[str]
    has_batch_dim: bool
    target_names: list[str | None] | None = None

    @property
    def values(self) -> jax.Array:
        return self.readout.values

    def rank_trajectory(self, target: str | int | None = None) -> jax.Array:
        """Full-vocabulary rank of one target at every stack entry, [layer ...]: `target` is a
        string as passed to `targets`, or a token id; None when there is one target (and for
        per-row targets)."""
        ranks, ids = self.readout.target_ranks, self.readout.target_ids
        if ranks is None or ids is None:
            raise ValueError("rank_trajectory needs a lens run with targets=...")
        if self.readout.per_row_targets:
            if target is not None:
                raise ValueError("per-row targets have one target per row; call rank_trajectory()")
            return ranks[..., 0]
        if target is None:
            if ids.size != 1:
                raise ValueError("pass target= when more than one target was requested")
            return ranks[..., 0]
        if isinstance(target, str):
            names = self.target_names or []
            if target not in names:
                known = [n for n in names if n is not None]
                raise ValueError(f"unknown target {target!r}; string lookup needs the string as passed (known: "
                                 f"{known}); pass the token id otherwise")
            return ranks[..., names.index(target)]
        hits = np.nonzero(np.asarray(ids) == int(target))[0]
        if hits.size == 0:
            raise ValueError(f"token id {target} was not among the requested targets")
        return ranks[..., int(hits[0])]

    def top_tokens(self, tokenizer: Any) -> dict[str, Any]:
        """Decoded top-k tokens per stack entry, {label: nested lists}."""
        if self.readout.top_ids is None:
            raise ValueError("top_tokens needs a lens run with top_k=...")
        return {label: _decode_nested(self.readout.top_ids[i], tokenizer.decode) for i, label in enumerate(self.labels)}

    def to_dataframe(self, tokenizer: Any = None, top_k: int | None = None) -> Any:
        """One row per (stack entry, batch, position, token), as TransformerLens's: within a group
        rows are sorted by descending value (`top_k` keeps the first); a full-vocabulary "logits"
        readout has columns logit, log_prob, probability, any other one value column."""
        import pandas as pd

        values = np.asarray(self.readout.values, np.float64)
        lead = values.shape[1:-1]
        axis_names = ("batch", "pos") if self.has_batch_dim else ("pos",)
        column = _VALUE_COLUMNS[self.readout.return_type]
        frames = []
        for i, label in enumerate(self.labels):
            for idx in itertools.product(*[range(n) for n in lead]):
                row = values[(i, *idx)]
                row_ids = self.readout.row_ids((i, *idx))
                ids = np.arange(row.shape[-1]) if row_ids is None else np.asarray(row_ids)
                if row_ids is None and self.readout.return_type == "logits":
                    lp = row - row.max() - np.log(np.exp(row - row.max()).sum())
                    order = np.argsort(-lp, kind="stable")[:top_k]
                    data: dict[str, Any] = {"token_index": ids[order].tolist()}
                    if tokenizer is not None:
                        data["token_string"] = [tokenizer.decode([int(t)]) for t in ids[order]]
                    data.update(logit=row[order].tolist(), log_prob=lp[order].tolist(),
                                probability=np.exp(lp[order]).tolist())
                    frame = pd.DataFrame(data)
                else:
                    order = np.argsort(-row, kind="stable")[:top_k]
                    frame = pd.DataFrame({"token_index": ids[order].tolist()})
                    if tokenizer is not None:
                        frame["token_string"] = [tokenizer.decode([int(t)]) for t in ids[order]]
                    frame[column] = row[order].tolist()
                frame.insert(0, "layer", label)
                for axis, value in enumerate(idx):
                    frame.insert(1 + axis, axis_names[axis] if axis < len(axis_names) else f"dim{axis}", value)
                frames.append(frame)
        return pd.concat(frames, ignore_index=True)


@partial(jax.jit, static_argnames=("return_type", "mode", "top_k", "cap"))
def _read_chunk(x, W_U, b_U, sel, rows, *, return_type: str, mode: str, top_k: int | None, cap: float | None):
    """One chunk of rows x [n d_model] -> (values, entropy, ranks or None, top ids or None)."""
    logits = jnp.matmul(x, W_U, precision=jax.lax.Precision.HIGHEST) + b_U
    if cap is not None:
        logits = soft_cap(logits, cap)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    entropy = -(jnp.exp(log_probs) * log_probs).sum(-1)
    quantity = {"logits": logits, "log_probs": log_probs, "probs": jnp.exp(log_probs)}[return_type]
    ranks = top = None
    if mode == "per_row":
        target = jnp.take_along_axis(logits, rows[:, None], axis=-1)
        ranks = (logits > target).sum(-1, keepdims=True)
        values = jnp.take_along_axis(quantity, rows[:, None], axis=-1)
    elif mode == "shared":
        target = logits[:, sel][:, :, None]  # [n t 1]
        ranks = (logits[:, None, :] > target).sum(-1)
        values = quantity[:, sel]
    elif mode == "top_k":
        _, top = jax.lax.top_k(logits, top_k)
        values = jnp.take_along_axis(quantity, top, axis=-1)
    elif mode == "vocab":
        values = quantity[:, sel]
    else:
        values = quantity
    return values, entropy, ranks, top


def _check_selectors(return_type: str, vocab: Any, targets: Any, top_k: Any) -> None:
    if return_type not in RETURN_TYPES:
        raise ValueError(f"return_type must be one of {RETURN_TYPES}, got {return_type!r}")
    if sum(x is not None for x in (vocab, targets, top_k)) > 1:
        raise ValueError("pass at most one of vocab, targets and top_k")


def _shared_items(targets: Any) -> list[Any]:
    """Shared targets as a list: a bare token (string, id, 0-d array) is a list of one."""
    return [targets] if isinstance(targets, (str, int, np.integer)) or np.ndim(targets) == 0 else list(targets)


def _token_list(cache: Any, targets: Any) -> list[int]:
    """Shared targets (a single-token string or id, or a sequence of them) -> ids."""
    items = _shared_items(targets)
    if not items:
        raise ValueError("targets must contain at least one token")
    out = []
    for t in items:
        if isinstance(t, (bool, np.bool_)):
            raise ValueError(f"token {t!r} must be a string or integer token id, not bool")
        if not isinstance(t, (str, int, np.integer)) and not (np.ndim(t) == 0 and np.issubdtype(np.asarray(t).dtype, np.integer)):
            raise TypeError(f"tokens must be strings or integer token ids, got {type(t).__name__}")
        out.append(int(cache._token_ids(t if isinstance(t, str) else int(t), "targets")[0]))
    return out


def _per_row(targets: Any) -> bool:
    return hasattr(targets, "shape") and not isinstance(targets, (str, int)) and np.ndim(targets) >= 1


def logit_readout(cache: Any, vectors: Any, *, apply_ln: bool = True, vocab: Sequence[int] | Any = None,
                  targets: Any = None, return_type: str = "logits", top_k: int | None = None, chunk_size: int = 64,
                  enable_grad: bool = False) -> LogitReadout:
    """Read vectors [... d_model] through the final norm (recomputed statistics per vector, when
    `apply_ln`), W_U, b_U and the final soft cap (Gemma 2), using `cache`'s weights and config.

    `targets`: shared (a single-token string or id, or a list of them) or, as an integer array
    of ndim >= 1, per row (right-aligned and broadcast to the vectors' leading dims; the
    trailing axis of `values` then has length 1). `enable_grad` is accepted for TransformerLens's
    signature: in JAX, differentiate the function that calls this (no mode to switch).
    """
    del enable_grad
    cfg = cache._need_cfg("logit_readout")
    _check_selectors(return_type, vocab, targets, top_k)
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    missing = [k for k in ("W_U", "b_U") if k not in cache.weights]
    if missing:
        raise ValueError(f"logit_readout needs the unembedding ({missing}): use a cache from "
                         "HookedTransformer.run_with_cache, which carries it")
    W_U, b_U = cache.weights["W_U"], cache.weights["b_U"]
    d_vocab = int(W_U.shape[1])
    vectors = jnp.asarray(vectors)
    if not jnp.issubdtype(vectors.dtype, jnp.floating):
        raise TypeError("vectors must be a floating-point array")
    if vectors.ndim == 0 or vectors.shape[-1] != cfg.d_model:
        raise ValueError(f"vectors must end in d_model={cfg.d_model}, got shape {tuple(vectors.shape)}")
    if vectors.size == 0:
        raise ValueError(f"vectors has no rows to read (shape {tuple(vectors.shape)})")
    if top_k is not None and not (isinstance(top_k, (int, np.integer)) and 1 <= top_k <= d_vocab):
        raise ValueError(f"top_k must be in [1, {d_vocab}], got {top_k!r}")
    lead = tuple(vectors.shape[:-1])

    def ids_of(x: Any, name: str) -> np.ndarray:
        a = np.asarray(x)
        if not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"{name} must hold integer token ids, got dtype {a.dtype}")
        a = a.astype(np.int32)
        if a.size == 0 or a.min() < 0 or a.max() >= d_vocab:
            raise ValueError(f"{name} ids must be within [0, {d_vocab})")
        return a

    vocab_ids = None if vocab is None else ids_of(vocab, "vocab").reshape(-1)
    per_row = targets is not None and _per_row(targets)
    target_ids = rows = None
    if per_row:
        t = ids_of(targets, "targets")
        if t.ndim > len(lead):
            raise ValueError(f"per-row targets of shape {t.shape} have more dims than the vectors' leading dims {lead}")
        try:
            target_ids = np.broadcast_to(t.reshape((1,) * (len(lead) - t.ndim) + t.shape), lead)
        except ValueError:
            raise ValueError(f"per-row targets of shape {t.shape} do not broadcast to the vectors' leading dims "
                             f"{lead}; they are right-aligned, so a per-example target over several positions "
                             "must be shaped [batch, 1]") from None
        rows = target_ids.reshape(-1)
    elif targets is not None:
        target_ids = np.asarray(_token_list(cache, targets), np.int32)
    mode = ("per_row" if per_row else "shared" if target_ids is not None else "top_k" if top_k is not None
            else "vocab" if vocab_ids is not None else "full")
    sel = jnp.asarray(target_ids if mode == "shared" else vocab_ids if mode == "vocab" else np.zeros(1, np.int32))
    flat = vectors.reshape(-1, cfg.d_model)
    if apply_ln:
        flat = cache.apply_ln_to_stack(flat[:, None], layer=None, has_batch_dim=False, recompute_ln=True)[:, 0]
    n = flat.shape[0]
    size = int(min(chunk_size, n))
    pad = -n % size
    flat = jnp.pad(flat, ((0, pad), (0, 0))).astype(W_U.dtype)
    rows_all = np.pad(rows if rows is not None else np.zeros(n, np.int32), (0, pad))
    outs = [_read_chunk(flat[s:s + size], W_U, b_U, sel, jnp.asarray(rows_all[s:s + size]), return_type=return_type,
                        mode=mode, top_k=None if top_k is None else int(top_k), cap=cfg.output_logits_soft_cap)
            for s in range(0, n + pad, size)]

    def cat(i: int) -> jax.Array | None:
        return None if outs[0][i] is None else jnp.concatenate([o[i] for o in outs])[:n]

    values, entropy, ranks, top = (cat(i) for i in range(4))
    return LogitReadout(
        values=values.reshape(*lead, -1), return_type=return_type, entropy=entropy.reshape(lead),
        top_ids=None if top is None else top.reshape(*lead, -1),
        vocab_ids=None if vocab_ids is None else jnp.asarray(vocab_ids),
        target_ids=None if target_ids is None else jnp.asarray(target_ids),
        target_ranks=None if ranks is None else ranks.reshape(*lead, -1), per_row_targets=per_row,
        applied_ln=bool(apply_ln), applied_output_transform=cfg.output_logits_soft_cap is not None)


def _residual_names(n_layers: int, incl_mid: bool) -> list[str]:
    names = []
    for layer in range(n_layers):
        names.append(f"blocks.{layer}.hook_resid_pre")
        if incl_mid:
            names.append(f"blocks.{layer}.hook_resid_mid")
    return names + [f"blocks.{n_layers - 1}.hook_resid_post"]


def logit_lens(model: Any, input: Any = None, *, cache: Any = None, layers: Sequence[int] | None = None,
               incl_mid: bool = False, positions: SliceInput = -1, batch_slice: SliceInput = None,
               lens: Callable[[jax.Array, int], jax.Array] | None = None, apply_ln: bool = True, vocab: Any = None,
               targets: Any = None, return_type: str = "logits", top_k: int | None = None, chunk_size: int = 64,
               enable_grad: bool = False) -> LogitLensResult:
    """TransformerLens 4's `logit_lens`: `model` is a HookedTransformer (with `input` to run, only
    the residual hooks cached, or `cache=`) or an ActivationCache. The stack is
    `accumulated_resid(incl_mid=, pos_slice=positions)`; `layers` indexes its entries (negative
    allowed); `batch_slice` selects examples; `lens(entry, index)` maps each entry before the
    norm (a tuned lens); the rest is `logit_readout`. The last entry reproduces the model's
    logits (its log-probabilities when weights were processed: center_unembed shifts logits)."""
    from jaxlens.cache.activation_cache import ActivationCache

    if isinstance(model, ActivationCache):
        if input is not None or cache is not None:
            raise ValueError("pass either a cache or a model with input, not both")
        cache = model
    elif cache is None:
        if input is None:
            raise ValueError("logit_lens needs an input to run or a cache to read")
        _, cache = model.run_with_cache(input, names_filter=_residual_names(model.cfg.n_layers, incl_mid))
    if incl_mid and cache.cfg.parallel_attn_mlp:
        raise ValueError("incl_mid=True needs hook_resid_mid, which a parallel block has not; use incl_mid=False")
    _check_selectors(return_type, vocab, targets, top_k)  # cheap checks before the stack is built
    pos = positions if isinstance(positions, Slice) else Slice(positions)
    batch = batch_slice if isinstance(batch_slice, Slice) else Slice(batch_slice)
    stack, labels = cache.accumulated_resid(layer=None, incl_mid=incl_mid, apply_ln=False, pos_slice=pos,
                                            return_labels=True)
    keep = []
    for layer in range(len(labels)) if layers is None else layers:
        i = int(layer) + len(labels) if int(layer) < 0 else int(layer)
        if not 0 <= i < len(labels):
            raise ValueError(f"layer {layer} is out of range for the accumulated stack; valid entries are "
                             f"0..{len(labels) - 1} = {labels}")
        keep.append(i)
    stack = stack[np.asarray(keep, np.int32)]
    labels = [labels[i] for i in keep]
    if cache.has_batch_dim:
        stack = batch.apply(stack, dim=1)
    has_batch_dim = cache.has_batch_dim and batch.mode != "int"
    if lens is not None:
        stack = jnp.stack([lens(stack[i], keep[i]) for i in range(stack.shape[0])])
    readout = logit_readout(cache, stack, apply_ln=apply_ln, vocab=vocab, targets=targets, return_type=return_type,
                            top_k=top_k, chunk_size=chunk_size, enable_grad=enable_grad)
    names = None
    if targets is not None and not _per_row(targets):
        names = [t if isinstance(t, str) else None for t in _shared_items(targets)]
    return LogitLensResult(readout=readout, labels=labels, has_batch_dim=has_batch_dim, target_names=names)


__all__ = ["RETURN_TYPES", "LogitReadout", "LogitLensResult", "logit_readout", "logit_lens"]
