"""Port of TransformerLens's `Activation_Patching_in_TL_Demo.ipynb` (demos/Activation_Patching_in_TL_Demo.ipynb) to jaxlens.

Written by us against the public notebook's workflow, on the model jaxlens ships (a 2-layer
GPT-2-format model trained on synthetic text) instead of GPT-2 small and attn-only-2l: the IOI
prompts with a normalised logit-difference metric that reads the global CLEAN_BASELINE and
CORRUPTED_BASELINE, then `patching.get_act_patch_resid_pre`, `get_act_patch_attn_head_out_all_pos`,
`get_act_patch_attn_head_out_by_pos`, `get_act_patch_block_every` and
`get_act_patch_attn_head_all_pos_every`; then `resid_pre` and head-output patching on induction
(repeated random tokens, the notebook's attn-only-2l section), whose metric reads other globals.

Changed lines: 44 (6 of them imports). Every line that differs from the TransformerLens version
carries a trailing `# changed: <why>` comment (a dropped line is noted on its neighbour). Lines that
the TransformerLens version of this script would share are not marked, prints we added included;
nor is the scaffolding: the notebook's cells are functions here (each section's `def` and
`return`, `main`, and the `global` statements that keep the baselines module globals, as the
notebook's are), so that tests can call them.

Run: `.venv/bin/python examples/activation_patching_demo.py`
"""

from __future__ import annotations

import einops
import jax  # changed: import (jax instead of torch)
import jax.numpy as jnp  # changed: import (jnp instead of torch)

import jaxlens.patching as patching  # changed: import (transformer_lens.patching)
from jaxlens import HookedTransformer  # changed: import (from transformer_lens)
from jaxlens.assets import model_dir  # changed: import (the model jaxlens ships; nothing is downloaded)
# changed: import (plotly and the imshow helper dropped: no plotting, numbers are printed)

DO_SLOW_RUNS = True

# --- IOI -----------------------------------------------------------------------------------------

prompts = [
    "When John and Mary went to the store, John gave a drink to",  # changed: the shipped model's places and objects
    "When John and Mary went to the store, Mary gave a drink to",  # changed: the shipped model's places and objects
    "When Tom and James went to the park, James gave the ball to",
    "When Tom and James went to the park, Tom gave the ball to",
    "When Dan and Sam went to the store, Sam gave a cake to",  # changed: the shipped model's names and objects (" Sid" is two tokens)
    "When Dan and Sam went to the store, Dan gave a cake to",  # changed: the shipped model's names and objects (" Sid" is two tokens)
    "After Paul and Amy went to the park, Amy gave a drink to",  # changed: the shipped model's names (" Martin" is three tokens)
    "After Paul and Amy went to the park, Paul gave a drink to",  # changed: the shipped model's names (" Martin" is three tokens)
]
answers = [
    (" Mary", " John"),
    (" John", " Mary"),
    (" Tom", " James"),
    (" James", " Tom"),
    (" Dan", " Sam"),  # changed: the shipped model's names
    (" Sam", " Dan"),  # changed: the shipped model's names
    (" Paul", " Amy"),  # changed: the shipped model's names
    (" Amy", " Paul"),  # changed: the shipped model's names
]

CLEAN_BASELINE = None  # set by ioi_setup(), read by ioi_metric (the notebook's top-level cell)
CORRUPTED_BASELINE = None
ANSWER_TOKEN_INDICES = None  # changed: the global answer tensor, named apart from get_logit_diff's argument


def load_model() -> HookedTransformer:
    model = HookedTransformer.from_pretrained(model_dir())  # changed: the shipped model for "gpt2-small"
    return model


def get_logit_diff(logits, answer_token_indices=None):  # changed: default None: the notebook binds the global answer tensor here, which this script sets later (in ioi_setup)
    answer_token_indices = ANSWER_TOKEN_INDICES if answer_token_indices is None else answer_token_indices  # changed: the global, read when called
    if len(logits.shape) == 3:
        # Get final logits only
        logits = logits[:, -1, :]
    correct_logits = jnp.take_along_axis(logits, answer_token_indices[:, 0, None], axis=1)  # changed: gather(1, idx.unsqueeze(1)) -> jnp.take_along_axis
    incorrect_logits = jnp.take_along_axis(logits, answer_token_indices[:, 1, None], axis=1)  # changed: gather(1, idx.unsqueeze(1)) -> jnp.take_along_axis
    return (correct_logits - incorrect_logits).mean()


def ioi_metric(logits, answer_token_indices=None):  # changed: default None, as get_logit_diff's (which then reads the global)
    return (get_logit_diff(logits, answer_token_indices) - CORRUPTED_BASELINE) / (CLEAN_BASELINE - CORRUPTED_BASELINE)


