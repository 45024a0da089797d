"""The demo's figures, drawn in a process of their own while the demo computes.

`Plotter` starts this file as a script (`python plots.py`: it imports numpy and matplotlib, not
jaxlens or jax) and sends it jobs, pickled on its stdin: (PNG path, figure function name, its
keyword arguments). The child draws each figure as it arrives; `Plotter.finish()` waits for the
last one and raises, with the child's error, if any failed. Importing and running matplotlib
(about 2 s of a cached `jaxlens demo`) so leaves the demo's own critical path.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

DPI = 110


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _layer_head_map(fig: Any, ax: Any, grid: Any, title: str, **imshow: Any) -> None:
    """A [layer head] heatmap on `ax`, every layer and head ticked, with its colour bar."""
    im = ax.imshow(grid, **imshow)
    ax.set_xticks(range(grid.shape[1]))
    ax.set_yticks(range(grid.shape[0]))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)


def logit_lens(path: str, labels: list[str], p_io: list[float], p_s: list[float]) -> None:
    """P(IO) and P(S) read off the residual stream after each component."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(labels, p_io, "o-", label="P(IO) (right)")
    ax.plot(labels, p_s, "s--", label="P(S) (repeated)")
    ax.set_ylabel("probability")
    ax.set_title("logit lens on held-out IOI prompts")
    ax.legend()
    _save(plt, fig, path)


def dla(path: str, labels: list[str], by_component: list[float], by_head: list[list[float]]) -> None:
    """Direct logit attribution: bars by component, a layer x head heatmap."""
    import numpy as np

    plt = _pyplot()
    grid = np.asarray(by_head, np.float64)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.4))
    a1.bar(labels, by_component, color=["#4c72b0" if v >= 0 else "#c44e52" for v in by_component])
    a1.set_title("by component")
    a1.tick_params(axis="x", rotation=45)
    lim = float(np.abs(grid).max()) or 1.0
    _layer_head_map(fig, a2, grid, "by head", cmap="RdBu", vmin=-lim, vmax=lim)
    _save(plt, fig, path)


def induction(path: str, scores: list[list[float]]) -> None:
    """Induction score per layer x head."""
    import numpy as np

    plt = _pyplot()
    sc = np.asarray(scores, np.float64)
    fig, ax = plt.subplots(figsize=(4.5, 3))
    _layer_head_map(fig, ax, sc, "induction score", cmap="Blues", vmin=0, vmax=1)
    _save(plt, fig, path)


FIGURES = {f.__name__: f for f in (logit_lens, dla, induction)}


class Plotter:
    """The figure process: `draw(path, figure, **data)` queues a figure (data: lists, numbers,
    strings), `finish()` waits for all of them (RuntimeError with the child's traceback if one
    failed). Start it early: the child imports matplotlib while the parent works."""

    def __init__(self) -> None:
        self._err = tempfile.TemporaryFile()
        self._proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve())], stdin=subprocess.PIPE,
                                      stdout=subprocess.DEVNULL, stderr=self._err)

    def draw(self, path: str | Path, figure: str, **data: Any) -> None:
        if figure not in FIGURES:
            raise ValueError(f"unknown figure {figure!r}; choose from {sorted(FIGURES)}")
        try:
            pickle.dump((str(path), figure, data), self._proc.stdin)
            self._proc.stdin.flush()
        except BrokenPipeError:  # the child died: finish() says why
            pass

    def kill(self) -> None:
        """Stop the child now (the demo failed: its figures are not wanted)."""
        self._proc.kill()
        self._proc.wait()
        self._err.close()

    def finish(self, timeout: float = 300.0) -> None:
        try:
            self._proc.stdin.close()
        except BrokenPipeError:
            pass
        rc = self._proc.wait(timeout)
        self._err.seek(0)
        err = self._err.read().decode("utf-8", "replace")
        self._err.close()
        if rc != 0:
            raise RuntimeError(f"drawing the demo's figures failed (exit {rc}):\n{err[-3000:]}")


def _serve() -> int:
    """The child: draw every job read from stdin until it closes. Run as a script, its folder
    (jaxlens/apps, whose module names are not the stdlib's) leaves sys.path before matplotlib loads."""
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != here]
    stdin = sys.stdin.buffer
    while True:
        try:
            path, figure, data = pickle.load(stdin)
        except EOFError:
            return 0
        try:
            FIGURES[figure](path, **data)
        except Exception:  # noqa: BLE001 - reported to the parent, which raises it
            traceback.print_exc()
            return 1


__all__ = ["DPI", "FIGURES", "Plotter", "logit_lens", "dla", "induction"]

if __name__ == "__main__":
    sys.exit(_serve())
