"""What a user function really depends on: a key for the compiled-program cache, and the values to trace.

A jit-compiled program is cached by the static parts of its arguments. A hook (or a patching
metric) is Python code that reads globals, closure cells, default arguments, a partial's
arguments and an object's attributes. Keyed by the function object alone, a hook that reads a
global that has changed would silently reuse the first program: a stale result, the worst bug
this library can have. `Fn(fn)` is a pytree whose structure is what the function depends on:

- its code (code objects compare by content, so a redefined identical function hits the cache),
  and every static value it reads (strings, bools, dtypes, modules, classes, library functions);
- as traced leaves: arrays, and Python ints and floats, so a loop over heads or positions
  compiles one program. A hook that needs such a number at trace time (a slice bound, a
  `range`, an `if`) fails under tracing; the `retry_static` wrapper then re-runs the call with
  that hook's numbers (and numpy arrays) static, so each distinct value compiles its own
  program, and remembers that for the hook's code;
- a value that cannot be keyed safely (an arbitrary mutable object) makes the key unique: the
  call recompiles every time (with a warning naming the value), never a stale program.

A hook runs once, at trace time, so side effects would be lost when a program is reused. A hook
that assigns a global, or mutates a container or object it reads (TransformerLens's
`store.append(x)`, `cache[name] = x`, `self.x = x`), is caught at that trace; jaxlens's run
methods (`retry_static`) then run the call eagerly, under `jax.disable_jit`, so the hook runs on
concrete arrays at every call and what it stores stays stored. Where that cannot help (a value
still traced under vmap, a jit of the caller's) the error says what to do instead.

Library code (jax, numpy, jaxlens, the standard library, ...) is keyed by identity and not
walked: its functions are assumed not to read mutable module state. Objects can take part with
a `__jaxlens_trace__()` method returning `(static_key, state_pytree, rebuild(state) -> object)`.
"""

from __future__ import annotations

import builtins
import dis
import enum
import functools
import os
import sys
import threading
import types
import warnings
from typing import Any, Callable, Iterator

import jax
import numpy as np

__all__ = ["Fn", "Identity", "NeedsStatic", "HookSideEffectError", "retry_static", "eager_active", "explain_trace_error", "call_metric"]

_LIBRARIES = frozenset({
    "jax", "jaxlib", "numpy", "flax", "optax", "chex", "jaxlens", "einops", "torch", "transformers",
    "transformer_lens", "ml_dtypes", "scipy", "equinox", "penzai", "jaxtyping", "tokenizers", "safetensors",
    "orbax", "tqdm", "easyroutine", "pattern_lens", "opt_einsum", "_pytest", "pytest", "hypothesis",
}) | frozenset(getattr(sys, "stdlib_module_names", ()))
_ATOMS = (type(None), bool, str, bytes, complex, type(Ellipsis), type(NotImplemented), range)
_MAX_DEPTH = 6
_MAX_ITEMS = 256
_INT32 = (-(2 ** 31), 2 ** 31)
_STATIC_CODES: set[Any] = set()  # keys of functions that must see their numbers as constants
_WARNED: set[Any] = set()


class NeedsStatic(Exception):
    """Raised from inside a trace: a function failed with its numbers traced; retry them static.

    jaxlens's own entry points retry at once (`retry_static`); under a jit of your own, call again:
    the function's numbers are then keyed as constants."""

    def __init__(self, key: Any, error: BaseException):
        super().__init__(
            f"a hook or metric failed with its Python numbers traced ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); jaxlens now treats them as constants for this "
            "function: call again (jaxlens's own run methods retry by themselves)")
        self.key, self.error = key, error


class HookSideEffectError(ValueError):
    """A hook assigned a global, or mutated a container or object it reads.

    `code` is the hook's code object when jaxlens's run methods may run the call eagerly
    instead (`retry_static`), None when they may not (the stored value was traced)."""

    def __init__(self, message: str, code: Any = None):
        super().__init__(message)
        self.code = code


_EAGER_NOTE = ("(jaxlens's run methods, run_with_hooks, model(...), run_with_cache and generate, run such a hook "
               "eagerly instead, uncompiled; patching grids cannot, their cells being vmapped.)")
_EAGER = threading.local()  # .on: inside an eager re-run of a call whose hooks store values
_EAGER_CODES: set[Any] = set()  # code of hooks seen storing: their calls go eager at once


def eager_active() -> bool:
    """Is this thread inside an eager run (hooks see concrete values and may store them)?"""
    return getattr(_EAGER, "on", False)


