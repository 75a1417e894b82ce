"""The Llama 4 model (single-device PyTorch): the text transformer, its MoE and attention, the vision tower."""

from behemoth.model.build import build_model
from behemoth.model.transformer import Block, Transformer

__all__ = ["Block", "Transformer", "build_model"]
