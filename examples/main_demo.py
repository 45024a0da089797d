"""Port of TransformerLens's `Main_Demo.ipynb` (demos/Main_Demo.ipynb) to jaxlens.

Written by us against the public notebook's workflow, on the model jaxlens ships (a 2-layer
GPT-2-format model trained on synthetic text; nothing is downloaded) instead of GPT-2 small:
loading, tokens, loss, `run_with_cache` and the cache's indexing, hooks (head ablation over a
loop of heads), induction heads on repeated random tokens, `FactoredMatrix` and the OV copying
score, generation, `utils.test_prompt`, weights and `stop_at_layer`. The notebook's
activation-patching cell is ported in `exploratory_analysis_demo.py`.

Changed lines: 46 (7 of them imports). Every line that differs from the TransformerLens version
carries a trailing `# changed: <why>` comment (a dropped line is noted on its neighbour). Lines that
the TransformerLens version of this script would share are not marked, prints we added included;
nor is the scaffolding: the notebook's cells are functions here (each section's `def` and
`return`, and `main`), so that tests can call them.

Run: `.venv/bin/python examples/main_demo.py`
"""

from __future__ import annotations

import einops
import jax  # changed: import (jax instead of torch)
import jax.numpy as jnp  # changed: import (jnp instead of torch)
from jaxtyping import Float

import jaxlens.utils as utils  # changed: import (transformer_lens.utils)
from jaxlens import FactoredMatrix, HookedTransformer  # changed: import (from transformer_lens)
from jaxlens.assets import model_dir  # changed: import (the model jaxlens ships; nothing is downloaded)
from jaxlens.hooks import HookPoint  # changed: import (transformer_lens.hook_points)

# changed: import (circuitsvis and the plotly imshow/line/scatter helpers dropped: no plotting, numbers are printed)
# changed: `torch.set_grad_enabled(False)` dropped (nothing is differentiated unless asked)


def load_model() -> HookedTransformer:
    device = utils.get_device()
    model = HookedTransformer.from_pretrained(model_dir(), device=device)  # changed: the shipped model for "gpt2-small"
    return model


# --- Loading and running models ------------------------------------------------------------------

MODEL_DESCRIPTION_TEXT = """When Mary and John went to the store, John gave a drink to Mary. 1 2 3 4 5 6 7 8 9 10. a b c d e f g h."""  # changed: text the shipped model was trained on (the notebook's paragraph about loading models)


def loss_and_cache(model: HookedTransformer) -> dict:
    loss = model(MODEL_DESCRIPTION_TEXT, return_type="loss")
    print("Model loss:", loss)

    gpt2_text = "When Mary and John went to the store, John gave a drink to Mary. Then, Tom and Anna went to the park. Tom handed the ball to Anna."  # changed: text the shipped model was trained on
    gpt2_tokens = model.to_tokens(gpt2_text)
    print(gpt2_tokens.device)
    gpt2_logits, gpt2_cache = model.run_with_cache(gpt2_tokens, remove_batch_dim=True)

    attention_pattern = gpt2_cache["pattern", 0, "attn"]
    print(attention_pattern.shape)
    gpt2_str_tokens = model.to_str_tokens(gpt2_text)
    print("Layer 0 Head Attention Patterns:")
    print("  strongest attention per head:", attention_pattern.max(axis=(1, 2)))  # changed: no plotting (circuitsvis attention_patterns)

    attn_hook_name = "blocks.0.attn.hook_pattern"
    attn_layer = 0
    _, gpt2_attn_cache = model.run_with_cache(gpt2_tokens, remove_batch_dim=True, stop_at_layer=attn_layer + 1, names_filter=[attn_hook_name])
    gpt2_attn = gpt2_attn_cache[attn_hook_name]
    assert jnp.allclose(gpt2_attn, attention_pattern, atol=1e-6)  # changed: torch.equal -> allclose: a names_filter/stop_at_layer run is another compiled program and differs by ~2e-7
    print("act name:", utils.get_act_name("pattern", 0), utils.get_act_name("resid_pre", 1), utils.get_act_name("z", 1, "a"))
    return dict(loss=float(loss), n_tokens=len(gpt2_str_tokens), pattern_shape=tuple(attention_pattern.shape),
                cache_keys=len(gpt2_cache), attn_cache_keys=sorted(gpt2_attn_cache.keys()))


