"""A self-contained HTML report: tables, embedded PNGs and attention-pattern heatmaps per head.

One file, no scripts, no external resources: PNGs are inlined as data URIs and heatmaps are
inline SVG whose cells carry `<title>` tooltips (hover a cell for query token, key token and
weight; hover a token label for the token). Every string that reaches the page goes through
`html.escape`, so prompt text such as `<script>` shows as text and never runs.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1200px;
 color:#1d1d1f;line-height:1.45;padding:0 16px}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:1.6em}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;
 font-size:.9em}th{background:#f4f4f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre,code,.tok{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
pre{background:#f6f8fa;padding:8px;white-space:pre-wrap}
.note{color:#8a5a00;background:#fff7e0;padding:6px 10px;border-left:3px solid #e0a800}
.grid{display:flex;flex-wrap:wrap;gap:14px}.head{border:1px solid #e3e3e3;padding:6px}
.head h4{margin:0 0 4px;font-size:.9em}svg .c:hover{stroke:#000;stroke-width:1.5}
svg text{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:9px}svg text:hover{fill:#c00}
img{max-width:100%;border:1px solid #eee}
"""


def esc(x: Any) -> str:
    """`html.escape` of `str(x)`, quotes included (safe in text and in attribute values)."""
    return html.escape(str(x), quote=True)


def show_token(t: str) -> str:
    """A token made visible: spaces as '·', newlines as '⏎' (then escaped by the caller)."""
    return t.replace(" ", "·").replace("\n", "⏎")


def table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """An HTML table; floats are right-aligned with 3 decimals. Every cell is escaped."""
    def cell(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return f'<td class="num">{float(v):.3f}</td>'
        if isinstance(v, (int, np.integer)):
            return f'<td class="num">{int(v)}</td>'
        return f"<td>{esc(v)}</td>"

    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def png(path: str | Path, alt: str) -> str:
    """An <img> with the PNG inlined as a data URI (the report stays one file)."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def _color(v: float) -> str:
    """White (0) to dark blue (1)."""
    v = min(max(float(v), 0.0), 1.0)
    r, g, b = (int(255 + (c - 255) * v) for c in (8, 48, 107))
    return f"rgb({r},{g},{b})"


def attention_svg(str_tokens: Sequence[str], pattern: np.ndarray, cell: int = 14) -> str:
    """One head's pattern [query key] as an SVG heatmap: token labels on both axes (hover shows
    the token), one cell per (query, key) with a tooltip "query → key: weight"."""
    p = np.asarray(pattern, np.float32)
    n = len(str_tokens)
    if p.shape != (n, n):
        raise ValueError(f"pattern shape {p.shape} does not match {n} tokens; pass one head's [query key] pattern")
    labels = [show_token(t) for t in str_tokens]
    margin = 8 + 6 * min(max((len(s) for s in labels), default=1), 14)
    size = margin + n * cell + 2
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" role="img">']
    for i, lab in enumerate(labels):
        short = esc(lab[:14])
        y = margin + i * cell + cell * 0.7
        parts.append(f'<text x="{margin - 4}" y="{y:.1f}" text-anchor="end"><title>query {i}: {esc(lab)}</title>'
                     f"{short}</text>")
        x = margin + i * cell + cell * 0.7
        parts.append(f'<text transform="translate({x:.1f},{margin - 4}) rotate(-90)"><title>key {i}: {esc(lab)}'
                     f"</title>{short}</text>")
    for q in range(n):
        for k in range(q + 1):
            v = float(p[q, k])
            parts.append(f'<rect class="c" x="{margin + k * cell}" y="{margin + q * cell}" width="{cell - 1}" '
                         f'height="{cell - 1}" fill="{_color(v)}"><title>{esc(labels[q])} (q{q}) → '
                         f"{esc(labels[k])} (k{k}): {v:.3f}</title></rect>")
    parts.append("</svg>")
    return "".join(parts)


def attention_grid(str_tokens: Sequence[str], patterns: np.ndarray, layer_labels: Sequence[str] | None = None) -> str:
    """Every head of every layer: patterns [layer head query key] -> a grid of SVG heatmaps."""
    pats = np.asarray(patterns)
    out = ['<div class="grid">']
    for l in range(pats.shape[0]):
        for h in range(pats.shape[1]):
            name = layer_labels[l * pats.shape[1] + h] if layer_labels else f"L{l}H{h}"
            out.append(f'<div class="head"><h4>{esc(name)}</h4>{attention_svg(str_tokens, pats[l, h])}</div>')
    out.append("</div>")
    return "".join(out)


@dataclass
class Report:
    """An HTML report built section by section: `add(title, html_body)`, then `write(path)`.

    Bodies are HTML fragments made with this module's helpers (which escape); use `text` /
    `pre` / `note` for raw strings.
    """

    title: str
    sections: list[tuple[str, str]] = field(default_factory=list)

    def add(self, title: str, body: str) -> None:
        self.sections.append((title, body))

    @staticmethod
    def text(s: str) -> str:
        return f"<p>{esc(s)}</p>"

    @staticmethod
    def pre(s: str) -> str:
        return f"<pre>{esc(s)}</pre>"

    @staticmethod
    def note(s: str) -> str:
        return f'<p class="note">{esc(s)}</p>'

    def render(self) -> str:
        toc = "".join(f'<li><a href="#s{i}">{esc(t)}</a></li>' for i, (t, _) in enumerate(self.sections))
        body = "".join(f'<h2 id="s{i}">{esc(t)}</h2>{b}' for i, (t, b) in enumerate(self.sections))
        return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(self.title)}</title>'
                f"<style>{_CSS}</style></head><body><h1>{esc(self.title)}</h1><ul>{toc}</ul>{body}</body></html>")

    def write(self, path: str | Path) -> Path:
        """Write the page atomically (temp file, then rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.render(), encoding="utf-8")
        tmp.replace(path)
        return path

__all__ = ["esc", "show_token", "table", "png", "attention_svg", "attention_grid", "Report"]
