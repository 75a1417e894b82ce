"""What the model needs of a KV cache (`inference.cache.KVCache` is the one behemoth has): the model stays
single-device code that knows only this protocol, and the inference layer owns the memory."""

from __future__ import annotations

from typing import Any, Protocol

import torch


class KVCacheProtocol(Protocol):
    def begin(self, pos_BS: torch.Tensor) -> tuple[bool, dict[bool, Any], dict[bool, torch.Tensor]]:
        """Start a forward over new tokens at positions [B, S]: (one token per row?, a write plan per layer
        kind (True: RoPE layers), key positions per layer kind [B, K])."""

    def update(self, layer: int, plan: Any, k_BGSH: torch.Tensor, v_BGSH: torch.Tensor,
               decode: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one layer's new keys/values [B, G, S, H] by `plan`; return those its queries attend to,
        [B, G, K, H]."""
