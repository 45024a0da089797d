"""Shared benchmark helpers: a random GPT-2-small HF checkpoint on disk, interleaved timing, and
the machinery that keeps a figure honest.

- `machine_report()`: the CPU, cores, library versions, thread counts, XLA flags and load.
- `Quiet`: around a timed section, measures how much CPU *other* processes (and the hypervisor,
  as steal time) took on our cores; `quiet.noisy` when that exceeds 10% of the cores.
- `headline(label, ratio, quiet)`: the ratio, or "noisy (...)" instead when the run was noisy.
- `torch_best()`: the competitors' best configuration (threads = cores, `inference_mode`).
- `--isolate`: `add_isolate_args`, `run_isolated`, `emit_side`: each side of a benchmark in its
  own process, alternating A B A B, so that one side's memory, threads or caches cannot slow
  the other (and each side's peak host memory is its own).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _host_memory() -> Any:
    """`jaxlens.host_memory`, loaded from its file: importing the package would import jax into
    the torch side's process too."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_jaxlens_host_memory", Path(__file__).resolve().parents[1] / "jaxlens" / "host_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# Both sides of every comparison keep freed host memory for reuse (glibc malloc: no trim, no munmap,
# one arena): fresh pages cost a fault each, and torch's allocations gain from it too (HF forward
# -3%, TL run_with_cache -11% on 2026-12-07's EPYC). Set before either side allocates; JAXLENS_RETAIN_MEMORY=0
# measures glibc's defaults.
HOST_MEMORY = _host_memory()
MALLOC_RETAINED = HOST_MEMORY.retain_freed_memory()
CACHE = Path(os.environ.get("JAXLENS_BENCH_DIR", "/tmp/jaxlens_bench"))
NOISY_SHARE = 0.10  # other processes may take at most this share of our cores during a timed section
SIDE_TAG = "JAXLENS_BENCH_SIDE "  # prefixes the JSON line a `--side` subprocess prints


# ---------------------------------------------------------------- the model and timing

def gpt2_small_dir(seed: int = 0, *, n_layer: int = 12, n_embd: int = 768, n_head: int = 12,
                   tokenizer_from: str | Path | None = None) -> Path:
    """A random-weight GPT-2-small (12x768, vocab 50257) saved with save_pretrained, plus a tokenizer;
    built once under $JAXLENS_BENCH_DIR. `n_layer`/`n_embd`/`n_head` give a smaller shape (to prove
    a benchmark at a tiny size); `tokenizer_from` copies another folder's tokenizer (the default is
    a 289-token BPE, about 1.5 characters per token; the shipped model's gives about 5.8 on
    jaxlens's text, near GPT-2's on English)."""
    import torch
    import transformers
    from tokenizers import ByteLevelBPETokenizer

    shape = "" if (n_layer, n_embd, n_head) == (12, 768, 12) else f"-{n_layer}x{n_embd}x{n_head}"
    tok_tag = "" if tokenizer_from is None else f"-tok-{Path(tokenizer_from).resolve().name}"
    path = CACHE / f"gpt2-small-random-{seed}{shape}{tok_tag}"
    if (path / "model.safetensors").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is not None:
        tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_from))
    else:
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 50], vocab_size=400,
                                special_tokens=["<|endoftext|>"])
        tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                                   eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.save_pretrained(str(path))
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head))
    model.save_pretrained(str(path))
    return path


def interleaved(fns: dict[str, Callable[[], object]], rounds: int = 5, warmup: int = 1) -> dict[str, list[float]]:
    """Run each fn `warmup` times, then `rounds` rounds A B C A B C ...; seconds per call."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def fmt_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


# ---------------------------------------------------------------- the machine

def cores() -> int:
    """The cores this process may run on (its affinity set), which is what the benchmark can use."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU's model name, from lscpu or /proc/cpuinfo."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for ln in out.splitlines():
            if ln.startswith("Model name:"):
                return ln.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name"):
                    return ln.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> str:
    """The CPU features that decide the matmul kernels (AVX2, AVX-512, bf16, AMX) present here."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        return "?"
    want = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    return ",".join(w for w in want if w in flags) or "none of avx2/avx512/amx"


def loadavg() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages."""
    return os.getloadavg()


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "-"


def _malloc_report() -> str:
    if MALLOC_RETAINED:
        settings = ", ".join(f"{k} {v}" for k, v in HOST_MEMORY.SETTINGS.items())
        return f"freed memory retained on both sides ({settings})"
    return f"the C library's defaults ({HOST_MEMORY.ENV}=0, or not glibc)"