def _code_of(fn: Any) -> Any:
    """The code object a hook runs (through partials, methods, callable objects), or None."""
    for _ in range(8):
        if isinstance(fn, functools.partial):
            fn = fn.func
        elif isinstance(fn, types.MethodType):
            fn = fn.__func__
        elif isinstance(fn, types.FunctionType):
            return fn.__code__
        elif callable(fn) and not isinstance(fn, type):
            fn = getattr(type(fn), "__call__", None)  # a Python __call__ (jaxlens's CachingHook too)
        else:
            return None
    return None


class Identity:
    """Key by identity (keeps the object alive, so its id cannot be reused)."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any):
        self.obj = obj

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Identity) and other.obj is self.obj

    def __hash__(self) -> int:
        return id(self.obj)


class _Unique:
    """A key equal only to itself: the call is never served by a cached program."""

    __slots__ = ()


def _root(obj: Any) -> str:
    return (getattr(obj, "__module__", None) or "").split(".")[0]


def _is_library(obj: Any) -> bool:
    mod = obj.__name__ if isinstance(obj, types.ModuleType) else getattr(obj, "__module__", None)
    if mod is None:
        mod = type(obj).__module__
    return mod.split(".")[0] in _LIBRARIES


def _is_user_module(v: Any) -> bool:
    return isinstance(v, types.ModuleType) and not _is_library(v)


def _is_torch(v: Any) -> bool:
    return type(v).__module__.split(".")[0] == "torch" and hasattr(v, "shape")


def _is_array(v: Any) -> bool:
    return isinstance(v, (jax.Array, np.ndarray, np.generic)) or isinstance(v, jax.core.Tracer)


@functools.lru_cache(maxsize=4096)
def _code_facts(code: types.CodeType) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(global names read, global names assigned, attribute names read) by a code object and the
    code nested in it."""
    reads, writes, attrs = set(), set(), set()
    stack = [code]
    while stack:
        c = stack.pop()
        for ins in dis.get_instructions(c):
            if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
                reads.add(ins.argval)
            elif ins.opname in ("STORE_GLOBAL", "DELETE_GLOBAL"):
                writes.add(ins.argval)
            elif ins.opname in ("LOAD_ATTR", "LOAD_METHOD"):
                attrs.add(ins.argval)
        stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    return tuple(sorted(reads)), tuple(sorted(writes)), tuple(sorted(attrs))


def _snapshot(obj: Any) -> Any:
    """A shallow copy of a container (or an object's attributes): what must not change while a hook runs."""
    if isinstance(obj, (list, set)):
        return type(obj)(obj)
    if isinstance(obj, dict):
        return dict(obj)
    return dict(vars(obj))


def _changed(obj: Any, snap: Any) -> bool:
    now = _snapshot(obj)
    if isinstance(snap, set):
        return now != snap
    if isinstance(snap, list):
        return len(now) != len(snap) or any(a is not b for a, b in zip(now, snap))
    return now.keys() != snap.keys() or any(now[k] is not snap[k] for k in snap)


def _restore(obj: Any, snap: Any) -> None:
    """Undo what a hook stored (a leaked tracer must not stay in the user's list)."""
    if isinstance(obj, list):
        obj[:] = snap
    elif isinstance(obj, (dict, set)):
        obj.clear()
        obj.update(snap)
    else:
        vars(obj).clear()
        vars(obj).update(snap)


def _diff(snap: Any, now: Any) -> Any:
    """What a hook changed in a container: (kind, changes) that `_apply_diff` re-applies."""
    if isinstance(snap, set):
        return ("set", now - snap, snap - now)
    if isinstance(snap, list):
        if len(now) >= len(snap) and all(a is b for a, b in zip(now, snap)):
            return ("append", now[len(snap):])
        return ("replace", now)
    return ("dict", {k: v for k, v in now.items() if k not in snap or snap[k] is not v},
            [k for k in snap if k not in now])


def _apply_diff(obj: Any, d: Any) -> None:
    kind = d[0]
    if kind == "set":
        obj |= d[1]
        obj -= d[2]
    elif kind == "append":
        obj.extend(d[1])
    elif kind == "replace":
        obj[:] = d[1]
    else:
        target = obj if isinstance(obj, dict) else vars(obj)
        target.update(d[1])
        for k in d[2]:
            target.pop(k, None)


def _concrete(v: Any) -> Any:
    """`v` with every JVP/linearize tracer over a concrete value replaced by that value."""
    def one(x: Any) -> Any:
        while isinstance(x, jax.core.Tracer) and hasattr(x, "primal"):
            x = x.primal
        return x

    try:
        return jax.tree_util.tree_map(one, v)
    except Exception:
        return v


def _has_tracer(v: Any) -> bool:
    try:
        leaves = jax.tree_util.tree_leaves(v)
    except Exception:
        return False
    return any(isinstance(x, jax.core.Tracer) for x in leaves)


