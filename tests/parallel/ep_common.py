"""The layer and inputs shared by the expert-parallel worker and the one-device reference."""

import torch

from behemoth.config import PRESETS
from behemoth.model.moe import MoE


def build_layer(top_k: int, bias: list[float]) -> MoE:
    """A debug-size MoE layer (4 experts + shared) with seeded weights and the given router bias."""
    cfg = PRESETS["debug"].replace(moe={"num_experts": 4, "top_k": top_k})
    layer = MoE(cfg)
    g = torch.Generator().manual_seed(0)
    for p in layer.parameters():
        p.data.normal_(0, 0.1, generator=g)
    layer.router.expert_bias.copy_(torch.tensor(bias))
    return layer.train()


def rank_inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank r's tokens [1, 7 + 5r, D] and the output weights of its loss sum(y * g)."""
    g = torch.Generator().manual_seed(100 + rank)
    T = 7 + 5 * rank
    return torch.randn(1, T, 64, generator=g), torch.randn(1, T, 64, generator=g)
