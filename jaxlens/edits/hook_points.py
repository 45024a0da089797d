"""TransformerLens's stateful hooks, kept on the model object, over the functional core.

TransformerLens registers hook functions on `HookPoint` modules (`model.add_hook`,
`model.hooks(...)`, `model.blocks[0].attn.hook_z.add_hook`). Here the model keeps a tuple of
`StoredHook`s and every run turns them, followed by the call's own hooks, into one `Hooks`
pytree for the compiled program: `jaxlens.forward.forward` stays pure, and the same stored
hooks compile once.

Backward hooks (`dir="bwd"`) run inside the backward pass of the loss: each hook point they name
is wrapped in an identity whose `custom_vjp` calls `fn(grad, hook)`. As in TransformerLens
(PyTorch's full backward hooks), every function on a point sees the gradient arriving there, and
the last one that returns an array replaces the gradient that flows further back. They are
traced like forward hooks; one that stores the gradient makes the call run eagerly, as a
storing forward hook does (`run_with_cache(..., incl_bwd=True)` and caching hooks with
`incl_bwd` get the gradients compiled).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Iterable, Literal, NamedTuple

import jax

from jaxlens.fingerprint import Fn
from jaxlens.devices import resolve_device
from jaxlens.hooks import HookPoint, Hooks, pos_axis

Direction = Literal["fwd", "bwd"]
DIRECTIONS = ("fwd", "bwd")


def check_dir(dir: Any, allow_both: bool = False) -> str:
    """Validate a hook direction ("fwd" / "bwd", or "both" where removal allows it)."""
    ok = DIRECTIONS + (("both",) if allow_both else ())
    if dir not in ok:
        raise ValueError(f"dir must be one of {ok}, got {dir!r}: 'fwd' edits activations, 'bwd' edits gradients")
    return dir


class StoredHook(NamedTuple):
    """One registered hook: the concrete names it covers, its function and how it was added."""

    names: frozenset[str]
    fn: Any
    dir: str = "fwd"
    permanent: bool = False
    level: int | None = None  # the `model.hooks(...)` context that added it (None: add_hook)


def removable(h: StoredHook, direction: str, including_permanent: bool, level: int | None) -> bool:
    """Does `reset_hooks` / `remove_hooks` with these arguments remove `h` (TransformerLens's rule)?"""
    if h.permanent and not including_permanent:
        return False
    if direction != "both" and h.dir != direction:
        return False
    return level is None or h.level == level


def without_name(hooks: Iterable[StoredHook], name: str, direction: str, including_permanent: bool,
                 level: int | None = None) -> tuple[StoredHook, ...]:
    """The hooks with `name` taken out of the removable ones (a filter hook keeps its other names)."""
    out = []
    for h in hooks:
        if name in h.names and removable(h, direction, including_permanent, level):
            h = h._replace(names=h.names - {name})
        if h.names:
            out.append(h)
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Backward hooks
# ---------------------------------------------------------------------------------------------

def _replace_grad(fns: tuple[Any, ...], point: HookPoint, g: jax.Array) -> jax.Array:
    """Call every backward hook with the arriving gradient; the last non-None return wins."""
    out = g
    for fn in fns:
        r = fn(g, point)
        if r is None:
            continue
        if not hasattr(r, "shape") or tuple(r.shape) != tuple(g.shape):
            raise ValueError(f"backward hook on {point.name!r} returned shape {getattr(r, 'shape', type(r).__name__)}; "
                             f"it must return a gradient of the activation's shape {tuple(g.shape)} (or None)")
        out = r.astype(g.dtype)
    return out


def _backward_hooks(table: tuple[tuple[str, tuple[Any, ...]], ...], x: jax.Array, hook: HookPoint) -> jax.Array:
    """A forward hook that is the identity, with a gradient rule that runs the backward hooks."""
    fns = dict(table)[hook.name]

    @jax.custom_vjp
    def identity(v):
        return v

    identity.defvjp(lambda v: (v, None), lambda _, g: (_replace_grad(fns, hook, g),))
    return identity(x)


def backward_entry(entries: Iterable[tuple[frozenset[str], Any]]) -> tuple[frozenset[str], Any] | None:
    """One `Hooks` entry that applies backward hooks [(names, fn), ...] in order, grouped per
    hook point (so each sees the same arriving gradient); None when there are none."""
    per_name: dict[str, list[Any]] = {}
    for names, fn in entries:
        for n in sorted(names):
            per_name.setdefault(n, []).append(Fn(fn))  # Fn: keyed by what it reads; side effects caught
    if not per_name:
        return None
    table = tuple((n, tuple(fns)) for n, fns in sorted(per_name.items()))
    return frozenset(per_name), partial(_backward_hooks, table)


def compose(stored: Iterable[StoredHook], fwd: Hooks, bwd: Hooks | None, caching: CachingPlan | None = None) -> Hooks:
    """Stored forward hooks, then the call's; then (when a backward pass runs) stored and call
    backward hooks as one identity entry applied after every forward edit of the point. With
    `caching`, the caching hooks it can serve are moved into it (`take_caching`)."""
    stored = tuple(stored)
    entries = take_caching([(h.names, h.fn) for h in stored if h.dir == "fwd"] + list(fwd.entries), caching)
    if bwd is not None:
        entry = backward_entry(take_caching([(h.names, h.fn) for h in stored if h.dir == "bwd"] + list(bwd.entries),
                                            caching, backward=True))
        if entry is not None:
            entries.append(entry)
    return Hooks(tuple(entries))


# ---------------------------------------------------------------------------------------------
# Caching hooks (TransformerLens's get_caching_hooks / add_caching_hooks / cache_all / cache_some)
# ---------------------------------------------------------------------------------------------

class CachingHook:
    """TransformerLens's caching hook: stores the activation it sees under the hook's name (plus
    "_grad" for a backward one) into `cache`, position-sliced (`pos_slice`, run_with_cache's
    axis per hook), then with a leading axis of 1 dropped (`remove_batch_dim`), then on `device`.

    Where a run can, it does not run as a hook at all: the model captures those activations (or
    gradients) in its compiled program and stores them after the call (`take_caching`). Anywhere
    else (generate, a KV-cache call, an editing hook after it on the same point) it is a hook that
    stores, which jaxlens runs eagerly (`jaxlens.fingerprint.retry_static`)."""

    def __init__(self, cache: dict, grad: bool = False, pos_slice: Any = None, remove_batch_dim: bool = False,
                 device: Any = None):
        from jaxlens.cache.slice import Slice

        if not isinstance(cache, dict):
            raise ValueError(f"the cache to store activations in must be a dict, got {type(cache).__name__}")
        self.cache, self.grad, self.remove_batch_dim = cache, bool(grad), bool(remove_batch_dim)
        self.pos_slice = None if pos_slice is None else Slice.unwrap(pos_slice)
        self.device = None if device is None else resolve_device(device)

    def store(self, name: str, x: jax.Array) -> None:
        if self.pos_slice is not None and x.ndim >= 2:
            axis = pos_axis(name)
            if axis is None:
                raise ValueError(f"pos_slice cannot slice {name}: MoE router hooks hold the routed tokens flattened "
                                 "[batch*pos ...]; leave them out of the caching hooks' names_filter")
            x = self.pos_slice.check(x.shape[axis], f"pos_slice for {name}").apply(x, axis)
        if self.remove_batch_dim and x.ndim and x.shape[0] == 1:
            x = x[0]
        if self.device is not None:
            x = jax.device_put(x, self.device)
        self.cache[name + ("_grad" if self.grad else "")] = x

    def __call__(self, x: jax.Array, hook: HookPoint) -> None:
        self.store(hook.name, x)

    def __jaxlens_trace__(self) -> tuple[Any, Any, Callable[[Any], Any]]:
        # keyed by its settings; the dict is walked so that a store inside a trace is caught
        return (("CachingHook", self.grad, repr(self.pos_slice), self.remove_batch_dim, repr(self.device)),
                self.cache, lambda _: self)

    def __repr__(self) -> str:
        return f"CachingHook({'bwd' if self.grad else 'fwd'}, {len(self.cache)} entries)"


class CachingPlan:
    """The caching hooks a run serves from its own capture: (names, hook) in the order they apply."""

    def __init__(self) -> None:
        self.fwd: list[tuple[frozenset[str], CachingHook]] = []
        self.bwd: list[tuple[frozenset[str], CachingHook]] = []

    @property
    def names(self) -> frozenset[str]:
        return frozenset().union(*(n for n, _ in self.fwd))

    @property
    def grad_names(self) -> frozenset[str]:
        return frozenset().union(*(n for n, _ in self.bwd))

    def write(self, acts: dict[str, Any], grads: dict[str, Any], order: list[str]) -> None:
        """Store into each hook's cache as TransformerLens's hooks would fire: activations in
        forward order, then gradients in backward (reverse forward) order."""
        for name in order:
            for names, hook in self.fwd:
                if name in names and name in acts:
                    hook.store(name, acts[name])
        for name in reversed(order):
            for names, hook in self.bwd:
                if name in names and name in grads:
                    hook.store(name, grads[name])


def take_caching(entries: list[tuple[frozenset[str], Any]], plan: CachingPlan | None,
                 backward: bool = False) -> list[tuple[frozenset[str], Any]]:
    """The entries minus the caching hooks `plan` serves. A forward caching hook is served when
    no later non-caching hook edits one of its points (it would see the value before that edit);
    a backward one always (every backward hook on a point sees the same arriving gradient)."""
    if plan is None:
        return entries
    kept = []
    for i, (names, fn) in enumerate(entries):
        later_edit = any(names & n2 for n2, f2 in entries[i + 1:] if not isinstance(f2, CachingHook))
        if isinstance(fn, CachingHook) and fn.grad == backward and (backward or not later_edit):
            (plan.bwd if backward else plan.fwd).append((names, fn))
        else:
            kept.append((names, fn))
    return kept


# ---------------------------------------------------------------------------------------------
# The hook point handle
# ---------------------------------------------------------------------------------------------

class HookPointRef:
    """`model.blocks[0].attn.hook_z`: a handle on one hook point of one model.

    `add_hook` / `remove_hooks` edit the model's stored hooks, as TransformerLens's `HookPoint`
    does; the functions themselves receive a `jaxlens.hooks.HookPoint` (name and layer).
    """

    __slots__ = ("_model", "name")

    def __init__(self, model: Any, name: str):
        self._model, self.name = model, name

    def add_hook(self, hook: Callable, dir: Direction = "fwd", is_permanent: bool = False,
                 prepend: bool = False) -> None:
        """Register `hook(activation, hook)` (or `hook(grad, hook)` for dir="bwd") here."""
        self._model.add_hook(self.name, hook, dir=dir, is_permanent=is_permanent, prepend=prepend)

    def add_perma_hook(self, hook: Callable, dir: Direction = "fwd") -> None:
        self.add_hook(hook, dir=dir, is_permanent=True)

    def remove_hooks(self, dir: str = "fwd", including_permanent: bool = False, level: int | None = None) -> None:
        """Remove this point's hooks in `dir` ("fwd", "bwd" or "both"); others are untouched."""
        check_dir(dir, allow_both=True)
        self._model._remove_from_point(self.name, dir, including_permanent, level)

    def has_hooks(self, dir: str = "both", including_permanent: bool = True, level: int | None = None) -> bool:
        check_dir(dir, allow_both=True)
        return any(self.name in h.names and removable(h, dir, including_permanent, level)
                   for h in self._model._stored_hooks)

    @property
    def fwd_hooks(self) -> list[Any]:
        return [h.fn for h in self._model._stored_hooks if h.dir == "fwd" and self.name in h.names]

    @property
    def bwd_hooks(self) -> list[Any]:
        return [h.fn for h in self._model._stored_hooks if h.dir == "bwd" and self.name in h.names]

    def layer(self) -> int:
        return HookPoint(self.name, _layer_of(self.name)).layer()

    def __repr__(self) -> str:
        n_f, n_b = len(self.fwd_hooks), len(self.bwd_hooks)
        extra = "".join(f", {n} {d}" for n, d in ((n_f, "fwd"), (n_b, "bwd")) if n)
        return f"HookPointRef(name={self.name!r}{extra})"


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit() else None



def has_backward_hooks(hooks: Any) -> bool:
    """Does `hooks` hold backward hooks? Then the backward pass runs in full (also wrt params)."""
    return any(getattr(fn, "func", None) is _backward_hooks for _, fn in hooks.entries)


__all__ = ["has_backward_hooks", "StoredHook", "HookPointRef", "compose", "backward_entry", "check_dir", "CachingHook",
           "CachingPlan", "take_caching"]
