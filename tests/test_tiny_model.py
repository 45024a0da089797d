"""The model jaxlens trains and ships: its files, HF/TransformerLens parity, and the behaviour
it was trained for (an induction head, the IOI-like task on held-out templates); plus the data
generator, the GPT-2 exporter and the probes it relies on."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from conftest import assert_close, boot_bridge
from jaxlens.apps import data
from jaxlens.assets import model_dir
from jaxlens.apps.export import gpt2_state_dict, save_hf_gpt2
from jaxlens.apps.probes import induction_scores, ioi_batch, ioi_scores, model_induction_scores, model_ioi_scores

MAX_BYTES = 20 * 2**20


@pytest.fixture(scope="module")
def shipped():
    import jaxlens

    return jaxlens.from_pretrained_no_processing(model_dir())


@pytest.fixture(scope="module")
def hf_shipped():
    import transformers

    return transformers.GPT2LMHeadModel.from_pretrained(str(model_dir())).eval()


# --- the shipped checkpoint ------------------------------------------------------------------

def test_shipped_files_and_size():
    d = model_dir()
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "training_log.json"):
        assert (d / f).is_file(), f"{f} missing from {d}"
    total = sum(p.stat().st_size for p in d.iterdir() if p.is_file())
    assert total <= MAX_BYTES, f"shipped model is {total / 2**20:.1f} MiB > 20 MiB"
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]


def test_training_log_records_curve_and_final_losses():
    log = json.loads((model_dir() / "training_log.json").read_text())
    curve = log["curve"]
    assert len(curve) >= 20 and curve[0]["step"] == 1
    assert curve[-1]["loss"] < curve[0]["loss"] - 2.0, "the recorded curve shows no learning"
    final = log["final"]
    assert set(final["eval_loss"]) >= {"ioi", "random_repeat", *data.DOC_KINDS}
    # (the model's behaviour is measured on the shipped weights below, not read back from this log)
    assert log["train_seconds"] > 0 and log["command"].startswith("python scripts/train_tiny.py")


def test_autotokenizer_loads_and_names_are_single_tokens():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir()))
    assert tok.bos_token == tok.eos_token == "<|endoftext|>"
    for name in data.NAMES:
        assert len(tok.encode(" " + name, add_special_tokens=False)) == 1, name
    text = "When Mary and John went to the store, John gave a drink to Mary."
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_hf_gpt2_logits_equal_jaxlens(shipped, hf_shipped):
    """GPT2LMHeadModel.from_pretrained(shipped_dir) and jaxlens agree (f32), on padded batches too."""
    toks, mask = shipped.to_tokens(["When Mary and John went to the store, John gave a drink to",
                                    "1 2 3 4", "( [ { } ] )"], return_mask=True)
    toks, mask = np.asarray(toks), np.asarray(mask)
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        ref = hf_shipped(input_ids=torch.tensor(toks, dtype=torch.long), attention_mask=torch.tensor(mask),
                         position_ids=torch.tensor(pos, dtype=torch.long)).logits.numpy()
    ours = np.asarray(shipped(toks, attention_mask=mask))
    real = mask.astype(bool)
    assert_close(ours[real], ref[real], "logits")


# --- behaviour -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def probe_tokens(shipped):
    return data.repeated_tokens(np.random.default_rng(1234), 16, 50, shipped.cfg.d_vocab, shipped.tokenizer.bos_token_id)


def test_some_head_is_an_induction_head(shipped, probe_tokens):
    scores = model_induction_scores(shipped.params, shipped.cfg, probe_tokens)
    l, h = np.unravel_index(scores.argmax(), scores.shape)
    assert scores[l, h] >= 0.4, f"best induction score {scores[l, h]:.3f} (L{l}H{h}) < 0.4:\n{np.round(scores, 3)}"
    assert l >= 1, "an induction head needs a previous-token head below it"


def test_induction_score_matches_transformer_lens_patterns(shipped, probe_tokens):
    """The score read off TransformerLens 4.x's own patterns equals ours."""
    bridge = boot_bridge(model_dir(), processed=False)
    toks = probe_tokens[:4]
    with torch.no_grad():
        _, ref = bridge.run_with_cache(torch.tensor(toks, dtype=torch.long),
                                       names_filter=lambda n: n.endswith("hook_pattern"))
    ours = model_induction_scores(shipped.params, shipped.cfg, toks)
    theirs = np.stack([induction_scores(ref[f"blocks.{l}.attn.hook_pattern"].numpy(), 50)
                       for l in range(shipped.cfg.n_layers)])
    assert_close(ours, theirs, "induction scores")


