"""Port of TransformerLens's `Exploratory_Analysis_Demo.ipynb` (demos/Exploratory_Analysis_Demo.ipynb) to jaxlens.

Written by us against the public notebook's workflow, on the model jaxlens ships (a 2-layer
GPT-2-format model trained on synthetic text, IOI-like sentences among them) instead of GPT-2
small: the indirect-object-identification task, the logit difference, direct logit attribution
(logit lens with `accumulated_resid`, `decompose_resid`, `stack_head_results`,
`apply_ln_to_stack`, `tokens_to_residual_directions`), activation patching by hand (residual
stream, attention and MLP outputs, heads) with `functools.partial` hooks, and head detection.

Changed lines: 56 (9 of them imports). Every line that differs from the TransformerLens version
carries a trailing `# changed: <why>` comment (a dropped line is noted on its neighbour). Lines that
the TransformerLens version of this script would share are not marked, prints we added included;
nor is the scaffolding: the notebook's cells are functions here (each section's `def` and
`return`, and `main`), so that tests can call them.

Run: `.venv/bin/python examples/exploratory_analysis_demo.py`
"""

from __future__ import annotations

from functools import partial

import einops
import jax  # changed: import (jax instead of torch)
import jax.numpy as jnp  # changed: import (jnp instead of torch)
from einops import einsum  # changed: import (fancy_einsum's einsum takes no JAX arrays; einops.einsum puts the operands first)
from jaxtyping import Float

import jaxlens.utils as utils  # changed: import (transformer_lens.utils)
from jaxlens import ActivationCache, HookedTransformer  # changed: import (from transformer_lens)
from jaxlens.assets import model_dir  # changed: import (the model jaxlens ships; nothing is downloaded)
from jaxlens.head_detector import detect_head  # changed: import (transformer_lens.head_detector; the Head_Detector_Demo's tool)
from jaxlens.hooks import HookPoint  # changed: import (transformer_lens.hook_points)
# changed: import (circuitsvis, plotly and the imshow/line/scatter helpers dropped: no plotting, numbers are printed)


def load_model() -> HookedTransformer:
    model = HookedTransformer.from_pretrained(
        model_dir(),  # changed: the shipped model for "gpt2-small"
        center_unembed=True,
        center_writing_weights=True,
        fold_ln=True,
        refactor_factored_attn_matrices=True,
    )
    return model


# --- The IOI task --------------------------------------------------------------------------------

example_prompt = "After John and Mary went to the store, John gave a drink to"  # changed: "a bottle of milk" is not in the shipped model's data
example_answer = " Mary"

prompt_format = [
    "When John and Mary went to the store,{} gave a drink to",  # changed: the shipped model's places and objects
    "When Tom and James went to the park,{} gave the ball to",
    "When Dan and Sam went to the store,{} gave a cake to",  # changed: the shipped model's names, places and objects
    "After Paul and Amy went to the park,{} gave a drink to",  # changed: the shipped model's names (" Martin" is 3 tokens)
]
names = [
    (" John", " Mary"),
    (" Tom", " James"),
    (" Dan", " Sam"),  # changed: " Sid" is two tokens in the shipped tokenizer
    (" Paul", " Amy"),  # changed: " Martin" is three tokens in the shipped tokenizer
]


def ioi_prompts(model: HookedTransformer):
    # List of prompts
    prompts = []
    # List of answers, in the format (correct, incorrect)
    answers = []
    # List of the token (ie an integer) corresponding to each answer, in the format (correct_token, incorrect_token)
    answer_tokens = []
    for i in range(len(prompt_format)):
        for j in range(2):
            answers.append((names[i][j], names[i][1 - j]))
            answer_tokens.append(
                (
                    model.to_single_token(answers[-1][0]),
                    model.to_single_token(answers[-1][1]),
                )
            )
            # Insert the *incorrect* answer to the prompt, making the correct answer the indirect object.
            prompts.append(prompt_format[i].format(answers[-1][1]))
    answer_tokens = jnp.array(answer_tokens)  # changed: torch.tensor(...).to(device) -> jnp.array
    print(prompts)
    print(answers)
    for prompt in prompts:
        str_tokens = model.to_str_tokens(prompt)
        print("Prompt length:", len(str_tokens))
        print("Prompt as tokens:", str_tokens)
    return prompts, answers, answer_tokens


