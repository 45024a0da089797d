"""pattern_lens's folder layout, written atomically, with names that cannot escape the save path.

```
<save>/index.html, single.html      the viewer (see `jaxlens.sweep.viewer`)
<save>/models.jsonl                 one model_cfg per line
<save>/<model>/model_cfg.json       TransformerLens's config names
<save>/<model>/prompts.jsonl        one prompt.json per line (finished prompts only)
<save>/<model>/prompts/<hash>/prompt.json
<save>/<model>/prompts/<hash>/activations.npz     {"blocks.{l}.attn.hook_pattern": f32 [1 H S S]}
<save>/<model>/prompts/<hash>/activations-blocks.-.attn.hook_pattern.npy  (--stacked-heads)
```
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

from jaxlens.config import ModelConfig
from jaxlens.sweep.prompts import check_hash
from jaxlens.sweep.writer import TMP_PREFIX, atomic_write_json, atomic_write_text, npz_complete

__all__ = ["PATTERN", "STACKED_FILE", "NPZ_FILE", "check_model_name", "model_dir", "prompt_dir", "model_cfg_dict",
           "write_model_cfg", "prompt_done", "clean_partial", "write_prompts_jsonl", "write_models_jsonl",
           "done_prompts"]

PATTERN = "blocks.{l}.attn.hook_pattern"
STACKED_FILE = "activations-blocks.-.attn.hook_pattern.npy"  # pattern_lens's name for stacked heads
NPZ_FILE = "activations.npz"
_NAME_RE = re.compile(r"^[A-Za-z0-9._+@=-]{1,200}$")


def check_model_name(name: str) -> str:
    """A model name is one folder under the save path: a plain name (no '/', not '.' or '..')."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in (".", "..") or name.startswith(TMP_PREFIX):
        raise ValueError(f"model name {name!r} is not a safe folder name (letters, digits and ._+@=- only, not '.' "
                         "or '..'); pass --name NAME")
    return name


def model_dir(save_path: Path, model_name: str) -> Path:
    """`<save>/<model>`, the name checked."""
    return Path(save_path) / check_model_name(model_name)


def prompt_dir(save_path: Path, model_name: str, h: str) -> Path:
    """`<save>/<model>/prompts/<hash>`, the hash checked."""
    return model_dir(save_path, model_name) / "prompts" / check_hash(h)


def model_cfg_dict(cfg: ModelConfig, model_name: str) -> dict[str, Any]:
    """The config under TransformerLens's `HookedTransformerConfig` names (what pattern_lens's
    `model_cfg.json` holds and its figures read), plus the jaxlens family name."""
    return dict(
        model_name=model_name, n_layers=cfg.n_layers, d_model=cfg.d_model, n_ctx=cfg.n_ctx, d_head=cfg.d_head,
        n_heads=cfg.n_heads, d_mlp=cfg.d_mlp, act_fn=cfg.act_fn, d_vocab=cfg.d_vocab, eps=cfg.eps,
        normalization_type=cfg.normalization_type, positional_embedding_type=cfg.positional_embedding_type,
        n_key_value_heads=cfg.n_kv_heads if cfg.n_kv_heads != cfg.n_heads else None,
        rotary_dim=cfg.rotary_dim, rotary_base=cfg.rotary_base, parallel_attn_mlp=cfg.parallel_attn_mlp,
        gated_mlp=cfg.gated_mlp, default_prepend_bos=cfg.default_prepend_bos, d_vocab_out=cfg.d_vocab_out,
        original_architecture=cfg.original_architecture, attn_only=False, model_type=cfg.model_type,
    )


def write_model_cfg(save_path: Path, model_name: str, cfg: ModelConfig) -> Path:
    """`<save>/<model>/model_cfg.json`, atomically."""
    return atomic_write_json(model_dir(save_path, model_name) / "model_cfg.json", model_cfg_dict(cfg, model_name))


def prompt_done(folder: Path, names: frozenset[str], stacked: bool) -> bool:
    """Is this prompt finished? Its prompt.json and its activations file exist under their final
    names (each written by rename, so complete), and the npz holds every requested name."""
    if not (folder / "prompt.json").is_file():
        return False
    if stacked:
        return (folder / STACKED_FILE).is_file()
    return npz_complete(folder / NPZ_FILE, names)


def clean_partial(folder: Path) -> None:
    """Remove temporary files a killed run left in a prompt folder (they never count as done)."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return
    for e in entries:
        if e.name.startswith(TMP_PREFIX):
            try:
                os.unlink(e.path)
            except FileNotFoundError:
                pass


def _is_done_any(folder: Path) -> bool:
    """Finished in any mode (npz or stacked npy); used for the index, which lists every finished prompt."""
    return (folder / "prompt.json").is_file() and ((folder / NPZ_FILE).is_file() or (folder / STACKED_FILE).is_file())


def done_prompts(mdir: Path, first: Iterable[str] = ()) -> list[dict[str, Any]]:
    """prompt.json of every finished prompt under `mdir/prompts`: the hashes in `first` in that
    order, then the others sorted by hash (deterministic, unlike a directory listing)."""
    root = mdir / "prompts"
    if not root.is_dir():
        return []
    present = {e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(TMP_PREFIX)}
    order = [h for h in dict.fromkeys(first) if h in present]
    order += sorted(present - set(order))
    out = []
    for h in order:
        if _is_done_any(root / h):
            with open(root / h / "prompt.json", encoding="utf-8") as f:
                out.append(json.load(f))
    return out


def write_prompts_jsonl(mdir: Path, first: Iterable[str] = ()) -> Path:
    """`<model>/prompts.jsonl` (pattern_lens's `generate_prompts_jsonl`): finished prompts only."""
    lines = "".join(json.dumps(p) + "\n" for p in done_prompts(mdir, first))
    return atomic_write_text(mdir / "prompts.jsonl", lines)


def write_models_jsonl(save_path: Path) -> Path:
    """`<save>/models.jsonl` (pattern_lens's `generate_models_jsonl`), models sorted by name."""
    save_path = Path(save_path)
    lines = []
    for d in sorted(p for p in save_path.iterdir() if p.is_dir()):
        f = d / "model_cfg.json"
        if f.is_file():
            with open(f, encoding="utf-8") as fh:
                lines.append(json.dumps(json.load(fh)) + "\n")
    return atomic_write_text(save_path / "models.jsonl", "".join(lines))
