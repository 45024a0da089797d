"""Atomic files and a bounded background writer.

Every file a sweep writes goes to a temporary name in the same folder, is fsynced, then renamed
over the final name (and the folder fsynced), so a file under its final name is always complete:
resume is "the final file exists". The writer thread overlaps fetching, trimming, compression and
writing with the device work of the next batches; its queue is bounded, so a slow disk holds the
device back instead of filling host memory.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import threading
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

__all__ = ["DiskFullError", "DEFLATE", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_savez",
           "atomic_save_npy", "npz_complete", "write_npz", "BoundedWriter"]

try:  # ISA-L's deflate: the same format as zlib's, ~10x faster on attention patterns at zlib -6's size
    from isal import isal_zlib as _isal
except ImportError:  # pragma: no cover - the `sweep` extra installs it
    _isal = None

# which deflate writes the npz files ("isal" or "zlib"): `pip install jaxlens[sweep]` for the fast one
DEFLATE = "isal" if _isal is not None else "zlib"
ISAL_LEVEL = 1  # ISA-L level 1: within 1% of np.savez_compressed's (zlib level 6) size on patterns
_ZLIB_COMPRESSOR = type(zlib.compressobj())  # what zipfile puts in a deflated entry

TMP_PREFIX = ".tmp-"


class DiskFullError(OSError):
    """The disk filled up mid-sweep; finished prompts are kept and a rerun resumes after space is freed."""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes | Callable[[Any], None]) -> Path:
    """Write `data` (bytes, or a function writing to a binary file object) to `path` atomically:
    temp file in the same folder, fsync, rename, fsync the folder. A full disk raises DiskFullError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TMP_PREFIX}{path.name}.{os.getpid()}.{threading.get_ident()}"
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(e.errno, f"disk full while writing {path}: free some space and rerun the same "
                                         "command; finished prompts are kept and will not be recomputed") from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`atomic_write_bytes` of UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """JSON with Python's default `json.dump` conventions (what pattern_lens writes), atomically."""
    return atomic_write_text(path, json.dumps(obj))


def write_npz(f: Any, arrays: Mapping[str, np.ndarray], compressed: bool = True) -> None:
    """The file `np.savez_compressed` (or `np.savez`) writes: a zip of `<key>.npy` entries (zip64
    entries, deflated), which `np.load` and pattern_lens read. Compressed entries are deflated by
    ISA-L when it is installed (`DEFLATE`), else by zlib as numpy does; zipfile still writes the
    headers, sizes and CRCs, only the entry's compressor object is ISA-L's."""
    method = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    with zipfile.ZipFile(f, mode="w", compression=method, allowZip64=True) as z:
        for key, a in arrays.items():
            with z.open(key + ".npy", mode="w", force_zip64=True) as entry:
                if compressed and _isal is not None and isinstance(getattr(entry, "_compressor", None),
                                                                    _ZLIB_COMPRESSOR):
                    entry._compressor = _isal.compressobj(ISAL_LEVEL, _isal.DEFLATED, -15)  # raw deflate, as zipfile
                np.lib.format.write_array(entry, np.asanyarray(a), allow_pickle=False)


def atomic_savez(path: str | Path, arrays: Mapping[str, np.ndarray], compressed: bool = True) -> Path:
    """`write_npz` (pattern_lens's `np.savez_compressed` format) to `path`, atomically."""
    return atomic_write_bytes(path, lambda f: write_npz(f, arrays, compressed))


def atomic_save_npy(path: str | Path, array: np.ndarray) -> Path:
    """`np.save` to `path`, atomically."""
    return atomic_write_bytes(path, lambda f: np.save(f, array))


def npz_complete(path: str | Path, keys: frozenset[str] | set[str] | None = None) -> bool:
    """Is `path` a readable npz holding (at least) `keys`? Reads only the zip's directory."""
    try:
        with zipfile.ZipFile(path) as z:
            names = {n[:-4] if n.endswith(".npy") else n for n in z.namelist()}
    except (OSError, zipfile.BadZipFile):
        return False
    return keys is None or set(keys) <= names


class BoundedWriter:
    """A background thread running submitted jobs in order, at most `max_pending` waiting.

    `submit` blocks while the queue is full (back-pressure). An exception in a job stops the
    writer; it is re-raised by the next `submit` or by `close`. `wait_s` totals the time
    `submit` spent blocked: the share of time the device waited on the writer.
    """

    def __init__(self, max_pending: int = 2):
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self._q: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self.wait_s = 0.0
        self._thread = threading.Thread(target=self._loop, name="jaxlens-sweep-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._q.get()
            try:
                if job is None:
                    return
                if self._error is None:
                    job()
            except BaseException as e:  # noqa: BLE001 (handed to the main thread)
                self._error = e
            finally:
                self._q.task_done()

    def _check(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def submit(self, job: Callable[[], None]) -> None:
        """Queue `job`; blocks while `max_pending` jobs wait."""
        import time

        self._check()
        t = time.perf_counter()
        self._q.put(job)
        self.wait_s += time.perf_counter() - t

    def close(self) -> None:
        """Finish every queued job, stop the thread, and raise the first job error if any."""
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()
        self._check()

    def __enter__(self) -> "BoundedWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()
        else:  # an error in the main thread: let queued writes finish, keep the original error
            try:
                self.close()
            except BaseException:  # noqa: BLE001
                pass
