"""Small random HF models of every supported family, saved to disk, for parity tests.

Norm gains are 1 + 0.2·N(0,1) and every bias 0.1·N(0,1), so a folding or offset bug shows.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

FAMILIES = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "gemma")
CORPUS = ("The quick brown fox jumps over the lazy dog. Alice and Bob went to the market; "
          "Bob gave a book to Alice. 0123456789 (brackets) [more] {and more}. ") * 20


def make_tokenizer(path: Path, vocab_size: int = 300) -> transformers.PreTrainedTokenizerFast:
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([CORPUS], vocab_size=vocab_size, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                               eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.save_pretrained(str(path))
    return tok


def hf_config(family: str, vocab: int, n_ctx: int = 64):
    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=n_ctx, **common)
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=64, max_position_embeddings=n_ctx,
                                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                           "partial_rotary_factor": 0.5}, **common)
    llama_like = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=48, max_position_embeddings=n_ctx, rms_norm_eps=1e-6, **common)
    if family == "llama":
        return transformers.LlamaConfig(attention_bias=True, **llama_like)
    if family == "mistral":
        return transformers.MistralConfig(sliding_window=5, **llama_like)
    if family == "qwen2":
        return transformers.Qwen2Config(**llama_like)
    if family == "gemma":
        g = dict(llama_like, num_key_value_heads=1, head_dim=12)
        return transformers.GemmaConfig(**g)
    raise ValueError(family)


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or "ln" in name) and name.endswith("weight"):
                if isinstance(model, transformers.GemmaForCausalLM):
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))  # Gemma stores w for (1 + w)
                else:
                    p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def build(family: str, root: Path, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """Save a random `family` model + tokenizer under root/family; return (dir, eval torch model)."""
    path = Path(root) / family
    path.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(path)
    cfg = hf_config(family, vocab=len(tok))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    perturb(model, seed)
    model.save_pretrained(str(path))
    return path, model
