"""Soft/hard weighting of distillation: total = (1 - alpha_t) CE_t + alpha_t KD_t per token, alpha_t from a
schedule over training times an optional per-token factor from the teacher (`KDWeight`).

Shape legend: N tokens, V student vocabulary, S a support (V or the teacher's top-k).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from behemoth.data.loader import IGNORE_INDEX
from behemoth.train.kd import NEG_INF, TopK, _fp, _lse, _prepare_teacher

SCHEDULES = ("constant", "linear", "wsd")
TOKEN_RULES = ("none", "confidence", "certainty", "loss_ratio")


def confidence_weight(teacher_logprobs_NS: torch.Tensor) -> torch.Tensor:
    """max_v p(v) per token [N]: the teacher's probability of its top token (exact from a top-k too)."""
    return teacher_logprobs_NS.detach().max(-1).values.exp().clamp(0.0, 1.0)


def certainty_weight(teacher_logprobs_NS: torch.Tensor, vocab_size: int,
                     tail_mass_N: torch.Tensor | None = None) -> torch.Tensor:
    """1 - H(p) / log V per token [N]: 1 for a one-hot teacher, 0 for a uniform one.

    `teacher_logprobs_NS`: the full distribution [N, V], or the listed entries of a sparse one (-inf:
    absent) with `tail_mass_N`, the mass outside them. The tail is taken as spread evenly over the
    unlisted tokens, the most entropic way the teacher could have spread it: the entropy is an upper
    bound and the certainty a lower bound (trust a sparse teacher no more than what is known of it).
    """
    lp_NS = teacher_logprobs_NS.detach()
    if vocab_size <= 1:
        return torch.ones(lp_NS.shape[:-1], dtype=lp_NS.dtype, device=lp_NS.device)
    p_NS = lp_NS.exp()
    entropy_N = -(p_NS * torch.where(p_NS > 0, lp_NS, 0.0)).sum(-1)
    if tail_mass_N is not None:
        unlisted_N = (vocab_size - (~torch.isneginf(lp_NS)).sum(-1)).clamp_min(1).to(lp_NS.dtype)
        m_N = tail_mass_N.detach().to(lp_NS.dtype).clamp_min(0.0)
        entropy_N = entropy_N - m_N * torch.where(m_N > 0, (m_N / unlisted_N).log(), 0.0)
    return (1 - entropy_N / math.log(vocab_size)).clamp(0.0, 1.0)


def loss_ratio_weight(ce_teacher_N: torch.Tensor, ce_student_N: torch.Tensor) -> torch.Tensor:
    """CE_student / (CE_student + CE_teacher) per token [N] (0.5 where both are 0).

    The cross-entropies are of the true next token. Where the teacher predicts it much better than the
    student, the weight tends to 1 (learn from the teacher's distribution); where the student already
    predicts it better than the teacher, the weight drops below 1/2 and tends to 0 (the teacher's soft
    targets would pull the student away from the right answer: lean on the hard label).
    """
    ce_s, ce_t = ce_student_N.detach().clamp_min(0.0), ce_teacher_N.detach().clamp_min(0.0)
    total = ce_s + ce_t
    return torch.where(total > 0, ce_s / total.clamp_min(torch.finfo(total.dtype).tiny), 0.5).clamp(0.0, 1.0)


