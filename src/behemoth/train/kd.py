"""Knowledge distillation: teacher/student divergences, dense or over a teacher's top-k, and the teacher's
top-k itself. The chunked losses built on them are `kd_loss.py`; the soft/hard weighting, `kd_weight.py`.

Shape legend: N tokens, D model dim, V student vocabulary, K teacher top-k, S a support (V, K or K + 1).

Notation: p is the teacher's next-token distribution, q the student's. With temperature tau both are
softened, p = softmax(z_teacher / tau) and q = softmax(z_student / tau), and every divergence is
multiplied by tau^2 (Hinton et al. 2015): the soft-target gradients scale as 1/tau^2, so the factor
keeps their size comparable across temperatures. All divergences are per token and computed from
log-probabilities in fp32 (fp64 inputs stay fp64), with the conventions 0 * log(0 / x) = 0 and
x * log(x / 0) = +inf for x > 0. Logits of -inf (masked tokens) and zero probabilities give no NaN,
neither in values nor in gradients.

Divergences (`Divergence.kind`):
  forward_kl       KL(p || q) = sum_v p log(p / q)                   mode-covering (word-level KD)
  reverse_kl       KL(q || p) = sum_v q log(q / p)                   mode-seeking
  jsd              generalized Jensen-Shannon, normalised (below)
  skew_kl          KL(p || a p + (1 - a) q),  a = `skew`             DistiLLM's skew KL
  skew_reverse_kl  KL(q || (1 - a) p + a q),  a = `skew`             DistiLLM's skew reverse KL
  tvd              (1/2) sum_v |p - q|                               total variation distance

The generalized JSD. GKD (Agarwal et al. 2024) defines, with the mixture M = beta p + (1 - beta) q
(beta weights the teacher),

    JSD_beta(p || q) = beta KL(p || M) + (1 - beta) KL(q || M).

This vanishes at both ends: at beta -> 0 the mixture tends to q and JSD_beta = beta KL(p || q) + O(beta^2);
at beta -> 1 it tends to p and JSD_beta = (1 - beta) KL(q || p) + O((1 - beta)^2). (TRL patches the
ends by switching to the exact KLs at beta = 0 and 1, a discontinuity.) Here the loss is

    jsd_beta(p || q) = JSD_beta(p || q) / (beta (1 - beta)),

which is continuous on [0, 1], equals forward KL(p || q) at beta = 0 and reverse KL(q || p) at
beta = 1 (the exact KLs are used at the end points), is symmetric under swapping teacher and student
together with beta <-> 1 - beta, and at beta = 1/2 is 4x the classic Jensen-Shannon divergence (bounded
by 4 log 2). To compare with GKD/TRL's numbers in between, multiply by beta (1 - beta).

Sparse teachers (`TopK`: the teacher's k most likely ids with their log-probabilities, already at the
temperature tau) leave the teacher's mass outside the top-k, m_p = 1 - sum_{v in K} p(v), unknown but
for its total. `Divergence.missing_mass` says what to do with it (q is always the student's full
softmax, from which m_q = 1 - sum_{v in K} q(v)):
  renormalize  both renormalised over the k ids: p_K / (1 - m_p) against q_K / (1 - m_q). Proper
               distributions over K; the divergence only asks the student to match the teacher's
               ranking within its top-k, not how much mass it leaves outside.
  ignore       the pointwise terms of the divergence summed over the k ids only, with the teacher's
               top-k probabilities as they are and the student's full-softmax probabilities there;
               the missing mass contributes nothing. For forward KL this is the cross-entropy to the
               truncated teacher (minus its entropy); other divergences may go negative.
  residual     a (k + 1)-th bucket holds m_p for the teacher and m_q for the student: proper
               distributions over K + {rest}, a coarsening of the full ones (so every divergence
               here is at most its dense value). The teacher's m_p comes from 1 - sum exp(logprobs)
               and is floored at the machine epsilon (rounding leaves it there when the top-k holds
               nearly all the mass, while the true value is positive); when the student puts no mass
               at all outside the ids (k = V), the bucket is dropped for both.
With k = V (every id present) all three modes equal the dense divergence. Top-k entries with
log-probability -inf are absent (padding for tokens with fewer than k entries); their ids are ignored.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from behemoth.train.config import DIVERGENCES

KINDS = DIVERGENCES
MISSING_MASS = ("renormalize", "ignore", "residual")
NEG_INF = float("-inf")


class TopK(NamedTuple):
    """A sparse teacher: per token the ids of its k most likely tokens and their log-probabilities at the
    distillation temperature. Entries with log-probability -inf are absent (their id is ignored)."""

    ids: torch.Tensor  # [N, k] integer
    logprobs: torch.Tensor  # [N, k] float


# Dense logits [N, V_teacher], a sparse TopK, or a callable (start, end) -> dense logits of tokens
# start:end (called under no_grad, once in forward and again in backward, so it must be deterministic).
Teacher = torch.Tensor | TopK | Callable[[int, int], torch.Tensor]


@dataclass(frozen=True)
class Divergence:
    """Which per-token divergence, at which temperature, with which parameters (see the module doc)."""

    kind: str = "forward_kl"  # forward_kl | reverse_kl | jsd | skew_kl | skew_reverse_kl | tvd
    temperature: float = 1.0  # tau: both distributions softened by it; the loss scaled by tau^2
    beta: float = 0.5  # jsd: teacher weight of the mixture; 0 = forward KL, 1 = reverse KL
    skew: float = 0.1  # skew_kl / skew_reverse_kl: share of the first distribution in the mixture (DistiLLM: 0.1)
    missing_mass: str = "renormalize"  # sparse teachers: renormalize | ignore | residual

    def __post_init__(self):
        checks = [("kind", self.kind in KINDS), ("temperature", self.temperature > 0),
                  ("beta", 0 <= self.beta <= 1), ("skew", 0 <= self.skew <= 1),
                  ("missing_mass", self.missing_mass in MISSING_MASS)]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"Divergence.{name}={getattr(self, name)!r} is not a valid value")


# ---------------------------------------------------------------------------------------------------
# Pointwise pieces, all from log-probabilities


def _fp(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _lse(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim (kept); -inf for rows that are all -inf, with zero (not NaN) gradient."""
    empty = torch.isneginf(x).all(-1, keepdim=True)
    return torch.where(empty, NEG_INF, torch.logsumexp(x.masked_fill(empty, 0.0), -1, keepdim=True))


