"""The `jaxlens` command: convert checkpoints, run a prompt, and the demo."""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path
from typing import Any, Sequence


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def default_model() -> Path:
    """The model shipped inside the package (see `jaxlens.assets`)."""
    from jaxlens.assets import model_dir

    return model_dir()


def cmd_convert(a: argparse.Namespace) -> int:
    import jaxlens
    from jaxlens.conversion import check_destination

    check_destination(a.dst, a.overwrite)  # before the (slow) conversion; checked again under the lock
    mesh = _mesh(a.mesh)
    m = jaxlens.from_pretrained_no_processing(a.src, dtype=a.dtype,  # saved as HF has it; processed on load
                                              allow_nonfinite=a.allow_nonfinite, mesh=mesh)
    out = m.save(a.dst, overwrite=a.overwrite, format=a.format)
    n = sum(x.size for x in __import__("jax").tree.leaves(m.params))
    where = f", mesh {a.mesh}" if a.mesh else ""
    print(f"converted {a.src} ({m.cfg.model_type}, {m.cfg.n_layers} layers, {n:,} parameters, {a.dtype}{where}) "
          f"-> {out} ({a.format})")
    return 0


def _mesh(spec: str | None) -> Any:
    """The `--mesh` spec as a `jax.sharding.Mesh` (None: one device); a bad spec is a ValueError from
    `jaxlens.distributed.parse_mesh_spec`, naming the spec and the fix."""
    if spec is None:
        return None
    from jaxlens.distributed import make_mesh

    return make_mesh(spec)


MESH_HELP = ("shard over a device mesh, e.g. data=2,model=4 or fsdp=8 or data=-1 (axes: data, model, fsdp; "
             "simulated CPU devices: XLA_FLAGS=--xla_force_host_platform_device_count=8)")


MAX_TOKEN_ID = 2**31 - 1  # no vocabulary is larger; bigger ids would overflow the int32 tokens


def token_ids(text: str) -> list[int]:
    """`--tokens 0,5,9` -> [0, 5, 9]; anything else is an argparse error naming the bad item."""
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in items):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of token ids, e.g. --tokens 0,5,9")
    ids = []
    for t in items:
        try:
            ids.append(int(t))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{t!r} is not a token id (a non-negative integer)") from None
        if not 0 <= ids[-1] <= MAX_TOKEN_ID:
            raise argparse.ArgumentTypeError(f"token id {t} is outside any vocabulary (0..{MAX_TOKEN_ID})")
    return ids