@dataclass(frozen=True)
class KDWeight:
    """The weight alpha of the soft (KD) loss per token: total = (1 - alpha_t) CE_t + alpha_t KD_t.

    alpha_t = alpha(step) * g_t, both in [0, 1], so alpha_t is in [0, 1].

    alpha(step), `schedule`, for optimizer step `step` (0-based) of `total`:
      constant  alpha.
      linear    from alpha_start at step 0 to alpha at the last step, linearly.
      wsd       warmup-stable-decay: linear from alpha_start (step 0) to alpha over the first
                `warmup_fraction` of steps, alpha for the stable middle, then linear to alpha_end over
                the last `decay_fraction` (reached at the last step). Peng et al. 2024 found a WSD
                schedule of the KD proportion the best of their pre-training distillation variants.
    g_t, `token_rule`, per token from the teacher (at the distillation temperature) and the true token y_t:
      none        1.
      confidence  max_v p_t(v): trust the teacher where it is sure.
      certainty   1 - H(p_t) / log V: the same through the entropy, which also sees how the rest of the
                  mass is spread. For a top-k teacher the missing mass is taken as spread evenly over the
                  unlisted tokens (the largest entropy it could have: a lower bound on the certainty).
      loss_ratio  CE_s / (CE_s + CE_t) with CE = -log prob(y_t) of the student (s) and the teacher (t):
                  near 1 where the teacher knows the answer better than the student, below 1/2 where the
                  student already beats the teacher on that token, where the hard label is the better
                  target. (A top-k teacher not listing y_t is credited with -log min(missing mass,
                  smallest listed probability), a lower bound on its CE as the ids are its top-k.) Both
                  CEs are taken at the distillation temperature, where a top-k teacher is known; at
                  tau = 1 they are the two models' own losses on the token.
    The weights carry no gradient.
    """

    schedule: str = "constant"  # constant | linear | wsd
    alpha: float = 0.5  # the constant; the end of the linear ramp; the wsd plateau
    alpha_start: float = 0.0  # linear, wsd: the value at step 0
    alpha_end: float = 0.0  # wsd: the value at the end of the decay
    warmup_fraction: float = 0.1  # wsd
    decay_fraction: float = 0.2  # wsd
    token_rule: str = "none"  # none | confidence | certainty | loss_ratio

    def __post_init__(self):
        checks = [("schedule", self.schedule in SCHEDULES), ("token_rule", self.token_rule in TOKEN_RULES),
                  ("alpha", 0 <= self.alpha <= 1), ("alpha_start", 0 <= self.alpha_start <= 1),
                  ("alpha_end", 0 <= self.alpha_end <= 1), ("warmup_fraction", 0 <= self.warmup_fraction <= 1),
                  ("decay_fraction", 0 <= self.decay_fraction <= 1 - self.warmup_fraction)]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"KDWeight.{name}={getattr(self, name)!r} is not a valid value")

    def alpha_at(self, step: int, total: int) -> float:
        """The scheduled alpha(step) of optimizer step `step` (0-based) of `total`."""
        step = max(0, step)
        if self.schedule == "constant":
            return self.alpha
        if self.schedule == "linear":
            t = min(1.0, step / max(1, total - 1))
            return self.alpha_start + (self.alpha - self.alpha_start) * t
        warmup = int(round(total * self.warmup_fraction))
        decay = int(round(total * self.decay_fraction))
        if step < warmup:
            return self.alpha_start + (self.alpha - self.alpha_start) * step / warmup
        if decay == 0 or step < total - decay:
            return self.alpha
        t = min(1.0, (step - (total - decay) + 1) / decay)
        return self.alpha + (self.alpha_end - self.alpha) * t

    def token_factor(self, student_logits_NV: torch.Tensor, teacher: torch.Tensor | TopK, labels_N: torch.Tensor,
                     temperature: float = 1.0) -> torch.Tensor:
        """g_t [N] for dense teacher logits over the student's vocabulary or a `TopK` at the temperature."""
        V = student_logits_NV.shape[-1]
        mask_N = labels_N != IGNORE_INDEX
        prepared, _ = _prepare_teacher(teacher, V, mask_N, temperature)
        return _token_factor(self.token_rule, student_logits_NV, prepared, labels_N, temperature)


@torch.no_grad()
def _token_factor(rule: str, z_NV: torch.Tensor, teacher: torch.Tensor | TopK, labels_N: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """g_t of `KDWeight.token_rule`; `teacher` prepared (dense: log-probabilities at the temperature)."""
    if rule == "none":
        return torch.ones(z_NV.shape[0], dtype=torch.float32, device=z_NV.device)
    V = z_NV.shape[-1]
    y_N1 = labels_N.masked_fill(labels_N == IGNORE_INDEX, 0).long()[:, None]
    if not isinstance(teacher, TopK):
        if rule == "confidence":
            return confidence_weight(teacher)
        if rule == "certainty":
            return certainty_weight(teacher, V)
        ce_t_N = -teacher.gather(1, y_N1)[:, 0]
    else:
        lp_NK, ids_NK = teacher.logprobs, teacher.ids
        if rule == "confidence":
            return confidence_weight(lp_NK)
        rest_N = (-torch.expm1(_lse(lp_NK)[:, 0])).clamp_min(0.0)
        if rule == "certainty":
            return certainty_weight(lp_NK, V, rest_N)
        listed_NK = ~torch.isneginf(lp_NK)
        hit_NK = (ids_NK == y_N1) & listed_NK
        lp_y_N = torch.where(hit_NK, lp_NK, NEG_INF).max(-1).values
        # y is not listed: p(y) <= the missing mass, and <= the smallest listed probability (top-k)
        lp_min_N = torch.where(listed_NK, lp_NK, float("inf")).min(-1).values
        bound_N = torch.minimum(rest_N.clamp_min(torch.finfo(lp_NK.dtype).eps).log(), lp_min_N)
        ce_t_N = -torch.where(hit_NK.any(-1), lp_y_N, bound_N)
    ce_s_N = -torch.log_softmax(_fp(z_NV) / temperature, -1).gather(1, y_N1)[:, 0]
    return loss_ratio_weight(ce_t_N, ce_s_N)
