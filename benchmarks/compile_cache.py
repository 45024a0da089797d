"""First-run vs second-run wall time of `jaxlens demo` and `jaxlens run` with the persistent
compilation cache (`jaxlens.compile_cache`, issue 14 item 4; target: second demo >= 2x faster).

For each command, in fresh processes: once with the cache off (`JAXLENS_COMPILE_CACHE=0`, the cold
cost without the cost of writing entries), once into an empty cache folder (first run: compiles
and writes), then `--repeat` times against the filled folder (second run: reads). Prints the
machine, each wall time, the cache's size, and first/second as a ratio, withheld ("noisy") when
other processes took more than ~10% of the cores (`common.Quiet`). The second runs' outputs must
equal the first's (a cached program gives the same numbers): `jaxlens run` stdout is compared,
and the demo's summary.json.

    .venv/bin/python benchmarks/compile_cache.py [--repeat 2] [--only demo|run]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import Quiet, headline, machine_report, median  # noqa: E402

CLI = [sys.executable, "-m", "jaxlens.apps.cli"]


def timed(argv: list[str], cache: str) -> tuple[float, str]:
    """Wall seconds of one fresh `jaxlens ARGV` process with JAXLENS_COMPILE_CACHE=cache, and its stdout."""
    env = {**os.environ, "JAXLENS_COMPILE_CACHE": cache}
    t0 = time.perf_counter()
    p = subprocess.run(CLI + argv, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"jaxlens {' '.join(argv)} failed ({p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")
    return wall, p.stdout


def size_mib(folder: Path) -> tuple[int, float]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files) / 2**20


def bench(name: str, make_argv, same, repeat: int, tmp: Path) -> None:
    """make_argv(k) -> the k-th run's argv (a fresh output folder each); same(a, b) -> do two runs agree?"""
    cache = tmp / f"cache-{name}"
    with Quiet() as q:
        off, _ = timed(make_argv("off"), "0")
        first, out1 = timed(make_argv("first"), str(cache))
        n, mib = size_mib(cache)
        seconds = [timed(make_argv(f"second{k}"), str(cache)) for k in range(repeat)]
    second = median([s for s, _ in seconds])
    agree = all(same(out1, o, k) for k, (_, o) in enumerate(seconds))
    print(f"\njaxlens {name}: cache off {off:.1f} s; first run {first:.1f} s (wrote {n} programs, {mib:.1f} MiB); "
          f"second run {second:.1f} s (median of {repeat}: {', '.join(f'{s:.1f}' for s, _ in seconds)}); "
          f"second run's output {'equals' if agree else 'DIFFERS FROM'} the first's")
    print(q.summary())
    print(headline(f"jaxlens {name}: first / second run wall time (target >= 2x for demo)", first / second, q))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=2, help="second runs (median)")
    ap.add_argument("--only", choices=["demo", "run"], default=None)
    a = ap.parse_args()
    print(machine_report())
    with tempfile.TemporaryDirectory(prefix="jaxlens-cc-bench-") as t:
        tmp = Path(t)
        if a.only in (None, "run"):
            bench("run", lambda k: ["run"], lambda x, y, k: x == y, a.repeat, tmp)
        if a.only in (None, "demo"):
            def summary(k: str) -> dict:
                return json.loads((tmp / f"demo-{k}" / "summary.json").read_text())

            bench("demo", lambda k: ["demo", "--out", str(tmp / f"demo-{k}")],
                  lambda x, y, k: summary("first") == summary(f"second{k}"), a.repeat, tmp)


if __name__ == "__main__":
    main()
