"""Activation-patching grids as compiled programs: TransformerLens's `transformer_lens.patching`.

`get_act_patch_resid_pre(model, corrupted_tokens, clean_cache, patching_metric)` and friends take
the same arguments, in the same order, and return the same shapes as TransformerLens's. The
difference is how they run: TransformerLens runs one full hooked forward pass per cell of the
grid in a Python loop; here a cell computes only what its patch can change, and cells are
vmapped (chunked with `lax.map` to bound memory).

Causal suffixes: a patch at layer l and position p cannot change any layer < l nor (causal
attention) any position < p. The corrupted run is computed once, with its KV cache and the
residual entering every layer. A cell at (l, p) runs blocks >= l at positions >= p: the residual
entering block l there is the corrupted run's, and every layer's keys/values of the positions
before p come from the corrupted cache (`forward(start_at_layer=l, kv=...)`). Position grids of
[batch pos ...] activations pack two cells per sequence (`pack_suffixes`, `packed_rows`,
`jaxlens.model.packed`): the suffixes of p and S - p fill S rows, so a layer's S positions are
S/2 + 1 sequences of one program. Pattern grids by destination position (whose key axis the
packing would change) run from the largest of a few static window starts (`window_starts`: 0,
S/2, 3S/4) <= p, one program per (layer, window start). Programs are compiled several at once
(`jaxlens.compile_ahead`). Grids over all positions (layer × head) run from layer l.

Two more things a patch cannot change. Before the first position where the clean activation
differs from the corrupted one (bit for bit: with the grid's corrupted run, or else the corrupted
prompt run through the program that made the clean cache, `_first_differences`), a patch writes
the values already there: those cells are the corrupted run itself (its metric, no program), and
every other cell of the layer starts there at the latest (rounded down to `start_bucket`, so
prompt pairs share programs).
Inside block l, a z patch cannot change that block's queries, keys, values or pattern, and a patch
after the attention sublayer (attn_out, resid_mid, the MLP's hooks, mlp_out) cannot change that
sublayer: the block resumes from the corrupted run's z or attn_out (`jaxlens.model.block.Resume`).

Logits only where the metric reads: `metric_positions=` (or detected soundly from the metric's
jaxpr, `jaxlens.edits.metric_positions`; otherwise all positions). The final norm and the
unembedding, the costliest layer of a small model, run only there; the metric receives the full
[batch pos vocab] logits with the corrupted run's values before w and NaN at positions that were
not computed, so a metric reading an undeclared position gives NaN, never a silent number.
The unembedding computes only the vocabulary columns the metric provably reads, when they are
few (`metric_columns`: a logit difference reads two); the others are NaN, never read.

`patching_metric(logits) -> scalar` must be a JAX function (it is traced, under vmap, once per
program); `logits` are [batch pos d_vocab] of the corrupted batch with one patch applied.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.compile_ahead import run_compiled_ahead
from jaxlens.fingerprint import Fn, call_metric, retry_static
from jaxlens.model.forward import forward, is_scanned, unstack_layers
from jaxlens.hooks import HookPoint, Hooks, get_act_name
from jaxlens.edits.interventions import register_edit
from jaxlens.edits.metric_positions import resolve_metric_reads
from jaxlens.model.block import Resume
from jaxlens.model.kv import KVCache
from jaxlens.model.packed import PackedRows
from jaxlens.tokens import check_tokens
from jaxlens.validate import index, indices

Metric = Callable[[jax.Array], jax.Array]
_PATTERN = ("pattern", "attn_scores")
_PATTERN_HOOKS = tuple(f"hook_{n}" for n in _PATTERN)


@dataclass(frozen=True)
class IndexPatch:
    """Copy `values` into the activation at one grid cell: `index[i]` along activation axis
    `axes[i]` (all of the other axes, batch included, are copied whole). TransformerLens's
    `patch_setter`s, as one mask so the index can be traced and vmapped."""

    index: jax.Array
    values: jax.Array
    axes: tuple[int, ...] = ()
    _static = ("axes",)

    def __call__(self, x: jax.Array, hook: HookPoint) -> jax.Array:
        mask = jnp.ones((), bool)
        for i, ax in enumerate(self.axes):
            shape = [1] * x.ndim
            shape[ax] = x.shape[ax]
            mask = mask & (jnp.arange(x.shape[ax]) == self.index[i]).reshape(shape)
        return jnp.where(mask, self.values.astype(x.dtype), x)


register_edit(IndexPatch)


@dataclass(frozen=True)
class RowPatch:
    """`IndexPatch` on packed rows (`jaxlens.model.packed`): row r of the activation (axis 1) is
    prompt position `positions[r]` of the cell `cells[r]` (its index along each grid axis `axes`,
    one of them the position axis 1; -1 where the row is no cell's). The clean `values` [batch
    pos ...] are copied where every index of the row's cell matches: the position axis at the
    row's own position, the other axes along themselves."""

    cells: jax.Array
    positions: jax.Array
    values: jax.Array
    axes: tuple[int, ...] = ()
    _static = ("axes",)

    def __call__(self, x: jax.Array, hook: HookPoint) -> jax.Array:
        n_rows = x.shape[1]
        mask = jnp.ones((1, n_rows) + (1,) * (x.ndim - 2), bool)
        for i, ax in enumerate(self.axes):
            shape = [1] * x.ndim
            shape[1] = n_rows
            if ax == 1:
                hit = self.positions == self.cells[:, i]  # [rows]
            else:  # [rows size]: R stays ahead of the axis, so the reshape keeps both in order
                hit = jnp.arange(x.shape[ax])[None, :] == self.cells[:, i][:, None]
                shape[ax] = x.shape[ax]
            mask = mask & hit.reshape(shape)
        return jnp.where(mask, jnp.take(self.values, self.positions, axis=1).astype(x.dtype), x)


register_edit(RowPatch)


