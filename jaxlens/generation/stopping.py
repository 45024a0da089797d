"""Stopping criteria for compiled generation: HF's stop strings without torch, and the host
callback through which the decoding loop asks Python criteria after every step.

The loop is one XLA program; a criterion is Python. The program calls one module-level function
(`_ask_host`) with an integer handle, and the handle names the criteria of the call in flight
(`HostStop.active`). So one compiled program serves every set of criteria and can never run an
earlier call's: nothing of a criterion is baked into it.
"""

from __future__ import annotations

import itertools
import json
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _decoder_types(tokenizer: Any) -> tuple[str | None, set[str]]:
    """The backend decoder's class name and every `type` in its JSON state (fast tokenizers)."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return None, set()
    state = getattr(decoder, "__getstate__", lambda: None)()
    types: set[str] = set()
    try:
        config = json.loads(state.decode() if isinstance(state, bytes) else state) if state else None
    except (TypeError, ValueError):
        config = None

    def walk(c: Any) -> None:
        if isinstance(c, dict):
            if isinstance(c.get("type"), str):
                types.add(c["type"])
            for v in c.values():
                walk(v)
        elif isinstance(c, list):
            for v in c:
                walk(v)

    walk(config)
    return type(decoder).__name__, types


def matching_mode(tokenizer: Any) -> str | None:
    """How HF's StopStringCriteria compares a tokenizer's tokens: "byte_level" (GPT-2-style byte
    BPE) and "byte_fallback" (`<0xNN>` byte tokens) compare UTF-8 bytes, None compares text."""
    name, types = _decoder_types(tokenizer)
    if name == "ByteLevel":
        return "byte_level"
    if "ByteFallback" in types:
        return "byte_fallback"
    if "ByteLevel" in types:
        return "byte_level"
    return None


_VOCAB_TEXTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (key, texts, endable)


class StopStrings:
    """`stop_strings`: a row stops once one of the strings ends within its newest token.

    HF's `StopStringCriteria` semantics, without torch: the strings may straddle token
    boundaries and overhang either end ("st" + "opped" stops on "stop"), but a string that ended
    before the newest token (in the prompt, say) does not stop the row. Token texts are HF's: byte
    tokens as their bytes, others as the tokenizer writes them after a fixed prefix (so no
    tokenizer-added leading space). Called as `criterion(input_ids [batch pos], scores)`, it
    returns a bool per row.
    """

    _PREFIX = "abcdef"

    def __init__(self, tokenizer: Any, stop_strings: str | Sequence[str]):
        if tokenizer is None:
            raise ValueError("stop_strings needs a tokenizer (the strings are matched against token texts); this "
                             "model has none: pass stopping_criteria=, a callable on the token ids, instead")
        strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        bad = [s for s in strings if not isinstance(s, str)]
        if bad:
            raise TypeError(f"stop_strings must be a string or a list of strings, got {bad[0]!r}")
        strings = [s for s in strings if s]  # an empty string stops nothing (TransformerLens drops it too)
        if not strings:
            raise ValueError("stop_strings holds only empty strings: pass None for no stop strings")
        self.stop_strings = tuple(strings)
        self.mode = matching_mode(tokenizer)
        self._targets = tuple(s.encode("utf-8") for s in strings) if self.mode else self.stop_strings
        self._window = max(len(t) for t in self._targets)  # each token holds >= 1 unit of a match
        self._tokenizer = tokenizer
        self._byte_of = {c: b for b, c in _bytes_to_unicode().items()} if self.mode == "byte_level" else None
        self._base: list[str] | None = None
        self._texts, endable = self._vocab_texts()
        for s, t in zip(self.stop_strings, self._targets):
            if t not in endable:  # one scan of the vocabulary per string and tokenizer, remembered
                endable[t] = any(x is not None and (t in x or any(x.startswith(t[-k:]) for k in range(1, len(t))))
                                 for x in self._texts.values())
            if not endable[t]:
                raise ValueError(f"stop string {s!r} can never match: no token of the tokenizer's vocabulary can end "
                                 "it (HF's StopStringCriteria refuses it too); leave it out or check its characters")

    def _clean(self, token: str) -> Any:
        if self.mode == "byte_level" and all(c in self._byte_of for c in token):
            return bytes(self._byte_of[c] for c in token)
        if (self.mode == "byte_fallback" and len(token) == 6 and token.startswith("<0x") and token.endswith(">")
                and all(c in "0123456789abcdefABCDEF" for c in token[3:5])):
            return bytes([int(token[3:5], 16)])
        tok = self._tokenizer
        if self._base is None:
            ids = tok(self._PREFIX, add_special_tokens=False)["input_ids"]
            self._base = tok.convert_ids_to_tokens(ids)
        text = tok.convert_tokens_to_string(self._base + [token])
        text = text[text.index(self._PREFIX) + len(self._PREFIX):]
        return text.encode("utf-8") if self.mode else text

    def _vocab_texts(self) -> tuple[dict[int, Any], dict[Any, bool]]:
        """{id: text as matched} over the tokenizer's vocabulary (added tokens included), and
        {stop string: whether some token can end it}, made once per tokenizer and matching mode."""
        tok = self._tokenizer
        key = (len(tok), self.mode)
        try:
            cached = _VOCAB_TEXTS.get(tok)
        except TypeError:  # a tokenizer that cannot be weakly referenced: no cache
            cached = None
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        texts = {int(i): self._clean(token) for token, i in tok.get_vocab().items()}
        endable: dict[Any, bool] = {}
        try:
            _VOCAB_TEXTS[tok] = (key, texts, endable)
        except TypeError:
            pass
        return texts, endable

    def token_text(self, token_id: int) -> Any:
        """The token's text as matched (bytes or str); None for an id the vocabulary does not have."""
        return self._texts.get(int(token_id))

    def _row(self, ids: Sequence[int]) -> bool:
        texts = []
        for i in reversed(ids[-self._window:]):
            t = self.token_text(i)
            if t is None:  # an unknown id ends the text a match can use
                break
            texts.append(t)
        if not texts:
            return False
        text = texts[0][:0].join(reversed(texts))
        last_start = len(text) - len(texts[0])
        return any(text.find(t, max(0, last_start - len(t) + 1)) != -1 for t in self._targets)

    def __call__(self, input_ids: Any, scores: Any = None, **kwargs: Any) -> np.ndarray:
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise ValueError(f"StopStrings takes input_ids [batch pos], got shape {ids.shape}")
        return np.array([self._row(row.tolist()) for row in ids], bool)

    def __repr__(self) -> str:
        return f"StopStrings({list(self.stop_strings)!r})"