_LEAF = object()


class _Walk:
    """One walk over a value: collects the key, the leaves, and how to rebuild it from leaves."""

    def __init__(self, static: bool):
        self.static = static
        self.leaves: list[Any] = []
        self.watch: list[tuple[str, Any, Any]] = []
        self.opaque: list[str] = []
        self.torch: list[str] = []
        self.n_numbers = 0
        self.n_host = 0
        self._attrs: list[tuple[str, ...]] = []
        self._active: set[int] = set()

    # each method returns (key, builder); builder None means "no leaves below: use the value itself"
    def value(self, v: Any, label: str, depth: int = 0) -> tuple[Any, Any]:
        t = type(v)
        if t in _ATOMS:
            return (t, v), None
        if t is slice:
            return (t, v.start, v.stop, v.step), None
        if t in (int, float):
            if not self.static and (t is float or _INT32[0] <= v < _INT32[1]):
                self.leaves.append(v)
                self.n_numbers += 1
                return (t,), _LEAF
            return (t, v.hex() if t is float else v), None  # hex: -0.0 and 0.0 differ
        if _is_torch(v):
            self.torch.append(f"{label} (a torch.Tensor)")
            return ("opaque", _Unique()), None
        if _is_array(v):
            if self.static and not isinstance(v, jax.core.Tracer) and np.size(v) <= 1 << 16:
                a = np.asarray(v)
                return ("array", a.shape, str(a.dtype), a.tobytes()), None
            self.n_host += isinstance(v, (np.ndarray, np.generic))
            self.leaves.append(v)
            return ("array",), _LEAF
        if isinstance(v, enum.Enum):
            return ("lib", v), None
        if depth > _MAX_DEPTH:
            return self._opaque(v, label)
        if id(v) in self._active:  # a cycle: cannot be rebuilt faithfully
            return self._opaque(v, label)
        self._active.add(id(v))
        try:
            return self._compound(v, t, label, depth)
        finally:
            self._active.discard(id(v))

    def _compound(self, v: Any, t: type, label: str, depth: int) -> tuple[Any, Any]:
        proto = getattr(v, "__jaxlens_trace__", None)
        if proto is not None and not isinstance(v, type):
            key, state, rebuild = proto()
            skey, sb = self.value(state, label, depth + 1)
            return ("proto", t, key, skey), (None if sb is None else lambda it: rebuild(_build(sb, state, it)))
        if isinstance(v, functools.partial):
            return self._partial(v, label, depth)
        if isinstance(v, types.MethodType):
            fk, fb = self.value(v.__func__, label, depth + 1)
            sk, sb = self.value(v.__self__, f"{label} (its object)", depth + 1)
            b = None if fb is sb is None else (
                lambda it: types.MethodType(_build(fb, v.__func__, it), _build(sb, v.__self__, it)))
            return ("method", fk, sk), b
        if isinstance(v, types.FunctionType):
            return self._function(v, label, depth)
        if t in (list, tuple, dict, set, frozenset):
            return self._container(v, t, label, depth)
        if _is_pytree_node(v):
            children, treedef = jax.tree_util.tree_flatten(v, is_leaf=lambda x: x is not v)
            keys, builders = self._items(children, label, depth)
            static = self._static_callables(treedef, label, depth)
            return ("tree", treedef, static, keys), (None if all(b is None for b in builders) else
                                                     lambda it: treedef.unflatten(_build_all(builders, children, it)))
        if _is_user_module(v):
            return self._module(v, self._attrs[-1] if self._attrs else (), label, depth), None
        if isinstance(v, (type, types.ModuleType, types.BuiltinFunctionType)):
            return ("lib", Identity(v)), None
        if _is_library(v):
            if type(v).__hash__ not in (None, object.__hash__):  # hashed by value: immutable by contract
                return ("lib", v), None
            if callable(v):  # a library function object (a jitted function, a ufunc)
                return ("lib", Identity(v)), None
            return self._opaque(v, label)  # library state (an RNG, a model): not keyed by identity
        if hasattr(v, "__dict__") and not isinstance(v, type):
            return self._object(v, t, label, depth)
        return self._opaque(v, label)

    def _opaque(self, v: Any, label: str) -> tuple[Any, Any]:
        self.opaque.append(f"{label} ({type(v).__module__}.{type(v).__qualname__})")
        return ("opaque", _Unique()), None

    def _items(self, items: list[Any], label: str | list[str], depth: int) -> tuple[tuple[Any, ...], list[Any]]:
        labels = label if isinstance(label, list) else [label] * len(items)
        if len(items) > _MAX_ITEMS and not all(_is_array(x) for x in items):
            self.opaque.append(f"{labels[0] if labels else label} ({len(items)} items)")
            return (("opaque", _Unique()),), [None] * len(items)
        pairs = [self.value(x, lab, depth + 1) for x, lab in zip(items, labels)]
        return tuple(k for k, _ in pairs), [b for _, b in pairs]

    def _container(self, v: Any, t: type, label: str, depth: int) -> tuple[Any, Any]:
        if t in (set, frozenset):  # members are hashable: key them as constants
            if not all(type(x) in _ATOMS + (int, float) for x in v):
                return self._opaque(v, label)
            if t is set:
                self.watch.append((label, v, _snapshot(v)))
            return (t, frozenset((type(x), x) for x in v)), None
        if t is dict:
            if not all(type(k) in _ATOMS + (int, float) for k in v):
                return self._opaque(v, label)
            keys, builders = self._items(list(v.values()), label, depth)
            key = (t, tuple((type(k), k) for k in v), keys)
        else:
            items = list(v)
            keys, builders = self._items(items, label, depth)
            key = (t, keys)
        if t in (list, dict, set):
            self.watch.append((label, v, _snapshot(v)))
        if all(b is None for b in builders):
            return key, None

        def build(it: Iterator[Any]) -> Any:
            if t is dict:
                return dict(zip(v.keys(), _build_all(builders, list(v.values()), it)))
            return t(_build_all(builders, items, it))

        return key, _InPlace(build) if t in (list, dict) else build

    def _partial(self, v: functools.partial, label: str, depth: int) -> tuple[Any, Any]:
        fk, fb = self.value(v.func, label, depth + 1)
        ak, ab = self._items(list(v.args), f"{label} argument", depth)
        kw = dict(v.keywords)
        kk, kb = self._items(list(kw.values()), f"{label} keyword argument", depth)
        key = ("partial", type(v), fk, ak, tuple(kw), kk)
        if fb is None and all(b is None for b in ab + kb):
            return key, None
        return key, lambda it: type(v)(_build(fb, v.func, it), *_build_all(ab, list(v.args), it),
                                       **dict(zip(kw, _build_all(kb, list(kw.values()), it))))

    def _function(self, f: types.FunctionType, label: str, depth: int) -> tuple[Any, Any]:
        library = _is_library(f)
        if library and not f.__closure__ and not f.__defaults__ and not f.__kwdefaults__:
            return ("lib", Identity(f)), None
        code = f.__code__
        reads, writes, attrs = ((), (), ()) if library else _code_facts(code)  # library globals are constants
        if writes and not eager_active():
            raise HookSideEffectError(
                f"{_name(f)} assigns the global {', '.join(map(repr, writes))}: jaxlens runs hooks and metrics "
                "once, while tracing a compiled program, so such side effects are lost when the program is "
                "reused. Return the value instead (or read activations with run_with_cache(names_filter=...)). "
                + _EAGER_NOTE, code)
        g = f.__globals__
        self._attrs.append(attrs)  # user modules it reads are keyed by these attributes
        names = [n for n in reads if n in g]
        gk, gb = self._items([g[n] for n in names], [f"the global {n!r}" for n in names], depth)
        gk = tuple((n, k) for n, k in zip(names, gk))
        missing = tuple(n for n in reads if n not in g and not hasattr(builtins, n))
        cells = list(f.__closure__ or ())
        contents = []
        for name, cell in zip(code.co_freevars, cells):
            try:
                contents.append(cell.cell_contents)
            except ValueError:
                contents.append(_EMPTY)
        ck, cb = self._items(contents, [f"the closure variable {n!r}" for n in code.co_freevars], depth)
        defaults = list(f.__defaults__ or ())
        dk, db = self._items(defaults, f"a default argument of {label}", depth)
        kwd = dict(f.__kwdefaults__ or {})
        kk, kb = self._items(list(kwd.values()), [f"the keyword default {n!r}" for n in kwd], depth)
        self._attrs.pop()
        key = ("fn", code, gk, missing, ck, dk, tuple(kwd), kk)
        if all(b is None for b in gb + cb + db + kb):
            return key, None

        def build(it: Iterator[Any]) -> types.FunctionType:
            new_g = g
            if any(b is not None for b in gb):
                new_g = dict(g)
                new_g.update(zip(names, _build_all(gb, [g[n] for n in names], it)))
            closure = tuple(types.CellType(x) if x is not _EMPTY else types.CellType()
                            for x in _build_all(cb, contents, it)) or None
            new = types.FunctionType(code, new_g, f.__name__, tuple(_build_all(db, defaults, it)) or None, closure)
            new.__kwdefaults__ = dict(zip(kwd, _build_all(kb, list(kwd.values()), it))) or None
            new.__qualname__, new.__module__, new.__doc__ = f.__qualname__, f.__module__, f.__doc__
            return new

        return key, build

    def _static_callables(self, treedef: Any, label: str, depth: int) -> tuple[Any, ...]:
        """Keys of the user functions a pytree node keeps in its static (aux) data: the treedef
        compares them by identity, which would miss a global they read. They stay static (the
        node is rebuilt with them), so what they read is keyed as constants."""
        try:
            aux = treedef.node_data()[1]
        except Exception:
            return ()
        items = list(aux.values()) if isinstance(aux, dict) else list(aux) if isinstance(aux, (tuple, list)) else [aux]
        fns = [x for x in items if isinstance(x, (types.FunctionType, types.MethodType, functools.partial))
               and not _is_library(getattr(x, "func", x))]
        if not fns:
            return ()
        sub = _Walk(static=True)
        keys = tuple(sub.value(f, f"{label} (a static field)", depth + 1)[0] for f in fns)
        self.torch += sub.torch
        self.opaque += sub.opaque + ([f"{label} (a static field holding large arrays)"] if sub.leaves else [])
        return keys

    def _module(self, mod: types.ModuleType, attrs: tuple[str, ...], name: str, depth: int) -> Any:
        """A user module read by a function: keyed by the values of the attributes the code reads
        (`mymod.HEAD`), as constants (module state cannot be swapped for tracers)."""
        sub = _Walk(static=True)
        keys = tuple((a, sub.value(getattr(mod, a), f"{name}.{a}", depth + 1)[0])
                     for a in attrs if hasattr(mod, a))
        self.torch += sub.torch
        self.opaque += sub.opaque + ([f"{name} (a module holding large arrays)"] if sub.leaves else [])
        return ("module", Identity(mod), keys)

    def _object(self, v: Any, t: type, label: str, depth: int) -> tuple[Any, Any]:
        attrs = dict(vars(v))
        ak, ab = self._items(list(attrs.values()), [f"{label}.{n}" for n in attrs], depth)
        # the class's own functions (methods, __call__) are read through the object
        methods = [(n, m) for c in t.__mro__ if c is not object and not _is_library(c)
                   for n, m in vars(c).items() if isinstance(m, (types.FunctionType, staticmethod, classmethod))]
        mk = tuple((n, self.value(getattr(m, "__func__", m), f"{label}.{n}", depth + 1)[0]) for n, m in methods)
        self.watch.append((label, v, _snapshot(v)))
        key = ("obj", t, tuple(attrs), ak, mk)
        if all(b is None for b in ab):
            return key, None

        def build(it: Iterator[Any]) -> dict[str, Any]:
            return dict(zip(attrs, _build_all(ab, list(attrs.values()), it)))

        return key, _InPlace(build)


