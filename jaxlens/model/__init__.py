"""Flax linen modules of the hooked transformer."""

from jaxlens.model.transformer import Transformer

__all__ = ["Transformer"]
