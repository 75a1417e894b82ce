"""A fresh model from a config or a preset name (loading one from disk is `checkpoint.load_model`)."""

from __future__ import annotations

import torch

from behemoth.config import ModelConfig, get_preset
from behemoth.model.transformer import Transformer


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
