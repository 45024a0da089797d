"""ActivationCache: an immutable pytree of named activations with TransformerLens's API.

Leaves are the activation arrays and the few weights the analyses need (`weights`: W_U, b_U,
W_O, b_O, W_out, b_out, the final norm's w and b). The static part is the key order,
`has_batch_dim`, the model config, the tokenizer (for `logit_attrs` with string tokens) and a
`CacheMeta` (info strings, metadata, aggregation strategies). So a cache passes through `jit`,
`vmap`, `jax.tree.map`, `device_put` and `grad` like any pytree, and needs no model argument.

Every method returns arrays or a new cache; the few TransformerLens methods that mutate its cache
in place (`to`, `cpu`, `remove_batch_dim`, `compute_head_results`) return a new one here and warn
(once per method) when called as a bare statement, which would throw the result away. The
analyses (`accumulated_resid`, `decompose_resid`, `get_full_resid_decomposition`,
`stack_head_results`, `stack_neuron_results`, `logit_attrs`, ...) are TransformerLens 4.x's, with
its names, defaults, labels and shapes; they run as compiled programs from `jaxlens.analysis`
(flags static, compiled once and reused). Aggregation across batches (`cat`, strategies, info,
metadata, memory tree) is `jaxlens.aggregate`'s.
"""

from __future__ import annotations

import dis
import functools
import logging
import sys
import types
import warnings
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.cache import aggregate as agg
from jaxlens.cache import analysis as A
from jaxlens.devices import resolve_device
from jaxlens.fingerprint import Identity
from jaxlens.config import ModelConfig
from jaxlens.hooks import did_you_mean, get_act_name
from jaxlens.cache.slice import Slice, SliceInput
from jaxlens.validate import index

log = logging.getLogger(__name__)



class DiscardedResultWarning(UserWarning):
    """A cache method that TransformerLens runs in place was called as a statement: its new cache is lost."""


class LayerIndexError(ValueError, KeyError):
    """A layer index outside the model (a ValueError; also a KeyError, as TransformerLens's lookup raises)."""

    __str__ = BaseException.__str__  # KeyError's would quote the message


_DISCARD_WARNED: set[str] = set()  # methods already warned about (once per method and process)
_DISCARDING_OPS = ("POP_TOP", "PRINT_EXPR", "INTRINSIC_PRINT")  # a statement; a REPL / notebook cell's last line


@functools.lru_cache(maxsize=512)
def _discards_call_at(code: types.CodeType, lasti: int) -> bool:
    """Whether the call instruction running at byte offset `lasti` of `code` (CPython points into
    its inline CACHE entries) is followed by one that drops its value."""
    ins = [i for i in dis.get_instructions(code) if i.opname != "CACHE"]
    for here, nxt in zip(ins, ins[1:]):
        if here.offset <= lasti < nxt.offset:
            after = nxt.argrepr if nxt.opname == "CALL_INTRINSIC_1" else nxt.opname  # 3.12+: INTRINSIC_PRINT
            return here.opname.startswith("CALL") and after in _DISCARDING_OPS
    return False


def _result_discarded(depth: int) -> bool:
    """Whether the Python frame `depth` levels up calls us as a bare statement; False when that
    cannot be told (no frame introspection, unfamiliar bytecode)."""
    try:
        frame = sys._getframe(depth + 1)
        return _discards_call_at(frame.f_code, frame.f_lasti)
    except Exception:  # any interpreter without CPython frames/bytecode: do nothing
        return False


def _warn_if_discarded(method: str, hint: str) -> None:
    """Warn once per `method` when the user's call (two frames up) throws away the new cache."""
    if method in _DISCARD_WARNED or not _result_discarded(2):
        return
    _DISCARD_WARNED.add(method)
    warnings.warn(f"cache.{method}() returns a new ActivationCache and leaves this one unchanged (jaxlens caches "
                  f"are immutable pytrees; TransformerLens changes its cache in place), so calling it as a "
                  f"statement does nothing: write `{hint}`", DiscardedResultWarning, stacklevel=3)


def _device(device: Any) -> Any:
    """What `to` hands `jax.device_put`: a jax Device, a Sharding or a `cache.spec(...)` tree of them
    passed through, or a device name resolved (`jaxlens.devices.resolve_device`)."""
    if isinstance(device, (jax.Device, jax.sharding.Sharding, ActivationCache)):
        return device
    return resolve_device(device)


