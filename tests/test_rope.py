"""RoPE scaling (linear, dynamic, yarn, llama3, longrope) against transformers' own code: the
frequencies and attention scaling against `ROPE_INIT_FUNCTIONS`, cos/sin against HF's rotary
modules (which apply `dynamic_rope_update`: dynamic and longrope depend on the call's length),
config parsing, and end to end: random Llama models with each scaling and Phi-3 models with
longrope (short and long factors) give HF's logits on unpadded, left- and right-padded batches,
and greedy generation equals HF's. Each model is sized so its scaling changes the logits at the
tests' lengths (asserted against the same weights with plain RoPE)."""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import jaxlens
from conftest import PROMPTS, assert_close, built, padded
from hf_models import make_tokenizer, perturb
from jaxlens.conversion import REGISTRY, CheckpointError
from jaxlens.conversion.common import rope
from jaxlens.generation.generate import generate_tokens
from jaxlens.model.forward import forward_jit
from jaxlens.model.rope import inv_freq, rotary_angles

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
             rms_norm_eps=1e-6, vocab_size=300, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def ours(hf_config) -> jaxlens.ModelConfig:
    """Our ModelConfig of a HF config object, through the converter's own parsing."""
    d = hf_config.to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HF's to_dict() carries keys nobody reads
        return REGISTRY[d["model_type"]].config_from_hf(d)


def llama(rope_parameters: dict, max_pos: int = 16, **kw) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(**{**SMALL, **kw}, max_position_embeddings=max_pos, rope_parameters=rope_parameters)


def phi3(rope_parameters: dict, original: int, max_pos: int = 32, **kw) -> transformers.Phi3Config:
    return transformers.Phi3Config(**{**SMALL, **kw}, max_position_embeddings=max_pos,
                                   original_max_position_embeddings=original, rope_parameters=rope_parameters)


# --- frequencies and attention scaling vs ROPE_INIT_FUNCTIONS ---------------------------------------

