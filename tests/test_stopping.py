"""TransformerLens 4's `generate(stop_strings=, stopping_criteria=)` and `generate_stream`: the
matcher against HF's StopStringCriteria on three kinds of tokenizer, generation and streaming
against the bridge's loop."""

from __future__ import annotations

import copy
import gc
import threading
import time

import numpy as np
import pytest
import torch
import transformers
from transformers.generation.stopping_criteria import StoppingCriteria, StopStringCriteria

import jaxlens
from conftest import boot_bridge, built, padded
from hf_models import CORPUS
from jaxlens.generation import generate as gen
from jaxlens.generation.stopping import StopStrings, matching_mode


def _byte_fallback_tokenizer():
    """A Llama-style tokenizer: BPE with `<0xNN>` byte fallback, Metaspace pre-tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    bpe = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    bpe.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    bpe.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"] + bytes_,
                                  initial_alphabet=[])
    bpe.train_from_iterator([CORPUS], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")


def _metaspace_tokenizer():
    """A SentencePiece-style BPE without byte fallback (decoder Metaspace): texts compared as str."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    sp = Tokenizer(models.BPE(unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Metaspace()
    sp.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>", eos_token="</s>")


@pytest.fixture(scope="module")
def tokenizers_(tmp_path_factory):
    from hf_models import make_tokenizer

    return {"byte_level": make_tokenizer(tmp_path_factory.mktemp("tok")), "byte_fallback": _byte_fallback_tokenizer(),
            None: _metaspace_tokenizer()}


@pytest.mark.parametrize("mode", ["byte_level", "byte_fallback", None])
def test_stop_strings_match_hf_stop_string_criteria(tokenizers_, mode):
    """Random token rows (ids past the vocabulary included) and stop strings cut from their own
    text across token boundaries, plus unicode and absent strings: every row's answer equals HF's."""
    tok = tokenizers_[mode]
    assert matching_mode(tok) == mode
    rng = np.random.default_rng(0)
    n_vocab = len(tok)
    rows = rng.integers(0, n_vocab + 3, (160, 7))
    texts = [tok.decode(r[-3:][r[-3:] < n_vocab].tolist()) for r in rows[:40]]
    cut = [t[rng.integers(0, max(1, len(t) - 1)):][: rng.integers(1, 6)] for t in texts if t.strip()]
    sets = [[s] for s in cut[:12] if s] + [["é"], ["zzzq", "ox"], ["the", "Bob", " "], cut[12:20]]
    hits = refused = 0
    for strings in sets:
        strings = [s for s in strings if s]
        if not strings:
            continue
        try:
            hf = StopStringCriteria(tok, strings)
        except ValueError:  # a string no token can end: HF refuses it, and so do we
            with pytest.raises(ValueError, match="can never match"):
                StopStrings(tok, strings)
            refused += 1
            continue
        ours = StopStrings(tok, strings)(rows)
        theirs = hf(torch.tensor(rows), None).numpy()
        np.testing.assert_array_equal(ours, theirs, f"{mode} {strings!r}")
        hits += int(ours.sum())
    assert hits > 20, "the strings must stop some rows for the comparison to mean anything"
    assert refused == (mode is None), "only the str-matching vocabulary has no token that can end 'é'"


@pytest.fixture(scope="module")
def gpt2(hf_root):
    path, _ = built("gpt2", hf_root)
    return jaxlens.from_pretrained_no_processing(path), boot_bridge(path, processed=False)


KW = dict(max_new_tokens=12, do_sample=False, return_type="tokens")


def _tl(bridge, toks, mask=None, **kw):
    t = torch.tensor(np.asarray(toks), dtype=torch.long)
    m = None if mask is None else torch.tensor(np.asarray(mask))
    return bridge.generate(t, attention_mask=m, verbose=False, use_past_kv_cache=False, **KW, **kw).numpy()