def machine_report() -> str:
    """Everything a figure depends on besides the code: CPU, cores, versions, threads, flags, load."""
    n = cores()
    torch_threads = "not loaded"
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        torch_threads = f"{torch.get_num_threads()} intra-op / {torch.get_num_interop_threads()} inter-op"
    jax_devices = "not loaded"
    if "jax" in sys.modules:
        jax = sys.modules["jax"]
        devs = jax.devices()
        jax_devices = f"{len(devs)} x {devs[0].platform} ({devs[0].device_kind})"
    env_threads = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                             "OPENBLAS_NUM_THREADS") if k in os.environ)
    la = loadavg()
    return "\n".join([
        f"machine: {cpu_model()} [{cpu_flags()}], {n} cores usable of {os.cpu_count()}, "
        f"{platform.system()} {platform.release()}, python {platform.python_version()}",
        f"versions: jax {_version('jax')}, jaxlib {_version('jaxlib')}, torch {_version('torch')}, "
        f"transformers {_version('transformers')}, transformer_lens {_version('transformer-lens')}",
        f"threads: torch {torch_threads}; jax devices {jax_devices}; {env_threads or 'no thread env vars'}",
        f"XLA_FLAGS: {os.environ.get('XLA_FLAGS', '') or '(none)'}",
        f"malloc: {_malloc_report()}",
        f"load average: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}",
    ])


# ---------------------------------------------------------------- is the machine quiet?

def _busy_jiffies(cpus: set[int] | None) -> tuple[int, bool]:
    """Busy clock ticks (user nice system irq softirq steal) summed over `cpus` (None: all), from
    /proc/stat; and whether the per-CPU lines were found (else the all-CPU line is used)."""
    try:
        with open("/proc/stat") as f:
            lines = [ln.split() for ln in f if ln.startswith("cpu")]
    except OSError:
        return 0, False

    def busy(fields: list[str]) -> int:
        v = [int(x) for x in fields[1:9]] + [0] * 8
        user, nice, system, _idle, _iowait, irq, softirq, steal = v[:8]
        return user + nice + system + irq + softirq + steal  # steal: the hypervisor ran someone else

    per = {int(f[0][3:]): f for f in lines if f[0] != "cpu"}
    if cpus and all(c in per for c in cpus):
        return sum(busy(per[c]) for c in cpus), True
    return (busy(lines[0]) if lines else 0), False


@dataclass
class _Snap:
    wall: float
    own_cpu: float  # this process's user + system seconds, plus those of children it has waited for
    busy: float  # seconds of busy CPU on our cores, every process
    load: float


def _snap(cpus: set[int] | None) -> _Snap:
    t = os.times()
    busy, _ = _busy_jiffies(cpus)
    return _Snap(time.perf_counter(), t.user + t.system + t.children_user + t.children_system,
                 busy / os.sysconf("SC_CLK_TCK"), loadavg()[0])


