"""Shared numerics: activations, rotary embedding, masked softmax, grouped-query heads. Pure functions."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxlens.config import ACT_FNS


def _gelu_tanh(x: jax.Array) -> jax.Array:
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


ACTIVATIONS = {"gelu_new": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh, "gelu_fast": _gelu_tanh,
               "gelu": lambda x: jax.nn.gelu(x, approximate=False), "silu": jax.nn.silu, "relu": jax.nn.relu}
assert set(ACTIVATIONS) == set(ACT_FNS), "every ModelConfig act_fn needs an implementation here"


def activation(name: str, x: jax.Array) -> jax.Array:
    """The MLP non-linearity by its HF/TransformerLens name (`jaxlens.config.ACT_FNS`)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; supported: {ACT_FNS}")
    return ACTIVATIONS[name](x)


def rotary_angles(positions: jax.Array, rotary_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [batch pos rotary_dim] for integer positions [batch pos] (HF layout)."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [b p rd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array, rotary_dim: int) -> jax.Array:
    """Rotate the first `rotary_dim` dims of x [batch pos head d_head] (rotate-half convention)."""
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated_half = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    c, s = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    out = rot * c + rotated_half * s
    return jnp.concatenate([out, rest], axis=-1) if rest.shape[-1] else out


def masked_softmax(scores: jax.Array, allowed: jax.Array) -> jax.Array:
    """Softmax over the last axis where `allowed`; a fully masked row gives zeros, not NaN."""
    s = jnp.where(allowed, scores.astype(jnp.float32), -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(allowed, jnp.exp(s - m), 0.0)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(denom == 0, 1.0, denom)


def repeat_kv(x: jax.Array, n_rep: int, axis: int) -> jax.Array:
    """Grouped-query attention: repeat each kv head `n_rep` times along the head `axis`, so that
    query head h reads kv head h // n_rep (TransformerLens's and HF's order)."""
    return jnp.repeat(x, n_rep, axis=axis)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids from a [batch pos] 0/1 mask: the count of real tokens before each one."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)

__all__ = ["ACTIVATIONS", "activation", "rotary_angles", "apply_rotary", "masked_softmax", "repeat_kv",
           "positions_from_mask"]