def test_ioi_task_on_heldout_templates(shipped):
    exs = data.ioi_examples(99, 240, "heldout")
    assert {e.template for e in exs} == set(data.HELDOUT_TEMPLATES)
    sc = model_ioi_scores(shipped.params, shipped.cfg, ioi_batch(shipped.tokenizer, exs, shipped.tokenizer.bos_token_id))
    assert sc["top1"] >= 0.8, sc
    assert sc["logit_diff"] > 0, sc


# --- data generator --------------------------------------------------------------------------

def test_data_is_deterministic_from_the_seed():
    assert data.corpus(3, 50) == data.corpus(3, 50)
    assert data.corpus(3, 50) != data.corpus(4, 50)
    assert data.prompts(0, 40) == data.prompts(0, 40)
    r1, r2 = (data.random_repeat_rows(np.random.default_rng(5), 4, 32, 100, 0) for _ in range(2))
    np.testing.assert_array_equal(r1[0], r2[0])


def _template_regex(i: int, a: int) -> re.Pattern:
    text = re.escape(data.INTROS[i] + data.ACTIONS[a])
    for ph in ("A", "B", "S", "P", "O"):
        text = text.replace(re.escape("{" + ph + "}"), r"\w+")
    return re.compile(text + r" \w+\.$")


def test_heldout_templates_are_never_trained_on():
    assert set(data.HELDOUT_TEMPLATES).isdisjoint(data.TRAIN_TEMPLATES)
    assert len(data.HELDOUT_TEMPLATES) + len(data.TRAIN_TEMPLATES) == len(data.TEMPLATES)
    # every intro and every action clause is still seen in training, in other combinations
    assert {i for i, _ in data.TRAIN_TEMPLATES} == set(range(len(data.INTROS)))
    assert {a for _, a in data.TRAIN_TEMPLATES} == set(range(len(data.ACTIONS)))
    regexes = {t: _template_regex(*t) for t in data.TEMPLATES}
    rng = np.random.default_rng(0)
    for _ in range(400):
        doc = data.document(rng, "ioi")
        matched = [t for t, r in regexes.items() if r.match(doc)]
        assert len(matched) == 1 and matched[0] in data.TRAIN_TEMPLATES, (doc, matched)


def test_ioi_example_answer_is_the_name_not_repeated():
    for e in data.ioi_examples(1, 64, "all"):
        assert e.io != e.s
        count = lambda name, e=e: len(re.findall(rf"\b{name}\b", e.prompt))  # noqa: E731
        assert count(e.io) == 1 and count(e.s) == 2
        assert e.text == f"{e.prompt} {e.io}."
    orders = {e.prompt.index(e.io) < e.prompt.index(e.s) for e in data.ioi_examples(2, 64, "train")}
    assert orders == {True, False}, "both ABBA and BABA orders occur"


def test_random_repeat_rows_tile_and_weight():
    toks, w = data.random_repeat_rows(np.random.default_rng(0), 8, 40, 50, bos=7, exclude=[3], max_span=6)
    assert toks.shape == w.shape == (8, 40)
    assert (toks[:, 0] == 7).all() and not np.isin(toks[:, 1:], [3, 7]).any()
    for row, wr in zip(toks, w):
        n = int((wr == 0).sum()) - 1  # BOS + the first copy are unweighted
        assert 4 <= n <= 6
        np.testing.assert_array_equal(row[1 + n:], row[1:40 - n])
    with pytest.raises(ValueError, match="span lengths"):
        data.random_repeat_rows(np.random.default_rng(0), 1, 9, 50, 0, min_span=5)


def test_repeated_tokens_is_the_transformer_lens_probe():
    t = data.repeated_tokens(np.random.default_rng(0), 3, 10, 50, bos=0)
    assert t.shape == (3, 21) and (t[:, 0] == 0).all()
    np.testing.assert_array_equal(t[:, 1:11], t[:, 11:])


def test_pack_rows_separates_documents_with_bos():
    docs = iter([([5, 6, 7], [1.0, 2.0, 1.0])] * 10)
    toks, w = data.pack_rows(docs, 2, 9, bos=0)
    np.testing.assert_array_equal(toks[0], [0, 5, 6, 7, 0, 5, 6, 7, 0])
    np.testing.assert_array_equal(w[0], [0, 1, 2, 1, 1, 1, 2, 1, 1])


