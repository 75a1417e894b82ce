"""Divergences between a student and a teacher whose vocabularies differ (their tokenizers differ), per aligned
token (`token_align.plan_cross_batch` pairs the positions). Conventions as in `kd`: teacher p = softmax(z_t /
tau), student q = softmax(z_s / tau), every divergence per token [N] times tau^2, computed in fp32 (fp64 stays
fp64), no NaN in values or gradients from -inf logits or zero probabilities, no gradient to the teacher.

Shape legend: N tokens, V student vocabulary, Vt teacher vocabulary (either may be padded beyond its
tokenizer's; padded columns count as tokens the other side lacks).

Methods (`METHODS`, `cross_divergence`); all take the teacher's LOGITS [N, Vt] and apply tau themselves:
  aligned  the teacher moved onto the student ids it shares (`VocabMap.to_student`, probabilities of teacher
           ids that spell the same text added up) and compared like a sparse top-k teacher
           (`kd.Divergence.missing_mass` decides what the mass off the shared tokens does)
  uld      Universal Logit Distillation (Boizard et al. 2024): both probability vectors sorted in decreasing
           order, the shorter zero-padded, and sum_k |p_(k) - q_(k)|, the 1-D Wasserstein distance between
           them; needs no shared tokens at all, but ignores which token is which
  hybrid   aligned with the residual bucket (shared tokens matched one by one, the unshared mass as a total)
           plus `uld_weight` times ULD between the teacher's and the student's probabilities on their unshared
           ids (absolute, not renormalised)
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from behemoth.train.kd import Divergence, _divergence, _fp, _log_normalize
from behemoth.train.token_align import VocabMap

METHODS = ("aligned", "uld", "hybrid")


def _teacher_logprobs(teacher_logits_NVt: torch.Tensor, temperature: float) -> torch.Tensor:
    """The teacher's log-probabilities at tau, detached; an all -inf row stays all -inf."""
    with torch.no_grad():
        return _log_normalize(_fp(teacher_logits_NVt.detach()) / temperature)


def _sorted_l1(p_NA: torch.Tensor, q_NB: torch.Tensor) -> torch.Tensor:
    """sum_k |p_(k) - q_(k)| per token [N]: both sorted in decreasing order, the narrower zero-padded."""
    width = max(p_NA.shape[-1], q_NB.shape[-1])
    p_NW = F.pad(p_NA.sort(-1, descending=True).values, (0, width - p_NA.shape[-1]))
    q_NW = F.pad(q_NB.sort(-1, descending=True).values, (0, width - q_NB.shape[-1]))
    return (p_NW - q_NW).abs().sum(-1)


def _check(student_logits_NV: torch.Tensor, teacher_logits_NVt: torch.Tensor, vmap: VocabMap | None) -> None:
    if student_logits_NV.dim() != 2 or teacher_logits_NVt.dim() != 2 or (
            student_logits_NV.shape[0] != teacher_logits_NVt.shape[0]):
        raise ValueError(f"student logits {tuple(student_logits_NV.shape)} and teacher logits "
                         f"{tuple(teacher_logits_NVt.shape)} must be [N, V] and [N, Vt]")
    if vmap is not None and (student_logits_NV.shape[1] < vmap.student_vocab
                             or teacher_logits_NVt.shape[1] < vmap.teacher_vocab):
        raise ValueError(f"logits [N, {student_logits_NV.shape[1]}] (student) and [N, {teacher_logits_NVt.shape[1]}] "
                         f"(teacher) are narrower than the vocabularies the map was built for "
                         f"({vmap.student_vocab}, {vmap.teacher_vocab})")


def _unshared(mask_V: torch.Tensor, width: int, device: torch.device) -> torch.Tensor:
    """A vocabulary's unshared mask widened to `width` logit columns (padding columns are unshared)."""
    return F.pad(mask_V, (0, width - mask_V.shape[0]), value=True).to(device)


