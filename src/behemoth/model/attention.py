"""Attention for Llama 4: GQA, interleaved RoPE + QK-norm on RoPE layers, NoPE layers with
temperature tuning, chunked causal masks (iRoPE). Follows meta-llama/llama-models
`models/llama4/model.py` and transformers' `modeling_llama4.py`, which agree on all of it.

Masks are built from absolute positions, so one function serves a plain forward, padded batches
(per-sequence positions) and the KV cache of `inference/cache.py` (key positions differ from query
positions).

Which kernel attends (`attend`) depends on what the mask needs, because SDPA's fused kernels refuse
some combinations and then it silently runs its math kernel (bf16 upcast to fp32, K/V copied to every
query head, fp32 [B, N, S, S] probabilities kept for backward):
  * plain causal (no padding, no packed documents, chunks no shorter than the call): `is_causal`, no
    mask, which the flash kernel takes;
  * a training or prefill forward on a GPU (`flex_ok`): FlexAttention with a block mask (causal, same
    document, same chunk, from the same positions), compiled once; fully masked blocks are skipped;
  * a dense mask on a GPU with fewer KV heads than query heads (decode, a prefill into a cache): the
    query groups folded into the length ([B, N, S, H] -> [B, G, N/G * S, H]) so that head counts
    match and the memory-efficient kernel takes the mask, with no copy of the cache;
  * elsewhere (the CPU), the dense mask with `enable_gqa`: the reference every other path is tested
    against.

Shape legend: B batch, S query length, K key length, D model dim, N query heads, G KV heads,
H head dim, R query heads per KV head (N / G).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class AttnMask:
    """Where one forward's queries may attend, for one layer kind: `dense` [B, 1, S, K] bool, or `block` (a
    FlexAttention BlockMask), or neither: plain causal over the call's own keys (K = S)."""

    dense: torch.Tensor | None = None
    block: Any = None


_FLEX: dict[str, Callable] = {}
FOLD_DEVICES = ("cuda",)  # where `attend` folds query groups by default (the CPU keeps the reference path)


@functools.cache
def flex_available() -> bool:
    """Whether this torch has FlexAttention (torch >= 2.5); asked once (every forward's mask choice reads it)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def flex_ok(device: torch.device, impl: str = "auto") -> bool:
    """Whether a forward without a cache on `device` attends with FlexAttention: `impl` "flex" wherever this torch
    has it, "auto" on a GPU only (on the CPU the dense-mask SDPA is as fast at the sizes a CPU runs, and it is the
    reference), "sdpa" never."""
    if impl not in ("auto", "flex", "sdpa"):
        raise ValueError(f"attention implementation {impl!r}: auto, flex or sdpa")
    return impl != "sdpa" and (impl == "flex" or device.type == "cuda") and flex_available()


def block_mask(q_pos_BS: torch.Tensor, chunk_size: int | None, segment_ids_BS: torch.Tensor | None):
    """The FlexAttention block mask of `attention_mask(pos, pos, chunk_size, pos >= 0)` (and, with `segment_ids`,
    same document): the same rule, evaluated per (query, key) index."""
    from torch.nn.attention.flex_attention import create_block_mask

    pos_BS, seg_BS = q_pos_BS, segment_ids_BS

    def mask_mod(b, h, q, k):
        qp, kp = pos_BS[b, q], pos_BS[b, k]
        ok = (kp <= qp) & (kp >= 0)
        if chunk_size is not None:
            ok = ok & (kp // chunk_size == qp // chunk_size)
        if seg_BS is not None:
            ok = ok & (seg_BS[b, q] == seg_BS[b, k])
        return ok | (qp < 0)  # a padding query attends everything (its output is unused), as `attention_mask`

    B, S = pos_BS.shape
    return create_block_mask(mask_mod, B, None, S, S, device=pos_BS.device)


def _flex_attention(device: torch.device) -> Callable:
    """flex_attention, compiled once per device type: uncompiled it runs an unfused reference that materialises
    the scores. Eager on the CPU (used there only when asked for, in tests)."""
    if device.type not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX[device.type] = torch.compile(flex_attention, dynamic=False) if device.type == "cuda" else flex_attention
    return _FLEX[device.type]


def fold_groups(q_BNSH: torch.Tensor, mask_B1SK: torch.Tensor, G: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries [B, N, S, H] -> [B, G, R * S, H] (query head n = g * R + r reads KV head g, as `enable_gqa`) and the
    mask [B, 1, S, K] -> [B, 1, R * S, K] (a view when S = 1, a copy otherwise)."""
    B, N, S, H = q_BNSH.shape
    R = N // G
    mask = mask_B1SK[:, :, None].expand(B, 1, R, S, mask_B1SK.shape[-1]).reshape(B, 1, R * S, -1)
    return q_BNSH.reshape(B, G, R * S, H), mask


def attend(q_BNSH: torch.Tensor, k_BGKH: torch.Tensor, v_BGKH: torch.Tensor, mask: AttnMask,
           fold: bool | None = None) -> torch.Tensor:
    """Scaled dot-product attention [B, N, S, H] by the kernel the mask allows (module docstring). `fold` forces
    (True) or forbids (False) folding the query groups into the length; None folds on a GPU."""
    N, G = q_BNSH.shape[1], k_BGKH.shape[1]
    gqa = N != G
    if mask.block is not None:
        return _flex_attention(q_BNSH.device)(q_BNSH, k_BGKH, v_BGKH, block_mask=mask.block, enable_gqa=gqa)
    if mask.dense is None:
        return F.scaled_dot_product_attention(q_BNSH, k_BGKH, v_BGKH, is_causal=True, enable_gqa=gqa)
    if gqa and (fold if fold is not None else q_BNSH.device.type in FOLD_DEVICES):
        B, _, S, H = q_BNSH.shape
        q_BGRSH, m = fold_groups(q_BNSH, mask.dense, G)
        out = F.scaled_dot_product_attention(q_BGRSH, k_BGKH, v_BGKH, attn_mask=m)
        return out.reshape(B, N, S, H)
    return F.scaled_dot_product_attention(q_BNSH, k_BGKH, v_BGKH, attn_mask=mask.dense, enable_gqa=gqa)


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
                mask: AttnMask, kv: Callable | None = None) -> torch.Tensor:
        """x [B, S, D], rope (cos, sin) [B, S, 1, H/2], positions [B, S], mask (`AttnMask`) -> [B, S, D].

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
        out_BNSH = attend(q_BSNH.transpose(1, 2), k_BGKH, v_BGKH, mask)
        return self.wo(out_BNSH.transpose(1, 2).reshape(B, S, -1))
