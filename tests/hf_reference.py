"""Helpers that build transformers' Llama 4 as the reference (tests only)."""

from __future__ import annotations

import pytest
import torch

from behemoth.checkpoint.convert import hf_to_native_key
from behemoth.config import ModelConfig
from behemoth.config_io import to_hf_config
from behemoth.model import Transformer

transformers = pytest.importorskip("transformers")


def hf_text_config(cfg: ModelConfig, attn: str = "sdpa"):
    d = to_hf_config(cfg.replace(vision=None, image_token_id=None))
    d.pop("model_type")
    d.pop("architectures")
    c = transformers.Llama4TextConfig(**d)
    c._attn_implementation = attn
    return c


def hf_pair(cfg: ModelConfig, seed: int = 0, dtype=torch.float32, attn: str = "sdpa"):
    """A random transformers Llama4ForCausalLM and our Transformer holding the same weights."""
    torch.manual_seed(seed)
    hf = transformers.Llama4ForCausalLM(hf_text_config(cfg, attn)).eval()
    with torch.no_grad():  # HF inits norms to 1; randomise them so a norm mix-up cannot hide
        for p in hf.parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.1)
    ours = Transformer(cfg).eval()
    state = {hf_to_native_key(k): v for k, v in hf.state_dict().items()}
    state.update({k: v for k, v in Transformer(cfg).state_dict().items() if k.endswith("expert_bias")})
    if cfg.tie_word_embeddings:
        state.pop("output.weight")
    ours.load_state_dict(state, strict=True)
    return hf.to(dtype), ours.to(dtype)


def hf_multimodal(cfg: ModelConfig, seed: int = 0):
    """A random transformers `Llama4ForConditionalGeneration` for a config with a vision tower (1-D
    parameters randomised around 1 so that a norm mix-up cannot hide)."""
    d = to_hf_config(cfg)
    del d["model_type"], d["architectures"]
    torch.manual_seed(seed)
    hf = transformers.Llama4ForConditionalGeneration(transformers.Llama4Config(**d)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.1)
    return hf