def positive_int(text: str) -> int:
    """An argparse type: an int >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def cmd_run(a: argparse.Namespace) -> int:
    import numpy as np

    import jaxlens

    path = Path(a.model) if a.model else default_model()
    m = jaxlens.from_pretrained(path, dtype=a.dtype, allow_nonfinite=a.allow_nonfinite, mesh=_mesh(a.mesh))
    if a.tokens is not None:
        toks = np.array([a.tokens], np.int64)  # checked against the vocabulary by run_with_cache
        text_toks = None
    else:
        toks = np.asarray(m.to_tokens(a.prompt))
        text_toks = m.to_str_tokens(toks[0]) if m.tokenizer is not None else None
    logits, cache = m.run_with_cache(toks, names_filter=a.names_filter)
    probs = np.asarray(__import__("jax").nn.softmax(logits[0].astype("float32"), -1))
    where = f", mesh {dict(m.mesh.shape)}" if m.mesh is not None else ""
    print(f"model: {path} ({m.cfg.model_type}, {m.cfg.n_layers} layers, d_model {m.cfg.d_model}{where})")
    print(f"\ntop-{a.top_k} next tokens per position:")
    for p in range(toks.shape[1]):
        top = np.argsort(-probs[p])[: a.top_k]
        here = repr(text_toks[p]) if text_toks else str(int(toks[0, p]))
        preds = ", ".join(
            f"{(repr(m.to_string([int(t)])) if m.tokenizer is not None else int(t))} {probs[p, t]:.2f}" for t in top)
        print(f"  {p:3d} {here:>16s} -> {preds}")
    print(f"\ncached activations ({len(cache)}):")
    print(f"  {'name':44s} {'shape':>22s} {'dtype':>9s} {'bytes':>11s}")
    total = 0
    for name, v in cache.items():
        nbytes = v.size * v.dtype.itemsize
        total += nbytes
        print(f"  {name:44s} {str(tuple(v.shape)):>22s} {str(v.dtype):>9s} {_fmt_bytes(nbytes):>11s}")
    print(f"  {'total':44s} {'':>22s} {'':>9s} {_fmt_bytes(total):>11s}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from jaxlens.apps.demo import run_demo

    return run_demo(model=a.model, out=Path(a.out))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxlens", description="Mechanistic interpretability in JAX.")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="convert a HF checkpoint folder to a jaxlens folder (no torch needed to load)")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    c.add_argument("--overwrite", action="store_true", help="replace dst if it already holds a converted model")
    c.add_argument("--allow-nonfinite", action="store_true", help="convert weights holding NaN/inf (else an error)")
    c.add_argument("--format", default="safetensors", choices=["safetensors", "orbax"],
                   help="safetensors: one file (small models); orbax: sharded, each host writes its shards")
    c.add_argument("--mesh", default=None, help="load onto this mesh before writing (orbax writes its shards); "
                   + MESH_HELP)
    c.set_defaults(fn=cmd_convert)
    r = sub.add_parser("run", help="run a prompt: top-k next tokens and a table of cached activations")
    r.add_argument("--model", default=None, help="HF or jaxlens folder (default: the shipped model)")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--prompt", default="When Mary and John went to the store, John gave a drink to")
    g.add_argument("--tokens", default=None, type=token_ids, help="comma-separated token ids instead of a prompt")
    r.add_argument("--top-k", type=positive_int, default=5)
    r.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    r.add_argument("--allow-nonfinite", action="store_true", help="load weights holding NaN/inf (else an error)")
    r.add_argument("--names-filter", default=None, help="one hook name to cache (default: all)")
    r.add_argument("--mesh", default=None, help=MESH_HELP)
    r.set_defaults(fn=cmd_run)
    d = sub.add_parser("demo", help="find circuits in the shipped model; writes a report folder")
    d.add_argument("--model", default=None)
    d.add_argument("--out", default="demo_out")
    d.set_defaults(fn=cmd_demo)
    __import__("jaxlens.sweep.cli", fromlist=["add_parser"]).add_parser(sub)  # `jaxlens patterns`
    return p


def os_error_message(e: OSError) -> str:
    """One line for an OSError a user can act on (full disk, permissions, a path that is not there)."""
    where = f" ({e.filename})" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return f"no space left on the device{where}; nothing was kept: free some space or write elsewhere"
    return f"{e.strerror or e}{where}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; a user error (bad input, a bad or unreadable path, a full disk) prints
    `jaxlens: error: ...` on stderr and returns 2, without a traceback."""
    from jaxlens import compile_cache, host_memory

    host_memory.retain_freed_memory()  # no page faults on each call's fresh outputs; JAXLENS_RETAIN_MEMORY=0: off
    compile_cache.enable(warn=True)  # compile once across runs; JAXLENS_COMPILE_CACHE=0 turns it off
    a = build_parser().parse_args(argv)
    try:
        return a.fn(a)
    except ValueError as e:  # CheckpointError and every argument check
        print(f"jaxlens: error: {e}", file=sys.stderr)
    except OSError as e:
        print(f"jaxlens: error: {os_error_message(e)}", file=sys.stderr)
    except KeyboardInterrupt:
        print("jaxlens: interrupted", file=sys.stderr)
        return 130
    return 2


def script() -> int:
    """The `jaxlens` console command: `main`, then the heap frozen for the exit.

    Python's exit-time collections walk every object jax, flax and transformers left alive: 0.93 s
    after a demo run here, 0.43 s once frozen. One collection first finalises the cyclic garbage
    (files closed, buffers flushed); what stays alive is freed by the interpreter as before. Only the
    process's last act, so `main` stays safe to call from other code and tests.
    """
    import gc

    rc = main()
    gc.collect()
    gc.freeze()
    return rc


if __name__ == "__main__":
    sys.exit(script())

__all__ = ["default_model", "cmd_convert", "MESH_HELP", "MAX_TOKEN_ID", "token_ids", "positive_int", "cmd_run", "cmd_demo",
           "build_parser", "os_error_message", "main", "script"]
