"""TransformerLens 4.3's attribution-patching tool (`tools.analysis.attribution_patching`): node and
edge attribution patching (EAP) over the residual-stream graph, and ablate-outside faithfulness.

A node is a residual write (the embedding, one head's output, one MLP's output) at one position;
an edge joins a writer to a reader that sees it (a head's split Q/K/V input, an MLP's input, the
final residual the logits read). Scores are first-order estimates in the denoising convention:
node `(a_clean - a_corrupt) . d metric / d a` at the corrupted run; edge `(writer_clean -
writer_corrupt) . d metric / d reader_input`. A writer's outgoing edges sum to its node score.

jaxlens computes every pair of a batch in one compiled forward + backward (the metric of each
row is that row's own, `metric_fn(logits[i:i+1])`, so the gradients are the per-pair ones) and
scores every edge with one contraction, then reports TransformerLens's dictionaries in its order.
`faithfulness` ablates every edge outside a circuit exactly: each reader's input is rebuilt as
the sum of its kept writers' live outputs and its ablated writers' replacements; the live outputs
are found by re-running the forward until they stop changing (each pass makes one more writer
stage final, embeddings, heads of layer 0, MLP 0, heads of layer 1, ...: at most 2 n_layers + 1
passes, each the same compiled program).

Differences from TransformerLens: the model's hook switches are not touched (the edge sweep runs
with its own configuration, so nothing needs restoring); there is no training mode to refuse.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Literal, Optional, Sequence, Union, get_args

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.edits.gradients import Perturb, value_and_grads
from jaxlens.fingerprint import Fn, call_metric
from jaxlens.hooks import Hooks, resolve_names
from jaxlens.model.forward import forward_jit
from jaxlens.utils import to_numpy

__all__ = ["AttributionResult", "EdgeAttributionConfig", "FaithfulnessConfig", "FaithfulnessResult", "GradientCache",
           "Node", "attribution_patch", "cache_activation_and_gradient", "capture_writer_outputs", "enumerate_edges",
           "enumerate_nodes", "faithfulness"]

MetricFn = Callable[[jax.Array], jax.Array]
NamesFilter = Union[str, Sequence[str], Callable[[str], bool], None]
NodeKind = Literal["embed", "attn_head_out", "mlp_out", "q_input", "k_input", "v_input", "mlp_in", "logits"]
Granularity = Literal["node", "edge"]
AblationMode = Literal["corrupt", "mean"]
EdgeClass = Literal["into_qk", "into_v", "into_mlp", "into_logits"]
_ATTN_WRITE_RTOL = 2.5e-2  # TransformerLens's: how far hook_attn_out may stray from the head sum
_EDGE_UNSUPPORTED = ("edge granularity and faithfulness are unsupported here. Node granularity "
                     '(EdgeAttributionConfig(granularity="node")) is available.')
_HEAD_KINDS = ("attn_head_out", "q_input", "k_input", "v_input")


@dataclass
class GradientCache:
    """Activations and their metric-gradients from one forward (+ backward) pass; `metric` is the
    scalar metric (summed over the rows of a batch)."""

    activations: dict[str, jax.Array]
    gradients: dict[str, Optional[jax.Array]]
    metric: jax.Array


@dataclass(frozen=True)
class Node:
    """A node of the residual-stream graph: (kind, position, layer, head), checked on creation.

    Writers: "embed" (no layer, no head), "attn_head_out" (layer and head), "mlp_out" (layer).
    Readers: "q_input"/"k_input"/"v_input" (layer and head), "mlp_in" (layer), "logits" (the final
    layer, read at its hook_resid_post)."""

    kind: NodeKind
    position: int
    layer: Optional[int] = None
    head: Optional[int] = None

    def __post_init__(self) -> None:
        if self.kind == "embed":
            if self.layer is not None or self.head is not None:
                raise ValueError("embed nodes take neither layer nor head")
        elif self.kind in _HEAD_KINDS:
            if self.layer is None or self.head is None:
                raise ValueError(f"{self.kind} nodes need both layer and head")
        elif self.kind in ("mlp_out", "mlp_in", "logits"):
            if self.layer is None:
                raise ValueError(f"{self.kind} nodes need a layer")
            if self.head is not None:
                raise ValueError(f"{self.kind} nodes take no head")
        else:
            raise ValueError(f"unknown node kind {self.kind!r}")

    @property
    def hook_name(self) -> str:
        """The hook this node is read at (a head node slices its head out of the per-head tensor). The
        split inputs are HookedTransformer's `blocks.{l}.hook_q_input` (the bridge also calls them
        `blocks.{l}.attn.hook_q_input`)."""
        return {"embed": "hook_embed", "attn_head_out": f"blocks.{self.layer}.attn.hook_z",
                "mlp_out": f"blocks.{self.layer}.hook_mlp_out", "mlp_in": f"blocks.{self.layer}.hook_mlp_in",
                "logits": f"blocks.{self.layer}.hook_resid_post"}.get(
                    self.kind, f"blocks.{self.layer}.hook_{self.kind}")


@dataclass(frozen=True)
class EdgeAttributionConfig:
    """granularity "node" (each residual write) or "edge" (each write -> read pair); ig_steps > 1
    (EAP-IG) is refused, as in TransformerLens 4.3."""

    granularity: Granularity = "node"
    ig_steps: int = 1

    def __post_init__(self) -> None:
        if self.granularity not in get_args(Granularity):
            raise ValueError(f"granularity must be one of {get_args(Granularity)}, got {self.granularity!r}")
        if self.ig_steps < 1:
            raise ValueError(f"ig_steps must be >= 1, got {self.ig_steps}")
        if self.ig_steps > 1:
            raise NotImplementedError("ig_steps>1 (EAP-IG integrated gradients) is not implemented yet; this "
                                      "build supports ig_steps=1 (plain attribution) only.")


@dataclass
class AttributionResult:
    """`node_scores` (an edge sweep: each writer's sum over its edges) and `edge_scores`."""

    node_scores: dict[Node, float]
    edge_scores: dict[tuple[Node, Node], float] = field(default_factory=dict)

    def top_nodes(self, k: int = 10) -> list[tuple[Node, float]]:
        """The k nodes of largest |score|, strongest first (ties keep enumeration order)."""
        return sorted(self.node_scores.items(), key=lambda item: abs(item[1]), reverse=True)[:k]

    def top_edges(self, k: int = 10) -> list[tuple[Node, Node, float]]:
        """The k edges of largest |score| as (writer, reader, score), strongest first."""
        ranked = sorted(self.edge_scores.items(), key=lambda item: abs(item[1]), reverse=True)
        return [(w, r, s) for (w, r), s in ranked[:k]]


@dataclass(frozen=True)
class FaithfulnessConfig:
    """How an ablated edge's writer is replaced: "corrupt" (the corrupted run's own output) or
    "mean" (its mean over `mean_tokens`)."""

    ablation: AblationMode = "corrupt"

    def __post_init__(self) -> None:
        if self.ablation not in get_args(AblationMode):
            raise ValueError(f"ablation must be one of {get_args(AblationMode)}, got {self.ablation!r}")


@dataclass
class FaithfulnessResult:
    """`recovered` = (m_ablated - m_corrupt) / (m_clean - m_corrupt); per edge class, the recovery
    with that class's kept edges removed too; `edge_class_counts` counts the whole graph."""

    recovered: float
    full_metric: float
    corrupt_metric: float
    circuit_size: int
    total_edges: int
    edge_class_recovered: dict[EdgeClass, float] = field(default_factory=dict)
    edge_class_counts: dict[EdgeClass, int] = field(default_factory=dict)


# --- hook sets ---------------------------------------------------------------------------------
def _node_hook_names(n_layers: int) -> list[str]:
    return ["hook_embed"] + [n for l in range(n_layers) for n in (f"blocks.{l}.attn.hook_z", f"blocks.{l}.hook_mlp_out")]


def _writer_layout(n_layers: int) -> list[tuple[str, str, int | None, bool]]:
    """The writers' (hook, kind, layer, per head) in the order of the stacked writer tensor."""
    out = [("hook_embed", "embed", None, False)]
    for l in range(n_layers):
        out += [(f"blocks.{l}.attn.hook_result", "attn_head_out", l, True), (f"blocks.{l}.hook_mlp_out", "mlp_out", l, False)]
    return out


def _reader_layout(n_layers: int) -> list[tuple[str, str, int | None, bool]]:
    """The readers' (hook, kind, layer, per head) in the order of the stacked reader tensor."""
    out = []
    for l in range(n_layers):
        out += [(f"blocks.{l}.hook_{k}_input", f"{k}_input", l, True) for k in "qkv"]
        out.append((f"blocks.{l}.hook_mlp_in", "mlp_in", l, False))
    return out + [(f"blocks.{n_layers - 1}.hook_resid_post", "logits", n_layers - 1, False)]


def _writer_hook_names(n_layers: int) -> list[str]:
    return [name for name, *_ in _writer_layout(n_layers)]


def _reader_hook_names(n_layers: int) -> list[str]:
    return [name for name, *_ in _reader_layout(n_layers)]


def _layout_index(layout: list[tuple[str, str, int | None, bool]], n_heads: int) -> dict[tuple, int]:
    """(kind, layer, head) -> row of the stacked tensor of `layout`."""
    idx: dict[tuple, int] = {}
    for _, kind, layer, per_head in layout:
        for h in (range(n_heads) if per_head else (None,)):
            idx[(kind, layer, h)] = len(idx)
    return idx


def _stack(acts: dict[str, jax.Array], layout: list[tuple[str, str, int | None, bool]]) -> jax.Array:
    """[batch pos row d_model]: the layout's hooks, per-head ones [batch pos head d_model] in place."""
    return jnp.concatenate([acts[name] if per_head else acts[name][:, :, None] for name, _, _, per_head in layout],
                           axis=2)


def _split(stacked: jax.Array, layout: list[tuple[str, str, int | None, bool]], n_heads: int) -> dict[str, jax.Array]:
    """The inverse of `_stack`: {hook: [batch pos (head) d_model]}."""
    out, i = {}, 0
    for name, _, _, per_head in layout:
        out[name] = stacked[:, :, i:i + n_heads] if per_head else stacked[:, :, i]
        i += n_heads if per_head else 1
    return out


def _edge_hook_names(n_layers: int) -> list[str]:
    """TransformerLens's edge hook set: the node set, head results, split inputs, MLP inputs and
    the final residual."""
    names = ["hook_embed"]
    for l in range(n_layers):
        names += [f"blocks.{l}.attn.hook_z", f"blocks.{l}.hook_mlp_out", f"blocks.{l}.attn.hook_result",
                  f"blocks.{l}.hook_q_input", f"blocks.{l}.hook_k_input", f"blocks.{l}.hook_v_input"]
    return names + [f"blocks.{l}.hook_mlp_in" for l in range(n_layers)] + [f"blocks.{n_layers - 1}.hook_resid_post"]


def _edge_cfg(cfg: Any) -> Any:
    """The model's configuration with the hooks an edge sweep reads switched on."""
    return cfg.replace(use_attn_result=True, use_split_qkv_input=True, use_hook_mlp_in=True, use_attn_in=False)


def _check_edge_model(cfg: Any) -> None:
    """Refuse what makes a head's result not its residual write, or K/V inputs not per query head."""
    if cfg.norm_placement != "pre":
        raise ValueError("per-head attention outputs are normalized or scaled before the residual add on this "
                         f"architecture (norm_placement={cfg.norm_placement!r}: a norm after the head sum), so "
                         f"attn.hook_result is not a head's residual contribution: {_EDGE_UNSUPPORTED}")
    kv = cfg.n_key_value_heads
    if kv is not None and kv != cfg.n_heads:
        raise ValueError(f"blocks.0 has n_key_value_heads={kv} for n_heads={cfg.n_heads} (GQA/MQA), so its K/V "
                         f"inputs are not per query head: {_EDGE_UNSUPPORTED}")


def _check_head_sum(acts: dict[str, jax.Array], n_layers: int) -> None:
    """Refuse a layer whose hook_attn_out is not its heads' results summed plus a constant."""
    for l in range(n_layers):
        written = np.asarray(acts[f"blocks.{l}.hook_attn_out"], np.float64)
        head_sum = np.asarray(acts[f"blocks.{l}.attn.hook_result"], np.float64).sum(2)
        rest = written - head_sum
        rest = rest - rest.mean(axis=(0, 1), keepdims=True)  # the output bias belongs to no head
        relative = float(np.linalg.norm(rest) / max(np.linalg.norm(written), np.finfo(np.float32).tiny))
        if relative > _ATTN_WRITE_RTOL:
            raise ValueError(f"per-head attention outputs are normalized or scaled before the residual add on this "
                             f"architecture (blocks.{l}.hook_attn_out differs from the summed attn.hook_result by "
                             f"{relative:.2g} of its norm), so attn.hook_result is not a head's residual "
                             f"contribution: {_EDGE_UNSUPPORTED}")


# --- running -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _PerRow:
    """The metric of a batch of pairs: each row's own `metric_fn(logits[i:i+1])`, summed, so the
    gradient at row i is that pair's gradient (rows do not interact)."""

    inner: Fn

    def __call__(self, logits: jax.Array) -> jax.Array:
        total = 0.0
        for i in range(logits.shape[0]):
            value = call_metric(self.inner, logits[i:i + 1], "metric_fn")
            if jnp.ndim(value) != 0:
                raise ValueError(f"metric_fn must return a scalar, got shape {tuple(jnp.shape(value))}")
            total = total + value
        return total


jax.tree_util.register_dataclass(_PerRow, data_fields=["inner"], meta_fields=[])
_apply_metric = jax.jit(lambda logits, metric: call_metric(metric, logits, "metric_fn"))  # keyed by its fingerprint


def _tokens(model: Any, tokens: Any, what: str) -> jax.Array:
    """[batch seq] token ids, checked against the vocabulary (JAX would clamp an out-of-range id)."""
    arr = to_numpy(tokens)
    if arr.ndim != 2:
        raise ValueError(f"{what} expects 2D [batch, seq] token tensors, got shape {tuple(arr.shape)}")
    toks, _ = model._inputs(arr, None, False, "right")
    return toks


def _validate_pair(model: Any, clean: Any, corrupt: Any, operation: str, method: str) -> tuple[jax.Array, jax.Array]:
    clean, corrupt = to_numpy(clean), to_numpy(corrupt)
    shapes = [clean.shape, corrupt.shape]
    if any(len(s) != 2 for s in shapes):
        raise ValueError(f"{operation} expects 2D [batch, seq] token tensors, got clean {shapes[0]} and corrupt "
                         f"{shapes[1]}")
    if shapes[0][0] != shapes[1][0]:
        raise ValueError(f"clean and corrupt must hold the same number of prompt pairs, got {shapes[0][0]} and "
                         f"{shapes[1][0]}")
    if shapes[0][1] != shapes[1][1]:
        raise ValueError(f"each clean/corrupt pair must tokenize to the same length; got clean length {shapes[0][1]} "
                         f"and corrupt length {shapes[1][1]}. {method} aligns activations position-by-position.")
    return _tokens(model, clean, operation), _tokens(model, corrupt, operation)


def _run(model: Any, cfg: Any, tokens: jax.Array, metric_fn: MetricFn | None, capture: Sequence[str],
         grad_names: Sequence[str] = (), extra: Hooks | None = None, per_row: bool = True
         ) -> tuple[jax.Array | None, dict, dict]:
    """(metric or None, activations, gradients) of one compiled run under `cfg`, with the model's
    stored hooks and `extra` edits applied; `per_row`: the metric is each row's own, summed."""
    metric = None if metric_fn is None else (_PerRow(Fn(metric_fn)) if per_row else Fn(metric_fn))
    stored = model._compose_hooks((), (), backward=False) if hasattr(model, "_compose_hooks") else Hooks()
    hooks = Hooks(stored.entries + (extra.entries if extra is not None else ()))
    mask = jnp.ones(tokens.shape, jnp.int32)
    capture = frozenset(capture)
    if grad_names:
        value, _, acts, grads = value_and_grads(model.params, tokens, mask, hooks, metric, cfg=cfg,
                                                capture=capture, grad_names=frozenset(grad_names),
                                                precision=model.precision)
        return value, acts, grads
    logits, acts, _ = forward_jit(model.params, cfg, tokens, mask, hooks, capture=capture, precision=model.precision)
    value = None if metric is None else _apply_metric(logits, metric)
    if value is not None and jnp.ndim(value) != 0:
        raise ValueError(f"metric_fn must return a scalar tensor, got shape {tuple(jnp.shape(value))}")
    return value, acts, {}


def _as_predicate(names_filter: NamesFilter) -> Callable[[str], bool]:
    if names_filter is None:
        return lambda name: True
    if isinstance(names_filter, str):
        return lambda name: name == names_filter
    if callable(names_filter):
        return names_filter
    wanted = set(names_filter)
    return lambda name: name in wanted


def _names(cfg: Any, names_filter: NamesFilter) -> list[str]:
    pred = _as_predicate(names_filter)
    names = [n for n in resolve_names(None, cfg) if pred(n)]
    if not names:
        raise ValueError("names_filter matched no hook points")
    return names


def cache_activation_and_gradient(model: Any, tokens: Any, metric_fn: MetricFn, names_filter: NamesFilter = None,
                                  compute_gradient: bool = True) -> GradientCache:
    """Activations at `names_filter`'s hooks (default: the node set, hook_embed and each layer's
    attn.hook_z and hook_mlp_out) and, with `compute_gradient`, d metric / d activation there, in
    one compiled forward + backward. `metric_fn(logits [batch seq vocab]) -> scalar`."""
    cfg = model.cfg
    names = _names(cfg, _node_hook_names(cfg.n_layers) if names_filter is None else names_filter)
    toks = _tokens(model, tokens, "cache_activation_and_gradient")
    value, acts, grads = _run(model, cfg, toks, metric_fn, names, names if compute_gradient else (), per_row=False)
    gradients = {n: (grads.get(n) if compute_gradient else None) for n in acts}
    return GradientCache(activations=dict(acts), gradients=gradients, metric=value)


def capture_writer_outputs(model: Any, tokens: Any, names_filter: NamesFilter = None) -> dict[str, jax.Array]:
    """Each writer's residual contribution (default: hook_embed, attn.hook_result, hook_mlp_out) from
    one forward; the hook switches these need must be on (`model.set_use_attn_result(True)`)."""
    cfg = model.cfg
    names = _names(cfg, _writer_hook_names(cfg.n_layers) if names_filter is None else names_filter)
    _, acts, _ = _run(model, cfg, _tokens(model, tokens, "capture_writer_outputs"), None, names)
    return dict(acts)


# --- the graph ---------------------------------------------------------------------------------
def _check_required(cache: GradientCache, names: Sequence[str], graph: str, hint: str) -> None:
    missing = [n for n in names if n not in cache.activations]
    if missing:
        raise ValueError(f"{graph} requires hook points missing from the cache: {', '.join(missing)}. {hint}")


def enumerate_nodes(model: Any, cache: GradientCache) -> list[Node]:
    """Every writer at every position: embeds first, then per layer and position the heads and the MLP."""
    n_layers = int(model.cfg.n_layers)
    _check_required(cache, _node_hook_names(n_layers), "node graph", "Cache with a names_filter that keeps "
                    "hook_embed, blocks.*.attn.hook_z, and blocks.*.hook_mlp_out.")
    seq = cache.activations["hook_embed"].shape[1]
    nodes = [Node("embed", p) for p in range(seq)]
    for l in range(n_layers):
        heads = cache.activations[f"blocks.{l}.attn.hook_z"].shape[2]
        for p in range(seq):
            nodes += [Node("attn_head_out", p, l, h) for h in range(heads)] + [Node("mlp_out", p, l)]
    return nodes


def _graph(n_layers: int, n_heads: int, seq: int, parallel: bool) -> list[tuple[Node, list[Node]]]:
    """(reader, its writers) in TransformerLens's order: position, layer, Q/K/V heads, MLP, logits."""
    out: list[tuple[Node, list[Node]]] = []
    for p in range(seq):
        available = [Node("embed", p)]
        for l in range(n_layers):
            out += [(Node(kind, p, l, h), available) for kind in ("q_input", "k_input", "v_input")
                    for h in range(n_heads)]
            heads = [Node("attn_head_out", p, l, h) for h in range(n_heads)]
            mlp = Node("mlp_in", p, l)
            if parallel:  # the MLP reads the block input: this layer's heads do not feed it
                out.append((mlp, available))
                available = available + heads
            else:
                available = available + heads
                out.append((mlp, available))
            available = available + [Node("mlp_out", p, l)]
        out.append((Node("logits", p, n_layers - 1), available))
    return out


def enumerate_edges(model: Any, cache: GradientCache) -> list[tuple[Node, Node]]:
    """Every (writer, reader) pair where the reader sees the writer, position by position."""
    n_layers = int(model.cfg.n_layers)
    _check_required(cache, _edge_hook_names(n_layers), "edge graph",
                    "Cache with a names_filter that keeps the edge-granularity hook set: hook_embed, "
                    "blocks.*.attn.hook_z, blocks.*.hook_mlp_out, blocks.*.attn.hook_result, "
                    "blocks.*.hook_q_input, blocks.*.hook_k_input, blocks.*.hook_v_input, "
                    "blocks.*.hook_mlp_in, and blocks.{n_layers-1}.hook_resid_post.")
    seq, n_heads = cache.activations["hook_embed"].shape[1], cache.activations["blocks.0.attn.hook_z"].shape[2]
    return [(w, r) for r, ws in _graph(n_layers, n_heads, seq, bool(model.cfg.parallel_attn_mlp)) for w in ws]


@jax.jit
def _edge_matrix(clean_w: jax.Array, corrupt_w: jax.Array, reader_g: jax.Array) -> jax.Array:
    """[pos writer reader]: (writer_clean - writer_corrupt) . reader gradient, averaged over pairs."""
    delta = (clean_w - corrupt_w).astype(jnp.float32)
    return jnp.einsum("bpwd,bprd->pwr", delta, reader_g.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST) / delta.shape[0]


@jax.jit
def _node_scores(clean: dict, corrupt: dict, grads: dict) -> dict:
    """Per hook, (clean - corrupt) . gradient over the feature axis, averaged over pairs: [pos] or [pos head]."""
    return {n: jnp.mean(jnp.sum((clean[n] - corrupt[n]).astype(jnp.float32) * grads[n].astype(jnp.float32), -1), 0)
            for n in grads}


def attribution_patch(model: Any, clean: Any, corrupt: Any, metric_fn: MetricFn,
                      config: EdgeAttributionConfig = EdgeAttributionConfig()) -> AttributionResult:
    """Every node's (or, config.granularity="edge", every edge's) first-order effect on
    `metric_fn`, averaged over the clean/corrupt pairs (rows of two [batch seq] token arrays):
    one clean forward and one corrupted forward + backward for the whole batch. Edges refuse
    norms after the head sum (post-norm, sandwich), GQA/MQA, and a hook_attn_out that is not its
    heads' sum, as TransformerLens does."""
    clean_t, corrupt_t = _validate_pair(model, clean, corrupt, "attribution_patch", "Attribution patching")
    n_layers = int(model.cfg.n_layers)
    if config.granularity == "node":
        names = _node_hook_names(n_layers)
        _, clean_acts, _ = _run(model, model.cfg, clean_t, None, names)
        _, corrupt_acts, grads = _run(model, model.cfg, corrupt_t, metric_fn, names, names)
        cache = GradientCache(dict(corrupt_acts), dict(grads), jnp.zeros(()))
        nodes = enumerate_nodes(model, cache)
        per_hook = {n: np.asarray(s) for n, s in _node_scores(dict(clean_acts), dict(corrupt_acts), dict(grads)).items()}
        return AttributionResult({node: float(per_hook[node.hook_name][(node.position, node.head) if node.head is not None
                                                                         else node.position]) for node in nodes})
    _check_edge_model(model.cfg)
    cfg = _edge_cfg(model.cfg)
    writers, readers = _writer_hook_names(n_layers), _reader_hook_names(n_layers)
    attn_out = [f"blocks.{l}.hook_attn_out" for l in range(n_layers)]
    _, clean_acts, _ = _run(model, cfg, clean_t, None, writers + attn_out)
    _check_head_sum(clean_acts, n_layers)
    _, corrupt_acts, grads = _run(model, cfg, corrupt_t, metric_fn, writers, readers)
    matrix = np.asarray(_edge_matrix(_stack(clean_acts, _writer_layout(n_layers)), _stack(corrupt_acts, _writer_layout(n_layers)),
                                     _stack(grads, _reader_layout(n_layers))))
    n_heads, seq = int(cfg.n_heads), int(clean_t.shape[1])
    w_idx, r_idx = _layout_index(_writer_layout(n_layers), n_heads), _layout_index(_reader_layout(n_layers), n_heads)
    edge_scores: dict[tuple[Node, Node], float] = {}
    for reader, ws in _graph(n_layers, n_heads, seq, bool(cfg.parallel_attn_mlp)):
        row = matrix[reader.position, :, r_idx[(reader.kind, reader.layer, reader.head)]].tolist()
        for w in ws:
            edge_scores[(w, reader)] = row[w_idx[(w.kind, w.layer, w.head)]]
    node_scores: dict[Node, float] = {}
    for (w, _), s in edge_scores.items():
        node_scores[w] = node_scores.get(w, 0.0) + s
    return AttributionResult(node_scores=node_scores, edge_scores=edge_scores)


# --- faithfulness ------------------------------------------------------------------------------
def _normalize_circuit(circuit: Sequence[tuple]) -> list[tuple[Node, Node]]:
    """(writer, reader) pairs in first-occurrence order; top_edges' scores dropped."""
    out: list[tuple[Node, Node]] = []
    seen: set[tuple[Node, Node]] = set()
    for entry in circuit:
        if len(entry) not in (2, 3):
            raise ValueError(f"circuit entries must be (writer, reader) or (writer, reader, score), got a "
                             f"{len(entry)}-tuple")
        edge = (entry[0], entry[1])
        if edge not in seen:
            out.append(edge)
            seen.add(edge)
    return out


def _edge_class(edge: tuple[Node, Node]) -> EdgeClass:
    kind = edge[1].kind
    return {"q_input": "into_qk", "k_input": "into_qk", "v_input": "into_v", "mlp_in": "into_mlp",
            "logits": "into_logits"}[kind]


def faithfulness(model: Any, clean: Any, corrupt: Any, metric_fn: MetricFn, circuit: Sequence[tuple],
                 config: FaithfulnessConfig = FaithfulnessConfig(), *, mean_tokens: Any = None) -> FaithfulnessResult:
    """How much of the clean-to-corrupt metric gap `circuit` recovers when every other edge is
    ablated (exactly, forward only) in the clean run: its writers replaced by the corrupted run's
    outputs, or by their mean over `mean_tokens` ([n seq] token ids; config.ablation="mean").
    `circuit` holds (writer, reader) pairs or `top_edges`' triples; one clean/corrupt pair."""
    clean_t, corrupt_t = _validate_pair(model, clean, corrupt, "faithfulness", "Faithfulness")
    if clean_t.shape[0] != 1:
        raise ValueError("faithfulness measures one clean/corrupt pair at a time, since the metric reads a single "
                         f"example; got {clean_t.shape[0]} pairs. Loop over pairs and aggregate the recovered "
                         "fractions yourself.")
    if config.ablation == "mean":
        if mean_tokens is None:
            raise ValueError("mean ablation requires independent calibration via mean_tokens")
        mt = to_numpy(mean_tokens)
        if mt.ndim != 2:
            raise ValueError("mean_tokens must be a 2D [n_calibration, seq] token tensor")
        if mt.shape[0] == 0:
            raise ValueError("mean_tokens must contain at least one calibration example")
        if mt.shape[1] != clean_t.shape[1]:
            raise ValueError("mean_tokens must have the same sequence length as the evaluated pair")
        if not np.issubdtype(mt.dtype, np.integer):
            raise ValueError(f"mean_tokens must contain integer token ids, got dtype {mt.dtype}")
        if (mt == np.asarray(clean_t)).all(1).any() or (mt == np.asarray(corrupt_t)).all(1).any():
            raise ValueError("mean_tokens must not contain either evaluated clean/corrupt endpoint")
    elif mean_tokens is not None:
        raise ValueError("mean_tokens is only accepted with mean ablation")
    _check_edge_model(model.cfg)
    kept = _normalize_circuit(circuit)
    cfg, n_layers = _edge_cfg(model.cfg), int(model.cfg.n_layers)
    writers = _writer_hook_names(n_layers)
    attn_out = [f"blocks.{l}.hook_attn_out" for l in range(n_layers)]
    corrupt_metric, corrupt_acts, _ = _run(model, cfg, corrupt_t, metric_fn, writers + attn_out)
    _check_head_sum(corrupt_acts, n_layers)
    n_heads, seq = int(cfg.n_heads), int(clean_t.shape[1])
    graph = _graph(n_layers, n_heads, seq, bool(cfg.parallel_attn_mlp))
    w_idx, r_idx = _layout_index(_writer_layout(n_layers), n_heads), _layout_index(_reader_layout(n_layers), n_heads)
    in_graph = np.zeros((seq, len(w_idx), len(r_idx)), np.float32)  # [pos writer reader]: the graph's edges
    for r, ws in graph:
        in_graph[r.position, [w_idx[(w.kind, w.layer, w.head)] for w in ws], r_idx[(r.kind, r.layer, r.head)]] = 1.0

    def cell(edge: tuple[Any, Any]) -> tuple[int, int, int] | None:
        """The edge's [pos writer reader] cell, or None when it is not an edge of this graph."""
        w, r = edge
        if not (isinstance(w, Node) and isinstance(r, Node)) or w.position != r.position or not 0 <= w.position < seq:
            return None
        at = (w.position, w_idx.get((w.kind, w.layer, w.head)), r_idx.get((r.kind, r.layer, r.head)))
        return at if None not in at and in_graph[at] else None

    unknown = [e for e in kept if cell(e) is None]
    if unknown:
        raise ValueError(f"circuit holds {len(unknown)} edge(s) that are not in the graph, starting with {unknown[0]}; "
                         "a stale or mistyped circuit would otherwise ablate nothing.")
    if config.ablation == "mean":
        _, mean_acts, _ = _run(model, cfg, _tokens(model, mt, "faithfulness"), None, writers)
        replacement = jnp.mean(_stack(mean_acts, _writer_layout(n_layers)), axis=0, keepdims=True)
    else:
        replacement = _stack(corrupt_acts, _writer_layout(n_layers))
    clean_metric, clean_acts, _ = _run(model, cfg, clean_t, metric_fn, writers)
    clean_metric, corrupt_metric = float(clean_metric), float(corrupt_metric)
    gap = clean_metric - corrupt_metric
    if gap == 0.0:
        raise ValueError("the clean and corrupt runs produce the same metric, so the recovered fraction is undefined; "
                         "choose a pair the metric separates.")
    clean_writers = _stack(clean_acts, _writer_layout(n_layers))

    def ablated(keep: Collection[tuple[Node, Node]]) -> float:
        excluded = in_graph.copy()
        for edge in keep:
            excluded[cell(edge)] = 0.0
        live = clean_writers
        for _ in range(2 * n_layers + 1):  # the k-th writer stage (heads 0, MLP 0, heads 1, ...) is final after k passes
            deltas = _split(_delta(excluded, replacement, live), _reader_layout(n_layers), n_heads)
            hooks = Hooks(((frozenset(deltas), Perturb(deltas)),))
            value, acts, _ = _run(model, cfg, clean_t, metric_fn, writers, extra=hooks)
            new = _stack(acts, _writer_layout(n_layers))
            if bool(jnp.all(new == live)):
                break
            live = new
        return float(value)

    ablated_metric = ablated(kept)
    recovered = (ablated_metric - corrupt_metric) / gap
    counts: dict[EdgeClass, int] = {}
    for r, ws in graph:
        c = _edge_class((ws[0], r))
        counts[c] = counts.get(c, 0) + len(ws)
    kept_classes = {_edge_class(e) for e in kept}
    by_class = {c: (recovered if c not in kept_classes else
                    (ablated([e for e in kept if _edge_class(e) != c]) - corrupt_metric) / gap) for c in counts}
    return FaithfulnessResult(recovered=recovered, full_metric=clean_metric, corrupt_metric=corrupt_metric,
                              circuit_size=len(kept), total_edges=int(in_graph.sum()), edge_class_recovered=by_class,
                              edge_class_counts=counts)


@jax.jit
def _delta(excluded: jax.Array, replacement: jax.Array, live: jax.Array) -> jax.Array:
    """[1 pos reader d]: per reader, the sum over its ablated writers of (replacement - live)."""
    return jnp.einsum("pwr,pwd->prd", excluded, (replacement - live)[0].astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)[None]

