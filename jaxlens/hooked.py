"""HookedTransformer: TransformerLens's user-facing API over the functional JAX model."""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.cache.activation_cache import ActivationCache
from jaxlens.config import ModelConfig
from jaxlens.devices import resolve_device
from jaxlens.distributed import batch_multiple, batch_sharding, make_mesh, pad_batch, place, shard_params
from jaxlens.model.forward import forward_jit, is_scanned, resolve_layer_range, stack_layers, unstack_layers
from jaxlens.edits.hook_points import (CachingHook, CachingPlan, HookPointRef, StoredHook, check_dir, compose, removable,
                                      without_name)
from jaxlens.hooks import Hooks, NamesFilter, hook_names, make_hooks, pos_axis, resolve_names
from jaxlens.model import Transformer
from jaxlens.model.layers import repeat_kv
from jaxlens.model.views import BlocksView, EmbedView, NormView, PosEmbedView, UnembedView
from jaxlens.tokens import check_tokens, encode, is_text, load_tokenizer, parse_input, warn_empty_rows
from jaxlens.validate import check_precision, index

if TYPE_CHECKING:
    from jaxlens.model.factored_matrix import FactoredMatrix

RETURN_TYPES = ("logits", "loss", "both", None)
SAVE_FORMATS = ("safetensors", "orbax")


