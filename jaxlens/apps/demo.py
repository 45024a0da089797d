"""`jaxlens demo`: find the circuits of the model jaxlens ships, in the terminal and as a report.

Loads the shipped GPT-2 (`jaxlens.assets.model_dir()`, trained by scripts/train_tiny.py) or any
checkpoint folder, then runs, stage by stage: top predictions, the logit lens, direct logit
attribution by layer and by head on the IOI-like task, induction scores per head on repeated
random tokens, greedy generation, and attention patterns per head. It prints each result and
writes `report.html` (self-contained), `summary.json`, `demo.txt` and PNG plots to the output
folder.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from jaxlens.apps import data
from jaxlens.apps.plots import Plotter
from jaxlens.apps.probes import induction_scores, ioi_batch, ioi_scores
from jaxlens.apps.report import Report, attention_grid, esc, png, show_token, table
from jaxlens.utils import softmax_np

IOI_PROMPT = "When Mary and John went to the store, John gave a drink to"  # both IOI prompts: held-out templates
PROMPTS = (
    IOI_PROMPT,
    "After Alice and Bob arrived at the park, Bob thanked",
    "red apple music dog window blue red apple music dog",
    "3 4 5 6 7 8",
    "one two three four",
    "( [ { < > } ]",
)
GEN_PROMPTS = ("1 2 3 4 5", "a b c d e", "paper horse cloud song paper horse", IOI_PROMPT)
SEED = 0
MAX_PATTERN_TOKENS = 48  # longer prompts are cut for the heatmaps


class _Demo:
    """State shared by the stages: model, output folder, report, summary, terminal log."""

    def __init__(self, model: Any, out: Path, prompts: Sequence[str], plots: Plotter | None = None):
        self.m, self.out, self.prompts, self.plots = model, out, list(prompts), plots
        self.report = Report(f"jaxlens demo: {model.cfg.model_name}")
        self.summary: dict[str, Any] = {"model": model.cfg.model_name, "n_layers": model.cfg.n_layers}
        self.lines: list[str] = []
        self.figures: dict[str, Path] = {}  # report placeholder -> the PNG it becomes
        self._ioi: dict[str, Any] | None = None

    def say(self, s: str = "") -> None:
        from tqdm.auto import tqdm

        tqdm.write(s)
        self.lines.append(s)

    def figure(self, name: str, figure: str, **data: Any) -> str:
        """Queue figure `figure` (`jaxlens.apps.plots`) of `data` as PNG `name` in the output folder;
        returns the report's placeholder for it, inlined by `finish_figures`."""
        path = self.out / name
        self.plots.draw(path, figure, **data)
        mark = f"<!--figure:{name}-->"
        self.figures[mark] = path
        return mark

    def finish_figures(self) -> None:
        """Wait for the figures and inline each PNG where its placeholder is in the report."""
        if self.plots is None:
            return
        self.plots.finish()
        self.report.sections = [(t, self._inline(b)) for t, b in self.report.sections]

    def _inline(self, body: str) -> str:
        for mark, path in self.figures.items():
            if mark in body:
                body = body.replace(mark, png(path, path.name))
        return body

    def ioi(self) -> dict[str, Any]:
        """Held-out IOI prompts, left-padded so position -1 is every prompt's last token, and their cache."""
        if self._ioi is None:
            exs = data.ioi_examples(SEED + 101, 48, "heldout")
            ids = ioi_batch(self.m.tokenizer, exs, self.m.tokenizer.bos_token_id)
            toks, mask = self.m.to_tokens([e.prompt for e in exs], padding_side="left", return_mask=True)
            logits, cache = self.m.run_with_cache(toks, attention_mask=mask)
            self._ioi = {"examples": exs, "io": ids["io"], "s": ids["s"], "logits": np.asarray(logits[:, -1]),
                         "cache": cache}
        return self._ioi


# --- stages -----------------------------------------------------------------------------------

def stage_predictions(d: _Demo) -> None:
    m = d.m
    toks, mask = m.to_tokens(d.prompts, return_mask=True)  # one right-padded batch: one compile
    last = np.asarray(mask).sum(1) - 1
    logits = np.asarray(m(toks, attention_mask=mask))[np.arange(len(last)), last]  # indexed on the host
    probs = softmax_np(logits)
    rows, res = [], {}
    d.say("== top predictions (next token after each prompt)")
    for p, pr in zip(d.prompts, probs):
        top = np.argsort(-pr)[:5]
        preds = [(m.to_string([int(t)]), float(pr[t])) for t in top]
        res[p] = preds
        d.say(f"  {p!r}\n      -> " + ", ".join(f"{s!r} {q:.2f}" for s, q in preds))
        rows.append([p, " | ".join(f"{show_token(s)} {q:.2f}" for s, q in preds)])
    d.summary["top_predictions"] = res
    d.report.add("Top predictions", table(["prompt", "top 5 next tokens (probability)"], rows))


