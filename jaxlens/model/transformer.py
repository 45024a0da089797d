"""The whole decoder: embed -> blocks (unrolled or nn.scan) -> ln_final -> unembed."""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlens.config import ModelConfig
from jaxlens.hooks import EVERY_HOOK, RunCtx, hook_point
from jaxlens.model.block import RESUME_POINTS, Block, Resume
from jaxlens.model.kv import KVCache, LayerKV
from jaxlens.model.layers import param, positions_from_mask, soft_cap, take_rows, weight_einsum
from jaxlens.model.packed import PackedRows, packed_attention
from jaxlens.model.rope import rotary_angles
from jaxlens.model.norms import Norm

_init = nn.initializers.normal(0.02)


class _ScanBody(nn.Module):
    """One scanned layer: carry is the residual, xs are (layer index, this layer's keys and
    values [batch kv_head max_len d_head], or None). Returns the layer's updated `LayerKV`."""

    cfg: ModelConfig
    kind: bool | None = None  # every scanned layer local (True) or global (False); None: mixed, read from xs

    @nn.compact
    def __call__(self, x, xs, kinds, ctx: RunCtx, index):
        layer, is_local, kv = xs
        layer_kv = None if kv is None else LayerKV(*kv, index)
        allowed, rotary = kinds.pick(is_local if self.kind is None else self.kind)
        return Block(self.cfg, name="block")(x, allowed, rotary, ctx.at_layer(layer), layer_kv)


class LayerKinds(NamedTuple):
    """What attention sees in a global and in a local (sliding-window) layer: the allowed mask
    [batch 1 query key] and the rotary (cos, sin) or None. A model with one kind holds the same
    arrays twice (nothing computed twice)."""

    allowed_global: jax.Array
    allowed_local: jax.Array
    rotary_global: Any
    rotary_local: Any

    def pick(self, is_local: bool | jax.Array) -> tuple[jax.Array, Any]:
        """This layer's (allowed, rotary): by a Python bool (unrolled, or a scan of one kind) or a
        traced one (a scan over local and global layers)."""
        if isinstance(is_local, bool):
            return (self.allowed_local, self.rotary_local) if is_local else (self.allowed_global, self.rotary_global)
        allowed = jnp.where(is_local, self.allowed_local, self.allowed_global)
        rotary = jax.tree.map(lambda a, b: jnp.where(is_local, a, b), self.rotary_local, self.rotary_global)
        return allowed, rotary


