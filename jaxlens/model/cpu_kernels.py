"""CPU kernels for a few activation rows times a weight: faster decoding on CPU than XLA's dots.

Two XLA:CPU gaps, one kernel each (`cpu_kernels.cc`), both called through the XLA FFI on XLA's
intra-op threads:

- **One row times a bf16 weight.** XLA:CPU's one-row bf16 dot is a scalar loop, and its native
  bf16 dot (from two rows up) reads about half the bytes per second of its one-row f32 dot, so bf16
  weights, half the bytes, decoded slower than f32 ones. The kernel reads the bf16 weight where it
  lies, widens it in registers and accumulates in f32 (the exact products, f32 sums, as
  `preferred_element_type=float32` asks).
- **2 to 8 rows times an f32 or bf16 weight** (batched decoding: one new token per row).
  XLA:CPU's few-row dots read the weight at a quarter to a half of the memory bandwidth (its
  one-row f32 dot reads at the bandwidth); the kernel streams each weight row once, contiguously,
  for all the rows (a bf16 weight widened in registers), and sums in f32 in another order than
  XLA's (results equal to f32 rounding).

They are built on first use with the C++ compiler of the machine that runs them (`$CXX`, else g++,
c++ or clang++; `-march=native`), into `~/.cache/jaxlens/kernels` (`$XDG_CACHE_HOME` honoured),
keyed by the source, jaxlib's version and this CPU, so a home folder shared by different machines
never loads a build for another CPU. Without a compiler, or with `JAXLENS_CPU_KERNELS=0`, XLA's
dots run instead: the same results up to f32 summation order, only slower.
`layers.weight_einsum` is the one caller; `status()` says whether the kernels are in use and why
not.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

from jaxlens.compile_cache import OFF_VALUES, user_cache_root

__all__ = ["ENV", "TARGET", "F32_TARGET", "BF16_ROWS_TARGET", "MAX_ROWS", "MatVecPlan", "available", "kernel_einsum", "library_path",
           "matvec_plan", "status"]

log = logging.getLogger(__name__)
ENV = "JAXLENS_CPU_KERNELS"
TARGET = "jaxlens_bf16_matvec"  # one row times a bf16 weight
F32_TARGET = "jaxlens_f32_rows"  # 2..MAX_ROWS rows times an f32 weight
BF16_ROWS_TARGET = "jaxlens_bf16_rows"  # 2..MAX_ROWS rows times a bf16 weight
MAX_ROWS = 8  # the rows one pass over the weight serves (more would read the weight again)
_SOURCE = Path(__file__).with_name("cpu_kernels.cc")
_lock = threading.Lock()
_state: dict = {}  # "ok": bool, "why": str, "lib": the loaded library (kept alive)


def _cpu_signature() -> str:
    """This CPU's model and feature flags (what -march=native compiles for)."""
    parts = [platform.machine(), platform.processor()]
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags", "Features", "CPU part")):
                parts.append(line)
            if not line.strip() and len(parts) > 2:
                break  # the first processor's entry
    except OSError:
        pass
    return "\n".join(parts)


def _compiler() -> str | None:
    return os.environ.get("CXX") or next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)


def library_path(cxx: str) -> Path:
    """Where the build for this source, jaxlib, compiler and CPU lives (a new key for any of them)."""
    key = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), jaxlib.__version__.encode(), cxx.encode(), _cpu_signature().encode()):
        key.update(len(part).to_bytes(8, "little") + part)
    return user_cache_root() / "kernels" / f"cpu_kernels-{key.hexdigest()[:20]}.so"