def _log_normalize(x: torch.Tensor) -> torch.Tensor:
    """x - logsumexp(x): log-probabilities from unnormalised ones; all -inf rows stay all -inf."""
    lse = _lse(x)
    return torch.where(torch.isneginf(lse), x, x - lse)


def _xlogr(la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """a log(a / b) elementwise from log a and log b, 0 where a = 0 (whatever b is)."""
    a = la.exp()
    return a * torch.where(a > 0, la - lb, 0.0)


def _log_mix(la: torch.Tensor, lb: torch.Tensor, w: float) -> torch.Tensor:
    """log(w a + (1 - w) b) from log a and log b; -inf where both are 0, with finite gradients."""
    if w == 1:
        return la
    if w == 0:
        return lb
    both = torch.isneginf(la) & torch.isneginf(lb)
    x = torch.where(both, 0.0, la) + math.log(w)
    y = torch.where(both, 0.0, lb) + math.log1p(-w)
    return torch.where(both, NEG_INF, torch.logaddexp(x, y))


def _divergence_from_logprobs(lp_NS: torch.Tensor, lq_NS: torch.Tensor, div: Divergence) -> torch.Tensor:
    """The divergence between teacher p and student q given on the same support, per token [N], no tau^2."""
    kind = div.kind
    if kind == "jsd" and div.beta in (0, 1):
        kind = "forward_kl" if div.beta == 0 else "reverse_kl"
    if kind == "forward_kl":
        return _xlogr(lp_NS, lq_NS).sum(-1)
    if kind == "reverse_kl":
        return _xlogr(lq_NS, lp_NS).sum(-1)
    if kind == "jsd":
        b = div.beta
        lm_NS = _log_mix(lp_NS, lq_NS, b)
        return (b * _xlogr(lp_NS, lm_NS) + (1 - b) * _xlogr(lq_NS, lm_NS)).sum(-1) / (b * (1 - b))
    if kind == "skew_kl":
        return _xlogr(lp_NS, _log_mix(lp_NS, lq_NS, div.skew)).sum(-1)
    if kind == "skew_reverse_kl":
        return _xlogr(lq_NS, _log_mix(lp_NS, lq_NS, 1 - div.skew)).sum(-1)
    return 0.5 * (lp_NS.exp() - lq_NS.exp()).abs().sum(-1)


def _sparse_supports(z_NV: torch.Tensor, topk: TopK, missing_mass: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher, student) log-probabilities over the support a missing-mass mode compares.

    `z_NV` are the student's logits already divided by tau; `topk` is sanitised (ids of absent entries
    point at 0, the teacher is detached).
    """
    lpT_NK, ids_NK = topk.logprobs, topk.ids
    absent_NK = torch.isneginf(lpT_NK)
    if missing_mass == "renormalize":
        lq_NK = _log_normalize(z_NV.gather(1, ids_NK).masked_fill(absent_NK, NEG_INF))
        return _log_normalize(lpT_NK), lq_NK
    lse_N1 = torch.logsumexp(z_NV, -1, keepdim=True)
    lq_NK = (z_NV.gather(1, ids_NK) - lse_N1).masked_fill(absent_NK, NEG_INF)
    if missing_mass == "ignore":
        return lpT_NK, lq_NK
    # residual: the student's mass outside the ids, exactly (a logsumexp over the other columns), and the
    # teacher's 1 - sum p, floored at epsilon; both dropped where the student has no column left.
    listed_NV = torch.zeros_like(z_NV).scatter_add_(1, ids_NK, (~absent_NK).to(z_NV.dtype)) > 0
    lq_rest_N1 = _lse(z_NV.masked_fill(listed_NV, NEG_INF)) - lse_N1
    eps = torch.finfo(lpT_NK.dtype).eps
    lp_rest_N1 = (-torch.expm1(_lse(lpT_NK))).clamp_min(eps).log()
    lp_rest_N1 = torch.where(torch.isneginf(lq_rest_N1), NEG_INF, lp_rest_N1)
    return torch.cat([lpT_NK, lp_rest_N1], -1), torch.cat([lq_NK, lq_rest_N1], -1)


def _divergence(z_NV: torch.Tensor, teacher: torch.Tensor | TopK, div: Divergence) -> torch.Tensor:
    """Per-token divergence times tau^2. Dense `teacher` are log-probabilities at tau over the student's V."""
    tau = div.temperature
    z_NV = _fp(z_NV) / tau
    if isinstance(teacher, TopK):
        lp_NS, lq_NS = _sparse_supports(z_NV, teacher, div.missing_mass)
    else:
        lp_NS, lq_NS = teacher, torch.log_softmax(z_NV, -1)
    return tau * tau * _divergence_from_logprobs(lp_NS, lq_NS, div)