_EMPTY = object()


class _InPlace:
    """Builder for a list, dict or object that holds traced values. The hook must see the very
    object it reads (a `jax.debug.callback` may write into it at run time), so no copy is made:
    `Fn.__call__` installs the traced contents for the duration of the call and puts the
    original contents back afterwards."""

    def __init__(self, contents: Callable[[Iterator[Any]], Any]):
        self.contents = contents


_BUILD_SWAPS: list[list[tuple[Any, Any]]] = []


def _build(builder: Any, original: Any, it: Iterator[Any]) -> Any:
    if builder is None:
        return original
    if builder is _LEAF:
        return next(it)
    if isinstance(builder, _InPlace):
        contents = builder.contents(it)
        if _BUILD_SWAPS:
            _BUILD_SWAPS[-1].append((original, contents))
        return original
    return builder(it)


def _build_all(builders: list[Any], originals: list[Any], it: Iterator[Any]) -> list[Any]:
    return [_build(b, o, it) for b, o in zip(builders, originals)]


def _is_pytree_node(v: Any) -> bool:
    leaves = jax.tree_util.tree_leaves(v, is_leaf=lambda x: x is not v)
    return not (len(leaves) == 1 and leaves[0] is v)


def _name(fn: Any) -> str:
    inner = getattr(fn, "func", fn)
    inner = getattr(inner, "__func__", inner)
    return f"{getattr(inner, '__qualname__', type(inner).__name__)!r}"