def _build() -> Path:
    """Compile the kernels (once per source, jaxlib and CPU) and return the shared library's path."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (set $CXX, or install g++)")
    lib = library_path(cxx)
    if lib.exists():
        return lib
    folder = lib.parent
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    base = [cxx, "-std=c++17", "-O3", "-fPIC", "-shared", "-I", jax.ffi.include_dir(), str(_SOURCE)]
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        for flags in (["-march=native"], []):  # some compilers (Apple clang on arm64) refuse -march=native
            run = subprocess.run([*base, *flags, "-o", tmp], capture_output=True, text=True, timeout=300)
            if run.returncode == 0:
                os.replace(tmp, lib)  # atomic: a concurrent build of the same key writes the same file
                return lib
        raise RuntimeError(f"{cxx} failed: {run.stderr.strip()[-500:]}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def status() -> str:
    """'ok', or why the kernels are not in use (off by env, not a CPU, a failed build: the reason)."""
    if os.environ.get(ENV, "").strip().lower() in OFF_VALUES:
        return f"off (${ENV}={os.environ[ENV]})"
    with _lock:
        if not _state:
            try:
                path = _build()
                handle = ctypes.cdll.LoadLibrary(str(path))
                jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handle.JaxlensBf16MatVec), platform="cpu")
                jax.ffi.register_ffi_target(F32_TARGET, jax.ffi.pycapsule(handle.JaxlensF32Rows), platform="cpu")
                jax.ffi.register_ffi_target(BF16_ROWS_TARGET, jax.ffi.pycapsule(handle.JaxlensBf16Rows), platform="cpu")
                _state.update(ok=True, why="ok", lib=handle)
            except Exception as e:  # noqa: BLE001 - any failure means the XLA path, said once
                _state.update(ok=False, why=f"not built: {e}")
                log.info("jaxlens CPU kernels unavailable, using XLA's dots: %s", e)
        return _state["why"]


def available() -> bool:
    """Whether the kernels are built and registered (built on the first call)."""
    return status() == "ok"


@dataclass(frozen=True)
class MatVecPlan:
    """How an einsum maps onto the kernel: x as [rows, K]; W as [G, K, N] or, trans, [N, K]."""

    rows: int
    K: int
    G: int
    N: int
    trans: bool
    out_shape: tuple[int, ...]


def matvec_plan(spec: str, x_shape: tuple[int, ...], w_shape: tuple[int, ...]) -> MatVecPlan | None:
    """The kernel's view of `einsum(spec, x, W)`, or None when the einsum is not a plain matrix
    product with the contracted axes trailing in x and contiguous in W (a batch axis, an axis
    order the output permutes, a repeated or summed-away axis)."""
    (xs, ws), out = spec.replace(" ", "").split("->")[0].split(","), spec.replace(" ", "").split("->")[1]
    if len(set(xs)) != len(xs) or len(set(ws)) != len(ws) or len(xs) != len(x_shape) or len(ws) != len(w_shape):
        return None
    contracted = "".join(a for a in xs if a in ws)
    if not contracted or any(a in out for a in contracted) or not xs.endswith(contracted) or contracted not in ws:
        return None
    free_x = xs[: len(xs) - len(contracted)]
    i = ws.index(contracted)
    lead, tail = ws[:i], ws[i + len(contracted):]
    size = dict(zip(xs, x_shape)) | dict(zip(ws, w_shape))
    if out != free_x + lead + tail or not (lead or tail):
        return None
    n = lambda axes: math.prod(size[a] for a in axes)  # noqa: E731
    out_shape = tuple(size[a] for a in out)
    if tail:  # W [G.., K.., N..]
        return MatVecPlan(n(free_x), n(contracted), n(lead), n(tail), False, out_shape)
    return MatVecPlan(n(free_x), n(contracted), 1, n(lead), True, out_shape)  # W [N.., K..]


def _xla_einsum(spec: str, x: jax.Array, W: jax.Array) -> jax.Array:
    return jnp.einsum(spec, x, W, preferred_element_type=jnp.float32)


def _kernel_call(spec: str, x: jax.Array, W: jax.Array) -> jax.Array:
    p = matvec_plan(spec, x.shape, W.shape)
    w = W.reshape(p.N, p.K) if p.trans else W.reshape(p.G, p.K, p.N)
    y_shape = (p.rows, p.N) if p.trans else (p.rows, p.G, p.N)
    if W.dtype == jnp.float32:
        target = F32_TARGET
    else:
        target = TARGET if p.rows == 1 else BF16_ROWS_TARGET
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(y_shape, jnp.float32))
    return call(x.reshape(p.rows, p.K).astype(jnp.float32), w, trans=p.trans).reshape(p.out_shape)


def _unbatched(spec: str):
    """The kernel call, with a vmap rule that runs XLA's batched product instead (under vmap the
    rows multiply, or the weight gains an axis: not the one-row case the kernel is for)."""

    @jax.custom_batching.custom_vmap
    def f(x, W):
        return _kernel_call(spec, x, W)

    @f.def_vmap
    def _rule(axis_size, in_batched, x, W):
        axes = tuple(0 if b else None for b in in_batched)
        return jax.vmap(partial(_xla_einsum, spec), in_axes=axes)(x, W), True

    return f


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def kernel_einsum(spec: str, x: jax.Array, W: jax.Array) -> jax.Array:
    """`einsum(spec, x, W)` in float32 through a kernel: a bf16 W and up to `MAX_ROWS` rows, or an
    f32 W and 2 to `MAX_ROWS` rows, with a `matvec_plan`-able spec (check `available()` and the
    plan first). Differentiable (the tangents go through XLA's einsum) and vmappable (XLA's
    batched einsum)."""
    return _unbatched(spec)(x, W)


@kernel_einsum.defjvp
def _kernel_einsum_jvp(spec, primals, tangents):
    x, W = primals
    dx, dW = tangents
    return kernel_einsum(spec, x, W), _xla_einsum(spec, dx, W) + _xla_einsum(spec, x, dW)
