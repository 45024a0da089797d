"""TransformerLens's module tree as read-only views of `model.params`.

`model.embed.W_E`, `model.blocks[3].attn.W_Q`, `model.blocks[3].mlp.b_out`, `model.ln_final.w`,
`model.unembed.W_U` read the parameter pytree in TransformerLens's layout (grouped K/V expanded
to every query head; an absent bias is zeros, as TransformerLens reports it), for unrolled and
scanned params alike. `model.blocks[3].attn.hook_z` is a `HookPointRef`. `model.embed(tokens)`,
`model.pos_embed(tokens)`, `model.ln_final(x)`, `model.blocks[3].ln1(x)`, `model.unembed(resid)`
and `model.blocks[3](resid)` compute what the TransformerLens module would. Nothing here can be
assigned: parameters are an immutable pytree (build a new one and set `model.params`).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Iterator

import jax
import jax.numpy as jnp

from jaxlens.config import ModelConfig
from jaxlens.edits.hook_points import HookPointRef
from jaxlens.hooks import RunCtx
from jaxlens.model.layers import repeat_kv
from jaxlens.model.norms import Norm


@partial(jax.jit, static_argnames=("cfg", "prefix"))
def _norm(params: dict[str, Any], x: jax.Array, *, cfg: ModelConfig, prefix: str) -> jax.Array:
    """The model's own norm module (no hooks), so a view normalises exactly as a run does."""
    return Norm(cfg, prefix).apply({"params": params}, x, RunCtx())


def block_param(model: Any, layer: int, sub: str, name: str) -> jax.Array | None:
    """One block's parameter as stored (None if absent): a slice of the stack when scanned."""
    if model.scan_layers:
        w = model.params["blocks"]["block"].get(sub, {}).get(name)
        return None if w is None else w[layer]
    return model.params[f"blocks_{layer}"].get(sub, {}).get(name)


def _layer_index(layer: Any, n_layers: int) -> int:
    if isinstance(layer, bool) or not hasattr(layer, "__index__"):
        raise TypeError(f"blocks are indexed by int (or slice), got {type(layer).__name__}")
    l = int(layer) + n_layers if int(layer) < 0 else int(layer)
    if not 0 <= l < n_layers:
        raise IndexError(f"block {layer} is out of range: the model has {n_layers} blocks (0..{n_layers - 1})")
    return l


class _View:
    """Base: a model and a hook-name prefix; `hook_*` attributes are that prefix's hook points."""

    __slots__ = ("_model", "_prefix")

    def __init__(self, model: Any, prefix: str):
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_prefix", prefix)

    @property
    def cfg(self) -> ModelConfig:
        return self._model.cfg

    def _dt(self) -> Any:
        return self._model.params["W_E"].dtype

    def __getattr__(self, name: str) -> Any:
        prop = getattr(type(self), name, None)
        if isinstance(prop, property):  # the property raised AttributeError: raise its message, not ours
            return prop.fget(self)
        if name.startswith("hook_"):
            full = f"{self._prefix}.{name}" if self._prefix else name
            if full in self._model._hook_name_set:
                return HookPointRef(self._model, full)
        raise AttributeError(f"{self._prefix or 'model'} has no attribute {name!r}"
                             + ("; its hook points are " + ", ".join(self._hooks()) if self._hooks() else ""))

    def _hooks(self) -> list[str]:
        pre = f"{self._prefix}." if self._prefix else ""
        return [n[len(pre):] for n in self._model.hook_names() if n.startswith(pre) and "." not in n[len(pre):]]

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{self._prefix}.{name} is read-only: jaxlens parameters are an immutable pytree; build "
                             "new params (e.g. with jax.tree.map or a dict copy) and assign model.params")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._prefix!r})"


class EmbedView(_View):
    """`model.embed`: W_E [d_vocab d_model]; calling it gives `hook_embed`'s value (Gemma scaled)."""

    @property
    def W_E(self) -> jax.Array:
        return self._model.params["W_E"]

    def __call__(self, tokens: Any) -> jax.Array:
        from jaxlens.tokens import check_tokens

        toks, _ = check_tokens(tokens, self.cfg)  # JAX gathers clamp out-of-vocabulary ids silently
        out = self.W_E[jnp.asarray(toks)]
        return out if self.cfg.embed_scale is None else out * jnp.asarray(self.cfg.embed_scale, out.dtype)