def stage_ioi_accuracy(d: _Demo) -> None:
    ioi = d.ioi()
    sc = ioi_scores(ioi["logits"], ioi["io"], ioi["s"])
    d.summary["ioi_heldout"] = sc
    d.say(f"== IOI-like task on {len(ioi['io'])} prompts from held-out templates: right answer on top "
          f"{sc['top1']:.0%}, logit(IO) > logit(S) {sc['logit_diff_acc']:.0%}, mean logit diff {sc['logit_diff']:.2f}")
    ex = ioi["examples"][:6]
    rows = [[e.prompt, e.io, d.m.to_string([int(np.argmax(ioi["logits"][i]))])] for i, e in enumerate(ex)]
    d.report.add("IOI-like task (held-out templates)",
                 Report.text(f"Top-1 accuracy {sc['top1']:.1%}; logit(IO) > logit(S) on {sc['logit_diff_acc']:.1%}; "
                             f"mean logit difference {sc['logit_diff']:.2f}.")
                 + table(["prompt", "answer", "model's top token"], rows))


def stage_logit_lens(d: _Demo) -> None:
    ioi, m = d.ioi(), d.m
    resid, labels = ioi["cache"].accumulated_resid(layer=-1, incl_mid=True, apply_ln=True, pos_slice=-1,
                                                   return_labels=True)
    logits = np.asarray(resid @ m.W_U + m.b_U, np.float32)  # [component batch vocab]
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    rows_b = np.arange(logits.shape[1])
    p_io = np.exp(logp[:, rows_b, ioi["io"]]).mean(1)
    p_s = np.exp(logp[:, rows_b, ioi["s"]]).mean(1)
    top0 = [m.to_string([int(t)]) for t in logits[:, 0].argmax(-1)]
    d.summary["logit_lens"] = {"labels": labels, "p_io": p_io.tolist(), "p_s": p_s.tolist(), "top_token_ex0": top0}
    d.say(f"== logit lens (accumulated_resid, apply_ln) on the IOI prompts; example 0: {ioi['examples'][0].prompt!r}")
    d.say(f"  {'component':>12s} {'P(IO)':>7s} {'P(S)':>7s}  top token (ex. 0)")
    for lab, a, b, t in zip(labels, p_io, p_s, top0):
        d.say(f"  {lab:>12s} {a:7.3f} {b:7.3f}  {t!r}")
    body = Report.text("Mean probability of the right name (IO) and of the repeated name (S) read off the "
                       "residual stream after each layer, through the final LayerNorm and unembedding.")
    body += table(["component", "P(IO)", "P(S)", "top token, example 0"],
                  [[lab, a, b, show_token(t)] for lab, a, b, t in zip(labels, p_io, p_s, top0)])
    if d.plots:
        body += d.figure("logit_lens.png", "logit_lens", labels=list(labels), p_io=p_io.tolist(), p_s=p_s.tolist())
    d.report.add("Logit lens", body)


