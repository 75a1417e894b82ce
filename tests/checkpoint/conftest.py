"""Tiny models and checkpoint directories shared by the checkpoint tests (CPU, fp32, seconds).

Shared helpers are fixtures (not imports), so this file never competes with another `conftest` module.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import behemoth
from behemoth.model import Transformer

# dense layers 0, 2 and MoE layers 1, 3; NoPE layer 3; llama3 RoPE scaling; chunked attention.
CFG = behemoth.PRESETS["debug"]
# The same text model with a tiny vision tower: width 16, 2 layers, 2 heads, 56-pixel tiles of 4 x 4 patches,
# so 4 tokens per tile after pixel shuffle. `<|patch|>` is token 250.
VISION = behemoth.config.VisionConfig(dim=16, n_layers=2, n_heads=2, ffn_dim=64, image_size=56, patch_size=14,
                                      adapter_dim=32)
MM_CFG = CFG.replace(vision=VISION, image_token_id=250)


def randomize_vectors(model: torch.nn.Module, seed: int = 1) -> None:
    """Norm weights are initialised to ones: randomise every 1-D parameter so a norm mix-up shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))


def native_model(cfg=CFG, seed: int = 0) -> Transformer:
    model = behemoth.build_model(cfg, seed=seed)
    randomize_vectors(model, seed + 1)
    return model.eval()


@pytest.fixture(scope="session")
def cfg():
    return CFG


@pytest.fixture(scope="session")
def mm_cfg():
    return MM_CFG


@pytest.fixture(scope="session")
def make_model():
    """`make_model(cfg=CFG, seed=0)`: a random native model in eval mode, 1-D params randomised."""
    return native_model


@pytest.fixture(scope="session")
def ids() -> torch.Tensor:
    # 40 tokens: longer than the debug preset's attention chunk (32), so chunked masks act
    return torch.randint(0, CFG.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def hf_causal():
    """A random transformers `Llama4ForCausalLM` (norms randomised) and our model with the same weights."""
    pytest.importorskip("transformers")
    from hf_reference import hf_pair

    hf, ours = hf_pair(CFG, seed=0)
    return hf, ours


@pytest.fixture(scope="session")
def hf_dir(hf_causal, tmp_path_factory) -> Path:
    """`save_pretrained` of `hf_causal`: a single model.safetensors."""
    d = tmp_path_factory.mktemp("hf") / "single"
    hf_causal[0].save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def hf_sharded_dir(hf_causal, tmp_path_factory) -> Path:
    """`save_pretrained(max_shard_size="20KB")` of `hf_causal`: many shards plus the index."""
    d = tmp_path_factory.mktemp("hf") / "sharded"
    hf_causal[0].save_pretrained(d, max_shard_size="20KB")
    return d


@pytest.fixture(scope="session")
def native_dir(tmp_path_factory) -> tuple[Transformer, Path]:
    """A random native model and its `save_model` directory (single file)."""
    from behemoth.checkpoint import save_model

    model = native_model()
    d = save_model(model, tmp_path_factory.mktemp("native") / "ckpt")
    return model, d