class PosEmbedView(_View):
    """`model.pos_embed`: W_pos [n_ctx d_model]; calling it gives [batch pos d_model] (positions
    from `attention_mask` as the model computes them, offset by `past_kv_pos_offset`)."""

    @property
    def W_pos(self) -> jax.Array:
        return self._model.params["W_pos"]

    def __call__(self, tokens: Any, past_kv_pos_offset: int = 0, attention_mask: Any = None) -> jax.Array:
        from jaxlens.model.layers import positions_from_mask

        toks = jnp.atleast_2d(jnp.asarray(tokens))
        mask = jnp.ones(toks.shape, jnp.int32) if attention_mask is None else jnp.atleast_2d(jnp.asarray(attention_mask))
        pos = positions_from_mask(mask) + past_kv_pos_offset
        if int(pos.max()) >= self.cfg.n_ctx:
            raise ValueError(f"position {int(pos.max())} is past the model's context n_ctx={self.cfg.n_ctx}")
        return self.W_pos[pos]


class UnembedView(_View):
    """`model.unembed`: W_U [d_model d_vocab], b_U; calling it maps [.. d_model] to logits."""

    @property
    def W_U(self) -> jax.Array:
        return self._model.W_U

    @property
    def b_U(self) -> jax.Array:
        return self._model.b_U

    def __call__(self, residual: Any) -> jax.Array:
        with jax.default_matmul_precision(self._model.precision or "default"):
            return jnp.asarray(residual, self._dt()) @ self.W_U + self.b_U


class NormView(_View):
    """`model.ln_final`, `model.blocks[l].ln1` / `ln2`: w, b (absent after fold_ln: LNPre /
    RMSPre have none, as in TransformerLens); calling it normalises [.. d_model]."""

    __slots__ = ("_layer", "_sub")

    def __init__(self, model: Any, prefix: str, layer: int | None = None, sub: str = "ln_final"):
        super().__init__(model, prefix)
        object.__setattr__(self, "_layer", layer)
        object.__setattr__(self, "_sub", sub)

    def _params(self) -> dict[str, jax.Array]:
        if self._layer is None:
            p = self._model.params.get("ln_final", {})
            return {k: p[k] for k in ("w", "b") if k in p}
        return {k: block_param(self._model, self._layer, self._sub, k) for k in ("w", "b")
                if block_param(self._model, self._layer, self._sub, k) is not None}

    def _get(self, name: str) -> jax.Array:
        p = self._params()
        if name not in p:
            raise AttributeError(f"{self._prefix} ({self.cfg.normalization_type}) has no {name}"
                                 + (": fold_ln folded it into the next weights" if self.cfg.normalization_type.endswith("Pre")
                                    else ""))
        return p[name]

    w = property(lambda self: self._get("w"))
    b = property(lambda self: self._get("b"))

    def __call__(self, x: Any) -> jax.Array:
        return _norm(self._params(), jnp.asarray(x, self._dt()), cfg=self.cfg, prefix=self._prefix)


class _SublayerView(_View):
    """Base of the attention and MLP views: one block's `sub` parameters; an absent bias reads
    as zeros of `shape` (TransformerLens's convention), an absent weight is an AttributeError."""

    __slots__ = ("_layer",)
    _sub = ""

    def __init__(self, model: Any, layer: int):
        super().__init__(model, f"blocks.{layer}.{self._sub}")
        object.__setattr__(self, "_layer", layer)

    def _missing(self, name: str) -> str:
        return ""

    def _w(self, name: str, shape: tuple[int, ...] | None = None) -> jax.Array:
        w = block_param(self._model, self._layer, self._sub, name)
        if w is None:
            if shape is None:
                raise AttributeError(f"{self._prefix} has no {name}{self._missing(name)}")
            w = jnp.zeros(shape, self._dt())
        return w


