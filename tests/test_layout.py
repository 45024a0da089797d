"""The package layout (issue 10 item 4): sub-packages by idea, TransformerLens's module names kept,
every public module declares `__all__`, and no module imports another's private names."""

from __future__ import annotations

import ast
import importlib
import pathlib
import subprocess
import sys

import pytest

import jaxlens

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULES = sorted(p for d in ("jaxlens", "conversion") for p in (ROOT / d).rglob("*.py"))


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "conversion":
        parts = ["jaxlens", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


@pytest.mark.parametrize("short", sorted(jaxlens.SHORT_NAMES))
def test_short_names_are_the_same_module(short):
    home = importlib.import_module(jaxlens.SHORT_NAMES[short])
    assert importlib.import_module(f"jaxlens.{short}") is home
    if short != "forward":  # `jaxlens.forward` is the function, as before the move
        assert getattr(jaxlens, short) is home


def test_transformer_lens_entry_points_in_a_fresh_interpreter():
    code = ("import jaxlens, sys; import jaxlens.patching, jaxlens.utils, jaxlens.hook_points, jaxlens.demo;"
            "from jaxlens.utils import get_act_name, test_prompt, to_numpy;"
            "from jaxlens.head_detector import detect_head;"
            "assert jaxlens.patching is jaxlens.edits.patching and jaxlens.demo is jaxlens.apps.demo;"
            "assert callable(jaxlens.forward) and callable(jaxlens.patching.get_act_patch_resid_pre);"
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_declares_all(path):
    mod = importlib.import_module(module_name(path))
    assert hasattr(mod, "__all__"), f"{path} has no __all__"
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert not missing, f"{path}: __all__ names {missing} that it does not define"


def test_no_module_imports_another_modules_private_names():
    bad = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(("jaxlens", "conversion"))):
                bad += [f"{path.relative_to(ROOT)}:{node.lineno} {a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, bad
