"""Attention for Llama 4: GQA, interleaved RoPE + QK-norm on RoPE layers, NoPE layers with
temperature tuning, chunked causal masks (iRoPE). Follows meta-llama/llama-models
`models/llama4/model.py` and transformers' `modeling_llama4.py`, which agree on all of it.

Masks are built from absolute positions, so one function serves a plain forward, padded batches
(per-sequence positions) and the KV cache of `inference/cache.py` (key positions differ from query
positions).

Shape legend: B batch, S query length, K key length, D model dim, N query heads, G KV heads,
H head dim.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from behemoth.config import ModelConfig
from behemoth.model.layers import RMSNorm, apply_rope


def attention_mask(q_pos_BS: torch.Tensor, k_pos_BK: torch.Tensor, chunk_size: int | None,
                   k_valid_BK: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask [B, 1, S, K], True where query may attend key.

    Causal (`k <= q`); with `chunk_size`, also same fixed chunk (`k // C == q // C`): chunks are
    aligned to position 0 and are not sliding windows. `k_valid_BK` masks out padding keys. A padding
    query (position < 0) may attend everything: its output is unused, and a row with no allowed key
    would make the softmax NaN.
    """
    q = q_pos_BS[:, :, None]
    k = k_pos_BK[:, None, :]
    allowed = k <= q
    if chunk_size is not None:
        allowed = allowed & (torch.div(k, chunk_size, rounding_mode="floor")
                             == torch.div(q, chunk_size, rounding_mode="floor"))
    if k_valid_BK is not None:
        allowed = allowed & k_valid_BK[:, None, :]
        allowed = allowed | (q < 0)
    return allowed[:, None]


def temperature_scale(pos_BS: torch.Tensor, floor_scale: float, attn_scale: float) -> torch.Tensor:
    """s(p) = 1 + attn_scale * log1p(floor((p + 1) / floor_scale)), fp32 [B, S]; 1 for p < floor-1."""
    return 1.0 + attn_scale * torch.log1p(torch.floor((pos_BS.float() + 1.0) / floor_scale))


class Attention(nn.Module):
    """Grouped-query attention. `use_rope` selects the layer kind (RoPE + chunked, or NoPE + global)."""

    def __init__(self, cfg: ModelConfig, use_rope: bool):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.use_rope = use_rope
        self.qk_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, weight=False) if cfg.use_qk_norm and use_rope else None
        self.temperature = (cfg.floor_scale, cfg.attn_scale) if cfg.attn_temperature_tuning and not use_rope else None
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x_BSD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], pos_BS: torch.Tensor,
                mask_B1SK: torch.Tensor, kv: Callable | None = None) -> torch.Tensor:
        """x [B, S, D], rope (cos, sin) [B, S, 1, H/2], positions [B, S], mask [B, 1, S, K] -> [B, S, D].

        Without `kv` the keys are this call's own (K = S). With a cache, `kv(k [B, G, S, H], v)` stores
        the new keys/values and returns those to attend to, [B, G, K, H] (see `KVCache.update`).
        """
        B, S, _ = x_BSD.shape
        q_BSNH = self.wq(x_BSD).view(B, S, self.n_heads, self.head_dim)
        k_BSGH = self.wk(x_BSD).view(B, S, self.n_kv_heads, self.head_dim)
        v_BSGH = self.wv(x_BSD).view(B, S, self.n_kv_heads, self.head_dim)
        if self.use_rope:
            q_BSNH, k_BSGH = apply_rope(q_BSNH, *rope), apply_rope(k_BSGH, *rope)
        if self.qk_norm is not None:  # after RoPE, as Meta and HF do (bf16 bit-parity needs the order)
            q_BSNH, k_BSGH = self.qk_norm(q_BSNH), self.qk_norm(k_BSGH)
        if self.temperature is not None:
            scale_BS = temperature_scale(pos_BS, *self.temperature)
            q_BSNH = (q_BSNH * scale_BS[:, :, None, None]).to(q_BSNH.dtype)
        k_BGKH, v_BGKH = k_BSGH.transpose(1, 2), v_BSGH.transpose(1, 2)
        if kv is not None:
            k_BGKH, v_BGKH = kv(k_BGKH, v_BGKH)
        out_BNSH = F.scaled_dot_product_attention(
            q_BSNH.transpose(1, 2), k_BGKH, v_BGKH, attn_mask=mask_B1SK, enable_gqa=self.n_heads != self.n_kv_heads)
        return self.wo(out_BNSH.transpose(1, 2).reshape(B, S, -1))