class _Aux:
    """The static half of an `Fn`: equal (and hashed) by key alone; carries what rebuilds it."""

    __slots__ = ("key", "fn", "builder", "watch", "retry_key", "torch")

    def __init__(self, key, fn, builder, watch, retry_key, torch):
        self.key, self.fn, self.builder, self.watch = key, fn, builder, watch
        self.retry_key, self.torch = retry_key, torch

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, _Aux) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)


def _split(fn: Any) -> tuple[list[Any], _Aux]:
    """Walk `fn`: numbers traced, unless its code is known to need them static (or it cannot be
    cached at all, when constants cost nothing more)."""
    code = _code_of(fn)
    if code is not None and code in _EAGER_CODES and not eager_active():
        raise HookSideEffectError(
            f"{_name(fn)} stores values (a side effect, seen on an earlier call): jaxlens's run methods run it "
            "eagerly, uncompiled; under a jit of your own, return the value instead (or read activations with "
            "run_with_cache(names_filter=...)).", code)
    w = _Walk(static=False)
    key, builder = w.value(fn, _name(fn))
    cacheable = not (w.opaque or w.torch) and _try_hash(key)
    retry_key = key if cacheable and (w.n_numbers or w.n_host) else None
    if (retry_key is not None and retry_key in _STATIC_CODES) or not cacheable:
        retry_key = None
        w = _Walk(static=True)
        key, builder = w.value(fn, _name(fn))
    if not cacheable:
        _warn_uncached(fn, w.opaque + w.torch or ["an unhashable value"])
        key = ("opaque", _Unique())
    return w.leaves, _Aux(("Fn", key), fn, builder, w.watch, retry_key, tuple(w.torch))


