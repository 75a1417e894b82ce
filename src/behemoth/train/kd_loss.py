"""The chunked distillation losses: KD alone (`kd_loss`) and hard-label CE mixed with KD per token
(`distill_loss`), over the student's output head applied a chunk of tokens at a time, so its full
[N, V] logits never exist at once.

Shape legend: N tokens, D model dim, V student vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from behemoth.data.loader import IGNORE_INDEX
from behemoth.train.cross_kd import cross_divergence
from behemoth.train.kd import Divergence, Teacher, TopK, _divergence, _fp, _prepare_teacher
from behemoth.train.kd_weight import KDWeight, _token_factor


class DistillLoss(NamedTuple):
    """Sums over the counted tokens; divide by `tokens` (at least 1) for means."""

    loss_sum: torch.Tensor  # sum_t (1 - alpha_t) CE_t + alpha_t KD_t: what to optimise
    ce_sum: torch.Tensor  # sum_t CE_t (hard labels, tau = 1)
    kd_sum: torch.Tensor  # sum_t KD_t (tau^2 times the divergence)
    alpha_sum: torch.Tensor  # sum_t alpha_t (no gradient): alpha_sum / tokens is the mean weight to log
    tokens: int


class CrossTargets(NamedTuple):
    """A teacher with another tokenizer, at the student's positions (`train/cross_step.py`): its logits over its own
    vocabulary (`logits(start, end)` -> [end - start, V_t], under no_grad), which student positions have a teacher
    position reaching the same text (`aligned` [N] bool; the others get no KD), the vocabularies' shared tokens
    (`token_align.VocabMap`), and the divergence across vocabularies (`cross_kd.cross_divergence`)."""

    logits: Callable[[int, int], torch.Tensor]
    aligned: torch.Tensor
    vmap: object
    method: str  # aligned | uld | hybrid
    uld_weight: float
    # vocab_match=marginal (`vmap` a `token_align.ContinuationMap`): per position the offset into the teacher's
    # next token and that token's id [N]; `aligned` then marks every position with a teacher position before it
    offset: torch.Tensor | None = None
    next_ids: torch.Tensor | None = None


def _chunk_teacher(teacher: Teacher | CrossTargets, start: int, end: int):
    """The part of `teacher` for tokens start:end: a tensor view, a TopK of views, or a zero-arg thunk (with a
    CrossTargets, a CrossTargets whose `logits` is that thunk)."""
    if isinstance(teacher, CrossTargets):
        part = {k: getattr(teacher, k)[start:end] for k in ("offset", "next_ids") if getattr(teacher, k) is not None}
        return teacher._replace(logits=lambda: teacher.logits(start, end), aligned=teacher.aligned[start:end], **part)
    if isinstance(teacher, TopK):
        return TopK(teacher.ids[start:end], teacher.logprobs[start:end])
    if isinstance(teacher, torch.Tensor):
        return teacher[start:end]
    return lambda: teacher(start, end)


def _materialize(teacher) -> torch.Tensor | TopK:
    if isinstance(teacher, (TopK, torch.Tensor)):
        return teacher
    with torch.no_grad():
        return teacher()


def _kd_chunk(h_ND: torch.Tensor, mask_N: torch.Tensor, teacher, head: Callable[[torch.Tensor], torch.Tensor],
              div: Divergence) -> tuple[torch.Tensor, torch.Tensor]:
    z_NV = _fp(head(h_ND))
    prepared, padded = _prepare_teacher(_materialize(teacher), z_NV.shape[-1], mask_N, div.temperature)
    return torch.where(mask_N, _divergence(z_NV, prepared, div), 0.0), padded


def _check_padded(padded: list[torch.Tensor], max_padded_mass: float | None) -> None:
    if max_padded_mass is None or not padded:
        return
    worst = float(torch.stack(padded).max())
    if worst > max_padded_mass:
        raise ValueError(f"the teacher puts up to {worst:.3g} of its probability on columns beyond the student's "
                         f"vocabulary (allowed: {max_padded_mass:g}); are the vocabularies the same?")


def kd_loss(hidden_ND: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], teacher: Teacher,
            mask_N: torch.Tensor | None = None, div: Divergence | None = None,
            chunk: int = 1024, per_token: bool = False,
            max_padded_mass: float | None = 1e-3) -> tuple[torch.Tensor, int]:
    """Sum of per-token KD losses over the counted tokens (`mask_N`, default all) and their number.

    The student's logits are computed `chunk` tokens at a time by `head` and recomputed in backward
    (checkpointed), as in `chunked_cross_entropy`, so no [N, V] fp32 tensor ever exists; a chunk holds
    a handful of [chunk, V] fp32 tensors, hence the smaller default. `teacher`: dense logits [N, V_t]
    with V_t >= V (extra columns are dropped and the teacher renormalised; a `ValueError` if a counted
    token puts more than `max_padded_mass` there; None skips the check), a callable (start, end) ->
    logits of those tokens, or a `TopK` with log-probabilities at the temperature. The teacher gets no
    gradient. With `per_token`, the first element is the loss per token [N] (0 where not counted)
    instead of the sum. A fully masked batch gives exactly 0 (and zero gradients). `div`: default
    forward KL at tau = 1.
    """
    div, N = div or Divergence(), hidden_ND.shape[0]
    if mask_N is None:
        mask_N = torch.ones(N, dtype=torch.bool, device=hidden_ND.device)
    mask_N = mask_N.bool()
    losses, padded = [], []
    for start in range(0, N, chunk):
        end = min(start + chunk, N)
        loss_C, pad = torch.utils.checkpoint.checkpoint(
            _kd_chunk, hidden_ND[start:end], mask_N[start:end], _chunk_teacher(teacher, start, end), head, div,
            use_reentrant=False)
        losses.append(loss_C)
        padded.append(pad)
    _check_padded(padded, max_padded_mass)
    loss_N = torch.cat(losses) if losses else hidden_ND.new_zeros(0, dtype=torch.float32)
    return (loss_N if per_token else loss_N.sum()), int(mask_N.sum())


def _cross_chunk(z_NV: torch.Tensor, labels_N: torch.Tensor, teacher: CrossTargets, div: Divergence, alpha: float):
    """`_distill_chunk` across tokenizers: KD where a position is labelled and aligned, CE alone elsewhere."""
    mask_N = (labels_N != IGNORE_INDEX) & teacher.aligned
    with torch.no_grad():
        t_NVt = teacher.logits().float()
    if teacher.offset is not None:  # the teacher marginalised onto the student's next token, at every position
        with torch.no_grad():
            lp_NV, valid_N = teacher.vmap.targets(torch.log_softmax(t_NVt / div.temperature, -1), teacher.offset,
                                                  teacher.next_ids, z_NV.shape[-1])
            mask_N = mask_N & valid_N
            lp_NV = torch.where(mask_N[:, None], lp_NV, -math.log(z_NV.shape[-1]))  # a harmless stand-in
        kd_N = torch.where(mask_N, _divergence(z_NV, lp_NV, div), 0.0)
    else:
        kd_N = torch.where(mask_N, cross_divergence(teacher.method, z_NV, t_NVt, teacher.vmap, div,
                                                    teacher.uld_weight), 0.0)
    ce_N = F.cross_entropy(z_NV, labels_N, ignore_index=IGNORE_INDEX, reduction="none")
    alpha_N = torch.where(mask_N, alpha, 0.0).to(kd_N.dtype)
    loss = ((1 - alpha_N) * ce_N + alpha_N * kd_N).sum()
    return loss, ce_N.sum(), kd_N.sum(), alpha_N.sum(), z_NV.new_zeros((), dtype=torch.float32)


def _distill_chunk(h_ND: torch.Tensor, labels_N: torch.Tensor, teacher, head: Callable[[torch.Tensor], torch.Tensor],
                   div: Divergence, rule: str, alpha: float):
    z_NV = _fp(head(h_ND))
    if isinstance(teacher, CrossTargets):
        if rule != "none":
            raise ValueError(f"token_rule={rule!r} is not defined across tokenizers")
        return _cross_chunk(z_NV, labels_N, teacher, div, alpha)
    mask_N = labels_N != IGNORE_INDEX
    prepared, padded = _prepare_teacher(_materialize(teacher), z_NV.shape[-1], mask_N, div.temperature)
    kd_N = torch.where(mask_N, _divergence(z_NV, prepared, div), 0.0)
    ce_N = F.cross_entropy(z_NV, labels_N, ignore_index=IGNORE_INDEX, reduction="none")
    with torch.no_grad():
        alpha_N = torch.where(mask_N, alpha * _token_factor(rule, z_NV, prepared, labels_N, div.temperature), 0.0)
        alpha_N = alpha_N.to(kd_N.dtype)
    loss = ((1 - alpha_N) * ce_N + alpha_N * kd_N).sum()
    return loss, ce_N.sum(), kd_N.sum(), alpha_N.sum(), padded


def distill_loss(hidden_ND: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], labels_N: torch.Tensor,
                 teacher: Teacher | CrossTargets, div: Divergence | None = None, weight: KDWeight | None = None,
                 step: int = 0, total_steps: int = 1, chunk: int = 1024,
                 max_padded_mass: float | None = 1e-3, recompute: bool = True, count: int | None = None) -> DistillLoss:
    """Hard-label cross-entropy and KD in one pass over chunks of the student's logits, mixed per token
    as (1 - alpha_t) CE_t + alpha_t KD_t with alpha_t from `weight` at optimizer step `step` of
    `total_steps` (`div`, `weight`: default forward KL at tau = 1, constant alpha = 0.5). Counted tokens:
    labels != IGNORE_INDEX; a `CrossTargets` teacher (another tokenizer) gives KD at its aligned positions only.
    Chunking, teacher forms and checks as in `kd_loss`; the head runs once per
    chunk in forward (and once more in backward) for both losses. `recompute=False` keeps each chunk's
    activations for backward instead (faster when the logits are small enough to hold). `count`: the number of
    counted tokens when the caller knows it (no host read of the labels).
    """
    div, weight = div or Divergence(), weight or KDWeight()
    alpha = weight.alpha_at(step, total_steps)
    zero = hidden_ND.new_zeros((), dtype=torch.float32)
    loss, ce, kd, alpha_sum, padded = zero, zero, zero, zero, []
    for start in range(0, hidden_ND.shape[0], chunk):
        end = min(start + chunk, hidden_ND.shape[0])
        args = (hidden_ND[start:end], labels_N[start:end], _chunk_teacher(teacher, start, end), head, div,
                weight.token_rule, alpha)
        out = (torch.utils.checkpoint.checkpoint(_distill_chunk, *args, use_reentrant=False) if recompute
               else _distill_chunk(*args))
        loss, ce, kd, alpha_sum = loss + out[0], ce + out[1], kd + out[2], alpha_sum + out[3]
        padded.append(out[4])
    _check_padded(padded, max_padded_mass)
    tokens = int((labels_N != IGNORE_INDEX).sum()) if count is None else count
    return DistillLoss(loss, ce, kd, alpha_sum.detach(), tokens)