def ioi_setup(model: HookedTransformer) -> dict:
    global CLEAN_BASELINE, CORRUPTED_BASELINE, ANSWER_TOKEN_INDICES
    clean_tokens = model.to_tokens(prompts)
    # Swap each adjacent pair, with a hacky list comprehension
    corrupted_tokens = clean_tokens[jnp.array([(i + 1 if i % 2 == 0 else i - 1) for i in range(len(clean_tokens))])]  # changed: JAX indexes with an array, not a list
    print("Clean string 0", model.to_string(clean_tokens[0]))
    print("Corrupted string 0", model.to_string(corrupted_tokens[0]))

    answer_token_indices = jnp.array([[model.to_single_token(answers[i][j]) for j in range(2)] for i in range(len(answers))])  # changed: torch.tensor(..., device=) -> jnp.array
    print("Answer token indices", answer_token_indices)
    ANSWER_TOKEN_INDICES = answer_token_indices  # changed: the default of get_logit_diff, set as a global

    clean_logits, clean_cache = model.run_with_cache(clean_tokens)
    corrupted_logits, corrupted_cache = model.run_with_cache(corrupted_tokens)

    clean_logit_diff = get_logit_diff(clean_logits, answer_token_indices).item()
    print(f"Clean logit diff: {clean_logit_diff:.4f}")

    corrupted_logit_diff = get_logit_diff(corrupted_logits, answer_token_indices).item()
    print(f"Corrupted logit diff: {corrupted_logit_diff:.4f}")

    CLEAN_BASELINE = clean_logit_diff
    CORRUPTED_BASELINE = corrupted_logit_diff
    print(f"Clean Baseline is 1: {ioi_metric(clean_logits).item():.4f}")
    print(f"Corrupted Baseline is 0: {ioi_metric(corrupted_logits).item():.4f}")
    return dict(clean_tokens=clean_tokens, corrupted_tokens=corrupted_tokens, clean_cache=clean_cache,
                clean_logit_diff=clean_logit_diff, corrupted_logit_diff=corrupted_logit_diff,
                clean_metric=ioi_metric(clean_logits).item(), corrupted_metric=ioi_metric(corrupted_logits).item())


def ioi_patching(model: HookedTransformer, ioi: dict) -> dict:
    clean_tokens, corrupted_tokens, clean_cache = ioi["clean_tokens"], ioi["corrupted_tokens"], ioi["clean_cache"]

    resid_pre_act_patch_results = patching.get_act_patch_resid_pre(model, corrupted_tokens, clean_cache, ioi_metric)
    print("resid_pre Activation Patching [layer, position]:")  # changed: no plotting (imshow)
    print([f"{tok} {i}" for i, tok in enumerate(model.to_str_tokens(clean_tokens[0]))])
    print(resid_pre_act_patch_results.round(decimals=2))

    attn_head_out_all_pos_act_patch_results = patching.get_act_patch_attn_head_out_all_pos(model, corrupted_tokens, clean_cache, ioi_metric)
    print("attn_head_out Activation Patching (All Pos) [layer, head]:\n", attn_head_out_all_pos_act_patch_results.round(decimals=2))  # changed: no plotting (imshow)

    ALL_HEAD_LABELS = [f"L{i}H{j}" for i in range(model.cfg.n_layers) for j in range(model.cfg.n_heads)]
    attn_head_out_act_patch_results = None
    if DO_SLOW_RUNS:
        attn_head_out_act_patch_results = patching.get_act_patch_attn_head_out_by_pos(model, corrupted_tokens, clean_cache, ioi_metric)
        attn_head_out_act_patch_results = einops.rearrange(attn_head_out_act_patch_results, "layer pos head -> (layer head) pos")
        print("attn_head_out Activation Patching By Pos, final position:", dict(zip(ALL_HEAD_LABELS, attn_head_out_act_patch_results[:, -1].round(decimals=2).tolist())))  # changed: no plotting (imshow)

    every_block_result = patching.get_act_patch_block_every(model, corrupted_tokens, clean_cache, ioi_metric)
    print("Activation Patching Per Block [Residual Stream, Attn Output, MLP Output] x [layer, position]:\n", every_block_result.round(decimals=2))  # changed: no plotting (imshow, facet_col=0)

    every_head_all_pos_act_patch_result = patching.get_act_patch_attn_head_all_pos_every(model, corrupted_tokens, clean_cache, ioi_metric)
    print("Activation Patching Per Head (All Pos) [Output, Query, Key, Value, Pattern] x [layer, head]:\n", every_head_all_pos_act_patch_result.round(decimals=2))  # changed: no plotting (imshow, facet_col=0)
    return dict(resid_pre=resid_pre_act_patch_results, head_out_all_pos=attn_head_out_all_pos_act_patch_results,
                head_out_by_pos=attn_head_out_act_patch_results, block_every=every_block_result,
                head_all_pos_every=every_head_all_pos_act_patch_result)


