"""`jaxlens demo` on the shipped model: terminal output, report files, HTML escaping, and a
headless-Chromium rendering of the report (skipped when Chromium is not installed)."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from jaxlens.apps.report import Report, attention_svg, esc, table

EVIL = '<script>alert("pwned")</script> & "quotes"'


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    """Run the demo once (default model) with an extra prompt that holds markup."""
    from jaxlens.apps.demo import PROMPTS, run_demo

    out = tmp_path_factory.mktemp("demo")
    assert run_demo(None, out, prompts=[*PROMPTS, EVIL]) == 0
    return out


def test_demo_writes_report_files(demo_out):
    for f in ("report.html", "summary.json", "demo.txt"):
        assert (demo_out / f).is_file() and (demo_out / f).stat().st_size > 0, f
    pytest.importorskip("matplotlib")
    for f in ("logit_lens.png", "dla.png", "induction_scores.png"):
        assert (demo_out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f


def test_demo_finds_the_circuits(demo_out):
    s = json.loads((demo_out / "summary.json").read_text())
    assert s["induction"]["best_score"] >= 0.4
    text = (demo_out / "demo.txt").read_text()
    assert f"best induction head: {s['induction']['best_head']}" in text
    assert s["ioi_heldout"]["top1"] >= 0.8
    dla = s["dla"]
    # the decomposition is exact: components (+ the final LN bias term) sum to the logit difference
    assert dla["sum_of_components"] == pytest.approx(dla["actual_logit_diff"], abs=1e-3)
    assert s["logit_lens"]["labels"][-1] == "final_post" and len(s["logit_lens"]["labels"]) == 2 * s["n_layers"] + 1
    assert s["logit_lens"]["p_io"][-1] > s["logit_lens"]["p_s"][-1], "the final layer prefers the right name"
    gen = s["generation"]  # the shipped model counts, recites the alphabet, copies (induction) and answers IOI
    assert gen["1 2 3 4 5"].startswith(" 6 7 8 9 10")
    assert gen["a b c d e"].startswith(" f g h i j")
    assert gen["paper horse cloud song paper horse"].startswith(" cloud song paper horse")
    assert gen["When Mary and John went to the store, John gave a drink to"].startswith(" Mary")


def test_report_escapes_prompt_markup(demo_out):
    page = (demo_out / "report.html").read_text()
    assert "<script" not in page.lower(), "no script tag may reach the page"
    assert esc(EVIL) in page and "&lt;script&gt;" in page
    assert 'src="data:image/png;base64,' in page  # matplotlib is in the [plots] extra `make test` installs
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page


def test_report_helpers_escape_and_check_shapes():
    html_table = table(["<b>"], [["<i>x</i>", 1.5, 2]])
    assert "<b>" not in html_table and "&lt;i&gt;x&lt;/i&gt;" in html_table and "1.500" in html_table
    svg = attention_svg(["<a>", '"q"'], np.array([[1.0, 0.0], [0.25, 0.75]]))
    assert "<a>" not in svg and "&lt;a&gt;" in svg and "&quot;q&quot;" in svg
    assert svg.count("<rect") == 3  # causal: the upper triangle is not drawn
    with pytest.raises(ValueError, match="does not match 3 tokens"):
        attention_svg(["a", "b", "c"], np.eye(2))
    r = Report("t <x>")
    r.add("s & s", Report.pre("<pre>"))
    assert "t &lt;x&gt;" in r.render() and "&lt;pre&gt;" in r.render()


def test_cli_demo_error_names_the_folder(tmp_path, capsys):
    from jaxlens.apps.cli import main

    assert main(["demo", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err


def test_demo_rejects_empty_prompts(tmp_path):
    from jaxlens.apps.demo import run_demo

    with pytest.raises(ValueError, match="prompts must be"):
        run_demo(None, tmp_path, prompts=[])


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if p := shutil.which(name):
            return p
    return None


def test_report_renders_in_headless_chromium(demo_out, tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium); cannot render the report")
    shot = tmp_path / "report.png"
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,2400",
           f"--screenshot={shot}", (demo_out / "report.html").resolve().as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plt = pytest.importorskip("matplotlib.pyplot")
    img = plt.imread(str(shot))
    assert img.shape[0] == 2400 and img.shape[1] == 1280
    ink = (img[..., :3].mean(-1) < 0.5).mean()
    assert 0.005 < ink < 0.5, f"the page looks blank or broken (dark-pixel share {ink:.4f})"


def test_report_inlines_every_figure(demo_out):
    page = (demo_out / "report.html").read_text()
    assert "<!--figure:" not in page, "every placeholder is replaced by its PNG"
    pytest.importorskip("matplotlib")
    assert page.count('src="data:image/png;base64,') == 3


def test_plotter_errors(tmp_path):
    """The figures' process: an unknown figure is refused at once; a figure that fails raises, with
    the child's traceback, when the demo waits for it; a killed plotter leaves nothing running."""
    pytest.importorskip("matplotlib")
    from jaxlens.apps.plots import Plotter

    p = Plotter()
    with pytest.raises(ValueError, match="unknown figure 'nope'"):
        p.draw(tmp_path / "x.png", "nope")
    p.draw(tmp_path / "ok.png", "induction", scores=[[0.1, 0.9], [0.5, 0.2]])
    p.draw(tmp_path / "bad.png", "induction", scores="not a grid")
    with pytest.raises(RuntimeError, match="drawing the demo's figures failed") as e:
        p.finish()
    assert "Traceback" in str(e.value)
    assert (tmp_path / "ok.png").read_bytes()[:4] == b"\x89PNG"
    q = Plotter()
    q.kill()
    assert q._proc.poll() is not None
