"""Deterministic training data for the small model jaxlens ships: text with findable mechanisms.

Random weights show no behaviour and nothing can be downloaded, so jaxlens trains its own model
on data made here, from a seed. Each kind of document teaches one mechanism an interpretability
demo can find:

- `ioi`: two names, then a clause whose subject repeats one of them; the sentence ends with the
  other name (an indirect-object-identification task, as in Wang et al. 2022). Templates are an
  intro clause times an action clause; `HELDOUT_TEMPLATES` are combinations never trained on.
- `words`: a span of random words, repeated (induction on text).
- `counting`, `alphabet`, `brackets` (balanced, nested) and short `story` sentences.
- `random_repeat_rows`: rows of uniformly random token ids, repeated (induction on any token,
  as TransformerLens measures it).

Everything takes a `numpy.random.Generator` (or a seed) and returns plain Python/numpy data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

# Common given names; each becomes one token (with its leading space) in the shipped tokenizer.
NAMES = ("Mary", "John", "Alice", "Bob", "Tom", "Anna", "Sarah", "James", "Kate", "Mark", "Lucy", "Paul",
         "Emma", "David", "Laura", "Peter", "Jane", "Mike", "Rose", "Sam", "Lisa", "Adam", "Grace", "Jack",
         "Amy", "Ben", "Claire", "Dan", "Eve", "Fred", "Helen", "Ian", "Julia", "Kevin", "Nina", "Oscar")
PLACES = ("store", "park", "school", "office", "garden", "station", "market", "library", "beach", "house",
          "hospital", "restaurant", "museum", "river", "kitchen", "farm")
OBJECTS = ("drink", "book", "ball", "letter", "gift", "key", "ring", "bag", "pen", "cake", "flower", "coin",
           "hat", "map", "box", "cup")
NOUNS = ("time", "year", "people", "way", "day", "man", "thing", "woman", "life", "child", "world", "school",
         "state", "family", "student", "group", "country", "problem", "hand", "part", "place", "case", "week",
         "company", "system", "program", "question", "work", "number", "night", "point", "home", "water",
         "room", "mother", "area", "money", "story", "fact", "month", "lot", "right", "study", "book", "eye",
         "job", "word", "business", "issue", "side", "kind", "head", "house", "service", "friend", "father",
         "power", "hour", "game", "line", "end", "member", "law", "car", "city", "name", "team", "minute",
         "idea", "kid", "body", "face", "level", "office", "door", "health", "person", "art", "war", "history",
         "party", "result", "change", "morning", "reason", "research", "girl", "guy", "moment", "air",
         "teacher", "force", "education", "river", "tree", "stone", "cloud", "bird",
         "fish", "horse", "dog", "cat", "apple", "bread", "milk", "glass", "paper", "music", "song", "window")
ADJECTIVES = ("red", "blue", "green", "black", "white", "small", "large", "old",
         "new", "good", "long", "little", "great", "high", "young", "early", "late", "happy", "strong", "cold",
         "warm", "dark", "light", "quiet", "loud", "fast", "slow")
WORDS = NOUNS + ADJECTIVES
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                "nineteen", "twenty")
BRACKETS = (("(", ")"), ("[", "]"), ("{", "}"), ("<", ">"))

# IOI templates = INTROS x ACTIONS. {A}/{B} are the two names in order, {S} the repeated one,
# {P} a place, {O} an object; the sentence continues with " {IO}." (the name not repeated).
# The repeated name S2 stands 1 to 6 tokens before the answer. Where it is adjacent ("S thanked"),
# the previous-token head already brings S to the last position, and the model learns quickly to
# avoid the name it holds; that skill then pulls S forward from further back (a curriculum).
INTROS = (
    "When {A} and {B} went to the {P},",
    "After {A} and {B} arrived at the {P},",
    "While {A} and {B} were working at the {P},",
    "Then, {A} and {B} went to the {P}.",
    "Yesterday {A} and {B} had lunch at the {P}.",
    "Once {A} and {B} found a {O} at the {P},",
    "Since {A} and {B} were bored at the {P},",
    "Later, {A} and {B} walked to the {P}.",
)
ACTIONS = (
    " {S} gave a {O} to",
    " {S} handed the {O} to",
    " {S} decided to give a {O} to",
    " {S} thanked",
    " {S} passed the {O} to",
    " {S} called",
    " {S} smiled at",
    " {S} said goodbye to",
)
TEMPLATES = tuple((i, a) for i in range(len(INTROS)) for a in range(len(ACTIONS)))
# A quarter of the combinations, two per intro and two per action, are never trained on.
HELDOUT_TEMPLATES = tuple((i, a) for i, a in TEMPLATES if (a + i) % 4 == 0)
TRAIN_TEMPLATES = tuple(t for t in TEMPLATES if t not in HELDOUT_TEMPLATES)

DOC_KINDS = ("ioi", "story", "words", "counting", "alphabet", "brackets")
DOC_WEIGHTS = (0.30, 0.20, 0.15, 0.15, 0.05, 0.15)


@dataclass(frozen=True)
class IOIExample:
    """One IOI-like prompt: `prompt` should be continued by `" " + io` (the name not repeated)."""

    prompt: str
    io: str
    s: str
    template: tuple[int, int]

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.io}."


def _rng(seed: int | np.random.Generator) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def ioi_example(rng: np.random.Generator, template: tuple[int, int], names: Sequence[str] = NAMES) -> IOIExample:
    """An IOI-like sentence from one (intro, action) template, with random names, place, object
    and name order (ABBA or BABA, so the answer's position carries no information)."""
    io, s = rng.choice(len(names), size=2, replace=False)
    io, s = names[io], names[s]
    a, b = (io, s) if rng.random() < 0.5 else (s, io)
    i, k = template
    fill = dict(A=a, B=b, S=s, P=PLACES[rng.integers(len(PLACES))], O=OBJECTS[rng.integers(len(OBJECTS))])
    prompt = INTROS[i].format(**fill) + ACTIONS[k].format(**fill)
    return IOIExample(prompt, io, s, template)


def ioi_examples(seed: int | np.random.Generator, n: int, split: str = "heldout") -> list[IOIExample]:
    """`n` IOI-like examples cycling over the `split` ("train", "heldout" or "all") templates."""
    templates = {"train": TRAIN_TEMPLATES, "heldout": HELDOUT_TEMPLATES, "all": TEMPLATES}.get(split)
    if templates is None:
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    rng = _rng(seed)
    return [ioi_example(rng, templates[j % len(templates)]) for j in range(n)]


def story(rng: np.random.Generator) -> str:
    """A few simple sentences about named people, places and things."""
    a, b = rng.choice(NAMES, size=2, replace=False)
    p, o = rng.choice(PLACES), rng.choice(OBJECTS)
    w1, w2 = rng.choice(NOUNS, size=2, replace=False)
    adj = rng.choice(ADJECTIVES)
    forms = (
        f"{a} went to the {p} with {b}. They saw a {adj} {w1} there.",
        f"{a} likes the {o}. {b} likes the {p}.",
        f"The {w1} was {adj}. {a} said it was a good {w2}.",
        f"At the {p}, {a} bought a {o} for {b}.",
        f"{a} and {b} are friends. They often meet at the {p}.",
        f"In the morning {a} found a {o} near the {p}.",
    )
    k = int(rng.integers(1, 4))
    return " ".join(forms[j] for j in rng.choice(len(forms), size=k, replace=False))


def repeated_words(rng: np.random.Generator) -> str:
    """A span of random words, then the same span again (or more): induction on text."""
    n = int(rng.integers(3, 16))
    span = " ".join(rng.choice(WORDS, size=n))
    return " ".join([span] * int(rng.integers(2, 4)))


def counting(rng: np.random.Generator) -> str:
    """Counting up in digits or words from a random start."""
    if rng.random() < 0.5:
        start = int(rng.integers(0, 60))
        return " ".join(str(x) for x in range(start, start + int(rng.integers(5, 20))))
    start = int(rng.integers(0, 10))
    return " ".join(NUMBER_WORDS[start: start + int(rng.integers(4, 12))])


def alphabet(rng: np.random.Generator) -> str:
    """A run of the alphabet from a random letter."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    start = int(rng.integers(0, 20))
    out = " ".join(letters[start:])
    return out.upper() if rng.random() < 0.3 else out


def brackets(rng: np.random.Generator, max_depth: int = 4) -> str:
    """A balanced, nested bracket string over ( [ { <, space separated."""
    out: list[str] = []
    stack: list[str] = []
    for _ in range(int(rng.integers(4, 24))):
        if stack and (len(stack) >= max_depth or rng.random() < 0.45):
            out.append(stack.pop())
        else:
            o, c = BRACKETS[rng.integers(len(BRACKETS))]
            out.append(o)
            stack.append(c)
    out.extend(reversed(stack))
    return " ".join(out)


_MAKERS = {"ioi": lambda r: ioi_example(r, TRAIN_TEMPLATES[r.integers(len(TRAIN_TEMPLATES))]).text,
           "story": story, "words": repeated_words, "counting": counting, "alphabet": alphabet,
           "brackets": brackets}


def document(rng: np.random.Generator, kind: str | None = None) -> str:
    """One training document of `kind` (drawn by `DOC_WEIGHTS` when None). IOI uses train templates only."""
    if kind is None:
        kind = DOC_KINDS[rng.choice(len(DOC_KINDS), p=DOC_WEIGHTS)]
    if kind not in _MAKERS:
        raise ValueError(f"unknown document kind {kind!r}; choose from {DOC_KINDS}")
    return _MAKERS[kind](rng)


def corpus(seed: int | np.random.Generator, n_docs: int) -> list[str]:
    """`n_docs` training documents (the tokenizer is trained on such a corpus)."""
    rng = _rng(seed)
    return [document(rng) for _ in range(n_docs)]


def random_repeat_rows(rng: np.random.Generator, n_rows: int, row_len: int, vocab_size: int, bos: int,
                       exclude: Sequence[int] = (), min_span: int = 4,
                       max_span: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows of repeated random tokens and their loss weights, both [n_rows, row_len].

    Each row is BOS, then a span of uniformly random token ids (length min_span .. max_span, at
    most (row_len-1)//2 so it repeats at least twice) tiled to fill the row. Ids in `exclude` never
    occur. A weight is 1 where the token is predictable from context (a later copy) and 0 for
    BOS and the first copy, whose tokens are pure noise.
    """
    hi = (row_len - 1) // 2 if max_span is None else min(max_span, (row_len - 1) // 2)
    if not 1 <= min_span <= hi:
        raise ValueError(f"span lengths {min_span}..{hi} are empty; need 1 <= min_span <= max_span and "
                         f"max_span <= (row_len-1)//2 = {(row_len - 1) // 2}")
    allowed = np.setdiff1d(np.arange(vocab_size), np.asarray([bos, *exclude]))
    out = np.empty((n_rows, row_len), np.int32)
    weights = np.ones((n_rows, row_len), np.float32)
    out[:, 0] = bos
    for r in range(n_rows):
        n = int(rng.integers(min_span, hi + 1))
        span = rng.choice(allowed, size=n)
        out[r, 1:] = np.tile(span, -(-(row_len - 1) // n))[: row_len - 1]
        weights[r, : n + 1] = 0.0
    return out, weights


def repeated_tokens(rng: np.random.Generator, batch: int, seq_len: int, vocab_size: int, bos: int,
                    exclude: Sequence[int] = ()) -> np.ndarray:
    """TransformerLens's induction probe: [batch, 1 + 2*seq_len] = BOS, random tokens, the same again."""
    allowed = np.setdiff1d(np.arange(vocab_size), np.asarray([bos, *exclude]))
    half = rng.choice(allowed, size=(batch, seq_len))
    return np.concatenate([np.full((batch, 1), bos), half, half], axis=1).astype(np.int32)


def pack_rows(docs: Iterator[tuple[list[int], list[float]]], n_rows: int, row_len: int,
              bos: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack tokenized documents `(ids, weights)` into [n_rows, row_len] tokens and loss weights,
    GPT-2 style: every row starts with BOS and documents are separated by BOS (weight 1 as a
    target); the last document of a row is cut at the row's end."""
    out = np.empty((n_rows, row_len), np.int32)
    wout = np.empty((n_rows, row_len), np.float32)
    for r in range(n_rows):
        row, w = [bos], [0.0]
        while len(row) < row_len:
            ids, ws = next(docs)
            row.extend(ids)
            w.extend(ws)
            row.append(bos)
            w.append(1.0)
        out[r], wout[r] = row[:row_len], w[:row_len]
    return out, wout


def single_rows(docs: Iterator[tuple[list[int], list[float]]], n_rows: int, row_len: int,
                bos: int) -> tuple[np.ndarray, np.ndarray]:
    """One document per row: BOS + document + BOS, then BOS padding with loss weight 0 (a clean
    context, as at evaluation). Raises ValueError when a document does not fit in `row_len`."""
    out = np.full((n_rows, row_len), bos, np.int32)
    wout = np.zeros((n_rows, row_len), np.float32)
    for r in range(n_rows):
        ids, ws = next(docs)
        if len(ids) + 2 > row_len:
            raise ValueError(f"a document of {len(ids)} tokens does not fit a row of {row_len} (BOS + doc + BOS); "
                             "raise the row length")
        out[r, 1: len(ids) + 1] = ids
        wout[r, 1: len(ids) + 2] = [*ws, 1.0]
    return out, wout


def prompts(seed: int, n: int = 300) -> list[dict[str, str]]:
    """Prompts for sweeps (pattern_lens format `{"text": ...}`): a mix of every document kind,
    IOI prompts from held-out templates (without their answer) and full training sentences."""
    rng = _rng(seed)
    out = []
    for j in range(n):
        kind = ("ioi_prompt", *DOC_KINDS)[j % (len(DOC_KINDS) + 1)]
        if kind == "ioi_prompt":
            text = ioi_example(rng, HELDOUT_TEMPLATES[rng.integers(len(HELDOUT_TEMPLATES))]).prompt
        else:
            text = document(rng, kind)
        out.append({"text": text})
    return out


def write_prompts(path: str | Path, seed: int, n: int = 300) -> Path:
    """Write `prompts(seed, n)` as JSON lines (one `{"text": ...}` per line)."""
    path = Path(path)
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts(seed, n)))
    return path

__all__ = ["NAMES", "PLACES", "OBJECTS", "NOUNS", "ADJECTIVES", "WORDS", "NUMBER_WORDS", "BRACKETS",
           "INTROS", "ACTIONS", "TEMPLATES", "HELDOUT_TEMPLATES", "TRAIN_TEMPLATES", "DOC_KINDS",
           "DOC_WEIGHTS", "IOIExample", "ioi_example", "ioi_examples", "story", "repeated_words", "counting",
           "alphabet", "brackets", "document", "corpus", "random_repeat_rows", "repeated_tokens",
           "pack_rows", "single_rows", "prompts", "write_prompts"]