# --- Induction (the notebook uses attn-only-2l; the shipped model has an induction head too) ------

CLEAN_BASELINE_INDUCTION = None
CORRUPTED_BASELINE_INDUCTION = None
rand_tokens_A = None


def induction_loss(logits, answer_token_indices=None):  # changed: default None: the notebook binds the global rand_tokens_A here, which this script sets later
    answer_token_indices = rand_tokens_A if answer_token_indices is None else answer_token_indices  # changed: the global, read when called
    seq_len = answer_token_indices.shape[1]
    # logits: batch x seq_len x vocab
    # We only take the logits from the second half, which is the one where the model should be predicting the next token
    logits = logits[:, seq_len:-1]
    log_probs = jax.nn.log_softmax(logits, axis=-1)  # changed: tensor.log_softmax(dim=-1) -> jax.nn.log_softmax
    correct_log_probs = jnp.take_along_axis(log_probs, answer_token_indices[:, 1:, None], axis=-1)[..., 0]  # changed: gather -> jnp.take_along_axis
    return -correct_log_probs.mean()


def induction_metric(logits):
    return (induction_loss(logits) - CORRUPTED_BASELINE_INDUCTION) / (CLEAN_BASELINE_INDUCTION - CORRUPTED_BASELINE_INDUCTION)


def induction_patching(attn_only: HookedTransformer) -> dict:
    global CLEAN_BASELINE_INDUCTION, CORRUPTED_BASELINE_INDUCTION, rand_tokens_A
    batch = 4
    seq_len = 20
    rand_tokens_A = jax.random.randint(jax.random.key(0), (batch, seq_len), 100, attn_only.cfg.d_vocab)  # changed: torch.randint(100, 10000, ...) -> explicit key; the shipped vocab has 1024 tokens
    rand_tokens_B = jax.random.randint(jax.random.key(1), (batch, seq_len), 100, attn_only.cfg.d_vocab)  # changed: torch.randint(100, 10000, ...) -> explicit key; the shipped vocab has 1024 tokens
    rand_tokens_A = rand_tokens_A.at[:, 0].set(attn_only.tokenizer.bos_token_id)  # changed: in-place assignment -> .at[].set
    rand_tokens_B = rand_tokens_B.at[:, 0].set(attn_only.tokenizer.bos_token_id)  # changed: in-place assignment -> .at[].set
    clean_tokens_induction = jnp.concatenate([rand_tokens_A, rand_tokens_A], axis=1)  # changed: torch.cat(dim=) -> jnp.concatenate(axis=)
    corrupted_tokens_induction = jnp.concatenate([rand_tokens_A, rand_tokens_B], axis=1)  # changed: torch.cat(dim=) -> jnp.concatenate(axis=)

    induction_logits, induction_cache = attn_only.run_with_cache(clean_tokens_induction)
    CLEAN_BASELINE_INDUCTION = induction_loss(induction_logits).item()
    print("Clean baseline:", CLEAN_BASELINE_INDUCTION)
    corrupted_logits_induction = attn_only(corrupted_tokens_induction)
    CORRUPTED_BASELINE_INDUCTION = induction_loss(corrupted_logits_induction).item()
    print("Corrupted baseline:", CORRUPTED_BASELINE_INDUCTION)

    induction_resid_pre = patching.get_act_patch_resid_pre(attn_only, corrupted_tokens_induction, induction_cache, induction_metric)
    print("Induction resid_pre Activation Patching, second half [layer, position]:\n", induction_resid_pre[:, seq_len:].round(decimals=2))  # changed: no plotting (imshow)
    induction_attn_out = patching.get_act_patch_attn_head_out_all_pos(attn_only, corrupted_tokens_induction, induction_cache, induction_metric)
    print("Induction attn_head_out Activation Patching (All Pos) [layer, head]:\n", induction_attn_out.round(decimals=2))  # changed: no plotting (imshow)
    return dict(clean_baseline=CLEAN_BASELINE_INDUCTION, corrupted_baseline=CORRUPTED_BASELINE_INDUCTION,
                resid_pre=induction_resid_pre, head_out_all_pos=induction_attn_out, tokens=clean_tokens_induction)


def main(model: HookedTransformer | None = None) -> dict:
    model = load_model() if model is None else model
    out = dict(model=model)
    out["ioi"] = ioi_setup(model)
    out["ioi_patching"] = ioi_patching(model, out["ioi"])
    attn_only = model  # changed: the shipped model has induction heads too (the notebook loads "attn-only-2l")
    out["induction"] = induction_patching(attn_only)
    return out


if __name__ == "__main__":
    main()
