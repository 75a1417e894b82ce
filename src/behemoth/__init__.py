"""behemoth: the Llama 4 model family (Behemoth teacher, Maverick and Scout students) in PyTorch."""

from __future__ import annotations

import torch

from behemoth.config import PRESETS, ModelConfig, MoEConfig, RopeScaling, get_preset
from behemoth.model import Transformer

__version__ = "0.1.0"


def build_model(config: ModelConfig | str, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None, seed: int | None = 0) -> Transformer:
    """A freshly initialised model from a `ModelConfig` or a preset name.

    On the "meta" device nothing is allocated (useful for counting parameters of huge presets).
    """
    cfg = get_preset(config) if isinstance(config, str) else config
    with torch.device(device):
        model = Transformer(cfg)
    if torch.device(device).type != "meta":
        gen = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        model.init_weights(generator=gen)
    return model.to(dtype) if dtype is not None else model


def load_model(path: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Transformer:
    """Load a native checkpoint directory or a transformers `save_pretrained` directory."""
    from behemoth.checkpoint.io import load_checkpoint

    return load_checkpoint(path, dtype=dtype, device=device)


__all__ = ["PRESETS", "ModelConfig", "MoEConfig", "RopeScaling", "Transformer", "build_model",
           "get_preset", "load_model", "__version__"]