def _watch_of(fn: Any) -> list[tuple[str, Any, Any]]:
    """The containers and objects `fn` reads, to check what a call of it changes (no key made)."""
    w = _Walk(static=True)
    w.value(fn, _name(fn))
    return w.watch


def _try_hash(key: Any) -> bool:
    try:
        hash(key)
        return True
    except TypeError:
        return False


def _warn_uncached(fn: Any, what: list[str]) -> None:
    tag = (_name(fn), tuple(what))
    if tag in _WARNED:
        return
    _WARNED.add(tag)
    warnings.warn(
        f"{_name(fn)} reads {', '.join(what[:3])}{' ...' if len(what) > 3 else ''}, whose state jaxlens cannot "
        "key safely, so its compiled program is rebuilt on every call (correct, but slow). Pass what it needs "
        "as arrays or numbers (globals, closures, default arguments or functools.partial arguments), or give "
        "the object a __jaxlens_trace__ method.", stacklevel=4)


@jax.tree_util.register_pytree_with_keys_class
class Fn:
    """A callable as a pytree: static structure = what it depends on, leaves = its arrays and numbers.

    Calling an `Fn` calls the function; inside a trace it also checks that the call mutated
    nothing it reads, and turns a failure with traced numbers into `NeedsStatic` (see module doc).
    """

    __slots__ = ("fn", "_aux", "_swaps")

    def __init__(self, fn: Any, _aux: _Aux | None = None, _swaps: list | None = None):
        self.fn = fn.fn if isinstance(fn, Fn) else fn
        self._aux = _aux
        # re-wrapping a rebuilt Fn keeps its swapped-in contents (see tree_flatten)
        self._swaps = _swaps or (fn._swaps if isinstance(fn, Fn) else [])

    @property
    def __name__(self) -> str:  # for error messages
        return getattr(self.fn, "__name__", type(self.fn).__name__)

    @property
    def torch_reads(self) -> tuple[str, ...]:
        """The torch tensors the function reads (for error messages)."""
        return self._aux.torch if self._aux is not None else ()

    def tree_flatten_with_keys(self):
        leaves, aux = self.tree_flatten()
        return [(jax.tree_util.SequenceKey(i), x) for i, x in enumerate(leaves)], aux

    def tree_flatten(self):
        # A rebuilt Fn keeps the containers it reads in place and swaps their (traced) contents in
        # only while it runs. Flattening it again (nn.scan re-flattens what it broadcasts) must
        # read those contents, not the originals: else the first call's arrays become constants
        # of the compiled program and every later call reuses them (a stale result).
        saved = [(obj, _snapshot(obj)) for obj, _ in self._swaps]
        for obj, contents in self._swaps:
            _restore(obj, contents)
        try:
            return _split(self.fn)
        finally:
            for obj, snap in saved:
                _restore(obj, snap)

    @classmethod
    def tree_unflatten(cls, aux: _Aux, leaves: list[Any]) -> "Fn":
        if aux.builder is None:
            return cls(aux.fn, aux)
        _BUILD_SWAPS.append([])
        try:
            fn = _build(aux.builder, aux.fn, iter(leaves))
            swaps = _BUILD_SWAPS[-1]
        finally:
            _BUILD_SWAPS.pop()
        return cls(fn, aux, swaps)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if eager_active():
            return self._call_eager(*args, **kwargs)
        aux = self._aux
        saved = [(obj, _snapshot(obj)) for obj, _ in self._swaps]
        for obj, contents in self._swaps:
            _restore(obj, contents)
        # an Fn that was never flattened (a backward hook with no leaves, say) is watched all the same
        watched = aux.watch if aux is not None else _watch_of(self.fn)
        watch = [(label, obj, _snapshot(obj)) for label, obj, _ in watched]
        try:
            out = self.fn(*args, **kwargs)
        except (NeedsStatic, HookSideEffectError):
            raise
        except Exception as e:
            if aux is not None and aux.retry_key is not None:
                _STATIC_CODES.add(aux.retry_key)  # the next call (or retry_static's) keys its numbers
                raise NeedsStatic(aux.retry_key, e) from e
            raise
        finally:
            changed = [(label, obj) for label, obj, snap in watch if _changed(obj, snap)]
            for _, obj, snap in watch:
                _restore(obj, snap)  # undo what the hook stored: a leaked tracer must not stay
            for obj, snap in saved:
                _restore(obj, snap)
        if changed:
            label, obj = changed[0]
            raise HookSideEffectError(
                f"{_name(self.fn)} changed {label} (a {type(obj).__name__}) while it ran: jaxlens runs hooks and "
                "metrics once, while tracing a compiled program, so what it stores is a tracer, and nothing "
                "is stored when the program is reused. Return the new activation instead, and read "
                "activations with run_with_cache(names_filter=...) (or return them from your metric); to "
                "record values at run time, use jax.debug.callback. " + _EAGER_NOTE, _code_of(self.fn))
        return out

    def _call_eager(self, *args: Any, **kwargs: Any) -> Any:
        """Run the hook with concrete values and keep what it stores, as TransformerLens does.
        A rebuilt Fn's swapped-in contents are put back with the stores re-applied on top. A
        stored value that is still a tracer (the hook ran under vmap or grad) is undone and
        refused: it would be a leak, not a value."""
        saved = [(obj, _snapshot(obj)) for obj, _ in self._swaps]
        for obj, contents in self._swaps:
            _restore(obj, contents)
        watch = [(label, obj, _snapshot(obj)) for label, obj, _ in _watch_of(self.fn)]
        swapped = {id(obj) for obj, _ in saved}
        g = getattr(getattr(self.fn, "func", self.fn), "__globals__", None)
        written = _code_facts(self.fn.__code__)[1] if isinstance(self.fn, types.FunctionType) else ()
        before_g = {n: g.get(n) for n in written} if g is not None else {}
        try:
            return self.fn(*args, **kwargs)
        finally:
            # under grad a stored forward value is a JVP tracer over the concrete value: keep that
            # (TransformerLens's `.detach()`); only values with no concrete primal (vmap) are refused
            diffs = [(label, obj, snap, _concrete(_diff(snap, _snapshot(obj)))) for label, obj, snap in watch]
            for obj, orig in saved:
                _restore(obj, orig)
            for _, obj, snap, d in diffs:
                if id(obj) not in swapped:
                    _restore(obj, snap)
                _apply_diff(obj, d)
            if g is not None:
                g.update({n: _concrete(g[n]) for n in written if n in g})
            leaked = [label for label, _, _, d in diffs if _has_tracer(d)]
            leaked += [f"the global {n!r}" for n in written if g is not None and _has_tracer(g.get(n))]
            if leaked:
                for label, obj, snap, d in diffs:
                    if id(obj) not in swapped:
                        _restore(obj, snap)
                if g is not None:
                    g.update(before_g)
                raise HookSideEffectError(
                    f"{_name(self.fn)} stored a traced value into {leaked[0]}: it ran under a transformation "
                    "(vmap in a patching grid, or grad for backward hooks and gradients), where activations "
                    "have no concrete value. Return the value instead, or read activations with "
                    "run_with_cache(names_filter=...) / run_with_cache(..., incl_bwd=True).")

    def __repr__(self) -> str:
        return f"Fn({self.fn!r})"


