"""Rotary position embedding with HF's scaling variants (`rope_scaling` / `rope_parameters`).

`inv_freq` follows transformers' `ROPE_INIT_FUNCTIONS` (default, linear, dynamic NTK, yarn, llama3,
longrope) and the length-dependent update HF applies in the forward pass (`dynamic_rope_update`):
dynamic recomputes its base from the call's length, longrope uses its long factors once the call's
length exceeds the original context. HF takes that length as `max(position_ids) + 1` of the call
(over the whole batch), so for those two types a prompt's activations depend on the longest
prompt of its batch, in HF and here alike. HF's dynamic variant also keeps state across calls
(a shorter call after a longer one reuses the longer one's frequencies); ours is stateless: each
call equals a freshly loaded HF model's.

Everything is jit-able: a traced length selects with `jnp.where`, never with Python branching.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxlens.config import ModelConfig, RopeScaling

Scale = float | jax.Array  # the attention scaling: a Python float, or a traced scalar


def _plain(rotary_dim: int, base: float | jax.Array) -> jax.Array:
    """1 / base^(2i/d) for i < d/2, in f32 (HF's default RoPE)."""
    return 1.0 / (jnp.asarray(base, jnp.float32) ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))


def _original(s: RopeScaling, cfg: ModelConfig) -> int:
    """The pre-extension context (HF defaults it to max_position_embeddings)."""
    return int(s.original_max_position_embeddings if s.original_max_position_embeddings is not None else cfg.n_ctx)


def _dynamic(cfg: ModelConfig, s: RopeScaling, seq_len: int | jax.Array | None) -> jax.Array:
    """Dynamic NTK: the base grows with the call's length beyond HF's max_position_embeddings
    (stored as `original_max_position_embeddings`, so `n_ctx` may be raised to run longer inputs)."""
    rd = cfg.rotary_dim
    if rd <= 2:
        raise ValueError(f"dynamic RoPE needs rotary_dim > 2 (HF divides by rotary_dim - 2), got {rd}")
    n, f = _original(s, cfg), float(s.factor)  # HF: relative to max_position_embeddings (the parser stores it)
    # within max_position_embeddings HF keeps its load-time frequencies, computed in double precision
    at_load = _plain(rd, float(cfg.rotary_base) * ((f * n / n) - (f - 1)) ** (rd / (rd - 2)))
    if seq_len is None:
        return at_load
    # beyond it HF recomputes them from the call's length, in f32
    length = jnp.maximum(jnp.asarray(seq_len, jnp.float32), jnp.float32(n))
    grown = _plain(rd, jnp.float32(cfg.rotary_base) * ((f * length / n) - (f - 1)) ** (rd / (rd - 2)))
    return jnp.where(jnp.asarray(seq_len) > n, grown, at_load)