def lm_loss(logits: jax.Array, tokens: jax.Array, attention_mask: jax.Array | None = None,
            per_token: bool = False) -> jax.Array:
    """Next-token cross entropy (TransformerLens `lm_cross_entropy_loss`): the mean over predicted
    positions, or [batch pos-1] with `per_token`. With `attention_mask`, positions whose token or
    next token is padding are left out of the mean and are 0 per token, as in TransformerLens."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    if attention_mask is None:
        return nll if per_token else nll.mean()
    m = (attention_mask[:, 1:] * attention_mask[:, :-1]).astype(jnp.float32)
    if per_token:
        return jnp.where(m > 0, nll, 0.0)
    return (nll * m).sum() / jnp.maximum(m.sum(), 1.0)


_lm_loss_jit = jax.jit(lm_loss, static_argnames=("per_token",))


def _platform(params: dict[str, Any]) -> str:
    """The platform ("cpu", "gpu", "tpu") the parameters live on (the default one for numpy)."""
    w = params.get("W_E")
    if isinstance(w, jax.core.Tracer) or not callable(getattr(w, "devices", None)):
        return jax.default_backend()  # traced params (a hook reading the model) or numpy ones
    return next(iter(w.devices())).platform


def _switch(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"set_{name} takes True or False, got {value!r}")
    return bool(value)


def tokenizer_prepends_bos(tokenizer: Any) -> bool | None:
    """Does the tokenizer add BOS by itself (TransformerLens's test: encode "a", look for a
    leading BOS/CLS)? None without a tokenizer. jaxlens adds BOS itself either way."""
    if tokenizer is None:
        return None
    ids = list(tokenizer.encode("a"))
    lead = {t for t in (tokenizer.bos_token_id, getattr(tokenizer, "cls_token_id", None)) if t is not None}
    return len(ids) > 1 and ids[0] in lead


def _batchless(fn: Any) -> Any:
    """`run_with_hooks(remove_batch_dim=True)`: fn sees a leading axis of 1 squeezed away."""
    def wrapped(x, hook):
        if x.shape[0] != 1:
            return fn(x, hook=hook)
        out = fn(x[0], hook=hook)
        return out[None] if out is not None and out.ndim == x.ndim - 1 else out
    return wrapped


def _pos_sliced(acts: dict[str, Any], pos_slice: Any) -> dict[str, Any]:
    """`run_with_cache(pos_slice=...)`: every activation sliced along its position axis."""
    from jaxlens.cache.slice import Slice

    sl = Slice.unwrap(pos_slice)
    out = {}
    for name, x in acts.items():
        axis = pos_axis(name) if x.ndim >= 2 else 0
        if axis is None:
            raise ValueError(f"pos_slice cannot slice {name}: MoE router hooks hold the routed tokens flattened "
                             "[batch*pos ...]; leave them out of names_filter, or slice them after reshaping")
        out[name] = sl.check(x.shape[axis], f"pos_slice for {name}").apply(x, axis) if x.ndim >= 2 else x
    return out


class HookedTransformer:
    """A converted model: `cfg`, `params` (a pytree), the linen `module`, and a `tokenizer`.

    Calls are jit-compiled and cached per configuration and shape. `precision` is the matmul
    precision ("highest" for parity work; None keeps the backend default, which on TPU is bf16).
    """

    def __init__(self, cfg: ModelConfig, params: dict[str, Any], tokenizer: Any = None, *,
                 precision: str | None = "highest", device: Any = None, mesh: Any = None):
        check_precision(precision)
        if mesh is not None and device is not None:
            raise ValueError("pass device= or mesh=, not both: a mesh places the parameters itself")
        self.mesh = None if mesh is None else make_mesh(mesh)
        if self.mesh is not None:  # parameters sharded over the mesh (jaxlens.distributed)
            params = shard_params(params, cfg, self.mesh)
        self.params = params if device is None else jax.device_put(params, resolve_device(device))
        self.tokenizer = tokenizer
        self.precision = precision
        self.cfg = cfg
        self._stored_hooks: tuple[StoredHook, ...] = ()  # model.add_hook / model.hooks(...), in order
        self.is_caching = False  # TransformerLens's flag: set once caching hooks were made
        self._n_params_total: int | None = None  # the source checkpoint's count, set by from_pretrained
        self.context_level = 0

    @property
    def cfg(self) -> ModelConfig:
        """The config, with TransformerLens's runtime fields (`device`, `dtype`,
        `tokenizer_prepends_bos`) read off the current params and tokenizer."""
        c = self._cfg
        tok = self.__dict__.get("tokenizer")
        bos = self.__dict__.get("_bos_memo", (None, None))
        if bos[0] is not tok:
            bos = (tok, tokenizer_prepends_bos(tok))
            self._bos_memo = bos
        now = dict(device=_platform(self.params), dtype=jnp.dtype(self.params["W_E"].dtype),
                   tokenizer_prepends_bos=bos[1])
        if any(getattr(c, k) != v for k, v in now.items()):
            c = self._cfg = c.replace(**now)
        return c

    @cfg.setter
    def cfg(self, value: ModelConfig) -> None:
        self._cfg = value

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: Any = "float32", *, scan_layers: bool = False,
                        precision: str | None = "highest", tokenizer: Any = None, fold_ln: bool = True,
                        center_writing_weights: bool = True, center_unembed: bool = True,
                        fold_value_biases: bool = True, refactor_factored_attn_matrices: bool = False,
                        device: Any = None, allow_nonfinite: bool = False, mesh: Any = None) -> "HookedTransformer":
        """Load a checkpoint with TransformerLens's default weight processing, as its
        `HookedTransformer.from_pretrained` and TL 4's `enable_compatibility_mode()` do: fold_ln,
        center_writing_weights, center_unembed and fold_value_biases (see `jaxlens.processing`).

        Each step applies where TransformerLens applies it: RMSNorm models get fold_ln and
        center_unembed but no centring of writing weights; value biases fold only where they exist.
        Log-probabilities are unchanged, but logits move by a constant per position and activations
        are in TransformerLens's processed basis, not HF's: use `from_pretrained_no_processing` (or
        pass the flags as False) to compare with HF PyTorch or an unprocessed TL bridge.
        `refactor_factored_attn_matrices` and `device` are TransformerLens's arguments.
        `allow_nonfinite` loads weights holding NaN/inf (an error by default). `mesh` (a
        `jax.sharding.Mesh` or a spec such as "data=2,model=4", "fsdp=8") shards the parameters
        over devices and splits batches over its data axes (`jaxlens.distributed`); each parameter
        is then read straight into its shards (safetensors lazily, Orbax folders restored into the
        shardings) and processed on the mesh, so the model is never whole in host memory.
        """
        from jaxlens.conversion import load_any
        from jaxlens.model.processing import process_params

        check_precision(precision)  # before the (slow) load
        if mesh is not None and device is not None:
            raise ValueError("pass device= or mesh=, not both: a mesh places the parameters itself")
        flags = dict(fold_ln=fold_ln, center_writing_weights=center_writing_weights, center_unembed=center_unembed,
                     fold_value_biases=fold_value_biases)
        if mesh is not None:  # straight into the shards: read lazily, processed on the mesh
            cfg, params, n_source = _load_sharded(path, dtype, allow_nonfinite, make_mesh(mesh), scan_layers, flags)
        else:
            cfg, params = load_any(path, dtype, allow_nonfinite=allow_nonfinite)
            n_source = source_param_count(params)
            if any(flags.values()):  # on the host, in numpy
                params, cfg = process_params(params, cfg, **flags)
            params = jax.device_put(params)  # one transfer, no per-shape identity program (jnp.asarray compiles one)
            if scan_layers and not is_scanned(params):
                params = stack_layers(params, cfg.n_layers, jnp)
            if not scan_layers and is_scanned(params):
                params = unstack_layers(params, cfg.n_layers)
        tok = tokenizer if tokenizer is not None else load_tokenizer(path)
        model = cls(cfg, params, tok, precision=precision, device=device, mesh=mesh)
        model._n_params_total = n_source
        return model.refactor_factored_attn_matrices() if refactor_factored_attn_matrices else model

    @classmethod
    def from_pretrained_no_processing(cls, path: str | Path, dtype: Any = "float32", *, fold_ln: bool = False,
                                      center_writing_weights: bool = False, center_unembed: bool = False,
                                      fold_value_biases: bool = False, **kw: Any) -> "HookedTransformer":
        """Load with HF's raw weights: every processing flag off (TransformerLens's
        `from_pretrained_no_processing`), so logits and activations equal HF PyTorch's. A flag may
        still be turned on explicitly, as in TransformerLens."""
        return cls.from_pretrained(path, dtype, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                                   center_unembed=center_unembed, fold_value_biases=fold_value_biases, **kw)

    @property
    def module(self) -> Transformer:
        return Transformer(self.cfg, scan_layers=is_scanned(self.params), dtype=self.params["W_E"].dtype)

    @property
    def scan_layers(self) -> bool:
        return is_scanned(self.params)

    def __jaxlens_trace__(self) -> tuple[Any, Any, Any]:
        """How a hook that reads this model is keyed (`jaxlens.fingerprint`): config, precision
        and tokenizer are static, the params are traced, so `model.W_U` inside a hook follows
        the current weights and does not force a recompile."""
        from jaxlens.fingerprint import Identity

        cfg, tok, precision = self.cfg, self.tokenizer, self.precision
        return ((cfg, precision, Identity(tok)), self.params, lambda params: self._derived(cfg, params, tok, precision))

    def _derived(self, cfg: ModelConfig, params: dict[str, Any], tok: Any,
                 precision: str | None) -> "HookedTransformer":
        """A new model with other weights and this one's source (`n_params_total`): what weight
        processing, refactoring and a traced hook's view of the model build."""
        model = type(self)(cfg, params, tok, precision=precision)
        model._n_params_total = self._n_params_total
        return model

    # --- tokens -----------------------------------------------------------------------------
    def to_tokens(self, input: str | Sequence[str], prepend_bos: bool | None = None,
                  padding_side: str | None = None, move_to_device: bool = True, truncate: bool = True, *,
                  return_mask: bool = False) -> Any:
        """Tokens [batch pos] (and the 0/1 mask with `return_mask`) for a string or strings,
        padded on `padding_side` (default: the tokenizer's `padding_side`, as TransformerLens).

        With `truncate` (TransformerLens's default) sequences longer than `n_ctx` keep their first
        `n_ctx` tokens, and a warning says how many were dropped; `truncate=False` raises instead.
        `move_to_device` is accepted for TransformerLens's signature: the tokens are uncommitted JAX
        arrays, which every run places beside the parameters (wherever `model.to` put them).
        """
        toks, mask = self._encode(input, prepend_bos, padding_side, truncate)
        check_tokens(toks, self.cfg, mask)
        toks, mask = jnp.asarray(toks), jnp.asarray(mask)
        return (toks, mask) if return_mask else toks

    def _encode(self, text: Any, prepend_bos: bool | None, padding_side: str | None,
                truncate: bool) -> tuple[np.ndarray, np.ndarray]:
        return encode(self.tokenizer, text, self.cfg, prepend_bos, self._side(padding_side), truncate=truncate)

    def _side(self, padding_side: str | None) -> str:
        """The padding side a call uses: its own, else the tokenizer's (TransformerLens's rule)."""
        return padding_side or getattr(self.tokenizer, "padding_side", None) or "right"

    def to_str_tokens(self, input: Any, prepend_bos: bool | None = None,
                      padding_side: str | None = None) -> list[str] | list[list[str]]:
        if isinstance(input, str):
            input = self.to_tokens(input, prepend_bos, padding_side=padding_side)[0]
        elif isinstance(input, (list, tuple)) and input and isinstance(input[0], str):
            return [self.to_str_tokens(s, prepend_bos, padding_side) for s in input]
        arr = np.asarray(input)
        if arr.ndim == 2:
            if arr.shape[0] != 1:
                return [self.to_str_tokens(row) for row in arr]
            arr = arr[0]
        return [self._decode([int(t)]) for t in arr.reshape(-1)]

    def to_string(self, tokens: Any) -> str | list[str]:
        arr = np.asarray(tokens)
        if arr.ndim == 2:
            return [self._decode(list(map(int, row))) for row in arr]
        return self._decode(list(map(int, arr.reshape(-1))))

    def to_single_str_token(self, int_token: int) -> str:
        """The string of one token id (TransformerLens's `to_single_str_token`)."""
        if isinstance(int_token, (bool, np.bool_)) or not isinstance(int_token, (int, np.integer)):
            raise TypeError(f"to_single_str_token takes one int token id, got {type(int_token).__name__}")
        (s,) = self.to_str_tokens(np.array([int(int_token)], np.int32))
        return s

    def to_single_token(self, string: str) -> int:
        toks = np.asarray(self.to_tokens(string, prepend_bos=False))[0]
        if toks.shape[0] != 1:
            raise ValueError(f"{string!r} is {toks.shape[0]} tokens, not one: {self.to_str_tokens(string, False)}")
        return int(toks[0])

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; cannot turn tokens into text")
        return self.tokenizer.decode(ids, clean_up_tokenization_spaces=False)

    def _inputs(self, input: Any, attention_mask: Any, prepend_bos: bool | None, padding_side: str | None,
                truncate: bool = True):
        toks, mask = parse_input(self.tokenizer, input, self.cfg, attention_mask, prepend_bos,
                                 self._side(padding_side), truncate=truncate)  # text truncates, as in TL
        return jnp.asarray(toks), jnp.asarray(mask)

    # --- running ----------------------------------------------------------------------------
    def _prepare(self, input: Any, attention_mask: Any, prepend_bos: bool | None, padding_side: str | None,
                 start: int | None, tokens: Any) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """(model input, mask, tokens the loss scores or None): token ids normally; with
        `start_at_layer` the residual stream [batch pos d_model] and the optional `tokens=`."""
        if start is None:
            if tokens is not None:
                raise ValueError("tokens= is for start_at_layer runs (the input is then a residual); here the "
                                 "input itself is the tokens")
            toks, mask = self._inputs(input, attention_mask, prepend_bos, padding_side)
            if is_text(input) and self._side(padding_side) == "right":
                # TransformerLens leaves right padding of text unmasked: harmless at the real
                # tokens (causal), and pad positions and the loss are then TL's numbers (the loss
                # scores the pad targets too). Left padding, or tokens with a mask, exclude pads.
                mask = jnp.ones_like(mask)
            warn_empty_rows(mask)
            return toks, mask, toks
        if isinstance(input, str) or (isinstance(input, (list, tuple)) and input and isinstance(input[0], str)):
            raise ValueError("with start_at_layer the input is the residual stream [batch pos d_model] entering that "
                             "block (e.g. model(tokens, stop_at_layer=k) or a cache's blocks.k.hook_resid_pre), "
                             "not text")
        resid = jnp.asarray(input)
        resid = resid[None] if resid.ndim == 2 else resid
        if resid.ndim != 3 or resid.shape[-1] != self.cfg.d_model or not jnp.issubdtype(resid.dtype, jnp.floating):
            raise ValueError(f"with start_at_layer the input must be a float residual stream [batch pos "
                             f"d_model={self.cfg.d_model}], got {resid.dtype} {tuple(resid.shape)}")
        shape = resid.shape[:2]
        targets = None
        if tokens is not None:
            targets, _ = check_tokens(tokens, self.cfg)
            if targets.shape != shape:
                raise ValueError(f"tokens {targets.shape} must match the residual stream's [batch pos] {shape}")
            targets = jnp.asarray(targets)
        _, mask = check_tokens(np.zeros(shape, np.int32), self.cfg, attention_mask)  # the mask's own checks
        warn_empty_rows(mask)
        return resid, jnp.asarray(mask), targets

    def _on_mesh(self, *arrays: jax.Array) -> tuple[tuple[jax.Array, ...], int | None]:
        """Arrays with a leading batch axis placed on the mesh's batch axes; a batch the axes do
        not divide is padded (masked-out rows) and the real size returned to slice outputs with."""
        mult = batch_multiple(self.mesh)
        b = int(arrays[0].shape[0])
        padded = [pad_batch(np.asarray(a), mult)[0] for a in arrays]
        placed = tuple(place(a, batch_sharding(self.mesh, a.ndim)) for a in padded)
        return placed, (b if b % mult else None)

    def _output(self, logits: jax.Array, targets: jax.Array | None, mask: jax.Array, return_type: str | None,
                per_token: bool) -> Any:
        if return_type == "logits":
            return logits
        if return_type is None:
            return None
        if targets is None:
            raise ValueError(f"return_type={return_type!r} needs the tokens to score: with start_at_layer pass "
                             "tokens=[batch pos] (the residual carries no token ids)")
        loss = _lm_loss_jit(logits, targets, mask, per_token=per_token)
        return loss if return_type == "loss" else (logits, loss)

    def _run(self, input, attention_mask, capture, hooks, prepend_bos, padding_side, return_type, *,
             loss_per_token: bool = False, start_at_layer: int | None = None, stop_at_layer: int | None = None,
             tokens: Any = None):
        """(output, activations): logits / loss / both / None, or with stop_at_layer the residual."""
        if return_type not in RETURN_TYPES:
            raise ValueError(f"return_type must be one of {RETURN_TYPES}, got {return_type!r}")
        start, stop = resolve_layer_range(self.cfg, start_at_layer, stop_at_layer)
        x, mask, targets = self._prepare(input, attention_mask, prepend_bos, padding_side, start, tokens)
        real = None
        if self.mesh is not None:  # the batch split over the mesh, padded to a multiple of its batch axes
            (x, mask), real = self._on_mesh(x, mask)
        out, acts, _ = forward_jit(self.params, self.cfg, x, mask, hooks, capture=capture, precision=self.precision,
                                   return_logits=return_type is not None or stop is not None,
                                   start_at_layer=start, stop_at_layer=stop)
        if real is not None:  # the padding rows dropped from every output
            out, acts, mask = jax.tree.map(lambda a: a[:real], (out, acts, mask))
        if stop is not None:  # TransformerLens returns the residual stream whatever the return_type
            return out, acts
        return self._output(out, targets, mask, return_type, loss_per_token), acts

    def _run_backward(self, input, attention_mask, capture, grad_names, fwd_hooks, bwd_hooks, prepend_bos,
                      padding_side, return_type, *, start_at_layer: int | None = None, tokens: Any = None,
                      caching: CachingPlan | None = None):
        """(loss or (logits, loss), activations, {name: d loss / d activation}) in one program, with
        the stored and the call's backward hooks run in the backward pass of the loss. With
        `caching`, the caching hooks it serves are captured too (activations and gradients)."""
        from jaxlens.edits.gradients import value_and_grads
        from jaxlens.edits.hook_points import has_backward_hooks

        start, _ = resolve_layer_range(self.cfg, start_at_layer, None)
        x, mask, targets = self._prepare(input, attention_mask, prepend_bos, padding_side, start, tokens)
        if targets is None:
            raise ValueError("the backward pass differentiates the loss, which needs the tokens: with start_at_layer "
                             "pass tokens=[batch pos]")
        hooks = self._compose_hooks(fwd_hooks, bwd_hooks, backward=True, caching=caching)
        if caching is not None:
            capture, grad_names = capture | caching.names, grad_names | caching.grad_names
        value, logits, acts, grads = value_and_grads(
            self.params, x, mask, hooks, None, None if start is None else targets, cfg=self.cfg, capture=capture,
            grad_names=grad_names, precision=self.precision, start_at_layer=start, wrt_params=has_backward_hooks(hooks))
        return (value if return_type == "loss" else (logits, value)), acts, grads

    def _backward_runs(self, return_type: Any, loss_per_token: bool, stop_at_layer: Any, explicit: bool) -> bool:
        """Does this run differentiate the loss for backward hooks? Explicit `bwd_hooks=` need a
        scalar loss (ValueError otherwise); stored ones act only when the run returns one."""
        scalar = return_type in ("loss", "both") and not loss_per_token and stop_at_layer is None
        if explicit and not scalar:
            raise ValueError("bwd_hooks run in the backward pass of the loss, so the run must return a scalar loss: "
                             "pass return_type='loss' (or 'both'), without loss_per_token or stop_at_layer "
                             "(TransformerLens calls .backward() on that loss; jaxlens differentiates it for you)")
        return scalar and (explicit or any(h.dir == "bwd" for h in self._stored_hooks))

    def input_to_embed(self, input: Any, prepend_bos: bool | None = None, padding_side: str | None = None,
                       attention_mask: Any = None) -> tuple[jax.Array, jax.Array, None, jax.Array]:
        """TransformerLens's `input_to_embed`: (residual entering block 0 [batch pos d_model],
        tokens, None (no separate positional stream), attention mask), so that
        `model(residual, start_at_layer=0, attention_mask=mask, tokens=tokens)` resumes the run.
        The mask is always returned (all ones when nothing is padded)."""
        toks, mask, _ = self._prepare(input, attention_mask, prepend_bos, padding_side, None, None)
        resid = self(toks, attention_mask=mask, stop_at_layer=0)
        return resid, toks, None, mask

    def __call__(self, input: Any, attention_mask: Any = None, return_type: str | None = "logits", *,
                 loss_per_token: bool = False, prepend_bos: bool | None = None, padding_side: str | None = None,
                 fwd_hooks: Any = None, kv_cache: Any = None, start_at_layer: int | None = None,
                 stop_at_layer: int | None = None, tokens: Any = None) -> Any:
        """Logits [batch pos vocab] (or loss, both, None) for a string, strings or token ids.

        `return_type="loss"` is the mean next-token loss over the mask, or [batch pos-1] with
        `loss_per_token`. Text is padded on `padding_side` (default: the tokenizer's); right
        padding of text is not masked, as in TransformerLens (so its loss scores the pad targets
        too): pass `padding_side="left"`, or tokens with an `attention_mask`, to exclude pads. `stop_at_layer=k` returns the residual stream entering block k instead
        (k = n_layers: after the last block, before ln_final); `start_at_layer=k` takes that
        residual [batch pos d_model] as `input` (with `attention_mask` for padding/positions and
        `tokens=` for a loss). Negative k counts from the end; only blocks in [start, stop) run.
        With `kv_cache` (a `jaxlens.kv_cache.KVCache`), the input continues the cached tokens and
        the call returns (logits, new cache); the given cache is left unchanged. Stored hooks
        (`add_hook`, `hooks(...)`) apply before `fwd_hooks`; stored backward hooks run when the
        call returns the loss.
        """
        if kv_cache is not None:
            if start_at_layer is not None or stop_at_layer is not None or loss_per_token:
                raise ValueError("kv_cache runs return logits: start_at_layer, stop_at_layer and loss_per_token "
                                 "do not apply; run without kv_cache")
            return self._run_cached(input, attention_mask, kv_cache, self._compose_hooks(fwd_hooks, None),
                                    prepend_bos, padding_side, return_type)
        layers = dict(start_at_layer=start_at_layer, tokens=tokens)
        plan = CachingPlan()  # caching hooks (add_caching_hooks, ...) served by the run's own capture
        if self._backward_runs(return_type, loss_per_token, stop_at_layer, explicit=False):
            out, acts, grads = self._run_backward(input, attention_mask, frozenset(), frozenset(), fwd_hooks, None,
                                                  prepend_bos, padding_side, return_type, caching=plan, **layers)
        else:
            hooks = self._compose_hooks(fwd_hooks, None, caching=plan)
            out, acts = self._run(input, attention_mask, plan.names, hooks, prepend_bos, padding_side, return_type,
                                  loss_per_token=loss_per_token, stop_at_layer=stop_at_layer, **layers)
            grads = {}
        plan.write(acts, grads, hook_names(self.cfg))
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """TransformerLens's name for calling the model: `model.forward(x) == model(x)`."""
        return self(*args, **kwargs)

    def loss_fn(self, logits: Any, tokens: Any, attention_mask: Any = None, per_token: bool = False) -> jax.Array:
        """TransformerLens's `loss_fn`: next-token cross entropy of `logits` for `tokens` (see `lm_loss`)."""
        logits, tokens = jnp.asarray(logits), jnp.asarray(tokens)
        if logits.ndim != 3 or tokens.shape != logits.shape[:2]:
            raise ValueError(f"loss_fn needs logits [batch pos d_vocab] and tokens [batch pos] of the same batch and "
                             f"pos; got {logits.shape} and {tokens.shape}")
        mask = None if attention_mask is None else jnp.asarray(attention_mask).reshape(tokens.shape)
        return _lm_loss_jit(logits, tokens, mask, per_token=per_token)

    def run_with_cache(self, input: Any, names_filter: NamesFilter = None, attention_mask: Any = None,
                       return_type: str | None = "logits", *, prepend_bos: bool | None = None,
                       padding_side: str | None = None, fwd_hooks: Any = None, bwd_hooks: Any = None,
                       remove_batch_dim: bool = False, incl_bwd: bool = False, loss_per_token: bool = False,
                       start_at_layer: int | None = None, stop_at_layer: int | None = None,
                       tokens: Any = None, return_cache_object: bool = True, pos_slice: Any = None,
                       reset_hooks_end: bool = True, clear_contexts: bool = False) -> tuple[Any, ActivationCache]:
        """(output, ActivationCache). Only activations matched by `names_filter` are computed
        into the result; under jit the rest are never materialised. With stop/start_at_layer only
        the blocks that run are in the cache (and no embedding / final-norm hooks outside them).

        `incl_bwd=True` also caches, under `name + "_grad"`, the gradient of the loss with respect
        to each cached activation, as TransformerLens does after `.backward()`. TransformerLens
        needs a scalar output to call backward on, so does this: pass `return_type="loss"` (the
        mean next-token loss); the forward and backward run as one compiled program. Stored and
        `bwd_hooks=` backward hooks act in that backward pass (a replaced gradient shows upstream
        of its hook point; the point's own `_grad` is the gradient arriving there).

        As TransformerLens 4: `return_cache_object=False` returns a plain {name: array} dict;
        `pos_slice` (a `Slice` or its input; an int keeps the axis) slices every cached activation
        along its position axis (the query axis of hook_pattern / hook_attn_scores, axis 2 of the
        [batch head pos d] q/k-norm hooks), before `remove_batch_dim`. `reset_hooks_end` and
        `clear_contexts` are accepted for TransformerLens's signature: a run here adds no hook that
        outlives it and hook points keep no context.
        """
        capture = resolve_names(names_filter, self.cfg)
        if incl_bwd:
            if return_type != "loss" or loss_per_token or stop_at_layer is not None:
                raise ValueError("incl_bwd=True caches gradients of the loss, so it needs return_type='loss' without "
                                 "loss_per_token or stop_at_layer (TransformerLens calls .backward() on that scalar)")
        backward = incl_bwd or self._backward_runs(return_type, loss_per_token, stop_at_layer, bool(bwd_hooks))
        plan, names = CachingPlan(), hook_names(self.cfg)
        if backward:
            out, acts, grads = self._run_backward(input, attention_mask, capture, capture if incl_bwd else frozenset(),
                                                  fwd_hooks, bwd_hooks, prepend_bos, padding_side, return_type,
                                                  start_at_layer=start_at_layer, tokens=tokens, caching=plan)
        else:
            hooks = self._compose_hooks(fwd_hooks, None, caching=plan)
            out, acts = self._run(input, attention_mask, capture | plan.names, hooks, prepend_bos, padding_side,
                                  return_type, loss_per_token=loss_per_token, start_at_layer=start_at_layer,
                                  stop_at_layer=stop_at_layer, tokens=tokens)
            grads = {}
        plan.write(acts, grads, names)
        acts = {n: a for n, a in acts.items() if n in capture}  # what the caching hooks alone asked for goes
        if incl_bwd:
            acts.update({f"{n}_grad": g for n, g in grads.items() if n in capture})
        order = {n: i for i, n in enumerate(names)}  # forward order, as TransformerLens's cache
        acts = dict(sorted(acts.items(), key=lambda kv: (kv[0].endswith("_grad"), order.get(kv[0].removesuffix("_grad"), 0))))
        if pos_slice is not None:
            acts = _pos_sliced(acts, pos_slice)
        cache = ActivationCache(acts, self.cfg, True, self.cache_weights(), tokenizer=self.tokenizer)
        cache = cache.remove_batch_dim() if remove_batch_dim else cache
        return out, (cache if return_cache_object else dict(cache.items()))

    def run_with_hooks(self, input: Any, fwd_hooks: Any = (), bwd_hooks: Any = (), reset_hooks_end: bool = True,
                       clear_contexts: bool = False, attention_mask: Any = None, return_type: str | None = "logits",
                       remove_batch_dim: bool = False, **kw: Any) -> Any:
        """Run with TransformerLens-style `fwd_hooks=[(name_or_filter, fn)]` applied inside jit,
        after any stored hooks. `bwd_hooks=[(name, fn)]`: `fn(grad, hook)` sees the gradient of the
        loss at that point and may return a replacement that flows further back; they need
        `return_type="loss"` (the backward pass runs inside this call, so unlike TransformerLens
        there is no `.backward()` to call and no need for `reset_hooks_end=False`). With
        `reset_hooks_end=False` the call's hooks stay on the model afterwards, as in TransformerLens.
        `remove_batch_dim=True`, as TransformerLens 4: a hook whose tensor has a leading axis of 1
        sees it without that axis (and a result of that rank gets it back); others see it as is.
        """
        if remove_batch_dim:
            fwd_hooks = [(n, _batchless(fn)) for n, fn in fwd_hooks]
            bwd_hooks = [(n, _batchless(fn)) for n, fn in bwd_hooks]
        self._backward_runs(return_type, kw.get("loss_per_token", False), kw.get("stop_at_layer"), bool(bwd_hooks))
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts):
            return self(input, attention_mask, return_type, **kw)

    # --- KV cache and generation (jaxlens/kv_cache.py, jaxlens/generate.py) ------------------
    def _run_cached(self, input, attention_mask, kv_cache, hooks, prepend_bos, padding_side, return_type):
        from jaxlens.generation.kv_cache import check_cache, forward_cached_jit

        if return_type != "logits":
            raise ValueError(f"with kv_cache only return_type='logits' is supported, got {return_type!r}")
        toks, mask = self._inputs(input, attention_mask, prepend_bos, padding_side)
        check_cache(kv_cache, self.cfg, toks.shape[0], toks.shape[1])
        logits, _, new_cache = forward_cached_jit(self.params, self.cfg, toks, mask, kv_cache, hooks=hooks,
                                                  precision=self.precision)
        return logits, new_cache

    def init_kv_cache(self, batch: int, max_len: int) -> Any:
        """An empty `KVCache` for this model (its dtype) of `batch` rows and `max_len` slots, bounded
        by the context: slots past n_ctx could never hold a token (positions past it are refused)."""
        from jaxlens.generation.kv_cache import KVCache

        if isinstance(max_len, int) and max_len > self.cfg.n_ctx:
            raise ValueError(f"init_kv_cache: max_len={max_len} exceeds the model's context n_ctx={self.cfg.n_ctx}; "
                             f"use max_len <= {self.cfg.n_ctx}")
        return KVCache.init(self.cfg, batch, max_len, self.params["W_E"].dtype)

    def generate(self, input: Any = "", max_new_tokens: int = 10, stop_at_eos: bool = True,
                 eos_token_id: Any = None, do_sample: bool = True, top_k: int | None = None,
                 top_p: float | None = None, temperature: float = 1.0, freq_penalty: float = 0.0,
                 repetition_penalty: float = 1.0, use_past_kv_cache: bool = True, prepend_bos: bool | None = None,
                 padding_side: str | None = None, return_type: str = "input", verbose: bool = True,
                 output_logits: bool = False, return_cache: bool = False, return_input_tokens: bool = False,
                 *, key: Any = None, attention_mask: Any = None,
                 names_filter: NamesFilter = None, fwd_hooks: Any = None, kv_cache: Any = None,
                 max_len: int | None = None, stop_strings: str | list[str] | None = None,
                 stopping_criteria: Any = None) -> Any:
        """TransformerLens's `generate` (its arguments, in its order) as one compiled loop; see
        `jaxlens.generate.generate`.

        Sampling without `key` uses `jax.random.key(0)` (warned once), so it is reproducible.
        `freq_penalty` subtracts `freq_penalty * count` of each token so far from the
        temperature-scaled logits when sampling (greedy ignores it, as in TransformerLens);
        `repetition_penalty` is HF's, applied before it, greedy included.
        `use_past_kv_cache=False` gives the same tokens: the loop always keeps a KV cache.
        `verbose` is accepted and ignored: the loop is one XLA program, with no per-step bar.
        `output_logits`, `return_cache` and `return_input_tokens` are TransformerLens 4's (see
        `jaxlens.generate.generate`). With `names_filter` and no `return_cache`, returns (output,
        ActivationCache over the generated steps); stored hooks and `fwd_hooks` act at every step.
        `stop_strings` and `stopping_criteria` are TransformerLens 4's (HF's matching and call
        contract), asked after every step through a host callback of the compiled loop.
        """
        from jaxlens.generation.generate import generate

        return generate(self, input, max_new_tokens, stop_at_eos=stop_at_eos, eos_token_id=eos_token_id,
                        do_sample=do_sample, top_k=top_k, top_p=top_p, temperature=temperature,
                        freq_penalty=freq_penalty, repetition_penalty=repetition_penalty,
                        use_past_kv_cache=use_past_kv_cache, key=key,
                        prepend_bos=prepend_bos, padding_side=padding_side, attention_mask=attention_mask,
                        return_type=return_type, verbose=verbose, output_logits=output_logits,
                        return_cache=return_cache, return_input_tokens=return_input_tokens, names_filter=names_filter,
                        fwd_hooks=self._compose_hooks(fwd_hooks, None), kv_cache=kv_cache, max_len=max_len,
                        stop_strings=stop_strings, stopping_criteria=stopping_criteria)

    def generate_stream(self, input: Any = "", max_new_tokens: int = 10, max_tokens_per_yield: int = 25,
                        stop_at_eos: bool = True, eos_token_id: Any = None, do_sample: bool = True,
                        top_k: int | None = None, top_p: float | None = None, temperature: float = 1.0,
                        freq_penalty: float = 0.0, repetition_penalty: float = 1.0, use_past_kv_cache: bool = True,
                        prepend_bos: bool | None = None, padding_side: str | None = None,
                        return_type: str | None = "input", verbose: bool = True,
                        stop_strings: str | list[str] | None = None, stopping_criteria: Any = None,
                        attention_mask: Any = None, *, key: Any = None, fwd_hooks: Any = None) -> Any:
        """TransformerLens 4's `generate_stream` (its arguments, in its order): `generate`'s tokens
        yielded as the compiled loop makes them; see `jaxlens.generate.generate_stream`."""
        from jaxlens.generation.generate import generate_stream

        return generate_stream(self, input, max_new_tokens, max_tokens_per_yield, prepend_bos=prepend_bos,
                               padding_side=padding_side, attention_mask=attention_mask, return_type=return_type,
                               stop_at_eos=stop_at_eos, eos_token_id=eos_token_id, do_sample=do_sample, top_k=top_k,
                               top_p=top_p, temperature=temperature, freq_penalty=freq_penalty,
                               repetition_penalty=repetition_penalty, use_past_kv_cache=use_past_kv_cache,
                               verbose=verbose, stop_strings=stop_strings, stopping_criteria=stopping_criteria,
                               key=key, fwd_hooks=self._compose_hooks(fwd_hooks, None))

    # --- weights (TransformerLens layout, stacked over layers) -------------------------------
    def _layer_param(self, sub: str, name: str) -> jax.Array | None:
        """One block parameter stacked over layers (a copy unless scanned); None if absent."""
        if self.scan_layers:
            return self.params["blocks"]["block"][sub].get(name)
        per_layer = [self.params[f"blocks_{l}"][sub].get(name) for l in range(self.cfg.n_layers)]
        return None if per_layer[0] is None else jnp.stack(per_layer)

    def _stacked(self, sub: str, name: str, shape: tuple[int, ...] | None = None) -> jax.Array:
        w = self._layer_param(sub, name)
        if w is not None:
            return w
        if shape is None:
            raise AttributeError(f"{self.cfg.model_type} has no {sub}.{name}")
        return jnp.zeros((self.cfg.n_layers, *shape), self.params["W_E"].dtype)

    def _expand_kv(self, w: jax.Array) -> jax.Array:
        return repeat_kv(w, self.cfg.n_heads // self.cfg.n_kv_heads, axis=1)

    @property
    def W_E(self) -> jax.Array:
        return self.params["W_E"]

    @property
    def W_pos(self) -> jax.Array:
        if not self.cfg.has_pos_embed:
            raise AttributeError(f"{self.cfg.model_type} uses rotary positions: it has no W_pos")
        return self.params["W_pos"]

    @property
    def W_E_pos(self) -> jax.Array:
        """[d_vocab + n_ctx d_model]: W_E then W_pos (TransformerLens's, for learned positions)."""
        return jnp.concatenate([self.W_E, self.W_pos], axis=0)

    @property
    def W_U(self) -> jax.Array:
        return self.params["W_E"].T if self.cfg.tie_word_embeddings else self.params["W_U"]

    @property
    def b_U(self) -> jax.Array:
        return self.params["b_U"]

    W_Q = property(lambda self: self._stacked("attn", "W_Q"))
    W_K = property(lambda self: self._expand_kv(self._stacked("attn", "W_K")))
    W_V = property(lambda self: self._expand_kv(self._stacked("attn", "W_V")))
    W_O = property(lambda self: self._stacked("attn", "W_O"))
    b_Q = property(lambda self: self._stacked("attn", "b_Q", (self.cfg.n_heads, self.cfg.d_head)))
    b_K = property(lambda self: self._expand_kv(self._stacked("attn", "b_K", (self.cfg.n_kv_heads, self.cfg.d_head))))
    b_V = property(lambda self: self._expand_kv(self._stacked("attn", "b_V", (self.cfg.n_kv_heads, self.cfg.d_head))))
    b_O = property(lambda self: self._stacked("attn", "b_O", (self.cfg.d_model,)))
    W_in = property(lambda self: self._stacked("mlp", "W_in"))
    b_in = property(lambda self: self._stacked("mlp", "b_in", (self.cfg.d_mlp,)))
    W_out = property(lambda self: self._stacked("mlp", "W_out"))
    b_out = property(lambda self: self._stacked("mlp", "b_out", (self.cfg.d_model,)))

    @property
    def W_gate(self) -> jax.Array:
        if not self.cfg.gated_mlp:
            raise AttributeError(f"{self.cfg.model_type} has no gated MLP: no W_gate")
        return self._stacked("mlp", "W_gate")

    # --- TransformerLens's module tree (read-only views of params; jaxlens/model/views.py) ----
    embed = property(lambda self: EmbedView(self, "embed"))
    unembed = property(lambda self: UnembedView(self, "unembed"))
    ln_final = property(lambda self: NormView(self, "ln_final"))
    blocks = property(lambda self: BlocksView(self))
    hook_embed = property(lambda self: HookPointRef(self, "hook_embed"))

    @property
    def pos_embed(self) -> PosEmbedView:
        if not self.cfg.has_pos_embed:
            raise AttributeError(f"{self.cfg.model_type} uses rotary positions: it has no pos_embed")
        return PosEmbedView(self, "pos_embed")

    @property
    def hook_pos_embed(self) -> HookPointRef:
        if not self.cfg.has_pos_embed:
            raise AttributeError(f"{self.cfg.model_type} uses rotary positions: it has no hook_pos_embed")
        return HookPointRef(self, "hook_pos_embed")

    @property
    def hook_dict(self) -> dict[str, HookPointRef]:
        """{hook name: HookPointRef} for every hook point (TransformerLens's `hook_dict`)."""
        return {n: HookPointRef(self, n) for n in self.hook_names()}

    def hook_points(self) -> list[HookPointRef]:
        """Every hook point, in forward order (TransformerLens's `hook_points()`)."""
        return list(self.hook_dict.values())

    def clear_contexts(self) -> None:
        """TransformerLens's `clear_contexts`: nothing to clear (jaxlens hook points keep no `ctx`)."""

    @property
    def _hook_name_set(self) -> frozenset[str]:
        memo = self.__dict__.get("_names_memo")
        if memo is None or memo[0] != self.cfg:
            memo = self._names_memo = (self.cfg, frozenset(self.hook_names()))
        return memo[1]

    # --- parameters under TransformerLens's names ---------------------------------------------
    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, jax.Array]]:
        """(name, array) in TransformerLens's names, layout and order (`embed.W_E`, `pos_embed.W_pos`,
        `blocks.{l}.attn.W_Q` ... `b_O`, `blocks.{l}.mlp.W_in` ..., `blocks.{l}.ln1.w`, `ln_final.w`,
        `unembed.W_U`, `unembed.b_U`), as TransformerLens 4's `tl_named_parameters`: grouped K/V
        expanded, absent biases as zeros, norm weights only where they exist (not after fold_ln)."""
        pre = f"{prefix}." if prefix else ""
        yield f"{pre}embed.W_E", self.W_E
        if self.cfg.has_pos_embed:
            yield f"{pre}pos_embed.W_pos", self.W_pos
        for l, block in enumerate(self.blocks):
            attn, mlp = block.attn, block.mlp
            for n in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
                yield f"{pre}blocks.{l}.attn.{n}", getattr(attn, n)
            for n in ("W_in", "W_out", "b_in", "b_out") + (("W_gate",) if self.cfg.gated_mlp else ()):
                yield f"{pre}blocks.{l}.mlp.{n}", getattr(mlp, n)
            if self.cfg.gated_mlp and hasattr(mlp, "b_gate"):
                yield f"{pre}blocks.{l}.mlp.b_gate", mlp.b_gate
            for ln in ("ln1", "ln2"):
                for n, v in getattr(block, ln)._params().items():
                    yield f"{pre}blocks.{l}.{ln}.{n}", v
        for n, v in self.ln_final._params().items():
            yield f"{pre}ln_final.{n}", v
        yield f"{pre}unembed.W_U", self.W_U
        yield f"{pre}unembed.b_U", self.b_U

    def parameters(self, recurse: bool = True) -> Iterator[jax.Array]:
        """The arrays of `named_parameters`, in its order."""
        return (v for _, v in self.named_parameters())

    def state_dict(self) -> dict[str, jax.Array]:
        """{TransformerLens name: array} (see `named_parameters`); `model.params` is the real tree."""
        return dict(self.named_parameters())

    # TransformerLens 4's names for the same dictionary and iterator (what its SVDInterpreter and
    # other analysis tools read). One difference: after fold_ln the bridge still lists identity
    # norm weights; these list none, as HookedTransformer's LNPre has none.
    tl_named_parameters = named_parameters

    def tl_parameters(self) -> dict[str, jax.Array]:
        """{TransformerLens name: array}, as TransformerLens 4's `tl_parameters` (= `state_dict()`)."""
        return self.state_dict()

    get_params = tl_parameters

    # --- TransformerLens 4's per-block queries (every jaxlens family has attention and an MLP in
    # every block; the bridge needs them for hybrid models, where some blocks have neither) -------
    _BLOCK_SUBMODULES = ("attn", "mlp")

    def blocks_with(self, submodule: str) -> list[tuple[int, Any]]:
        """(layer, `model.blocks[layer]`) for the blocks that have `submodule` ("attn" or "mlp")."""
        if submodule not in self._BLOCK_SUBMODULES:
            raise ValueError(f"submodule must be one of {list(self._BLOCK_SUBMODULES)} (every block has both), "
                             f"got {submodule!r}")
        return [(l, self.blocks[l]) for l in range(self.cfg.n_layers)]

    def stack_params_for(self, submodule: str, attr_path: str, reshape_fn: Any = None) -> tuple[list[int], jax.Array]:
        """(layer indices, the parameter at `attr_path` (e.g. "attn.W_Q") of those blocks stacked
        on a new first axis), for the blocks that have `submodule`; `reshape_fn` maps each first."""
        idx, arrays = [], []
        for l, block in self.blocks_with(submodule):
            w = block
            for part in attr_path.split("."):
                w = getattr(w, part)
            arrays.append(w if reshape_fn is None else reshape_fn(w))
            idx.append(l)
        return idx, jnp.stack(arrays)

    @property
    def n_params_total(self) -> int:
        """TransformerLens 4's `n_params_total`: the parameters of the HF model this was loaded
        from, tied weights once, whatever processing did since (`cfg.n_params` counts only the
        attention and MLP weights). A model built from a params tree counts that tree, less b_U."""
        n = self._n_params_total
        return source_param_count(self.params) if n is None else n

    def get_hook_point(self, hook_name: str) -> HookPointRef | None:
        """TransformerLens 4's `get_hook_point`: the hook point named `hook_name` (its `add_hook`,
        `remove_hooks`, `name`), or None when the model has none by that name (a module path such
        as "blocks.0.attn" included)."""
        return HookPointRef(self, hook_name) if hook_name in self._hook_name_set else None

    def block_submodules(self, layer_idx: int) -> list[str]:
        """TransformerLens 4's `block_submodules`: the block's parts in the bridge's order (its
        `hook_mlp_in` point, the norms it has (`ln1`, `ln1_post`, ..., by `norm_placement`), `attn`,
        `mlp`; GPT-2's adapter lists them in forward order). Negative indices count from the end."""
        self.blocks[layer_idx]  # the index check: an IndexError naming the range
        pre, post = self.cfg.norm_placement != "post", self.cfg.norm_placement != "pre"
        norms = [[f"ln{n}"] * pre + [f"ln{n}_post"] * post for n in (1, 2)]
        if self.cfg.original_architecture == "GPT2LMHeadModel":
            return ["hook_mlp_in", *norms[0], "attn", *norms[1], "mlp"]
        return ["hook_mlp_in", *norms[0], *norms[1], "attn", "mlp"]

    def layer_types(self) -> list[str]:
        """TransformerLens 4's `layer_types`: per block, its mixer then its other non-norm parts,
        joined by "+" ("attn+hook_mlp_in+mlp" in every jaxlens family: no hybrid blocks)."""
        out = []
        for l in range(self.cfg.n_layers):
            parts = [p for p in self.block_submodules(l) if not p.startswith("ln")]
            out.append("+".join(["attn"] + sorted(p for p in parts if p != "attn")))
        return out

    def block_hooks(self, layer_idx: int) -> list[str]:
        """TransformerLens 4's `block_hooks`: the hook names on block `layer_idx`, relative to it,
        sorted: jaxlens's hook points, under TransformerLens's names. The bridge also lists its own
        aliases (`hook_in` / `hook_out` points, rotary `attn.hook_cos` / `hook_sin`, the attention's
        copies of the block's input hooks, the router's of the expert hooks), which are not points
        here; jaxlens adds `mlp.hook_expert_outputs`. Negative indices count from the end (the
        bridge answers [] for them)."""
        prefix = f"blocks.{self.blocks[layer_idx]._layer}."
        return sorted(n[len(prefix):] for n in self.hook_names() if n.startswith(prefix))

    def composition_layer_indices(self) -> list[int]:
        """The layers with attention: the positions `all_composition_scores` indexes."""
        return [l for l, _ in self.blocks_with("attn")]

    @property
    def attn_head_labels(self) -> list[str]:
        """Labels of the attention layers' heads, in `all_composition_scores`'s order."""
        return [f"L{l}H{h}" for l in self.composition_layer_indices() for h in range(self.cfg.n_heads)]

    def QK_for_attn_layers(self) -> tuple[list[int], "FactoredMatrix"]:
        """(attention layers, their QK circuits): `model.QK` with the layer indices it spans."""
        return self.composition_layer_indices(), self.QK

    def OV_for_attn_layers(self) -> tuple[list[int], "FactoredMatrix"]:
        """(attention layers, their OV circuits): `model.OV` with the layer indices it spans."""
        return self.composition_layer_indices(), self.OV

    # --- stateful hooks (TransformerLens's HookedRootModule; jaxlens/hook_points.py) -----------
    def add_hook(self, name: NamesFilter, hook: Any = None, dir: str = "fwd", is_permanent: bool = False,
                 level: int | None = None, prepend: bool = False, *, hook_fn: Any = None) -> None:
        """Register `hook` on the hook point `name` (or every point a filter callable / list /
        regex selects) for every later run until `reset_hooks()`; `is_permanent` hooks survive it.
        dir="bwd" hooks get `(grad, hook)` in runs that differentiate the loss. `hook_fn=` is
        TransformerLens 4's name for `hook` (HookedTransformer's)."""
        check_dir(dir)
        if name is None:
            raise ValueError("add_hook needs a hook name or a names filter, not None")
        if (hook is None) == (hook_fn is None):
            raise ValueError("add_hook needs the hook function once: as `hook` (positional) or `hook_fn=`")
        hook = hook if hook is not None else hook_fn
        self._store(make_hooks([(name, hook)], self.cfg), dir, is_permanent, level, prepend)

    def add_perma_hook(self, name: NamesFilter, hook: Any, dir: str = "fwd") -> None:
        self.add_hook(name, hook, dir=dir, is_permanent=True)

    def _store(self, hooks: Hooks, dir: str, permanent: bool, level: int | None, prepend: bool = False) -> None:
        new = tuple(StoredHook(names, fn, dir, permanent, level) for names, fn in hooks.entries)
        self._stored_hooks = new + self._stored_hooks if prepend else self._stored_hooks + new

    def reset_hooks(self, clear_contexts: bool = True, direction: str = "both", including_permanent: bool = False,
                    level: int | None = None) -> None:
        """Remove stored hooks (not permanent ones unless `including_permanent`); `clear_contexts` is
        accepted for TransformerLens's signature (jaxlens hook points keep no `ctx`)."""
        check_dir(direction, allow_both=True)
        self._stored_hooks = tuple(h for h in self._stored_hooks
                                   if not removable(h, direction, including_permanent, level))

    def remove_all_hook_fns(self, direction: str = "both", including_permanent: bool = False,
                            level: int | None = None) -> None:
        self.reset_hooks(direction=direction, including_permanent=including_permanent, level=level)

    def _remove_from_point(self, name: str, direction: str, including_permanent: bool, level: int | None) -> None:
        self._stored_hooks = without_name(self._stored_hooks, name, direction, including_permanent, level)

    @contextmanager
    def hooks(self, fwd_hooks: Any = (), bwd_hooks: Any = (), reset_hooks_end: bool = True,
              clear_contexts: bool = False) -> Iterator["HookedTransformer"]:
        """`with model.hooks(fwd_hooks=[...], bwd_hooks=[...]):` every run inside applies them (after
        hooks stored before); on exit they are removed, unless `reset_hooks_end=False`."""
        self.context_level += 1
        level = self.context_level
        try:
            for d, given in (("fwd", fwd_hooks), ("bwd", bwd_hooks)):
                self._store(make_hooks(given if isinstance(given, Hooks) else list(given or ()), self.cfg), d,
                            False, level)
            yield self
        finally:
            if reset_hooks_end:
                self.reset_hooks(level=level)
            self.context_level -= 1

    def _compose_hooks(self, fwd_hooks: Any, bwd_hooks: Any, backward: bool = False,
                       caching: CachingPlan | None = None) -> Hooks:
        """The `Hooks` of one run: stored forward hooks, the call's; with `backward`, the stored and
        the call's backward hooks too (`jaxlens.hook_points.compose`). With `caching`, the caching
        hooks the run serves from its capture are moved into it."""
        return compose(self._stored_hooks, make_hooks(fwd_hooks, self.cfg),
                       make_hooks(bwd_hooks, self.cfg) if backward else None, caching)

    # --- caching hooks (TransformerLens's HookedRootModule / TransformerBridge) ---------------
    def get_caching_hooks(self, names_filter: NamesFilter = None, incl_bwd: bool = False, device: Any = None,
                          remove_batch_dim: bool = False, cache: dict | None = None,
                          pos_slice: Any = None) -> tuple[dict, list, list]:
        """(cache, fwd_hooks, bwd_hooks), TransformerLens's: hooks that store each activation
        `names_filter` selects (default: what run_with_cache caches) into `cache` (a new dict by
        default) under its hook name, and with `incl_bwd` its gradient under name + "_grad" (when
        a run differentiates the loss). `pos_slice` slices positions as run_with_cache does;
        `remove_batch_dim` drops a leading axis of 1 (a larger batch keeps it); `device` places
        each. Pass them to run_with_hooks / hooks(); runs store through their compiled capture."""
        cache = {} if cache is None else cache
        names = resolve_names(names_filter, self.cfg)
        make = lambda grad: CachingHook(cache, grad, pos_slice, remove_batch_dim, device)  # noqa: E731
        fwd, bwd = make(False), make(True)
        ordered = [n for n in hook_names(self.cfg) if n in names]
        self.is_caching = True
        return cache, [(n, fwd) for n in ordered], ([(n, bwd) for n in ordered] if incl_bwd else [])

    def add_caching_hooks(self, names_filter: NamesFilter = None, incl_bwd: bool = False, device: Any = None,
                          remove_batch_dim: bool = False, cache: dict | None = None) -> dict:
        """Register caching hooks (`get_caching_hooks`) on the model until `reset_hooks()`; every
        later run stores into the returned dict. It does not run the model."""
        cache, fwd, bwd = self.get_caching_hooks(names_filter, incl_bwd, device, remove_batch_dim, cache)
        for d, entries in (("fwd", fwd), ("bwd", bwd)):
            if entries:
                self._store(make_hooks([(frozenset(n for n, _ in entries), entries[0][1])], self.cfg), d, False, None)
        return cache

    def cache_all(self, cache: dict | None, incl_bwd: bool = False, device: Any = None,
                  remove_batch_dim: bool = False) -> None:
        """Deprecated in TransformerLens (use run_with_cache): `add_caching_hooks` for every hook."""
        warnings.warn("cache_all is deprecated; use run_with_cache or add_caching_hooks.", DeprecationWarning,
                      stacklevel=2)
        self.add_caching_hooks(None, incl_bwd, device, remove_batch_dim, cache)

    def cache_some(self, cache: dict | None, names: NamesFilter, incl_bwd: bool = False, device: Any = None,
                   remove_batch_dim: bool = False) -> None:
        """Deprecated in TransformerLens (use run_with_cache): `add_caching_hooks` for `names`."""
        warnings.warn("cache_some is deprecated; use run_with_cache or add_caching_hooks.", DeprecationWarning,
                      stacklevel=2)
        self.add_caching_hooks(names, incl_bwd, device, remove_batch_dim, cache)

    # --- devices ---------------------------------------------------------------------------
    def to(self, device: Any, print_details: bool = False) -> "HookedTransformer":
        """Move the parameters to `device` (a `jax.Device`, or "cpu", "gpu"/"cuda", "tpu", with an
        optional ":N"); in place, returning the model, as TransformerLens's `.to`."""
        dev = resolve_device(device)
        self.params = jax.device_put(self.params, dev)
        if print_details:
            print(f"Moving model to device: {dev}")
        return self

    def cpu(self) -> "HookedTransformer":
        return self.to("cpu")

    @property
    def device(self) -> str | None:
        """The platform the parameters are on ("cpu", "gpu", "tpu"), as `cfg.device`."""
        return self.cfg.device

    def eval(self) -> "HookedTransformer":
        """The model, unchanged: jaxlens models have no dropout or other train-mode behaviour,
        so TransformerLens code that calls `model.eval()` runs as written."""
        return self

    def train(self, mode: bool = True) -> "HookedTransformer":
        """The model, unchanged (no train-mode behaviour: see `eval`). Training is a function of
        `params` (`jax.grad` of `jaxlens.forward`), not a mode."""
        return self

    def cuda(self, device: int | None = None) -> "HookedTransformer":
        return self.to("gpu" if device is None else f"gpu:{int(device)}")

    def cache_weights(self) -> dict[str, jax.Array]:
        """The weights the cache's analyses need; stacked once per params object and reused."""
        memo = getattr(self, "_weights_memo", None)
        if memo is not None and memo[0] is self.params:
            return memo[1]
        weights = {"W_U": self.W_U, "b_U": self.b_U, "W_O": self.W_O, "b_O": self.b_O, "W_out": self.W_out,
                "b_out": self.b_out,  # ln_final has no params once fold_ln made it LNPre/RMSPre
                **{f"ln_final.{k}": v for k, v in self.params.get("ln_final", {}).items()}}
        self._weights_memo = (self.params, weights)
        return weights

    def process_weights(self, fold_ln: bool = True, center_writing_weights: bool = True, center_unembed: bool = True,
                        fold_value_biases: bool = True) -> "HookedTransformer":
        """A new model with TransformerLens's weight processing applied (defaults as its
        `process_weights`); log-probabilities are unchanged. See `jaxlens.processing`."""
        from jaxlens.model.processing import process_params

        host = jax.tree.map(np.asarray, self.params)  # processed once on the host, like from_pretrained
        params, cfg = process_params(host, self.cfg, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                                     center_unembed=center_unembed, fold_value_biases=fold_value_biases)
        return self._derived(cfg, jax.device_put(params), self.tokenizer, self.precision)

    def hook_names(self, include_result: bool = True) -> list[str]:
        from jaxlens.hooks import hook_names

        return hook_names(self.cfg, include_result)

    # --- TransformerLens's switches for its opt-in hooks --------------------------------------
    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """`blocks.{l}.attn.hook_result` [batch pos head d_model] in runs with names_filter None,
        a regex or a callable (TransformerLens's switch; naming the hook always captures it)."""
        self.cfg = self.cfg.replace(use_attn_result=_switch("use_attn_result", use_attn_result))

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """`blocks.{l}.hook_mlp_in` [batch pos d_model], the MLP branch's input (resid_mid; resid_pre
        in a parallel block) before ln2, in default runs; an edit there changes the MLP's input only."""
        self.cfg = self.cfg.replace(use_hook_mlp_in=_switch("use_hook_mlp_in", use_hook_mlp_in))

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """`blocks.{l}.hook_q_input` / `hook_k_input` / `hook_v_input` [batch pos head|kv_head d_model]
        in default runs: resid_pre repeated per head, normed by ln1 per head, so an edit reaches
        one path (queries, keys or values) only. Exclusive with `set_use_attn_in`, as in TL."""
        self.cfg = self.cfg.replace(use_split_qkv_input=_switch("use_split_qkv_input", use_split_qkv_input))

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """`blocks.{l}.hook_attn_in` [batch pos head d_model] in default runs: one per-head copy of
        resid_pre feeding queries, keys and values (keys/values read its first n_kv_heads heads)."""
        self.cfg = self.cfg.replace(use_attn_in=_switch("use_attn_in", use_attn_in))

    def save(self, path: str | Path, overwrite: bool = False, format: str = "safetensors") -> Path:
        """Save as a jaxlens converted folder (+ tokenizer), loadable without torch/transformers;
        written atomically, replacing an existing converted folder only with `overwrite`.

        `format`: "safetensors" (one file, gathered on the host: small models;
        `jaxlens.conversion.save_converted`) or "orbax" (sharded, each host writes the shards it
        holds, restored into any mesh: `jaxlens.checkpoint.save_orbax`). `from_pretrained` reads both."""
        if format not in SAVE_FORMATS:
            raise ValueError(f"format {format!r} is not one of {SAVE_FORMATS}")
        params = unstack_layers(self.params, self.cfg.n_layers) if self.scan_layers else self.params
        if format == "orbax":
            from jaxlens.checkpoint import save_orbax

            return save_orbax(path, self.cfg, params, tokenizer=self.tokenizer, overwrite=overwrite)
        from jaxlens.conversion import save_converted

        if not all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(params)):
            raise ValueError("this model's parameters span several processes, which one safetensors file cannot "
                             "gather: save with format='orbax' (each process writes its shards)")
        return save_converted(path, self.cfg, jax.tree.map(np.asarray, params), tokenizer=self.tokenizer,
                              overwrite=overwrite)

    # --- TransformerLens analysis helpers (factored matrices, directions) --------------------
    @property
    def QK(self) -> "FactoredMatrix":
        """Every head's QK circuit W_Q @ W_K^T as a FactoredMatrix [n_layers n_heads d_model d_model]
        (grouped keys expanded to all heads, as TransformerLens)."""
        from jaxlens.model.factored_matrix import FactoredMatrix

        return FactoredMatrix(self.W_Q, jnp.swapaxes(self.W_K, -1, -2))

    @property
    def OV(self) -> "FactoredMatrix":
        """Every head's OV circuit W_V @ W_O as a FactoredMatrix [n_layers n_heads d_model d_model]."""
        from jaxlens.model.factored_matrix import FactoredMatrix

        return FactoredMatrix(self.W_V, self.W_O)

    def all_composition_scores(self, mode: str) -> jax.Array:
        """[n_layers n_heads n_layers n_heads]: how much head (l, h)'s OV output composes into head
        (l', h')'s queries (mode "Q"), keys ("K") or values ("V"), 0 unless l < l' (TransformerLens's,
        Elhage et al. 2021); computed one source layer at a time from the factors."""
        from jaxlens.model.factored_matrix import FactoredMatrix, composition_scores

        if mode not in ("Q", "K", "V"):
            raise ValueError(f"mode must be one of ['Q', 'K', 'V'] not {mode!r}")
        W_V, W_O = self.W_V, self.W_O
        if mode == "V":
            right = FactoredMatrix(W_V, W_O)
        else:
            qk = (self.W_Q, jnp.swapaxes(self.W_K, -1, -2))
            right = FactoredMatrix(*qk) if mode == "Q" else FactoredMatrix(*qk).T
        scores = jnp.stack([composition_scores(FactoredMatrix(W_V[l], W_O[l]), right)
                            for l in range(self.cfg.n_layers)])
        layer = jnp.arange(self.cfg.n_layers)
        return jnp.where(layer[:, None, None, None] < layer[None, None, :, None], scores, 0.0)

    def tokens_to_residual_directions(self, tokens: Any) -> jax.Array:
        """The unembedding direction (column of W_U) of each token: [..., d_model] for token ids of any
        shape, [d_model] for one token (a string, an int, or, as in TransformerLens, a one-element array).

        Read in the processed basis (fold_ln) these are the directions whose dot product is the logit.
        """
        W_U = self.W_U
        if isinstance(tokens, jax.core.Tracer):  # inside jit: no range check possible
            return jnp.moveaxis(jnp.take(W_U, tokens, axis=1), 0, -1)
        if isinstance(tokens, str):
            return W_U[:, self.to_single_token(tokens)]
        ids = np.asarray(tokens)
        if not np.issubdtype(ids.dtype, np.integer) or ids.size == 0:
            raise ValueError(f"tokens must be a string, an int or an array of token ids; got {type(tokens).__name__} "
                             f"of dtype {ids.dtype} and shape {ids.shape}")
        check_tokens(ids.reshape(1, -1), self.cfg)  # ids outside the vocabulary: JAX would clamp silently
        if ids.size == 1:  # TransformerLens: a one-element tensor gives one direction, its shape dropped
            return W_U[:, int(ids.reshape(()))]
        return jnp.moveaxis(W_U[:, ids], 0, -1)

    def get_token_position(self, single_token: str | int, input: Any, mode: str = "first",
                           prepend_bos: bool | None = None, padding_side: str | None = None) -> int:
        """Position of `single_token` (a string of one token, or an id) in `input` (a string, or the
        tokens [pos] / [1 pos]); the first or last occurrence (`mode`). ValueError if it is absent."""
        if mode not in ("first", "last"):
            raise ValueError(f"mode must be 'first' or 'last', not {mode!r}")
        if isinstance(input, str):
            toks = np.asarray(self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side or "right"))
        else:
            toks = np.asarray(input)
        if toks.ndim == 2:
            if toks.shape[0] != 1:
                raise ValueError(f"rank-2 tokens must have shape [1, seq_len], not {toks.shape}: pass one prompt")
            toks = toks[0]
        if toks.ndim != 1:
            raise ValueError(f"input must be a string or tokens of shape [pos] or [1, pos], got shape {toks.shape}")
        token = self.to_single_token(single_token) if isinstance(single_token, str) else int(np.asarray(single_token))
        where = np.flatnonzero(toks == token)
        if where.size == 0:
            raise ValueError(f"token {single_token!r} (id {token}) does not occur in the input")
        return int(where[0] if mode == "first" else where[-1])

    class _HeadLabels(list):
        """A list of head labels that can also be called: TransformerLens 4 has `all_head_labels` as a
        property, the legacy HookedTransformer as a method; both spellings work."""

        def __call__(self) -> list[str]:
            return list(self)

    @property
    def all_head_labels(self) -> "_HeadLabels":
        """["L0H0", "L0H1", ...]: one label per head, layer-major (`model.all_head_labels` or `...()`)."""
        return self._HeadLabels(f"L{l}H{h}" for l in range(self.cfg.n_layers) for h in range(self.cfg.n_heads))

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> jax.Array:
        """Sum of the biases written to the residual stream before `layer` [d_model]: b_O (and b_out
        unless include_mlp_biases=False) of layers < layer; with mlp_input, also layer's own b_O.

        As TransformerLens, mlp_input adds b_O also for parallel attention/MLP blocks (NeoX), whose MLP
        does not read it."""
        n = self.cfg.n_layers
        layer = index(layer, n, "layer", negative=False, end=True,
                      context=f"(n_layers={n} is the final residual stream)")
        if mlp_input and int(layer) == n:
            raise ValueError(f"mlp_input=True needs layer < n_layers={n}: there is no attention bias beyond the "
                             "final layer")
        b_O = self.b_O.astype(jnp.float32)
        total = b_O[:layer].sum(0)
        if include_mlp_biases:
            total = total + self.b_out.astype(jnp.float32)[:layer].sum(0)
        if mlp_input:
            total = total + b_O[layer]
        return total

    def refactor_factored_attn_matrices(self) -> "HookedTransformer":
        """A new model with TransformerLens's `refactor_factored_attn_matrices` applied: W_Q/W_K even,
        W_V/W_O orthogonal factors of each head's unchanged QK and OV products (outputs unchanged).
        See `jaxlens.factored_matrix.refactor_factored_attn_matrices`."""
        from jaxlens.model.factored_matrix import refactor_factored_attn_matrices

        params, cfg = refactor_factored_attn_matrices(self.params, self.cfg)
        return self._derived(cfg, params, self.tokenizer, self.precision)


