"""TransformerLens 4.3's interchange interventions on linear subspaces (`tools.analysis.interchange`).

An interchange runs the model on a base input with its activation at one hook set, inside a
subspace, to its value on a source input: `h' = h_base + strength * (h_source - h_base) @ B @ B.T`
for an orthonormal basis B [d_model rank] (`projection_kernel.orthonormal_subspace`'s
convention). Bases: the difference of class means, a probe's weights, MLP neurons, random ones
(placebos), and a norm-matched random-subspace placebo.

`fit_das` learns the basis instead (distributed alignment search): an orthonormal basis trained
with Adam (optax) so that the interchange gives the high-level model's predicted classes; its
controls are `arbitrary_targets` (TransformerLens's exact labels) and `reinitialized` (the same
architecture with freshly initialised weights).

JAX differences: random draws (bases, DAS's initial basis, `reinitialized`) take a PRNG key or
an int seed and are not torch's; the learned basis is the Q factor of a free matrix (torch's
`orthogonal` parametrisation is another map onto the same set); activations are read with
`run_with_cache`, so `collect_activations` needs no `task_logits` (accepted, for
TransformerLens's signature). The interventions are pytrees, so a hook holding one compiles once
and never goes stale. Not built: `random_init_bridge` (a TransformerLens bridge; `reinitialized`
is jaxlens's random-init control).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable, Optional, Sequence

import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.model.projection_kernel import orthonormal_subspace
from jaxlens.utils import to_numpy
from jaxlens.validate import check_key

__all__ = ["DASResult", "LearnedSubspace", "NormMatchedPlacebo", "SubspaceInterchange", "arbitrary_targets",
           "collect_activations", "fit_das", "intervened_logits", "mean_difference_basis", "neuron_basis", "probe_basis",
           "random_basis", "random_neuron_basis", "reinitialized", "run_with_intervention"]

TaskLogits = Callable[[Any], jax.Array]
Intervention = Callable[[jax.Array, jax.Array], jax.Array]


def _key(key: Any) -> jax.Array:
    """A PRNG key (typed or legacy, as `validate.check_key` accepts), or an int seed turned into one."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return jax.random.key(int(key))
    try:
        check_key(key)
    except TypeError:
        raise ValueError(f"key must be a jax.random.key or an int seed, got {type(key).__name__}") from None
    return key


def random_basis(d_model: int, rank: int, key: Any) -> jax.Array:
    """A random orthonormal basis [d_model rank] (the baseline any aligned basis should beat),
    drawn from `key` (a PRNG key, or an int seed)."""
    if not 0 < rank <= d_model:
        raise ValueError(f"rank must be in [1, {d_model}], got {rank}")
    return orthonormal_subspace(jax.random.normal(_key(key), (d_model, rank)), rank=rank).basis


def mean_difference_basis(activations: Any, labels: Sequence[Hashable]) -> jax.Array:
    """The span of the centred class means [d_model n_classes-1]: for two classes, the
    difference-in-means direction."""
    values = np.asarray(labels)
    acts = jnp.asarray(activations, jnp.float32)
    if acts.ndim != 2 or len(values) != acts.shape[0]:
        raise ValueError(f"activations must be [batch d_model] with one label per row; got {tuple(acts.shape)} "
                         f"and {len(values)} labels")
    classes = np.unique(values)
    if len(classes) < 2:
        raise ValueError("mean_difference_basis needs at least two classes")
    means = jnp.stack([acts[np.flatnonzero(values == c)].mean(0) for c in classes])
    return orthonormal_subspace((means - means.mean(0)).T, rank=len(classes) - 1).basis


def probe_basis(weights: Any) -> jax.Array:
    """A linear probe's weight directions: one row, its direction; several, the span of the centred
    rows (rank n_rows - 1). Undo input scaling first (divide by each feature's std)."""
    w = jnp.asarray(weights, jnp.float32)
    if w.ndim != 2:
        raise ValueError(f"weights must be [n_rows d_model], got shape {tuple(w.shape)}")
    if w.shape[0] == 1:
        return orthonormal_subspace(w.T, rank=1).basis
    return orthonormal_subspace((w - w.mean(0)).T, rank=w.shape[0] - 1).basis


def _neuron_indices(d_mlp: int, neurons: Any) -> np.ndarray:
    index = to_numpy(neurons)
    if index.size == 0:
        return np.zeros(0, np.int64)
    if index.dtype == bool or not np.issubdtype(index.dtype, np.integer):
        raise ValueError(f"neuron indices must be integers, got dtype {index.dtype}")
    if index.ndim != 1:
        raise ValueError(f"neuron indices must be one-dimensional, got shape {tuple(index.shape)}")
    if ((index < 0) | (index >= d_mlp)).any():
        raise ValueError(f"neuron indices must be in [0, {d_mlp}), got {index.tolist()}")
    if len(np.unique(index)) != len(index):
        raise ValueError(f"neuron indices must not repeat, got {index.tolist()}")
    return index.astype(np.int64)


