"""Autoregressive generation without a KV cache: each step re-runs the full forward.

Simple and exact (every step sees the same logits a full forward gives); it is the reference a
cached decoder is tested against. Shape legend: B batch, S sequence, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def generate(model: nn.Module, input_ids_BS: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, seed: int | None = None, stop_ids: tuple[int, ...] = ()) -> torch.Tensor:
    """Extend `input_ids` [B, S] by `max_new_tokens` tokens -> [B, S + max_new_tokens].

    temperature 0 is greedy; otherwise sample from softmax(logits / temperature), restricted to the
    `top_k` most likely tokens when given, with a seeded generator for reproducibility. Generation
    ends early once every row has produced one of `stop_ids` (rows that stopped keep being
    extended; cut them at their first stop token).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 0")
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: must be >= 0")
    gen = None
    if seed is not None:
        gen = torch.Generator(device=input_ids_BS.device).manual_seed(seed)
    ids_BS = input_ids_BS
    stopped_B = torch.zeros(ids_BS.shape[0], dtype=torch.bool, device=ids_BS.device)
    stop = torch.tensor(stop_ids, dtype=ids_BS.dtype, device=ids_BS.device)
    for _ in range(max_new_tokens):
        logits_BV = _last_logits(model, ids_BS).float()
        if temperature == 0:
            next_B = logits_BV.argmax(-1)
        else:
            logits_BV = logits_BV / temperature
            if top_k is not None:
                kth = torch.topk(logits_BV, min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
                logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
            next_B = torch.multinomial(torch.softmax(logits_BV, -1), 1, generator=gen).squeeze(-1)
        ids_BS = torch.cat([ids_BS, next_B[:, None]], dim=1)
        if len(stop_ids):
            stopped_B |= torch.isin(next_B, stop)
            if bool(stopped_B.all()):
                break
    return ids_BS


def _last_logits(model: nn.Module, ids_BS: torch.Tensor) -> torch.Tensor:
    """Logits [B, V] of the last position only: the output head runs on one position, not S."""
    if hasattr(model, "hidden_states") and hasattr(model, "logits"):
        return model.logits(model.hidden_states(ids_BS)[:, -1])
    out = model(ids_BS)
    return getattr(out, "logits", out)[:, -1]