def test_generate_stop_strings_match_the_bridge(gpt2):
    """A string cut from the middle of the unstopped greedy text stops there, as in TL 4.3's
    loop; on a left-padded batch the stopped row is padded while the other goes on."""
    model, bridge = gpt2
    toks, mask = padded("left")
    plain = np.asarray(model.generate(toks, attention_mask=mask, stop_at_eos=False, **KW))
    new = plain[0, toks.shape[1]:]
    text = model.tokenizer.decode(new[4:7].tolist())
    stop = text[1:4] if len(text) > 4 else text
    assert stop, "the random model's greedy text must be non-empty"
    for stop_at_eos in (False, True):
        ours = np.asarray(model.generate(toks, attention_mask=mask, stop_at_eos=stop_at_eos, stop_strings=stop, **KW))
        theirs = _tl(bridge, toks, mask, stop_at_eos=stop_at_eos, stop_strings=stop)
        np.testing.assert_array_equal(ours, theirs, f"stop_strings={stop!r} stop_at_eos={stop_at_eos}")
    assert not np.array_equal(ours, plain), "the stop string must stop a row"
    one = toks[:1, mask[0].astype(bool)]
    ours = np.asarray(model.generate(one, stop_strings=[stop, "\x00never"], **KW))
    np.testing.assert_array_equal(ours, _tl(bridge, one, stop_strings=[stop, "\x00never"]))
    assert ours.shape[1] < one.shape[1] + KW["max_new_tokens"], "one row stops the loop"
    np.testing.assert_array_equal(np.asarray(model.generate(one, stop_strings=["", ""], **KW)),
                                  np.asarray(model.generate(one, **KW)))  # empty strings stop nothing, as in TL


class StopOn(StoppingCriteria):
    """Stops a row once it holds `token`, or once the step's top logit exceeds `cap` (reads scores)."""

    def __init__(self, token: int, cap: float = float("inf")):
        self.token, self.cap = token, cap

    def __call__(self, input_ids, scores, **kwargs):
        return (input_ids[:, -3:] == self.token).any(-1) | (scores.max(-1).values > self.cap)


def test_generate_stopping_criteria_match_the_bridge(gpt2):
    """transformers StoppingCriteria (torch tensors, a list, a StoppingCriteriaList, one reading
    the logits), as TL 4.3's loop; a plain numpy callable stops the same rows."""
    model, bridge = gpt2
    toks, mask = padded("left")
    plain = np.asarray(model.generate(toks, attention_mask=mask, stop_at_eos=False, **KW))
    token = int(plain[1, toks.shape[1] + 3])
    step_max = np.asarray([np.asarray(x).max(-1) for x in model.generate(
        toks, attention_mask=mask, stop_at_eos=False, output_logits=True, **KW).logits])
    cap = float(np.sort(step_max[:, 0])[-3])  # row 0's logits pass it from some step on
    for crit in (StopOn(token), [StopOn(token), StopOn(-1, cap)],
                 transformers.StoppingCriteriaList([StopOn(-1, cap)])):
        ours = np.asarray(model.generate(toks, attention_mask=mask, stop_at_eos=False, stopping_criteria=crit, **KW))
        theirs = _tl(bridge, toks, mask, stop_at_eos=False, stopping_criteria=crit)
        np.testing.assert_array_equal(ours, theirs, f"{crit!r}")
        assert not np.array_equal(ours, plain)
    numpy_crit = lambda ids, scores: (ids[:, -3:] == token).any(-1)  # noqa: E731
    ours = np.asarray(model.generate(toks, attention_mask=mask, stop_at_eos=False, stopping_criteria=numpy_crit, **KW))
    np.testing.assert_array_equal(ours, _tl(bridge, toks, mask, stop_at_eos=False, stopping_criteria=StopOn(token)))


