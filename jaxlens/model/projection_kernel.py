"""TransformerLens's Projection Kernel: a basis-invariant overlap of linear subspaces, and the
OQ / OK / OV affinities of attention heads' weight subspaces.

For orthonormal bases U [d a] and V [d b], PK = ||U^T V||_F^2, the sum of the squared cosines of
the principal angles between the two subspaces; it lies in [0, min(a, b)], and PK / sqrt(a b) is
the cosine between the two projection matrices. A head's subspace is the column space of its
per-head weight read in d_model: W_Q, W_K, W_V [head d_model d_head] and W_O^T. K and V keep the
model's own kv heads under grouped-query attention (never expanded to the query heads).

Linear algebra runs in float32 (float64 stays float64), matmuls at full precision. Results are
frozen dataclasses of jax arrays and Python numbers; the per-head bases are decomposed in one
batched SVD and the pairwise scores computed one source head at a time (bounded memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

AttentionRole = Literal["Q", "K", "V", "O"]
HeadKind = Literal["query", "kv"]


@dataclass(frozen=True)
class SubspaceBasis:
    """An orthonormal column-space basis [ambient rank] of a matrix, with its whole reduced-SVD
    spectrum (descending), the retained and the measured numerical rank, the relative tolerance
    and the absolute threshold the rank was measured at, and the matrix's shape."""

    basis: jax.Array
    singular_values: jax.Array
    rank: int
    measured_rank: int
    rtol: float
    threshold: float
    input_shape: tuple[int, int]

    @property
    def ambient_dim(self) -> int:
        return int(self.basis.shape[0])


@dataclass(frozen=True)
class ProjectionKernelResult:
    """PK score, PK / sqrt(rank_a rank_b), the principal-angle cosines (descending) and angles
    (radians)."""

    score: jax.Array
    normalized: jax.Array
    cosines: jax.Array
    angles: jax.Array
    rank_a: int
    rank_b: int
    ambient_dim: int


@dataclass(frozen=True)
class RandomSubspaceReference:
    """PK's mean and variance for two independent uniformly random rank-`rank` planes."""

    ambient_dim: int
    rank: int
    mean: float
    variance: float


@dataclass(frozen=True)
class AttentionHeadRef:
    """One head's weight subspace: layer, head (a kv head for K and V), role, head kind."""

    layer: int
    head: int
    role: AttentionRole
    kind: HeadKind

    @property
    def label(self) -> str:
        return f"L{self.layer}H{self.head}"


@dataclass(frozen=True)
class HeadAffinityPair:
    source: AttentionHeadRef
    target: AttentionHeadRef
    score: float
    normalized: float


@dataclass(frozen=True)
class HeadAffinityResult:
    """Affinities [source_layer source_head target_layer target_head] (zero where not valid:
    `layer_order="forward"` keeps source layer < target layer), each head's measured rank, the
    retained basis widths, the requested `rank` (or None) and the relative tolerance used."""

    scores: jax.Array
    normalized: jax.Array
    valid_mask: jax.Array
    source_role: AttentionRole
    target_role: AttentionRole
    source_layer_indices: tuple[int, ...]
    target_layer_indices: tuple[int, ...]
    source_head_kind: HeadKind
    target_head_kind: HeadKind
    source_ranks: jax.Array
    target_ranks: jax.Array
    source_rank: int
    target_rank: int
    rank: int | None
    rtol: float

    def top_pairs(self, k: int = 20, *, normalized: bool = False) -> list[HeadAffinityPair]:
        """The k highest-scoring valid pairs; ties in order of (source layer, source head,
        target layer, target head)."""
        k = _require_int(k, "k")
        scores, norm = np.asarray(self.scores), np.asarray(self.normalized)
        value = norm if normalized else scores
        entries = []
        for sl, sh, tl, th in np.argwhere(np.asarray(self.valid_mask)):
            src = AttentionHeadRef(self.source_layer_indices[sl], int(sh), self.source_role, self.source_head_kind)
            tgt = AttentionHeadRef(self.target_layer_indices[tl], int(th), self.target_role, self.target_head_kind)
            entries.append((-float(value[sl, sh, tl, th]), src.layer, src.head, tgt.layer, tgt.head,
                            HeadAffinityPair(src, tgt, float(scores[sl, sh, tl, th]), float(norm[sl, sh, tl, th]))))
        entries.sort(key=lambda e: e[:5])
        return [e[5] for e in entries[:k]]