def uld(student_logits_NV: torch.Tensor, teacher_logits_NVt: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Universal Logit Distillation per token [N]: sum_k |p_(k) - q_(k)| over the probabilities at tau sorted
    in decreasing order (the shorter vector zero-padded), times tau^2. The student's gradient flows through
    the sort."""
    _check(student_logits_NV, teacher_logits_NVt, None)
    p_NVt = _teacher_logprobs(teacher_logits_NVt, temperature).exp()
    q_NV = _log_normalize(_fp(student_logits_NV) / temperature).exp()
    return temperature * temperature * _sorted_l1(p_NVt, q_NV)


def aligned_divergence(student_logits_NV: torch.Tensor, teacher_logits_NVt: torch.Tensor, vmap: VocabMap,
                       div: Divergence) -> torch.Tensor:
    """`div` per token [N] (times tau^2) between the student and the teacher moved onto the student ids it
    shares (`vmap.to_student` of the teacher's log-probabilities at tau): a sparse teacher whose mass off the
    shared ids is handled by `div.missing_mass`, exactly as for a top-k teacher (`kd`)."""
    _check(student_logits_NV, teacher_logits_NVt, vmap)
    with torch.no_grad():
        topk = vmap.to_student(_teacher_logprobs(teacher_logits_NVt, div.temperature))
    return _divergence(student_logits_NV, topk, div)


def hybrid(student_logits_NV: torch.Tensor, teacher_logits_NVt: torch.Tensor, vmap: VocabMap, div: Divergence,
           uld_weight: float = 1.0) -> torch.Tensor:
    """Per token [N]: `aligned_divergence` with the residual bucket (shared ids matched exactly, the unshared
    mass as one total) plus `uld_weight` times tau^2 sum_k |p_(k) - q_(k)| between the teacher's probabilities
    at tau on its unshared ids and the student's on its unshared ids (absolute, sorted, zero-padded)."""
    _check(student_logits_NV, teacher_logits_NVt, vmap)
    tau = div.temperature
    shared = aligned_divergence(student_logits_NV, teacher_logits_NVt, vmap,
                                dataclasses.replace(div, missing_mass="residual"))
    if uld_weight == 0:
        return shared
    rest_t = _unshared(vmap.unshared_teacher_mask, teacher_logits_NVt.shape[1], teacher_logits_NVt.device)
    rest_s = _unshared(vmap.unshared_student_mask, student_logits_NV.shape[1], student_logits_NV.device)
    p_NVt = _teacher_logprobs(teacher_logits_NVt, tau).exp().masked_fill(~rest_t, 0.0)
    q_NV = _log_normalize(_fp(student_logits_NV) / tau).exp().masked_fill(~rest_s, 0.0)
    return shared + uld_weight * tau * tau * _sorted_l1(p_NVt, q_NV)


def cross_divergence(method: str, student_logits_NV: torch.Tensor, teacher_logits_NVt: torch.Tensor,
                     vmap: VocabMap | None = None, div: Divergence | None = None,
                     uld_weight: float = 1.0) -> torch.Tensor:
    """Per-token divergence [N] by `method` ("aligned" | "uld" | "hybrid"); `div` defaults to forward KL at
    tau = 1 (for "uld" only its temperature counts); "aligned" and "hybrid" need `vmap`."""
    div = div or Divergence()
    if method not in METHODS:
        raise ValueError(f"cross-tokenizer method {method!r}: expected one of {', '.join(METHODS)}")
    if method == "uld":
        return uld(student_logits_NV, teacher_logits_NVt, div.temperature)
    if vmap is None:
        raise ValueError(f"cross-tokenizer method {method!r} needs a VocabMap")
    if method == "aligned":
        return aligned_divergence(student_logits_NV, teacher_logits_NVt, vmap, div)
    return hybrid(student_logits_NV, teacher_logits_NVt, vmap, div, uld_weight)