def _axis_layout(activation_name: str, index_axis_names: Sequence[str], cfg: Any, seq_len: int
                 ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(activation axis, size) of each non-layer grid axis, TransformerLens's axis names."""
    if not index_axis_names or index_axis_names[0] != "layer":
        raise ValueError(f"index_axis_names must start with 'layer', got {tuple(index_axis_names)}")
    n_heads = cfg.n_kv_heads if activation_name in ("k", "v", "rot_k") else cfg.n_heads
    pattern = activation_name in _PATTERN
    axes, sizes = [], []
    for a in index_axis_names[1:]:
        if a in ("head", "head_index"):
            axes.append(1 if pattern else 2)
            sizes.append(n_heads)
        elif a == "pos" and not pattern:
            axes.append(1)
            sizes.append(seq_len)
        elif a == "dest_pos" and pattern:
            axes.append(2)
            sizes.append(seq_len)
        elif a == "src_pos" and pattern:
            axes.append(3)
            sizes.append(seq_len)
        else:
            raise ValueError(f"axis {a!r} does not apply to activation {activation_name!r}: use pos/head for "
                             "[batch pos ...] activations and head_index/dest_pos/src_pos for patterns")
    return tuple(axes), tuple(sizes)


WINDOW_FRACTIONS = (0.0, 0.5, 0.75)
"""Where a pattern grid's causal suffixes start (by destination position; other position grids
pack exact suffixes), as fractions of the prompt length: a patch at position p runs from the
largest start <= p. More starts mean less work per cell (the mean
suffix is (1 + 1/n)/2 of the prompt for n even starts) but one more compiled program per layer;
with 0, S/2, 3S/4 a cell computes on average 69% of the positions (perfect suffixes: ~50%)."""


MIN_WINDOW_LEN = 16
"""Prompts shorter than this run every cell from position 0 (one program per layer): the few
positions a later start would save cost less than compiling two more programs per layer."""


def window_starts(seq_len: int, fractions: Sequence[float] | None = None) -> tuple[int, ...]:
    """The distinct suffix starts for prompts of `seq_len` positions (always including 0; only 0
    below `MIN_WINDOW_LEN`); `fractions` default: the module's `WINDOW_FRACTIONS`, both read at
    call time."""
    if seq_len < MIN_WINDOW_LEN:
        return (0,)
    fractions = WINDOW_FRACTIONS if fractions is None else fractions
    return tuple(sorted({0} | {int(seq_len * f) for f in fractions if 0 <= f < 1}))


def _widen(logits: jax.Array, columns: tuple[int, ...] | None, vocab: int) -> jax.Array:
    """[... vocab] logits from those of the vocabulary `columns` alone (None: already whole), NaN
    in every other column (which the metric provably never reads). A select of a broadcast, fused
    into the metric's read."""
    if columns is None:
        return logits
    sel, src = np.zeros(vocab, bool), np.zeros(vocab, np.int32)
    sel[list(columns)], src[list(columns)] = True, np.arange(len(columns))
    return jnp.where(sel, jnp.take(logits, src, axis=-1), jnp.nan)


def _assemble(logits: jax.Array, base: jax.Array, window: int, computed: tuple[int, ...] | None) -> jax.Array:
    """Full [batch pos vocab] logits for the metric: the suffix run's `logits` at the `computed`
    suffix positions (None: all of them), `base` elsewhere (the corrupted run's before `window`,
    NaN after). A select of broadcasts, so XLA can fuse the metric's slice into it."""
    if computed is None:
        return jnp.concatenate([base[:, :window], logits.astype(base.dtype)], axis=1)
    seq_len = base.shape[1]
    sel, src = np.zeros(seq_len, bool), np.zeros(seq_len, np.int32)
    for j, p in enumerate(computed):
        sel[window + p], src[window + p] = True, j
    return jnp.where(sel[None, :, None], jnp.take(logits.astype(base.dtype), src, axis=1), base)


def map_cells(fn: Callable[[Any], jax.Array], cells: Any, chunk_size: int | None, mesh: Any = None) -> jax.Array:
    """`lax.map(fn, cells, batch_size=chunk_size)`: `fn` vmapped over chunks of the cells (a
    pytree with a leading cell axis; None: one cell at a time). With a `mesh` whose batch axes
    (data, fsdp) are larger than 1, each chunk's cells are split over those axes (the shared
    inputs stay replicated on them), so every device runs different cells; chunks are then a
    multiple of those axes, the last one padded with copies of the last cell, whose results are
    dropped."""
    from jaxlens.distributed import batch_multiple, batch_sharding

    mult = 1 if mesh is None else batch_multiple(mesh)
    if mult == 1:
        return jax.lax.map(fn, cells, batch_size=chunk_size)
    n = jax.tree.leaves(cells)[0].shape[0]
    chunk = -(-(chunk_size or 1) // mult) * mult
    n_pad = -(-n // chunk) * chunk

    def split(x: jax.Array) -> jax.Array:
        x = jnp.concatenate([x, jnp.repeat(x[-1:], n_pad - n, axis=0)]) if n_pad > n else x
        return x.reshape(n_pad // chunk, chunk, *x.shape[1:])

    def run_chunk(c: Any) -> jax.Array:
        c = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, batch_sharding(mesh, x.ndim)), c)
        return jax.lax.with_sharding_constraint(jax.vmap(fn)(c), batch_sharding(mesh, 1))

    out = jax.lax.map(run_chunk, jax.tree.map(split, cells))
    return out.reshape(n_pad, *out.shape[2:])[:n]


def _scalar_metric(metric: Any, logits: jax.Array) -> jax.Array:
    """The patching metric of one cell's logits, as float32; a clear error unless it is a scalar."""
    out = call_metric(metric, logits)
    if jnp.ndim(out) != 0:
        raise ValueError(f"patching_metric must return a scalar, got shape {jnp.shape(out)}; reduce over the batch "
                         "inside the metric (e.g. .mean())")
    return out.astype(jnp.float32)


@retry_static(eager=False)  # grid cells are vmapped: a stored value would be traced
@partial(jax.jit, static_argnames=("cfg", "name", "axes", "layer", "window", "window_axis", "metric_positions",
                                   "metric_columns", "precision", "chunk_size", "mesh", "resume_at"))
def _suffix_grid(params, mask, resid, kv, corrupted_logits, clean_act, cells, metric, resume_value=None, *, cfg, name,
                 axes, layer, window, window_axis, metric_positions, precision, chunk_size, mesh=None, resume_at=None,
                 metric_columns=None):
    """Metric for every patch index (cells, [n_cells, len(axes)]) of one layer whose window-axis
    index is >= `window`: [n_cells].

    Only blocks >= `layer` at positions >= `window` are computed: the residual entering `layer`
    there is the corrupted run's (`resid` [batch pos d_model]) and the earlier positions' keys
    and values come from the corrupted run's cache `kv` (None when window = 0), which no patch at
    or after `window` can change (causal attention). Logits are computed only at the metric's
    positions (`metric_positions`, None: all) and vocabulary columns (`metric_columns`, None:
    all); the metric sees the corrupted run's logits before `window` and NaN at positions
    neither computed nor earlier, and in columns not computed. `metric` is an `Fn` (keyed by
    what it reads, so a metric reading changed globals recompiles). On a `mesh` the cells are
    split over its batch axes (`map_cells`). `resume_at` / `resume_value`: block `layer` starts at
    that hook from the corrupted run's value ([batch pos ...], `_resume_point`)."""
    seq_len = mask.shape[1]
    base = jnp.where((jnp.arange(seq_len) < window)[None, :, None], corrupted_logits, jnp.nan)
    computed = None if metric_positions is None else tuple(p - window for p in metric_positions if p >= window)
    qaxis = 2 if name.endswith(_PATTERN_HOOKS) else 1  # the query-position axis of the activation
    clean = jax.lax.slice_in_dim(clean_act, window, clean_act.shape[qaxis], axis=qaxis)
    shift = np.zeros(len(axes), np.int32)
    if window_axis is not None:
        shift[window_axis] = window
    if kv is not None:
        kv = KVCache(kv.keys, kv.values, kv.mask, jnp.asarray(window, jnp.int32))
    x, sub_mask = resid[:, window:], mask[:, window:]
    resume = None if resume_at is None else Resume(resume_at, resume_value[:, window:])

    def one(index):
        if computed == ():  # the metric reads only positions before the window: the corrupted logits
            full = base
        else:
            hooks = Hooks(((frozenset({name}), IndexPatch(index - shift, clean, axes)),))
            logits, _, _ = forward(params, cfg, x, sub_mask, hooks=hooks, kv=kv, precision=precision,
                                   start_at_layer=layer, logit_positions=computed, logit_columns=metric_columns,
                                   resume=resume)
            full = _assemble(_widen(logits, metric_columns, base.shape[-1]), base, window, computed)
        return _scalar_metric(metric, full)

    return map_cells(one, cells, chunk_size, mesh)


def pack_suffixes(starts: np.ndarray, seq_len: int) -> np.ndarray:
    """Pairs of cells whose causal suffixes fit together in `seq_len` rows: [n_sequences, 2] indices
    into `starts` (each cell's first position), -1 where a sequence holds one cell.

    Longest first, each with the shortest left that fits (p + p' >= seq_len: rows seq_len - p and
    seq_len - p'); on a full range of positions that is p with seq_len - p, a perfect fit, and
    seq_len / 2 + 1 sequences where the cells alone would be seq_len runs."""
    order = np.argsort(starts, kind="stable")
    lo, hi, out = 0, len(order) - 1, []
    while lo <= hi:
        a = order[lo]
        if lo < hi and starts[a] + starts[order[hi]] >= seq_len:
            out.append((a, order[hi]))
            hi -= 1
        else:
            out.append((a, -1))
        lo += 1
    return np.array(out, np.int64).reshape(-1, 2)


def packed_rows(cells: np.ndarray, pairs: np.ndarray, window_axis: int, seq_len: int) -> dict[str, np.ndarray]:
    """The rows of every packed sequence (`pack_suffixes`' pairs of `cells` [n, axes]), as arrays
    with a leading sequence axis: positions, starts, segments [seq rows] (`PackedRows`), cells
    [seq rows axes] (each row's cell index, -1 for none), cell_starts [seq 2].

    Layout (static rows for the metric's positions, whatever the pair): the first cell's position
    m sits at row seq_len - 1 - m (rows 0 .. from the prompt's end down to its start), the
    second's at row m (from its start to the end); the rows between, if any, pad (segment 2,
    which no cell reads)."""
    n, n_ax = len(pairs), cells.shape[1]
    last = seq_len - 1
    positions = np.full((n, seq_len), last, np.int32)
    starts = np.full((n, seq_len), seq_len, np.int32)
    segments = np.full((n, seq_len), 2, np.int32)
    row_cells = np.full((n, seq_len, n_ax), -1, np.int32)
    cell_starts = np.full((n, 2), seq_len, np.int32)
    for i, (a, b) in enumerate(pairs):
        p = int(cells[a, window_axis])
        rows = np.arange(seq_len - p)
        positions[i, rows], starts[i, rows], segments[i, rows], row_cells[i, rows] = last - rows, p, 0, cells[a]
        cell_starts[i, 0] = p
        if b >= 0:
            q = int(cells[b, window_axis])
            rows = np.arange(q, seq_len)
            positions[i, rows], starts[i, rows], segments[i, rows], row_cells[i, rows] = rows, q, 1, cells[b]
            cell_starts[i, 1] = q
    return dict(positions=positions, starts=starts, segments=segments, cells=row_cells, cell_starts=cell_starts)


def _packed_logit_rows(metric_positions: tuple[int, ...] | None, seq_len: int
                       ) -> tuple[tuple[int, ...] | None, tuple[np.ndarray, np.ndarray]]:
    """(the rows whose logits are computed, None for all; for each of a sequence's two cells, the
    index into those logits of each prompt position, `packed_rows`' layout)."""
    pos = np.arange(seq_len)
    if metric_positions is None:
        return None, (seq_len - 1 - pos, pos)
    rows = tuple(sorted({seq_len - 1 - m for m in metric_positions} | set(metric_positions)))
    at = {r: j for j, r in enumerate(rows)}
    src = tuple(np.array([at.get(r, 0) for r in rs], np.int32) for rs in (seq_len - 1 - pos, pos))
    return rows, src


@retry_static(eager=False)  # grid cells are vmapped: a stored value would be traced
@partial(jax.jit, static_argnames=("cfg", "name", "axes", "layer", "metric_positions", "metric_columns", "precision",
                                   "chunk_size", "mesh", "resume_at"))
def _packed_grid(params, mask, resid, kv, corrupted_logits, clean_act, seqs, metric, resume_value=None, *, cfg, name,
                 axes, layer, metric_positions, precision, chunk_size, mesh=None, resume_at=None, metric_columns=None):
    """Metric of both cells of every packed sequence (`packed_rows`' arrays, `seqs`) of one
    layer's position grid: [n_sequences 2] (a sequence's second slot is meaningless where it
    holds one cell).

    Each sequence runs blocks >= `layer` on its rows: the corrupted run's residual entering
    `layer` at the rows' positions, the clean activation patched at each cell's own position
    (`RowPatch`), the corrupted keys and values before each cell's start from `kv` (the cache of
    the prompt, with room for the rows after it). Logits only at the rows of the metric's
    positions; the metric of a cell sees the corrupted run's logits before its start and NaN at
    positions neither computed nor earlier (as `_suffix_grid`, also for `resume_at` and
    `metric_columns`)."""
    seq_len = mask.shape[1]
    logit_rows, src = _packed_logit_rows(metric_positions, seq_len)
    read = np.zeros(seq_len, bool)
    read[list(range(seq_len)) if metric_positions is None else list(metric_positions)] = True
    pos = jnp.arange(seq_len)

    def assemble(logits: jax.Array | None, start: jax.Array, slot: int) -> jax.Array:
        base = jnp.where((pos < start)[None, :, None], corrupted_logits, jnp.nan)
        if logits is None:
            return base
        own = jnp.take(_widen(logits, metric_columns, base.shape[-1]).astype(base.dtype), src[slot], axis=1)
        return jnp.where((read[None, :] & (pos >= start)[None, :])[..., None], own, base)

    def one(seq):
        logits = None
        if metric_positions != ():  # else the metric reads only positions before every start
            rows = PackedRows(seq["positions"], seq["starts"], seq["segments"])
            hooks = Hooks(((frozenset({name}), RowPatch(seq["cells"], seq["positions"], clean_act, axes)),))
            x, sub_mask = jnp.take(resid, rows.positions, axis=1), jnp.take(mask, rows.positions, axis=1)
            resume = None if resume_at is None else Resume(resume_at, jnp.take(resume_value, rows.positions, axis=1))
            logits, _, _ = forward(params, cfg, x, sub_mask, hooks=hooks, kv=kv, precision=precision,
                                   start_at_layer=layer, logit_positions=logit_rows, logit_columns=metric_columns,
                                   packed=rows, resume=resume)
        return jnp.stack([_scalar_metric(metric, assemble(logits, seq["cell_starts"][slot], slot)) for slot in (0, 1)])

    return map_cells(one, seqs, chunk_size, mesh)


_AFTER_ATTENTION = ("hook_attn_out", "hook_resid_mid", "hook_mlp_in", "hook_mlp_out", "hook_resid_post")


def _resume_point(name: str, layer: int) -> tuple[str, str] | None:
    """Where a cell patching hook `name` of block `layer` can start that block, and the hook whose
    corrupted value it starts from: z patches at hook_z (that block's queries, keys, values and
    pattern are the corrupted run's), patches after the attention sublayer at hook_attn_out; None
    for the others."""
    b = f"blocks.{layer}."
    if name == f"{b}attn.hook_z":
        return "z", name
    if name in {b + h for h in _AFTER_ATTENTION} or name.startswith((f"{b}mlp.", f"{b}ln2.")):
        return "attn_out", f"{b}hook_attn_out"
    return None


MIRROR_BYTES = 1 << 30
"""The largest clean cache (1 GiB) whose names the grids run the corrupted prompt with, to find
where the two prompts' activations agree (`_mirror_run`); a larger cache costs that memory twice,
so its grids start every cell at its own position."""


def _mirror_run(model: Any, tokens: np.ndarray, attention_mask: Any, clean_cache: Any) -> dict[str, jax.Array] | None:
    """The corrupted prompt's activations from the program that `run_with_cache` with the clean
    cache's names compiles (no hooks, logits returned): where the prompts agree, those are the
    clean cache's values bit for bit, whatever the rounding of other programs. None where the
    model has no such run, the cache holds names it cannot capture or is over `MIRROR_BYTES` (then
    no cell starts before its own position)."""
    run = getattr(model, "_run", None)
    names = frozenset(k for k in clean_cache.keys() if not k.endswith("_grad"))
    size = sum(int(np.prod(np.shape(clean_cache[k]))) * np.dtype(clean_cache[k].dtype).itemsize for k in names)
    if run is None or not names or size > MIRROR_BYTES:
        return None
    try:
        return run(tokens, attention_mask, names, Hooks(), None, None, "logits")[1]
    except (ValueError, TypeError, KeyError):  # names this model cannot capture: an optimisation lost, no error
        return None


EMBEDDED = "blocks.0.hook_resid_pre"
"""The first residual (embeddings, position embeddings): a gather and an add, the same bits in
every program, so where a clean cache's differs from the corrupted run's the prompts differ."""


def _first_differences(model: Any, tokens: np.ndarray, attention_mask: Any, clean_cache: Any,
                       cleans: dict[str, jax.Array], corrupted: dict[str, jax.Array], qaxis: int) -> dict[str, int]:
    """For each patched activation (`cleans`), the first query position where the clean value
    differs from the corrupted prompt's, bit for bit: before it a patch writes the values already
    there (the corrupted run's, to within the rounding of the program that computed them).

    Compared with the grid's own corrupted run (`corrupted`: free, and the values its suffixes
    continue). Where that finds a difference at position 0 (often only rounding: another program,
    other fusions), the corrupted prompt is run again through the clean cache's own program
    (`_mirror_run`, one forward) unless the prompts' embeddings already differ at position 0."""
    firsts = {n: first_difference(c, corrupted[n], qaxis) for n, c in cleans.items()}
    if all(firsts.values()):
        return firsts
    if EMBEDDED in clean_cache and first_difference(clean_cache[EMBEDDED], corrupted[EMBEDDED], 1) == 0:
        return firsts  # the prompts differ at their first token: nothing before it to skip
    mirror = _mirror_run(model, tokens, attention_mask, clean_cache)
    if mirror is None:
        return firsts
    return {n: max(f, first_difference(cleans[n], mirror[n], qaxis)) for n, f in firsts.items()}


def first_difference(clean: jax.Array, corrupted: jax.Array, qaxis: int) -> int:
    """The first query position (along `qaxis`) at which `clean`, cast as a patch writes it, differs
    from `corrupted` anywhere (any batch row, head or feature; NaN counts as different); the
    length of that axis where they are equal everywhere. Patching an equal value changes nothing."""
    diff = jnp.asarray(clean).astype(corrupted.dtype) != corrupted
    per_pos = np.asarray(jnp.any(jnp.moveaxis(diff, qaxis, 0).reshape(diff.shape[qaxis], -1), axis=1))
    hit = np.flatnonzero(per_pos)
    return int(hit[0]) if len(hit) else int(diff.shape[qaxis])


def start_bucket(p: int) -> int:
    """`p` rounded down to 0, 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two and 1.5 times them):
    the grid's programs are keyed by where its suffixes start, so prompt pairs that first differ at
    nearby positions share programs (at most about 2 log2(seq_len) per layer), giving up less
    than a third of the positions the exact start would skip."""
    if p < 4:
        return max(int(p), 0)
    k = int(p).bit_length() - 1
    return 3 << (k - 1) if p >= 3 << (k - 1) else 1 << k


@retry_static(eager=False)
@jax.jit
def _metric_of(logits: jax.Array, metric: Any) -> jax.Array:
    """The patching metric of the corrupted run's own logits (the cells whose patch changes nothing)."""
    return _scalar_metric(metric, logits)


def _with_room(kv: KVCache, rows: int) -> KVCache:
    """The prompt's cache with `rows` empty slots after it (where packed rows are written)."""
    pad = lambda a, axis: jnp.pad(a, [(0, 0)] * axis + [(0, rows)] + [(0, 0)] * (a.ndim - axis - 1))  # noqa: E731
    return KVCache(pad(kv.keys, 3), pad(kv.values, 3), pad(kv.mask, 1), kv.length)


@partial(jax.jit, static_argnames=("cfg", "capture", "precision", "with_kv"))
def _corrupted_run(params, tokens, mask, *, cfg, capture, precision, with_kv):
    """The corrupted run once: (logits, the residuals entering the patched layers, its KV cache or None)."""
    kv = KVCache.init(cfg, tokens.shape[0], tokens.shape[1], params["W_E"].dtype) if with_kv else None
    logits, acts, new_kv = forward(params, cfg, tokens, mask, capture=capture, kv=kv, precision=precision)
    return logits, acts, new_kv


CHUNK_BYTES = 1 << 29
"""Default bound on a vmapped chunk's activations (512 MiB): `chunk_size=None` vmaps as many cells
as fit (estimated per cell from its suffix), so small grids are one batched program."""


def _default_chunk(cfg: Any, batch: int, seq_len: int, layer: int, window: int, n_cells: int,
                   packed: bool = False) -> int:
    """Cells (packed: sequences of two) per vmapped chunk under CHUNK_BYTES: per cell, the
    suffix's widest activations (MLP hidden, scores, a few residuals), the logits the metric sees,
    and the keys/values of the layers it runs (a packed sequence: seq_len rows after seq_len
    cached keys, two cells' logits)."""
    q, keys, cells = seq_len - window, seq_len * (2 if packed else 1), 2 if packed else 1
    act = q * ((cfg.d_mlp or 4 * cfg.d_model) + cfg.n_heads * keys + 6 * cfg.d_model) + \
        2 * cells * seq_len * cfg.d_vocab
    kv = 2 * (cfg.n_layers - layer) * keys * cfg.n_kv_heads * cfg.d_head
    return int(max(1, min(n_cells, CHUNK_BYTES // (4 * batch * (act + kv)))))


def _window_axis(activation_name: str, axes: tuple[int, ...]) -> int | None:
    """Which grid axis indexes the activation's query position (pos, or a pattern's dest_pos), if any."""
    qaxis = 2 if activation_name in _PATTERN else 1
    return axes.index(qaxis) if qaxis in axes else None


def generic_activation_patch(model: Any, corrupted_tokens: Any, clean_cache: Any, patching_metric: Metric,
                             activation_name: str, index_axis_names: Sequence[str], *,
                             attention_mask: Any = None, chunk_size: int | None = None,
                             layers: Sequence[int] | None = None, metric_positions: Any = None) -> jax.Array:
    """Patch `activation_name` from `clean_cache` into the corrupted run at every grid cell.

    Returns [n_layers, *sizes of index_axis_names[1:]] of `patching_metric` (float32), as
    TransformerLens's `generic_activation_patch` with `index_axis_names`. `chunk_size` bounds how
    many patched runs are vmapped at once (position grids: packed sequences of up to two runs;
    None: as many as fit in `CHUNK_BYTES` of activations, all cells of a program for small
    grids). `layers` restricts the sweep (other rows are NaN).

    `metric_positions`: the logit positions the metric reads (ints, negative from the end); None
    detects them from the metric's jaxpr (`jaxlens.edits.metric_positions`), falling back to every
    position. Logits are computed only there: a metric reading another position gets NaN (the
    corrupted run's logits before the cell's suffix start, which a patch cannot change). A cell
    whose patch writes the values already there (before the prompts' first difference) is the
    corrupted run: its metric of the corrupted logits, all of them.
    """
    cfg = model.cfg
    toks, mask = check_tokens(np.asarray(corrupted_tokens), cfg, attention_mask)
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    seq_len = toks.shape[1]
    axes, sizes = _axis_layout(activation_name, index_axis_names, cfg, seq_len)
    # unrolled: one program per (layer, window) holds only the blocks it runs (a scan over stacked
    # blocks compiles in about the same time but ran at half the speed on CPU)
    params = unstack_layers(model.params, cfg.n_layers) if is_scanned(model.params) else model.params
    layer_list = range(cfg.n_layers) if layers is None else _check_layers(layers, cfg.n_layers)
    names = [get_act_name(activation_name, l) for l in layer_list]
    for n in names:
        if n not in clean_cache:
            raise ValueError(f"clean_cache has no {n!r}: run the clean prompt with run_with_cache and a names_filter "
                             f"that includes {activation_name!r} for every layer")
    win_axis = _window_axis(activation_name, axes)
    qaxis = 2 if activation_name in _PATTERN else 1  # the activation's query-position axis
    # position grids of [batch pos ...] activations: two cells' exact suffixes per sequence, one
    # program per layer; pattern grids (whose key axis would be the packed one): window starts
    packed = win_axis is not None and activation_name not in _PATTERN
    starts = window_starts(seq_len) if win_axis is not None and not packed else (0,)
    resid_names = frozenset(f"blocks.{l}.hook_resid_pre" for l in layer_list)
    mesh = getattr(model, "mesh", None)  # cells over its batch axes; the prompts' batch replicated
    toks_j, mask_j = jnp.asarray(toks), jnp.asarray(mask)
    resumes = {l: _resume_point(n, l) for l, n in zip(layer_list, names)}
    resume_names = frozenset(r[1] for r in resumes.values() if r is not None)
    logits_c, acts_c, kv = _corrupted_run(params, toks_j, mask_j, cfg=cfg,
                                          capture=resid_names | resume_names | frozenset(names) | {EMBEDDED},
                                          precision=model.precision, with_kv=True)
    metric_pos, metric_cols = resolve_metric_reads(patching_metric, metric_positions, logits_c.shape,
                                                   logits_c.dtype)  # None: every position / column
    seq_axis = -1 if qaxis == 2 else 1
    cleans = {}
    for name in names:
        clean = cleans[name] = jnp.asarray(clean_cache[name])
        if clean.ndim < 3 or clean.shape[0] != toks.shape[0] or clean.shape[seq_axis] != seq_len:
            raise ValueError(f"clean_cache[{name!r}] has shape {clean.shape}, which does not match corrupted_tokens "
                             f"{toks.shape}: clean and corrupted prompts must have the same batch size and length")
    firsts = _first_differences(model, toks, attention_mask, clean_cache, cleans, acts_c, qaxis)
    cells = np.array(list(itertools.product(*[range(s) for s in sizes])), np.int32).reshape(-1, len(sizes))
    kv_room = _with_room(kv, seq_len) if packed else None
    out = np.full((cfg.n_layers, len(cells)), np.nan, np.float32)
    plan, calls = [], []  # (layer, cells) and the call of their program, one per (layer, window start)
    metric = Fn(patching_metric)
    noop = None  # the metric of the corrupted run itself, computed once a cell's patch changes nothing
    layouts: dict[int, tuple[np.ndarray, dict[str, jax.Array]]] = {}  # packed sequences by first live position
    for l, name in zip(layer_list, names):
        clean, first = cleans[name], firsts[name]
        w = start_bucket(first) if first < seq_len else seq_len
        live = np.full(len(cells), w < seq_len) if win_axis is None else cells[:, win_axis] >= w
        if not live.all():
            noop = float(np.asarray(_metric_of(logits_c, metric))) if noop is None else noop
            out[l, ~live] = noop
        if not live.any():
            continue
        resid_l = acts_c[f"blocks.{l}.hook_resid_pre"]
        resume_at, resume_value = (None, None) if resumes[l] is None else (resumes[l][0], acts_c[resumes[l][1]])
        if packed:
            if w not in layouts:
                live_idx = np.flatnonzero(live)
                pairs = pack_suffixes(cells[live_idx, win_axis], seq_len)
                seqs = {k: jnp.asarray(v) for k, v in packed_rows(cells[live_idx], pairs, win_axis, seq_len).items()}
                layouts[w] = (np.where(pairs >= 0, live_idx[np.maximum(pairs, 0)], -1), seqs)
            pairs, seqs = layouts[w]
            n = len(pairs)
            chunk = _default_chunk(cfg, toks.shape[0], seq_len, l, 0, n, packed=True) if chunk_size is None \
                else chunk_size
            plan.append((l, pairs))
            calls.append(((params, mask_j, resid_l, kv_room, logits_c, clean, seqs, metric, resume_value),
                          dict(cfg=cfg, name=name, axes=axes, layer=l, metric_positions=metric_pos,
                               metric_columns=metric_cols, precision=model.precision, chunk_size=int(min(chunk, n)),
                               mesh=mesh, resume_at=resume_at)))
            continue
        layer_starts = tuple(sorted({w} | {s for s in starts if s > w}))
        group = np.zeros(len(cells), np.int64) if win_axis is None else \
            np.searchsorted(layer_starts, cells[:, win_axis], "right") - 1
        for g, ws in enumerate(layer_starts):
            sel = np.flatnonzero(live & (group == g))
            if not len(sel):
                continue
            chunk = _default_chunk(cfg, toks.shape[0], seq_len, l, ws, len(sel)) if chunk_size is None \
                else chunk_size
            plan.append((l, sel))
            calls.append(((params, mask_j, resid_l, kv if ws else None, logits_c, clean, jnp.asarray(cells[sel]),
                           metric, resume_value),
                          dict(cfg=cfg, name=name, axes=axes, layer=l, window=ws, window_axis=win_axis,
                               metric_positions=metric_pos, metric_columns=metric_cols, precision=model.precision,
                               chunk_size=int(min(chunk, len(sel))), mesh=mesh, resume_at=resume_at)))
    # every program compiled ahead, a few at a time; the results read back at the end, so that
    # dispatch runs ahead of them
    for (l, sel), vals in zip(plan, run_compiled_ahead(_packed_grid if packed else _suffix_grid, calls)):
        if packed:  # sel: the sequences' cell pairs
            vals = np.asarray(vals)
            out[l, sel[:, 0]] = vals[:, 0]
            two = sel[:, 1] >= 0
            out[l, sel[two, 1]] = vals[two, 1]
        else:
            out[l, sel] = np.asarray(vals)
    return jnp.asarray(out.reshape((cfg.n_layers, *sizes)))


def _check_layers(layers: Any, n_layers: int) -> list[int]:
    """The `layers` argument as ints in [0, n_layers); ValueError naming any other (JAX would not complain)."""
    return indices(layers, n_layers, "layers", negative=False, context=f"for a model of {n_layers} layers")


def _specialise(activation_name: str, index_axis_names: tuple[str, ...], shape_doc: str) -> Callable[..., jax.Array]:
    def fn(model: Any, corrupted_tokens: Any, clean_cache: Any, patching_metric: Metric, **kw: Any) -> jax.Array:
        return generic_activation_patch(model, corrupted_tokens, clean_cache, patching_metric, activation_name,
                                        index_axis_names, **kw)

    fn.__doc__ = (f"Patch clean `{activation_name}` into the corrupted run for every {' × '.join(index_axis_names)}; "
                  f"returns {shape_doc} (TransformerLens's shape). Keywords: attention_mask, chunk_size, layers, "
                  "metric_positions (see generic_activation_patch).")
    return fn


get_act_patch_resid_pre = _specialise("resid_pre", ("layer", "pos"), "[n_layers, pos]")
get_act_patch_resid_mid = _specialise("resid_mid", ("layer", "pos"), "[n_layers, pos]")
get_act_patch_attn_out = _specialise("attn_out", ("layer", "pos"), "[n_layers, pos]")
get_act_patch_mlp_out = _specialise("mlp_out", ("layer", "pos"), "[n_layers, pos]")
get_act_patch_attn_head_out_by_pos = _specialise("z", ("layer", "pos", "head"), "[n_layers, pos, n_heads]")
get_act_patch_attn_head_q_by_pos = _specialise("q", ("layer", "pos", "head"), "[n_layers, pos, n_heads]")
get_act_patch_attn_head_k_by_pos = _specialise("k", ("layer", "pos", "head"), "[n_layers, pos, n_kv_heads]")
get_act_patch_attn_head_v_by_pos = _specialise("v", ("layer", "pos", "head"), "[n_layers, pos, n_kv_heads]")
get_act_patch_attn_head_pattern_by_pos = _specialise("pattern", ("layer", "head_index", "dest_pos"),
                                                     "[n_layers, n_heads, dest_pos]")
get_act_patch_attn_head_pattern_dest_src_pos = _specialise("pattern", ("layer", "head_index", "dest_pos", "src_pos"),
                                                           "[n_layers, n_heads, dest_pos, src_pos]")
get_act_patch_attn_head_out_all_pos = _specialise("z", ("layer", "head"), "[n_layers, n_heads]")
get_act_patch_attn_head_q_all_pos = _specialise("q", ("layer", "head"), "[n_layers, n_heads]")
get_act_patch_attn_head_k_all_pos = _specialise("k", ("layer", "head"), "[n_layers, n_kv_heads]")
get_act_patch_attn_head_v_all_pos = _specialise("v", ("layer", "head"), "[n_layers, n_kv_heads]")
get_act_patch_attn_head_pattern_all_pos = _specialise("pattern", ("layer", "head_index"), "[n_layers, n_heads]")


# ---------------------------------------------------------------------------------------------
# Any grid of edits
# ---------------------------------------------------------------------------------------------

@retry_static(eager=False)  # grid cells are vmapped: a stored value would be traced
@partial(jax.jit, static_argnames=("cfg", "precision", "chunk_size", "mesh"))
def _grid(params, tokens, mask, grid, shared, build, metric, *, cfg, precision, chunk_size, mesh=None):
    from jaxlens.hooks import make_hooks

    def one(item):
        hooks = make_hooks(build(item, *shared), cfg)
        logits, _, _ = forward(params, cfg, tokens, mask, hooks=hooks, precision=precision)
        return call_metric(metric, logits)

    return map_cells(one, grid, chunk_size, mesh)


def run_grid(model: Any, tokens: Any, build_hooks: Callable[..., Any], grid: Any, metric: Metric,
             shared: Sequence[Any] = (), *, attention_mask: Any = None, chunk_size: int | None = None) -> Any:
    """One compiled call over a grid of experiments.

    `grid` is a pytree whose leaves share a leading axis of length n; for each i,
    `build_hooks(grid[i], *shared)` returns TransformerLens-style `fwd_hooks` (typically edits from
    `jaxlens.interventions`) and `metric(logits)` is evaluated on the run with those hooks. The
    items are vmapped (`chunk_size` at a time; on a mesh, split over its batch axes: `map_cells`);
    `shared` arrays are passed once, not per item.
    Returns the metric stacked over the grid. The compiled program is keyed by what `build_hooks`
    and `metric` read (see `jaxlens.fingerprint`), so fresh lambdas reuse it and changed globals
    do not.
    """
    cfg = model.cfg
    toks, mask = check_tokens(np.asarray(tokens), cfg, attention_mask)
    leaves = jax.tree.leaves(grid)
    if not leaves:
        raise ValueError("run_grid: grid has no arrays; give arrays with a leading grid axis")
    n = {int(jnp.shape(x)[0]) if jnp.ndim(x) else -1 for x in leaves}
    if len(n) != 1 or -1 in n:
        raise ValueError(f"run_grid: every grid leaf needs the same leading (grid) axis; got leading sizes {sorted(n)}")
    return _grid(model.params, jnp.asarray(toks), jnp.asarray(mask), grid, tuple(shared), Fn(build_hooks), Fn(metric),
                 cfg=cfg, precision=model.precision, chunk_size=chunk_size, mesh=getattr(model, "mesh", None))


__all__ = ["generic_activation_patch", "run_grid", "IndexPatch"] + [n for n in dir() if n.startswith("get_act_patch_")]


# ---------------------------------------------------------------------------------------------
# Every activation type at once (TransformerLens's `*_every` helpers)
# ---------------------------------------------------------------------------------------------

def _pad_heads(grid: jax.Array, n_heads: int) -> jax.Array:
    """Zero-pad the last (head) axis to n_heads: grouped-query k/v grids have n_kv_heads (as TransformerLens)."""
    return jnp.pad(grid, [(0, 0)] * (grid.ndim - 1) + [(0, n_heads - grid.shape[-1])])


def get_act_patch_block_every(model: Any, corrupted_tokens: Any, clean_cache: Any, metric: Metric,
                              **kw: Any) -> jax.Array:
    """resid_pre, attn_out and mlp_out patched at every (layer, pos): [3, n_layers, pos], in that order
    (TransformerLens's). Keywords (attention_mask, chunk_size, layers) go to each grid."""
    grids = [fn(model, corrupted_tokens, clean_cache, metric, **kw)
             for fn in (get_act_patch_resid_pre, get_act_patch_attn_out, get_act_patch_mlp_out)]
    return jnp.stack(grids)


def get_act_patch_attn_head_all_pos_every(model: Any, corrupted_tokens: Any, clean_cache: Any, metric: Metric,
                                          **kw: Any) -> jax.Array:
    """Every head's output, q, k, v and pattern patched across all positions: [5, n_layers, n_heads], in
    TransformerLens's order (out, q, k, v, pattern). Grouped-query k/v rows are zero-padded to n_heads."""
    fns = (get_act_patch_attn_head_out_all_pos, get_act_patch_attn_head_q_all_pos, get_act_patch_attn_head_k_all_pos,
           get_act_patch_attn_head_v_all_pos, get_act_patch_attn_head_pattern_all_pos)
    grids = [fn(model, corrupted_tokens, clean_cache, metric, **kw) for fn in fns]
    return jnp.stack([_pad_heads(g, model.cfg.n_heads) for g in grids])


def get_act_patch_attn_head_by_pos_every(model: Any, corrupted_tokens: Any, clean_cache: Any, metric: Metric,
                                         **kw: Any) -> jax.Array:
    """Every head's output, q, k, v and pattern patched at every position: [5, n_layers, pos, n_heads], in
    TransformerLens's order (out, q, k, v, pattern; the pattern grid, [layer head dest_pos], is moved to
    [layer pos head]). Grouped-query k/v are zero-padded to n_heads."""
    fns = (get_act_patch_attn_head_out_by_pos, get_act_patch_attn_head_q_by_pos, get_act_patch_attn_head_k_by_pos,
           get_act_patch_attn_head_v_by_pos)
    grids = [fn(model, corrupted_tokens, clean_cache, metric, **kw) for fn in fns]
    pattern = get_act_patch_attn_head_pattern_by_pos(model, corrupted_tokens, clean_cache, metric, **kw)
    grids.append(jnp.swapaxes(pattern, 1, 2))
    return jnp.stack([_pad_heads(g, model.cfg.n_heads) for g in grids])


__all__ += ["get_act_patch_block_every", "get_act_patch_attn_head_all_pos_every",
            "get_act_patch_attn_head_by_pos_every"]


# ---------------------------------------------------------------------------------------------
# Direct path patching (TransformerLens 4's get_act_patch_direct_path)
# ---------------------------------------------------------------------------------------------

def _add_to_head(fork: jax.Array, hook: HookPoint, *, delta: jax.Array, head: jax.Array) -> jax.Array:
    """Add the source head's clean-minus-corrupted write to one head's copy of the input."""
    return fork.at[:, :, head].add(delta.astype(fork.dtype))


def _check_direct_path(cfg: Any, src_layer: int, component: str) -> None:
    if component not in ("q", "k", "v"):
        raise ValueError(f"component must be 'q', 'k' or 'v', got {component!r}")
    if cfg.norm_placement != "pre":
        raise ValueError(f"{cfg.model_type} normalises each attention output before the residual add "
                         f"(norm_placement={cfg.norm_placement!r}), so a source head's residual write is not "
                         "hook_z @ W_O and direct path patching is unsupported here")
    if component != "q" and cfg.n_kv_heads != cfg.n_heads and src_layer + 1 < cfg.n_layers:
        raise ValueError(f"component={component!r} is unsupported here: n_kv_heads={cfg.n_kv_heads} for "
                         f"n_heads={cfg.n_heads} (grouped-query attention), so per-query-head K/V inputs are "
                         "undefined; component='q' is available")


def get_act_patch_direct_path(model: Any, corrupted_tokens: Any, clean_cache: Any, corrupted_cache: Any,
                              patching_metric: Metric, src_layer: int, src_head: int, component: str = "q",
                              verbose: bool = True, *, attention_mask: Any = None) -> jax.Array:
    """[n_layers n_heads]: the metric with the path from head (src_layer, src_head) into each later
    head's `component` input patched alone (Wang et al. 2022, as TransformerLens 4): the source's
    clean-minus-corrupted write (z W_O) is added, at every position, to that head's own copy of
    the input (`blocks.{l}.hook_{component}_input`, before ln1), while every other reader sees the
    corrupted run. Rows l <= src_layer are 0 (no path). One run per destination; the head index
    is traced, so each destination layer compiles once. `verbose` is accepted (no progress bar)."""
    del verbose
    cfg = model.cfg
    src_layer = index(src_layer, cfg.n_layers, "src_layer")
    src_head = index(src_head, cfg.n_heads, "src_head")
    _check_direct_path(cfg, src_layer, component)
    z = f"blocks.{src_layer}.attn.hook_z"
    for name, cache in (("clean_cache", clean_cache), ("corrupted_cache", corrupted_cache)):
        if z not in cache:
            raise ValueError(f"{name} must hold {z} (the source head's output)")
    W_O = model.W_O[src_layer, src_head]  # [d_head d_model]
    delta = jnp.asarray(clean_cache[z])[:, :, src_head] @ W_O - jnp.asarray(corrupted_cache[z])[:, :, src_head] @ W_O
    out = np.zeros((cfg.n_layers, cfg.n_heads), np.float32)
    for layer in range(src_layer + 1, cfg.n_layers):
        name = f"blocks.{layer}.hook_{component}_input"
        for head in range(cfg.n_heads):
            hook = partial(_add_to_head, delta=delta, head=jnp.asarray(head, jnp.int32))
            logits = model.run_with_hooks(corrupted_tokens, attention_mask=attention_mask, fwd_hooks=[(name, hook)])
            out[layer, head] = float(patching_metric(logits))
    return jnp.asarray(out)


def get_act_patch_direct_path_all_sources(model: Any, corrupted_tokens: Any, clean_cache: Any, corrupted_cache: Any,
                                          patching_metric: Metric, component: str = "q", verbose: bool = True, *,
                                          attention_mask: Any = None) -> jax.Array:
    """[n_layers n_heads n_layers n_heads]: `get_act_patch_direct_path` from every source head;
    results[sl, sh, dl, dh], 0 where dl <= sl."""
    cfg = model.cfg
    _check_direct_path(cfg, 0, component)
    return jnp.stack([jnp.stack([get_act_patch_direct_path(model, corrupted_tokens, clean_cache, corrupted_cache,
                                                           patching_metric, sl, sh, component, verbose,
                                                           attention_mask=attention_mask)
                                 for sh in range(cfg.n_heads)]) for sl in range(cfg.n_layers)])


__all__ += ["get_act_patch_direct_path", "get_act_patch_direct_path_all_sources"]
