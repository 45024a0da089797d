"""HookedTransformer: TransformerLens's user-facing API over the functional JAX model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.cache import ActivationCache
from jaxlens.config import ModelConfig
from jaxlens.forward import forward_jit, stack_layers, unstack_layers
from jaxlens.hooks import Hooks, NamesFilter, make_hooks, resolve_names
from jaxlens.model import Transformer
from jaxlens.tokens import check_tokens, encode, load_tokenizer

RETURN_TYPES = ("logits", "loss", "both", None)


def lm_loss(logits: jax.Array, tokens: jax.Array, attention_mask: jax.Array | None = None,
            per_token: bool = False) -> jax.Array:
    """Next-token cross entropy (TransformerLens `lm_cross_entropy_loss`), padding excluded."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    if per_token:
        return nll
    if attention_mask is None:
        return nll.mean()
    m = (attention_mask[:, 1:] * attention_mask[:, :-1]).astype(jnp.float32)
    return (nll * m).sum() / jnp.maximum(m.sum(), 1.0)


class HookedTransformer:
    """A converted model: `cfg`, `params` (a pytree), the linen `module`, and a `tokenizer`.

    Calls are jit-compiled and cached per configuration and shape. `precision` is the matmul
    precision ("highest" for parity work; None keeps the backend default, which on TPU is bf16).
    """

    def __init__(self, cfg: ModelConfig, params: dict[str, Any], tokenizer: Any = None, *,
                 precision: str | None = "highest"):
        self.cfg = cfg
        self.params = params
        self.tokenizer = tokenizer
        self.precision = precision

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: Any = "float32", *, scan_layers: bool = False,
                        precision: str | None = "highest", tokenizer: Any = None, fold_ln: bool = False,
                        center_writing_weights: bool = False, center_unembed: bool = False,
                        fold_value_biases: bool = False) -> "HookedTransformer":
        """Load a checkpoint. The processing flags (TransformerLens's weight processing, see
        `jaxlens.processing`) default to off, like TransformerLens 4.x's `boot_transformers`, so
        activations match HF; turn them on (or call `process_weights()`) for TransformerLens's
        processed coordinates (`enable_compatibility_mode()`, legacy `HookedTransformer`)."""
        from jaxlens.conversion import load_any
        from jaxlens.processing import process_params

        cfg, params = load_any(path, dtype)
        if fold_ln or center_writing_weights or center_unembed or fold_value_biases:  # on the host, in numpy
            params, cfg = process_params(params, cfg, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                                         center_unembed=center_unembed, fold_value_biases=fold_value_biases)
        params = jax.tree.map(jnp.asarray, params)
        if scan_layers and "blocks" not in params:
            params = stack_layers(params, cfg.n_layers)
        if not scan_layers and "blocks" in params:
            params = unstack_layers(params, cfg.n_layers)
        tok = tokenizer if tokenizer is not None else load_tokenizer(path)
        return cls(cfg, params, tok, precision=precision)

    @property
    def module(self) -> Transformer:
        return Transformer(self.cfg, scan_layers="blocks" in self.params, dtype=self.params["W_E"].dtype)

    @property
    def scan_layers(self) -> bool:
        return "blocks" in self.params

    # --- tokens -----------------------------------------------------------------------------
    def to_tokens(self, input: str | Sequence[str], prepend_bos: bool | None = None,
                  padding_side: str = "right", return_mask: bool = False) -> Any:
        toks, mask = encode(self.tokenizer, input, self.cfg, prepend_bos, padding_side)
        check_tokens(toks, self.cfg, mask)
        toks, mask = jnp.asarray(toks), jnp.asarray(mask)
        return (toks, mask) if return_mask else toks

    def to_str_tokens(self, input: Any, prepend_bos: bool | None = None) -> list[str] | list[list[str]]:
        if isinstance(input, str):
            input = self.to_tokens(input, prepend_bos)[0]
        elif isinstance(input, (list, tuple)) and input and isinstance(input[0], str):
            return [self.to_str_tokens(s, prepend_bos) for s in input]
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

    def to_single_token(self, string: str) -> int:
        toks = np.asarray(self.to_tokens(string, prepend_bos=False))[0]
        if toks.shape[0] != 1:
            raise ValueError(f"{string!r} is {toks.shape[0]} tokens, not one: {self.to_str_tokens(string, False)}")
        return int(toks[0])

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; cannot turn tokens into text")
        return self.tokenizer.decode(ids, clean_up_tokenization_spaces=False)

    def _inputs(self, input: Any, attention_mask: Any, prepend_bos: bool | None, padding_side: str):
        if isinstance(input, str) or (isinstance(input, (list, tuple)) and input and isinstance(input[0], str)):
            if attention_mask is not None:
                raise ValueError("attention_mask is computed from text input; pass it only with token ids")
            toks, mask = encode(self.tokenizer, input, self.cfg, prepend_bos, padding_side)
        else:
            if isinstance(input, (list, tuple)) and len(input) == 0:
                raise ValueError("input is empty: give a string, a list of strings or token ids")
            toks, mask = input, attention_mask
        toks, mask = check_tokens(toks, self.cfg, mask)
        return jnp.asarray(toks), jnp.asarray(mask)

    # --- running ----------------------------------------------------------------------------
    def _run(self, input, attention_mask, capture, hooks, prepend_bos, padding_side, return_type):
        if return_type not in RETURN_TYPES:
            raise ValueError(f"return_type must be one of {RETURN_TYPES}, got {return_type!r}")
        toks, mask = self._inputs(input, attention_mask, prepend_bos, padding_side)
        logits, acts, _ = forward_jit(self.params, self.cfg, toks, mask, hooks, capture=capture,
                                      precision=self.precision, return_logits=return_type is not None)
        if return_type == "logits":
            out = logits
        elif return_type == "loss":
            out = lm_loss(logits, toks, mask)
        elif return_type == "both":
            out = (logits, lm_loss(logits, toks, mask))
        else:
            out = None
        return out, acts

    def __call__(self, input: Any, attention_mask: Any = None, return_type: str | None = "logits", *,
                 prepend_bos: bool | None = None, padding_side: str = "right", fwd_hooks: Any = None,
                 kv_cache: Any = None) -> Any:
        """Logits [batch pos vocab] (or loss, both, None) for a string, strings or token ids.

        With `kv_cache` (a `jaxlens.kv_cache.KVCache`), the input continues the cached tokens and
        the call returns (logits, new cache); the given cache is left unchanged.
        """
        if kv_cache is not None:
            return self._run_cached(input, attention_mask, kv_cache, make_hooks(fwd_hooks, self.cfg), prepend_bos,
                                    padding_side, return_type)
        out, _ = self._run(input, attention_mask, frozenset(), make_hooks(fwd_hooks, self.cfg), prepend_bos,
                           padding_side, return_type)
        return out

    def run_with_cache(self, input: Any, names_filter: NamesFilter = None, attention_mask: Any = None,
                       return_type: str | None = "logits", *, prepend_bos: bool | None = None,
                       padding_side: str = "right", fwd_hooks: Any = None,
                       remove_batch_dim: bool = False) -> tuple[Any, ActivationCache]:
        """(logits, ActivationCache). Only activations matched by `names_filter` are computed
        into the result; under jit the rest are never materialised."""
        capture = resolve_names(names_filter, self.cfg)
        out, acts = self._run(input, attention_mask, capture, make_hooks(fwd_hooks, self.cfg), prepend_bos,
                              padding_side, return_type)
        cache = ActivationCache(acts, self.cfg, True, self.cache_weights(), tokenizer=self.tokenizer)
        return out, (cache.remove_batch_dim() if remove_batch_dim else cache)

    def run_with_hooks(self, input: Any, fwd_hooks: Any = (), attention_mask: Any = None,
                       return_type: str | None = "logits", **kw: Any) -> Any:
        """Run with TransformerLens-style `fwd_hooks=[(name_or_filter, fn)]` applied inside jit."""
        return self(input, attention_mask, return_type, fwd_hooks=fwd_hooks, **kw)

    # --- KV cache and generation (jaxlens/kv_cache.py, jaxlens/generate.py) ------------------
    def _run_cached(self, input, attention_mask, kv_cache, hooks, prepend_bos, padding_side, return_type):
        from jaxlens.kv_cache import check_cache, forward_cached_jit

        if return_type != "logits":
            raise ValueError(f"with kv_cache only return_type='logits' is supported, got {return_type!r}")
        toks, mask = self._inputs(input, attention_mask, prepend_bos, padding_side)
        check_cache(kv_cache, self.cfg, toks.shape[0], toks.shape[1])
        logits, _, new_cache = forward_cached_jit(self.params, self.cfg, toks, mask, kv_cache, hooks=hooks,
                                                  precision=self.precision)
        return logits, new_cache

    def init_kv_cache(self, batch: int, max_len: int) -> Any:
        """An empty `KVCache` for this model (its dtype) of `batch` rows and `max_len` slots."""
        from jaxlens.kv_cache import KVCache

        return KVCache.init(self.cfg, batch, max_len, self.params["W_E"].dtype)

    def generate(self, input: Any = "", max_new_tokens: int = 10, stop_at_eos: bool = True,
                 eos_token_id: Any = None, do_sample: bool = True, top_k: int | None = None,
                 top_p: float | None = None, temperature: float = 1.0, *, key: Any = None,
                 prepend_bos: bool | None = None, attention_mask: Any = None, return_type: str = "input",
                 names_filter: NamesFilter = None, fwd_hooks: Any = None, kv_cache: Any = None,
                 max_len: int | None = None) -> Any:
        """TransformerLens's `generate` as one compiled loop; see `jaxlens.generate.generate`.

        Sampling (do_sample and temperature > 0) needs an explicit `key`. With `names_filter`
        returns (output, ActivationCache over the generated steps); `fwd_hooks` act at every step.
        """
        from jaxlens.generate import generate

        return generate(self, input, max_new_tokens, stop_at_eos=stop_at_eos, eos_token_id=eos_token_id,
                        do_sample=do_sample, top_k=top_k, top_p=top_p, temperature=temperature, key=key,
                        prepend_bos=prepend_bos, attention_mask=attention_mask, return_type=return_type,
                        names_filter=names_filter, fwd_hooks=fwd_hooks, kv_cache=kv_cache, max_len=max_len)

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
        return jnp.repeat(w, self.cfg.n_heads // self.cfg.kv_heads, axis=1)

    @property
    def W_E(self) -> jax.Array:
        return self.params["W_E"]

    @property
    def W_pos(self) -> jax.Array:
        if not self.cfg.has_pos_embed:
            raise AttributeError(f"{self.cfg.model_type} uses rotary positions: it has no W_pos")
        return self.params["W_pos"]

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
    b_K = property(lambda self: self._expand_kv(self._stacked("attn", "b_K", (self.cfg.kv_heads, self.cfg.d_head))))
    b_V = property(lambda self: self._expand_kv(self._stacked("attn", "b_V", (self.cfg.kv_heads, self.cfg.d_head))))
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
        from jaxlens.processing import process_params

        host = jax.tree.map(np.asarray, self.params)  # processed once on the host, like from_pretrained
        params, cfg = process_params(host, self.cfg, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                                     center_unembed=center_unembed, fold_value_biases=fold_value_biases)
        return type(self)(cfg, jax.tree.map(jnp.asarray, params), self.tokenizer, precision=self.precision)

    def hook_names(self, include_result: bool = True) -> list[str]:
        from jaxlens.hooks import hook_names

        return hook_names(self.cfg, include_result)

    def save(self, path: str | Path) -> Path:
        """Save as a jaxlens converted folder (+ tokenizer), loadable without torch/transformers."""
        from jaxlens.conversion import save_converted

        params = unstack_layers(self.params, self.cfg.n_layers) if self.scan_layers else self.params
        out = save_converted(path, self.cfg, jax.tree.map(np.asarray, params))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(out))
        return out


def from_pretrained(path: str | Path, dtype: Any = "float32", **kw: Any) -> HookedTransformer:
    """Load a HF checkpoint folder or a jaxlens converted folder as a HookedTransformer."""
    return HookedTransformer.from_pretrained(path, dtype, **kw)
