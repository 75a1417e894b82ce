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
                          labels_N: torch.Tensor, chunk: int = 4096,
                          count: int | None = None) -> tuple[torch.Tensor, int]:
    """Sum of token cross-entropies and the number of counted tokens (labels != IGNORE_INDEX): `count` when the
    caller knows it (`Batch.labelled`, counted on the CPU), else read from the labels (a host sync).

    The output head runs on `chunk` tokens at a time and each chunk's fp32 logits [chunk, V] are
    recomputed in backward (checkpointed), so the full [N, V] fp32 logits never exist at once:
    at a 202k vocabulary that is the largest tensor of a step.
    """
    total = hidden_ND.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden_ND.shape[0], chunk):
        h, y = hidden_ND[start:start + chunk], labels_N[start:start + chunk]
        total = total + torch.utils.checkpoint.checkpoint(_ce_sum, h, y, head, use_reentrant=False)
    return total, int((labels_N != IGNORE_INDEX).sum()) if count is None else count


def _ce_sum(h: torch.Tensor, y: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), y, ignore_index=IGNORE_INDEX, reduction="sum")


def _masked_mean(x: torch.Tensor, valid: torch.Tensor | None, dim=None) -> torch.Tensor:
    """Mean of `x` over `dim` (all when None) counting only where `valid` (same shape); plain mean without it.
    Weights, not boolean indexing: no host sync."""
    if valid is None:
        return x.mean() if dim is None else x.mean(dim)
    w = valid.to(x.dtype)
    if dim is None:
        return (x * w).sum() / w.sum().clamp_min(1)
    return (x * w).sum(dim) / w.sum(dim).clamp_min(1)


def router_z_loss(logits_TE: torch.Tensor, valid_T: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE z-loss: mean over (valid) tokens of logsumexp(logits)^2; keeps router logits small.
    Logits [..., E] with `valid` [...] (padding False)."""
    return _masked_mean(torch.logsumexp(logits_TE.float(), dim=-1).square(), valid_T)


def balance_loss(logits_GTE: torch.Tensor, ids_GTK: torch.Tensor, valid_GT: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-style load balancing: E * sum_e f_e * P_e, per group of tokens, averaged over groups.

    f_e: fraction of the group's routed slots sent to expert e (no gradient); P_e: mean over the group's
    tokens of the router's normalised affinity for e. Llama 4 scores with a sigmoid, so the affinity is the
    sigmoid normalised over experts (DeepSeek-V3's form); equals 1 when routing is uniform. Logits [T, E]
    with ids [T, K] are one group (the batch-wise loss); [G, T, E] with [G, T, K] are G groups, e.g. one
    per row (DeepSeek-V3's complementary sequence-wise loss; a packed row's documents form one group).
    `valid` ([T] or [G, T], padding False) leaves padding out of both f and P.
    """
    if logits_GTE.dim() == 2:
        logits_GTE, ids_GTK = logits_GTE[None], ids_GTK[None]
        valid_GT = None if valid_GT is None else valid_GT[None]
    G, T, E = logits_GTE.shape
    K = ids_GTK.shape[-1]
    w_GT = torch.ones(G, T, device=ids_GTK.device) if valid_GT is None else valid_GT.float()
    w_GM = w_GT[..., None].expand(G, T, K).reshape(G, -1)
    counts_GE = torch.zeros(G, E, device=ids_GTK.device).scatter_add_(1, ids_GTK.reshape(G, -1), w_GM)
    f_GE = counts_GE / w_GM.sum(1, keepdim=True).clamp_min(1)
    s_GTE = torch.sigmoid(logits_GTE.float())
    P_GE = _masked_mean(s_GTE / s_GTE.sum(-1, keepdim=True), w_GT[..., None].expand(G, T, E), dim=1)
    return E * (f_GE * P_GE).sum(-1).mean()


def router_entropy(logits_TE: torch.Tensor, valid_T: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over (valid) tokens of the entropy of softmax(logits), divided by log E (1 = indifferent, 0 =
    certain)."""
    p = torch.softmax(logits_TE.float(), -1)
    ent = _masked_mean(-(p * torch.log(p.clamp_min(1e-12))).sum(-1), valid_T)
    return ent / torch.log(torch.tensor(float(logits_TE.shape[-1])))
