"""Combining caches across batches (easyroutine's cache, made functional) and streaming statistics.

Combination. Each key combines by a `Strategy` chosen by key prefix (the longest registered prefix
wins): `CONCAT` along the batch axis, `STACK` on a new leading axis, `LAST` keeps the newest,
`LIST` flattens into a Python list, `MEAN` is a running mean weighted by the batches each side has
seen, `FIELDS` concatenates a dict of arrays field by field, `pairwise(fn)` wraps an
easyroutine-style `fn(old, new)`. Every cache starts with easyroutine's pre-registered strategies
(`EASYROUTINE_STRATEGIES`: `offset` and `token_dict` kept as a list per batch, `mapping_index` the
newest, `last_layernorm` concatenated per field). Other keys use `DEFAULT`, easyroutine's
`default_aggregation` folded over the batches: arrays concatenate, 0-d arrays stack, anything else
tries `+`, and whatever cannot be joined falls back to a list, from then on appended to.
`cat(a, b)` returns a new cache; `combine(caches)` (and the `Deferred` collector) gives the same
result as the chain of `cat`s, but joins each key's arrays in one compiled concatenation instead
of a chain of pairwise copies that grows quadratically. `merge` is easyroutine's `+` / `update`.
Per-key info strings and cache-level metadata travel with the cache through combination, `jit`
and pickling.

Streaming statistics. `RunningStats` is a pytree of per-key count, mean and sum of squared
deviations, updated inside `jit` with the parallel Welford/Chan merge, so a sweep keeps only
summaries on device. `group_pattern` is the one implementation of easyroutine's attention-pattern
block statistics (mean / sum / baseline_ratio over row × column token groups), and
`update_pattern_stats` keeps their running average.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# ---------------------------------------------------------------------------------------------
# Token groups
# ---------------------------------------------------------------------------------------------


def normalize_groups(token_groups: Any, n: int | None = None, what: str = "token_groups") -> tuple[tuple[int, ...], ...]:
    """Check and freeze token groups into a tuple of int tuples (static, hashable).

    An int or a flat list of ints is accepted as groups of one. With `n` (the sequence length),
    negative positions are resolved (-1 is position n - 1) and out-of-range ones raise
    ValueError. A position listed twice counts twice everywhere (as easyroutine's list indexing).
    """
    if isinstance(token_groups, (int, np.integer)):
        token_groups = [(int(token_groups),)]
    groups = []
    for g in token_groups:
        g = (g,) if isinstance(g, (int, np.integer)) else tuple(g)
        if not g:
            raise ValueError(f"{what}: empty group; every group needs at least one position")
        for p in g:
            if not isinstance(p, (int, np.integer)):
                raise ValueError(f"{what}: positions must be ints, got {p!r} ({type(p).__name__})")
        if n is not None:
            bad = [int(p) for p in g if not -n <= p < n]
            if bad:
                raise ValueError(f"{what}: positions {bad} are outside a sequence of length {n}")
            g = tuple(int(p) % n for p in g)
        groups.append(tuple(int(p) for p in g))
    if not groups:
        raise ValueError(f"{what} is empty: give a list of position tuples, e.g. [(0,), (3, 4)]")
    return tuple(groups)


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


@dataclass(frozen=True)
class Strategy:
    """How the values of one key combine: `fn(values, counts) -> value`, where `counts[i]` is how
    many batches `values[i]` already holds (1 for a fresh cache)."""

    name: str
    fn: Callable[[Sequence[Any], Sequence[int]], Any] = field(compare=False)

    def __call__(self, values: Sequence[Any], counts: Sequence[int]) -> Any:
        return self.fn(values, counts)


def _concat_values(values: Sequence[Any], counts: Sequence[int]) -> Any:
    return _concat([jnp.asarray(v) for v in values])


def _stack(values: Sequence[Any], counts: Sequence[int]) -> Any:
    # a value that already holds several batches is already stacked
    return jnp.concatenate([jnp.asarray(v) if c > 1 else jnp.asarray(v)[None] for v, c in zip(values, counts)], 0)


def _last(values: Sequence[Any], counts: Sequence[int]) -> Any:
    return values[-1]


def _as_list(values: Sequence[Any], counts: Sequence[int]) -> list[Any]:
    """easyroutine's `sublist`: one element per batch, lists flattened into it."""
    out: list[Any] = []
    for v, c in zip(values, counts):
        if isinstance(v, list) and (c > 1 or not _is_array(v)):
            out.extend(v)
        else:
            out.append(v)
    return out


def _mean(values: Sequence[Any], counts: Sequence[int]) -> Any:
    total = sum(counts)
    return sum(jnp.asarray(v) * (c / total) for v, c in zip(values, counts))


def _fields(values: Sequence[Any], counts: Sequence[int]) -> dict[str, Any]:
    """easyroutine's `aggregate_last_layernorm`: dicts of [m, ...] arrays, each field concatenated
    along the first axis (the fields of the newest dict; a field it lacks is dropped, one that
    only it has starts afresh, as easyroutine's fold does)."""
    if not all(isinstance(v, Mapping) for v in values):
        raise ValueError(f"the 'concatenate_fields' strategy combines dicts of arrays (e.g. last_layernorm's "
                         f"mean/variance/second_moment), got {[type(v).__name__ for v in values]}")
    out = {}
    for k in values[-1]:
        parts = []
        for v in reversed(values):  # the run of batches that has the field, up to the newest
            if k not in v:
                break
            parts.insert(0, jnp.asarray(v[k]))
        if len({p.shape[-1:] for p in parts}) > 1:
            raise ValueError(f"field {k!r}: last dimensions differ across batches ({[p.shape for p in parts]})")
        out[k] = _concat(parts) if len(parts) > 1 else parts[0]
    return out


def _default(values: Sequence[Any], counts: Sequence[int]) -> Any:
    return _fold_default(values, [None] * len(values))[0]


CONCAT = Strategy("concatenate", _concat_values)
STACK = Strategy("stack", _stack)
LAST = Strategy("last", _last)
LIST = Strategy("list", _as_list)
MEAN = Strategy("mean", _mean)
FIELDS = Strategy("concatenate_fields", _fields)
DEFAULT = Strategy("default", _default)
BUILTIN = {s.name: s for s in (CONCAT, STACK, LAST, LIST, MEAN, FIELDS, DEFAULT)}

# easyroutine's ActivationCache registers these in its constructor (just_old, sublist,
# aggregate_last_layernorm, sublist); every jaxlens cache starts with them too.
EASYROUTINE_STRATEGIES: tuple[tuple[str, Strategy], ...] = (
    ("last_layernorm", FIELDS), ("mapping_index", LAST), ("offset", LIST), ("token_dict", LIST))


@dataclass(frozen=True)
class _Pairwise:
    fn: Callable[[Any, Any], Any]

    def __call__(self, values: Sequence[Any], counts: Sequence[int]) -> Any:
        acc = values[0] if counts[0] > 1 else self.fn(None, values[0])
        for v in values[1:]:
            acc = self.fn(acc, v)
        return acc


def pairwise(fn: Callable[[Any, Any], Any], name: str | None = None) -> Strategy:
    """A custom strategy from an easyroutine-style `fn(old, new)`; `old` is None for the first value.
    (A cache holding it pickles when `fn` is a module-level function.)"""
    return Strategy(name or getattr(fn, "__name__", "custom"), _Pairwise(fn))


def as_strategy(s: Strategy | str | Callable[[Any, Any], Any]) -> Strategy:
    """A Strategy, a built-in name (see `BUILTIN`) or fn(old, new)."""
    if isinstance(s, Strategy):
        return s
    if isinstance(s, str):
        if s not in BUILTIN:
            raise ValueError(f"unknown aggregation strategy {s!r}; use one of {sorted(BUILTIN)} "
                             "or a function (old, new)")
        return BUILTIN[s]
    if callable(s):
        return pairwise(s)
    raise ValueError(f"an aggregation strategy is a Strategy, a name or a function (old, new), not {type(s).__name__}")


def _fold_default(values: Sequence[Any], kinds: Sequence[str | None]) -> tuple[Any, str | None]:
    """easyroutine's `default_aggregation(old, new)` folded left over `values`; returns (value, kind).

    `kinds[i]` says how values[i] was built by earlier combinations ("concatenate", "stack",
    "list", "plus", or None for a fresh value). Step by step, as easyroutine:
    - two arrays: concatenated along axis 0 when both have rank >= 1 and the same trailing shape,
      else stacked when both are 0-d, else `[old, new]` (so after two batches concatenate, a third
      of another trailing shape gives `[concatenation of the two, third]`);
    - a list: the new value appended (a list extends it); a tuple: `[old, new]` (`[old] + new`);
    - anything else (Python scalars, strings): `old + new`, and `[old, new]` where `+` fails.
    Consecutive concatenations are joined by one compiled concatenation, so `combine` and the
    chain of `cat`s give the same value and kind; a value that an earlier combination made a list
    of batches is spliced in (so combining combined caches agrees with the chain too).

    Where easyroutine is wrong we differ, on purpose: a third 0-d value is stacked onto the
    stack of the first two (easyroutine makes `[stack of two, third]`, because `torch.cat` of a
    [2] tensor and a 0-d one fails), and an array meeting a non-array gives `[old, new]`
    (easyroutine's `+` would broadcast-add a Python scalar onto the tensor).
    """
    acc, kind = values[0], kinds[0]
    run = [acc] if _is_array(acc) and np.ndim(acc) >= 1 else None  # acc == concatenate(run)

    def joined(parts: list[Any]) -> Any:
        return _concat(parts) if len(parts) > 1 else parts[0]

    for v, vk in zip(values[1:], kinds[1:]):
        if run is not None:
            trail = run[0].shape[1:]
            if _is_array(v) and np.ndim(v) >= 1 and v.shape[1:] == trail:
                run.append(v)
                kind = "stack" if kind == vk == "stack" else "concatenate"
                continue
            if _is_array(v) and kind == "stack" and v.shape == trail:
                run.append(jnp.asarray(v)[None])
                continue
            acc, run = joined(run), None
        if acc is None:
            acc, kind = v, vk
            run = [acc] if _is_array(acc) and np.ndim(acc) >= 1 else None
        elif _is_array(acc) and _is_array(v):
            if np.ndim(acc) == 0 and np.ndim(v) == 0:
                run, kind = [jnp.asarray(acc)[None], jnp.asarray(v)[None]], "stack"
            elif np.ndim(acc) == 0 and vk == "stack" and v.shape[1:] == ():
                run, kind = [jnp.asarray(acc)[None], v], "stack"
            else:
                acc, kind = [acc, v], "list"
        elif isinstance(acc, list):
            acc, kind = acc + (v if isinstance(v, list) else [v]), "list"
        elif isinstance(acc, tuple) or (isinstance(v, list) and vk == "list"):
            acc, kind = ([acc] + v if isinstance(v, list) else [acc, v]), "list"
        elif _is_array(acc) or _is_array(v):
            acc, kind = [acc, v], "list"
        else:
            try:
                acc, kind = acc + v, "plus"
            except Exception:
                acc, kind = [acc, v], "list"
    if run is not None:
        acc = joined(run)
    return acc, kind


def strategy_for(key: str, strategies: Mapping[str, Strategy]) -> Strategy:
    """The strategy registered under the longest prefix of `key`, else DEFAULT."""
    best = max((p for p in strategies if key.startswith(p)), key=len, default=None)
    return strategies[best] if best is not None else DEFAULT


# ---------------------------------------------------------------------------------------------
# Cache metadata (static, hashable; compared by content)
# ---------------------------------------------------------------------------------------------


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        if _is_array(a) or _is_array(b):
            return _is_array(a) and _is_array(b) and a.shape == b.shape and bool(np.array_equal(a, b))
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
        return bool(a == b)
    except Exception:
        return False


@dataclass(frozen=True, eq=False)
class CacheMeta:
    """What an ActivationCache carries besides arrays: per-key info strings, cache-level metadata
    (target positions, model name, extraction config, interventions, mapping index...), the
    registered aggregation strategies (easyroutine's pre-registered ones to begin with), how each
    default-combined key was built, and how many batches the cache holds. It is part of the
    pytree's static structure."""

    info: tuple[tuple[str, str], ...] = ()
    metadata: tuple[tuple[str, Any], ...] = ()
    strategies: tuple[tuple[str, Strategy], ...] = EASYROUTINE_STRATEGIES
    resolved: tuple[tuple[str, str], ...] = ()
    n_batches: int = 1

    def replace(self, **kw: Any) -> "CacheMeta":
        d = {f: getattr(self, f) for f in ("info", "metadata", "strategies", "resolved", "n_batches")}
        d.update({k: tuple(sorted(v.items())) if isinstance(v, dict) else v for k, v in kw.items()})
        return CacheMeta(**d)

    def __eq__(self, other: Any) -> bool:
        if not isinstance(other, CacheMeta):
            return NotImplemented
        return (self.info == other.info and self.strategies == other.strategies and self.resolved == other.resolved
                and self.n_batches == other.n_batches and _same(dict(self.metadata), dict(other.metadata)))

    def __hash__(self) -> int:
        return hash((self.info, tuple(k for k, _ in self.metadata), self.strategies, self.resolved, self.n_batches))


EMPTY_META = CacheMeta()


# ---------------------------------------------------------------------------------------------
# cat / combine / Deferred / merge
# ---------------------------------------------------------------------------------------------


def _check_compatible(first: Any, other: Any, i: int) -> None:
    a, b = set(first.keys()), set(other.keys())
    if a != b:
        raise ValueError(f"cannot combine caches with different keys: cache {i} lacks {sorted(a - b)} and "
                         f"has extra {sorted(b - a)}; run every batch with the same names_filter")
    if first.cfg is not None and other.cfg is not None and first.cfg != other.cfg:
        raise ValueError(f"cache {i} comes from a different model config ({other.cfg.model_name}) than cache 0 "
                         f"({first.cfg.model_name}); combine caches of one model")
    if first.has_batch_dim != other.has_batch_dim:
        raise ValueError(f"cache {i} has has_batch_dim={other.has_batch_dim}, cache 0 has {first.has_batch_dim}")
    if set(first.weights) != set(other.weights):
        raise ValueError(f"cache {i} carries weights {sorted(other.weights)}, cache 0 {sorted(first.weights)}")


@jax.jit
def _concat(parts: list[jax.Array]) -> jax.Array:
    """One key's batches joined by one compiled concatenation (each byte copied once). Programs are
    cached by shapes, so keys of equal shape share one. (A single program over every key compiles
    far slower once there are thousands of inputs: 256 caches x 25 keys took 9 s vs 1.4 s.)"""
    return jnp.concatenate(parts, axis=0)


def combine(caches: Sequence[Any]) -> Any:
    """Combine caches (batches of one run) into one with the first cache's strategies.

    The result equals the chain `caches[0].cat(caches[1]).cat(caches[2])...` key by key, but each
    concatenated key is joined in one compiled concatenation of all the caches (one copy of each
    byte), not a chain of pairwise copies whose copies grow quadratically. Leading caches
    without activations (e.g. `ActivationCache({})`, easyroutine's empty cache that batches are
    `cat` into) contribute only their strategies, info and metadata. A single batch keeps its
    values as given (easyroutine's `aggregator(None, value)` would make an `offset` a list of one;
    from the second batch on the results agree). Info strings and metadata are
    merged (the first cache wins on conflicts).
    """
    caches = list(caches)
    if not caches:
        raise ValueError("combine needs at least one cache")
    first = caches[0]
    lead = next((i for i, c in enumerate(caches) if len(c)), None)  # leading empty caches only add meta
    if len(caches) == 1 or lead is None:
        return first
    filled = caches[lead:]
    base = filled[0]
    for i, c in enumerate(filled[1:], lead + 1):
        _check_compatible(base, c, i)
    strategies = dict(first.meta.strategies)
    resolved = dict(base.meta.resolved)
    counts = [c.meta.n_batches for c in filled]
    out: dict[str, Any] = {}
    for k in base.keys():
        values = [c[k] for c in filled]
        s = strategy_for(k, strategies)
        if s is DEFAULT:
            out[k], kind = _fold_default(values, [dict(c.meta.resolved).get(k) for c in filled])
            if kind is None:
                resolved.pop(k, None)
            else:
                resolved[k] = kind
        elif len(values) == 1:  # one batch (cat into an empty cache) stays as given
            out[k] = values[0]
        else:
            out[k] = _concat([jnp.asarray(v) for v in values]) if s is CONCAT else s(values, counts)
    info, metadata = {}, {}
    for c in caches:
        for k, v in c.meta.info:
            info.setdefault(k, v)
        for k, v in c.meta.metadata:
            metadata.setdefault(k, v)
    new_meta = first.meta.replace(info=info, metadata=metadata, resolved=resolved, n_batches=sum(counts))
    return base._replace(out, meta=new_meta)


def cat(a: Any, b: Any) -> Any:
    """`a` and `b` combined key by key (a new cache); the keys must match, the mismatch is named."""
    return combine([a, b])


class Deferred:
    """Collects caches and combines them once (`result()`), easyroutine's `deferred_mode` made explicit.

    >>> d = Deferred()
    >>> for batch in batches: d.add(model.run_with_cache(batch)[1])
    >>> cache = d.result()

    easyroutine 1.1.5's `deferred_mode` never terminates: on exit it `cat`s the collected caches
    while still in deferred mode, so each `cat` appends to the list being iterated. Here the
    collection and the combination are separate calls, and `result()` returns.
    """

    def __init__(self, caches: Iterable[Any] = ()):
        self._caches: list[Any] = list(caches)

    def add(self, cache: Any) -> "Deferred":
        filled = [c for c in self._caches if len(c)]
        if filled:
            _check_compatible(filled[0], cache, len(self._caches))
        self._caches.append(cache)
        return self

    cat = add

    def __len__(self) -> int:
        return len(self._caches)

    def result(self) -> Any:
        return combine(self._caches)


def merge(a: Any, b: Any, keep_strategies: bool = True) -> Any:
    """easyroutine's `a + b` (keep_strategies=False) and `a.update(b)` (True): a new cache with
    the keys of both, `b`'s values (and info strings) winning where both have a key. `b` is a
    cache or a dict of values. As easyroutine's `+` builds a fresh cache, it starts from the
    pre-registered strategies; `update` keeps `a`'s. Metadata is merged field by field (`b` wins);
    `a`'s model config, weights and batch count are kept (`b`'s where `a` has none)."""
    if isinstance(b, dict):
        b_items, b_meta, b_cache = dict(b), None, None
    elif type(b) is type(a):
        b_items, b_meta, b_cache = dict(b.items()), b.meta, b
    else:
        raise TypeError(f"can only add or update an ActivationCache with an ActivationCache or a dict, "
                        f"not {type(b).__name__}")
    ma = a.meta
    info = {k: v for k, v in ma.info if k not in b_items}
    resolved = {k: v for k, v in ma.resolved if k not in b_items}
    metadata = dict(ma.metadata)
    if b_meta is not None:
        info.update(b_meta.info)
        resolved.update(b_meta.resolved)
        metadata.update(b_meta.metadata)
    n_batches = ma.n_batches if len(a) or b_meta is None else b_meta.n_batches
    strategies = ma.strategies if keep_strategies else EASYROUTINE_STRATEGIES
    meta = ma.replace(info=info, resolved=resolved, metadata=metadata, strategies=strategies, n_batches=n_batches)
    kw: dict[str, Any] = {"meta": meta}
    if b_cache is not None:
        kw["weights"] = {**b_cache.weights, **a.weights}
        if a.cfg is None:
            kw["cfg"] = b_cache.cfg
        if a.tokenizer is None:
            kw["tokenizer"] = b_cache.tokenizer
    return a._replace({**dict(a.items()), **b_items}, **kw)


# ---------------------------------------------------------------------------------------------
# Mapping index, memory accounting
# ---------------------------------------------------------------------------------------------


def map_to_dict(cache: Any, key: str, mapping_index: Mapping[str, Any] | None = None) -> dict[str, jax.Array]:
    """{name: cache[key][:, index].squeeze()} for each (name, index) of the mapping index (given,
    the cache's `metadata["mapping_index"]`, or a `mapping_index` entry of the cache as easyroutine
    stores it), as easyroutine does."""
    if mapping_index is None:
        mapping_index = dict(cache.meta.metadata).get("mapping_index")
        if mapping_index is None and isinstance(cache.get("mapping_index"), Mapping):
            mapping_index = cache["mapping_index"]
        if mapping_index is None:
            raise ValueError("map_to_dict needs a mapping index: pass mapping_index={name: positions} or "
                             "add_metadata(mapping_index=...)")
    value = cache[key]
    if not _is_array(value):
        raise ValueError(f"map_to_dict: {key!r} holds a {type(value).__name__}, not an array")
    out = {}
    for name, idx in mapping_index.items():
        if isinstance(idx, str):  # easyroutine's {"info": "avg"} marker of averaged positions
            continue
        idx = list(idx) if isinstance(idx, tuple) else idx
        out[name] = jnp.squeeze(jnp.asarray(value)[:, idx])
    return out


def nbytes(tree: Any) -> int:
    """Bytes held by the array leaves of any pytree (lists and dicts of arrays included)."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def human(n: float) -> str:
    """Bytes in decimal units, as easyroutine prints them: "12.35 MB". Below 1 KB the bytes
    themselves ("512.00 B"; easyroutine 1.1.5 divides them by 1000 and still writes "B")."""
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= f:
            return f"{n / f:.2f} {unit}"
    return f"{n:.2f} B"


def memory_size(cache: Any, key: str | None = None) -> str:
    """Size of one key (or of all activations) in human units (see `human`)."""
    if key is None:
        return human(sum(nbytes(v) for v in cache.values()))
    if key not in cache:
        return "Not present: 0 B"
    return human(nbytes(cache[key]))


_LAYER = re.compile(r"^blocks\.\d+\.")
_PER_HEAD = re.compile(r"^(.+_L\d+)H\d+$")  # pattern_L0H1 -> pattern_L0
_PER_LAYER = re.compile(r"^(.+?)_L?\d+$")  # resid_out_3 -> resid_out, values_L3 -> values


def _group_of(key: str) -> str | None:
    if _LAYER.match(key):
        return _LAYER.sub("blocks.*.", key)
    m = _PER_HEAD.match(key) or _PER_LAYER.match(key)
    return m.group(1) if m else None


def memory_tree(cache: Any, grouped: bool = True, print_tree: bool = False) -> dict[str, str]:
    """{key: size}; with `grouped`, keys of one kind are summed: "blocks.*.attn.hook_pattern":
    "1.05 MB (12 items)" over layers for hook names, and for easyroutine's keys (those `extract`
    returns) `resid_out_3` joins "resid_out" and `pattern_L0H1` joins "pattern_L0" (a layer's
    heads), as easyroutine's grouped tree does. easyroutine's own table misses some of its keys
    (`head_out_L0H1`, `values_L0`) and fails on `avg_attn_pattern_*` (a pattern without a
    capture group); here every `{name}_{layer}` / `{name}_L{layer}` key joins `{name}` and
    every `{name}_L{layer}H{head}` key joins `{name}_L{layer}`.
    The carried weights appear once as "weights"."""
    sizes = {k: nbytes(v) for k, v in cache.items()}
    if grouped:
        groups: dict[str, list[int]] = {}
        named: set[str] = set()
        for k, n in sizes.items():
            g = _group_of(k)
            if g is not None:
                named.add(g)
            groups.setdefault(g if g is not None else k, []).append(n)
        tree = {g: f"{human(sum(ns))} ({len(ns)} items)" if g in named else human(sum(ns)) for g, ns in groups.items()}
    else:
        tree = {k: human(n) for k, n in sizes.items()}
    if cache.weights:
        tree["weights"] = human(nbytes(cache.weights))
    if print_tree:
        print("---- Activation Cache Memory Tree ----")
        print("Total size: ", memory_size(cache))
        for k, v in tree.items():
            print(f"   - {k}: {v}")
    return tree


# ---------------------------------------------------------------------------------------------
# Streaming statistics
# ---------------------------------------------------------------------------------------------


class RunningStats(NamedTuple):
    """Per-key running count, mean and M2 (sum of squared deviations), a pytree.

    Statistics are over the reduced axes of each update (by default the batch axis), so after
    updates with batches x_1..x_n, `mean[k]` and `variance()[k]` equal numpy's over their
    concatenation. With `axes=()` each update is one sample (easyroutine's element-wise running
    average over batches). Counts are per element when a mask excludes some entries.
    """

    count: dict[str, jax.Array]
    mean: dict[str, jax.Array]
    m2: dict[str, jax.Array]

    @classmethod
    def empty(cls) -> "RunningStats":
        """No keys yet: the first update adds them (so a jitted step traces twice)."""
        return cls({}, {}, {})

    @classmethod
    def zeros(cls, example: Mapping[str, Any], axes: tuple[int, ...] = (0,)) -> "RunningStats":
        """Zero-count statistics shaped for batches like `example` (arrays or ShapeDtypeStructs), so
        a jitted sweep step sees one structure from the first batch on."""
        count, mean, m2 = {}, {}, {}
        for k, x in example.items():
            keep = tuple(d for i, d in enumerate(x.shape) if i not in {a % len(x.shape) for a in axes})
            count[k], mean[k], m2[k] = (jnp.zeros(keep, jnp.float32) for _ in range(3))
        return cls(count, mean, m2)

    def variance(self, ddof: int = 0) -> dict[str, jax.Array]:
        return {k: self.m2[k] / jnp.maximum(self.count[k] - ddof, 1) for k in self.m2}

    def std(self, ddof: int = 0) -> dict[str, jax.Array]:
        return {k: jnp.sqrt(v) for k, v in self.variance(ddof).items()}


def _batch_moments(x: jax.Array, w: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array, jax.Array]:
    n = jnp.sum(w, axis=axes)
    mean = jnp.sum(w * x, axis=axes) / jnp.maximum(n, 1e-30)
    dev = x - jnp.expand_dims(mean, axes)
    m2 = jnp.sum(w * dev * dev, axis=axes)
    return n, mean, m2


def _weights(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return jnp.ones(x.shape, jnp.float32)
    m = jnp.asarray(mask, jnp.float32)
    if tuple(x.shape[: m.ndim]) != tuple(m.shape):
        raise ValueError(f"mask shape {tuple(m.shape)} must equal the leading dims of the value, {tuple(x.shape)}")
    return jnp.broadcast_to(m.reshape(m.shape + (1,) * (x.ndim - m.ndim)), x.shape)


@partial(jax.jit, static_argnames=("axes",))
def update_stats(stats: RunningStats, batch: Mapping[str, jax.Array], mask: jax.Array | None = None,
                 axes: tuple[int, ...] = (0,)) -> RunningStats:
    """Merge one batch into the running statistics (Chan et al.'s parallel Welford update).

    `batch` maps keys to arrays (an ActivationCache's items work); `axes` are reduced (batch, or
    batch and position; `()` makes the whole batch one sample); `mask`, whose shape is a prefix of
    each value's, weights entries 0/1 (e.g. the attention mask, so padding is not counted). Keys
    absent from `stats` start empty.
    """
    count, mean, m2 = dict(stats.count), dict(stats.mean), dict(stats.m2)
    for k, x in batch.items():
        x = jnp.asarray(x, jnp.float32)
        nb, mb, m2b = _batch_moments(x, _weights(x, mask), axes)
        if k not in count:
            count[k], mean[k], m2[k] = nb, mb, m2b
            continue
        na, ma = count[k], mean[k]
        n = na + nb
        delta = mb - ma
        frac = nb / jnp.maximum(n, 1e-30)
        mean[k] = ma + delta * frac
        m2[k] = m2[k] + m2b + delta * delta * na * frac
        count[k] = n
    return RunningStats(count, mean, m2)


# ---------------------------------------------------------------------------------------------
# Attention-pattern block statistics (the one implementation)
# ---------------------------------------------------------------------------------------------

PATTERN_METHODS = ("mean", "sum", "baseline_ratio")


def _membership(groups: Any, n: int, batch: int, what: str) -> jax.Array | np.ndarray:
    """Token groups -> [batch G n] counts: how often each position is listed in each group (a
    list of index lists, see `normalize_groups`), or a given [G n] / [batch G n] array of weights
    (per-example positions)."""
    if isinstance(groups, (list, tuple, int, np.integer)):
        m = np.zeros((len(norm := normalize_groups(groups, n, what)), n), np.float32)
        for g, idx in enumerate(norm):
            for p in idx:
                m[g, p] += 1.0
        groups = m
    m = groups.astype(jnp.float32) if isinstance(groups, jax.Array) else np.asarray(groups, np.float32)
    if m.ndim == 2:
        m = (jnp if isinstance(m, jax.Array) else np).broadcast_to(m, (batch,) + m.shape)
    if m.ndim != 3 or m.shape[-1] != n:
        raise ValueError(f"{what} must be index lists or a [G {n}] / [batch G {n}] membership array, "
                         f"got shape {m.shape}")
    return m


def group_pattern(pattern: jax.Array, col_groups: Any, row_groups: Any = None, method: str = "mean",
                  attention_mask: jax.Array | None = None) -> jax.Array:
    """Attention pattern [batch head query key] -> per-head blocks [batch head G_rows G_cols]
    (easyroutine's `attention_pattern_head` with `attn_pattern_avg` = `method`).

    Block (i, j) holds the query rows of `row_groups[i]` (default: the column groups) and the key
    columns of `col_groups[j]`. Groups are index lists (negative positions count from the end; a
    position listed twice counts twice, as easyroutine's list indexing does), or membership
    arrays [G pos] / [batch G pos] (per-example positions, entries = how often each counts).
    `method`:
    - "mean": the block's mean (masked entries included as zeros, as easyroutine);
    - "sum": the block's sum;
    - "baseline_ratio": the mean divided by what uniform attention would give: the mean over the
      block's rows i of (listed columns that row i may attend to) / (keys row i may attend to),
      i.e. easyroutine's (#{j in cols: j <= i}) / (i + 1) for a square pattern. A block wholly
      above the diagonal has baseline 0 and gives NaN (0/0), as easyroutine. With
      `attention_mask` [batch key], padding keys are not counted as attendable (our extension
      for padded batches; without it positions are buffer indices, as easyroutine's).
    easyroutine 1.1.5 computes the baseline on the positions as given, so a negative position
    (-1) makes its baseline wrong (row -1 may attend to no key); positions are resolved first
    here. Its code computes statistics only when a row partition is given (else it returns the
    flattened pattern); its docstring's default, rows = the column groups, is what
    `row_groups=None` does here.
    """
    if method not in PATTERN_METHODS:
        raise ValueError(f"method={method!r} must be 'mean', 'sum' or 'baseline_ratio'")
    b, _, q, k = pattern.shape
    C = _membership(col_groups, k, b, "col_groups")
    R = _membership(col_groups if row_groups is None else row_groups, q, b, "row_groups")
    return _group_pattern(pattern, C, R, attention_mask, method=method)


@partial(jax.jit, static_argnames=("method",))
def _group_pattern(pattern: jax.Array, C: jax.Array, R: jax.Array, attention_mask: jax.Array | None,
                   method: str) -> jax.Array:
    q, k = pattern.shape[-2:]
    block = jnp.einsum("bgq,bhqk,bck->bhgc", R, pattern.astype(jnp.float32), C)
    if method == "sum":
        return block
    size = R.sum(-1)[:, :, None] * C.sum(-1)[:, None, :]  # [b G1 G2]
    observed = block / size[:, None]
    if method == "mean":
        return observed
    allowed = jnp.tril(jnp.ones((q, k), jnp.float32), k - q)[None]
    if attention_mask is not None:
        allowed = allowed * jnp.asarray(attention_mask, jnp.float32)[:, None, -k:]
    row_base = jnp.einsum("bqk,bck->bqc", allowed, C) / jnp.maximum(allowed.sum(-1), 1.0)[..., None]
    baseline = jnp.einsum("bgq,bqc->bgc", R, row_base) / R.sum(-1)[..., None]
    return observed / baseline[:, None]


def update_pattern_stats(stats: RunningStats, patterns: Mapping[str, jax.Array], col_groups: Any,
                         row_groups: Any = None, method: str = "mean", example_mask: jax.Array | None = None,
                         attention_mask: jax.Array | None = None) -> RunningStats:
    """Running per-head average (and variance) of `group_pattern` blocks over examples.

    `patterns` maps names to [batch head query key] patterns (keys ending in `hook_pattern` of a
    cache are picked out); `example_mask` [batch] leaves out padding examples of a fixed-size batch.
    Pure, so it can also run inside a jitted sweep step.
    """
    picked = {k: v for k, v in patterns.items() if k.endswith("hook_pattern")} or dict(patterns)
    blocks = {k: group_pattern(v, col_groups, row_groups, method, attention_mask) for k, v in picked.items()}
    return update_stats(stats, blocks, example_mask, axes=(0,))


__all__ = ["normalize_groups", "Strategy", "CONCAT", "STACK", "LAST", "LIST", "MEAN", "FIELDS", "DEFAULT", "BUILTIN",
           "EASYROUTINE_STRATEGIES", "pairwise", "as_strategy", "strategy_for", "CacheMeta", "EMPTY_META",
           "combine", "cat", "Deferred", "merge", "map_to_dict", "nbytes", "human", "memory_size", "memory_tree",
           "RunningStats", "update_stats", "PATTERN_METHODS", "group_pattern", "update_pattern_stats"]
