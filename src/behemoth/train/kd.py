"""Knowledge distillation: teacher/student divergences, a chunked KD loss and soft/hard weighting.

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

Soft/hard weighting: total = (1 - alpha) CE + alpha KD per token, with alpha in [0, 1] from `KDWeight`
(a schedule over training times an optional per-token factor); see its docstring for the rules.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from behemoth.train.losses import IGNORE_INDEX

KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")
MISSING_MASS = ("renormalize", "ignore", "residual")
SCHEDULES = ("constant", "linear", "wsd")
TOKEN_RULES = ("none", "confidence", "certainty", "loss_ratio")
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

    `teacher`: dense logits [N, V] over the student's vocabulary (see `truncate_teacher_vocab` for a
    padded one), or a `TopK` with log-probabilities already at tau. The teacher gets no gradient.
    """
    div = div or Divergence()
    V = student_logits_NV.shape[-1]
    if not isinstance(teacher, TopK) and teacher.shape[-1] != V:
        raise ValueError(f"teacher vocabulary ({teacher.shape[-1]}) != student's ({V}); use truncate_teacher_vocab")
    mask_N = torch.ones(student_logits_NV.shape[0], dtype=torch.bool, device=student_logits_NV.device)
    prepared, _ = _prepare_teacher(teacher, V, mask_N, div.temperature)
    return _divergence(student_logits_NV, prepared, div)


def truncate_teacher_vocab(teacher_logits_NV: torch.Tensor, vocab_size: int, temperature: float = 1.0,
                           max_mass: float = 1e-3) -> torch.Tensor:
    """The teacher's logits over the student's `vocab_size` columns (a padded teacher vocabulary: the extra
    columns are dropped, which renormalises the teacher's softmax over the rest).

    Raises `ValueError` if the teacher is smaller than the student, or if for some token its softmax at
    `temperature` puts more than `max_mass` on the dropped columns (then they are real tokens, not padding).
    """
    Vt = teacher_logits_NV.shape[-1]
    if Vt < vocab_size:
        raise ValueError(f"teacher vocabulary ({Vt}) is smaller than the student's ({vocab_size})")
    if Vt > vocab_size:
        worst = float(_padded_mass(teacher_logits_NV.reshape(-1, Vt), vocab_size, temperature).max())
        if worst > max_mass:
            raise ValueError(f"the teacher puts up to {worst:.3g} of its probability on columns {vocab_size}..{Vt - 1} "
                             f"beyond the student's vocabulary (allowed: {max_mass:g})")
    return teacher_logits_NV[..., :vocab_size]


@torch.no_grad()
def topk_targets(teacher_logits_NV: torch.Tensor, k: int, temperature: float = 1.0) -> TopK:
    """The teacher's top-k ids and their log-probabilities at `temperature` (the sparse form of dense logits)."""
    lp_NV = torch.log_softmax(_fp(teacher_logits_NV) / temperature, -1)
    lp_NK, ids_NK = lp_NV.topk(k, dim=-1)
    return TopK(ids_NK, lp_NK)


# ---------------------------------------------------------------------------------------------------
# Soft/hard weighting


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


# ---------------------------------------------------------------------------------------------------
# Chunked losses


class DistillLoss(NamedTuple):
    """Sums over the counted tokens; divide by `tokens` (at least 1) for means."""

    loss_sum: torch.Tensor  # sum_t (1 - alpha_t) CE_t + alpha_t KD_t: what to optimise
    ce_sum: torch.Tensor  # sum_t CE_t (hard labels, tau = 1)
    kd_sum: torch.Tensor  # sum_t KD_t (tau^2 times the divergence)
    alpha_sum: torch.Tensor  # sum_t alpha_t (no gradient): alpha_sum / tokens is the mean weight to log
    tokens: int


def _chunk_teacher(teacher: Teacher, start: int, end: int):
    """The part of `teacher` for tokens start:end: a tensor view, a TopK of views, or a zero-arg thunk."""
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


def _distill_chunk(h_ND: torch.Tensor, labels_N: torch.Tensor, teacher, head: Callable[[torch.Tensor], torch.Tensor],
                   div: Divergence, rule: str, alpha: float):
    z_NV = _fp(head(h_ND))
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
                 teacher: Teacher, div: Divergence | None = None, weight: KDWeight | None = None,
                 step: int = 0, total_steps: int = 1, chunk: int = 1024,
                 max_padded_mass: float | None = 1e-3, recompute: bool = True) -> DistillLoss:
    """Hard-label cross-entropy and KD in one pass over chunks of the student's logits, mixed per token
    as (1 - alpha_t) CE_t + alpha_t KD_t with alpha_t from `weight` at optimizer step `step` of
    `total_steps` (`div`, `weight`: default forward KL at tau = 1, constant alpha = 0.5). Counted tokens:
    labels != IGNORE_INDEX. Chunking, teacher forms and checks as in `kd_loss`; the head runs once per
    chunk in forward (and once more in backward) for both losses. `recompute=False` keeps each chunk's
    activations for backward instead (faster when the logits are small enough to hold).
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
    return DistillLoss(loss, ce, kd, alpha_sum.detach(), int((labels_N != IGNORE_INDEX).sum()))