def _require_int(value: Any, name: str, *, minimum: int = 1, maximum: int | None = None) -> int:
    """`value` as an int in [minimum, maximum] (bools refused), else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        expected = (f"between {minimum} and {maximum}" if maximum is not None else
                    "a positive integer" if minimum == 1 else f"an integer at least {minimum}")
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return int(value)


def _compute_dtype(dtype: Any) -> Any:
    """float64 stays float64; everything else runs in float32."""
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def _rtol(rtol: Any, shape: tuple[int, int], dtype: Any) -> float:
    """Default: max(shape) * eps of the compute dtype (the SVD's own error scale)."""
    if rtol is None:
        return max(shape) * float(jnp.finfo(_compute_dtype(dtype)).eps)
    if isinstance(rtol, bool) or not isinstance(rtol, Real) or not math.isfinite(float(rtol)) or rtol < 0:
        raise ValueError(f"rtol must be a finite non-negative real number, got {rtol!r}")
    return float(rtol)


def orthonormal_subspace(matrix: Any, *, rank: int | None = None, rtol: float | None = None) -> SubspaceBasis:
    """The column space of `matrix` [ambient width] as an orthonormal basis: the leading left
    singular vectors up to its numerical rank (singular values above rtol * the largest), or the
    first `rank` of them (at most the measured rank)."""
    if not isinstance(matrix, (jax.Array, np.ndarray)):
        raise ValueError(f"matrix must be a jax or numpy array, got {type(matrix).__name__}")
    if matrix.ndim != 2:
        raise ValueError(f"matrix must be two-dimensional, got shape {tuple(matrix.shape)}")
    if 0 in matrix.shape:
        raise ValueError(f"matrix dimensions must be non-empty, got shape {tuple(matrix.shape)}")
    if not jnp.issubdtype(matrix.dtype, jnp.floating):
        raise ValueError(f"matrix must have a real floating-point dtype, got {matrix.dtype}")
    if not bool(jnp.isfinite(matrix).all()):
        raise ValueError("matrix must contain only finite values")
    shape = (int(matrix.shape[0]), int(matrix.shape[1]))
    requested = None if rank is None else _require_int(rank, "rank", maximum=min(shape))
    tol = _rtol(rtol, shape, matrix.dtype)
    left, s, _ = jnp.linalg.svd(jnp.asarray(matrix, _compute_dtype(matrix.dtype)), full_matrices=False)
    threshold = float(s[0]) * tol
    measured = int((s > threshold).sum())
    _check_rank(measured, requested, shape, matrix.dtype, threshold)
    keep = measured if requested is None else requested
    return SubspaceBasis(left[:, :keep], s, keep, measured, tol, threshold, shape)


def _check_rank(measured: int, requested: int | None, shape: tuple[int, int], dtype: Any, threshold: float) -> None:
    if measured == 0:
        raise ValueError(f"matrix numerical rank is zero for shape {shape}, dtype {dtype}, and threshold "
                         f"{threshold:.6g}")
    if requested is not None and requested > measured:
        raise ValueError(f"requested rank {requested} exceeds measured rank {measured} at threshold {threshold:.6g}")


def _check_subspace(value: Any, name: str) -> None:
    if not isinstance(value, SubspaceBasis):
        raise ValueError(f"{name} must be a SubspaceBasis (from orthonormal_subspace), got {type(value).__name__}")
    b = value.basis
    if b.ndim != 2 or not jnp.issubdtype(b.dtype, jnp.floating) or not bool(jnp.isfinite(b).all()):
        raise ValueError(f"{name}.basis must be a finite real floating-point matrix")
    if value.rank != b.shape[1] or not value.rank <= value.measured_rank <= min(value.input_shape):
        raise ValueError(f"{name}.rank must equal its basis width and not exceed measured_rank")
    if value.input_shape[0] != b.shape[0]:
        raise ValueError(f"{name}.input_shape must share its basis ambient dimension")


def _clamped(x: jax.Array, upper: float, what: str, count: int) -> jax.Array:
    """x clamped to [0, upper] when it lies outside only by roundoff; a ValueError otherwise."""
    tol = 100 * float(jnp.finfo(x.dtype).eps) * max(1, count)
    lo, hi = float(x.min()), float(x.max())
    if lo < -tol or hi > upper + tol:
        raise ValueError(f"{what} lies outside its theoretical bounds: observed [{lo:.6g}, {hi:.6g}], expected "
                         f"[0, {upper:g}] within tolerance {tol:.6g}")
    return jnp.clip(x, 0.0, upper)


def projection_kernel(subspace_a: SubspaceBasis, subspace_b: SubspaceBasis, *,
                      check_orthonormal: bool = True) -> ProjectionKernelResult:
    """PK between two subspaces from `orthonormal_subspace`, with its principal angles."""
    if not isinstance(check_orthonormal, bool):
        raise ValueError(f"check_orthonormal must be a Boolean, got {check_orthonormal!r}")
    _check_subspace(subspace_a, "subspace_a")
    _check_subspace(subspace_b, "subspace_b")
    if subspace_a.ambient_dim != subspace_b.ambient_dim:
        raise ValueError(f"subspaces must have equal ambient dimensions, got {subspace_a.ambient_dim} and "
                         f"{subspace_b.ambient_dim}")
    dtype = _compute_dtype(jnp.promote_types(subspace_a.basis.dtype, subspace_b.basis.dtype))
    a, b = subspace_a.basis.astype(dtype), subspace_b.basis.astype(dtype)
    if check_orthonormal:
        tol = 10 * max(a.shape[0], a.shape[1], b.shape[1]) * float(jnp.finfo(dtype).eps)
        for name, u in (("subspace_a", a), ("subspace_b", b)):
            gram = jnp.matmul(u.T, u, precision="highest")
            if not bool(jnp.allclose(gram, jnp.eye(u.shape[1], dtype=dtype), rtol=tol, atol=tol)):
                raise ValueError(f"{name} basis columns must be orthonormal")
    overlap = jnp.matmul(a.T, b, precision="highest")
    score = _clamped(jnp.square(overlap).sum(), min(subspace_a.rank, subspace_b.rank), "Projection Kernel score",
                     min(subspace_a.rank, subspace_b.rank))
    cosines = jnp.linalg.svd(overlap, compute_uv=False)
    cosines = _clamped(cosines, 1.0, "Principal-angle cosine", cosines.size)
    return ProjectionKernelResult(score, score / math.sqrt(subspace_a.rank * subspace_b.rank), cosines,
                                  jnp.arccos(cosines), subspace_a.rank, subspace_b.rank, subspace_a.ambient_dim)


def random_projection_kernel_moments(ambient_dim: int, rank: int) -> RandomSubspaceReference:
    """PK's mean r^2/d and variance for independent uniformly random rank-r planes in d dimensions:
    a descriptive reference, not a p-value for trained weights (dependent, anisotropic)."""
    d = _require_int(ambient_dim, "ambient_dim", minimum=2)
    r = _require_int(rank, "rank", maximum=d)
    variance = 2 * r**2 * (d - r) ** 2 / (d**2 * (d - 1) * (d + 2))
    return RandomSubspaceReference(d, r, float(r**2 / d), float(variance))


def _role_weights(model: Any, role: str) -> jax.Array:
    """[layer head d_model width] per-head weights of `role` (W_O transposed; K, V per kv head)."""
    blocks = [model.blocks[l].attn for l in range(model.cfg.n_layers)]
    name = {"Q": "W_Q", "K": "_W_K", "V": "_W_V", "O": "W_O"}[role]
    w = jnp.stack([getattr(b, name) for b in blocks])
    w = jnp.swapaxes(w, -1, -2) if role == "O" else w
    if not bool(jnp.isfinite(w).all()):
        raise ValueError(f"role {role} weights must contain only finite values")
    return w


def _head_bases(w: jax.Array, role: str, keep: int, rtol: float, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """([layer head d_model keep] orthonormal bases, [layer head] measured ranks) of every head."""
    left, s, _ = jnp.linalg.svd(w.astype(dtype), full_matrices=False)
    threshold = np.asarray(s[..., 0]) * rtol
    measured = np.asarray((s > jnp.asarray(threshold)[..., None]).sum(-1))
    for (l, h), m in np.ndenumerate(measured):
        try:
            _check_rank(int(m), keep, tuple(w.shape[2:]), w.dtype, float(threshold[l, h]))
        except ValueError as error:
            raise ValueError(f"Could not extract role {role} at layer {l}, head {h}: {error}") from error
    return left[..., :keep], jnp.asarray(measured, jnp.int32)


@jax.jit
def _pairwise_pk(src: jax.Array, tgt: jax.Array) -> jax.Array:
    """[n_src n_tgt] PK of every source basis [d r] with every target basis [d s], one source at
    a time (each step holds [n_tgt r s], not the whole [n_src n_tgt r s])."""
    def one(u):
        return jnp.square(jnp.einsum("dr,nds->nrs", u, tgt, precision="highest")).sum((-2, -1))
    return jax.lax.map(one, src)


def attention_head_subspace_affinity(model: Any, *, source_role: str = "O", target_role: str,
                                     layer_order: str = "forward", rank: int | None = None,
                                     rtol: float | None = None) -> HeadAffinityResult:
    """OQ, OK or OV Projection Kernel affinity of every (source head, target head) pair: how much
    the subspace head a writes (W_O^T) overlaps the one head b reads through its Q, K or V.

    `rank`: a common truncation rank (default: every head at full column rank, d_head, else an
    error naming the head); `rtol`: the relative numerical-rank tolerance.
    """
    if source_role != "O":
        raise ValueError(f"source_role must be 'O' in v1, got {source_role!r}")
    if target_role not in ("Q", "K", "V"):
        raise ValueError(f"target_role must be one of ['Q', 'K', 'V'], got {target_role!r}")
    if layer_order not in ("forward", "all"):
        raise ValueError(f"layer_order must be one of ['forward', 'all'], got {layer_order!r}")
    src_w, tgt_w = _role_weights(model, source_role), _role_weights(model, target_role)
    L, hs, d, ws = src_w.shape
    ht, wt = tgt_w.shape[1], tgt_w.shape[3]
    dtype = _compute_dtype(jnp.promote_types(src_w.dtype, tgt_w.dtype))
    tol = _rtol(rtol, (d, max(ws, wt)), dtype)
    requested = None if rank is None else _require_int(rank, "rank", maximum=min(d, ws, wt))
    src_rank, tgt_rank = (ws, wt) if requested is None else (requested, requested)
    src_b, src_ranks = _head_bases(src_w, source_role, src_rank, tol, dtype)
    tgt_b, tgt_ranks = _head_bases(tgt_w, target_role, tgt_rank, tol, dtype)
    scores = _pairwise_pk(src_b.reshape(L * hs, d, src_rank), tgt_b.reshape(L * ht, d, tgt_rank))
    upper = min(src_rank, tgt_rank)
    scores = _clamped(scores.reshape(L, hs, L, ht), upper, "Projection Kernel score", upper)
    layers = jnp.arange(L)
    if layer_order == "forward":
        valid = jnp.broadcast_to((layers[:, None] < layers[None, :])[:, None, :, None], scores.shape)
    else:
        valid = jnp.ones(scores.shape, bool)
    scores = jnp.where(valid, scores, 0.0)
    normalized = scores / math.sqrt(src_rank * tgt_rank)
    idx = tuple(range(L))
    return HeadAffinityResult(scores, normalized, valid, "O", target_role, idx, idx, "query",
                              "query" if target_role == "Q" else "kv", src_ranks, tgt_ranks, src_rank, tgt_rank,
                              rank, tol)


__all__ = ["SubspaceBasis", "ProjectionKernelResult", "RandomSubspaceReference", "AttentionHeadRef",
           "HeadAffinityPair", "HeadAffinityResult", "orthonormal_subspace", "projection_kernel",
           "random_projection_kernel_moments", "attention_head_subspace_affinity"]