@jax.tree_util.register_pytree_node_class
class ActivationCache:
    """Activations keyed by TransformerLens hook name.

    `cache["blocks.3.attn.hook_pattern"]`, `cache["pattern", 3]`, `cache["pattern", -1]` and
    `cache["scale", 3, "ln1"]` index the same way TransformerLens's cache does; a layer outside the
    model raises `LayerIndexError` (a ValueError and a KeyError) instead of a bare missing key.

    IMMUTABLE: every method returns a new cache. `cache.compute_head_results()`,
    `cache.remove_batch_dim()`, `cache.to(...)` and `cache.cpu()` written as statements (as with
    TransformerLens, which mutates in place) do nothing; write `cache = cache.compute_head_results()`.
    Such a discarded call warns once per method (`DiscardedResultWarning`).

    Activations are jax arrays: `np.asarray(x)` gives numpy (zero-copy on CPU, read-only), and
    `torch.from_numpy(np.asarray(x))` a torch tensor sharing that memory (torch warns that it is
    read-only; `torch.from_numpy(np.array(x))` copies into a writable one). bfloat16 has no torch
    numpy path: convert with `np.asarray(x, np.float32)`. `cache.to_numpy()` converts them all.
    """

    def __init__(self, cache_dict: Mapping[str, Any], cfg: ModelConfig | None = None, has_batch_dim: bool = True,
                 weights: Mapping[str, Any] | None = None, *, tokenizer: Any = None,
                 meta: agg.CacheMeta | None = None):
        self._d = dict(cache_dict)
        self.cfg = cfg
        self.has_batch_dim = has_batch_dim
        self.weights = dict(weights or {})
        self.tokenizer = tokenizer
        self.meta = meta if meta is not None else agg.EMPTY_META

    # --- pytree -----------------------------------------------------------------------------
    def tree_flatten(self):
        keys = tuple(self._d)
        wkeys = tuple(sorted(self.weights))
        children = (tuple(self._d[k] for k in keys), tuple(self.weights[k] for k in wkeys))
        return children, (keys, wkeys, self.cfg, self.has_batch_dim, Identity(self.tokenizer), self.meta)

    @classmethod
    def tree_unflatten(cls, aux, children):
        keys, wkeys, cfg, has_batch_dim, tok, meta = aux
        acts, ws = children
        obj = cls.__new__(cls)
        obj._d = dict(zip(keys, acts))
        obj.weights = dict(zip(wkeys, ws))
        obj.cfg = cfg
        obj.has_batch_dim = has_batch_dim
        obj.tokenizer = tok.obj
        obj.meta = meta
        return obj

    def _replace(self, cache_dict: Mapping[str, Any] | None = None, **kw: Any) -> "ActivationCache":
        return ActivationCache(self._d if cache_dict is None else cache_dict, kw.get("cfg", self.cfg),
                               kw.get("has_batch_dim", self.has_batch_dim), kw.get("weights", self.weights),
                               tokenizer=kw.get("tokenizer", self.tokenizer), meta=kw.get("meta", self.meta))

    def spec(self, activations: Any, weights: Any = None) -> "ActivationCache":
        """A tree of this cache's structure holding `activations` at every activation and `weights`
        at every weight: vmap axes, or shardings for `jax.device_put` (e.g. activations split over
        the batch, weights replicated)."""
        return self._replace({k: activations for k in self._d}, weights={k: weights for k in self.weights})

    def batch_axes(self, axis: int = 0) -> "ActivationCache":
        """An `in_axes`/`out_axes` spec for `jax.vmap` over the batch: activations on `axis`,
        weights unmapped. `jax.vmap(f, in_axes=(cache.batch_axes(),))(cache)`."""
        return self.spec(axis, None)

    # --- mapping ----------------------------------------------------------------------------
    def _key(self, key: Any) -> str:
        if isinstance(key, str):
            return key if key in self._d else get_act_name(key)
        if isinstance(key, tuple):
            if len(key) > 1 and isinstance(key[1], (int, np.integer)) and not isinstance(key[1], bool):
                key = (key[0], self._layer_of_key(key), *key[2:])
            return get_act_name(*key)
        raise KeyError(f"cache keys are hook names or (name, layer[, layer_type]) tuples, not {type(key).__name__}")

    def _layer_of_key(self, key: tuple) -> int:
        """The layer of a `(name, layer, ...)` key, negative counting from the end as in TransformerLens;
        one outside the model raises LayerIndexError naming the valid range, not a bare missing key."""
        n = getattr(self.cfg, "n_layers", None)
        if n is None:
            return int(key[1])
        return index(key[1], n, f"cache[{key!r}]: layer", context=f"for this {n}-layer model", error=LayerIndexError)

    @property
    def cache_dict(self) -> Mapping[str, Any]:
        """The activations by hook name (TransformerLens's attribute), as a read-only mapping view:
        to change one, use `cache.set(name, value)`, which returns a new cache."""
        return types.MappingProxyType(self._d)

    has_embed = property(lambda self: "hook_embed" in self._d, doc="Is hook_embed cached? (TransformerLens's attribute)")
    has_pos_embed = property(lambda self: "hook_pos_embed" in self._d, doc="Is hook_pos_embed cached?")

    def __getitem__(self, key: Any) -> Any:
        name = self._key(key)
        if name not in self._d:
            raise KeyError(f"{name!r} is not in this cache{did_you_mean(name, self._d)}; it holds {len(self._d)} "
                           "activations: run with a names_filter that includes it")
        return self._d[name]

    def __contains__(self, key: Any) -> bool:
        try:
            return self._key(key) in self._d
        except (KeyError, TypeError, ValueError):
            return False

    def __len__(self) -> int:
        return len(self._d)

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def keys(self):
        return self._d.keys()

    def values(self):
        return self._d.values()

    def items(self):
        return self._d.items()

    def get(self, key: Any, default: Any = None) -> Any:
        return self[key] if key in self else default

    def to_dict(self) -> dict[str, Any]:
        return dict(self._d)

    def __repr__(self) -> str:
        return f"ActivationCache with keys {list(self._d)}"

    def to(self, device: Any) -> "ActivationCache":
        """A NEW cache (activations and weights) on `device`: a jax Device, a Sharding, a tree of
        shardings from `cache.spec(...)`, or a platform string "cpu", "gpu"/"cuda", "tpu" (optionally
        ":index"). This cache is unchanged, so a bare `cache.to("cpu")` (TransformerLens moves in
        place) does nothing and warns once."""
        out = jax.device_put(self, _device(device))
        _warn_if_discarded("to", "cache = cache.to(device)")
        return out

    def cpu(self) -> "ActivationCache":
        """A NEW cache on the first CPU device (`to("cpu")`); a bare `cache.cpu()` warns once."""
        out = jax.device_put(self, _device("cpu"))
        _warn_if_discarded("cpu", "cache = cache.cpu()")
        return out

    def toggle_autodiff(self, mode: bool = False) -> None:
        """Accepted and ignored. TransformerLens sets torch's global grad mode here; JAX has no such
        state (gradients exist only inside `jax.grad`, and caches hold plain arrays), so there is
        nothing to turn off. Use `jax.lax.stop_gradient` to cut a value out of a differentiated function."""
        del mode

    # --- batch handling (TransformerLens) ---------------------------------------------------
    def remove_batch_dim(self, batch_size: int | None = None) -> "ActivationCache":
        """A NEW cache without the batch dimension, which must be 1 (TransformerLens's semantics:
        `batch_size` defaults to the most common leading size; entries whose leading size is 1 lose
        that axis). This cache is unchanged: a bare `cache.remove_batch_dim()` does nothing, so it
        warns once; write `cache = cache.remove_batch_dim()`."""
        if not self.has_batch_dim:
            log.warning("Tried removing batch dimension after already having removed it.")
            return self
        n = self._batch_size() if batch_size is None else batch_size
        if n != 1:
            raise ValueError(f"remove_batch_dim needs batch size 1, but this cache's batch size is {n}; "
                             "use apply_slice_to_batch_dim(i) to pick one element")
        new = {k: v[0] if getattr(v, "ndim", 0) > 0 and v.shape[0] == 1 else v for k, v in self._d.items()}
        out = self._replace(new, has_batch_dim=False)
        _warn_if_discarded("remove_batch_dim", "cache = cache.remove_batch_dim()")
        return out

    def _batch_size(self) -> int:
        sizes = [v.shape[0] for v in self._d.values() if getattr(v, "ndim", 0) > 0]
        return max(set(sizes), key=sizes.count) if sizes else 1

    def apply_slice_to_batch_dim(self, batch_slice: SliceInput) -> "ActivationCache":
        """A new cache with `batch_slice` applied to the batch axis (an int removes the axis)."""
        s = Slice(batch_slice)
        if s.mode == "identity":
            # TransformerLens asserts even for an identity slice on a batchless cache; a no-op is kinder
            return self
        if not self.has_batch_dim:
            raise ValueError("this cache has no batch dimension (remove_batch_dim was applied); "
                             "it cannot be sliced along the batch")
        n = self._batch_size()
        s.check(n, "batch_slice")
        new = {k: s.apply(v, 0) if getattr(v, "ndim", 0) > 0 and v.shape[0] == n else v for k, v in self._d.items()}
        return self._replace(new, has_batch_dim=s.mode != "int")

    def to_numpy(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in self._d.items()}

    # --- helpers for the analyses -----------------------------------------------------------
    def _need_cfg(self, what: str) -> ModelConfig:
        if self.cfg is None:
            raise ValueError(f"{what} needs the model config: build the cache with HookedTransformer.run_with_cache "
                             "or pass cfg= to ActivationCache")
        return self.cfg

    def _subset(self, what: str, keys: Sequence[str], wkeys: Sequence[str] = ()) -> "ActivationCache":
        """The few activations and weights an analysis reads (so compiled calls take only those)."""
        missing = [k for k in dict.fromkeys(keys) if k not in self._d]
        if missing:
            raise ValueError(f"{what} needs {missing[:4]}{' ...' if len(missing) > 4 else ''} in the cache; "
                             "run_with_cache with a names_filter that includes them (or None for all)")
        wmissing = [k for k in wkeys if k not in self.weights]
        if wmissing:
            raise ValueError(f"{what} needs the weights {wmissing} in the cache; build it with "
                             "HookedTransformer.run_with_cache (which attaches cache_weights())")
        return ActivationCache({k: self._d[k] for k in dict.fromkeys(keys)}, self.cfg, self.has_batch_dim,
                               {k: self.weights[k] for k in wkeys})

    def _resid_len(self) -> int | None:
        """Length of the position axis (for checking pos_slice), from any residual activation."""
        k = A.residual_like_key(self._d)
        return None if k is None else self._d[k].shape[-2]

    def _pos(self, pos_slice: SliceInput) -> Slice:
        s = Slice(pos_slice)
        n = self._resid_len()
        return s.check(n, "pos_slice") if n is not None else s

    def _scale_keys(self, layer: int, mlp_input: bool, apply_ln: bool) -> list[str]:
        if not apply_ln:
            return []
        if mlp_input:
            A.check_mlp_input(self.cfg, layer, "apply_ln with mlp_input")
        return [A.scale_key(self.cfg, layer, mlp_input)]

    # --- TransformerLens analyses -----------------------------------------------------------
    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice: SliceInput = None, mlp_input: bool = False, return_labels: bool = False):
        """The residual stream before each layer up to `layer` (logit lens), [components *bp d_model].

        Labels "{l}_pre", "{l}_mid", "final_post". `apply_ln` at the unembed runs the real final norm
        on each component; at an inner layer it divides by that layer's cached norm scale.
        """
        cfg = self._need_cfg("accumulated_resid")
        layer = A.resolve_layer(cfg, layer, "accumulated_resid")
        plan = A.accumulated_plan(cfg, layer, incl_mid, mlp_input)
        recompute = apply_ln and layer == cfg.n_layers
        keys = [k for _, k in plan] + ([] if recompute else self._scale_keys(layer, mlp_input, apply_ln))
        wkeys = [k for k in ("ln_final.w", "ln_final.b") if recompute and k in self.weights]
        out = A.accumulated_resid_jit(self._subset("accumulated_resid", keys, wkeys), self._pos(pos_slice),
                                      layer=layer, incl_mid=incl_mid, apply_ln=apply_ln, mlp_input=mlp_input)
        return (out, [lab for lab, _ in plan]) if return_labels else out

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False, mode: str = "all",
                        apply_ln: bool = False, pos_slice: SliceInput = None, incl_embeds: bool = True,
                        return_labels: bool = False):
        """The input to `layer` split into embed, pos_embed and every block's attn/MLP output.

        Labels "embed", "pos_embed", "{l}_attn_out", "{l}_mlp_out". Sums to resid_pre of `layer`
        (resid_mid with mlp_input).
        """
        cfg = self._need_cfg("decompose_resid")
        layer = A.resolve_layer(cfg, layer, "decompose_resid")
        plan = A.decompose_plan(cfg, self._d, layer, mlp_input, mode, incl_embeds)
        keys = [k for _, k in plan] + self._scale_keys(layer, mlp_input, apply_ln)
        out = A.decompose_resid_jit(self._subset("decompose_resid", keys), self._pos(pos_slice), layer=layer,
                                    mlp_input=mlp_input, mode=mode, apply_ln=apply_ln, incl_embeds=incl_embeds)
        return (out, [lab for lab, _ in plan]) if return_labels else out

    def _head_inputs(self, layer: int) -> tuple[list[str], list[str]]:
        keys = A.head_keys(self.cfg, self._d, layer)
        return keys, (["W_O"] if any(k.endswith("hook_z") for k in keys) else [])

    def _empty_key(self) -> list[str]:
        k = A.residual_like_key(self._d)
        if k is None:
            raise ValueError("an empty stack takes its shape from hook_embed or a residual activation; none is cached")
        return [k]

    def stack_head_results(self, layer: int | None = -1, return_labels: bool = False, incl_remainder: bool = False,
                           pos_slice: SliceInput = None, apply_ln: bool = False):
        """Every head's write to the residual stream for layers < `layer`: [(layer head) *bp d_model].

        Labels "L{l}H{h}" (+ "remainder": the rest of resid_pre of `layer`). Computed from hook_z and
        W_O unless hook_result was cached.
        """
        cfg = self._need_cfg("stack_head_results")
        layer = A.resolve_layer(cfg, layer, "stack_head_results")
        keys, wkeys = self._head_inputs(layer)
        if incl_remainder:
            keys.append(A.remainder_key(cfg, layer))
        elif layer == 0:
            keys += self._empty_key()
        keys += self._scale_keys(layer, False, apply_ln)
        out = A.stack_head_results_jit(self._subset("stack_head_results", keys, wkeys), self._pos(pos_slice),
                                       layer=layer, incl_remainder=incl_remainder, apply_ln=apply_ln)
        labels = A.head_labels(cfg, layer) + (["remainder"] if incl_remainder else [])
        return (out, labels) if return_labels else out

    def compute_head_results(self) -> "ActivationCache":
        """A NEW cache with `blocks.{l}.attn.hook_result` ([*bp head d_model]) for every layer,
        from hook_z and W_O (results already cached are kept).

        TransformerLens adds them to its cache in place; this cache is immutable and unchanged, so
        a bare `cache.compute_head_results()` does nothing and warns once: write
        `cache = cache.compute_head_results()`.
        """
        cfg = self._need_cfg("compute_head_results")
        have = [f"blocks.{l}.attn.hook_result" in self._d for l in range(cfg.n_layers)]
        if all(have):
            log.warning("Tried to compute head results when they were already cached")
            return self
        keys = [f"blocks.{l}.attn.hook_z" for l in range(cfg.n_layers)]
        res = A.compute_head_results_jit(self._subset("compute_head_results", keys, ["W_O"]))
        out = self._replace({**self._d, **{k: v for k, v in res.items() if k not in self._d}})
        _warn_if_discarded("compute_head_results", "cache = cache.compute_head_results()")
        return out

    def get_neuron_results(self, layer: int, neuron_slice: SliceInput = None, pos_slice: SliceInput = None):
        """Each neuron's write to the residual stream at `layer`: [*bp neurons d_model]."""
        cfg = self._need_cfg("get_neuron_results")
        n = cfg.n_layers
        if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool) or not -n <= layer < n:
            raise ValueError(f"get_neuron_results: layer={layer!r} is out of range for this {n}-layer model; "
                             f"use an int in [{-n}, {n}) (negative counts from the end)")
        layer = int(layer)
        layer %= cfg.n_layers
        ns = Slice(neuron_slice).check(cfg.d_mlp, "neuron_slice")
        sub = self._subset("get_neuron_results", [f"blocks.{layer}.mlp.hook_post"], ["W_out"])
        return A.get_neuron_results_jit(sub, ns, self._pos(pos_slice), layer=layer)

    def stack_neuron_results(self, layer: int | None, pos_slice: SliceInput = None, neuron_slice: SliceInput = None,
                             return_labels: bool = False, incl_remainder: bool = False, apply_ln: bool = False,
                             mlp_input: bool = False):
        """Every neuron's write for layers < `layer`: [(layer neuron) *bp d_model], labels "L{l}N{n}".

        An int `neuron_slice` keeps the neuron axis (TransformerLens). With `mlp_input` the remainder
        completes resid_mid of `layer` and `apply_ln` uses its ln2 scale.
        """
        cfg = self._need_cfg("stack_neuron_results")
        layer = A.resolve_layer(cfg, layer, "stack_neuron_results")
        if mlp_input:
            A.check_mlp_input(cfg, layer, "stack_neuron_results")
        ns = Slice.unwrap(neuron_slice).collapse_free().check(cfg.d_mlp, "neuron_slice")
        keys = [f"blocks.{l}.mlp.hook_post" for l in range(layer)]
        if incl_remainder:
            keys.append(A.remainder_key(cfg, layer, mlp_input))
        elif layer == 0:
            keys += self._empty_key()
        keys += self._scale_keys(layer, mlp_input, apply_ln)
        out = A.stack_neuron_results_jit(self._subset("stack_neuron_results", keys, ["W_out"] if layer else []),
                                         self._pos(pos_slice), ns, layer=layer, incl_remainder=incl_remainder,
                                         apply_ln=apply_ln, mlp_input=mlp_input)
        if not return_labels:
            return out
        return out, A.neuron_labels(cfg, layer, ns) + (["remainder"] if incl_remainder else [])

    def get_full_resid_decomposition(self, layer: int | None = None, mlp_input: bool = False,
                                     expand_neurons: bool = True, apply_ln: bool = False,
                                     pos_slice: SliceInput = None, return_labels: bool = False):
        """The input to `layer` split into every head, every neuron (or MLP layer), embed, pos_embed
        and the summed biases: [components *bp d_model]. It sums to resid_pre (resid_mid) of `layer`.
        """
        cfg = self._need_cfg("get_full_resid_decomposition")
        layer = A.resolve_layer(cfg, layer, "get_full_resid_decomposition")
        if mlp_input:
            A.check_mlp_input(cfg, layer, "get_full_resid_decomposition")
        keys, wkeys = self._head_inputs(layer + (1 if mlp_input else 0))
        if layer == 0 and not mlp_input:
            keys += self._empty_key()
        if layer > 0:
            keys += ([f"blocks.{l}.mlp.hook_post" for l in range(layer)] if expand_neurons
                     else [f"blocks.{l}.hook_mlp_out" for l in range(layer)])
        keys += [k for k in ("hook_embed", "hook_pos_embed") if k in self._d]
        keys += self._scale_keys(layer, mlp_input, apply_ln)
        wkeys = sorted(set(wkeys) | {"b_O", "b_out"} | ({"W_out"} if expand_neurons and layer else set()))
        out = A.get_full_resid_decomposition_jit(self._subset("get_full_resid_decomposition", keys, wkeys),
                                                 self._pos(pos_slice), layer=layer, mlp_input=mlp_input,
                                                 expand_neurons=expand_neurons, apply_ln=apply_ln)
        if not return_labels:
            return out
        return out, A.full_decomposition_labels(cfg, self._d, layer, mlp_input, expand_neurons)

    def apply_ln_to_stack(self, residual_stack: Any, layer: int | None = None, mlp_input: bool = False,
                          pos_slice: SliceInput = None, batch_slice: SliceInput = None, has_batch_dim: bool = True,
                          recompute_ln: bool = False) -> jax.Array:
        """Scale a stack of residual components as the input to `layer` is scaled (cached norm scale;
        LN centres first). `recompute_ln` at the unembed runs the real final norm per component."""
        cfg = self._need_cfg("apply_ln_to_stack")
        layer = A.resolve_layer(cfg, layer, "apply_ln_to_stack")
        stack = jnp.asarray(residual_stack)
        if stack.shape[-1] != cfg.d_model:
            raise ValueError(f"apply_ln_to_stack: the stack's last axis must be d_model={cfg.d_model}, "
                             f"got shape {tuple(stack.shape)}")
        recompute = recompute_ln and layer == cfg.n_layers
        if mlp_input and not recompute:
            A.check_mlp_input(cfg, layer, "apply_ln_to_stack")
        keys = [] if recompute else [A.scale_key(cfg, layer, mlp_input)]
        wkeys = [k for k in ("ln_final.w", "ln_final.b") if recompute and k in self.weights]
        bs = self._batch(batch_slice)
        return A.apply_ln_to_stack_jit(self._subset("apply_ln_to_stack", keys, wkeys), stack, self._pos(pos_slice),
                                       bs, layer=layer, mlp_input=mlp_input, has_batch_dim=has_batch_dim,
                                       recompute_ln=recompute)

    def _batch(self, batch_slice: SliceInput) -> Slice:
        s = Slice(batch_slice)
        return s.check(self._batch_size(), "batch_slice") if self.has_batch_dim else s

    def _token_ids(self, tokens: Any, what: str) -> tuple[Any, bool, tuple[int, ...]]:
        """(ids, single, shape for the shape check): str/int/one-element arrays are single tokens."""
        cfg = self.cfg
        if isinstance(tokens, str):
            if self.tokenizer is None:
                raise ValueError(f"{what} is a string but this cache has no tokenizer: pass token ids, or build "
                                 "the cache with HookedTransformer.run_with_cache (which attaches its tokenizer)")
            from jaxlens.tokens import encode

            ids, _ = encode(self.tokenizer, tokens, cfg, prepend_bos=False)
            if ids.shape[1] != 1:
                raise ValueError(f"{what} {tokens!r} is {ids.shape[1]} tokens, not one; pass a single-token string")
            return int(ids[0, 0]), True, ()
        if isinstance(tokens, (bool, np.bool_)):
            raise ValueError(f"{what} must be token ids, not a bool")
        if isinstance(tokens, (int, np.integer)):
            t = int(tokens)
            arr, single, shape = t, True, ()
        else:
            arr = tokens if isinstance(tokens, jax.Array) else np.asarray(tokens)
            if not jnp.issubdtype(arr.dtype, jnp.integer):
                raise ValueError(f"{what} must be integer token ids, got dtype {arr.dtype}")
            single, shape = arr.size == 1, tuple(arr.shape)
        if not isinstance(arr, jax.core.Tracer):
            a = np.asarray(arr)
            bad = a[(a < 0) | (a >= cfg.d_vocab)]
            if bad.size:
                raise ValueError(f"{what}: token id {int(bad.flat[0])} is outside the vocabulary [0, {cfg.d_vocab})")
        return arr, single, shape

    def logit_lens(self, **kwargs: Any) -> Any:
        """TransformerLens 4's one-call logit lens over this cache (`jaxlens.logit_lens`: layers,
        positions, targets, top_k, vocab, return_type, ...); the last entry is the model's logits."""
        from jaxlens.cache.logit_lens import logit_lens

        return logit_lens(self, **kwargs)

    def logit_attrs(self, residual_stack: Any, tokens: Any, incorrect_tokens: Any = None,
                    pos_slice: SliceInput = None, batch_slice: SliceInput = None,
                    has_batch_dim: bool = True) -> jax.Array:
        """Direct logit attribution: each component (scaled by the cached final-norm scale) dotted with
        the unembed direction of `tokens` (minus `incorrect_tokens`'): [components *bp].

        `tokens` is a string (one token; needs the cache's tokenizer), an int, a scalar or one-element
        array, a [batch] array (one target per example), or a [batch pos] array.
        """
        cfg = self._need_cfg("logit_attrs")
        toks, single, shape = self._token_ids(tokens, "tokens")
        inc, inc_single = None, False
        if incorrect_tokens is not None:
            inc, inc_single, ishape = self._token_ids(incorrect_tokens, "incorrect_tokens")
            if ishape != shape:
                raise ValueError(f"tokens and incorrect_tokens must have the same shape; got {shape} and {ishape}")
        stack = jnp.asarray(residual_stack)
        if stack.shape[-1] != cfg.d_model:
            raise ValueError(f"logit_attrs: the stack's last axis must be d_model={cfg.d_model}, "
                             f"got shape {tuple(stack.shape)}")
        sub = self._subset("logit_attrs", [A.scale_key(cfg, cfg.n_layers, False)], ["W_U"])
        return A.logit_attrs_jit(sub, stack, toks, inc, self._pos(pos_slice), self._batch(batch_slice),
                                 has_batch_dim=has_batch_dim, single=single, incorrect_single=inc_single)

    def stack_activation(self, activation_name: str, layer: int | None = -1, sublayer_type: str | None = None):
        """`activation_name` of every layer < `layer`, stacked: [layers_covered ...]."""
        cfg = self._need_cfg("stack_activation")
        layer = A.resolve_layer(cfg, layer, "stack_activation")
        if layer == 0:
            raise ValueError("stack_activation: layer=0 selects no layers; use layer in [1, n_layers]")
        return jnp.stack([self[(activation_name, l, sublayer_type)] for l in range(layer)], axis=0)

    # --- aggregation (easyroutine, functional) ----------------------------------------------
    def register_aggregation(self, key_prefix: str, strategy: Any) -> "ActivationCache":
        """A new cache whose keys starting with `key_prefix` combine by `strategy` (a Strategy, a
        built-in name or an easyroutine-style `fn(old, new)`). Every cache starts with
        easyroutine's pre-registered strategies (`jaxlens.aggregate.EASYROUTINE_STRATEGIES`)."""
        strategies = dict(self.meta.strategies)
        strategies[key_prefix] = agg.as_strategy(strategy)
        return self._replace(meta=self.meta.replace(strategies=strategies))

    def remove_aggregation(self, key_prefix: str) -> "ActivationCache":
        strategies = dict(self.meta.strategies)
        strategies.pop(key_prefix, None)
        return self._replace(meta=self.meta.replace(strategies=strategies))

    def cat(self, other: "ActivationCache") -> "ActivationCache":
        """This cache and `other` combined key by key (see `jaxlens.aggregate`); keys must match,
        except that an empty cache (`ActivationCache({})`) takes `other`'s, as easyroutine's does."""
        return agg.cat(self, other)

    def __add__(self, other: Any) -> "ActivationCache":
        """easyroutine's `a + b`: a new cache with the keys of both (`other`'s values win; `other` is
        a cache or a dict), starting from the pre-registered aggregation strategies."""
        return agg.merge(self, other, keep_strategies=False)

    def update(self, other: Any) -> "ActivationCache":
        """easyroutine's `update`, returning the new cache (this one is unchanged): the keys of
        both, `other`'s values winning (a cache or a dict); this cache's strategies are kept."""
        _warn_if_discarded("update", "cache = cache.update(other)")
        return agg.merge(self, other, keep_strategies=True)

    def set(self, key: str, value: Any) -> "ActivationCache":
        """A new cache with `key` set to `value`."""
        return self._replace({**self._d, key: value})

    def add_with_info(self, key: str, value: Any, info: str) -> "ActivationCache":
        """A new cache with `key` = `value` and an info string describing it."""
        infos = dict(self.meta.info)
        infos[key] = str(info)
        return self._replace({**self._d, key: value}, meta=self.meta.replace(info=infos))

    def info(self, key: str) -> str | None:
        """The info string attached to `key`, if any."""
        return dict(self.meta.info).get(key)

    @property
    def metadata(self) -> dict[str, Any]:
        """Cache-level metadata (a copy): target positions, model name, extraction config, ..."""
        return dict(self.meta.metadata)

    def add_metadata(self, target_token_positions: Any = None, model_name: str | None = None,
                     extraction_config: Any = None, interventions: Any = None, **extra: Any) -> "ActivationCache":
        """A new cache carrying easyroutine's metadata fields (and any `extra`, e.g. mapping_index)."""
        md = dict(self.meta.metadata)
        md.update({"target_token_positions": target_token_positions,
                   "model_name": model_name if model_name is not None else getattr(self.cfg, "model_name", None),
                   "extraction_config": extraction_config, "interventions": interventions, **extra})
        return self._replace(meta=self.meta.replace(metadata=md))

    @property
    def n_batches(self) -> int:
        """How many batches were combined into this cache."""
        return self.meta.n_batches

    def map_to_dict(self, key: str, mapping_index: Mapping[str, Any] | None = None) -> dict[str, jax.Array]:
        return agg.map_to_dict(self, key, mapping_index)

    def memory_size(self, key: str | None = None) -> str:
        """Size of `key` (or of all activations) as easyroutine prints it, "6.00 KB"; below 1 KB in
        bytes (easyroutine 1.1.5 divides those by 1000 and still writes "B")."""
        return agg.memory_size(self, key)

    def memory_tree(self, grouped: bool = True, print_tree: bool = False) -> dict[str, str]:
        return agg.memory_tree(self, grouped, print_tree)

__all__ = ["DiscardedResultWarning", "LayerIndexError", "ActivationCache"]