def _padded_mass(t_NVt: torch.Tensor, vocab_size: int, temperature: float) -> torch.Tensor:
    """Per token, the teacher's probability (at the temperature) on columns vocab_size and beyond."""
    t_NVt = _fp(t_NVt.detach()) / temperature
    return (torch.logsumexp(t_NVt[:, vocab_size:], -1) - torch.logsumexp(t_NVt, -1)).exp()


def _prepare_teacher(teacher: torch.Tensor | TopK, vocab_size: int, mask_N: torch.Tensor,
                     temperature: float) -> tuple[torch.Tensor | TopK, torch.Tensor]:
    """The teacher of one chunk, detached: dense logits become log-probabilities at the temperature over
    the student's vocabulary (padded columns dropped); top-k entries are sanitised. Uncounted tokens get
    a harmless stand-in (whatever the caller left there: NaN, ids of -100). Also returns the largest
    mass a counted token's teacher puts on the dropped columns."""
    with torch.no_grad():
        padded = mask_N.new_zeros((), dtype=torch.float32)
        if isinstance(teacher, TopK):
            lp_NK, ids_NK = _fp(teacher.logprobs.detach()), teacher.ids.detach()
            if lp_NK.dim() != 2 or lp_NK.shape != ids_NK.shape or lp_NK.shape[0] != mask_N.shape[0]:
                raise ValueError(f"TopK ids {tuple(ids_NK.shape)} and logprobs {tuple(lp_NK.shape)} must both be "
                                 f"[N={mask_N.shape[0]}, k]")
            lp_NK = torch.where(mask_N[:, None], lp_NK, -math.log(lp_NK.shape[1]))
            ids_NK = torch.where(mask_N[:, None] & ~torch.isneginf(lp_NK), ids_NK.long(), 0)
            return TopK(ids_NK, lp_NK), padded
        t_NVt = _fp(teacher.detach())
        if t_NVt.dim() != 2 or t_NVt.shape[0] != mask_N.shape[0]:
            raise ValueError(f"teacher logits {tuple(t_NVt.shape)} must be [N={mask_N.shape[0]}, V]")
        if t_NVt.shape[1] < vocab_size:
            raise ValueError(f"teacher vocabulary ({t_NVt.shape[1]}) is smaller than the student's ({vocab_size})")
        if t_NVt.shape[1] > vocab_size:
            padded = torch.where(mask_N, _padded_mass(t_NVt, vocab_size, temperature), 0.0).max().float()
            t_NVt = t_NVt[:, :vocab_size]
        t_NVt = torch.where(mask_N[:, None], t_NVt, 0.0)
        return torch.log_softmax(t_NVt / temperature, -1), padded