def stage_dla(d: _Demo) -> None:
    ioi = d.ioi()
    io, s = ioi["io"], ioi["s"]
    # logit_attrs scales by the cached final-LN scale only (TransformerLens, whose from_pretrained
    # folds the LN weight into W_U and its bias into b_U; jaxlens.from_pretrained does the same by
    # default). An unprocessed model is folded here. The bias is then one constant term, and the
    # components plus it sum to the actual logit difference.
    cache, u, b_U = ioi["cache"], np.asarray(d.m.W_U), np.asarray(d.m.b_U)
    lnf = d.m.params.get("ln_final", {})
    if "w" in lnf:  # loaded with from_pretrained_no_processing
        b_U = b_U + np.asarray(lnf.get("b", np.zeros(u.shape[0]))) @ u
        from jaxlens.cache.activation_cache import ActivationCache

        cache = ActivationCache(cache.to_dict(), d.m.cfg, True, {**cache.weights, "W_U": lnf["w"][:, None] * d.m.W_U})
    resid, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
    by_comp = np.asarray(cache.logit_attrs(resid, io, incorrect_tokens=s, pos_slice=-1)).mean(1)
    bias = float(np.mean(b_U[io] - b_U[s]))
    labels, by_comp = [*labels, "ln_final.b + b_U"], np.append(by_comp, bias)
    heads, hlabels = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
    by_head = np.asarray(cache.logit_attrs(heads, io, incorrect_tokens=s, pos_slice=-1)).mean(1)
    L, H = d.m.cfg.n_layers, d.m.cfg.n_heads
    grid = by_head.reshape(L, H)
    best = int(np.argmax(by_head))
    actual = float((ioi["logits"][np.arange(len(io)), io] - ioi["logits"][np.arange(len(io)), s]).mean())
    d.summary["dla"] = {"labels": labels, "by_component": by_comp.tolist(), "by_head": grid.tolist(),
                        "top_head": hlabels[best], "top_head_attr": float(by_head[best]),
                        "sum_of_components": float(by_comp.sum()), "actual_logit_diff": actual}
    d.say("== direct logit attribution of logit(IO) - logit(S) at the last token (mean over held-out prompts)")
    for lab, v in zip(labels, by_comp):
        d.say(f"  {lab:>12s} {v:+7.3f}")
    d.say(f"  sum {by_comp.sum():+.3f} (actual logit difference {actual:+.3f})")
    d.say("  by head:        " + "".join(f"    H{h}" for h in range(H)))
    for l in range(L):
        d.say(f"  layer {l}:        " + "".join(f"{v:+6.2f}" for v in grid[l]))
    d.say(f"  head writing most for the right name: {hlabels[best]} ({by_head[best]:+.2f})")
    body = Report.text(f"Each component's direct contribution to logit(IO) − logit(S) through the final "
                       f"LayerNorm (cached scale; its weight folded into W_U, its bias one term). Components sum to {by_comp.sum():.3f}; the model's actual "
                       f"mean logit difference is {actual:.3f}. The head writing most for the right name is "
                       f"{hlabels[best]} ({by_head[best]:+.2f}).")
    body += table(["component", "attribution"], [[lab, float(v)] for lab, v in zip(labels, by_comp)])
    body += table(["layer", *[f"H{h}" for h in range(H)]], [[l, *map(float, grid[l])] for l in range(L)])
    if d.plots:
        body += d.figure("dla.png", "dla", labels=list(labels), by_component=by_comp.tolist(), by_head=grid.tolist())
    d.report.add("Direct logit attribution (IOI-like task)", body)