# --- Hooks: intervening on activations -----------------------------------------------------------

def repeated_random_tokens(model: HookedTransformer, batch_size: int = 10, seq_len: int = 50, seed: int = 0):
    size = (batch_size, seq_len)
    input_tensor = jax.random.randint(jax.random.key(seed), size, 100, model.cfg.d_vocab)  # changed: torch.randint(1000, 10000, size) -> explicit key; the shipped vocab has 1024 tokens
    random_tokens = input_tensor  # changed: `.to(model.cfg.device)` dropped (JAX places inputs beside the params)
    repeated_tokens = einops.repeat(random_tokens, "batch seq_len -> batch (2 seq_len)")
    return repeated_tokens


def head_ablation(model: HookedTransformer, repeated_tokens) -> dict:
    """Zero one head's values, for every head in turn (the notebook ablates L0H8 of GPT-2 small),
    and compare the loss on repeated random tokens (where the induction head matters)."""

    def head_ablation_hook(
        value: Float[jax.Array, "batch pos head_index d_head"],  # changed: torch.Tensor -> jax.Array in the annotation
        hook: HookPoint
    ) -> Float[jax.Array, "batch pos head_index d_head"]:  # changed: torch.Tensor -> jax.Array in the annotation
        value = value.at[:, :, head_index_to_ablate, :].set(0.)  # changed: in-place `value[...] = 0.` -> .at[].set (JAX arrays are immutable)
        return value

    original_loss = model(repeated_tokens, return_type="loss")
    ablated = jnp.zeros((model.cfg.n_layers, model.cfg.n_heads))  # changed: results tensor built with jnp (the notebook ablates one head)
    for layer_to_ablate in range(model.cfg.n_layers):
        for head_index_to_ablate in range(model.cfg.n_heads):  # the hook reads this loop variable
            ablated_loss = model.run_with_hooks(
                repeated_tokens,
                return_type="loss",
                fwd_hooks=[(
                    utils.get_act_name("v", layer_to_ablate),
                    head_ablation_hook
                    )]
                )
            ablated = ablated.at[layer_to_ablate, head_index_to_ablate].set(ablated_loss)  # changed: in-place store -> .at[].set
    print(f"Original Loss: {original_loss.item():.3f}")
    print("Ablated Loss per head [layer, head]:\n", ablated.round(decimals=3))
    return dict(original_loss=float(original_loss), ablated_loss=ablated)


# --- Induction heads -----------------------------------------------------------------------------

def induction_heads(model: HookedTransformer, repeated_tokens) -> dict:
    seq_len = repeated_tokens.shape[1] // 2
    repeated_logits = model(repeated_tokens)
    correct_log_probs = model.loss_fn(repeated_logits, repeated_tokens, per_token=True)
    loss_by_position = einops.reduce(correct_log_probs, "batch position -> position", "mean")
    print("Loss by position on random repeated tokens: first half %.3f, second half %.3f" % (loss_by_position[:seq_len - 1].mean(), loss_by_position[seq_len:].mean()))  # changed: no plotting (line)

    def induction_score_hook(
        pattern: Float[jax.Array, "batch head_index dest_pos source_pos"],  # changed: torch.Tensor -> jax.Array in the annotation
        hook: HookPoint,
    ):
        # We take the diagonal of attention paid from each destination position to source positions seq_len-1 tokens back
        # (This only has entries for tokens with index>=seq_len)
        induction_stripe = jnp.diagonal(pattern, axis1=-2, axis2=-1, offset=1-seq_len)  # changed: tensor.diagonal(dim1, dim2) -> jnp.diagonal(axis1, axis2)
        # Get an average score per head
        induction_score = einops.reduce(induction_stripe, "batch head_index position -> head_index", "mean")
        # Return the result (the notebook stores it into a global tensor)
        return induction_score  # changed: a hook cannot write into a global tensor (it runs once, traced): return the score

    # We make a boolean filter on activation names, that's true only on attention pattern names.
    pattern_hook_names_filter = lambda name: name.endswith("pattern")

    _, pattern_cache = model.run_with_cache(  # changed: run_with_cache instead of run_with_hooks: the hook's job is done on the cached patterns
        repeated_tokens,
        return_type=None, # For efficiency, we don't need to calculate the logits
        names_filter=pattern_hook_names_filter,  # changed: names_filter= instead of fwd_hooks=[(filter, induction_score_hook)]
    )
    induction_score_store = jnp.stack([induction_score_hook(pattern_cache["pattern", l], HookPoint(utils.get_act_name("pattern", l), l)) for l in range(model.cfg.n_layers)])  # changed: the store is built from the returned scores, not by writes in the hook
    print("Induction Score by Head [layer, head]:\n", induction_score_store.round(decimals=3))  # changed: no plotting (imshow)
    return dict(loss_by_position=loss_by_position, induction_score=induction_score_store)