def token_divergence(student_logits_NV: torch.Tensor, teacher: torch.Tensor | TopK,
                     div: Divergence | None = None) -> torch.Tensor:
    """Per-token divergence [N] (times tau^2) between the teacher and the student's softmax at tau
    (`div`: default forward KL at tau = 1).

    `teacher`: dense logits [N, V] over the student's vocabulary (a padded teacher: see `kd_loss`), or a
    `TopK` with log-probabilities already at tau. The teacher gets no gradient.
    """
    div = div or Divergence()
    V = student_logits_NV.shape[-1]
    if not isinstance(teacher, TopK) and teacher.shape[-1] != V:
        raise ValueError(f"teacher vocabulary ({teacher.shape[-1]}) != student's ({V}); kd_loss drops padding columns")
    mask_N = torch.ones(student_logits_NV.shape[0], dtype=torch.bool, device=student_logits_NV.device)
    prepared, _ = _prepare_teacher(teacher, V, mask_N, div.temperature)
    return _divergence(student_logits_NV, prepared, div)


@torch.no_grad()
def topk_targets(teacher_logits_NV: torch.Tensor, k: int, temperature: float = 1.0) -> TopK:
    """The teacher's top-k ids and their log-probabilities at `temperature` (the sparse form of dense logits)."""
    lp_NV = torch.log_softmax(_fp(teacher_logits_NV) / temperature, -1)
    lp_NK, ids_NK = lp_NV.topk(k, dim=-1)
    return TopK(ids_NK, lp_NK)


@torch.no_grad()
def teacher_topk(head: Callable[[torch.Tensor], torch.Tensor], hidden_ND: torch.Tensor, k: int,
                 temperature: float = 1.0, vocab_size: int | None = None, chunk: int = 1024) -> TopK:
    """A teacher's top-k (`topk_targets`) from its final hidden states [N, D]: its output `head` applied
    `chunk` tokens at a time, in fp32, so its [N, V] logits never exist at once. With `vocab_size` only the
    first `vocab_size` columns are ranked (a teacher vocabulary padded beyond the student's). The one
    function behind online top-k distillation and `distill-cache`, so the two cannot drift apart."""
    parts = [topk_targets(head(hidden_ND[s:s + chunk]).float()[:, :vocab_size], k, temperature)
             for s in range(0, hidden_ND.shape[0], chunk)]
    return TopK(torch.cat([p.ids for p in parts]), torch.cat([p.logprobs for p in parts]))