def logits_to_ave_logit_diff(logits, answer_tokens, per_prompt=False):
    # Only the final logits are relevant for the answer
    final_logits = logits[:, -1, :]
    answer_logits = jnp.take_along_axis(final_logits, answer_tokens, axis=-1)  # changed: tensor.gather(dim, index) -> jnp.take_along_axis
    answer_logit_diff = answer_logits[:, 0] - answer_logits[:, 1]
    if per_prompt:
        return answer_logit_diff
    else:
        return answer_logit_diff.mean()


def logit_difference(model: HookedTransformer) -> dict:
    utils.test_prompt(example_prompt, example_answer, model, prepend_bos=True)
    prompts, answers, answer_tokens = ioi_prompts(model)
    tokens = model.to_tokens(prompts, prepend_bos=True)  # changed: the notebook's next line, `tokens = tokens.to(device)`, is dropped (JAX places inputs beside the params)
    # Run the model and cache all activations
    original_logits, cache = model.run_with_cache(tokens)
    print("Per prompt logit difference:", logits_to_ave_logit_diff(original_logits, answer_tokens, per_prompt=True).round(decimals=3))  # changed: .detach().cpu() dropped
    original_average_logit_diff = logits_to_ave_logit_diff(original_logits, answer_tokens)
    print("Average logit difference:", round(logits_to_ave_logit_diff(original_logits, answer_tokens).item(), 3))
    return dict(prompts=prompts, answers=answers, answer_tokens=answer_tokens, tokens=tokens,
                original_logits=original_logits, cache=cache, original_average_logit_diff=original_average_logit_diff,
                per_prompt=logits_to_ave_logit_diff(original_logits, answer_tokens, per_prompt=True))


# --- Direct logit attribution --------------------------------------------------------------------

