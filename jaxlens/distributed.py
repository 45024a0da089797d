"""Many devices through JAX's own SPMD: meshes from spec strings, parameter shardings, batch padding.

A mesh has up to three named axes (any subset, any order):

- `data`: the batch is split over it; parameters are replicated along it.
- `model`: tensor parallel, Megatron style. Attention is split by heads (W_Q/W_K/W_V along their
  head axis, W_O along its head axis), the MLP along d_mlp (W_in/W_gate columns, W_out rows),
  embedding and unembedding along the vocabulary. Grouped-query K/V with fewer heads than the
  axis are replicated.
- `fsdp`: parameters are split along d_model (XLA gathers each layer's weights where it uses
  them) and the batch is split over it too.

Nothing here runs a collective by hand: parameters are placed with `NamedSharding`, the jitted
forward is compiled by GSPMD, and every result is the single-device result.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxlens.config import ModelConfig

AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both


def parse_mesh_spec(spec: str, n_devices: int) -> dict[str, int]:
    """`"data=2,model=4"` -> {"data": 2, "model": 4}; one axis may be -1 (all remaining devices)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"mesh spec must be a string such as 'data=2,model=4', got {spec!r}")
    sizes: dict[str, int] = {}
    for part in spec.split(","):
        name, eq, size = part.strip().partition("=")
        if not eq or name not in AXES:
            raise ValueError(f"mesh spec {spec!r}: {part.strip()!r} must be axis=size with axis one of {AXES}")
        if name in sizes:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} given twice")
        try:
            sizes[name] = int(size)
        except ValueError:
            raise ValueError(f"mesh spec {spec!r}: size {size!r} of {name!r} is not an int") from None
        if sizes[name] == 0 or sizes[name] < -1:
            raise ValueError(f"mesh spec {spec!r}: size of {name!r} must be positive (or -1 for the rest)")
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"mesh spec {spec!r}: only one axis may be -1")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if n_devices % fixed:
            raise ValueError(f"mesh spec {spec!r}: {n_devices} devices do not divide by the fixed axes' {fixed}")
        sizes[free[0]] = n_devices // fixed
    total = math.prod(sizes.values())
    if total > n_devices:
        raise ValueError(f"mesh spec {spec!r} needs {total} devices but only {n_devices} exist "
                         f"({jax.devices()[0].platform}); for simulated CPU devices set "
                         "XLA_FLAGS=--xla_force_host_platform_device_count=N before jax starts")
    return sizes


def make_mesh(spec: str | Mesh, devices: Sequence[Any] | None = None) -> Mesh:
    """A `Mesh` from a spec string (`"data=2,model=4"`, `"fsdp=8"`, `"data=-1"`) or a Mesh as is.

    Uses the first prod(sizes) devices. Axes are `Auto` (GSPMD decides the collectives), which
    `nn.Embed`-style gathers need (`jax.make_mesh` would default to explicit axes)."""
    if isinstance(spec, Mesh):
        bad = [a for a in spec.axis_names if a not in AXES]
        if bad:
            raise ValueError(f"mesh axes {bad} are not jaxlens axes {AXES}; name the mesh axes data/fsdp/model")
        return spec
    devs = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devs))
    n = math.prod(sizes.values())
    return Mesh(np.array(devs[:n]).reshape(tuple(sizes.values())), tuple(sizes))


def axis_size(mesh: Mesh, axis: str) -> int:
    return int(mesh.shape.get(axis, 1))


def batch_multiple(mesh: Mesh) -> int:
    """The batch must be a multiple of this (the product of the batch axes)."""
    return math.prod(axis_size(mesh, a) for a in BATCH_AXES)


def check_fits(cfg: ModelConfig, mesh: Mesh) -> None:
    """A mesh whose model axis does not divide the heads (or fsdp the width) is an error naming both."""
    m, f = axis_size(mesh, "model"), axis_size(mesh, "fsdp")
    if cfg.n_heads % m:
        raise ValueError(f"mesh axis model={m} does not divide n_heads={cfg.n_heads}: use a model axis that divides it")
    if cfg.d_model % f:
        raise ValueError(f"mesh axis fsdp={f} does not divide d_model={cfg.d_model}: use an fsdp axis that divides it")


def _axis_if(mesh: Mesh, axis: str, dim: int) -> str | None:
    """`axis` when it is in the mesh, larger than 1, and divides `dim`; else None (replicated)."""
    size = axis_size(mesh, axis)
    return axis if size > 1 and dim % size == 0 else None