class AttnView(_SublayerView):
    """`model.blocks[l].attn`: W_Q/W_K/W_V [head d_model d_head], W_O [head d_head d_model],
    b_Q/b_K/b_V [head d_head], b_O [d_model]. Grouped K/V are expanded to every query head
    (`_W_K`, `_W_V`, `_b_K`, `_b_V` are the [kv_head ...] weights as stored)."""

    __slots__ = ()
    _sub = "attn"

    def _expand(self, w: jax.Array) -> jax.Array:
        return repeat_kv(w, self.cfg.n_heads // self.cfg.n_kv_heads, axis=0)

    def _kv_bias_shape(self) -> tuple[int, int]:
        return (self.cfg.n_kv_heads, self.cfg.d_head)

    W_Q = property(lambda self: self._w("W_Q"))
    W_O = property(lambda self: self._w("W_O"))
    _W_K = property(lambda self: self._w("W_K"))
    _W_V = property(lambda self: self._w("W_V"))
    W_K = property(lambda self: self._expand(self._w("W_K")))
    W_V = property(lambda self: self._expand(self._w("W_V")))
    b_Q = property(lambda self: self._w("b_Q", (self.cfg.n_heads, self.cfg.d_head)))
    _b_K = property(lambda self: self._w("b_K", self._kv_bias_shape()))
    _b_V = property(lambda self: self._w("b_V", self._kv_bias_shape()))
    b_K = property(lambda self: self._expand(self._b_K))
    b_V = property(lambda self: self._expand(self._b_V))
    b_O = property(lambda self: self._w("b_O", (self.cfg.d_model,)))


class MLPView(_SublayerView):
    """`model.blocks[l].mlp`: W_in [d_model d_mlp], W_out [d_mlp d_model], b_in, b_out (zeros
    when the family has none), W_gate / b_gate for gated MLPs."""

    __slots__ = ()
    _sub = "mlp"

    def _missing(self, name: str) -> str:
        return ": it is not a gated MLP" if name in ("W_gate", "b_gate") and not self.cfg.gated_mlp else ""

    W_in = property(lambda self: self._w("W_in"))
    W_out = property(lambda self: self._w("W_out"))
    W_gate = property(lambda self: self._w("W_gate"))
    b_in = property(lambda self: self._w("b_in", (self.cfg.d_mlp,)))
    b_out = property(lambda self: self._w("b_out", (self.cfg.d_model,)))
    b_gate = property(lambda self: self._w("b_gate"))


class BlockView(_View):
    """`model.blocks[l]`: .attn, .mlp, .ln1, .ln2 and the block's hook points; calling it on the
    residual stream [batch pos d_model] entering the block returns the one leaving it."""

    __slots__ = ("_layer",)

    def __init__(self, model: Any, layer: int):
        super().__init__(model, f"blocks.{layer}")
        object.__setattr__(self, "_layer", layer)

    attn = property(lambda self: AttnView(self._model, self._layer))
    mlp = property(lambda self: MLPView(self._model, self._layer))
    ln1 = property(lambda self: NormView(self._model, f"{self._prefix}.ln1", self._layer, "ln1"))
    ln2 = property(lambda self: NormView(self._model, f"{self._prefix}.ln2", self._layer, "ln2"))

    def __call__(self, resid_pre: Any, attention_mask: Any = None) -> jax.Array:
        return self._model(resid_pre, attention_mask, start_at_layer=self._layer, stop_at_layer=self._layer + 1)


class BlocksView:
    """`model.blocks`: a read-only sequence of `BlockView`s (negative indices and slices work)."""

    __slots__ = ("_model",)

    def __init__(self, model: Any):
        self._model = model

    def __len__(self) -> int:
        return self._model.cfg.n_layers

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [BlockView(self._model, l) for l in range(*i.indices(len(self)))]
        return BlockView(self._model, _layer_index(i, len(self)))

    def __iter__(self) -> Iterator[BlockView]:
        return (BlockView(self._model, l) for l in range(len(self)))

    def __repr__(self) -> str:
        return f"BlocksView({len(self)} blocks)"


__all__ = ["EmbedView", "PosEmbedView", "UnembedView", "NormView", "AttnView", "MLPView", "BlockView", "BlocksView",
           "block_param"]
