"""Shared numerics: activations, applying the rotary embedding (its angles: jaxlens.model.rope),
masked softmax, grouped-query heads. Pure functions."""

from __future__ import annotations

import math

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.config import ACT_FNS
from jaxlens.model import cpu_kernels


def _gelu_tanh(x: jax.Array) -> jax.Array:
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


ACTIVATIONS = {"gelu_new": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh, "gelu_fast": _gelu_tanh,
               "gelu": lambda x: jax.nn.gelu(x, approximate=False), "silu": jax.nn.silu, "relu": jax.nn.relu}
assert set(ACTIVATIONS) == set(ACT_FNS), "every ModelConfig act_fn needs an implementation here"


def param(module: nn.Module, name: str, init, shape: tuple[int, ...], dtype) -> jax.Array:
    """`module.param(name, init, shape, dtype)`, without flax's `eval_shape` of the initializer when
    the parameter exists. Flax traces the initializer on every call to check the stored shape; an
    eager forward (hooks that store) spent half its time there and every trace paid it too. The
    shape is still checked, with flax's error."""
    if module.has_variable("params", name):
        value = module.get_variable("params", name)
        if np.shape(value) != tuple(shape):
            raise flax.errors.ScopeParamShapeError(name, module.scope.path_text, np.shape(value), tuple(shape))
        return value
    return module.param(name, init, shape, dtype)


def activation(name: str, x: jax.Array) -> jax.Array:
    """The MLP non-linearity by its HF/TransformerLens name (`jaxlens.config.ACT_FNS`)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; supported: {ACT_FNS}")
    return ACTIVATIONS[name](x)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array, rotary_dim: int) -> jax.Array:
    """Rotate the first `rotary_dim` dims of x [batch pos head d_head] (rotate-half convention)."""
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated_half = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    c, s = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    out = rot * c + rotated_half * s
    return jnp.concatenate([out, rest], axis=-1) if rest.shape[-1] else out


def soft_cap(x: jax.Array, cap: float) -> jax.Array:
    """cap * tanh(x / cap): Gemma 2's soft-capping of attention scores and final logits."""
    c = jnp.asarray(cap, x.dtype)
    return c * jnp.tanh(x / c)