# --- FactoredMatrix and the OV copying score -----------------------------------------------------

def factored_matrix(model: HookedTransformer) -> dict:
    A = jax.random.normal(jax.random.key(1), (5, 2))  # changed: torch.randn -> jax.random with an explicit key
    B = jax.random.normal(jax.random.key(2), (2, 5))  # changed: torch.randn -> jax.random with an explicit key
    AB = A @ B
    AB_factor = FactoredMatrix(A, B)
    print("Norms:")
    print(jnp.linalg.norm(AB))  # changed: tensor.norm() -> jnp.linalg.norm (jax arrays have no .norm())
    print(AB_factor.norm())
    print(f"Right dim: {AB_factor.rdim}, Left dim: {AB_factor.ldim}, Hidden dim: {AB_factor.mdim}")
    print("Eigenvalues:")
    print(jnp.linalg.eigvals(AB))  # changed: torch.linalg.eig(AB).eigenvalues -> jnp.linalg.eigvals
    print(AB_factor.eigenvalues)
    print("Singular Values:")
    print(jnp.linalg.svd(AB).S)  # changed: torch.linalg.svd -> jnp.linalg.svd
    print(AB_factor.S)
    print("Full SVD:")
    print(AB_factor.svd())
    C = jax.random.normal(jax.random.key(3), (5, 300))  # changed: torch.randn -> jax.random with an explicit key
    ABC = AB @ C
    ABC_factor = AB_factor @ C
    print("Unfactored:", ABC.shape, jnp.linalg.norm(ABC))  # changed: tensor.norm() -> jnp.linalg.norm
    print("Factored:", ABC_factor.shape, ABC_factor.norm())
    print(f"Right dim: {ABC_factor.rdim}, Left dim: {ABC_factor.ldim}, Hidden dim: {ABC_factor.mdim}")
    AB_unfactored = AB_factor.AB
    print(jnp.isclose(AB_unfactored, AB).all())  # changed: torch.isclose -> jnp.isclose

    OV_circuit_all_heads = model.OV
    print(OV_circuit_all_heads)
    OV_circuit_all_heads_eigenvalues = OV_circuit_all_heads.eigenvalues
    print(OV_circuit_all_heads_eigenvalues.shape)
    print(OV_circuit_all_heads_eigenvalues.dtype)
    OV_copying_score = OV_circuit_all_heads_eigenvalues.sum(axis=-1).real / jnp.abs(OV_circuit_all_heads_eigenvalues).sum(axis=-1)  # changed: dim= -> axis=, .abs() -> jnp.abs
    print("OV Copying Score for each head [layer, head]:\n", utils.to_numpy(OV_copying_score).round(decimals=3))  # changed: no plotting (imshow)

    full_OV_circuit = model.embed.W_E @ OV_circuit_all_heads @ model.unembed.W_U
    print(full_OV_circuit)
    full_OV_circuit_eigenvalues = full_OV_circuit.eigenvalues
    full_OV_copying_score = full_OV_circuit_eigenvalues.sum(axis=-1).real / jnp.abs(full_OV_circuit_eigenvalues).sum(axis=-1)  # changed: dim= -> axis=, .abs() -> jnp.abs
    print("Full OV Copying Score [layer, head]:\n", utils.to_numpy(full_OV_copying_score).round(decimals=3))  # changed: no plotting (imshow)
    return dict(norm=(float(jnp.linalg.norm(AB)), float(AB_factor.norm())), ABC_norm=(float(jnp.linalg.norm(ABC)), float(ABC_factor.norm())),
                OV_copying_score=OV_copying_score, full_OV_copying_score=full_OV_copying_score)