def _is_hf_criterion(c: Any) -> bool:
    """A transformers StoppingCriteria (which takes torch tensors), known without importing torch."""
    return any(k.__name__ == "StoppingCriteria" and k.__module__.startswith("transformers")
               for k in type(c).__mro__)


def resolve_criteria(stop_strings: Any, stopping_criteria: Any, tokenizer: Any) -> tuple[Callable, ...]:
    """`stop_strings` and `stopping_criteria` as one tuple of criteria (empty: none).

    stopping_criteria: a callable `(input_ids, scores) -> bool [batch] or bool`, or a list of them
    (a transformers `StoppingCriteriaList` included). transformers' criteria get torch tensors, as
    in HF and TransformerLens; any other callable gets numpy arrays."""
    criteria: list[Callable] = []
    if stop_strings is not None:
        strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        if any(isinstance(s, str) and s for s in strings) or any(not isinstance(s, str) for s in strings):
            criteria.append(StopStrings(tokenizer, strings))
    if stopping_criteria is not None:
        given = list(stopping_criteria) if isinstance(stopping_criteria, (list, tuple)) else [stopping_criteria]
        for c in given:
            if not callable(c):
                raise TypeError("stopping_criteria must be a callable (input_ids, scores) -> bool per row (a "
                                "transformers.StoppingCriteria, say) or a list of them, got "
                                f"{type(c).__name__}")
        criteria.extend(given)
    return tuple(criteria)