def retry_static(jitted: Callable[..., Any] | None = None, *, eager: bool = True) -> Callable[..., Any]:
    """Wrap a jitted function that takes `Fn`s: when one fails with its numbers traced, mark
    its code static and call again (each distinct value then gets its own program).

    With `eager`, a call whose hook stores values (TransformerLens's `store[hook.name] = x`,
    `acts.append(x)`, `self.x = x`, a global) runs again eagerly: under `jax.disable_jit`, so
    every hook runs on concrete arrays and what it stores stays stored, at every call (no
    compiled program, so nothing can be stale). Later calls of that hook's code go eager at
    once. A stored value that is still traced (vmap, grad) is refused with a clear error."""
    if jitted is None:
        return functools.partial(retry_static, eager=eager)

    @functools.wraps(jitted)
    def call(*args: Any, **kwargs: Any) -> Any:
        if eager_active():
            return jitted(*args, **kwargs)
        seen = set()
        while True:
            try:
                return jitted(*args, **kwargs)
            except NeedsStatic as e:
                if e.key in seen:
                    raise e.error from None
                seen.add(e.key)
            except HookSideEffectError as e:
                if not eager or e.code is None:
                    raise
                return _run_eager(jitted, e.code, args, kwargs)

    call.__wrapped__ = jitted
    for attr in ("lower", "trace", "eval_shape", "_cache_size", "clear_cache"):
        if hasattr(jitted, attr):
            setattr(call, attr, getattr(jitted, attr))
    return call