def direct_logit_attribution(model: HookedTransformer, ioi: dict) -> dict:
    prompts, answer_tokens, cache = ioi["prompts"], ioi["answer_tokens"], ioi["cache"]
    original_average_logit_diff = ioi["original_average_logit_diff"]

    answer_residual_directions = model.tokens_to_residual_directions(answer_tokens)
    print("Answer residual directions shape:", answer_residual_directions.shape)
    logit_diff_directions = answer_residual_directions[:, 0] - answer_residual_directions[:, 1]
    print("Logit difference directions shape:", logit_diff_directions.shape)

    # cache syntax - resid_post is the residual stream at the end of the layer, -1 gets the final layer.
    final_residual_stream = cache["resid_post", -1]
    print("Final residual stream shape:", final_residual_stream.shape)
    final_token_residual_stream = final_residual_stream[:, -1, :]
    # Apply LayerNorm scaling
    # pos_slice is the subset of the positions we take - here the final token of each prompt
    scaled_final_token_residual_stream = cache.apply_ln_to_stack(final_token_residual_stream, layer=-1, pos_slice=-1)

    average_logit_diff = einsum(scaled_final_token_residual_stream, logit_diff_directions, "batch d_model, batch d_model -> ") / len(prompts)  # changed: einops.einsum takes the operands first
    print("Calculated average logit diff:", round(average_logit_diff.item(), 3))
    print("Original logit difference:", round(original_average_logit_diff.item(), 3))

    def residual_stack_to_logit_diff(
        residual_stack: Float[jax.Array, "components batch d_model"],  # changed: torch.Tensor -> jax.Array in the annotation
        cache: ActivationCache,
    ) -> float:
        scaled_residual_stack = cache.apply_ln_to_stack(residual_stack, layer=-1, pos_slice=-1)
        return einsum(scaled_residual_stack, logit_diff_directions, "... batch d_model, batch d_model -> ...") / len(prompts)  # changed: einops.einsum takes the operands first

    # Logit lens
    accumulated_residual, labels = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1, return_labels=True)
    logit_lens_logit_diffs = residual_stack_to_logit_diff(accumulated_residual, cache)
    print("Logit Difference From Accumulated Residual Stream:", dict(zip(labels, logit_lens_logit_diffs.round(decimals=3).tolist())))  # changed: no plotting (line)

    # Logit lens with the real final norm on each component (TransformerLens 4's `apply_ln=True`)
    accum_resid, accum_labels = cache.accumulated_resid(return_labels=True, apply_ln=True)
    logit_lens_ln_diffs = einsum(accum_resid[:, :, -1, :], logit_diff_directions, "layer batch d_model, batch d_model -> layer") / len(prompts)  # changed: einops.einsum takes the operands first
    print("Logit lens (apply_ln=True):", dict(zip(accum_labels, logit_lens_ln_diffs.round(decimals=3).tolist())))

    # Layer attribution
    per_layer_residual, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
    per_layer_logit_diffs = residual_stack_to_logit_diff(per_layer_residual, cache)
    print("Logit Difference From Each Layer:", dict(zip(labels, per_layer_logit_diffs.round(decimals=3).tolist())))  # changed: no plotting (line)

    # Head attribution
    per_head_residual, labels = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
    per_head_logit_diffs = residual_stack_to_logit_diff(per_head_residual, cache)
    per_head_logit_diffs = einops.rearrange(
        per_head_logit_diffs,
        "(layer head_index) -> layer head_index",
        layer=model.cfg.n_layers,
        head_index=model.cfg.n_heads,
    )
    print("Logit Difference From Each Head [layer, head]:\n", per_head_logit_diffs.round(decimals=3))  # changed: no plotting (imshow)

    top_k = 3
    top_positive_logit_attr_heads = jax.lax.top_k(per_head_logit_diffs.flatten(), top_k)[1]  # changed: torch.topk(x, k=k).indices -> jax.lax.top_k(x, k)[1]
    top_negative_logit_attr_heads = jax.lax.top_k(-per_head_logit_diffs.flatten(), top_k)[1]  # changed: torch.topk(x, k=k).indices -> jax.lax.top_k(x, k)[1]
    print("Top positive heads:", [model.all_head_labels[int(i)] for i in top_positive_logit_attr_heads])  # changed: no plotting (visualize_attention_patterns)
    print("Top negative heads:", [model.all_head_labels[int(i)] for i in top_negative_logit_attr_heads])  # changed: no plotting (visualize_attention_patterns)
    return dict(average_logit_diff=average_logit_diff, logit_lens=logit_lens_logit_diffs, logit_lens_labels=labels,
                logit_lens_ln=logit_lens_ln_diffs, per_layer=per_layer_logit_diffs, per_head=per_head_logit_diffs,
                top_positive=top_positive_logit_attr_heads)


# --- Activation patching -------------------------------------------------------------------------

def patch_residual_component(
    corrupted_residual_component: Float[jax.Array, "batch pos d_model"],  # changed: torch.Tensor -> jax.Array in the annotation
    hook: HookPoint,
    pos,
    clean_cache,
):
    corrupted_residual_component = corrupted_residual_component.at[:, pos, :].set(clean_cache[hook.name][:, pos, :])  # changed: in-place assignment -> .at[].set
    return corrupted_residual_component


def patch_head_vector(
    corrupted_head_vector: Float[jax.Array, "batch pos head_index d_head"],  # changed: torch.Tensor -> jax.Array in the annotation
    hook: HookPoint,
    head_index,
    clean_cache,
):
    corrupted_head_vector = corrupted_head_vector.at[:, :, head_index, :].set(clean_cache[hook.name][:, :, head_index, :])  # changed: in-place assignment -> .at[].set
    return corrupted_head_vector


def patch_head_pattern(
    corrupted_head_pattern: Float[jax.Array, "batch head_index query_pos d_head"],  # changed: torch.Tensor -> jax.Array in the annotation
    hook: HookPoint,
    head_index,
    clean_cache,
):
    corrupted_head_pattern = corrupted_head_pattern.at[:, head_index, :, :].set(clean_cache[hook.name][:, head_index, :, :])  # changed: in-place assignment -> .at[].set
    return corrupted_head_pattern


