"""`--store zarr`: every prompt's attention patterns in one chunked zarr v3 array (tensorstore),
for sweeps where millions of small files are unacceptable.

```
<save>/<model>/patterns.zarr/meta.json    model name, n_layers, n_heads, dtype, triangle
<save>/<model>/patterns.zarr/data/        zarr v3, 1-D, chunked: prompts' [L H S S] (or the causal
                                          lower triangle [L H S(S+1)/2]) values back to back
<save>/<model>/patterns.zarr/index.jsonl  one committed line per batch: {"next", "prompts": [[hash,
                                          offset, S, prompt record], ...]}
```

Resume: a batch counts only once its index line is complete (values first, then the line, fsynced).
A line torn by kill -9 is cut off when the store is next opened for writing, and its prompts are
recomputed; values past the last committed offset are simply overwritten.
`open_store(path)[hash]` gives one prompt's patterns as float32 `[1 H S S]` per layer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from jaxlens.sweep.writer import atomic_write_json

__all__ = ["STORE_DIR", "PatternStore", "open_store"]

STORE_DIR = "patterns.zarr"
CHUNK = 1 << 20  # elements per chunk (4 MiB of float32)


def _ts() -> Any:
    """tensorstore, imported when a store is used."""
    import tensorstore as ts

    return ts


def _tri(S: int) -> tuple[np.ndarray, np.ndarray]:
    return np.tril_indices(S)


class PatternStore:
    """One model's pattern store (see the module docstring). Open with `open_store` to read, or
    `PatternStore.create_or_open` to write."""

    def __init__(self, path: Path, meta: dict[str, Any], writable: bool = False):
        self.path, self.meta, self.writable = Path(path), meta, writable
        ts = _ts()
        self._data = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(self.path / "data")}},
                             open=True).result()
        self.index: dict[str, tuple[int, int, dict[str, Any]]] = {}
        self.next = 0
        self._load_index(truncate_torn=writable)

    @classmethod
    def create_or_open(cls, path: str | Path, model_name: str, n_layers: int, n_heads: int, dtype: str = "float32",
                       triangle: bool = False) -> "PatternStore":
        """Open the store for appending, creating it if absent; an existing store must agree on
        the layout (a different dtype or triangle setting raises instead of mixing)."""
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"store dtype must be float32 or bfloat16, got {dtype!r}")
        path = Path(path)
        meta = dict(format=1, model_name=model_name, n_layers=n_layers, n_heads=n_heads, dtype=dtype,
                    triangle=bool(triangle), chunk=CHUNK)
        if (path / "meta.json").is_file():
            old = json.loads((path / "meta.json").read_text())
            if {k: old.get(k) for k in meta} != meta:
                raise ValueError(f"the store {path} was written with {old}, not {meta}; use another --save-path or "
                                 "delete it (or pass the same --store-dtype / --store-triangle)")
        else:
            ts = _ts()
            ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / "data")}}, create=True,
                    delete_existing=True, dtype=ts.bfloat16 if dtype == "bfloat16" else ts.float32, shape=[CHUNK],
                    chunk_layout=ts.ChunkLayout(chunk_shape=[CHUNK])).result()
            atomic_write_json(path / "meta.json", meta)  # last: a store without meta.json is recreated
        return cls(path, meta, writable=True)

    def _load_index(self, truncate_torn: bool) -> None:
        f = self.path / "index.jsonl"
        if not f.is_file():
            return
        raw = f.read_bytes()
        good = 0
        for line in raw.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                break
            good += len(line)
            self.next = entry["next"]
            for h, off, S, rec in entry["prompts"]:
                self.index[h] = (off, S, rec)
        if truncate_torn and good < len(raw):
            with open(f, "r+b") as fh:
                fh.truncate(good)
                fh.flush()
                os.fsync(fh.fileno())

    def _size(self, S: int) -> int:
        per = S * (S + 1) // 2 if self.meta["triangle"] else S * S
        return self.meta["n_layers"] * self.meta["n_heads"] * per

    def append(self, items: list[tuple[str, np.ndarray, dict[str, Any]]]) -> None:
        """Add prompts: (hash, patterns [L H S S], prompt record). Values are written first, then
        one index line; only then do these prompts count as done."""
        if not self.writable:
            raise ValueError("this store was opened for reading; use PatternStore.create_or_open to write")
        flat, entries, off = [], [], self.next
        for h, pat, rec in items:
            L, H, S, S2 = pat.shape
            if (L, H) != (self.meta["n_layers"], self.meta["n_heads"]) or S != S2:
                raise ValueError(f"patterns of {h} have shape {pat.shape}, expected [{self.meta['n_layers']} "
                                 f"{self.meta['n_heads']} S S]")
            v = pat[:, :, _tri(S)[0], _tri(S)[1]] if self.meta["triangle"] else pat
            flat.append(v.reshape(-1))
            entries.append([h, off, S, rec])
            off += self._size(S)
        values = np.concatenate(flat).astype(self._data.dtype.numpy_dtype)
        need = off
        if need > self._data.shape[0]:
            new = max(need, 2 * self._data.shape[0])
            new = -(-new // CHUNK) * CHUNK
            self._data = self._data.resize(exclusive_max=[new], expand_only=True).result()
        self._data[self.next:off].write(values).result()
        line = (json.dumps(dict(next=off, prompts=entries)) + "\n").encode("utf-8")
        fd = os.open(self.path / "index.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.next = off
        for h, o, S, rec in entries:
            self.index[h] = (o, S, rec)

    def __contains__(self, h: object) -> bool:
        return h in self.index

    def __len__(self) -> int:
        return len(self.index)

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def keys(self) -> list[str]:
        return list(self.index)

    def record(self, h: str) -> dict[str, Any]:
        """The prompt.json-style record of a prompt."""
        return self.index[h][2]

    def __getitem__(self, h: str) -> dict[str, np.ndarray]:
        """One prompt's patterns: {"blocks.{l}.attn.hook_pattern": float32 [1 H S S]}."""
        if h not in self.index:
            raise KeyError(f"prompt {h!r} is not in the store {self.path} ({len(self)} prompts)")
        off, S, _ = self.index[h]
        L, H = self.meta["n_layers"], self.meta["n_heads"]
        v = np.asarray(self._data[off:off + self._size(S)].read().result()).astype(np.float32)
        if self.meta["triangle"]:
            full = np.zeros((L, H, S, S), np.float32)
            r, c = _tri(S)
            full[:, :, r, c] = v.reshape(L, H, -1)
        else:
            full = v.reshape(L, H, S, S)
        return {f"blocks.{l}.attn.hook_pattern": full[l][None] for l in range(L)}


def open_store(path: str | Path) -> PatternStore:
    """Open a pattern store for reading: the `patterns.zarr` folder or the model folder holding it."""
    path = Path(path)
    if (path / STORE_DIR / "meta.json").is_file():
        path = path / STORE_DIR
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"no pattern store at {path}: run `jaxlens patterns --store zarr` first")
    return PatternStore(path, json.loads((path / "meta.json").read_text()))
