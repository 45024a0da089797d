"""Files shipped with jaxlens: the small model it trains (see scripts/train_tiny.py)."""

from __future__ import annotations

from pathlib import Path

TINY = Path(__file__).parent / "tiny"


def model_dir() -> Path:
    """Folder of the shipped model (a standard HF GPT-2 checkpoint with its tokenizer)."""
    if not (TINY / "config.json").is_file():
        raise FileNotFoundError(
            f"the shipped model is not in {TINY}; pass --model DIR, or train it with scripts/train_tiny.py"
        )
    return TINY

__all__ = ["TINY", "model_dir"]