def masked_softmax(scores: jax.Array, allowed: jax.Array) -> jax.Array:
    """Softmax over the last axis where `allowed`; a fully masked row gives zeros, not NaN."""
    s = jnp.where(allowed, scores.astype(jnp.float32), -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(allowed, jnp.exp(s - m), 0.0)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(denom == 0, 1.0, denom)


KEY_BLOCK = 512  # keys per step of the blocked attention
QUERY_BLOCK = 512  # queries per pass of the blocked attention


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, scale: float,
                      cap: float | None = None, block: int = KEY_BLOCK, q_block: int = QUERY_BLOCK) -> jax.Array:
    """softmax(mask(cap(q k^T / scale))) v without the [batch head query key] score matrix.

    q [b h q d], k/v [b h k d] (kv heads already repeated), allowed [b 1|h q k]. Queries go in
    blocks of `q_block` (a sequential map); for each, a scan over key blocks keeps a running max,
    normaliser and weighted sum (flash attention's online softmax), so temporary memory is
    [b h q_block block], not [b h q k]. A key block no query of the block may see (the causal
    future, padding) is skipped (`lax.cond`): about half the work of a long causal prompt. Scores,
    exponentials and sums in float32, as `masked_softmax`; a fully masked row gives zeros.
    Returns z [b q h d]."""
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    nb = -(-n_k // block)
    pad = nb * block - n_k
    if pad:
        k = jnp.pad(k, ((0, 0), (0, 0), (0, pad), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, 0), (0, pad), (0, 0)))
        allowed = jnp.pad(allowed, ((0, 0), (0, 0), (0, 0), (0, pad)))  # padded keys are never allowed
    kb = k.reshape(b, h, nb, block, d).transpose(2, 0, 1, 3, 4)
    vb = v.reshape(b, h, nb, block, d).transpose(2, 0, 1, 3, 4)

    def one_query_block(xs: tuple[jax.Array, jax.Array]) -> jax.Array:
        qq, al = xs  # [b h nq d], [b 1|h nq k]
        qf, nq = qq.astype(jnp.float32), qq.shape[2]

        def step(carry, xs):
            kk, vv, aa = xs

            def update(m, l, acc):
                s = jnp.einsum("bhqd,bhkd->bhqk", qf, kk.astype(jnp.float32)) / scale
                if cap is not None:
                    s = soft_cap(s, cap)
                s = jnp.where(aa, s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(-1))
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                p = jnp.where(aa, jnp.exp(s - m_safe[..., None]), 0.0)
                corr = jnp.where(jnp.isfinite(m), jnp.exp(m - m_safe), 0.0)
                return (m_new, l * corr + p.sum(-1),
                        acc * corr[..., None] + jnp.einsum("bhqk,bhkd->bhqd", p, vv.astype(jnp.float32)))

            return jax.lax.cond(aa.any(), update, lambda *c: c, *carry), None

        ab = al.reshape(*al.shape[:3], nb, block).transpose(3, 0, 1, 2, 4)
        init = (jnp.full((b, h, nq), -jnp.inf, jnp.float32), jnp.zeros((b, h, nq), jnp.float32),
                jnp.zeros((b, h, nq, d), jnp.float32))
        (_, l, acc), _ = jax.lax.scan(step, init, (kb, vb, ab))
        return acc / jnp.where(l == 0, 1.0, l)[..., None]  # [b h nq d]

    if n_q <= q_block:
        z = one_query_block((q, allowed))
    else:
        nqb = -(-n_q // q_block)
        qpad = nqb * q_block - n_q  # padded queries see nothing: zero rows, dropped below
        qs = jnp.pad(q, ((0, 0), (0, 0), (0, qpad), (0, 0))).reshape(b, h, nqb, q_block, d).transpose(2, 0, 1, 3, 4)
        al = jnp.pad(allowed, ((0, 0), (0, 0), (0, qpad), (0, 0)))
        als = al.reshape(al.shape[0], al.shape[1], nqb, q_block, al.shape[3]).transpose(2, 0, 1, 3, 4)
        z = jax.lax.map(one_query_block, (qs, als))  # [nqb b h q_block d]
        z = z.transpose(1, 2, 0, 3, 4).reshape(b, h, nqb * q_block, d)[:, :, :n_q]
    return z.transpose(0, 2, 1, 3).astype(q.dtype)


def weight_einsum(spec: str, x: jax.Array, W: jax.Array) -> jax.Array:
    """`einsum(spec, x, W)` for an activation x and a weight W, in x's dtype. float32 weights: the
    plain einsum; lower-precision weights (bf16) accumulate in float32 (`preferred_element_type`),
    as torch's bf16 matmuls do. On CPU, 2 to `cpu_kernels.MAX_ROWS` rows (a batched decode step)
    of either go to jaxlens's kernel (`takes_rows_kernel`), which reads the weight about twice as
    fast as XLA:CPU's few-row dots.

    Two XLA:CPU limits shape the bf16 path there. It has no fast one-row bf16 product (its one-row
    bf16 dot is a scalar loop, ~40x slower; its native one from two rows up reads about half the
    bytes per second of the one-row f32 dot), so one row goes to jaxlens's kernel
    (`cpu_kernels`: the weight read as bf16, f32 sums), else is padded to two rows. And it has no
    batched bf16 dot with f32 output (a head axis in both operands, the split q/k/v input), so
    that one runs on the weights widened to f32: the same products and f32 sums."""
    if takes_rows_kernel(spec, x, W):
        return cpu_kernels.kernel_einsum(spec, x, W).astype(x.dtype)
    if W.dtype == jnp.float32:
        return jnp.einsum(spec, x, W)
    (xs, ws), out = spec.split("->")[0].split(","), spec.split("->")[1]
    on_cpu = jax.default_backend() == "cpu"
    if on_cpu and any(a in ws and a in out for a in xs):  # a batch axis
        return jnp.einsum(spec, x.astype(jnp.float32), W.astype(jnp.float32)).astype(x.dtype)
    if on_cpu and x.shape[0] == 1 and all(n == 1 for a, n in zip(xs, x.shape) if a not in ws):
        plan = cpu_kernels.matvec_plan(spec, x.shape, W.shape) if W.dtype == jnp.bfloat16 else None
        # (no sharding rule: on a CPU mesh XLA gathers a sharded weight for it; correct, not fast)
        if plan is not None and cpu_kernels.available():
            return cpu_kernels.kernel_einsum(spec, x, W).astype(x.dtype)
        # one row: x's first axis leads the output in every caller
        y = jnp.einsum(spec, jnp.concatenate([x, jnp.zeros_like(x)]), W, preferred_element_type=jnp.float32)[:1]
    else:
        y = jnp.einsum(spec, x, W, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def takes_rows_kernel(spec: str, x: jax.Array, W: jax.Array) -> bool:
    """Whether `weight_einsum` sends this product to jaxlens's few-rows CPU kernel: on CPU, an f32
    or bf16 weight (an f32 weight with an f32 x), 2 to `cpu_kernels.MAX_ROWS` rows (x's axes that
    W lacks), a plain matrix product (`matvec_plan`), and the kernel built. One row stays with
    XLA's f32 dot, which reads the weight at the memory bandwidth already, or goes to the bf16
    one-row kernel."""
    if jax.default_backend() != "cpu" or W.dtype not in (jnp.float32, jnp.bfloat16):
        return False
    if W.dtype == jnp.float32 and x.dtype != jnp.float32:
        return False
    xs, ws = spec.split("->")[0].split(",")
    rows = math.prod(n for a, n in zip(xs, x.shape) if a not in ws)
    return (2 <= rows <= cpu_kernels.MAX_ROWS and cpu_kernels.matvec_plan(spec, x.shape, W.shape) is not None
            and cpu_kernels.available())


def query_rows(a: jax.Array, rows: tuple[int, ...] | None) -> jax.Array:
    """`a` [batch pos ...] at the static positions `rows` only (None: all of them): the last block
    when only some positions' logits are read."""
    return a if rows is None else a[:, jnp.asarray(rows, jnp.int32)]


def take_rows(table: jax.Array, idx: jax.Array) -> jax.Array:
    """`table[idx]` (an embedding lookup). A bf16 table is gathered through its 16-bit integer view:
    inside a decode loop XLA:CPU widens a bf16 gather's whole table to f32 once per call (154 MB
    for GPT-2's W_E); the integer view halves that copy (a plain forward reads only the rows)."""
    if table.dtype.itemsize != 2 or not jnp.issubdtype(table.dtype, jnp.floating):
        return table[idx]
    bits = jax.lax.bitcast_convert_type(table, jnp.uint16)
    return jax.lax.bitcast_convert_type(bits[idx], table.dtype)


def repeat_kv(x: jax.Array, n_rep: int, axis: int) -> jax.Array:
    """Grouped-query attention: repeat each kv head `n_rep` times along the head `axis`, so that
    query head h reads kv head h // n_rep (TransformerLens's and HF's order)."""
    return jnp.repeat(x, n_rep, axis=axis)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids from a [batch pos] 0/1 mask: the count of real tokens before each one."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)

__all__ = ["ACTIVATIONS", "activation", "apply_rotary", "soft_cap", "KEY_BLOCK", "blocked_attention", "masked_softmax", "repeat_kv", "query_rows",
           "positions_from_mask", "take_rows", "takes_rows_kernel", "weight_einsum"]