def activation_patching(model: HookedTransformer, ioi: dict) -> dict:
    prompts, answer_tokens, tokens, cache = ioi["prompts"], ioi["answer_tokens"], ioi["tokens"], ioi["cache"]
    original_average_logit_diff = ioi["original_average_logit_diff"]

    corrupted_prompts = []
    for i in range(0, len(prompts), 2):
        corrupted_prompts.append(prompts[i + 1])
        corrupted_prompts.append(prompts[i])
    corrupted_tokens = model.to_tokens(corrupted_prompts, prepend_bos=True)
    corrupted_logits, corrupted_cache = model.run_with_cache(corrupted_tokens, return_type="logits")
    corrupted_average_logit_diff = logits_to_ave_logit_diff(corrupted_logits, answer_tokens)
    print("Corrupted Average Logit Diff", round(corrupted_average_logit_diff.item(), 2))
    print("Clean Average Logit Diff", round(original_average_logit_diff.item(), 2))

    def normalize_patched_logit_diff(patched_logit_diff):
        # Subtract corrupted logit diff to measure the improvement, divide by the total improvement from clean to corrupted to normalise
        # 0 means zero change, negative means actively made worse, 1 means totally recovered clean performance, >1 means actively *improved* on clean performance
        return (patched_logit_diff - corrupted_average_logit_diff) / (original_average_logit_diff - corrupted_average_logit_diff)

    # Residual stream
    patched_residual_stream_diff = jnp.zeros((model.cfg.n_layers, tokens.shape[1]), dtype=jnp.float32)  # changed: torch.zeros(..., device=device) -> jnp.zeros
    for layer in range(model.cfg.n_layers):
        for position in range(tokens.shape[1]):
            hook_fn = partial(patch_residual_component, pos=position, clean_cache=cache)
            patched_logits = model.run_with_hooks(
                corrupted_tokens,
                fwd_hooks=[(utils.get_act_name("resid_pre", layer), hook_fn)],
                return_type="logits",
            )
            patched_logit_diff = logits_to_ave_logit_diff(patched_logits, answer_tokens)
            patched_residual_stream_diff = patched_residual_stream_diff.at[layer, position].set(normalize_patched_logit_diff(patched_logit_diff))  # changed: in-place store -> .at[].set

    prompt_position_labels = [f"{tok}_{i}" for i, tok in enumerate(model.to_str_tokens(tokens[0]))]
    print("Logit Difference From Patched Residual Stream [layer, position]:")  # changed: no plotting (imshow)
    print(prompt_position_labels)
    print(patched_residual_stream_diff.round(decimals=2))

    # Layers
    patched_attn_diff = jnp.zeros((model.cfg.n_layers, tokens.shape[1]), dtype=jnp.float32)  # changed: torch.zeros(..., device=device) -> jnp.zeros
    patched_mlp_diff = jnp.zeros((model.cfg.n_layers, tokens.shape[1]), dtype=jnp.float32)  # changed: torch.zeros(..., device=device) -> jnp.zeros
    for layer in range(model.cfg.n_layers):
        for position in range(tokens.shape[1]):
            hook_fn = partial(patch_residual_component, pos=position, clean_cache=cache)
            patched_attn_logits = model.run_with_hooks(
                corrupted_tokens,
                fwd_hooks=[(utils.get_act_name("attn_out", layer), hook_fn)],
                return_type="logits",
            )
            patched_attn_logit_diff = logits_to_ave_logit_diff(patched_attn_logits, answer_tokens)
            patched_mlp_logits = model.run_with_hooks(
                corrupted_tokens,
                fwd_hooks=[(utils.get_act_name("mlp_out", layer), hook_fn)],
                return_type="logits",
            )
            patched_mlp_logit_diff = logits_to_ave_logit_diff(patched_mlp_logits, answer_tokens)
            patched_attn_diff = patched_attn_diff.at[layer, position].set(normalize_patched_logit_diff(patched_attn_logit_diff))  # changed: in-place store -> .at[].set
            patched_mlp_diff = patched_mlp_diff.at[layer, position].set(normalize_patched_logit_diff(patched_mlp_logit_diff))  # changed: in-place store -> .at[].set
    print("Logit Difference From Patched Attention Layer:\n", patched_attn_diff.round(decimals=2))  # changed: no plotting (imshow)
    print("Logit Difference From Patched MLP Layer:\n", patched_mlp_diff.round(decimals=2))  # changed: no plotting (imshow)

    # Heads
    patched_head_z_diff = jnp.zeros((model.cfg.n_layers, model.cfg.n_heads), dtype=jnp.float32)  # changed: torch.zeros(..., device=device) -> jnp.zeros
    for layer in range(model.cfg.n_layers):
        for head_index in range(model.cfg.n_heads):
            hook_fn = partial(patch_head_vector, head_index=head_index, clean_cache=cache)
            patched_logits = model.run_with_hooks(
                corrupted_tokens,
                fwd_hooks=[(utils.get_act_name("z", layer, "attn"), hook_fn)],
                return_type="logits",
            )
            patched_logit_diff = logits_to_ave_logit_diff(patched_logits, answer_tokens)
            patched_head_z_diff = patched_head_z_diff.at[layer, head_index].set(normalize_patched_logit_diff(patched_logit_diff))  # changed: in-place store -> .at[].set
    print("Logit Difference From Patched Head Output [layer, head]:\n", patched_head_z_diff.round(decimals=2))  # changed: no plotting (imshow)

    patched_head_attn_diff = jnp.zeros((model.cfg.n_layers, model.cfg.n_heads), dtype=jnp.float32)  # changed: torch.zeros(..., device=device) -> jnp.zeros
    for layer in range(model.cfg.n_layers):
        for head_index in range(model.cfg.n_heads):
            hook_fn = partial(patch_head_pattern, head_index=head_index, clean_cache=cache)
            patched_logits = model.run_with_hooks(
                corrupted_tokens,
                fwd_hooks=[(utils.get_act_name("attn", layer, "attn"), hook_fn)],
                return_type="logits",
            )
            patched_logit_diff = logits_to_ave_logit_diff(patched_logits, answer_tokens)
            patched_head_attn_diff = patched_head_attn_diff.at[layer, head_index].set(normalize_patched_logit_diff(patched_logit_diff))  # changed: in-place store -> .at[].set
    print("Logit Difference From Patched Head Pattern [layer, head]:\n", patched_head_attn_diff.round(decimals=2))  # changed: no plotting (imshow)
    return dict(corrupted_tokens=corrupted_tokens, corrupted_average_logit_diff=corrupted_average_logit_diff,
                resid=patched_residual_stream_diff, attn=patched_attn_diff, mlp=patched_mlp_diff,
                head_z=patched_head_z_diff, head_pattern=patched_head_attn_diff, position_labels=prompt_position_labels)


