"""The README's quickstart runs as written (the front door must stay true)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs(capsys):
    text = README.read_text()
    code = re.search(r"## Quickstart\n\n```python\n(.*?)```", text, re.S)
    assert code, "README.md has a ## Quickstart python block"
    exec(compile(code.group(1), "README quickstart", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "(1, 4, 15, 15)" in out  # cache["pattern", 0].shape of the shipped model on the prompt