def _yarn(cfg: ModelConfig, s: RopeScaling) -> tuple[jax.Array, float]:
    """YaRN: interpolate low frequencies, keep high ones, ramp between (beta_fast, beta_slow)."""
    rd, base, factor = cfg.rotary_dim, float(cfg.rotary_base), float(s.factor)
    original = _original(s, cfg)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if s.attention_factor is not None:
        attention = float(s.attention_factor)
    elif s.mscale and s.mscale_all_dim:
        attention = mscale(factor, s.mscale) / mscale(factor, s.mscale_all_dim)
    else:
        attention = mscale(factor)
    beta_fast, beta_slow = s.beta_fast or 32, s.beta_slow or 1  # HF: falsy means the default

    def correction_dim(rotations: float) -> float:
        return rd * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.truncate is None or s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rd - 1)
    if low == high:
        high += 0.001  # HF's guard against a zero-width ramp
    ramp = jnp.clip((jnp.arange(rd // 2, dtype=jnp.float32) - low) / (high - low), 0.0, 1.0)
    extrapolation = 1.0 - ramp  # weight of the unscaled frequency
    pos_freqs = jnp.float32(base) ** (jnp.arange(0, rd, 2, dtype=jnp.float32) / rd)
    inv = (1.0 / (factor * pos_freqs)) * (1.0 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, attention


def _llama3(cfg: ModelConfig, s: RopeScaling) -> jax.Array:
    """Llama 3.1: divide long wavelengths by `factor`, keep short ones, interpolate between."""
    if s.low_freq_factor is None or s.high_freq_factor is None:
        raise ValueError("llama3 RoPE needs low_freq_factor and high_freq_factor")
    inv = _plain(cfg.rotary_dim, cfg.rotary_base)
    factor, lo, hi, old = float(s.factor), float(s.low_freq_factor), float(s.high_freq_factor), _original(s, cfg)
    low_wavelen, high_wavelen = old / lo, old / hi
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def _longrope(cfg: ModelConfig, s: RopeScaling, seq_len: int | jax.Array | None) -> tuple[jax.Array, float]:
    """LongRoPE (Phi-3): per-frequency short or long factors; one attention factor for both."""
    half = cfg.rotary_dim // 2
    for name in ("short_factor", "long_factor"):
        v = getattr(s, name)
        if v is None or len(v) != half:
            raise ValueError(f"longrope RoPE needs {name} with rotary_dim/2 = {half} entries, got {v}")
    original = _original(s, cfg)
    factor = float(s.factor)
    if s.attention_factor is not None:
        attention = float(s.attention_factor)
    else:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    shape = jnp.float32(cfg.rotary_base) ** (jnp.arange(0, cfg.rotary_dim, 2, dtype=jnp.float32) / cfg.rotary_dim)
    short = 1.0 / (jnp.asarray(s.short_factor, jnp.float32) * shape)
    if seq_len is None:  # HF's frequencies at load time
        return short, attention
    long = 1.0 / (jnp.asarray(s.long_factor, jnp.float32) * shape)
    return jnp.where(jnp.asarray(seq_len) > original, long, short), attention


def inv_freq(cfg: ModelConfig, *, local: bool = False, seq_len: int | jax.Array | None = None
             ) -> tuple[jax.Array, Scale]:
    """(inverse frequencies [rotary_dim/2] f32, attention scaling of cos/sin), as HF computes them.

    `seq_len` is the call's length (max position + 1; traced or not), read by dynamic and longrope;
    None gives HF's frequencies at load time. `local`: a sliding-window layer, which uses plain
    RoPE at `cfg.rotary_base_local` when that is set (Gemma 3), else the global frequencies."""
    if cfg.rotary_dim is None:
        raise ValueError(f"{cfg.model_type} has no rotary embedding (positional_embedding_type="
                         f"{cfg.positional_embedding_type!r})")
    rd = cfg.rotary_dim
    if local and cfg.rotary_base_local is not None:
        return _plain(rd, cfg.rotary_base_local), 1.0
    s = cfg.rope_scaling
    if s is None:
        return _plain(rd, cfg.rotary_base), 1.0
    if s.rope_type == "linear":
        return _plain(rd, cfg.rotary_base) / s.factor, 1.0
    if s.rope_type == "dynamic":
        return _dynamic(cfg, s, seq_len), 1.0
    if s.rope_type == "yarn":
        return _yarn(cfg, s)
    if s.rope_type == "llama3":
        return _llama3(cfg, s), 1.0
    if s.rope_type == "longrope":
        return _longrope(cfg, s, seq_len)
    raise ValueError(f"rope_type {s.rope_type!r} is not implemented")  # RopeScaling validates the type


def rotary_angles(positions: jax.Array, cfg: ModelConfig, *, local: bool = False) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [batch pos rotary_dim] for integer positions [batch pos], in HF's layout
    (frequencies concatenated twice) and multiplied by the attention scaling as HF does."""
    length = None
    if cfg.rope_scaling is not None and cfg.rope_scaling.rope_type in ("dynamic", "longrope"):
        length = jnp.max(positions) + 1  # HF: max(position_ids) + 1 of this call
    inv, scale = inv_freq(cfg, local=local, seq_len=length)
    freqs = positions.astype(jnp.float32)[..., None] * inv  # [b p rd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if not (isinstance(scale, float) and scale == 1.0):
        cos, sin = cos * scale, sin * scale
    return cos, sin


__all__ = ["Scale", "inv_freq", "rotary_angles"]
