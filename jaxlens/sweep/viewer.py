"""A static, offline viewer of a sweep. `index.html` lists the models and their prompts (text and
tokens); `single.html` draws a prompt's attention patterns as heatmaps, one per head of the
chosen layer, with the query and key tokens and the value on hover. The patterns of the first
`max_embed` prompts of each model are embedded in `single.html` (quantised to 8 bits), so both
pages work from file:// and from `python -m http.server` with no fetches. Everything shown is
escaped: text is HTML-escaped, embedded JSON has '<', '>' and '&' as \\u escapes, and the page
sets tokens with textContent only.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from jaxlens.sweep.writer import atomic_write_text

__all__ = ["render_index", "render_single", "write_index_html", "safe_json"]

_STYLE = ("body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
          "td,th{border:1px solid #ccc;padding:2px 6px;vertical-align:top}.tok{background:#eef;margin:1px;"
          "padding:0 2px;font-family:monospace;white-space:pre}canvas{border:1px solid #999;margin:4px;"
          "image-rendering:pixelated}.head{display:inline-block;text-align:center}#hover{font-family:monospace;"
          "min-height:1.4em;white-space:pre}")


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def safe_json(obj: Any) -> str:
    """JSON that can sit inside a <script> element: no '<', '>' or '&' characters."""
    return json.dumps(obj).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _models(save_path: Path) -> list[tuple[str, dict[str, Any], list[dict[str, Any]]]]:
    out = []
    for d in sorted(p for p in save_path.iterdir() if p.is_dir()):
        if (d / "model_cfg.json").is_file():
            cfg = json.loads((d / "model_cfg.json").read_text(encoding="utf-8"))
            prompts = []
            if (d / "prompts.jsonl").is_file():
                prompts = [json.loads(line) for line in (d / "prompts.jsonl").read_text(encoding="utf-8").splitlines()
                           if line.strip()]
            out.append((d.name, cfg, prompts))
    return out


def render_index(save_path: Path, max_prompts: int = 1000) -> str:
    """The HTML of `index.html`: a table of models (from each `model_cfg.json`), then per model its
    finished prompts (from `prompts.jsonl`, at most `max_prompts` each) with their text and tokens."""
    save_path = Path(save_path)
    models = _models(save_path)
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>jaxlens patterns</title>",
             f"<style>{_STYLE}</style></head><body><h1>jaxlens patterns</h1><h2>Models</h2><table>",
             "<tr><th>model</th><th>layers</th><th>heads</th><th>d_model</th><th>n_ctx</th><th>prompts</th></tr>"]
    for name, cfg, prompts in models:
        parts.append(f"<tr><td><a href='#m-{_e(name)}'>{_e(name)}</a></td><td>{_e(cfg.get('n_layers'))}</td>"
                     f"<td>{_e(cfg.get('n_heads'))}</td><td>{_e(cfg.get('d_model'))}</td>"
                     f"<td>{_e(cfg.get('n_ctx'))}</td><td>{len(prompts)}</td></tr>")
    parts.append("</table>")
    for name, _cfg, prompts in models:
        parts.append(f"<h2 id='m-{_e(name)}'>{_e(name)}</h2><table><tr><th>hash</th><th>n_tokens</th>"
                     "<th>text</th><th>tokens</th></tr>")
        for p in prompts[:max_prompts]:
            toks = "".join(f"<span class='tok'>{_e(t)}</span>" for t in p.get("tokens", []))
            link = f"single.html#{name}/{p.get('hash', '')}"
            parts.append(f"<tr><td><a href='{_e(link)}'>{_e(p.get('hash'))}</a></td>"
                         f"<td>{_e(p.get('n_tokens'))}</td><td>{_e(p.get('text', ''))}</td><td>{toks}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "".join(parts)


def _load_patterns(mdir: Path, h: str, n_layers: int) -> np.ndarray | None:
    """[L H S S] float32 of one prompt from its npz / stacked npy / the zarr store, or None."""
    d = mdir / "prompts" / h
    try:
        if (d / "activations.npz").is_file():
            with np.load(d / "activations.npz") as z:
                keys = [f"blocks.{l}.attn.hook_pattern" for l in range(n_layers)]
                if all(k in z.files for k in keys):
                    return np.stack([z[k][0] for k in keys])
        if (d / "activations-blocks.-.attn.hook_pattern.npy").is_file():
            return np.load(d / "activations-blocks.-.attn.hook_pattern.npy")[0]
        if (mdir / "patterns.zarr" / "meta.json").is_file():
            from jaxlens.sweep.store import open_store

            st = open_store(mdir)
            if h in st:
                got = st[h]
                return np.stack([got[f"blocks.{l}.attn.hook_pattern"][0] for l in range(n_layers)])
    except (OSError, ValueError, KeyError):
        return None
    return None


def _embedded(save_path: Path, max_embed: int) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for name, cfg, prompts in _models(save_path):
        L = int(cfg.get("n_layers", 0))
        for p in prompts[:max_embed]:
            pat = _load_patterns(save_path / name, p["hash"], L)
            if pat is None:
                continue
            S = pat.shape[-1]
            toks = (["<BOS>"] + list(p.get("tokens", [])))[:S]
            toks += [""] * (S - len(toks))
            q = np.clip(np.rint(pat * 255), 0, 255).astype(np.uint8)
            data[f"{name}/{p['hash']}"] = dict(model=name, hash=p["hash"], text=p.get("text", ""), tokens=toks, S=S,
                                               L=int(pat.shape[0]), H=int(pat.shape[1]),
                                               b64=base64.b64encode(q.tobytes()).decode())
    return data


_SCRIPT = r"""
const DATA = JSON.parse(document.getElementById('data').textContent);
const keys = Object.keys(DATA);
const sel = document.getElementById('prompt'), lay = document.getElementById('layer');
const grid = document.getElementById('grid'), hover = document.getElementById('hover');
for (const k of keys) { const o = document.createElement('option'); o.value = k; o.textContent = k; sel.appendChild(o); }
function bytes(b64) { const s = atob(b64); const a = new Uint8Array(s.length); for (let i = 0; i < s.length; i++) a[i] = s.charCodeAt(i); return a; }
function draw() {
  const d = DATA[sel.value]; grid.textContent = '';
  if (!d) { grid.textContent = 'this prompt is not embedded (only the first prompts of each model are)'; return; }
  if (lay.options.length !== d.L) { lay.textContent = ''; for (let l = 0; l < d.L; l++) { const o = document.createElement('option'); o.value = l; o.textContent = 'layer ' + l; lay.appendChild(o); } }
  document.getElementById('text').textContent = d.text;
  const v = bytes(d.b64), l = +lay.value || 0, S = d.S, px = Math.max(1, Math.floor(256 / S));
  for (let h = 0; h < d.H; h++) {
    const box = document.createElement('div'); box.className = 'head';
    const c = document.createElement('canvas'); c.width = S; c.height = S;
    c.style.width = (S * px) + 'px'; c.style.height = (S * px) + 'px';
    const ctx = c.getContext('2d'), img = ctx.createImageData(S, S), base = (l * d.H + h) * S * S;
    for (let i = 0; i < S * S; i++) { const x = 255 - v[base + i]; img.data[4*i] = x; img.data[4*i+1] = x; img.data[4*i+2] = 255; img.data[4*i+3] = 255; }
    ctx.putImageData(img, 0, 0);
    c.addEventListener('mousemove', ev => {
      const r = c.getBoundingClientRect(), k = Math.floor((ev.clientX - r.left) / px), q = Math.floor((ev.clientY - r.top) / px);
      if (q < 0 || k < 0 || q >= S || k >= S) return;
      hover.textContent = 'L' + l + 'H' + h + '  query ' + q + ' ' + JSON.stringify(d.tokens[q]) + '  ->  key ' + k + ' ' + JSON.stringify(d.tokens[k]) + '  = ' + (v[base + q * S + k] / 255).toFixed(3);
    });
    const cap = document.createElement('div'); cap.textContent = 'head ' + h;
    box.appendChild(c); box.appendChild(cap); grid.appendChild(box);
  }
}
sel.addEventListener('change', () => { location.hash = sel.value; draw(); });
lay.addEventListener('change', draw);
const want = decodeURIComponent(location.hash.slice(1));
if (keys.includes(want)) sel.value = want;
draw();
"""


def render_single(save_path: Path, max_embed: int = 20) -> str:
    """The HTML of `single.html`: the heatmap viewer with the first `max_embed` prompts of each
    model embedded."""
    data = _embedded(Path(save_path), max_embed)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>jaxlens patterns: one prompt</title>"
            f"<style>{_STYLE}</style></head><body><h1>jaxlens patterns</h1><p><a href='index.html'>all prompts</a></p>"
            "<p><select id='prompt'></select> <select id='layer'></select></p><p id='text'></p>"
            "<div id='hover'></div><div id='grid'></div>"
            f"<script type='application/json' id='data'>{safe_json(data)}</script><script>{_SCRIPT}</script>"
            "</body></html>\n")


def write_index_html(save_path: Path, max_embed: int = 20) -> list[Path]:
    """Write `index.html` (the listing) and `single.html` (the heatmap viewer), atomically."""
    save_path = Path(save_path)
    return [atomic_write_text(save_path / "index.html", render_index(save_path)),
            atomic_write_text(save_path / "single.html", render_single(save_path, max_embed))]
