"""Run a batch of jitted calls in order, their programs compiled ahead, several at a time.

A patching grid runs one program per (layer, window start), 36 for GPT-2's `resid_pre` grid,
and its first call is nearly all compilation. XLA compiles one program on about 1.5 cores (on a
2-core CPU), so compiling two at a time in threads ends the batch sooner. Only JAX's compilation
cache is warmed here: every call still runs in the caller's thread, in order, as it would have
without this (a call whose program differs from the one compiled ahead, say under a thread-local
config of the caller's, compiles its own), and an error while compiling ahead is dropped for the
call itself to raise.

Tracing and lowering hold one lock, in the workers and around each call: while a hook or metric is
traced, jaxlens swaps traced values into the very lists and dicts it closes over
(`fingerprint._InPlace`), which two threads must not do at once. Compilation, the slow part, runs
outside the lock.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax

from jaxlens.fingerprint import eager_active

__all__ = ["MAX_WORKERS", "TRACE_LOCK", "run_compiled_ahead"]

MAX_WORKERS = 4
"""Programs compiled at once at most (each compile takes its own memory; more rarely pays)."""

TRACE_LOCK = threading.RLock()
"""Held while a call is traced or lowered here (see the module docstring)."""

Call = tuple[tuple[Any, ...], dict[str, Any]]


def _workers(n_calls: int, workers: int | None) -> int:
    return min(n_calls, workers if workers is not None else min(MAX_WORKERS, os.cpu_count() or 1))


def run_compiled_ahead(fn: Callable[..., Any], calls: Sequence[Call], workers: int | None = None) -> list[Any]:
    """`[fn(*args, **kwargs) for args, kwargs in calls]`, in this thread and in order, while up to
    `workers` threads (default: the CPU count, at most `MAX_WORKERS`) lower and compile the
    programs of the calls still to come (`fn.lower(...).compile()`: `fn` is a jitted function, or a
    wrapper that exposes its `lower`). With one worker or one call, inside an eager run, or under
    `jax.disable_jit`, the calls simply run."""
    calls = list(calls)
    n = _workers(len(calls), workers)
    if n < 2 or eager_active() or jax.config.jax_disable_jit or not hasattr(fn, "lower"):
        return [fn(*args, **kwargs) for args, kwargs in calls]

    def compile_one(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        try:
            with TRACE_LOCK:
                lowered = fn.lower(*args, **kwargs)
            lowered.compile()
        except Exception:  # noqa: BLE001, S110 - the call itself raises it, with its own context
            pass

    out = []
    with ThreadPoolExecutor(n, thread_name_prefix="jaxlens-compile") as pool:
        ahead = [pool.submit(compile_one, args, kwargs) for args, kwargs in calls]
        try:
            for done, (args, kwargs) in zip(ahead, calls):
                done.result()
                with TRACE_LOCK:
                    out.append(fn(*args, **kwargs))
        finally:
            for f in ahead:
                f.cancel()
    return out
