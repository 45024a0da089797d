"""Hook names, names_filter resolution, and the one hook-point helper every module calls.

A hook point is a named activation (TransformerLens's names and shapes). At each one,
`hook_point` (1) applies any user edit registered for that name, then (2) sows the result into
the `intermediates` collection if the run asked to capture it. Both decisions are static: the
set of names to capture is a frozenset, and edits are a `Hooks` pytree whose functions are
static and whose arrays are traced leaves. So a jitted run materialises only what was asked
for, and a grid of edits can be `vmap`-ed.

Inside `nn.scan` the layer index is traced; names are then templates (`blocks.*.attn.hook_q`)
and per-layer edits are dispatched with `lax.switch`.

The names themselves are stated only where they are sown: `hook_names(cfg)` is read off an
abstract trace of the model that captures everything (`EVERY_HOOK`), once per config.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp

from jaxlens.config import ModelConfig
from jaxlens.fingerprint import Fn, HookSideEffectError, NeedsStatic, explain_trace_error

LAYER = "{l}"
WILDCARD = "*"

# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------

class _EveryHook:
    """A capture set that holds every hook name (`EVERY_HOOK`): a run given it as `capture`
    sows every hook point, the opt-in `hook_result` included. Equal only to itself, so a
    compiled program keyed on it is never confused with one for a real name set."""

    __slots__ = ()

    def __contains__(self, name: object) -> bool:
        return True

    def __bool__(self) -> bool:
        return True

    def __eq__(self, other: object) -> bool:
        return other is self

    def __hash__(self) -> int:
        return hash("jaxlens.hooks.EVERY_HOOK")

    def __repr__(self) -> str:
        return "EVERY_HOOK"

    def __reduce__(self) -> str:
        return "EVERY_HOOK"


EVERY_HOOK = _EveryHook()


@functools.lru_cache(maxsize=1024)
def _sown_names(cfg: ModelConfig) -> tuple[str, ...]:
    """The names the model sows when asked for everything, in the order it sows them.

    One abstract trace (`jax.eval_shape`: no parameters or activations are ever allocated) of
    `Transformer(cfg).init` on tokens [1, 2] with capture `EVERY_HOOK`; the unrolled model, so
    each layer sows under its own name. Flax keeps the sown `intermediates` in insertion order
    and `collect_intermediates` walks them in that order, so the list is in forward order.
    """
    from jaxlens.model import Transformer  # the model modules import this one

    names: list[str] = []

    def trace() -> None:
        toks = jnp.zeros((1, 2), jnp.int32)
        variables = Transformer(cfg).init(jax.random.PRNGKey(0), toks, jnp.ones_like(toks),
                                          RunCtx(capture=EVERY_HOOK), mutable=True)
        names.extend(collect_intermediates(variables.get("intermediates", {}), EVERY_HOOK))

    jax.eval_shape(trace)
    return tuple(names)


# opt-in hooks (TransformerLens creates them only when its cfg switch is on) -> that switch
OPT_IN = {"attn.hook_result": "use_attn_result", "hook_mlp_in": "use_hook_mlp_in", "hook_attn_in": "use_attn_in",
          "hook_q_input": "use_split_qkv_input", "hook_k_input": "use_split_qkv_input",
          "hook_v_input": "use_split_qkv_input"}


def opt_in_off(name: str, cfg: ModelConfig) -> bool:
    """Is `name` an opt-in hook whose TransformerLens switch is off in `cfg`?"""
    return any(name.endswith(suffix) and not getattr(cfg, flag) for suffix, flag in OPT_IN.items())


def hook_names(cfg: ModelConfig, include_result: bool = True) -> list[str]:
    """Every hook name of a model with this config, in forward order.

    Read off the model itself: the names its hook points sow in an abstract capture-all trace
    (done once per config, then cached). `hook_result` ([batch pos head d_model]), `hook_mlp_in`
    and the per-head attention inputs are opt-in as in TransformerLens (`OPT_IN`): listed here when `include_result`
    (or when their switch is on in `cfg`), captured by a default run only when their switch is on.
    """
    return [n for n in _sown_names(cfg) if include_result or not opt_in_off(n, cfg)]


def block_hook_templates(cfg: ModelConfig, include_result: bool = True) -> list[str]:
    """Per-layer hook names with `{l}` for the layer, in forward order (block 0's names from
    `hook_names`, templated)."""
    first = "blocks.0."
    return ["blocks.{l}." + n[len(first):] for n in hook_names(cfg, include_result) if n.startswith(first)]


NamesFilter = Union[None, str, re.Pattern, Sequence[str], Callable[[str], bool]]


def resolve_names(names_filter: NamesFilter, cfg: ModelConfig) -> frozenset[str]:
    """Turn a TransformerLens-style names_filter into the static set of names to capture.

    None: every hook except the opt-in ones (`OPT_IN`: `hook_result`, `hook_mlp_in`, `hook_attn_in`,
    `hook_q_input`/`k`/`v`) whose switch is off (`cfg.use_attn_result`, ...), as TransformerLens,
    which has no such hook then. str: that exact name. re.Pattern: the names it `search`es, and callable: the names it
    returns True for, among the same. list/tuple: those names (an opt-in hook named is captured).
    Unknown names and filters that match nothing raise ValueError (a typo should not give an
    empty cache silently).
    """
    every = hook_names(cfg, include_result=True)
    if names_filter is None:
        return frozenset(n for n in every if not opt_in_off(n, cfg))
    if isinstance(names_filter, str):
        wanted = [names_filter]
    elif isinstance(names_filter, re.Pattern):
        chosen = frozenset(n for n in every if names_filter.search(n) and not opt_in_off(n, cfg))
        if not chosen:
            raise ValueError(f"names_filter regex {names_filter.pattern!r} matches no hook of this model; see jaxlens.hooks.hook_names(cfg)")
        return chosen
    elif callable(names_filter):
        chosen = frozenset(n for n in every if not opt_in_off(n, cfg) and names_filter(n))
        if not chosen:
            raise ValueError("names_filter callable matched no hook of this model; see jaxlens.hooks.hook_names(cfg)")
        return chosen
    else:
        if isinstance(names_filter, (bytes, bytearray)) or not isinstance(names_filter, Iterable):
            raise TypeError(f"names_filter must be None, a hook name, a list of names, a re.Pattern or a callable "
                            f"name -> bool; got {type(names_filter).__name__} {names_filter!r}")
        wanted = list(names_filter)
        odd = [n for n in wanted if not isinstance(n, str)]
        if odd:
            raise TypeError(f"names_filter lists must hold hook names (strings); got {odd[0]!r} "
                            f"({type(odd[0]).__name__})")
        if not wanted:
            raise ValueError("names_filter is an empty list: name at least one hook, or pass None for all")
    known = set(every)
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"names_filter names no hook of this model: {unknown}{did_you_mean(unknown[0], every)}; "
                         "see jaxlens.hooks.hook_names(cfg)")
    return frozenset(wanted)


def did_you_mean(name: str, options: Iterable[str]) -> str:
    """" (did you mean 'x'?)" for the closest of `options` to a mistyped `name`, or ""."""
    import difflib

    m = difflib.get_close_matches(str(name), [str(o) for o in options], n=1)
    return f" (did you mean {m[0]!r}?)" if m else ""


_ACT_ALIAS = {"attn": "pattern", "attn_logits": "attn_scores", "key": "k", "query": "q", "value": "v",
              "mlp_pre": "pre", "mlp_mid": "mid", "mlp_post": "post"}
_LAYER_TYPE_ALIAS = {"a": "attn", "m": "mlp", "b": "", "block": "", "blocks": "", "attention": "attn"}


# hooks whose activation is [batch head query key]: the position axes are the query (2) and key (3)
SCORE_HOOKS = ("hook_attn_scores", "hook_pattern")
# the MoE router hooks see the routed tokens flattened, [batch*pos ...]: no position axis
FLAT_TOKEN_HOOKS = ("mlp.gate.hook_out", "mlp.hook_expert_weights", "mlp.hook_expert_indices", "mlp.hook_expert_outputs")


def pos_axis(name: str) -> int | None:
    """The (query) position axis of hook `name`'s batched activation (a `_grad` name as its hook):
    2 for scores and patterns and for the [batch head pos d_head] q/k-norm hooks, 1 for the rest,
    None for the MoE router hooks, whose tokens are flattened."""
    base = name.removesuffix("_grad")
    if base.endswith(SCORE_HOOKS):
        return 2
    if base.endswith(("hook_q_normed", "hook_k_normed")) or ".q_norm." in base or ".k_norm." in base:
        return 2
    if base.endswith(FLAT_TOKEN_HOOKS):
        return None
    return 1


def get_act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """TransformerLens's `utils.get_act_name`: ("pattern", 3) -> "blocks.3.attn.hook_pattern".

    Also ("scale", 2, "ln1") -> "blocks.2.ln1.hook_scale", ("resid_pre", 0) ->
    "blocks.0.hook_resid_pre", ("scale",) -> "ln_final.hook_scale", ("embed",) -> "hook_embed".
    """
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name
    match = re.match(r"([a-z_]+)(\d+)([a-z]?.*)", name)
    if match is not None:
        name, layer, layer_type = match.groups(0)  # e.g. "attn3" -> ("attn", 3)
        layer = int(layer)
        layer_type = layer_type or None
    name = _ACT_ALIAS.get(name, name)
    full = f"blocks.{layer}." if layer is not None else ""
    if name in ("k", "v", "q", "z", "rot_k", "rot_q", "result", "pattern", "attn_scores"):
        layer_type = "attn"
    elif name in ("pre", "post", "mid", "pre_linear"):
        layer_type = "mlp"
    elif layer_type in _LAYER_TYPE_ALIAS:
        layer_type = _LAYER_TYPE_ALIAS[layer_type]
    if layer_type:
        full += f"{layer_type}."
    full += f"hook_{name}"
    if name in ("scale", "normalized") and layer is None:
        full = f"ln_final.{full}"
    return full


# ---------------------------------------------------------------------------------------------
# Edits
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HookPoint:
    """What a hook function receives as `hook` (TransformerLens's HookPoint, read-only)."""

    name: str
    _layer: int | None = None

    def layer(self) -> int:
        if self._layer is None:
            raise ValueError(f"hook {self.name!r} is not inside a block, so it has no layer")
        return self._layer


HookFn = Callable[[jax.Array, HookPoint], "jax.Array | None"]


@jax.tree_util.register_pytree_node_class
@dataclass(frozen=True)
class Hooks:
    """Forward hooks as a pytree: ((names, fn), ...) in the order they apply.

    `names` is the frozenset of concrete hook names the entry edits (resolved from a name,
    list, regex or callable against the model's names). `fn(activation, hook)` returns the
    new activation (or None for "unchanged"). Each `fn` flattens as a `jaxlens.fingerprint.Fn`:
    the compiled program is keyed by what the function depends on (code, closure, globals,
    defaults, a partial's arguments) and its arrays and Python numbers are traced leaves, so a
    loop over heads compiles once, edits can be batched with `vmap`, and a hook whose globals
    changed never reuses a stale program.
    """

    entries: tuple[tuple[frozenset[str], Any], ...] = ()

    def tree_flatten(self):
        leaves, statics = [], []
        for names, fn in self.entries:
            fl, aux = Fn(fn).tree_flatten()
            leaves.extend(fl)
            statics.append((names, aux, len(fl)))
        return leaves, tuple(statics)

    @classmethod
    def tree_unflatten(cls, statics, leaves):
        entries, i = [], 0
        for names, aux, n in statics:
            entries.append((names, Fn.tree_unflatten(aux, list(leaves[i:i + n]))))
            i += n
        return cls(tuple(entries))

    def check_indices(self, cfg: ModelConfig, q_len: int | None = None, k_len: int | None = None) -> None:
        """Raise ValueError for an edit index out of range (JAX would clamp or drop it silently).

        Each edit that declares its index fields (`jaxlens.interventions`) is checked against the
        activation it edits: heads against n_heads (kv heads for hook_k/v/rot_k), positions and
        query rows against `q_len`, key columns against `k_len` (None skips that check). Traced
        indices (inside a grid) cannot be checked here.
        """
        for names, fn in self.entries:
            check = getattr(fn.fn if isinstance(fn, Fn) else fn, "check_indices", None)
            if check is not None:
                for name in sorted(names):
                    check(name, cfg, q_len, k_len)

    def for_name(self, name: str) -> list[Any]:
        return [fn for names, fn in self.entries if name in names]

    def touches(self, name: str) -> bool:
        return any(name in names for names, _ in self.entries)

    def __bool__(self) -> bool:
        return bool(self.entries)


def make_hooks(fwd_hooks: Sequence[tuple[NamesFilter, Any]] | Hooks | None, cfg: ModelConfig) -> Hooks:
    """Resolve TransformerLens-style `fwd_hooks=[(name_or_filter, fn), ...]` into `Hooks`."""
    if fwd_hooks is None:
        return Hooks()
    if isinstance(fwd_hooks, Hooks):
        return fwd_hooks
    entries = []
    for i, item in enumerate(fwd_hooks):
        if not (isinstance(item, tuple) and len(item) == 2):
            raise ValueError(f"fwd_hooks[{i}] must be a (name_or_filter, fn) pair, got {type(item).__name__}")
        flt, fn = item
        if not callable(fn):
            raise ValueError(f"fwd_hooks[{i}]: the hook function must be callable, got {type(fn).__name__}")
        names = resolve_names([flt] if isinstance(flt, str) else flt, cfg)
        entries.append((names, fn))
    return Hooks(tuple(entries))


# ---------------------------------------------------------------------------------------------
# The hook point
# ---------------------------------------------------------------------------------------------

class RunCtx(NamedTuple):
    """What every module's __call__ receives: static capture set, edits, and the layer.

    `layer` is an int in the unrolled model and a traced scalar inside `nn.scan` (then
    `n_layers` is needed to resolve per-layer names). `kv` is the per-layer KV-cache slot.
    `capture` may be `EVERY_HOOK`, which holds every name (how `hook_names` lists them).
    """

    capture: frozenset[str] = frozenset()
    hooks: Hooks = Hooks()
    layer: Any = None
    n_layers: int = 0

    def at_layer(self, layer: Any) -> "RunCtx":
        return self._replace(layer=layer)

    def wants(self, template: str) -> bool:
        """Is this hook (any layer, for block templates) captured or edited?"""
        return any(n in self.capture or self.hooks.touches(n) for n in self.names_for(template))

    def names_for(self, template: str) -> list[str]:
        if LAYER not in template:
            return [template]
        if isinstance(self.layer, int):
            return [template.format(l=self.layer)]
        return [template.format(l=l) for l in range(self.n_layers)]


def _call_hook(fn: Any, x: jax.Array, point: HookPoint) -> Any:
    """Call one user hook; turn the errors of code that cannot run under jit into a ValueError
    that names the hook and says why (hooks run traced: values are unknown until run time)."""
    if not isinstance(fn, Fn):  # unflattened (an eager run, a jit of the caller's): Fn checks what it stores
        fn = Fn(fn)
    try:
        return fn(x, point)
    except (NeedsStatic, HookSideEffectError):
        raise
    except TypeError as e:
        if "immutable" in str(e) or "item assignment" in str(e):
            raise ValueError(
                f"hook {getattr(fn, '__name__', type(fn).__name__)!r} on {point.name!r} assigns into an array in "
                "place (`x[...] = v`): JAX arrays are immutable. To edit the activation, return "
                "`x.at[...].set(v)`; to record a value (TransformerLens's `store[hook.layer()] = score`), return "
                "it from a function of the cache instead: run_with_cache(names_filter=...) and compute on the "
                "cached activations.") from e
        clear = explain_trace_error(e, _who(fn, point), bool(getattr(fn, "torch_reads", ())))
        if clear is None:
            raise
        raise clear from e
    except Exception as e:
        clear = explain_trace_error(e, _who(fn, point), bool(getattr(fn, "torch_reads", ())))
        if clear is None:
            raise
        raise clear from e


def _who(fn: Any, point: HookPoint) -> str:
    reads = getattr(fn, "torch_reads", ())
    extra = f" (it reads torch tensors: {', '.join(reads)})" if reads else ""
    return f"hook {getattr(fn, '__name__', type(fn).__name__)!r} on {point.name!r}{extra}"


def _apply_fns(fns: list[Any], x: jax.Array, point: HookPoint) -> jax.Array:
    for fn in fns:
        y = _call_hook(fn, x, point)
        if y is None:
            continue
        if not hasattr(y, "shape") or tuple(y.shape) != tuple(x.shape):
            raise ValueError(
                f"hook on {point.name!r} returned shape {getattr(y, 'shape', type(y).__name__)}; "
                f"it must return an array of the activation's shape {tuple(x.shape)} (or None)"
            )
        x = y.astype(x.dtype)
    return x


def hook_point(mod: Any, template: str, x: jax.Array, ctx: RunCtx) -> jax.Array:
    """The hook point: apply edits registered for this name, then sow it if captured.

    `template` is the full TransformerLens name with `{l}` for the layer. In the unrolled
    model the name is concrete. Inside `nn.scan` (traced layer) edits are chosen per layer by
    `lax.switch` and the sown value is stacked over layers under the `*` name.
    """
    if isinstance(ctx.layer, int) or LAYER not in template:
        name = template.format(l=ctx.layer) if LAYER in template else template
        layer = ctx.layer if LAYER in template else None
        if ctx.hooks:
            fns = ctx.hooks.for_name(name)
            if fns:
                x = _apply_fns(fns, x, HookPoint(name, layer))
        if name in ctx.capture:
            mod.sow("intermediates", name, x, reduce_fn=lambda _, new: new, init_fn=lambda: None)
        return x
    # scanned: traced layer index
    names = [template.format(l=l) for l in range(ctx.n_layers)]
    if ctx.hooks:
        per_layer = [ctx.hooks.for_name(n) for n in names]
        edited = [l for l, fns in enumerate(per_layer) if fns]
        if edited:
            branch = jnp.asarray([edited.index(l) + 1 if l in edited else 0 for l in range(ctx.n_layers)])
            branches = [lambda v: v] + [
                (lambda v, l=l: _apply_fns(per_layer[l], v, HookPoint(names[l], l))) for l in edited
            ]
            x = jax.lax.switch(branch[ctx.layer], branches, x)
    if any(n in ctx.capture for n in names):
        mod.sow("intermediates", template.replace(LAYER, WILDCARD), x,
                reduce_fn=lambda _, new: new, init_fn=lambda: None)
    return x


def collect_intermediates(inter: Any, capture: frozenset[str]) -> dict[str, jax.Array]:
    """Flatten the sown `intermediates` tree into {hook name: array}, keeping only `capture`.

    Names with `*` (sown inside `nn.scan`, stacked over layers) are split per layer.
    """
    out: dict[str, jax.Array] = {}

    def walk(node: Any) -> None:
        for k, v in node.items():
            if isinstance(v, dict) or hasattr(v, "items"):
                walk(v)
            elif WILDCARD in k:
                for l in range(v.shape[0]):
                    n = k.replace(WILDCARD, str(l))
                    if n in capture:
                        out[n] = v[l]
            elif k in capture:
                out[k] = v

    walk(inter)
    return out

__all__ = ["SCORE_HOOKS", "FLAT_TOKEN_HOOKS", "pos_axis", "LAYER", "WILDCARD", "EVERY_HOOK", "hook_names", "block_hook_templates", "NamesFilter",
           "resolve_names", "did_you_mean", "get_act_name", "HookPoint", "HookFn", "Hooks", "make_hooks",
           "RunCtx", "hook_point", "collect_intermediates"]