def _load_sharded(path: str | Path, dtype: Any, allow_nonfinite: bool, mesh: Any, scan_layers: bool,
                  flags: dict[str, bool]) -> tuple[ModelConfig, dict[str, Any], int]:
    """(cfg, params, `source_param_count` of the unprocessed params) loaded straight into the shards of `mesh`: each parameter is read (and
    converted, checked, cast) only for the slices this process's devices hold, one parameter at a
    time (an Orbax folder is restored into the shardings directly); weight processing (one block
    per program: `process_sharded`) and layer stacking (`transform_sharded`) then run on the mesh,
    so the model is never whole on the host."""
    from jaxlens.conversion import is_orbax, load_any
    from jaxlens.distributed import check_fits, process_sharded, transform_sharded

    if is_orbax(path):
        from jaxlens.checkpoint import restore_orbax

        cfg, params = restore_orbax(path, mesh, dtype, allow_nonfinite=allow_nonfinite)
    else:
        cfg, params = load_any(path, dtype, allow_nonfinite=allow_nonfinite, lazy=True)
        check_fits(cfg, mesh)  # before anything is read
    n_source = source_param_count(params)
    if any(flags.values()):  # part by part, each read as its turn comes: never the model twice
        params, cfg = process_sharded(params, cfg, mesh, **flags)
    else:
        params = shard_params(params, cfg, mesh)
    if scan_layers != bool(is_scanned(params)):
        relayout = (lambda p: (stack_layers(p, cfg.n_layers, jnp), cfg)) if scan_layers else \
            (lambda p: (unstack_layers(p, cfg.n_layers), cfg))
        params, cfg = transform_sharded(relayout, params, mesh)
    return cfg, params, n_source


def source_param_count(params: dict[str, Any]) -> int:
    """The parameter count of the HF model that unprocessed `params` come from: every stored
    number once (a tied unembedding is stored once, as W_E), less `b_U`, which jaxlens always
    keeps (zeros) and no supported family's lm_head has."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return sum(math.prod(x.shape) for path, x in leaves if getattr(path[0], "key", None) != "b_U")


def from_pretrained(path: str | Path, dtype: Any = "float32", **kw: Any) -> HookedTransformer:
    """Load a HF checkpoint folder or a jaxlens converted folder as a HookedTransformer, with
    TransformerLens's default weight processing (`HookedTransformer.from_pretrained`)."""
    return HookedTransformer.from_pretrained(path, dtype, **kw)


def from_pretrained_no_processing(path: str | Path, dtype: Any = "float32", **kw: Any) -> HookedTransformer:
    """Load with HF's raw weights (`HookedTransformer.from_pretrained_no_processing`)."""
    return HookedTransformer.from_pretrained_no_processing(path, dtype, **kw)

__all__ = ["RETURN_TYPES", "SAVE_FORMATS", "lm_loss", "tokenizer_prepends_bos", "HookedTransformer", "from_pretrained",
           "from_pretrained_no_processing"]