def compiled_or_eager(compiled: Callable[[], Any], eager: Callable[[], Any]) -> Any:
    """`compiled()` (calls of `retry_static(eager=False)` functions); when a hook in it stores
    values, `eager()` instead, run eagerly as `retry_static` runs its calls. For a caller whose
    compiled call pads shapes to reuse programs (generate's buckets): an eager run compiles
    nothing, so it takes the exact shapes and a storing hook sees the call's own arrays."""
    if eager_active():
        return eager()
    try:
        return compiled()
    except HookSideEffectError as e:
        if e.code is None:
            raise
        return _run_eager(eager, e.code, (), {})


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _user_stacklevel() -> int:
    """The `warnings.warn` stacklevel of the first caller outside jaxlens (and jax)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename.startswith(_PACKAGE_DIR)
                                 or _root_file(frame.f_code.co_filename)):
        frame, level = frame.f_back, level + 1
    return level


def _root_file(path: str) -> bool:
    return "/jax/" in path or "/jaxlib/" in path or path.startswith("<frozen")


def _run_eager(jitted: Callable[..., Any], code: Any, args: tuple, kwargs: dict) -> Any:
    if code not in _EAGER_CODES:
        _EAGER_CODES.add(code)
        warnings.warn(
            f"the hook {code.co_name!r} ({code.co_filename}:{code.co_firstlineno}) stores values (a side effect), "
            "so jaxlens runs its calls eagerly, uncompiled, as TransformerLens does: what it stores is kept, at "
            "a cost in speed. For compiled speed, read activations with run_with_cache(names_filter=...) or "
            "model.add_caching_hooks / get_caching_hooks, which jaxlens compiles.", stacklevel=_user_stacklevel())
    _EAGER.on = True
    try:
        with jax.disable_jit():
            return jitted(*args, **kwargs)
    finally:
        _EAGER.on = False


_JIT_ERRORS = (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
               jax.errors.TracerBoolConversionError, jax.errors.TracerIntegerConversionError,
               jax.errors.NonConcreteBooleanIndexError)


def explain_trace_error(e: BaseException, who: str, torch_hint: bool = False) -> ValueError | None:
    """A clear ValueError for an error raised by user code run inside a trace, or None."""
    if isinstance(e, _JIT_ERRORS):
        return ValueError(
            f"{who} cannot run inside jit ({type(e).__name__}): jaxlens traces it, so values have no concrete "
            "value while it runs. Do not convert them to numpy/float/bool (`.item()`, `float(x)`, `np.asarray`), "
            "branch on their values (`if x.sum() > 0`), or select with a data-dependent boolean mask "
            "(`x[x > 0]`); use jnp.where / lax.cond, and return results rather than storing them. Original "
            "error: " + str(e).split("\n")[0])
    if torch_hint or "torch" in str(e):
        return ValueError(
            f"{who} failed mixing torch and JAX ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): "
            "jaxlens activations are JAX arrays inside a compiled program; they cannot be written into a torch "
            "tensor. Return values (or use run_with_cache) and convert afterwards with "
            "torch.from_numpy(np.asarray(x)).")
    return None


def call_metric(metric: Any, logits: Any, what: str = "patching_metric") -> Any:
    """Call a user metric inside a trace; errors of code that needs concrete values (`.item()`,
    `float(x)`, numpy) become a ValueError that says what to do instead."""
    if not isinstance(metric, Fn):  # unflattened (an eager run, a jit of the caller's): Fn checks what it stores
        metric = Fn(metric)
    try:
        return metric(logits)
    except (NeedsStatic, HookSideEffectError):
        raise
    except Exception as e:
        clear = explain_trace_error(e, f"{what} {getattr(metric, '__name__', type(metric).__name__)!r}")
        if clear is None:
            raise
        raise clear from e
