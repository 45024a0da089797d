"""JAX's persistent compilation cache for jaxlens: compile a program once, reuse it across runs.

`jaxlens.compile_cache.enable()` points JAX's persistent cache at a folder and lowers its
thresholds so that small CPU programs are kept too (JAX's defaults keep only programs that took
more than a second to compile). The `jaxlens` CLI calls it first thing; importing the library
does not, so library users decide:

    import jaxlens.compile_cache
    jaxlens.compile_cache.enable()            # ~/.cache/jaxlens/xla, or $JAXLENS_COMPILE_CACHE
    jaxlens.compile_cache.enable("/scratch/xla")

The folder is `$JAXLENS_COMPILE_CACHE` if set, else `$XDG_CACHE_HOME/jaxlens/xla`, else
`~/.cache/jaxlens/xla`; `JAXLENS_COMPILE_CACHE=0` (or `off`, `false`, `no`) turns it off.

Why a cached program never stands in for a different computation: JAX keys every entry by a
hash of the lowered program itself (the StableHLO module, with every constant baked into it),
the compile options and device assignment, the backend and device kind, the XLA flags, and the
jax/jaxlib versions. jaxlens's hooks, edits, names filters, shapes, dtypes and precision all
change that program, so a change in any of them is a different key. The one thing a program
cannot carry is a host callback (`jax.debug.print`, `pure_callback`): JAX never writes those
programs to the persistent cache, so they are always compiled afresh. The folder is trusted
code (an entry is an executable): it is created private to the user (mode 0700); do not point
it at a folder others can write.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from jaxlens.host_memory import OFF_VALUES  # the one set of "off" values of jaxlens's env switches

__all__ = ["ENV", "OFF_VALUES", "cache_dir", "enable", "disable", "user_cache_root"]

ENV = "JAXLENS_COMPILE_CACHE"


def cache_dir(path: str | os.PathLike[str] | None = None) -> Path | None:
    """The cache folder `enable(path)` would use, or None when `$JAXLENS_COMPILE_CACHE` turns it off.

    An explicit `path` wins; then `$JAXLENS_COMPILE_CACHE` (a folder, or 0/off); then
    `$XDG_CACHE_HOME/jaxlens/xla`; then `~/.cache/jaxlens/xla`."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get(ENV, "").strip()
    if env.lower() in OFF_VALUES:
        return None
    if env:
        return Path(env).expanduser()
    return user_cache_root() / "xla"


def user_cache_root() -> Path:
    """jaxlens's folder in the user's cache: `$XDG_CACHE_HOME/jaxlens`, else `~/.cache/jaxlens`."""
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
    return Path(base).expanduser() / "jaxlens"


def enable(path: str | os.PathLike[str] | None = None, *, warn: bool = False) -> Path | None:
    """Turn on JAX's persistent compilation cache in `cache_dir(path)`; returns the folder, or None
    when `$JAXLENS_COMPILE_CACHE=0` (or `off`) turns it off and no `path` is given.

    Every program is cached, however small or quick to compile (min compile time 0, min entry
    size unrestricted), because a CLI run of a small model compiles many sub-second programs
    whose sum is most of its wall time. Call it before the first compilation of the programs
    you want cached; calling it again with another folder moves the cache there. A folder that
    cannot be created is a clear OSError naming it and the way out; with `warn=True` (the CLI)
    that message goes to stderr instead and the run goes on without the cache."""
    folder = cache_dir(path)
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        msg = (f"cannot create the compilation cache folder {folder} ({e.strerror}); set {ENV}=DIR to a "
               f"writable folder, or {ENV}=0 to turn the cache off")
        if warn:
            print(f"jaxlens: warning: {msg}; running without it", file=sys.stderr)
            return None
        raise OSError(e.errno, msg) from None
    import jax
    from jax._src import compilation_cache as cc  # reset_cache: the only way to move an initialised cache

    if jax.config.jax_compilation_cache_dir not in (None, str(folder)):
        cc.reset_cache()
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no size threshold at all
    return folder


def disable() -> None:
    """Turn the persistent cache off again for this process (programs already loaded stay in memory)."""
    import jax
    from jax._src import compilation_cache as cc

    if jax.config.jax_compilation_cache_dir is not None:
        jax.config.update("jax_compilation_cache_dir", None)
        cc.reset_cache()
