"""Building blocks: RMSNorm, interleaved-pair RoPE with llama3 scaling, SwiGLU feed-forward.

Follows meta-llama/llama-models `models/llama4/{model.py, ffn.py}` and transformers' `modeling_llama4.py`.

Shape legend: B batch, S sequence, N heads, H head dim, D model dim, F FFN hidden dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from behemoth.config import ModelConfig


class RMSNorm(nn.Module):
    """y = (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype) * weight.

    The cast back to the input dtype happens *before* the weight multiply (Meta and HF agree), which
    matters for bf16 bit-parity. `weight=False` gives the weightless form used for QK-norm.
    """

    def __init__(self, dim: int, eps: float = 1e-5, weight: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        return y if self.weight is None else y * self.weight


def rope_inv_freq(cfg: ModelConfig, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies [H/2] in fp32, with llama3 scaling applied when configured.

    llama3 rule (wavelength w = 2*pi/inv_freq, L0 = original context): w < L0/high keeps the frequency,
    w > L0/low divides it by `factor`, and the band between blends the two linearly in L0/w.
    """
    H = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, H, 2, dtype=torch.float32, device=device) / H))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    if s.high_freq_factor > s.low_freq_factor:  # the smooth band; empty for Scout's (1, 1)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor)
        blended = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        scaled = torch.where(medium, blended, scaled)
    return scaled


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of angle p * inv_freq: positions [B, S] (int) -> two fp32 tensors [B, S, 1, H/2]
    (the 1 broadcasts over heads; computed once per forward and shared by every layer)."""
    angles = positions.to(torch.float32)[..., None, None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x_BSNH: torch.Tensor, cos_BS1h: torch.Tensor, sin_BS1h: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (2j, 2j+1) by angle j, in fp32, cast back (Meta's complex form).

    This is *not* the rotate_half layout of Llama 1-3; HF Llama 4 checkpoints need this one.
    """
    x0, x1 = x_BSNH.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos_BS1h, sin_BS1h
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x_BSNH)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). Used for dense layers and the MoE shared expert."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