class Quiet:
    """A context manager around a timed section: did other processes share our cores meanwhile?

    Records the load average before and after, this process's CPU time (and that of the
    subprocesses it waited for: `--isolate` sides), and the busy time of our cores from
    /proc/stat. Foreign CPU = busy time - own CPU time; `noisy` when it exceeds
    `NOISY_SHARE` (10%) of `cores * wall`. Steal time counts as foreign: on a VM, the
    hypervisor running other guests slows us as much as a neighbour process.
    """

    def __init__(self, threshold: float = NOISY_SHARE):
        self.threshold = threshold
        try:
            self.cpus: set[int] | None = set(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            self.cpus = None
        self.cores = len(self.cpus) if self.cpus else (os.cpu_count() or 1)
        total, self.per_cpu = _busy_jiffies(self.cpus)
        self.measured = total > 0  # /proc/stat was readable
        self.before: _Snap | None = None
        self.after: _Snap | None = None

    def __enter__(self) -> "Quiet":
        self.before = _snap(self.cpus if self.per_cpu else None)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.after = _snap(self.cpus if self.per_cpu else None)

    def _done(self) -> tuple[_Snap, _Snap]:
        if self.before is None or self.after is None:
            raise RuntimeError("Quiet: use it as `with Quiet() as q:` around the timed section first")
        return self.before, self.after

    @property
    def wall(self) -> float:
        b, a = self._done()
        return a.wall - b.wall

    @property
    def own_cpu(self) -> float:
        b, a = self._done()
        return a.own_cpu - b.own_cpu

    @property
    def foreign_cpu(self) -> float:
        """CPU seconds other processes took on our cores during the section (never below 0)."""
        b, a = self._done()
        return max(0.0, (a.busy - b.busy) - self.own_cpu)

    @property
    def foreign_share(self) -> float:
        """Foreign CPU as a share of the cores' capacity over the section (0.1 = 10% of the cores)."""
        return self.foreign_cpu / max(self.cores * self.wall, 1e-9)

    @property
    def noisy(self) -> bool:
        """Other processes took more than `threshold` of the cores. Without /proc/stat (not Linux)
        the load average decides: noisy when it exceeded what this process alone explains."""
        if not self.measured:
            b, a = self._done()
            return max(b.load, a.load) > self.own_cpu / max(self.wall, 1e-9) + self.threshold * self.cores
        return self.foreign_share > self.threshold

    def summary(self) -> str:
        """One line: load before/after, own and foreign CPU, and the verdict."""
        b, a = self._done()
        scope = "our cores" if self.per_cpu else "the whole machine" if self.measured else "no /proc/stat: by load"
        return (f"load {b.load:.2f} -> {a.load:.2f}; {self.wall:.1f} s wall, own CPU {self.own_cpu:.1f} s "
                f"({self.own_cpu / max(self.wall, 1e-9):.2f} cores), other processes {self.foreign_share:.0%} of "
                f"{self.cores} cores ({scope}): {'NOISY' if self.noisy else 'quiet'}")

    def as_dict(self) -> dict[str, Any]:
        b, a = self._done()
        return {"wall": self.wall, "own_cpu": self.own_cpu, "foreign_cpu": self.foreign_cpu,
                "foreign_share": self.foreign_share, "noisy": self.noisy, "load_before": b.load,
                "load_after": a.load, "cores": self.cores}


def headline(label: str, ratio: float, quiet: Quiet | bool, unit: str = "x") -> str:
    """`label: 2.31x`, or `label: noisy (...)` with no figure when other processes shared the
    cores (`quiet` a finished Quiet, or a bool saying whether the run was noisy)."""
    noisy = quiet if isinstance(quiet, bool) else quiet.noisy
    if noisy:
        why = (f"other processes took {quiet.foreign_share:.0%} of {quiet.cores} cores, load "
               f"{quiet.before.load:.2f} -> {quiet.after.load:.2f}") if isinstance(quiet, Quiet) else \
            "other processes shared the cores"
        return f"{label}: noisy ({why}); no ratio, rerun on a quiet machine"
    return f"{label}: {ratio:.2f}{unit}"


# ---------------------------------------------------------------- the competitors' best

def torch_best() -> Any:
    """torch at its best for inference: intra-op threads = our cores, and a fresh
    `torch.inference_mode()` context to run under (no autograd bookkeeping, no version counters).
    Attention is each runner's own fastest that can still hook the pattern: HF models load with
    `attn_implementation="sdpa"` where no pattern is read."""
    import torch

    n = cores()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return torch.inference_mode()


# ---------------------------------------------------------------- --isolate: one process per side

def add_isolate_args(ap: argparse.ArgumentParser, sides: Sequence[str]) -> None:
    """`--isolate` (each side in its own subprocess, alternating), `--isolate-runs N` (processes
    per side, default 2), and the internal `--side NAME` a subprocess is started with."""
    ap.add_argument("--isolate", action="store_true",
                    help="run each side in its own process, alternating (" + " / ".join(sides) + ")")
    ap.add_argument("--isolate-runs", type=int, default=2, help="processes per side with --isolate (default 2)")
    ap.add_argument("--side", choices=list(sides), default=None, help=argparse.SUPPRESS)


def peak_rss_mib() -> float:
    """This process's peak resident memory (ru_maxrss), MiB."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def emit_side(result: dict[str, Any]) -> None:
    """What a `--side` subprocess ends with: its result as one tagged JSON line on stdout (the
    peak host memory added), read back by `run_isolated`."""
    print(SIDE_TAG + json.dumps({**result, "maxrss_mib": peak_rss_mib()}), flush=True)


def run_isolated(script: str, sides: Sequence[str], argv: Sequence[str], runs: int = 2,
                 echo: bool = False, env: dict[str, str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Run `python script --side S *argv` for each side, alternating A B A B ... `runs` times;
    returns each side's `emit_side` results in order. `--isolate` is dropped from `argv`. A side
    that fails raises with the tail of its output. `echo` prints each subprocess's other lines."""
    args = [a for a in argv if a != "--isolate"]
    out: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    for r in range(runs):
        for side in sides:
            cmd = [sys.executable, script, "--side", side, *args]
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
            wall = time.perf_counter() - t0
            lines = p.stdout.splitlines()
            tagged = [ln for ln in lines if ln.startswith(SIDE_TAG)]
            if p.returncode != 0 or not tagged:
                raise RuntimeError(f"side {side!r} (run {r + 1}) failed with status {p.returncode}: "
                                   f"{' '.join(cmd)}\n{(p.stdout + p.stderr)[-4000:]}")
            if echo:
                for ln in lines:
                    if not ln.startswith(SIDE_TAG):
                        print(f"  [{side} {r + 1}] {ln}")
            res = json.loads(tagged[-1][len(SIDE_TAG):])
            res["process_wall_s"] = wall
            out[side].append(res)
    return out


def merge_times(results: list[dict[str, Any]], key: str = "times") -> dict[str, float]:
    """The median over processes of each label's per-process median seconds."""
    labels = results[0][key].keys() if results else ()
    return {k: median([median(r[key][k]) for r in results]) for k in labels}