# --- Head detector -------------------------------------------------------------------------------

def head_detection(model: HookedTransformer) -> dict:
    prompt = "When Mary and John went to the store, John gave a drink to Mary. 1 2 3 4 5 6 7 8 9 10"  # changed: a prompt the shipped model was trained on
    previous_token_scores = detect_head(model, prompt, "previous_token_head")
    duplicate_token_scores = detect_head(model, prompt, "duplicate_token_head")
    print("Previous token head scores [layer, head]:\n", previous_token_scores.round(decimals=3))  # changed: no plotting (plot_head_detection_scores)
    print("Duplicate token head scores [layer, head]:\n", duplicate_token_scores.round(decimals=3))  # changed: no plotting (plot_head_detection_scores)
    repeated = "red cat old tree music fish dog glass stone bird red cat old tree music fish dog glass stone bird"
    induction_scores = detect_head(model, repeated, "induction_head")
    print("Induction head scores [layer, head]:\n", induction_scores.round(decimals=3))  # changed: no plotting (plot_head_detection_scores)
    return dict(previous_token=previous_token_scores, duplicate_token=duplicate_token_scores, induction=induction_scores)


def main(model: HookedTransformer | None = None) -> dict:
    model = load_model() if model is None else model
    out = dict(model=model)
    out["ioi"] = logit_difference(model)
    out["dla"] = direct_logit_attribution(model, out["ioi"])
    out["patching"] = activation_patching(model, out["ioi"])
    out["heads"] = head_detection(model)
    return out


if __name__ == "__main__":
    main()