def stage_induction(d: _Demo) -> None:
    m = d.m
    seq_len = min(50, (m.cfg.n_ctx - 1) // 2)
    toks = data.repeated_tokens(np.random.default_rng(SEED), 8, seq_len, m.cfg.d_vocab, m.tokenizer.bos_token_id)
    _, cache = m.run_with_cache(toks, names_filter=lambda n: n.endswith("attn.hook_pattern"))
    sc = np.stack([induction_scores(np.asarray(cache["pattern", l]), seq_len) for l in range(m.cfg.n_layers)])
    l, h = np.unravel_index(int(sc.argmax()), sc.shape)
    d.summary["induction"] = {"seq_len": seq_len, "scores": sc.tolist(), "best_head": f"L{l}H{h}",
                              "best_score": float(sc[l, h])}
    d.say(f"== induction scores per head (8 sequences: BOS + {seq_len} random tokens, repeated)")
    d.say("            " + "".join(f"    H{k}" for k in range(sc.shape[1])))
    for i in range(sc.shape[0]):
        d.say(f"  layer {i}:  " + "".join(f"{v:6.2f}" for v in sc[i]))
    d.say(f"  best induction head: L{l}H{h} (score {sc[l, h]:.2f})")
    body = Report.text(f"Mean attention from each token of the second half to the token after its earlier "
                       f"occurrence. Best induction head: L{l}H{h}, score {sc[l, h]:.2f}.")
    body += table(["layer", *[f"H{k}" for k in range(sc.shape[1])]], [[i, *map(float, sc[i])] for i in range(len(sc))])
    if d.plots:
        body += d.figure("induction_scores.png", "induction", scores=sc.tolist())
    short = data.repeated_tokens(np.random.default_rng(SEED + 1), 1, 10, m.cfg.d_vocab, m.tokenizer.bos_token_id)
    _, c2 = m.run_with_cache(short, names_filter=lambda n: n.endswith("attn.hook_pattern"))
    pats = np.stack([np.asarray(c2["pattern", i])[0] for i in range(m.cfg.n_layers)])
    body += Report.text("Attention of every head on BOS + 10 random tokens repeated (the induction stripe is "
                        "the diagonal 9 below the main one). Hover a cell for its tokens and weight.")
    body += attention_grid(m.to_str_tokens(short[0]), pats)
    d.report.add("Induction heads", body)


def stage_generation(d: _Demo) -> None:
    m = d.m
    d.say("== greedy generation (16 new tokens)")
    outs = m.generate(list(GEN_PROMPTS), max_new_tokens=16, do_sample=False, return_type="str")
    rows, res = [], {}
    for p, text in zip(GEN_PROMPTS, outs):
        cont = text[len(p):] if text.startswith(p) else text
        res[p] = cont
        d.say(f"  {p!r} -> {cont!r}")
        rows.append([p, cont])
    d.summary["generation"] = res
    d.report.add("Greedy generation", table(["prompt", "continuation"], rows))


def stage_patterns(d: _Demo) -> None:
    m = d.m
    body = Report.text("Attention pattern of every head (rows: query token, columns: key token). Hover a cell "
                       "for query → key and the weight; hover a label for the token.")
    chosen = d.prompts[:2] + [p for p in d.prompts[2:] if "<" in p][:2]
    toks, mask = m.to_tokens(chosen, return_mask=True)
    toks, mask = np.asarray(toks)[:, :MAX_PATTERN_TOKENS], np.asarray(mask)[:, :MAX_PATTERN_TOKENS]
    _, cache = m.run_with_cache(toks, attention_mask=mask, names_filter=lambda n: n.endswith("attn.hook_pattern"))
    layers = [np.asarray(cache["pattern", l]) for l in range(m.cfg.n_layers)]  # sliced on the host
    for i, p in enumerate(chosen):
        n = int(mask[i].sum())
        pats = np.stack([pat[i, :, :n, :n] for pat in layers])
        body += f"<h3>{esc(p)}</h3>" + attention_grid(m.to_str_tokens(toks[i, :n]), pats)
    d.report.add("Attention patterns", body)


STAGES: tuple[tuple[str, Callable[[_Demo], None]], ...] = (
    ("top predictions", stage_predictions), ("IOI accuracy", stage_ioi_accuracy), ("logit lens", stage_logit_lens),
    ("direct logit attribution", stage_dla), ("induction scores", stage_induction),
    ("generation", stage_generation), ("attention patterns", stage_patterns),
)


def run_demo(model: str | Path | None, out: Path, prompts: Sequence[str] | None = None) -> int:
    """Run every stage on `model` (default: the shipped model) and write the report into `out`.

    `prompts` replaces the demo's prompts for top predictions and attention patterns.
    Returns 0 (the CLI's exit code).
    """
    from jaxlens.assets import model_dir

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = Path(model) if model is not None else model_dir()
    prompts = list(prompts) if prompts is not None else list(PROMPTS)
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty strings")
    # the figures' process starts first: it imports matplotlib while this one loads the model
    plots = Plotter() if importlib.util.find_spec("matplotlib") is not None else None
    try:
        return _run_stages(path, out, prompts, plots)
    except BaseException:
        if plots is not None:
            plots.kill()
        raise


def _run_stages(path: Path, out: Path, prompts: list[str], plots: Plotter | None) -> int:
    """`run_demo` once its checks pass and the figures' process runs: load, every stage, the files."""
    from tqdm.auto import tqdm

    import jaxlens

    m = jaxlens.from_pretrained(path)
    if m.tokenizer is None:
        raise ValueError(f"{path} has no tokenizer; the demo needs text (pass a folder saved with its tokenizer)")
    d = _Demo(m, out, prompts, plots)
    d.say(f"model: {path} ({m.cfg.model_type}, {m.cfg.n_layers} layers, {m.cfg.n_heads} heads, "
          f"d_model {m.cfg.d_model}, vocab {m.cfg.d_vocab})")
    if d.plots is None:
        d.say("plots: matplotlib is not installed, so no PNG files (pip install 'jaxlens[plots]'); "
              "the HTML report is written without them")
    log = path / "training_log.json"
    if log.is_file():
        info = json.loads(log.read_text())
        d.report.add("Model", Report.text(f"{m.cfg.n_layers} layers, {m.cfg.n_heads} heads, d_model {m.cfg.d_model}, "
                                          f"vocabulary {m.cfg.d_vocab}; trained {info.get('train_seconds')} s "
                                          f"with: {info.get('command')}"))
    for name, fn in tqdm(STAGES, desc="jaxlens demo", unit="stage", disable=None):  # no bar off a terminal
        fn(d)
    d.finish_figures()
    d.report.write(out / "report.html")
    (out / "summary.json").write_text(json.dumps(d.summary, indent=1, default=float) + "\n")
    (out / "demo.txt").write_text("\n".join(d.lines) + "\n")
    files = sorted(p.name for p in out.iterdir() if re.search(r"\.(html|json|txt|png)$", p.name))
    print(f"\nwrote {out}/: {', '.join(files)}")
    return 0

__all__ = ["IOI_PROMPT", "PROMPTS", "GEN_PROMPTS", "SEED", "MAX_PATTERN_TOKENS", "stage_predictions",
           "stage_ioi_accuracy", "stage_logit_lens", "stage_dla", "stage_induction", "stage_generation",
           "stage_patterns", "STAGES", "run_demo"]