def test_one_program_serves_every_criterion(gpt2):
    """The criteria reach the compiled loop through a callback handle, never as constants: other
    criteria reuse the program and give their own answers (no stale stop)."""
    model, _ = gpt2
    one = np.asarray([[0, 5, 9, 30, 2]], np.int32)
    calls = []
    n = []

    def after(k):
        def crit(ids, scores):
            calls.append(k)
            return np.asarray([ids.shape[1] >= 5 + k])
        return crit

    outs = {}
    for k in (2, 5, 3):
        outs[k] = np.asarray(model.generate(one, stop_at_eos=False, stopping_criteria=after(k), **KW))
        n.append(gen.compile_count())
    assert [outs[k].shape[1] for k in (2, 5, 3)] == [7, 10, 8]
    assert n[0] == n[1] == n[2], "a new criterion must not recompile"
    assert calls.count(5) == 5


def test_bad_criteria_are_clear_errors(gpt2):
    model, _ = gpt2
    one = np.asarray([[0, 5, 9]], np.int32)

    class Boom(Exception):
        pass

    def boom(ids, scores):
        raise Boom("from the criterion")

    with pytest.raises(Boom, match="from the criterion"):
        model.generate(one, stopping_criteria=boom, **KW)
    with pytest.raises(ValueError, match=r"returned shape \(3,\), expected a per-row bool of shape \(1,\)"):
        model.generate(one, stopping_criteria=lambda ids, s: np.zeros(3, bool), **KW)
    with pytest.raises(TypeError, match="returned float32 values"):
        model.generate(one, stopping_criteria=lambda ids, s: s[:, 0], **KW)
    with pytest.raises(TypeError, match="stopping_criteria must be a callable"):
        model.generate(one, stopping_criteria=[3], **KW)
    with pytest.raises(TypeError, match="stop_strings must be a string or a list of strings"):
        model.generate(one, stop_strings=[3], **KW)
    bare = copy.copy(model)
    bare.tokenizer = None
    with pytest.raises(ValueError, match="stop_strings needs a tokenizer"):
        bare.generate(one, stop_strings="x", **KW)
    # the model still generates after each error (nothing left registered, nothing stale)
    np.testing.assert_array_equal(np.asarray(model.generate(one, **KW)), np.asarray(model.generate(one, **KW)))


def _tl_stream(bridge, toks, mask=None, **kw):
    t = toks if isinstance(toks, (str, list)) else torch.tensor(np.asarray(toks), dtype=torch.long)
    m = None if mask is None else torch.tensor(np.asarray(mask))
    return [x if isinstance(x, (str, list)) else x.numpy()
            for x in bridge.generate_stream(t, attention_mask=m, verbose=False, use_past_kv_cache=False, **kw)]


def test_generate_stream_matches_the_bridge(gpt2):
    """Every yield equals TL 4.3's (the prompt counted into the first, the remainder last), on one
    prompt, a left-padded batch whose rows stop at different steps, and text (held-back partial
    characters included); joined, the yields are generate's output."""
    from jaxlens.generation.stopping import HostStop

    model, bridge = gpt2
    toks, mask = padded("left")
    plain = np.asarray(model.generate(toks, attention_mask=mask, stop_at_eos=False, **KW))
    stop = model.tokenizer.decode(plain[0, toks.shape[1] + 5:toks.shape[1] + 7].tolist())
    kw = dict(max_new_tokens=12, do_sample=False)
    one = toks[:1, mask[0].astype(bool)]
    for per_yield in (1, 3, 5, 25):
        for t, m, extra in ((one, None, {}), (toks, mask, dict(stop_strings=stop))):
            ours = [np.asarray(x) for x in model.generate_stream(t, attention_mask=m, max_tokens_per_yield=per_yield,
                                                                 stop_at_eos=False, **kw, **extra)]
            theirs = _tl_stream(bridge, t, m, max_tokens_per_yield=per_yield, stop_at_eos=False, **kw, **extra)
            assert [a.shape for a in ours] == [b.shape for b in theirs], f"per_yield {per_yield} {extra}"
            for a, b in zip(ours, theirs):
                np.testing.assert_array_equal(a, b)
            whole = np.asarray(model.generate(t, attention_mask=m, stop_at_eos=False, return_type="tokens", **kw,
                                              **extra))
            np.testing.assert_array_equal(np.concatenate(ours, 1), whole)
    texts = ["1 2 3", "The quick brown"]
    for per_yield in (2, 4):
        ours = list(model.generate_stream(texts, max_tokens_per_yield=per_yield, stop_at_eos=False, **kw))
        assert ours == _tl_stream(bridge, texts, max_tokens_per_yield=per_yield, stop_at_eos=False, **kw)
        assert ["".join(parts) for parts in zip(*ours)] == model.generate(texts, stop_at_eos=False, **kw)
    assert not HostStop._live, "nothing stays registered after a stream"