class Transformer(nn.Module):
    """Decoder-only transformer. Parameters live under TransformerLens-like names:
    `W_E`, `W_pos`, `blocks_{l}/{ln1,attn,ln2,mlp}` (or `blocks/block/...` stacked over layers
    when `scan_layers`), `ln_final`, `W_U`, `b_U`.

    __call__(tokens [batch pos] int, attention_mask [batch pos] 0/1, ctx, kv: KVCache | None)
    -> (logits [batch pos vocab], the new KVCache or None). With a cache, the tokens follow its
    `length` slots; each block gets its `LayerKV` (unrolled: `kv.at_layer(l)`, written in place in
    the stacked buffers; scanned: the scan's per-layer slice of them).

    `start_at_layer` / `stop_at_layer` (TransformerLens's, already resolved to 0 <= start <=
    stop <= n_layers) run only blocks [start, stop): with a start, `tokens` is the residual
    stream [batch pos d_model] entering block `start` (no embedding); with a stop, the residual
    entering block `stop` is returned instead of logits (no final norm or unembedding). They are
    module fields, so each value is its own compiled program that holds only the layers it runs;
    scanned params must then hold just those layers (`jaxlens.forward.forward` slices them).
    A start combines with a cache: the residual then continues the cached positions (a causal
    suffix run: the patching grids' earlier positions come from the cache, every layer's).
    `packed` (`jaxlens.model.packed.PackedRows`, with a start and a cache, unrolled): the rows are
    several such suffixes, each with its own start, tagged with their prompt positions.
    `resume` (`jaxlens.model.block.Resume`, with a start, unrolled): block `start` begins inside,
    from an earlier run's z or attn_out at these rows (its cache layer is then left unwritten).

    `logit_positions` (static indices into this call's positions, or None for all): the final
    norm and unembedding run only there, logits [batch len(logit_positions) vocab] (the
    unembedding is the costliest layer of a small model; a metric reading one position needs one),
    and so does the last block's work after its keys and values when no hook inside it is used
    (`_last_block_rows`). `logit_columns` (static vocabulary indices, or None for all): the
    unembedding computes only those columns, logits [... len(logit_columns)] (a logit-difference
    metric reads two of a 50k vocabulary).
    """

    cfg: ModelConfig
    scan_layers: bool = False
    dtype: Any = jnp.float32
    start_at_layer: int | None = None
    stop_at_layer: int | None = None
    logit_positions: tuple[int, ...] | None = None
    logit_columns: tuple[int, ...] | None = None

    @nn.compact
    def __call__(self, tokens, attention_mask, ctx: RunCtx, kv: KVCache | None = None,
                 packed: PackedRows | None = None, resume: Resume | None = None):
        cfg = self.cfg
        if packed is not None and (kv is None or self.start_at_layer is None or self.scan_layers):
            raise ValueError("packed rows continue a KV cache from a start layer, unrolled: give kv and start_at_layer")
        if resume is not None and (self.start_at_layer is None or self.scan_layers or resume.at not in RESUME_POINTS):
            raise ValueError(f"resume starts the first block of an unrolled run from start_at_layer at one of "
                             f"{RESUME_POINTS}; got at={resume.at!r}, start_at_layer={self.start_at_layer}")
        ctx = ctx._replace(n_layers=cfg.n_layers)
        b, q = tokens.shape[:2]
        first = 0 if self.start_at_layer is None else self.start_at_layer
        last = cfg.n_layers if self.stop_at_layer is None else self.stop_at_layer
        W_E = param(self, "W_E", _init, (cfg.d_vocab, cfg.d_model), self.dtype)
        attention_mask = attention_mask.astype(jnp.int32)
        if kv is None:
            full_mask, offset = attention_mask, 0
        else:
            offset = kv.length
            full_mask = jax.lax.dynamic_update_slice(kv.mask, attention_mask.astype(kv.mask.dtype), (0, offset))
        if packed is None:
            k_pos = positions_from_mask(full_mask)
            positions = jax.lax.dynamic_slice_in_dim(k_pos, offset, q, axis=1)
            q_idx = offset + jnp.arange(q)
            causal = jnp.arange(full_mask.shape[1])[None, :] <= q_idx[:, None]  # [q k]
            allowed = causal[None, None] & (full_mask[:, None, None, :] > 0)  # [b 1 q k]
        else:  # rows of several causal suffixes, each after the cached positions before its start
            positions, allowed, k_pos = packed_attention(full_mask, offset, packed)
        local_layers = [cfg.is_local(l) for l in range(first, last)]
        allowed_local = allowed
        if any(local_layers):  # HF: a key is visible while q - k < window (positions, so padding cannot shift it)
            allowed_local = allowed & ((positions[:, :, None] - k_pos[:, None, :]) < cfg.sliding_window)[:, None]

        rotary = None if cfg.has_pos_embed else rotary_angles(positions, cfg)
        rotary_local = rotary  # Gemma 3: local layers rotate with their own (plain) base
        if rotary is not None and cfg.rotary_base_local is not None and any(local_layers):
            rotary_local = rotary_angles(positions, cfg, local=True)
        kinds = LayerKinds(allowed, allowed_local, rotary, rotary_local)
        if self.start_at_layer is None:
            embed = take_rows(W_E, tokens)
            if cfg.embed_scale is not None:
                embed = embed * jnp.asarray(cfg.embed_scale, embed.dtype)
            x = hook_point(self, "hook_embed", embed, ctx)
            if cfg.has_pos_embed:
                W_pos = param(self, "W_pos", _init, (cfg.n_ctx, cfg.d_model), self.dtype)
                x = x + hook_point(self, "hook_pos_embed", take_rows(W_pos, positions), ctx)
        else:  # the residual stream entering block `first` (positions already in it, or rotary)
            x = tokens.astype(self.dtype)

        rows = self._last_block_rows(ctx, first, last)
        if kv is not None and (self.scan_layers or self.start_at_layer is not None):
            kv = kv.stacked()  # these paths slice and re-stack layers themselves
        if self.scan_layers and last > first:
            scan = nn.scan(
                _ScanBody,
                variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                length=last - first,
            )
            kv_xs = None if kv is None else (kv.keys[first:last], kv.values[first:last])  # this run's layers
            xs = (jnp.arange(first, last), jnp.asarray(local_layers), kv_xs)
            kind = local_layers[0] if len(set(local_layers)) == 1 else None  # one kind: chosen statically
            x, new = scan(cfg, kind, name="blocks")(x, xs, kinds, ctx, offset)
            if kv is not None:  # the scan stacked the per-layer buffers back: [layer batch kv_head max_len d_head]
                keys, values = new.keys, new.values
                if (first, last) != (0, cfg.n_layers):  # a partial run: the other layers' buffers unchanged
                    keys = jax.lax.dynamic_update_slice_in_dim(kv.keys, keys, first, axis=0)
                    values = jax.lax.dynamic_update_slice_in_dim(kv.values, values, first, axis=0)
                kv = KVCache(keys, values, kv.mask, kv.length)
        elif not self.scan_layers and kv is not None and self.start_at_layer is not None:
            # a suffix run (start_at_layer with a cache): each layer writes its own slice, so a
            # vmapped run (a patching grid) copies only the layers it runs, and the re-stacked
            # cache is dropped by XLA when the caller does not use it
            new_k, new_v = [], []
            for l in range(first, last):
                view = LayerKV(kv.keys[l], kv.values[l], kv.length)
                x, view = Block(cfg, name=f"blocks_{l}")(x, *kinds.pick(cfg.is_local(l)), ctx.at_layer(l), view,
                                                         rows if l == last - 1 else None,
                                                         resume if l == first else None)
                new_k.append(view.keys)
                new_v.append(view.values)
            if new_k:
                kv = KVCache(kv.keys.at[first:last].set(jnp.stack(new_k)), kv.values.at[first:last].set(jnp.stack(new_v)),
                             kv.mask, kv.length)
        elif not self.scan_layers:
            # every layer writes into the stacked buffers (no per-layer slices re-stacked: a decode
            # step would copy the whole cache twice)
            for l in range(first, last):
                x, layer_kv = Block(cfg, name=f"blocks_{l}")(x, *kinds.pick(cfg.is_local(l)), ctx.at_layer(l),
                                                             None if kv is None else kv.at_layer(l),
                                                             rows if l == last - 1 else None,
                                                             resume if l == first else None)
                if layer_kv is not None:
                    kv = kv.written(l, layer_kv)
        if self.stop_at_layer is not None:
            return x, None
        if self.logit_positions is not None and rows is None:  # norms and unembedding act per position
            x = x[:, jnp.asarray(self.logit_positions, jnp.int32)]

        x = Norm(cfg, "ln_final", name="ln_final")(x, ctx)
        # weight_einsum: a bf16 unembedding accumulates in f32 and, from two rows up, is XLA:CPU's
        # native bf16 dot (a plain bf16 einsum widened the table to f32 on every decode step)
        cols = None if self.logit_columns is None else jnp.asarray(self.logit_columns, jnp.int32)
        b_U = param(self, "b_U", nn.initializers.zeros, (cfg.d_vocab,), self.dtype)
        if cfg.tie_word_embeddings:  # not x @ W_E.T: XLA would copy the transpose every call
            logits = weight_einsum("bpd,vd->bpv", x, W_E if cols is None else W_E[cols])
        else:
            W_U = param(self, "W_U", _init, (cfg.d_model, cfg.d_vocab), self.dtype)
            logits = weight_einsum("bpd,dv->bpv", x, W_U if cols is None else W_U[:, cols])
        logits = logits + (b_U if cols is None else b_U[cols])
        if cfg.output_logits_soft_cap is not None:  # Gemma 2: after the unembedding (TL's hook_unembed is before)
            logits = soft_cap(logits, cfg.output_logits_soft_cap)
        if kv is None:
            return logits, None
        return logits, KVCache(kv.keys, kv.values, full_mask, jnp.asarray(offset + q, jnp.int32))

    def _last_block_rows(self, ctx: RunCtx, first: int, last: int) -> tuple[int, ...] | None:
        """`logit_positions` when the last block may run at those positions only: logits are
        asked for there alone, the run ends with the model's last block (unrolled), and no hook
        of that block but its input (`hook_resid_pre`) is captured or edited (the others would
        be partial). Its keys and values are still computed at every position: a cache written
        by this run is complete."""
        if self.logit_positions is None or self.scan_layers or last != self.cfg.n_layers or last <= first:
            return None
        prefix, entry = f"blocks.{last - 1}.", f"blocks.{last - 1}.hook_resid_pre"  # the input is whole anyway
        partial = lambda n: n.startswith(prefix) and n != entry  # noqa: E731
        if ctx.capture is EVERY_HOOK or any(map(partial, ctx.capture)) or \
                any(partial(n) for names, _ in ctx.hooks.entries for n in names):
            return None
        return self.logit_positions

__all__ = ["Transformer", "LayerKinds"]