class HostStop:
    """The criteria of one generate call, asked by the compiled loop after every step.

    `prompt` [batch p] are the rows' prompt tokens (as fed, padding included): a criterion sees
    the running sequence, prompt then every token so far, and that step's logits [batch vocab].
    A criterion's exception stops the loop and is raised again by `active` after the call.
    `on_step(tokens [batch], done [batch]) -> bool`, if given, hears each step's new tokens and
    which rows are done (`generate_stream` streams them); returning True stops every row."""

    _ids = itertools.count(1)
    _live: dict[int, HostStop] = {}
    _lock = threading.Lock()

    def __init__(self, criteria: Sequence[Callable], prompt: np.ndarray,
                 on_step: Callable[[np.ndarray, np.ndarray], bool] | None = None):
        self.criteria = tuple(criteria)
        self.prompt = np.asarray(prompt)
        self.on_step = on_step
        self.error: BaseException | None = None

    @property
    def needed(self) -> bool:
        """Whether the loop must call back at all."""
        return bool(self.criteria) or self.on_step is not None

    def ask(self, out: np.ndarray, step: int, logits: np.ndarray, done_before: np.ndarray) -> np.ndarray:
        """The rows done after `step`: the loop's own (`done_before`: EOS, earlier stops) or by a criterion."""
        batch = self.prompt.shape[0]
        done = np.ones(out.shape[0], bool)  # bucket rows beyond the batch: always done
        if self.error is not None:
            return done
        ids = np.concatenate([self.prompt, out[:batch, :step + 1]], axis=1).astype(np.int64)
        scores = np.array(logits[:batch], np.float32)  # a writable copy (torch.from_numpy wants one)
        done[:batch] = done_before[:batch]
        try:
            for c in self.criteria:
                if _is_hf_criterion(c):
                    import torch

                    r = c(torch.from_numpy(ids), torch.from_numpy(scores))
                    r = r.detach().cpu().numpy() if isinstance(r, torch.Tensor) else r
                else:
                    r = c(ids, scores)
                r = np.asarray(r)
                if r.dtype != bool and not np.issubdtype(r.dtype, np.integer):
                    raise TypeError(f"stopping criterion {c!r} returned {r.dtype} values; it must return bools "
                                    f"(one per row, or one for all)")
                if r.shape not in ((), (batch,)):
                    raise ValueError(f"stopping criterion {c!r} returned shape {r.shape}, expected a per-row bool "
                                     f"of shape ({batch},) (one entry per sequence) or one bool")
                done[:batch] |= np.broadcast_to(r.astype(bool), (batch,))
            if self.on_step is not None and self.on_step(out[:batch, step].copy(), done[:batch].copy()):
                done[:] = True
        except Exception as e:  # noqa: BLE001 - raised again, whole, after the program returns
            self.error = e
            done[:] = True
        return done

    @contextmanager
    def active(self) -> Iterator[np.int32]:
        """Make these criteria answer the compiled loop's callback; yields the handle to pass it."""
        with HostStop._lock:
            handle = next(HostStop._ids) % (2**31 - 1)
            HostStop._live[handle] = self
        try:
            yield np.int32(handle)
        finally:
            with HostStop._lock:
                HostStop._live.pop(handle, None)
        if self.error is not None:
            raise self.error


def ask_host(handle: Any, out: Any, step: Any, logits: Any, done: Any) -> np.ndarray:
    """The loop's callback: the rows done after this step, by the loop or the criteria of call `handle`."""
    stop = HostStop._live.get(int(handle))
    if stop is None:  # cannot happen while `active` holds the handle
        raise RuntimeError(f"no stopping criteria registered under handle {int(handle)}")
    return stop.ask(np.asarray(out), int(step), np.asarray(logits), np.asarray(done))


__all__ = ["StopStrings", "matching_mode", "resolve_criteria", "HostStop", "ask_host"]