STATIC = [  # (rope_type, HF config); each type several ways
    ("linear", llama({"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})),
    ("linear", llama({"rope_type": "linear", "factor": 7.5, "rope_theta": 500000.0}, head_dim=16)),
    ("llama3", llama({"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8, "rope_theta": 10000.0})),
    ("llama3", llama({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192, "rope_theta": 500000.0}, max_pos=131072,
                     hidden_size=256)),  # Llama 3.1's own numbers, d_head 64
    ("llama3", llama({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 2.0, "high_freq_factor": 3.0,
                      "original_max_position_embeddings": 64, "rope_theta": 1000.0}, max_pos=2048, head_dim=32)),
    ("yarn", llama({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8,
                    "rope_theta": 10000.0}, max_pos=32)),
    ("yarn", llama({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
                    "rope_theta": 1000000.0}, max_pos=131072, hidden_size=512)),  # Qwen2.5 long context
    ("yarn", llama({"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 16,
                    "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.707, "rope_theta": 10000.0,
                    "truncate": False}, max_pos=163840, head_dim=64)),  # DeepSeek-style mscale, no truncation
    ("yarn", llama({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16,
                    "attention_factor": 0.8, "rope_theta": 10000.0}, max_pos=32)),
    ("yarn", llama({"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 16, "rope_theta": 10000.0},
                   max_pos=64)),  # no factor: HF takes max_position_embeddings / original
    ("longrope", phi3({"rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0, 3.0],
                       "long_factor": [2.0, 4.0, 6.0, 9.0], "rope_theta": 10000.0}, original=8)),
    ("longrope", phi3({"rope_type": "longrope", "short_factor": [1.1, 1.3, 1.9], "long_factor": [3.0, 5.0, 8.0],
                       "partial_rotary_factor": 0.75, "attention_factor": 1.3, "factor": 4.0,
                       "rope_theta": 250000.0}, original=16)),  # Phi-4-mini style partial rotary
]


@pytest.mark.parametrize("kind,hf", STATIC, ids=[f"{k}-{i}" for i, (k, _) in enumerate(STATIC)])
def test_inv_freq_matches_rope_init_functions(kind, hf):
    cfg = ours(hf)
    assert cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == kind
    ref, ref_scale = ROPE_INIT_FUNCTIONS[kind](hf, "cpu")
    got, scale = inv_freq(cfg)
    assert_close(got, ref.numpy(), f"{kind} inv_freq", rtol=1e-6, atol=0)
    assert np.isclose(float(scale), float(ref_scale), rtol=1e-7, atol=0)
    plain, _ = inv_freq(cfg.replace(rope_scaling=None))
    assert np.abs(np.asarray(got) - np.asarray(plain)).max() > 1e-4  # the scaling changes the frequencies
    if kind == "longrope":  # the long factors, as HF's update computes them past the original context
        orig = cfg.rope_scaling.original_max_position_embeddings
        ref_long, _ = ROPE_INIT_FUNCTIONS[kind](hf, "cpu", seq_len=orig + 1)
        assert_close(inv_freq(cfg, seq_len=orig + 1)[0], ref_long.numpy(), "long inv_freq", rtol=1e-6, atol=0)


@pytest.mark.parametrize("factor,theta,max_pos,head_dim", [(2.0, 10000.0, 8, 8), (4.0, 500000.0, 16, 16),
                                                           (1.5, 1000.0, 12, 32)])
def test_dynamic_inv_freq_matches_at_every_length(factor, theta, max_pos, head_dim):
    """HF's dynamic NTK frequencies below, at and beyond max_position_embeddings, with the length
    traced (one compiled function for all lengths)."""
    hf = llama({"rope_type": "dynamic", "factor": factor, "rope_theta": theta}, max_pos=max_pos, head_dim=head_dim)
    cfg = ours(hf)
    f = jax.jit(lambda n: inv_freq(cfg, seq_len=n)[0])
    base, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf, "cpu")
    for n in (1, max_pos - 1, max_pos, max_pos + 1, 3 * max_pos):
        ref = base if n <= max_pos else ROPE_INIT_FUNCTIONS["dynamic"](hf, "cpu", seq_len=torch.tensor(n))[0]
        assert_close(f(jnp.int32(n)), ref.numpy(), f"dynamic at {n}", rtol=1e-6, atol=0)
    assert np.abs(np.asarray(f(jnp.int32(3 * max_pos))) - base.numpy()).max() > 1e-4


# --- cos/sin vs HF's rotary modules (with dynamic_rope_update) -----------------------------------

def hf_cos_sin(module_cls, hf, positions: np.ndarray):
    rot = module_cls(hf)  # fresh, as HF has it after loading: dynamic's state starts at max_position_embeddings
    with torch.no_grad():
        cos, sin = rot(torch.zeros(1), torch.tensor(positions, dtype=torch.long))
    return cos.numpy(), sin.numpy()


ROTARY = [
    ("llama3", transformers.models.llama.modeling_llama.LlamaRotaryEmbedding, STATIC[2][1]),
    ("yarn", transformers.models.llama.modeling_llama.LlamaRotaryEmbedding, STATIC[5][1]),
    ("yarn-mscale", transformers.models.llama.modeling_llama.LlamaRotaryEmbedding, STATIC[7][1]),
    ("linear", transformers.models.llama.modeling_llama.LlamaRotaryEmbedding, STATIC[0][1]),
    ("dynamic", transformers.models.llama.modeling_llama.LlamaRotaryEmbedding,
     llama({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}, max_pos=8)),
    ("longrope", transformers.models.phi3.modeling_phi3.Phi3RotaryEmbedding, STATIC[10][1]),
    ("longrope-partial", transformers.models.phi3.modeling_phi3.Phi3RotaryEmbedding, STATIC[11][1]),
]


@pytest.mark.parametrize("name,module_cls,hf", ROTARY, ids=[r[0] for r in ROTARY])
def test_cos_sin_match_hf_rotary_module(name, module_cls, hf):
    """Positions of one call [batch pos] (the longest row sets the length): below, at and past
    the original context, so dynamic and longrope show both regimes."""
    cfg = ours(hf)
    f = jax.jit(lambda p: rotary_angles(p, cfg))
    outs = []
    for n in (3, 8, 9, 20):
        pos = np.stack([np.arange(n), np.maximum(np.arange(n) - 2, 0)])  # a second, left-padded-like row
        cos, sin = f(jnp.asarray(pos, jnp.int32))
        ref_cos, ref_sin = hf_cos_sin(module_cls, hf, pos)
        assert_close(cos, ref_cos, f"{name} cos at {n}", rtol=1e-5, atol=1e-6)
        assert_close(sin, ref_sin, f"{name} sin at {n}", rtol=1e-5, atol=1e-6)
        outs.append(np.asarray(cos)[0, :3])
    if name.startswith(("dynamic", "longrope")):  # the same positions get other angles in a longer call
        assert np.abs(outs[0] - outs[-1]).max() > 1e-4


def test_local_layers_use_plain_rope_at_their_base():
    """Gemma 3: sliding layers rotate at rotary_base_local, unscaled, while global layers are scaled."""
    params = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
              "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}
    hf = transformers.Gemma3TextConfig(**SMALL, head_dim=8, max_position_embeddings=32, rope_parameters=params,
                                       layer_types=["sliding_attention", "full_attention"], sliding_window=4)
    r = rope(hf.to_dict(), "gemma3_text")
    assert r.base_local == 10000.0 and r.theta == 1e6 and r.scaling.rope_type == "linear"
    cfg = jaxlens.ModelConfig(model_type="t", d_model=32, n_layers=2, n_heads=4, d_head=8, d_mlp=8, d_vocab=10,
                              n_ctx=32, positional_embedding_type="rotary", sliding_window=4,
                              attn_types=("local", "global"), **r.config_kwargs(8))
    rot = transformers.models.gemma3.modeling_gemma3.Gemma3RotaryEmbedding(hf)
    pos = np.arange(7)[None]
    for layer_type, local in (("sliding_attention", True), ("full_attention", False)):
        with torch.no_grad():
            ref = rot(torch.zeros(1), torch.tensor(pos), layer_type)
        got = rotary_angles(jnp.asarray(pos), cfg, local=local)
        assert_close(got[0], ref[0].numpy(), f"{layer_type} cos")
        assert_close(got[1], ref[1].numpy(), f"{layer_type} sin")


# --- config parsing -------------------------------------------------------------------------------

def test_parsing_old_and_new_config_styles():
    old = {"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 500.0, "max_position_embeddings": 64}
    r = rope(old, "llama")
    assert (r.theta, r.partial, r.scaling.rope_type, r.scaling.factor) == (500.0, 1.0, "linear", 2.0)
    new = {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}, "max_position_embeddings": 64}
    r = rope(new, "qwen2")
    assert r.scaling.original_max_position_embeddings == 64  # HF's default: the context itself
    plain = rope({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, "llama")
    assert plain.scaling is None and plain.base_local is None
    legacy_gemma3 = rope({"rope_theta": 1e6, "rope_local_base_freq": 1e4}, "gemma3_text")
    assert (legacy_gemma3.theta, legacy_gemma3.base_local) == (1e6, 1e4)
    # Phi-3's top-level original_max_position_embeddings wins (as HF's standardisation does)
    phi = {"rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [2.0],
                            "original_max_position_embeddings": 99},
           "original_max_position_embeddings": 8, "max_position_embeddings": 32}
    s = rope(phi, "phi3").scaling
    assert (s.original_max_position_embeddings, s.factor, s.short_factor) == (8, 4.0, (1.0,))


def test_longrope_factor_lengths_are_checked():
    r = rope({"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [2.0] * 4,
                                  "partial_rotary_factor": 0.75}, "max_position_embeddings": 32}, "phi3")
    with pytest.raises(CheckpointError, match="long_factor has 4 entries, but the rotary dimension 6 needs 3"):
        r.config_kwargs(8)


def test_old_phi3_rope_types_read_as_longrope():
    hf = phi3(None, original=8).to_dict()
    hf["rope_parameters"] = None
    hf["rope_scaling"] = {"type": "su", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = REGISTRY["phi3"].config_from_hf(hf)
    assert cfg.rope_scaling.rope_type == "longrope" and cfg.rope_scaling.original_max_position_embeddings == 8


@pytest.mark.parametrize("hf,match", [
    ({"rope_parameters": {"rope_type": "proportional", "rope_theta": 1e4}}, r"'proportional' is not supported.*llama3"),
    ({"rope_scaling": {"type": "mrope", "mrope_section": [1, 1]}}, r"'mrope' is not supported"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"},
                          "sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
     r"rope_parameters\['sliding_attention'\] has rope_type='linear'"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"}, "chunked_attention": {"rope_type": "default"}}},
     r"chunked_attention"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}, "max_position_embeddings": 64},
     r"lacks \['low_freq_factor', 'high_freq_factor'\]"),
    ({"rope_parameters": {"rope_type": "linear"}}, r"lacks \['factor'\]"),
])
def test_unsupported_rope_is_refused(hf, match):
    with pytest.raises(CheckpointError, match=match):
        rope(hf, "llama")


# --- end to end: Llama with each scaling, Phi-3 with longrope --------------------------------------

E2E = {  # sized so the scaling bites at PROMPTS' lengths (<= 10) and during generation (<= 19)
    "llama3": llama({"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8, "rope_theta": 10000.0}, max_pos=32,
                    tie_word_embeddings=True, attention_bias=True),  # Llama-3.2 1B/3B tie their embeddings
    "linear": llama({"rope_type": "linear", "factor": 3.0, "rope_theta": 10000.0}, max_pos=32),
    "dynamic": llama({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}, max_pos=8),
    "yarn": llama({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8,
                   "rope_theta": 10000.0}, max_pos=32),
    # original context 8 < PROMPTS[0]: batches of PROMPTS run the long factors, short prompts alone the short
    "phi3-long": phi3({"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                       "short_factor": [1.0, 1.7, 3.1], "long_factor": [2.3, 4.0, 7.5]}, original=8),
}


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            path = tmp_path_factory.mktemp(f"rope_{name}")
            make_tokenizer(path)
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(E2E[name], attn_implementation="eager").float().eval()
            perturb(model, 0)
            model.save_pretrained(str(path))
            cache[name] = (model, jaxlens.from_pretrained_no_processing(path))
        return cache[name]

    return get


def fresh_rotary(model) -> None:
    """A freshly loaded model's rotary state: HF's dynamic scaling remembers the longest call."""
    inner = model.model
    inner.rotary_emb = type(inner.rotary_emb)(model.config)


def hf_logits(model, toks, mask):
    fresh_rotary(model)
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        return model(input_ids=torch.tensor(toks, dtype=torch.long), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(pos, dtype=torch.long)).logits.numpy()


def batch(side, prompts=PROMPTS):
    if side == "none":
        toks = np.array([prompts[0]], np.int32)
        return toks, np.ones_like(toks)
    return padded(side, prompts)


def jl_logits(jl, toks, mask, cfg=None):
    return np.asarray(forward_jit(jl.params, cfg or jl.cfg, jnp.asarray(toks), jnp.asarray(mask),
                                  precision="highest")[0])


@pytest.mark.parametrize("name", list(E2E))
@pytest.mark.parametrize("side", ["none", "left", "right"])
def test_scaled_models_match_hf(e2e, name, side):
    model, jl = e2e(name)
    assert jl.cfg.rope_scaling is not None
    toks, mask = batch(side)
    real = mask.astype(bool)
    got = jl_logits(jl, toks, mask)
    assert_close(got[real], hf_logits(model, toks, mask)[real], f"{name} logits")
    if side == "none":  # (once per model: each check compiles another program)
        plain = jl_logits(jl, toks, mask, jl.cfg.replace(rope_scaling=None))
        assert np.abs(plain[real] - got[real]).max() > 1e-3, "the scaling must change the logits here"


def test_longrope_short_factors_below_the_original_context(e2e):
    """Prompts no longer than the original context run the short factors (HF too); the long ones differ."""
    model, jl = e2e("phi3-long")
    s = jl.cfg.rope_scaling
    short_only = [p for p in PROMPTS if len(p) <= s.original_max_position_embeddings]
    assert short_only
    for side in ("left", "right"):
        toks, mask = padded(side, short_only)
        real = mask.astype(bool)
        got = jl_logits(jl, toks, mask)
        assert_close(got[real], hf_logits(model, toks, mask)[real], f"short {side}")
        as_long = jl_logits(jl, toks, mask, jl.cfg.replace(rope_scaling=dataclasses.replace(s, short_factor=s.long_factor)))
        assert np.abs(as_long[real] - got[real]).max() > 1e-3


def test_family_phi3_longrope_changes_the_output(hf_root):
    """The shared phi3 model (tests/hf_models.py) runs its short factors and attention factor: both matter."""
    jl = jaxlens.from_pretrained_no_processing(built("phi3", hf_root)[0])
    s = jl.cfg.rope_scaling
    assert s.rope_type == "longrope" and jl.cfg.rotary_dim < jl.cfg.d_head and jl.cfg.sliding_window
    toks, mask = batch("none")
    got = jl_logits(jl, toks, mask)
    for other in (None, dataclasses.replace(s, attention_factor=1.0)):
        assert np.abs(jl_logits(jl, toks, mask, jl.cfg.replace(rope_scaling=other)) - got).max() > 1e-3


N_NEW = 9


@pytest.mark.parametrize("name", ["llama3", "dynamic", "phi3-long"])
def test_greedy_generate_matches_hf(e2e, name):
    """Left-padded batch, past the original context (dynamic and longrope switch as they go, as in HF,
    whose cache keeps keys rotated at the frequencies of their step)."""
    model, jl = e2e(name)
    toks, mask = padded("left", PROMPTS)
    fresh_rotary(model)
    with torch.no_grad():
        ref = model.generate(input_ids=torch.tensor(toks, dtype=torch.long), attention_mask=torch.tensor(mask),
                             do_sample=False, max_new_tokens=N_NEW, min_new_tokens=N_NEW, pad_token_id=0).numpy()
    # HF runs dynamic NTK past max_position_embeddings (that is its point); jaxlens checks lengths against
    # n_ctx, which the scaling does not read (it stores HF's context as original_max_position_embeddings)
    cfg = jl.cfg.replace(n_ctx=64)
    out = generate_tokens(jl.params, cfg, toks, mask, max_new_tokens=N_NEW, stop_at_eos=False, pad_token_id=0,
                          precision="highest")
    np.testing.assert_array_equal(np.asarray(out.tokens)[:, :ref.shape[1]], ref)


def test_scaled_configs_round_trip(e2e, tmp_path):
    """A converted model's RopeScaling (factor lists included) survives save/load, equal and hashable."""
    from jaxlens.conversion import load_converted, save_converted

    for name in ("phi3-long", "llama3"):
        jl = e2e(name)[1]
        save_converted(tmp_path / name, jl.cfg, jl.params)
        cfg, _ = load_converted(tmp_path / name)
        assert cfg == jl.cfg and hash(cfg) == hash(jl.cfg) and cfg.rope_scaling == jl.cfg.rope_scaling
