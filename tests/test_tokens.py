"""load_tokenizer's direct path: the same tokenizer AutoTokenizer gives, without importing torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from jaxlens.assets import model_dir
from jaxlens.tokens import GENERIC_TOKENIZER_TYPES, _generic_fast, load_tokenizer

TEXTS = ["When Mary and John went to the store, John gave a drink to", " 1 2 3\n\tx", ""]


def tokenizer_folder(tmp_path: Path, model_type: str, **tok_cfg: Any) -> Path:
    """The shipped model's tokenizer files beside a config.json of `model_type`."""
    d = tmp_path / model_type
    d.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir() / f, d / f)
    if tok_cfg:
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        (d / "tokenizer_config.json").write_text(json.dumps({**cfg, **tok_cfg}))
    (d / "config.json").write_text(json.dumps({"model_type": model_type}))
    return d


def same_tokenizer(a, b) -> None:
    assert type(a) is type(b)
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "bos_token_id", "eos_token_id", "pad_token_id",
                 "padding_side", "model_max_length"):
        assert getattr(a, attr) == getattr(b, attr), attr
    for t in TEXTS:
        assert a(t)["input_ids"] == b(t)["input_ids"] and a.tokenize(t) == b.tokenize(t)
        assert a.decode(a(t)["input_ids"]) == b.decode(b(t)["input_ids"])
    assert a(TEXTS, padding=True)["input_ids"] == b(TEXTS, padding=True)["input_ids"]


@pytest.mark.parametrize("model_type", sorted(GENERIC_TOKENIZER_TYPES))
def test_direct_path_is_autotokenizer(tmp_path, model_type):
    """For every type on the direct path AutoTokenizer arrives at the same class and behaviour:
    if transformers starts remapping one of them, this fails instead of jaxlens diverging."""
    from transformers import AutoTokenizer

    d = tokenizer_folder(tmp_path, model_type)
    assert _generic_fast(d)
    same_tokenizer(load_tokenizer(d), AutoTokenizer.from_pretrained(str(d)))


@pytest.mark.parametrize("model_type,tok_cfg", [("qwen2", {}), ("phi3", {}), ("gpt2", {"tokenizer_class": "GPT2Tokenizer"}),
                                                ("gpt2", {"auto_map": {"AutoTokenizer": [None, "x.Tok"]}})])
def test_other_folders_go_through_autotokenizer(tmp_path, model_type, tok_cfg):
    d = tokenizer_folder(tmp_path, model_type, **tok_cfg)
    assert not _generic_fast(d)
    if "auto_map" not in tok_cfg:
        from transformers import AutoTokenizer

        same_tokenizer(load_tokenizer(d), AutoTokenizer.from_pretrained(str(d)))


def test_shipped_tokenizer_loads_without_torch():
    code = ("import sys; from jaxlens.tokens import load_tokenizer; from jaxlens.assets import model_dir; "
            "t = load_tokenizer(model_dir()); assert t('a b')['input_ids']; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
