"""The Llama 4 text model (single-device PyTorch)."""

from behemoth.model.transformer import Block, Transformer

__all__ = ["Block", "Transformer"]