def param_spec(path: tuple[str, ...], shape: tuple[int, ...], cfg: ModelConfig, mesh: Mesh) -> P:
    """The PartitionSpec of one parameter, from its name and shape (layer-stacked params have a
    leading layer axis, never split). Dimensions an axis does not divide are replicated."""
    name = path[-1]
    where = path[-2] if len(path) > 1 else ""
    lead = (None,) if path and path[0] == "blocks" else ()  # scanned: [layer, ...]
    core = shape[len(lead):]
    M = lambda d: _axis_if(mesh, "model", d)  # noqa: E731
    F = lambda d: _axis_if(mesh, "fsdp", d)  # noqa: E731
    spec: tuple[str | None, ...]
    if name == "W_E":  # [vocab d_model]
        spec = (M(core[0]), F(core[1]))
    elif name == "W_pos":  # [n_ctx d_model]
        spec = (None, F(core[1]))
    elif name == "W_U":  # [d_model vocab]
        spec = (F(core[0]), M(core[1]))
    elif name == "b_U":
        spec = (M(core[0]),)
    elif where == "attn" and name in ("W_Q", "W_K", "W_V"):  # [head d_model d_head]
        spec = (M(core[0]), F(core[1]), None)
    elif where == "attn" and name in ("b_Q", "b_K", "b_V"):  # [head d_head]
        spec = (M(core[0]), None)
    elif where == "attn" and name == "W_O":  # [head d_head d_model]
        spec = (M(core[0]), None, F(core[2]))
    elif name in ("W_in", "W_gate") and len(core) == 2:  # [d_model d_mlp]
        spec = (F(core[0]), M(core[1]))
    elif name in ("b_in", "b_gate") and len(core) == 1:
        spec = (M(core[0]),)
    elif name == "W_out" and len(core) == 2:  # [d_mlp d_model]
        spec = (M(core[0]), F(core[1]))
    elif name in ("W_in", "W_gate") and len(core) == 3:  # MoE experts [expert d_model d_mlp]
        spec = (None, F(core[1]), M(core[2]))
    elif name == "W_out" and len(core) == 3:  # MoE experts [expert d_mlp d_model]
        spec = (None, M(core[1]), F(core[2]))
    else:  # norms, output biases, routers: small, replicated
        spec = (None,) * len(core)
    return P(*lead, *spec)


def param_shardings(params: Any, cfg: ModelConfig, mesh: Mesh) -> Any:
    """A tree of `NamedSharding`s matching `params` (unrolled or scanned layout)."""
    check_fits(cfg, mesh)

    def one(path, leaf):
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        return NamedSharding(mesh, param_spec(keys, tuple(np.shape(leaf)), cfg, mesh))

    return jax.tree_util.tree_map_with_path(one, params)