def neuron_basis(d_mlp: int, neurons: Any) -> jax.Array:
    """The unit vectors of some MLP neurons [d_mlp k], in the order given: interchanging it sets
    exactly those neurons (at a hook such as blocks.N.mlp.hook_post) to the source's values."""
    index = _neuron_indices(d_mlp, neurons)
    if index.size == 0:
        raise ValueError("neuron_basis needs at least one neuron")
    return jnp.zeros((d_mlp, index.size), jnp.float32).at[index, np.arange(index.size)].set(1.0)


def random_neuron_basis(d_mlp: int, k: int, key: Any, exclude: Any = None) -> jax.Array:
    """k random neurons' unit vectors, avoiding `exclude`: the placebo for `neuron_basis`."""
    excluded = _neuron_indices(d_mlp, [] if exclude is None else exclude)
    pool = np.setdiff1d(np.arange(d_mlp), excluded)
    if not 0 < k <= len(pool):
        raise ValueError(f"k must be in [1, {len(pool)}] with {len(excluded)} neurons excluded, got {k}")
    return neuron_basis(d_mlp, pool[np.asarray(jax.random.permutation(_key(key), len(pool)))[:k]])


@dataclass(frozen=True)
class SubspaceInterchange:
    """Set the base's coordinates inside `basis` [d_model rank] to the source's; `strength` scales
    the move (0 leaves the base)."""

    basis: Any
    strength: Any = 1.0

    def __call__(self, base: jax.Array, source: jax.Array) -> jax.Array:
        B = jnp.asarray(self.basis).astype(base.dtype)
        return base + self.strength * ((source - base) @ B) @ B.T


@dataclass(frozen=True)
class NormMatchedPlacebo:
    """Move each base as far as `reference` does, inside the random subspace `basis`: an effect the
    placebo also has comes from the displacement, not from the aligned subspace."""

    reference: SubspaceInterchange
    basis: Any

    def __call__(self, base: jax.Array, source: jax.Array) -> jax.Array:
        distance = jnp.linalg.norm(self.reference(base, source) - base, axis=-1, keepdims=True)
        B = jnp.asarray(self.basis).astype(base.dtype)
        move = ((source - base) @ B) @ B.T
        return base + move * (distance / jnp.maximum(jnp.linalg.norm(move, axis=-1, keepdims=True), 1e-8))


jax.tree_util.register_dataclass(SubspaceInterchange, data_fields=["basis", "strength"], meta_fields=[])
jax.tree_util.register_dataclass(NormMatchedPlacebo, data_fields=["reference", "basis"], meta_fields=[])


def _positions(positions: Any, batch: int) -> Optional[np.ndarray]:
    if positions is None:
        return None
    p = to_numpy(positions)
    if p.shape != (batch,) or not np.issubdtype(p.dtype, np.integer):
        raise ValueError(f"positions must hold one integer index per example, shape ({batch},); got "
                         f"{tuple(p.shape)} of dtype {p.dtype}")
    return p


def _check_at(act_shape: tuple[int, ...], positions: Any, hook_name: str) -> None:
    """The activation must be [batch d_model] without positions, [batch pos d_model] with them."""
    if positions is None:
        if len(act_shape) != 2:
            raise ValueError(f"{hook_name} has shape {act_shape}; pass one position index per example")
    elif len(act_shape) != 3:
        raise ValueError(f"with positions, the activation must be [batch, pos, d_model]; {hook_name} has shape "
                         f"{act_shape}")


def _check_range(positions: Optional[np.ndarray], inputs: Any) -> None:
    """Positions within the inputs' length (JAX would clamp an index out of range)."""
    shape = np.shape(to_numpy(inputs))
    if positions is not None and len(shape) == 2 and ((positions < -shape[1]) | (positions >= shape[1])).any():
        raise ValueError(f"positions must be in [-{shape[1]}, {shape[1]}) for inputs of {shape[1]} positions, got "
                         f"{positions.tolist()}")


def _select(act: jax.Array, positions: Optional[jax.Array]) -> jax.Array:
    return act if positions is None else act[jnp.arange(act.shape[0]), positions]


def _write(act: jax.Array, positions: Optional[jax.Array], new: jax.Array) -> jax.Array:
    return new.astype(act.dtype) if positions is None else act.at[jnp.arange(act.shape[0]), positions].set(
        new.astype(act.dtype))


