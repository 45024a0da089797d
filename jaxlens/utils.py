"""TransformerLens's `utils` surface, so `from transformer_lens import utils` ports as `from jaxlens import utils`.

Names and signatures are TransformerLens 4.x's (`transformer_lens.utilities`); implementations are
jaxlens's own (JAX arrays in, JAX or numpy arrays out). `get_act_name`, `Slice` and the loss are
re-exports of the one implementation the rest of jaxlens uses.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.hooked import lm_loss
from jaxlens.hooks import get_act_name
from jaxlens.cache.slice import Slice, SliceInput
from jaxlens.model.factored_matrix import composition_scores

__all__ = ["get_act_name", "test_prompt", "to_numpy", "get_corner", "get_device", "lm_cross_entropy_loss",
           "lm_accuracy", "remove_batch_dim", "Slice", "SliceInput", "composition_scores"]


def to_numpy(tensor: Any) -> np.ndarray:
    """A numpy array from a JAX array, numpy array, list/tuple, Python scalar or string (or a torch
    tensor, read without importing torch). bfloat16 becomes float32, as TransformerLens does."""
    if isinstance(tensor, np.ndarray):
        return tensor
    if isinstance(tensor, (list, tuple)):
        return np.array(tensor)
    if isinstance(tensor, (int, float, bool, str, np.generic)):
        return np.array(tensor)
    if isinstance(tensor, jax.Array):
        return np.asarray(tensor.astype(jnp.float32) if tensor.dtype == jnp.bfloat16 else tensor)
    if type(tensor).__module__.split(".")[0] == "torch" and hasattr(tensor, "detach"):
        t = tensor.detach().cpu()
        return (t.float() if str(t.dtype) == "torch.bfloat16" else t).numpy()
    raise ValueError(f"Input to to_numpy has invalid type: {type(tensor).__name__}; give an array, a list, a tuple "
                     "or a scalar")


def get_corner(tensor: Any, n: int = 3) -> Any:
    """The top-left n x n x ... corner of an array (of the product, for a FactoredMatrix)."""
    from jaxlens.model.factored_matrix import FactoredMatrix

    if isinstance(tensor, FactoredMatrix):
        return tensor.get_corner(n)
    return tensor[tuple(slice(n) for _ in range(tensor.ndim))]


def remove_batch_dim(tensor: Any) -> Any:
    """Drop a leading axis of size 1; anything else is returned unchanged."""
    if tensor.ndim > 0 and tensor.shape[0] == 1:
        return tensor[0]
    return tensor


def get_device() -> jax.Device:
    """The default JAX device (accelerator if there is one). TransformerLens returns a torch device
    string ("cuda"/"cpu"); here it is the `jax.Device` that `jax.device_put` and `cache.to` take."""
    return jax.devices()[0]


def lm_cross_entropy_loss(logits: Any, tokens: Any, attention_mask: Any = None, per_token: bool = False) -> jax.Array:
    """Next-token cross entropy (float32): mean over predicted positions, or [batch pos-1] if per_token.

    With `attention_mask`, positions whose token or next token is padding are left out of the mean
    and, per token, are 0 (TransformerLens's semantics). The computation is `jaxlens.hooked.lm_loss`.
    """
    logits, tokens = jnp.asarray(logits), jnp.asarray(tokens)
    unbatched = logits.ndim == 2
    if unbatched:  # [pos vocab] and [pos], as TransformerLens's `...` dims allow
        logits, tokens = logits[None], tokens[None]
        attention_mask = None if attention_mask is None else jnp.asarray(attention_mask)[None]
    if logits.ndim != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(f"logits must be [batch pos d_vocab] and tokens [batch pos] of the same batch and pos; got "
                         f"logits {logits.shape}, tokens {tokens.shape}")
    if attention_mask is not None:
        attention_mask = jnp.asarray(attention_mask)
        if attention_mask.shape != tokens.shape:
            raise ValueError(f"attention_mask must have the shape of tokens, got {attention_mask.shape} and "
                             f"{tokens.shape}")
    loss = lm_loss(logits, tokens, attention_mask, per_token)
    if per_token and attention_mask is not None:  # lm_loss's per-token output is unmasked
        m = attention_mask.astype(bool)
        loss = jnp.where(m[:, 1:] & m[:, :-1], loss, 0.0)
    return loss[0] if unbatched and per_token else loss


def lm_accuracy(logits: Any, tokens: Any, per_token: bool = False) -> jax.Array:
    """Top-1 next-token accuracy: the fraction of positions whose argmax is the next token
    ([batch pos-1] booleans if per_token)."""
    logits, tokens = jnp.asarray(logits), jnp.asarray(tokens)
    correct = logits.argmax(-1)[..., :-1] == tokens[..., 1:]
    return correct if per_token else correct.mean()


def softmax_np(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in numpy, f32: for host-side reports (no compiled program)."""
    x = np.asarray(logits, np.float32)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_prompt(prompt: str, answer: str | Sequence[str], model: Any, prepend_space_to_answer: bool = True,
                print_details: bool = True, prepend_bos: bool | None = None, top_k: int = 10) -> None:
    """Print how the model does on `answer` after `prompt`: tokens, rank/logit/prob of each answer
    token and the top-k predictions (TransformerLens's `test_prompt`, same text without rich's bold).

    A list of answers compares their first tokens as alternative next tokens. Prints; returns None.
    """
    answers = [answer] if isinstance(answer, str) else list(answer)
    if not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"answer must be a string or a non-empty list of strings, got {answer!r}")
    multi = len(answers) > 1
    if prepend_space_to_answer:
        answers = [a if a.startswith(" ") else " " + a for a in answers]
    prompt_tokens = np.asarray(model.to_tokens(prompt, prepend_bos=prepend_bos))
    if multi:
        answer_tokens = np.concatenate([np.asarray(model.to_tokens(a, prepend_bos=False))[:, :1] for a in answers])
    else:
        answer_tokens = np.asarray(model.to_tokens(answers, prepend_bos=False))
    tokens = np.concatenate([np.repeat(prompt_tokens, answer_tokens.shape[0], 0), answer_tokens], axis=1)
    prompt_str = model.to_str_tokens(prompt, prepend_bos=prepend_bos)
    answer_strs = [model.to_str_tokens(a, prepend_bos=False) for a in answers]
    n_prompt = len(prompt_str)
    n_answer = 1 if multi else len(answer_strs[0])
    if print_details:
        print("Tokenized prompt:", prompt_str)
        print("Tokenized answers:" if multi else "Tokenized answer:", answer_strs if multi else answer_strs[0])
    logits = np.asarray(model(tokens), np.float32)
    probs = softmax_np(logits)
    ranks = []
    for index in range(n_prompt, n_prompt + n_answer):
        ans = tokens[:, index]
        ans_str = [a[index - n_prompt] for a in answer_strs]
        p = probs[:, index - 1]
        order = np.argsort(-p, axis=-1, kind="stable")
        rank = [int(np.nonzero(order[i] == ans[i])[0][0]) for i in range(len(answers))]
        ranks.append(list(zip(ans_str, rank)))
        if print_details:
            plural = "s" if len(answers) > 1 else ""
            lines = [f"Rank: {rank[i]: <8} Logit: {logits[i, index - 1, ans[i]]:5.2f} Prob: {p[i, ans[i]]:6.2%} "
                     f"Token: |{ans_str[i]}|" for i in range(len(answers))]
            print(f"Performance on answer token{plural}:\n" + "\n".join(lines))
            for i in range(top_k):
                t = int(order[0, i])
                print(f"Top {i}th token. Logit: {logits[0, index - 1, t]:5.2f} Prob: {p[0, t]:6.2%} "
                      f"Token: |{model.to_string(t)}|")
    print(f"Ranks of the answer tokens: {[r[0] for r in ranks] if not multi else ranks}")


test_prompt.__test__ = False  # its name starts with "test": keep pytest from collecting it where imported