def test_data_errors_name_the_fix():
    with pytest.raises(ValueError, match="split must be"):
        data.ioi_examples(0, 3, "test")
    with pytest.raises(ValueError, match="unknown document kind"):
        data.document(np.random.default_rng(0), "poems")


def test_shipped_prompts_file_is_pattern_lens_format(shipped):
    from jaxlens.assets import TINY

    lines = (TINY.parent / "prompts.jsonl").read_text().splitlines()
    assert 200 <= len(lines) <= 1000
    rows = [json.loads(x) for x in lines]
    assert all(set(r) == {"text"} and isinstance(r["text"], str) and r["text"] for r in rows)
    assert rows == data.prompts(0, len(rows)), "prompts.jsonl is reproducible from data.prompts(seed=0)"
    longest = max(len(shipped.tokenizer.encode(r["text"], add_special_tokens=False)) for r in rows)
    assert longest + 1 <= shipped.cfg.n_ctx, "every prompt (with BOS) fits the shipped model's context"


# --- exporter and probes ---------------------------------------------------------------------

def test_export_is_the_inverse_of_conversion(tmp_path):
    """HF GPT-2 -> jaxlens params -> HF tensors gives back every tensor exactly; saved, it reloads."""
    import transformers

    from hf_models import build
    from jaxlens.conversion import load_any

    path, model = build("gpt2", tmp_path / "hf")
    cfg, params = load_any(path)
    sd = gpt2_state_dict(cfg, params)
    ref = {k: v.numpy() for k, v in model.state_dict().items() if not k.endswith((".attn.bias", ".masked_bias"))}
    ref.pop("lm_head.weight")  # tied to wte
    assert set(sd) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(sd[k], ref[k], err_msg=k)
    out = save_hf_gpt2(tmp_path / "again", cfg, params)
    again = transformers.GPT2LMHeadModel.from_pretrained(str(out)).eval()
    toks = torch.tensor([[0, 5, 9, 30, 2, 7]])
    with torch.no_grad():
        assert_close(again(toks).logits.numpy(), model(toks).logits.numpy(), "reloaded logits")


def test_export_rejects_what_gpt2_cannot_hold(tmp_path):
    from hf_models import build
    from jaxlens.conversion import load_any
    from jaxlens.model.forward import stack_layers

    cfg, params = load_any(build("gpt2", tmp_path)[0])
    with pytest.raises(ValueError, match="b_U is not zero"):
        gpt2_state_dict(cfg, {**params, "b_U": np.ones(cfg.d_vocab, np.float32)})
    with pytest.raises(ValueError, match="scanned layout"):
        gpt2_state_dict(cfg, stack_layers(params, cfg.n_layers))
    with pytest.raises(ValueError, match="normalization_type"):
        gpt2_state_dict(cfg.replace(normalization_type="RMS"), params)


def test_induction_score_definition():
    s, n = 5, 11
    perfect = np.zeros((2, 3, n, n), np.float32)
    for q in range(s + 1, n):
        perfect[:, 0, q, q - s + 1] = 1.0  # head 0: the induction target
        perfect[:, 1, q, q - 1] = 1.0  # head 1: previous token
    perfect[:, 2] = np.tril(np.ones((n, n))) / np.arange(1, n + 1)[:, None]  # head 2: uniform
    sc = np.asarray(induction_scores(perfect, s))
    assert sc[0] == pytest.approx(1.0) and sc[1] == pytest.approx(0.0)
    assert sc[2] == pytest.approx(np.mean([1 / (q + 1) for q in range(s + 1, n)]))
    with pytest.raises(ValueError, match="BOS \\+ two copies"):
        induction_scores(perfect, 4)


def test_ioi_scores_and_single_token_check(shipped):
    sc = ioi_scores(np.array([[0.0, 2.0, 1.0], [0.0, 1.0, 3.0]]), io=np.array([1, 1]), s=np.array([2, 2]))
    assert sc == {"top1": 0.5, "logit_diff_acc": 0.5, "logit_diff": -0.5}
    bad = data.IOIExample("When Zyxwvut and Mary went out, Mary said to", "Zyxwvut", "Mary", (0, 0))
    with pytest.raises(ValueError, match="single-token names"):
        ioi_batch(shipped.tokenizer, [bad], shipped.tokenizer.bos_token_id)