def _index_key(idx: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    return tuple(s.indices(d)[:2] for s, d in zip(idx, shape))


def place(x: Any, sharding: NamedSharding) -> jax.Array:
    """A global array with `sharding` from a host array every process holds, or from a lazy one
    (anything with `shape`, `dtype` and `read(index)`, such as `jaxlens.conversion.lazy.LazyArray`):
    each device gets only its slice (`jax.make_array_from_callback`, so it also works across
    hosts). A lazy array is read once per distinct slice this process's devices hold, so the host
    holds at most this one array's slices, never the rest of the model."""
    if isinstance(x, jax.Array):  # already on devices: JAX moves the slices
        return jax.device_put(x, sharding)
    if hasattr(x, "read") and hasattr(x, "shape"):
        shape = tuple(x.shape)
        blocks: dict[Any, np.ndarray] = {}
        for idx in sharding.addressable_devices_indices_map(shape).values():
            key = _index_key(idx, shape)
            if key not in blocks:
                blocks[key] = np.asarray(x.read(tuple(slice(a, b) for a, b in key)))
        return jax.make_array_from_callback(shape, sharding, lambda idx: blocks[_index_key(idx, shape)])
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def shard_params(params: Any, cfg: ModelConfig, mesh: Mesh) -> Any:
    """Place every parameter on the mesh with its sharding (each device gets only its slice); one
    leaf at a time, so lazy leaves are read one by one."""
    return jax.tree.map(place, params, param_shardings(params, cfg, mesh))


def _placed_program(fn: Callable[[Any], tuple[Any, ModelConfig]], example: Any,
                    mesh: Mesh) -> tuple[Callable[[Any], Any], ModelConfig]:
    """`fn(x) -> (new params, new cfg)` as one jitted program: outputs placed by the parameter
    rules for the new cfg, `x` donated, matmuls at float32 precision. Returns (program, new cfg);
    the program is traced for `example`'s shapes."""
    box: list[ModelConfig] = []

    def arrays(x: Any) -> Any:
        with jax.default_matmul_precision("float32"):
            out, cfg = fn(x)
        box[:] = [cfg]
        return out

    shapes = jax.eval_shape(arrays, example)
    program = jax.jit(arrays, out_shardings=param_shardings(shapes, box[0], mesh), donate_argnums=0)

    def run(x: Any) -> Any:
        with warnings.catch_warnings():  # a buffer XLA cannot reuse is simply not reused
            warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
            return program(x)

    return run, box[0]


def transform_sharded(fn: Callable[[Any], tuple[Any, ModelConfig]], params: Any,
                      mesh: Mesh) -> tuple[Any, ModelConfig]:
    """`fn(params) -> (new params, new cfg)` run on the mesh: one jit-compiled program whose outputs
    are placed by the parameter rules (`param_shardings` for the new cfg) and whose inputs are
    donated, so a sharded model is transformed (layer stacking, a scanned model's processing)
    without being gathered on one device or on the host. Matmuls inside run at float32
    precision, as the host path computes them."""
    program, cfg = _placed_program(fn, params, mesh)
    return program(params), cfg


def process_sharded(params: dict[str, Any], cfg: ModelConfig, mesh: Mesh,
                    **flags: bool) -> tuple[dict[str, Any], ModelConfig]:
    """TransformerLens's weight processing (`process_params(**flags)`) of an unrolled model on the
    mesh, one part at a time: every step of it reads and writes one block (ln1/ln2 folding,
    centring, value biases) or only the embeddings and unembedding. So one compiled program
    processes the rest first, then another each block in turn (buffers donated). Leaves not yet
    on the mesh (lazy or host arrays) are placed (`shard_params`) just before their part's program:
    the unembedding's temporaries then come and go before the blocks are read, and each block is
    processed as it arrives, so the peak is the model plus one part's temporaries, not a second
    model. A scanned model (stacked blocks) is placed whole and goes through `transform_sharded`."""
    from jaxlens.model.forward import is_scanned
    from jaxlens.model.processing import process_params

    if is_scanned(params):
        return transform_sharded(lambda p: process_params(p, cfg, **flags), shard_params(params, cfg, mesh), mesh)
    blocks = [f"blocks_{l}" for l in range(cfg.n_layers)]
    rest = shard_params({k: v for k, v in params.items() if k not in blocks}, cfg, mesh)
    one = cfg.replace(n_layers=1, attn_types=None if cfg.attn_types is None else cfg.attn_types[:1])
    zeros = lambda tree: jax.tree.map(lambda x: jax.numpy.zeros(x.shape, x.dtype), tree)  # noqa: E731
    block_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype), params[blocks[0]])

    def block(b: dict[str, Any]) -> tuple[Any, ModelConfig]:  # {"blocks_0": ...}; the rest only shapes the tree (DCE)
        out, c = process_params({**zeros(rest), **b}, one, **flags)
        return {"blocks_0": out["blocks_0"]}, c

    def others(r: Any) -> tuple[Any, ModelConfig]:
        out, c = process_params({**r, "blocks_0": zeros(block_shapes)}, one, **flags)
        return {k: v for k, v in out.items() if k != "blocks_0"}, c

    rest_program, new = _placed_program(others, rest, mesh)
    out = jax.block_until_ready(rest_program(rest))
    release_host_memory()  # the unembedding's temporaries and the compiler's memory, before the blocks come
    per_block = None
    for name in blocks:
        b = shard_params({"blocks_0": params[name]}, one, mesh)  # read now, processed at once
        if per_block is None:
            per_block, _ = _placed_program(block, b, mesh)
        out[name] = jax.block_until_ready(per_block(b)["blocks_0"])
        release_host_memory()
    return out, new.replace(n_layers=cfg.n_layers, attn_types=cfg.attn_types)


def release_host_memory() -> None:
    """Hand the host memory freed so far back to the OS (glibc's `malloc_trim`; a no-op elsewhere).

    XLA compiles and runs programs on its own threads, whose malloc arenas keep what a program
    freed (temporaries, the compiler's working memory) where the main thread, reading the next
    parameters, does not reuse it. Measured on the 1 GB model of `benchmarks/scale.py`: peak
    +1159 MiB without it, +1077 with it (bound: model + largest tensor, 1095)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        return
    if trim is not None:
        trim(0)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Split axis 0 (the batch) over the mesh's batch axes; the rest replicated."""
    axes = tuple(a for a in BATCH_AXES if axis_size(mesh, a) > 1)
    return NamedSharding(mesh, P(axes if axes else None, *([None] * (ndim - 1))))


def pad_batch(x: np.ndarray, multiple: int, fill: int = 0) -> tuple[np.ndarray, int]:
    """Pad axis 0 up to a multiple (rows of `fill`); returns (padded, the real batch size)."""
    b = int(np.shape(x)[0])
    extra = (-b) % multiple
    if not extra:
        return x, b
    pad = np.full((extra, *np.shape(x)[1:]), fill, dtype=np.asarray(x).dtype)
    return np.concatenate([np.asarray(x), pad]), b


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, **kw: Any) -> None:
    """`jax.distributed.initialize` with jaxlens's defaults: on CPU, gloo collectives (so several
    local processes form one mesh); on TPU pods and SLURM/GPU clusters the arguments can be
    omitted (JAX reads them from the environment). Call before anything touches a device."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU only; GPU/TPU use their own
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **kw)


__all__ = ["AXES", "BATCH_AXES", "parse_mesh_spec", "make_mesh", "axis_size", "batch_multiple", "check_fits",
           "param_spec", "param_shardings", "place", "shard_params", "transform_sharded", "batch_sharding", "pad_batch",
           "initialize"]
