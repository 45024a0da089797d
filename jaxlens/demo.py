"""`jaxlens demo`: until the shipped model lands, run on a small random model built from a config."""

from __future__ import annotations

from pathlib import Path


def _random_model(out: Path) -> Path:
    import jax
    import jax.numpy as jnp

    from jaxlens.config import ModelConfig
    from jaxlens.conversion import save_converted
    from jaxlens.hooks import RunCtx
    from jaxlens.model import Transformer

    cfg = ModelConfig(model_type="gpt2", d_model=64, n_layers=2, n_heads=4, d_head=16, d_mlp=256, d_vocab=512,
                      n_ctx=128, tie_word_embeddings=True, model_name="random-gpt2-small-config")
    toks = jnp.zeros((1, 4), jnp.int32)
    params = Transformer(cfg).init(jax.random.key(0), toks, jnp.ones_like(toks), RunCtx())["params"]
    return save_converted(out / "random_model", cfg, jax.tree.map(lambda x: __import__("numpy").asarray(x), params))


def run_demo(model: str | None, out: Path) -> int:
    from jaxlens.cli import main

    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        try:
            from jaxlens.assets import model_dir

            model = str(model_dir())
        except FileNotFoundError:
            print("NOTE: the trained model that jaxlens ships is not built yet; running on a small RANDOM "
                  "GPT-2-shaped model built from a config (no tokenizer, so token ids are shown).")
            model = str(_random_model(out))
            return main(["run", "--model", model, "--tokens", "1,5,9,30,2,7,100,44,12,3"])
    return main(["run", "--model", model])
