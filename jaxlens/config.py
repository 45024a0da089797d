"""ModelConfig: every architectural switch of a supported transformer, explicit and frozen.

A `ModelConfig` is hashable, so it is passed to `jax.jit` as a static argument and compiled
programs are cached per configuration. Field names follow TransformerLens's `cfg` where one
exists (`d_model`, `n_heads`, `d_head`, `d_mlp`, `d_vocab`, `n_ctx`, `act_fn`, ...).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

NormType = Literal["LN", "RMS", "LNPre", "RMSPre"]  # *Pre: weightless (after fold_ln, as TransformerLens)
PosType = Literal["standard", "rotary"]
ActFn = Literal["gelu_new", "gelu", "gelu_pytorch_tanh", "silu", "relu", "gelu_fast"]
ACT_FNS: tuple[str, ...] = get_args(ActFn)  # the one list; jaxlens.model.layers implements each
AttnType = Literal["global", "local"]  # TransformerLens's `attn_types`: local = sliding window
NormPlacement = Literal["pre", "pre_post", "post"]  # GPT-2/Llama; Gemma 2/3 (pre and post); OLMo 2 (post only)
QKNormScope = Literal["head", "all"]  # RMSNorm over each head's d_head (Qwen3, Gemma 3) or the whole projection (OLMo 2)
RopeType = Literal["linear", "dynamic", "yarn", "llama3", "longrope"]
_REMOVED_FIELDS = ("tokenizer_name",)  # read nowhere; older converted configs may still carry them
# HF `architectures[0]` per model_type, for configs written before `original_architecture` was recorded
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM",
                 "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM", "gemma": "GemmaForCausalLM"}
# where the model's arrays live and what they hold: set by HookedTransformer, not architecture (not
# compared, hashed or saved, so a moved or cast model reuses its compiled programs' cache keys)
RUNTIME_FIELDS = ("device", "dtype", "tokenizer_prepends_bos")
# TransformerLens's opt-in hook switches: compared and hashed (they decide which names a default
# filter resolves to), but not saved with the architecture
HOOK_SWITCHES = ("use_attn_result", "use_hook_mlp_in", "use_split_qkv_input", "use_attn_in")


@dataclass(frozen=True)
class RopeScaling:
    """HF's `rope_scaling` / `rope_parameters` beyond plain RoPE, as plain (hashable) data.

    Fields are HF's names; which ones a `rope_type` reads is HF's rule (`jaxlens.model.rope`
    computes the frequencies). `factor` is the context extension; `original_max_position_embeddings`
    the pre-extension context (llama3, yarn, longrope; for dynamic, HF's max_position_embeddings,
    which its scaling is relative to, so `n_ctx` can be raised independently)."""

    rope_type: RopeType
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3
    beta_fast: float | None = None  # yarn
    beta_slow: float | None = None  # yarn
    mscale: float | None = None  # yarn (DeepSeek style)
    mscale_all_dim: float | None = None  # yarn (DeepSeek style)
    attention_factor: float | None = None  # yarn, longrope: scale of cos/sin
    truncate: bool | None = None  # yarn
    short_factor: tuple[float, ...] | None = None  # longrope
    long_factor: tuple[float, ...] | None = None  # longrope

    def __post_init__(self) -> None:
        if self.rope_type not in get_args(RopeType):
            raise ValueError(f"rope_type={self.rope_type!r} must be one of {get_args(RopeType)}")
        for f in ("short_factor", "long_factor"):  # lists (from JSON) -> tuples, so the config stays hashable
            v = getattr(self, f)
            if v is not None and not isinstance(v, tuple):
                object.__setattr__(self, f, tuple(float(x) for x in v))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RopeScaling":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown RopeScaling fields {unknown}")
        return cls(**d)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer.

    `attn_scale` is the divisor of the attention scores (TransformerLens's name): √d_head
    unless a family says otherwise. `norm_offset`-style gains (Gemma's `1 + w`) are folded into
    the stored weights at conversion, so norms here are always `normalized * w (+ b)`.
    """

    model_type: str
    d_model: int
    n_layers: int
    n_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    n_kv_heads: int | None = None  # key/value heads; None means n_heads (it is set to n_heads then)
    act_fn: ActFn = "gelu_new"
    normalization_type: NormType = "LN"
    eps: float = 1e-5
    positional_embedding_type: PosType = "standard"
    rotary_dim: int | None = None
    rotary_base: float = 10000.0
    parallel_attn_mlp: bool = False
    gated_mlp: bool = False
    attn_scale: float | None = None
    use_qkv_bias: bool = True
    use_o_bias: bool = True
    use_mlp_bias: bool = True
    tie_word_embeddings: bool = False
    embed_scale: float | None = None  # Gemma multiplies embeddings by sqrt(d_model)
    sliding_window: int | None = None  # keys further back than this many positions are masked (local layers)
    attn_types: tuple[AttnType, ...] | None = None  # per layer; None: every layer local iff sliding_window
    rope_scaling: RopeScaling | None = None  # None: plain RoPE
    rotary_base_local: float | None = None  # RoPE base of local layers (Gemma 3); None: rotary_base, scaled alike
    attn_scores_soft_cap: float | None = None  # Gemma 2: scores = cap * tanh(scores / cap), after scaling
    output_logits_soft_cap: float | None = None  # Gemma 2: logits = cap * tanh(logits / cap)
    norm_placement: NormPlacement = "pre"
    use_qk_norm: bool = False  # RMSNorm of queries and keys before RoPE (Qwen3, Gemma 3, OLMo 2)
    qk_norm_scope: QKNormScope = "head"
    num_experts: int | None = None  # mixture of experts (Mixtral, Qwen3-MoE): the MLP is routed
    experts_per_token: int = 2
    norm_topk_prob: bool = True  # renormalise the top-k router weights to sum to 1
    default_prepend_bos: bool = True
    model_name: str = "jaxlens-model"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    original_architecture: str | None = None  # HF `architectures[0]`, e.g. "GPT2LMHeadModel"
    device: str | None = field(default=None, compare=False)
    dtype: Any = field(default=None, compare=False)
    tokenizer_prepends_bos: bool | None = field(default=None, compare=False)
    # TransformerLens's switches for its opt-in hooks (`model.set_use_attn_result(True)`, ...):
    # they decide only which hooks a names_filter of None / a regex / a callable sees; a hook
    # named explicitly is captured or edited whatever they say. Not saved with the architecture.
    use_attn_result: bool = False
    use_hook_mlp_in: bool = False
    use_split_qkv_input: bool = False
    use_attn_in: bool = False

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:  # one name, always an int: no `n_kv_heads or n_heads` anywhere
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.original_architecture is None and self.model_type in ARCHITECTURES:
            object.__setattr__(self, "original_architecture", ARCHITECTURES[self.model_type])
        problems = []
        for f in ("d_model", "n_layers", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx"):
            if int(getattr(self, f)) <= 0:
                problems.append(f"{f}={getattr(self, f)} must be positive")
        if int(self.n_kv_heads) <= 0 or self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.act_fn not in ACT_FNS:
            problems.append(f"act_fn={self.act_fn!r} is not one of {ACT_FNS}")
        for name, allowed in (("normalization_type", get_args(NormType)), ("positional_embedding_type", get_args(PosType))):
            if getattr(self, name) not in allowed:
                problems.append(f"{name}={getattr(self, name)!r} must be one of {allowed}")
        if self.attn_types is not None:
            if not isinstance(self.attn_types, tuple):
                object.__setattr__(self, "attn_types", tuple(self.attn_types))
            if len(self.attn_types) != self.n_layers or not set(self.attn_types) <= set(get_args(AttnType)):
                problems.append(f"attn_types={self.attn_types} must give one of {get_args(AttnType)} per layer "
                                f"(n_layers={self.n_layers})")
            elif "local" in self.attn_types and self.sliding_window is None:
                problems.append("attn_types has local layers but sliding_window is None")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling.from_dict(self.rope_scaling))
        for name, allowed in (("norm_placement", get_args(NormPlacement)), ("qk_norm_scope", get_args(QKNormScope))):
            if getattr(self, name) not in allowed:
                problems.append(f"{name}={getattr(self, name)!r} must be one of {allowed}")
        if self.parallel_attn_mlp and self.norm_placement != "pre":
            problems.append(f"parallel_attn_mlp needs norm_placement='pre', not {self.norm_placement!r}")
        if self.use_split_qkv_input and self.use_attn_in:
            problems.append("use_split_qkv_input and use_attn_in are exclusive (two ways to fork the attention "
                            "input, as in TransformerLens): switch one off first")
        if self.num_experts is not None and not 1 <= self.experts_per_token <= self.num_experts:
            problems.append(f"experts_per_token={self.experts_per_token} must be in [1, num_experts={self.num_experts}]")
        if self.positional_embedding_type == "rotary":
            rd = self.rotary_dim
            if rd is None or rd <= 0 or rd > self.d_head or rd % 2:
                problems.append(f"rotary_dim={rd} must be even and in (0, d_head={self.d_head}]")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    # --- derived --------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        """Divisor applied to q·k (TransformerLens `attn_scale`)."""
        return self.attn_scale if self.attn_scale is not None else self.d_head**0.5

    @property
    def n_key_value_heads(self) -> int | None:
        """TransformerLens's name for `n_kv_heads` (None when not grouped)."""
        return self.n_kv_heads if self.n_kv_heads != self.n_heads else None

    def is_local(self, layer: int) -> bool:
        """Does `layer` attend through the sliding window?"""
        if self.attn_types is None:
            return self.sliding_window is not None
        return self.attn_types[layer] == "local"

    @property
    def d_vocab_out(self) -> int:
        return self.d_vocab

    @property
    def has_pos_embed(self) -> bool:
        return self.positional_embedding_type == "standard"

    @property
    def n_params(self) -> int:
        """TransformerLens's `n_params`: the attention and MLP weight matrices of every layer, as
        `HookedTransformerConfig` counts them (4·d_model·d_head·n_heads per layer, grouped K/V
        counted as full, plus (2 + gated)·d_model·d_mlp); no embeddings, biases or norms."""
        attn = 4 * self.d_model * self.d_head * self.n_heads
        mlp = self.d_model * self.d_mlp * (3 if self.gated_mlp else 2)
        return self.n_layers * (attn + mlp)

    # --- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The architecture as plain data (runtime fields left out: they describe one loaded copy)."""
        d = dataclasses.asdict(self)
        for k in RUNTIME_FIELDS + HOOK_SWITCHES:
            d.pop(k)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k not in _REMOVED_FIELDS}
        if "n_key_value_heads" in d:  # TransformerLens's name
            d["n_kv_heads"] = d.pop("n_key_value_heads")
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"unknown ModelConfig fields {unknown}: this file was written by a newer jaxlens; "
                "upgrade jaxlens or re-convert the checkpoint"
            )
        return cls(**d)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

__all__ = ["NormType", "PosType", "ActFn", "ACT_FNS", "AttnType", "NormPlacement", "QKNormScope", "RopeType",
           "RopeScaling", "ARCHITECTURES", "RUNTIME_FIELDS", "HOOK_SWITCHES", "ModelConfig"]