@dataclass(frozen=True)
class _Intervene:
    """The hook of `run_with_intervention`: the selected base rows go through the intervention."""

    intervention: Any
    source: jax.Array
    positions: Optional[jax.Array]

    def __call__(self, act: jax.Array, hook: Any) -> jax.Array:
        _check_at(tuple(act.shape), self.positions, hook.name)
        return _write(act, self.positions, self.intervention(_select(act, self.positions), self.source.astype(act.dtype)))


jax.tree_util.register_dataclass(_Intervene, data_fields=["intervention", "source", "positions"], meta_fields=[])


def collect_activations(model: Any, hook_name: str, inputs: Any, task_logits: TaskLogits | None = None, *,
                        positions: Any = None, batch_size: int = 256) -> jax.Array:
    """Activations at `hook_name` [batch d_model], at one position per example if given, read
    with run_with_cache in batches of `batch_size` (the model's stored hooks apply)."""
    del task_logits  # the activation is read directly, not through a hook's side effect
    n = len(inputs)
    pos = _positions(positions, n)
    _check_range(pos, inputs)
    out = []
    for start in range(0, n, batch_size):
        chunk = inputs[start:start + batch_size]
        _, cache = model.run_with_cache(chunk, names_filter=hook_name)
        act = jnp.asarray(cache[hook_name])
        p = None if pos is None else pos[start:start + batch_size]
        _check_at(tuple(act.shape), p, hook_name)
        out.append(_select(act, None if p is None else jnp.asarray(p)))
    return jnp.concatenate(out)


def run_with_intervention(model: Any, hook_name: str, intervention: Intervention, base_inputs: Any,
                          source_activations: Any, task_logits: TaskLogits, *, positions: Any = None) -> jax.Array:
    """`task_logits(base_inputs)` (e.g. `lambda t: model(t)[:, -1, answer_ids]`) with `intervention`
    applied at `hook_name` to each base row (at its position, if given) against the source's row.
    Differentiable in the intervention's arrays."""
    n = len(base_inputs)
    pos = _positions(positions, n)
    source = jnp.asarray(source_activations)
    if source.shape[0] != n:
        raise ValueError(f"source_activations must have one row per base input: {source.shape[0]} rows for {n} bases")
    _check_range(pos, base_inputs)
    if hook_name not in model.hook_dict:
        raise ValueError(f"{hook_name!r} is not a hook point of this model (see model.hook_dict)")
    hook = _Intervene(intervention, source, None if pos is None else jnp.asarray(pos))
    with model.hooks(fwd_hooks=[(hook_name, hook)]):
        return task_logits(base_inputs)


def intervened_logits(model: Any, hook_name: str, intervention: Intervention, base_inputs: Any,
                      source_activations: Any, task_logits: TaskLogits, *, positions: Any = None,
                      batch_size: int = 256) -> jax.Array:
    """`run_with_intervention` in batches of `batch_size` (bounded memory), concatenated."""
    n = len(base_inputs)
    if len(source_activations) != n:
        raise ValueError("source_activations must have one row per base input")
    pos = _positions(positions, n)
    return jnp.concatenate([
        run_with_intervention(model, hook_name, intervention, base_inputs[s:s + batch_size],
                              source_activations[s:s + batch_size], task_logits,
                              positions=None if pos is None else pos[s:s + batch_size])
        for s in range(0, n, batch_size)])


# --- distributed alignment search -------------------------------------------------------------
@dataclass(frozen=True)
class LearnedSubspace:
    """A trainable rank-`rank` subspace: `basis` is the Q factor of the free matrix `weight`
    [d_model rank] (signs fixed by R's diagonal, so the map is smooth), always orthonormal."""

    weight: jax.Array

    @property
    def basis(self) -> jax.Array:
        q, r = jnp.linalg.qr(self.weight)
        return q * jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0)

    @classmethod
    def init(cls, d_model: int, rank: int, key: Any) -> "LearnedSubspace":
        if not 0 < rank <= d_model:
            raise ValueError(f"rank must be in [1, {d_model}], got {rank}")
        return cls(jax.random.normal(_key(key), (d_model, rank)) / np.sqrt(d_model))


jax.tree_util.register_dataclass(LearnedSubspace, data_fields=["weight"], meta_fields=[])


@dataclass(frozen=True)
class DASResult:
    """What `fit_das` learned: the subspace, the mean training loss per epoch, where, what rank."""

    subspace: LearnedSubspace
    losses: tuple[float, ...]
    hook_name: str
    rank: int

    @property
    def basis(self) -> jax.Array:
        return self.subspace.basis


