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

FAMILIES = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "gemma", "mixtral", "gemma2", "gemma3", "qwen3", "olmo2", "phi3", "qwen3_moe")
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
    if family == "mixtral":  # 4 experts, top-2; sliding window as Mistral (tests/test_moe.py checks routing matters)
        m = dict(llama_like, intermediate_size=24)
        return transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, sliding_window=5, **m)
    # Gemma 2/3: query_pre_attn_scalar != head_dim, caps small enough to bite, window 4 < the prompts
    gemma_new = dict(llama_like, head_dim=12, sliding_window=4, query_pre_attn_scalar=10)
    if family == "gemma2":
        return transformers.Gemma2Config(attn_logit_softcapping=1.0, final_logit_softcapping=1.5, **gemma_new)
    if family == "gemma3":  # local layers: base 1e4, plain; global: base 1e6 with linear scaling (as Gemma 3 4B+)
        rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}
        return transformers.Gemma3TextConfig(layer_types=["sliding_attention", "full_attention"],
                                             rope_parameters=rope, **gemma_new)
    if family == "qwen3":  # head_dim 12 != hidden_size / heads
        return transformers.Qwen3Config(head_dim=12, **llama_like)
    if family == "olmo2":
        return transformers.Olmo2Config(**llama_like)
    if family == "qwen3_moe":  # 4 experts, top-2, not renormalised (Qwen3-MoE's default), head_dim 12
        return transformers.Qwen3MoeConfig(head_dim=12, num_local_experts=4, num_experts_per_tok=2,
                                           moe_intermediate_size=24, norm_topk_prob=False, **llama_like)
    if family == "phi3":  # as Phi-4-mini: partial rotary 0.75, tied, longrope (short factors up to the
        # original context 32, beyond the tests' lengths; tests/test_rope.py runs the long ones), window 6
        rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                "short_factor": [1.0, 1.7, 3.1], "long_factor": [2.3, 4.0, 7.5]}
        return transformers.Phi3Config(original_max_position_embeddings=32, rope_parameters=rope, sliding_window=6,
                                       tie_word_embeddings=True, **llama_like)
    raise ValueError(family)


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or "ln" in name) and name.endswith("weight"):
                if isinstance(model, (transformers.GemmaForCausalLM, transformers.Gemma2ForCausalLM,
                                      transformers.Gemma3ForCausalLM)):
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
