"""The Llama 4 vision encoder: tiles of pixels -> vectors in the text model's width.

Per tile (tiles are independent; Meta's `vision_embeddings` and transformers' `Llama4VisionModel`
agree on all of it):
  1. patch embedding: unfold into non-overlapping patch_size^2 patches, each flattened channel-major
     (c, ky, kx), then a linear map without bias (an "unfold convolution");
  2. the class token is appended *last*, then the learned positional embedding is added;
  3. ln_pre, then pre-LN encoder layers with bidirectional attention (biases on q/k/v/o) and a
     GELU MLP (exact erf form), the 2D RoPE on q and k (below), then ln_post;
  4. the class token is dropped and pixel shuffle (ratio 0.5) merges each 2x2 neighbourhood of
     the patch grid into one vector: 576 patches of width D -> 144 of width 4D;
  5. the adapter MLP, with GELU after *both* layers, and (in the multimodal model) the projector.

2D RoPE: head_dim/2 rotation pairs; the first half rotate by (column + 1) * f[j], the second half
by (row + 1) * f[j], f[j] = theta^(-2j / (head_dim / 2)); positions are 1-based, the column axis comes
first, and the class token is not rotated. Same interleaved-pair form as the text RoPE.

Module names follow Meta's checkpoints (`vision_embeddings.vision_encoder.transformer.resblocks.N
.attn.wq`); transformers' names are mapped in `checkpoint/convert.py`.

Shape legend: N tiles, C channels, S pixels per side, P patches (+1 with the class token), D width,
H heads, h head dim, T tokens per tile after pixel shuffle, A adapter width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from behemoth.config import VisionConfig
from behemoth.model.layers import apply_rope


def vision_rope_cos_sin(cfg: VisionConfig, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [1, P+1, 1, h/2] (fp32) for the patch grid in row-major order, class token last."""
    g = cfg.patches_per_side
    n_freq = cfg.head_dim // 4  # per axis
    f = 1.0 / cfg.rope_theta ** (torch.arange(n_freq, dtype=torch.float32, device=device) * 2 / (cfg.head_dim // 2))
    idx = torch.arange(g * g, device=device)
    col, row = (idx % g + 1).float(), (idx // g + 1).float()
    angles_Ph = torch.cat([col[:, None] * f, row[:, None] * f], dim=-1)
    angles_Ph = torch.cat([angles_Ph, angles_Ph.new_zeros(1, angles_Ph.shape[1])])  # class token: no rotation
    return angles_Ph.cos()[None, :, None], angles_Ph.sin()[None, :, None]


def pixel_shuffle(x_NPD: torch.Tensor, ratio: float) -> torch.Tensor:
    """[N, g*g, D] -> [N, (g*r)^2, D/r^2]: output token (i, j) concatenates the k x k patches
    (i*k + dy, j*k + dx), k = 1/r, in (dy, dx) row-major order: out[.., (dy*k + dx)*D + c]."""
    N, P, D = x_NPD.shape
    g, k = int(round(P ** 0.5)), int(round(1 / ratio))
    x = x_NPD.view(N, g // k, k, g // k, k, D)  # (i, dy, j, dx, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(N, (g // k) ** 2, k * k * D)


class PatchEmbedding(nn.Module):
    """Unfold into patches (channel-major within a patch), then `_linear` [D, C*p*p] without bias."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self._linear = nn.Linear(cfg.num_channels * cfg.patch_size ** 2, cfg.dim, bias=False)

    def forward(self, pixels_NCSS: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        patches = F.unfold(pixels_NCSS, kernel_size=p, stride=p)  # [N, C*p*p, P]
        return self._linear(patches.transpose(1, 2))


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention with biases and the 2D RoPE."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.dim)
        self.wk = nn.Linear(cfg.dim, cfg.dim)
        self.wv = nn.Linear(cfg.dim, cfg.dim)
        self.wo = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x_NPD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        N, P, _ = x_NPD.shape
        q_NPHh = apply_rope(self.wq(x_NPD).view(N, P, self.n_heads, self.head_dim), *rope)
        k_NPHh = apply_rope(self.wk(x_NPD).view(N, P, self.n_heads, self.head_dim), *rope)
        v_NPHh = self.wv(x_NPD).view(N, P, self.n_heads, self.head_dim)
        out = F.scaled_dot_product_attention(q_NPHh.transpose(1, 2), k_NPHh.transpose(1, 2), v_NPHh.transpose(1, 2))
        return self.wo(out.transpose(1, 2).reshape(N, P, -1))


class VisionMLP(nn.Module):
    """c_proj(GELU(c_fc(x))), both with bias."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden_dim)
        self.c_proj = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class ResBlock(nn.Module):
    """x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = VisionAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = VisionMLP(cfg.dim, cfg.ffn_dim)

    def forward(self, x_NPD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x_NPD = x_NPD + self.attn(self.ln_1(x_NPD), rope)
        return x_NPD + self.mlp(self.ln_2(x_NPD))


class VisionTransformer(nn.Module):
    """Holds the encoder layers as `resblocks` (Meta's name)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResBlock(cfg) for _ in range(cfg.n_layers))


class VisionEncoder(nn.Module):
    """Pixels [N, C, S, S] (normalised tiles) -> patch features [N, P, D], class token dropped."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.conv1 = PatchEmbedding(cfg)
        self.class_embedding = nn.Parameter(torch.empty(cfg.dim))
        self.positional_embedding_vlm = nn.Parameter(torch.empty(cfg.patches_per_side ** 2 + 1, cfg.dim))
        self.ln_pre = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.transformer = VisionTransformer(cfg)
        self.ln_post = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, pixels_NCSS: torch.Tensor) -> torch.Tensor:
        S = self.config.image_size
        if pixels_NCSS.dim() != 4 or tuple(pixels_NCSS.shape[1:]) != (self.config.num_channels, S, S):
            raise ValueError(f"pixel values must be [tiles, {self.config.num_channels}, {S}, {S}], "
                             f"got {list(pixels_NCSS.shape)}")
        x_NPD = self.conv1(pixels_NCSS.to(self.class_embedding.dtype))
        cls_N1D = self.class_embedding.expand(x_NPD.shape[0], 1, -1)
        x_NPD = self.ln_pre(torch.cat([x_NPD, cls_N1D], dim=1) + self.positional_embedding_vlm)
        rope = vision_rope_cos_sin(self.config, x_NPD.device)
        for block in self.transformer.resblocks:
            x_NPD = block(x_NPD, rope)
        return self.ln_post(x_NPD)[:, :-1]


class VisionAdapter(nn.Module):
    """Pixel shuffle, then `mlp`: GELU(c_proj(GELU(c_fc(x)))), no biases: [N, P, D] -> [N, T, A]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.ratio = cfg.pixel_shuffle_ratio
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(cfg.shuffled_dim, cfg.adapter_dim, bias=False)
        self.mlp.c_proj = nn.Linear(cfg.adapter_dim, cfg.adapter_dim, bias=False)

    def forward(self, x_NPD: torch.Tensor) -> torch.Tensor:
        x_NTD = pixel_shuffle(x_NPD, self.ratio)
        return F.gelu(self.mlp.c_proj(F.gelu(self.mlp.c_fc(x_NTD))))


class VisionEmbeddings(nn.Module):
    """The vision tower: encoder + adapter. Tiles [N, C, S, S] -> [N, T, A] (before the projector)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.vision_encoder = VisionEncoder(cfg)
        self.vision_adapter = VisionAdapter(cfg)

    def forward(self, pixels_NCSS: torch.Tensor) -> torch.Tensor:
        return self.vision_adapter(self.vision_encoder(pixels_NCSS))