def _cross_entropy_sum(logits: jax.Array, labels: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, labels[:, None], axis=-1).sum()


def fit_das(model: Any, hook_name: str, base_inputs: Any, source_inputs: Any, targets: Any, task_logits: TaskLogits, *,
            rank: int, base_positions: Any = None, source_positions: Any = None, epochs: int = 20,
            batch_size: int = 128, lr: float = 1e-2, strength: float = 1.0, seed: Any = 0,
            micro_batch_size: int | None = None) -> DASResult:
    """Learn the subspace whose interchange makes the model output `targets` (DAS): Adam on the
    cross-entropy of the task logits under the interchange, `epochs` passes in a seeded order
    (numpy's, as TransformerLens's). `targets[i]` is the high-level model's class for base i with
    the aligned variable taken from source i. `micro_batch_size` splits each step into parts with
    the same summed gradient. The model's weights are not trained."""
    try:
        import optax
    except ImportError as e:  # pragma: no cover - optax ships with the train extra
        raise ImportError("fit_das trains with optax: pip install 'jaxlens[train]' (or optax)") from e
    labels = to_numpy(targets)
    if not (len(base_inputs) == len(source_inputs) == len(labels)):
        raise ValueError("base_inputs, source_inputs and targets must have the same length")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"targets must be one integer class per pair, got shape {labels.shape} of dtype {labels.dtype}")
    if epochs < 1 or batch_size < 1 or (micro_batch_size is not None and micro_batch_size < 1):
        raise ValueError("epochs, batch_size and micro_batch_size must be positive")
    micro = micro_batch_size or batch_size
    bpos = _positions(base_positions, len(labels))
    source = collect_activations(model, hook_name, source_inputs, positions=source_positions, batch_size=micro)
    seed_int = int(seed) if isinstance(seed, (int, np.integer)) else 0
    rng = np.random.default_rng(seed_int)
    subspace = LearnedSubspace.init(int(source.shape[-1]), rank, seed)
    opt = optax.adam(lr)
    state = opt.init(subspace)

    def loss_sum(sub: LearnedSubspace, idx: np.ndarray) -> jax.Array:
        logits = run_with_intervention(model, hook_name, SubspaceInterchange(sub.basis, strength), base_inputs[idx],
                                       source[idx], task_logits, positions=None if bpos is None else bpos[idx])
        return _cross_entropy_sum(logits, jnp.asarray(labels[idx]))

    grad_fn = jax.value_and_grad(loss_sum)
    losses = []
    for _ in range(epochs):
        order, total = rng.permutation(len(labels)), 0.0
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            grads, value = None, 0.0
            for part in range(0, len(batch), micro):  # summed, then / len(batch): split steps give equal gradients
                v, g = grad_fn(subspace, batch[part:part + micro])
                value += float(v)
                grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
            grads = jax.tree.map(lambda g, n=len(batch): g / n, grads)
            updates, state = opt.update(grads, state, subspace)
            subspace = optax.apply_updates(subspace, updates)
            total += value
        losses.append(total / len(order))
    return DASResult(subspace, tuple(losses), hook_name, rank)


def arbitrary_targets(keys: Sequence[Hashable], n_classes: int, seed: int) -> np.ndarray:
    """A fixed pseudo-random class per key (equal keys, equal classes): the arbitrary-label control
    for `fit_das`, TransformerLens's exact draw (sha256 of f"{seed}:{key!r}")."""
    if n_classes < 1:
        raise ValueError(f"n_classes must be positive, got {n_classes}")
    return np.array([int.from_bytes(hashlib.sha256(f"{seed}:{k!r}".encode()).digest()[:8], "big") % n_classes
                     for k in keys], dtype=np.int64)


def reinitialized(model: Any, seed: Any) -> Any:
    """A copy of `model` with freshly initialised weights (the architecture's own initialisers;
    norms at 1, biases at 0): the random-init control for `fit_das`. `model` is not modified."""
    from jaxlens.hooks import RunCtx
    from jaxlens.model.forward import is_scanned
    from jaxlens.model.transformer import Transformer

    params = model.params
    module = Transformer(model.cfg, scan_layers=is_scanned(params), dtype=params["W_E"].dtype)
    toks = jnp.zeros((1, 2), jnp.int32)
    fresh = module.init(_key(seed), toks, jnp.ones((1, 2), jnp.int32), RunCtx())["params"]
    if jax.tree.structure(fresh) != jax.tree.structure(params):
        raise ValueError("reinitialized: the fresh parameters do not match the model's layout")
    fresh = jax.tree.map(lambda new, old: new.astype(old.dtype), fresh, params)
    return type(model)(model.cfg, fresh, model.tokenizer, precision=model.precision)