def test_generate_stream_closed_early_stops_the_loop(gpt2):
    from jaxlens.generation.stopping import HostStop

    model, _ = gpt2
    one = np.asarray([[0, 5, 9, 30, 2]], np.int32)
    seen = []
    stream = model.generate_stream(one, max_new_tokens=40, max_tokens_per_yield=1, stop_at_eos=False,
                                   do_sample=False, stopping_criteria=lambda ids, s: seen.append(ids.shape[1]) or False)
    first = next(stream)
    assert first.shape == (1, 6)
    stream.close()  # returns once the worker has finished: the loop stopped within a step or two
    assert len(seen) < 40 and not HostStop._live

    # an idle reader holds the loop one yield ahead; it resumes where it was, and the tokens are generate's
    seen.clear()
    kw = dict(max_new_tokens=40, max_tokens_per_yield=3, stop_at_eos=False, do_sample=False)
    stream = model.generate_stream(one, **kw, stopping_criteria=lambda ids, s: seen.append(ids.shape[1]) or False)
    parts = [np.asarray(next(stream))]
    time.sleep(1.0)  # an unbounded queue let the loop run all 40 steps in this time
    held = len(seen)
    assert held <= 2 * 3 + 2, f"the loop ran {held} steps ahead of a reader that took one yield"
    other: list = []  # the held loop blocks nothing else: a forward, a generate and a stream (host callbacks) run
    side = threading.Thread(target=lambda: other.extend([
        model(one), model.generate(one, **KW, stopping_criteria=lambda ids, s: False),
        list(model.generate_stream(one, max_new_tokens=3, max_tokens_per_yield=1, do_sample=False))]), daemon=True)
    side.start()
    side.join(timeout=120)
    assert len(other) == 3, "a forward, a generate or a second stream hung while a stream was held"
    parts += [np.asarray(x) for x in stream]
    plain = {k: v for k, v in kw.items() if k != "max_tokens_per_yield"}
    whole = np.asarray(model.generate(one, return_type="tokens", **plain))
    np.testing.assert_array_equal(np.concatenate(parts, 1), whole)
    # dropping the last reference to a suspended stream stops its loop and its worker
    seen.clear()
    stream = model.generate_stream(one, **kw, stopping_criteria=lambda ids, s: seen.append(ids.shape[1]) or False)
    next(stream)
    del stream
    gc.collect()
    assert len(seen) < 40 and not HostStop._live
    assert not [t for t in threading.enumerate() if t.name == "jaxlens-generate-stream"]

    def boom(ids, scores):
        raise KeyError("criterion failed")

    with pytest.raises(KeyError, match="criterion failed"):
        list(model.generate_stream(one, max_new_tokens=4, stopping_criteria=boom, do_sample=False))
    with pytest.raises(ValueError, match="max_tokens_per_yield must be an int >= 1"):
        next(model.generate_stream(one, max_tokens_per_yield=0))
    with pytest.raises(ValueError, match="generate_stream yields tokens only: output_logits"):
        next(jaxlens.generate.generate_stream(model, one, output_logits=True))
