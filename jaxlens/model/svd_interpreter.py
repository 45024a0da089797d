"""TransformerLens's `SVDInterpreter`: the top singular vectors of a head's OV circuit, or of a
layer's MLP input or output weights, read out through the unembedding.

`get_singular_vectors(kind, layer_index, num_vectors, head_index)` returns [d_vocab 1 num_vectors]:
column i is W_U^T v_i for the i-th right singular vector v_i (in d_model) of
- "OV": W_V[h] @ W_O[h] (one head; a FactoredMatrix, so the SVD is computed from the factors),
- "w_in": W_in^T scaled by ln2's gain where the model still has one (not after fold_ln),
- "w_out": W_out.
Singular vectors are defined up to sign: a vector and its negation are the same answer.
16-bit weights are decomposed in float32 (as TransformerLens's `upcast_for_linalg`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxlens.model.factored_matrix import FactoredMatrix, upcast_for_linalg

VECTOR_TYPES = ("OV", "w_in", "w_out")


class SVDInterpreter:
    """`SVDInterpreter(model).get_singular_vectors("OV", layer_index=1, head_index=3)`."""

    def __init__(self, model: Any):
        self.model = model
        self.cfg = model.cfg

    def get_singular_vectors(self, vector_type: str, layer_index: int, num_vectors: int = 10,
                             head_index: int | None = None) -> jax.Array:
        """[d_vocab 1 num_vectors]: the top `num_vectors` right singular vectors of the chosen matrix
        (largest singular value first), each mapped to vocabulary space by W_U^T."""
        if vector_type not in VECTOR_TYPES:
            raise ValueError(f"vector_type must be one of {list(VECTOR_TYPES)}, got {vector_type!r}")
        if head_index is None and vector_type == "OV":
            raise ValueError("vector_type 'OV' needs head_index (the head whose OV circuit to decompose); "
                             "head_index is optional only for 'w_in' and 'w_out'")
        layer = self._index(layer_index, self.cfg.n_layers, "layer_index")
        block = self.model.blocks[layer]
        if vector_type == "OV":
            head = self._index(head_index, self.cfg.n_heads, "head_index")
            V = FactoredMatrix(block.attn.W_V[head], block.attn.W_O[head]).V.T  # [k d_model]
        else:
            if self.cfg.num_experts:
                raise NotImplementedError(f"SVDInterpreter cannot analyze {vector_type} for layer {layer}: a sparse "
                                          "MoE layer has no single dense MLP weight (pick one expert's weights)")
            if vector_type == "w_in":
                matrix = upcast_for_linalg(block.mlp.W_in).T  # [d_mlp d_model]
                try:  # an unfolded norm's gain scales the MLP's input
                    matrix = matrix * upcast_for_linalg(block.ln2.w)
                except AttributeError:  # folded into W_in (LNPre / RMSPre), or no norm before the MLP
                    pass
            else:
                matrix = upcast_for_linalg(block.mlp.W_out)  # [d_mlp d_model]
            V = jnp.linalg.svd(matrix, full_matrices=False)[2]  # rows: right singular vectors
        if isinstance(num_vectors, bool) or not isinstance(num_vectors, int) or not 1 <= num_vectors <= V.shape[0]:
            raise ValueError(f"num_vectors must be an int in 1..{V.shape[0]} (the matrix's rank bound), got "
                             f"{num_vectors!r}")
        W_U = self.model.W_U
        vectors = jnp.matmul(upcast_for_linalg(W_U).T, V[:num_vectors].T, precision="highest")  # [d_vocab num_vectors]
        return vectors[:, None, :]

    @staticmethod
    def _index(i: Any, n: int, name: str) -> int:
        if isinstance(i, bool) or not hasattr(i, "__index__") or not 0 <= int(i) < n:
            raise ValueError(f"{name} must be an int in 0..{n - 1}, got {i!r}")
        return int(i)


__all__ = ["SVDInterpreter", "VECTOR_TYPES"]
