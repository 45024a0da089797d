"""Behavioural probes of a model: TransformerLens's induction score, and the IOI-like task.

Pure functions over arrays; the runners take (params, cfg) and call `jaxlens.forward.forward_jit`,
so the training script, the demo and the tests measure the shipped model the same way.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from jaxlens.config import ModelConfig
from jaxlens.apps.data import IOIExample
from jaxlens.model.forward import forward_jit
from jaxlens.hooks import resolve_names


def induction_scores(pattern: Any, seq_len: int) -> Any:
    """Induction score per head from one layer's pattern [batch head 1+2*seq_len 1+2*seq_len]
    on BOS + random tokens + the same tokens again (TransformerLens's probe).

    Mean, over the batch and every query of the second half, of the attention paid to the token
    just after that token's earlier occurrence: query q, key q - seq_len + 1 (the diagonal at
    offset 1 - seq_len). Returns [head], numpy for a numpy pattern and jax for a jax one.
    """
    n = pattern.shape[-1]
    if pattern.ndim != 4 or pattern.shape[-2] != n or n != 1 + 2 * seq_len:
        raise ValueError(f"pattern must be [batch head {1 + 2 * seq_len} {1 + 2 * seq_len}] for seq_len={seq_len} "
                         f"(BOS + two copies), got shape {tuple(pattern.shape)}")
    q = np.arange(seq_len + 1, n)  # static indices: a numpy pattern stays on the host, a jax one is one gather
    return pattern[:, :, q, q - seq_len + 1].mean(axis=(0, 2))


def model_induction_scores(params: dict[str, Any], cfg: ModelConfig, tokens: Any,
                           precision: str | None = "highest") -> np.ndarray:
    """[layer head] induction scores of a model on `tokens` = BOS + r + r ([batch 1+2*seq_len])."""
    tokens = jnp.asarray(tokens)
    seq_len = (tokens.shape[1] - 1) // 2
    capture = resolve_names(lambda n: n.endswith("attn.hook_pattern"), cfg)
    _, acts, _ = forward_jit(params, cfg, tokens, jnp.ones_like(tokens), capture=capture, precision=precision,
                             return_logits=False)
    return np.stack([np.asarray(induction_scores(acts[f"blocks.{l}.attn.hook_pattern"], seq_len))
                     for l in range(cfg.n_layers)])


def ioi_batch(tokenizer: Any, examples: Sequence[IOIExample], bos: int) -> dict[str, np.ndarray]:
    """Right-padded BOS + prompt tokens, mask, index of each last token, and the one-token ids of
    " io" and " s". Raises ValueError when a name is not a single token for this tokenizer."""
    def one(name: str) -> int:
        ids = tokenizer.encode(" " + name, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"name {name!r} is {len(ids)} tokens for this tokenizer; the IOI probe needs "
                             "single-token names (use the tokenizer shipped with the model)")
        return ids[0]

    seqs = [[bos, *tokenizer.encode(e.prompt, add_special_tokens=False)] for e in examples]
    n = max(map(len, seqs))
    toks = np.full((len(seqs), n), bos, np.int32)
    mask = np.zeros((len(seqs), n), np.int32)
    for i, s in enumerate(seqs):
        toks[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return {"tokens": toks, "mask": mask, "last": mask.sum(1) - 1,
            "io": np.array([one(e.io) for e in examples]), "s": np.array([one(e.s) for e in examples])}


def ioi_scores(final_logits: Any, io: Any, s: Any) -> dict[str, float]:
    """From logits at each prompt's last token [batch vocab]: `top1` (share of prompts whose top
    prediction is the right name), `logit_diff_acc` (share with logit(io) > logit(s)) and the mean
    logit difference (IOI's metric)."""
    lg = np.asarray(final_logits, np.float32)
    rows = np.arange(lg.shape[0])
    diff = lg[rows, io] - lg[rows, s]
    return {"top1": float((lg.argmax(-1) == io).mean()), "logit_diff_acc": float((diff > 0).mean()),
            "logit_diff": float(diff.mean())}


def model_ioi_scores(params: dict[str, Any], cfg: ModelConfig, batch: dict[str, np.ndarray],
                     precision: str | None = "highest") -> dict[str, float]:
    """`ioi_scores` of a model on an `ioi_batch`."""
    logits, _, _ = forward_jit(params, cfg, jnp.asarray(batch["tokens"]), jnp.asarray(batch["mask"]),
                               precision=precision)
    final = np.asarray(logits)[np.arange(len(batch["last"])), batch["last"]]
    return ioi_scores(final, batch["io"], batch["s"])

__all__ = ["induction_scores", "model_induction_scores", "ioi_batch", "ioi_scores", "model_ioi_scores"]
