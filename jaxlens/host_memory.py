"""Host memory on CPU: keep the pages that freed arrays leave, so the next call reuses them.

Every call of a compiled program allocates its outputs and temporaries afresh, and glibc's malloc
gives large blocks back to the kernel when they are freed (`mmap`/`munmap` above a threshold,
`trim` at the top of the heap, one heap per thread arena). The next call then takes a page fault
on the first touch of every 4 KiB page it writes. An all-hooks `run_with_cache` of the GPT-2-small
shape at 8×128 returns 1 GiB: ~190,000 faults a call, a fifth of its time on a 2-core VM.
`retain_freed_memory()` asks glibc to keep freed memory for reuse instead (one arena, no trim,
`mmap` only above 1 GiB): the same run takes no faults after its first call.

The cost: a process's resident memory stays at its peak instead of falling after a large run.
This changes the whole process's allocator, so importing jaxlens does not do it; the `jaxlens`
CLI and the benchmarks (both sides of every comparison) do, and library users decide:

    import jaxlens.host_memory
    jaxlens.host_memory.retain_freed_memory()   # first thing: the arena limit binds threads started later

`JAXLENS_RETAIN_MEMORY=0` (or off, false, no) turns it off wherever it is called. Other C
libraries (musl, macOS) are left as they are: the call returns False. This module imports
nothing of jax, so a process that never runs jax (a benchmark's torch side) can use it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import warnings

__all__ = ["ENV", "OFF_VALUES", "SETTINGS", "retain_freed_memory", "retained"]

ENV = "JAXLENS_RETAIN_MEMORY"
# The values of a jaxlens env switch that turn its process setting off (this one, the compile
# cache's, the CPU kernels'). Defined here, the one module of them that imports nothing of jaxlens.
OFF_VALUES = frozenset({"0", "off", "false", "no", "none", "disable", "disabled"})
# The values set: one arena, so a worker thread's frees go back to the heap every thread reuses;
# never trim the heap's top; mmap only above 1 GiB. With glibc's mallopt codes (malloc.h's M_*).
SETTINGS = {"arena_max": 1, "trim_threshold": 2**31 - 1, "mmap_threshold": 2**30, "top_pad": 64 << 20}
_CODES = {"arena_max": -8, "trim_threshold": -1, "mmap_threshold": -3, "top_pad": -2}
_applied = False


def _glibc() -> ctypes.CDLL | None:
    """This process's C library when it is glibc (it has `mallopt` and `gnu_get_libc_version`), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: musl and macOS lack it)
        libc.mallopt
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return libc


def retain_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory for reuse (`SETTINGS`); True when it is set.

    False, changing nothing, when `$JAXLENS_RETAIN_MEMORY` turns it off or the C library is not
    glibc. Idempotent. Call it before the work starts: threads that already allocated keep the
    arena they have (their frees still stay in the process: no trim, no munmap)."""
    global _applied
    if os.environ.get(ENV, "").strip().lower() in OFF_VALUES:
        return False
    if _applied:
        return True
    libc = _glibc()
    if libc is None:
        return False
    refused = [f"{name}={value}" for name, value in SETTINGS.items() if libc.mallopt(_CODES[name], value) != 1]
    if refused:  # speed only: say so, and go on with what this glibc took
        warnings.warn(f"glibc's mallopt refused {', '.join(refused)}: freed memory is only partly retained "
                      f"(set {ENV}=0 to leave malloc as it is)", RuntimeWarning, stacklevel=2)
        return False
    _applied = True
    return True


def retained() -> bool:
    """Whether `retain_freed_memory()` has set this process's malloc."""
    return _applied