# --- Generating text, dealing with tokens, test_prompt -------------------------------------------

def tokens_and_generation(model: HookedTransformer) -> dict:
    greedy = model.generate("1 2 3 4 5", max_new_tokens=10, do_sample=False)  # changed: a prompt the shipped model knows (counting)
    sampled = model.generate("When Mary and John went to the", max_new_tokens=20, temperature=0.7, key=jax.random.key(0))  # changed: a prompt the shipped model knows; explicit PRNG key (JAX has no global RNG)
    print("Greedy:", greedy)
    print("Sampled:", sampled)

    example_text = "When Mary and John went to the store, John gave a drink to Mary."  # changed: text the shipped model was trained on
    example_text_str_tokens = model.to_str_tokens(example_text)
    print(example_text_str_tokens)
    example_text_tokens = model.to_tokens(example_text)
    print(example_text_tokens)
    example_multi_text = ["The cat sat on the mat.", "The cat sat on the mat really hard."]
    example_multi_text_tokens = model.to_tokens(example_multi_text)
    print(example_multi_text_tokens)

    cat_text = "The cat sat on the mat."
    cat_logits = model(cat_text)
    cat_probs = jax.nn.softmax(cat_logits, axis=-1)  # changed: tensor.softmax(dim=-1) -> jax.nn.softmax(axis=-1)
    print(f"Probability tensor shape [batch, position, d_vocab] == {cat_probs.shape}")
    capital_the_token_index = model.to_single_token(" The")
    print(f"| The| probability: {cat_probs[0, -1, capital_the_token_index].item():.2%}")
    print(model.to_string(example_text_tokens[0, 1:5]))
    print("Logits shape by default (with BOS)", model("Hello World").shape)
    print("Logits shape with BOS", model("Hello World", prepend_bos=True).shape)
    print("Logits shape without BOS - should be 1 less", model("Hello World", prepend_bos=False).shape)

    example_prompt = "After John and Mary went to the store, John gave a drink to"  # changed: "a bottle of milk" is not in the shipped model's data
    example_answer = " Mary"
    utils.test_prompt(example_prompt, example_answer, model, prepend_bos=True)
    return dict(greedy=greedy, sampled=sampled, multi_shape=tuple(example_multi_text_tokens.shape),
                with_bos=model("Hello World").shape[1], without_bos=model("Hello World", prepend_bos=False).shape[1])


# --- Weights and stop_at_layer -------------------------------------------------------------------

def weights_and_stop_at_layer(model: HookedTransformer) -> dict:
    for name, param in model.named_parameters():
        if name.startswith("blocks.0."):
            print(name, param.shape)
    print("W_Q of block 0:", model.blocks[0].attn.W_Q.shape)
    print("W_Q stacked over layers:", model.W_Q.shape)
    print("W_U:", model.W_U.shape)

    tokens = model.to_tokens("When Mary and John went to the store, John gave a drink to")
    resid = model(tokens, stop_at_layer=1)
    _, cache = model.run_with_cache(tokens)
    print("stop_at_layer=1 returns resid_pre of block 1:", resid.shape, jnp.allclose(resid, cache["resid_pre", 1], atol=1e-5))  # changed: torch.allclose -> jnp.allclose
    return dict(W_Q0=tuple(model.blocks[0].attn.W_Q.shape), W_Q=tuple(model.W_Q.shape), W_U=tuple(model.W_U.shape),
                stop_resid=resid, cache_resid_pre1=cache["resid_pre", 1])


def main(model: HookedTransformer | None = None) -> dict:
    model = load_model() if model is None else model
    out = dict(model=model)
    out["loss_and_cache"] = loss_and_cache(model)
    repeated_tokens = repeated_random_tokens(model)
    out["head_ablation"] = head_ablation(model, repeated_tokens)
    out["induction"] = induction_heads(model, repeated_tokens)
    out["factored"] = factored_matrix(model)
    out["tokens"] = tokens_and_generation(model)
    out["weights"] = weights_and_stop_at_layer(model)
    return out


if __name__ == "__main__":
    main()
