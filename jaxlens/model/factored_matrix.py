"""FactoredMatrix: a (batch of) low-rank matrix kept as the product A @ B, TransformerLens's class in JAX.

`FactoredMatrix(A, B)` with A [... ldim mdim] and B [... mdim rdim] stands for A @ B [... ldim rdim]
without forming it: products, transposes, SVD, eigenvalues and norms are computed from the thin
factors, so an OV or QK circuit of every head ([n_layers n_heads d_model d_model]) costs what its
[d_model d_head] factors cost. Leading dimensions of A and B broadcast, as in TransformerLens.

It is a registered pytree whose leaves are A and B, so it passes through `jit`, `vmap` and `grad`.

Also here: `refactor_factored_attn_matrices(params, cfg)`, TransformerLens's weight-processing step
that refactors W_Q/W_K and W_V/W_O into "even" and orthogonal factors while keeping every head's
QK and OV products (and so the model's outputs) unchanged.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.config import ModelConfig
from jaxlens.model.forward import is_scanned

__all__ = ["FactoredMatrix", "composition_scores", "refactor_factored_attn_matrices", "upcast_for_linalg"]


def _T(x: jax.Array) -> jax.Array:
    """Swap the last two axes (matrix transpose of a batch)."""
    return jnp.swapaxes(x, -1, -2)


def upcast_for_linalg(x: jax.Array) -> jax.Array:
    """16-bit floats to float32 for linear algebra (as TransformerLens's `upcast_for_linalg`)."""
    return x.astype(jnp.float32) if x.dtype in (jnp.bfloat16, jnp.float16) else x


def _thin_svd(A: jax.Array, B: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Compact SVD of A @ B from its factors: (U [.. l k], S [.. k], V [.. r k]) with A@B = U diag(S) V^T.

    SVD each factor, then the small core diag(Sa) Vha Ub diag(Sb); nothing of size ldim x rdim is formed.
    """
    A, B = upcast_for_linalg(A), upcast_for_linalg(B)
    Ua, Sa, Vha = jnp.linalg.svd(A, full_matrices=False)
    Ub, Sb, Vhb = jnp.linalg.svd(B, full_matrices=False)
    core = Sa[..., :, None] * (Vha @ Ub) * Sb[..., None, :]
    Um, Sm, Vhm = jnp.linalg.svd(core, full_matrices=False)
    return Ua @ Um, Sm, _T(Vhb) @ _T(Vhm)


def _is_int(x: Any) -> bool:
    return isinstance(x, (numbers.Integral, np.integer)) and not isinstance(x, (bool, np.bool_))


def _index_ndim(item: Any) -> int:
    """How many axes an index item consumes (None and Ellipsis: none; a boolean mask: its rank)."""
    if item is None or item is Ellipsis:
        return 0
    if isinstance(item, (list, tuple, np.ndarray, jax.Array)):
        arr = item if isinstance(item, (np.ndarray, jax.Array)) else np.asarray(item)
        return arr.ndim if arr.dtype == bool else 1
    return 1


def _check_index(item: Any, size: int, axis: int, shape: tuple[int, ...]) -> None:
    """JAX clamps out-of-range integer indices silently: refuse them, naming axis and size."""
    if item is None or isinstance(item, slice) or item is Ellipsis or isinstance(item, jax.core.Tracer):
        return
    if _is_int(item):
        values = np.asarray([int(item)])
    else:
        arr = np.asarray(item)
        if arr.dtype == bool or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
            return
        values = arr
    lo, hi = int(values.min()), int(values.max())
    if lo < -size or hi >= size:
        bad = lo if lo < -size else hi
        raise IndexError(f"index {bad} is out of range for axis {axis} of a FactoredMatrix of shape {shape} "
                         f"(size {size}: valid indices are -{size}..{size - 1})")


def _keep_dim(item: Any) -> Any:
    """An int row/column index becomes a length-1 slice, so the factors stay matrices (as TransformerLens)."""
    if _is_int(item) or (isinstance(item, (np.ndarray, jax.Array)) and item.ndim == 0
                         and np.issubdtype(item.dtype, np.integer)):
        i = int(item)
        return slice(i, i + 1 if i != -1 else None)
    return item


@jax.tree_util.register_pytree_node_class
class FactoredMatrix:
    """A @ B, held as its factors A [... ldim mdim] and B [... mdim rdim] (leading dims broadcast).

    `AB` forms the product; `@` with an array, a vector or another FactoredMatrix (either side)
    stays factored where TransformerLens keeps it factored; `svd()`, `eigenvalues`, `norm()` use
    only the thin factors.
    """

    __array_ufunc__ = None  # so `numpy_array @ fm` defers to __rmatmul__ instead of making an object array

    def __init__(self, A: Any, B: Any):
        A, B = jnp.asarray(A), jnp.asarray(B)
        if A.ndim < 2 or B.ndim < 2:
            raise ValueError(f"FactoredMatrix factors must be matrices (or batches of them); got A {A.shape}, "
                             f"B {B.shape}: reshape a vector v to v[:, None] or v[None, :]")
        if A.shape[-1] != B.shape[-2]:
            raise ValueError(f"FactoredMatrix factors must match on the inner dimension: A {A.shape} has "
                             f"{A.shape[-1]} columns, B {B.shape} has {B.shape[-2]} rows")
        try:
            lead = jnp.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        except ValueError as e:
            raise ValueError(f"FactoredMatrix leading dimensions do not broadcast: A {A.shape}, B {B.shape}") from e
        self.A = jnp.broadcast_to(A, (*lead, *A.shape[-2:]))
        self.B = jnp.broadcast_to(B, (*lead, *B.shape[-2:]))

    # --- pytree -------------------------------------------------------------------------------
    def tree_flatten(self):
        return (self.A, self.B), None

    @classmethod
    def tree_unflatten(cls, aux: Any, children: Any) -> "FactoredMatrix":
        obj = object.__new__(cls)  # leaves may be tracers, specs or None here: no validation
        obj.A, obj.B = children
        return obj

    # --- shape --------------------------------------------------------------------------------
    @property
    def ldim(self) -> int:
        return self.A.shape[-2]

    @property
    def mdim(self) -> int:
        return self.A.shape[-1]

    @property
    def rdim(self) -> int:
        return self.B.shape[-1]

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.A.shape[:-2], self.ldim, self.rdim)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def has_leading_dims(self) -> bool:
        return self.ndim > 2

    @property
    def pair(self) -> tuple[jax.Array, jax.Array]:
        """The factors (A, B)."""
        return self.A, self.B

    def __repr__(self) -> str:
        return f"FactoredMatrix: Shape({self.shape}), Hidden Dim({self.mdim})"

    # --- products -----------------------------------------------------------------------------
    @property
    def AB(self) -> jax.Array:
        """The full product [... ldim rdim] (this one costs memory)."""
        return self.A @ self.B

    @property
    def BA(self) -> jax.Array:
        """The reverse product B @ A [... mdim mdim]; only defined when ldim == rdim."""
        if self.ldim != self.rdim:
            raise ValueError(f"BA needs a square FactoredMatrix (ldim == rdim), but its shape is {self.shape}")
        return self.B @ self.A

    @property
    def T(self) -> "FactoredMatrix":
        return FactoredMatrix(_T(self.B), _T(self.A))

    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, FactoredMatrix):
            return (self @ other.A) @ other.B
        other = jnp.asarray(other)
        if other.ndim < 2:  # a vector: the result is a vector
            if other.shape[-1:] != (self.rdim,):
                raise ValueError(f"cannot multiply FactoredMatrix {self.shape} by a vector of shape {other.shape}: "
                                 f"it needs {self.rdim} entries")
            return (self.A @ (self.B @ other[..., None]))[..., 0]
        if other.shape[-2] != self.rdim:
            raise ValueError(f"cannot multiply FactoredMatrix {self.shape} @ {other.shape}: the right matrix needs "
                             f"{self.rdim} rows")
        if self.rdim > self.mdim:  # fold other into B, keeping the thin inner dimension
            return FactoredMatrix(self.A, self.B @ other)
        return FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other: Any) -> Any:
        if isinstance(other, FactoredMatrix):
            return other.A @ (other.B @ self)
        other = jnp.asarray(other)
        if other.shape[-1:] != (self.ldim,):
            raise ValueError(f"cannot multiply {other.shape} @ FactoredMatrix {self.shape}: the left operand needs "
                             f"{self.ldim} columns")
        if other.ndim < 2:
            return ((other[..., None, :] @ self.A) @ self.B)[..., 0, :]
        if self.ldim > self.mdim:
            return FactoredMatrix(other @ self.A, self.B)
        return FactoredMatrix(other, self.AB)

    def __mul__(self, scalar: Any) -> "FactoredMatrix":
        """Scalar multiple (scales A). Use @ for matrix products."""
        if np.size(scalar) != 1:
            raise ValueError(f"FactoredMatrix * x needs a scalar, got shape {np.shape(scalar)}; use @ for products")
        return FactoredMatrix(self.A * jnp.reshape(jnp.asarray(scalar), ()), self.B)

    __rmul__ = __mul__

    # --- spectra ------------------------------------------------------------------------------
    def svd(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(U [... ldim k], S [... k], V [... rdim k]) with A@B = U diag(S) V^T, k = the thin rank.

        As TransformerLens: the third element is V (not V^T), computed from the factors only.
        Cached on the instance outside of tracing.
        """
        cached = self.__dict__.get("_svd")
        if cached is not None and cached[0] is self.A and cached[1] is self.B:
            return cached[2]
        out = _thin_svd(self.A, self.B)
        if not any(isinstance(x, jax.core.Tracer) for x in (self.A, self.B)):
            self.__dict__["_svd"] = (self.A, self.B, out)
        return out

    @property
    def U(self) -> jax.Array:
        return self.svd()[0]

    @property
    def S(self) -> jax.Array:
        return self.svd()[1]

    @property
    def V(self) -> jax.Array:
        """Right singular vectors [... rdim k]: A@B == U diag(S) V^T."""
        return self.svd()[2]

    @property
    def Vh(self) -> jax.Array:
        """Deprecated alias of `V`, kept as TransformerLens 4 keeps it: it returns V, not V^T."""
        warnings.warn("FactoredMatrix.Vh returns V (the right singular vectors), as in TransformerLens; use .V, "
                      "or .V.swapaxes(-1, -2) for the conjugate transpose", DeprecationWarning, stacklevel=2)
        return self.svd()[2]

    @property
    def eigenvalues(self) -> jax.Array:
        """Eigenvalues of A@B (complex, [... mdim]) from the small B@A: they agree up to zeros."""
        return jnp.linalg.eigvals(upcast_for_linalg(self.BA))

    def norm(self) -> jax.Array:
        """Frobenius norm of every matrix in the batch: sqrt of the sum of squared singular values."""
        return jnp.sqrt(jnp.sum(self.S ** 2, axis=-1))

    def make_even(self) -> "FactoredMatrix":
        """The same matrix as (U sqrt(S)) @ (sqrt(S) V^T): both factors orthogonal, each with half the spectrum."""
        U, S, V = self.svd()
        root = jnp.sqrt(S)
        return FactoredMatrix(U * root[..., None, :], root[..., :, None] * _T(V))

    def collapse_l(self) -> jax.Array:
        """diag(S) V^T [... k rdim]: the product with its left orthogonal factor U removed."""
        return self.S[..., :, None] * _T(self.V)

    def collapse_r(self) -> jax.Array:
        """U diag(S) [... ldim k]: the product with its right orthogonal factor V^T removed."""
        return self.U * self.S[..., None, :]

    # --- indexing and reshaping ---------------------------------------------------------------
    def get_corner(self, k: int = 3) -> jax.Array:
        """The top-left k x ... x k corner of the product, forming only that corner."""
        corner = self.A[..., :k, :] @ self.B[..., :, :k]
        return corner[tuple(slice(k) for _ in range(corner.ndim))]

    def unsqueeze(self, k: int) -> "FactoredMatrix":
        """A new axis of size 1 at position k of both factors (a leading axis for k < ndim - 2)."""
        return FactoredMatrix(jnp.expand_dims(self.A, k), jnp.expand_dims(self.B, k))

    def __getitem__(self, idx: Any) -> "FactoredMatrix":
        """Index leading dims, and rows/columns of the product, without forming it (TransformerLens).

        Integer row/column indices keep a size-1 axis, so the result is still a FactoredMatrix.
        """
        idx = idx if isinstance(idx, tuple) else (idx,)
        ell = [i for i, it in enumerate(idx) if it is Ellipsis]
        if len(ell) > 1:
            raise IndexError("an index can only have a single ellipsis ('...')")
        if ell:
            fill = self.ndim - sum(_index_ndim(it) for it in idx)
            idx = idx[:ell[0]] + (slice(None),) * max(fill, 0) + idx[ell[0] + 1:]
        n_lead = self.ndim - 2
        lead, row, col, new_axes, used = [], [], [], [], 0
        for it in idx:  # split into leading / row / column parts; a None at the matrix axes is recorded
            n = _index_ndim(it)
            if used + n > self.ndim:
                raise IndexError(f"index {idx} is too long for a FactoredMatrix of shape {self.shape}")
            if n > 1 and used + n > n_lead:
                raise IndexError(f"a boolean mask cannot span the row/column axes of a FactoredMatrix {self.shape}: "
                                 "index rows and columns separately")
            if n == 1:
                _check_index(it, self.shape[used], used, self.shape)
            if it is None and used >= n_lead:
                new_axes.append(used - n_lead)
            elif used < n_lead:
                lead.append(it)
            elif used == n_lead:
                row.append(it)
            else:
                col.append(it)
            used += n
        lead = tuple(lead)
        A = self.A[lead + tuple(_keep_dim(r) for r in row)] if row else self.A[lead]
        B = self.B[lead + (slice(None), *(_keep_dim(c) for c in col))] if col else self.B[lead]
        out = FactoredMatrix(A, B)
        for pos in new_axes:
            if pos == 0:  # a new axis just before the rows: one more leading dim
                out = out.unsqueeze(out.ndim - 2)
            elif pos == 1:  # between rows and columns: the rows become a leading dim
                out = FactoredMatrix(out.A[..., :, None, :], out.B[..., None, :, :])
            else:  # after the columns: the columns become the rows of a [.., rdim, 1] matrix
                out = FactoredMatrix(_T(out.B)[..., None, :, :], out.A[..., :, :, None])
        return out


# ---------------------------------------------------------------------------------------------
# Weight processing: refactor_factored_attn_matrices
# ---------------------------------------------------------------------------------------------

def composition_scores(left: FactoredMatrix, right: FactoredMatrix, broadcast_dims: bool = True) -> jax.Array:
    """||left @ right||_F / (||left||_F ||right||_F) (TransformerLens's `utils.composition_scores`),
    from the factors: with L = A B and R = C D, ||L R||_F^2 = tr(M^T (A^T A) M (D D^T)) for
    M = B C, so nothing larger than the inner dimensions is formed. `broadcast_dims`: every
    left/right pair, left's leading dims first."""
    if not isinstance(left, FactoredMatrix) or not isinstance(right, FactoredMatrix):
        raise TypeError("composition_scores takes two FactoredMatrix objects")
    if left.rdim != right.ldim:
        raise ValueError(f"composition scores need left.rdim == right.ldim, got shapes {left.shape} and {right.shape}")
    A, B = (upcast_for_linalg(x) for x in left.pair)
    C, D = (upcast_for_linalg(x) for x in right.pair)
    if broadcast_dims:
        nl, nr = A.ndim - 2, C.ndim - 2
        A, B = (x.reshape(x.shape[:-2] + (1,) * nr + x.shape[-2:]) for x in (A, B))
        C, D = (x.reshape((1,) * nl + x.shape) for x in (C, D))
    hi = jax.lax.Precision.HIGHEST
    G = jnp.matmul(_T(A), A, precision=hi)  # [.. m m]
    H = jnp.matmul(D, _T(D), precision=hi)  # [.. k k]
    M = jnp.matmul(B, C, precision=hi)  # [.. m k]
    comp = jnp.einsum("...mk,...mn,...nl,...lk->...", M, G, M, H, precision=hi)
    l_norm = jnp.einsum("...mn,...nm->...", G, jnp.matmul(B, _T(B), precision=hi), precision=hi)
    r_norm = jnp.einsum("...kl,...lk->...", H, jnp.matmul(_T(C), C, precision=hi), precision=hi)
    return jnp.sqrt(jnp.maximum(comp, 0)) / jnp.sqrt(l_norm) / jnp.sqrt(r_norm)


def refactor_factored_attn_matrices(params: dict[str, Any], cfg: ModelConfig) -> tuple[dict[str, Any], ModelConfig]:
    """TransformerLens's `refactor_factored_attn_matrices` on a jaxlens params tree: new (params, cfg).

    Per head, W_QK = W_Q W_K^T and W_OV = W_V W_O are all that matter, so they are refactored:
    - QK: [W_Q; b_Q] and [W_K; b_K] (a d_model + 1 input whose last coordinate is 1, so biases are
      kept) become the even factors U sqrt(S) and V sqrt(S) of their product's SVD;
    - OV: b_O += sum_h b_V[h] W_O[h], b_V = 0, then W_V = U S and W_O = V^T (W_O a rotation).
    Every head's QK bilinear form (biases included) and OV map are unchanged, hence so are the
    logits. Refused for rotary models (their QK depends on position) and grouped-query attention
    (each query head would need its own keys). Arithmetic in float32, cast back. Either params
    layout (unrolled or scanned) in, the same layout out. Biases that did not exist are created
    (and the config's bias flags switched on).
    """
    if cfg.positional_embedding_type == "rotary":
        raise ValueError(f"refactor_factored_attn_matrices: {cfg.model_type} uses rotary embeddings, so its QK "
                         "matrix depends on the query and key positions and cannot be refactored (TransformerLens "
                         "refuses this too)")
    if cfg.n_kv_heads != cfg.n_heads:
        raise ValueError(f"refactor_factored_attn_matrices: grouped-query attention ({cfg.n_heads} query heads, "
                         f"{cfg.n_kv_heads} key/value heads) shares keys between heads, so per-head factors cannot be "
                         "stored; not supported")
    if cfg.d_head > cfg.d_model:
        raise ValueError(f"refactor_factored_attn_matrices needs d_head <= d_model, got {cfg.d_head} > {cfg.d_model}")
    from jaxlens.model.forward import stack_layers, unstack_layers

    scanned = is_scanned(params)
    stacked = params if scanned else stack_layers(params, cfg.n_layers)
    attn = stacked["blocks"]["block"]["attn"]
    dtype = attn["W_Q"].dtype
    f32 = {k: jnp.asarray(v, jnp.float32) for k, v in attn.items()}
    L, H, M, D = f32["W_Q"].shape
    zeros_hd = jnp.zeros((L, H, D), jnp.float32)
    b_Q, b_K, b_V = (f32.get(k, zeros_hd) for k in ("b_Q", "b_K", "b_V"))
    b_O = f32.get("b_O", jnp.zeros((L, M), jnp.float32))

    q_eff = jnp.concatenate([f32["W_Q"], b_Q[:, :, None, :]], axis=2)  # [L H M+1 D]
    k_eff = jnp.concatenate([f32["W_K"], b_K[:, :, None, :]], axis=2)
    q_even, k_even_t = FactoredMatrix(q_eff, _T(k_eff)).make_even().pair
    k_even = _T(k_even_t)

    U, S, V = FactoredMatrix(f32["W_V"], f32["W_O"]).svd()
    new = dict(attn)
    new.update({
        "W_Q": q_even[:, :, :-1, :], "b_Q": q_even[:, :, -1, :], "W_K": k_even[:, :, :-1, :],
        "b_K": k_even[:, :, -1, :], "W_V": U * S[..., None, :], "W_O": _T(V), "b_V": jnp.zeros_like(b_V),
        "b_O": b_O + jnp.einsum("lhd,lhdm->lm", b_V, f32["W_O"]),
    })
    new = {k: v.astype(attn[k].dtype if k in attn else dtype) for k, v in new.items()}
    out = {**stacked, "blocks": {"block": {**stacked["blocks"]["block"], "attn": new}}}
    return (out if scanned else unstack_layers(out, cfg.n_layers)), cfg.replace(use_qkv_bias=True, use_o_bias=True)
