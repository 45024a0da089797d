"""Prompt files: loading (pattern_lens's jsonl, malformed lines reported), chunking by
characters, hashing, de-duplication and shuffling.

The rules are pattern_lens 0.6's (`load_text_data`, `augment_prompt_with_hash`), so the same
prompts file gives the same prompt folders: lines shorter than `min_chars` are dropped, longer
than `max_chars` are cut into consecutive `max_chars` chunks (short chunks dropped), every
prompt gets `source_fname`, and `hash` is the urlsafe base64 of the md5 of the UTF-8 text with
`=` stripped (a line that carries its own `hash` keeps it).
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
import sys
from pathlib import Path
from typing import Any

__all__ = ["PromptsError", "prompt_hash", "check_hash", "read_jsonl", "chunk_prompts", "load_prompts"]

HASH_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class PromptsError(ValueError):
    """A prompts file that cannot be used (a malformed line under `strict`, no usable prompt)."""


def prompt_hash(text: str) -> str:
    """pattern_lens's prompt hash: urlsafe base64 of md5(text as UTF-8), '=' stripped."""
    return base64.urlsafe_b64encode(hashlib.md5(text.encode("utf-8")).digest()).decode().rstrip("=")  # noqa: S324


def check_hash(h: Any, where: str = "prompt") -> str:
    """A hash used as a folder name must be a plain name (letters, digits, '-', '_'): a hash like
    '../x' would escape the save path."""
    if not isinstance(h, str) or not HASH_RE.match(h):
        raise PromptsError(f"{where}: hash {h!r} is not a safe folder name (only letters, digits, '-' and '_', at "
                           "most 128); remove the 'hash' field to let it be computed from the text")
    return h


def read_jsonl(path: str | Path, strict: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """The objects of a jsonl file that have a string `text`, and a report line for each line that
    is not one (with its line number). `strict` raises PromptsError on the first bad line instead."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist; pass --prompts FILE.jsonl (one JSON object "
                                "with a 'text' field per line)")
    rows: list[dict[str, Any]] = []
    bad: list[str] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problem = f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})"
            else:
                if not isinstance(obj, dict):
                    problem = f"{path}:{n}: a JSON {type(obj).__name__}, not an object with a 'text' field"
                elif not isinstance(obj.get("text"), str):
                    problem = f"{path}:{n}: no string 'text' field (keys: {sorted(obj)})"
                elif "hash" in obj and not (isinstance(obj["hash"], str) and HASH_RE.match(obj["hash"])):
                    problem = f"{path}:{n}: 'hash' {obj['hash']!r} is not a safe folder name"
                else:
                    rows.append(obj)
                    continue
            if strict:
                raise PromptsError(problem + " (rerun without --strict to skip bad lines)")
            bad.append(problem)
    return rows, bad


def chunk_prompts(rows: list[dict[str, Any]], min_chars: int | None, max_chars: int | None,
                  source_fname: str | None = None) -> list[dict[str, Any]]:
    """pattern_lens's length rules: drop texts under `min_chars`, cut texts over `max_chars` into
    consecutive chunks of `max_chars` characters, drop chunks under `min_chars`. Each chunk keeps
    the line's other fields (and `source_fname` when given); a line's own `hash` is kept only
    when the line was not cut (its chunks are different texts)."""
    if max_chars is not None and max_chars < 1:
        raise PromptsError(f"max_chars must be >= 1, got {max_chars}")
    out: list[dict[str, Any]] = []
    for row in rows:
        d = dict(row)
        if source_fname is not None:
            d["source_fname"] = source_fname
        text = d["text"]
        if min_chars is not None and len(text) < min_chars:
            continue
        pieces = [text]
        if max_chars is not None and len(text) > max_chars:
            pieces = [text[i:i + max_chars] for i in range(0, len(text), max_chars)]
        for piece in pieces:
            if min_chars is not None and len(piece) < min_chars:
                continue
            c = {**d, "text": piece}
            if len(pieces) > 1:
                c.pop("hash", None)
            out.append(c)
    return out


def load_prompts(path: str | Path, min_chars: int | None = 100, max_chars: int | None = 1000,
                 n_samples: int | None = None, shuffle: bool = False, seed: int | None = None,
                 strict: bool = False, report: Any = None) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Prompts ready for a sweep, each with its `hash`, duplicates (same hash) dropped, and counts
    {lines, malformed, prompts, duplicates}. Order: the file's, or shuffled by `seed` (a fixed
    seed gives the same order on every host and every rerun), then cut to `n_samples`."""
    report = report if report is not None else (lambda msg: print(msg, file=sys.stderr))
    rows, bad = read_jsonl(path, strict)
    for b in bad:
        report(f"skipping malformed prompt line {b}")
    prompts = chunk_prompts(rows, min_chars, max_chars, Path(path).as_posix())
    if shuffle:
        random.Random(seed).shuffle(prompts)
    if n_samples is not None:
        if n_samples < 0:
            raise PromptsError(f"n_samples must be >= 0, got {n_samples}")
        prompts = prompts[:n_samples]
    seen: set[str] = set()
    out = []
    for p in prompts:
        if "hash" not in p:
            p["hash"] = prompt_hash(p["text"])
        if p["hash"] in seen:
            continue
        seen.add(p["hash"])
        out.append(p)
    counts = dict(lines=len(rows) + len(bad), malformed=len(bad), prompts=len(out),
                  duplicates=len(prompts) - len(out))
    return out, counts
