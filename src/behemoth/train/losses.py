"""Training losses: chunked cross-entropy, router z-loss, Switch-style balance loss.

Shape legend: B batch, S sequence, D model dim, V vocabulary, N tokens, T routed tokens, E experts,
K top-k.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from behemoth.data.loader import IGNORE_INDEX


def chunked_cross_entropy(hidden_ND: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                          labels_N: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, int]:
    """Sum of token cross-entropies and the number of counted tokens (labels != IGNORE_INDEX).

    The output head runs on `chunk` tokens at a time and each chunk's fp32 logits [chunk, V] are
    recomputed in backward (checkpointed), so the full [N, V] fp32 logits never exist at once:
    at a 202k vocabulary that is the largest tensor of a step.
    """
    total = hidden_ND.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden_ND.shape[0], chunk):
        h, y = hidden_ND[start:start + chunk], labels_N[start:start + chunk]
        total = total + torch.utils.checkpoint.checkpoint(_ce_sum, h, y, head, use_reentrant=False)
    return total, int((labels_N != IGNORE_INDEX).sum())


def _ce_sum(h: torch.Tensor, y: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), y, ignore_index=IGNORE_INDEX, reduction="sum")


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2; keeps router logits small."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def balance_loss(logits_TE: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
    """Switch-style load balancing: E * sum_e f_e * P_e.

    f_e: fraction of routed slots sent to expert e (no gradient); P_e: mean over tokens of the
    router's normalised affinity for e. Llama 4 scores with a sigmoid, so the affinity is the
    sigmoid normalised over experts (DeepSeek-V3's form); equals 1 when routing is uniform.
    """
    E = logits_TE.shape[-1]
    f_E = torch.bincount(ids_TK.flatten(), minlength=E).float() / ids_TK.numel()
    s_TE = torch.sigmoid(logits_TE.float())
    P_E = (s_TE / s_TE.sum(-1, keepdim=True)).mean(0)
    return E * (f_E * P_E).sum()


def router_entropy(logits_TE: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy of softmax(logits), divided by log E (1 = indifferent, 0 = certain)."""
    p = torch.softmax(logits_TE.float(), -1)
    ent = -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()
    return ent / torch.log(torch.tensor(float(logits_TE.shape[-1])))
