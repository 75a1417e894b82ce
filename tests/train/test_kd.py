"""Knowledge-distillation losses and soft/hard weights against closed forms written out here in plain torch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from behemoth.data.loader import IGNORE_INDEX
from behemoth.train.kd import KINDS, MISSING_MASS, Divergence, TopK, teacher_topk, token_divergence, topk_targets
from behemoth.train.kd_loss import distill_loss, kd_loss
from behemoth.train.kd_weight import KDWeight, certainty_weight, confidence_weight, loss_ratio_weight

N, V = 6, 13


def _logits(seed: int, n: int = N, v: int = V, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, v, generator=g, dtype=torch.float64)


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) for strictly positive p, q, in probability space."""
    return (p * (p / q).log()).sum(-1)


def _closed_form(kind: str, p: torch.Tensor, q: torch.Tensor, beta: float = 0.5, skew: float = 0.1) -> torch.Tensor:
    if kind == "forward_kl":
        return _kl(p, q)
    if kind == "reverse_kl":
        return _kl(q, p)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return (beta * _kl(p, m) + (1 - beta) * _kl(q, m)) / (beta * (1 - beta))
    if kind == "skew_kl":
        return _kl(p, skew * p + (1 - skew) * q)
    if kind == "skew_reverse_kl":
        return _kl(q, (1 - skew) * p + skew * q)
    return 0.5 * (p - q).abs().sum(-1)


@pytest.mark.parametrize("tau", [1.0, 2.5])
@pytest.mark.parametrize("kind", KINDS)
def test_divergences_match_closed_forms(kind, tau):
    s, t = _logits(0), _logits(1)
    p, q = torch.softmax(t / tau, -1), torch.softmax(s / tau, -1)
    for beta, skew in [(0.5, 0.1), (0.3, 0.4)]:
        div = Divergence(kind, temperature=tau, beta=beta, skew=skew)
        want = tau**2 * _closed_form(kind, p, q, beta, skew)
        torch.testing.assert_close(token_divergence(s, t, div), want)
    # fp32 inputs compute in fp32 and agree
    div = Divergence(kind, temperature=tau)
    torch.testing.assert_close(token_divergence(s.float(), t.float(), div), token_divergence(s, t, div).float(),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_between_identical_distributions(kind):
    t = _logits(2).float()
    torch.testing.assert_close(token_divergence(t, t, Divergence(kind, temperature=2.0)), torch.zeros(N),
                               atol=1e-5, rtol=0)


def test_jsd_end_points_are_the_kls_and_beta_mirrors():
    s, t = _logits(3), _logits(4)
    fkl, rkl = token_divergence(s, t, Divergence("forward_kl")), token_divergence(s, t, Divergence("reverse_kl"))
    torch.testing.assert_close(token_divergence(s, t, Divergence("jsd", beta=0.0)), fkl)
    torch.testing.assert_close(token_divergence(s, t, Divergence("jsd", beta=1.0)), rkl)
    # continuous at the ends (not only patched there)
    torch.testing.assert_close(token_divergence(s, t, Divergence("jsd", beta=1e-5)), fkl, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(token_divergence(s, t, Divergence("jsd", beta=1 - 1e-5)), rkl, rtol=1e-3, atol=1e-6)
    # swapping teacher and student mirrors beta; at 1/2 it is symmetric and 4x the classic Jensen-Shannon
    for beta in (0.3, 0.5):
        torch.testing.assert_close(token_divergence(s, t, Divergence("jsd", beta=beta)),
                                   token_divergence(t, s, Divergence("jsd", beta=1 - beta)))
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    m = (p + q) / 2
    torch.testing.assert_close(token_divergence(s, t, Divergence("jsd", beta=0.5)), 2 * (_kl(p, m) + _kl(q, m)))
    assert (token_divergence(s, t, Divergence("jsd", beta=0.5)) <= 4 * math.log(2)).all()


def test_skew_limits():
    s, t = _logits(5), _logits(6)
    div = {k: token_divergence(s, t, Divergence(k, temperature=1.5)) for k in ("forward_kl", "reverse_kl")}
    torch.testing.assert_close(token_divergence(s, t, Divergence("skew_kl", temperature=1.5, skew=0.0)),
                               div["forward_kl"])
    torch.testing.assert_close(token_divergence(s, t, Divergence("skew_reverse_kl", temperature=1.5, skew=0.0)),
                               div["reverse_kl"])
    for kind in ("skew_kl", "skew_reverse_kl"):
        torch.testing.assert_close(token_divergence(s, t, Divergence(kind, skew=1.0)), torch.zeros(N, dtype=s.dtype))
        # skewing bounds the divergence: KL(p || a p + (1 - a) q) <= -log a
        assert (token_divergence(s, t, Divergence(kind, skew=0.1)) <= -math.log(0.1) + 1e-9).all()


@pytest.mark.parametrize("mode", MISSING_MASS)
@pytest.mark.parametrize("kind", KINDS)
def test_sparse_with_k_equal_V_equals_dense(kind, mode):
    s, t, tau = _logits(7), _logits(8), 2.0
    topk = topk_targets(t, V, temperature=tau)
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(0))  # any order of the ids
    topk = TopK(topk.ids[:, perm], topk.logprobs[:, perm])
    s.requires_grad_(True)
    dense = token_divergence(s, t, Divergence(kind, temperature=tau))
    sparse = token_divergence(s, topk, Divergence(kind, temperature=tau, missing_mass=mode))
    torch.testing.assert_close(sparse, dense)
    weights = torch.linspace(0.5, 1.5, N, dtype=s.dtype)
    torch.testing.assert_close(torch.autograd.grad((weights * sparse).sum(), s)[0],
                               torch.autograd.grad((weights * dense).sum(), s)[0])
    dense = dense.detach()
    # also in fp32, where the teacher's residual 1 - sum p is rounding noise
    topk32 = TopK(topk.ids, topk.logprobs.float())
    got32 = token_divergence(s.detach().float(), topk32, Divergence(kind, temperature=tau, missing_mass=mode))
    torch.testing.assert_close(got32, dense.float(), rtol=1e-4, atol=1e-5)


def test_missing_mass_modes_when_k_is_less_than_V():
    s, t, tau, k = _logits(9), _logits(10), 1.5, 4
    p, q = torch.softmax(t / tau, -1), torch.softmax(s / tau, -1)
    topk = topk_targets(t, k, temperature=tau)
    pK, qK = p.gather(1, topk.ids), q.gather(1, topk.ids)
    mp, mq = 1 - pK.sum(-1), 1 - qK.sum(-1)
    pn, qn = pK / pK.sum(-1, keepdim=True), qK / qK.sum(-1, keepdim=True)

    def sparse(kind, mode):
        return token_divergence(s, topk, Divergence(kind, temperature=tau, missing_mass=mode))

    want = {
        ("forward_kl", "renormalize"): _kl(pn, qn),
        ("forward_kl", "ignore"): (pK * (pK / qK).log()).sum(-1),
        ("forward_kl", "residual"): (pK * (pK / qK).log()).sum(-1) + mp * (mp / mq).log(),
        ("reverse_kl", "renormalize"): _kl(qn, pn),
        ("reverse_kl", "ignore"): (qK * (qK / pK).log()).sum(-1),
        ("reverse_kl", "residual"): (qK * (qK / pK).log()).sum(-1) + mq * (mq / mp).log(),
        ("tvd", "renormalize"): 0.5 * (pn - qn).abs().sum(-1),
        ("tvd", "ignore"): 0.5 * (pK - qK).abs().sum(-1),
        ("tvd", "residual"): 0.5 * ((pK - qK).abs().sum(-1) + (mp - mq).abs()),
    }
    for (kind, mode), value in want.items():
        torch.testing.assert_close(sparse(kind, mode), tau**2 * value, msg=f"{kind} {mode}")
    jsd_resid = _closed_form("jsd", torch.cat([pK, mp[:, None]], -1), torch.cat([qK, mq[:, None]], -1), 0.3)
    torch.testing.assert_close(sparse_jsd := token_divergence(
        s, topk, Divergence("jsd", temperature=tau, beta=0.3, missing_mass="residual")), tau**2 * jsd_resid)
    assert torch.isfinite(sparse_jsd).all()
    for kind in KINDS:
        dense = token_divergence(s, t, Divergence(kind, temperature=tau))
        modes = [sparse(kind, mode) for mode in MISSING_MASS]
        assert (modes[2] <= dense + 1e-9).all(), kind  # a coarsening never increases a divergence
        assert not torch.allclose(modes[0], modes[1]) and not torch.allclose(modes[1], modes[2]), kind


@pytest.mark.parametrize("kind", KINDS)
def test_masked_logits_and_zero_probabilities(kind):
    s, t = _logits(11), _logits(12)
    cols = torch.tensor([2, 5, 11])
    keep = torch.ones(V, dtype=torch.bool)
    keep[cols] = False
    s_m, t_m = s.clone(), t.clone()
    s_m[:, cols], t_m[:, cols] = float("-inf"), float("-inf")
    s_m.requires_grad_(True)
    div = Divergence(kind, temperature=2.0, beta=0.3)
    got = token_divergence(s_m, t_m, div)
    torch.testing.assert_close(got, token_divergence(s[:, keep], t[:, keep], div))
    got.sum().backward()
    assert torch.isfinite(s_m.grad).all() and (s_m.grad[:, cols] == 0).all()
    # top-k lists with absent entries (-inf log-prob, any id) equal the shorter lists
    topk = topk_targets(t, 5, temperature=2.0)
    padded = TopK(torch.cat([topk.ids, torch.full((N, 2), -1)], -1),
                  torch.cat([topk.logprobs, torch.full((N, 2), float("-inf"), dtype=torch.float64)], -1))
    for mode in MISSING_MASS:
        d = Divergence(kind, temperature=2.0, beta=0.3, missing_mass=mode)
        s_g = s.clone().requires_grad_(True)
        got = token_divergence(s_g, padded, d)
        torch.testing.assert_close(got, token_divergence(s, topk, d))
        got.sum().backward()
        assert torch.isfinite(s_g.grad).all()


def test_bounded_divergences_stay_finite_when_supports_differ():
    s, t = _logits(13), _logits(14)
    t[:, :3] = float("-inf")  # the teacher rules out tokens the student still gives mass
    s.requires_grad_(True)
    for kind in ("forward_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"):
        s.grad = None
        loss = token_divergence(s, t, Divergence(kind, beta=0.5))
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(s.grad).all(), kind
    assert torch.isinf(token_divergence(s, t, Divergence("reverse_kl"))).all()  # q log(q / 0): infinite, not NaN


def _student(seed: int = 0, n: int = 10, d: int = 6):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(d, V, bias=False).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, d, generator=g, dtype=torch.float64))
    return hidden, head


def _grads(loss, hidden, head):
    return torch.autograd.grad(loss, [hidden, head.weight])


@pytest.mark.parametrize("form", ["tensor", "callable", "topk"])
def test_chunked_equals_unchunked(form):
    hidden, head = _student()
    t = _logits(15, n=10)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    div = Divergence("jsd", temperature=2.0, beta=0.3, missing_mass="residual")
    teacher = {"tensor": t, "callable": lambda a, b: t[a:b], "topk": topk_targets(t, 5, temperature=2.0)}[form]
    direct = token_divergence(head(hidden), teacher if form == "topk" else t, div)
    want = direct[mask].sum()
    got, n = kd_loss(hidden, head, teacher, mask, div, chunk=3)
    assert n == 8
    torch.testing.assert_close(got, want)
    for g_got, g_want in zip(_grads(got, hidden, head), _grads(want, hidden, head), strict=True):
        torch.testing.assert_close(g_got, g_want)
    per_token, _ = kd_loss(hidden, head, teacher, mask, div, chunk=4, per_token=True)
    torch.testing.assert_close(per_token, torch.where(mask, direct, 0.0))


def test_fully_masked_batch_is_exactly_zero():
    hidden, head = _student()
    t = torch.full((10, V), float("nan"), dtype=torch.float64)  # whatever sits under masked tokens
    garbage = TopK(torch.full((10, 4), IGNORE_INDEX), torch.full((10, 4), float("nan"), dtype=torch.float64))
    for teacher in (t, garbage):
        for mode in MISSING_MASS:
            loss, n = kd_loss(hidden, head, teacher, torch.zeros(10, dtype=torch.bool),
                              Divergence("reverse_kl", missing_mass=mode), chunk=4)
            assert n == 0 and loss.item() == 0.0
            assert all(torch.isfinite(g).all() and (g == 0).all() for g in _grads(loss, hidden, head))
    out = distill_loss(hidden, head, torch.full((10,), IGNORE_INDEX), garbage, weight=KDWeight(token_rule="loss_ratio"))
    assert out.tokens == 0 and out.loss_sum.item() == 0.0 and out.alpha_sum.item() == 0.0
    assert all(torch.isfinite(g).all() for g in _grads(out.loss_sum, hidden, head))


def test_padded_teacher_vocabulary():
    hidden, head = _student()
    t = _logits(16, n=10)
    pad = torch.full((10, 3), -1e4, dtype=torch.float64)
    wide = torch.cat([t, pad], -1)
    div = Divergence("forward_kl", temperature=2.0)
    torch.testing.assert_close(kd_loss(hidden, head, wide, div=div)[0], kd_loss(hidden, head, t, div=div)[0])
    wide[3, V + 1] = 5.0  # a real token beyond the student's vocabulary
    with pytest.raises(ValueError, match="beyond the student's vocabulary"):
        kd_loss(hidden, head, wide, div=div)
    mask = torch.ones(10, dtype=torch.bool)
    mask[3] = False  # ... unless that token is not counted
    kd_loss(hidden, head, wide, mask, div=div)
    with pytest.raises(ValueError, match="smaller than the student"):
        kd_loss(hidden, head, t[:, :-1], div=div)
    with pytest.raises(ValueError, match="drops padding columns"):
        token_divergence(head(hidden), wide)


def test_teacher_topk_in_chunks_equals_topk_of_the_whole_logits():
    """The one top-k of online distillation and distill-cache: the head applied chunk by chunk gives the
    top-k of the whole logits, and with `vocab_size` only the student's columns are ranked."""
    hidden, head = _student()
    logits = head(hidden).detach()
    for vocab in (None, V - 4):
        got = teacher_topk(head, hidden, 3, temperature=1.5, vocab_size=vocab, chunk=3)
        want = topk_targets(logits.float()[:, :vocab], 3, temperature=1.5)
        assert torch.equal(got.ids, want.ids)
        torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=1e-6)
        assert not got.logprobs.requires_grad
    assert (teacher_topk(head, hidden, 3, vocab_size=V - 4).ids < V - 4).all()


def test_only_the_student_gets_gradients():
    hidden, head = _student()
    t = _logits(17, n=10).requires_grad_(True)
    lp = torch.log_softmax(_logits(18, n=10), -1).topk(4, -1)
    topk = TopK(lp.indices, lp.values.detach().requires_grad_(True))
    labels = torch.randint(0, V, (10,), generator=torch.Generator().manual_seed(0))
    for teacher in (t, topk):
        out = distill_loss(hidden, head, labels, teacher, Divergence("jsd"), KDWeight(token_rule="loss_ratio"))
        out.loss_sum.backward()
    assert t.grad is None and topk.logprobs.grad is None
    assert hidden.grad is not None and head.weight.grad is not None


def test_scheduled_weights():
    assert KDWeight(alpha=0.3).alpha_at(0, 10) == KDWeight(alpha=0.3).alpha_at(9, 10) == 0.3
    lin = KDWeight("linear", alpha=0.8, alpha_start=0.2)
    assert [lin.alpha_at(s, 11) for s in (0, 5, 10, 50)] == pytest.approx([0.2, 0.5, 0.8, 0.8])
    wsd = KDWeight("wsd", alpha=1.0, alpha_start=0.0, alpha_end=0.25, warmup_fraction=0.1, decay_fraction=0.2)
    a = [wsd.alpha_at(s, 100) for s in range(100)]
    assert a[0] == 0.0 and a[5] == pytest.approx(0.5) and all(x == 1.0 for x in a[10:80])
    assert a[80] == pytest.approx(1 - 0.75 / 20) and a[99] == pytest.approx(0.25)
    assert all(0 <= x <= 1 for x in a)
    for bad in (dict(alpha=1.5), dict(schedule="cosine"), dict(token_rule="x"), dict(warmup_fraction=0.9)):
        with pytest.raises(ValueError, match="KDWeight"):
            KDWeight(**bad)
    for bad in (dict(kind="kl"), dict(beta=1.2), dict(temperature=0.0), dict(missing_mass="zero")):
        with pytest.raises(ValueError, match="Divergence"):
            Divergence(**bad)


def test_token_weights_at_known_points():
    one_hot = torch.full((2, V), float("-inf"), dtype=torch.float64)
    one_hot[:, 3] = 0.0
    uniform = torch.full((2, V), -math.log(V), dtype=torch.float64)
    assert torch.equal(confidence_weight(one_hot), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(confidence_weight(uniform), torch.full((2,), 1 / V, dtype=torch.float64))
    torch.testing.assert_close(certainty_weight(one_hot, V), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(certainty_weight(uniform, V), torch.zeros(2, dtype=torch.float64))
    ce_t, ce_s = torch.tensor([1.0, 2.0, 0.0, 0.0, 3.0]), torch.tensor([1.0, 0.0, 2.0, 0.0, 1.0])
    torch.testing.assert_close(loss_ratio_weight(ce_t, ce_s), torch.tensor([0.5, 0.0, 1.0, 0.5, 0.25]))
    # through KDWeight.token_factor, dense and sparse, against closed forms; all in [0, 1]
    s, t, tau = _logits(19), _logits(20), 2.0
    labels = torch.tensor([0, 1, 2, 3, IGNORE_INDEX, 5])
    p, q = torch.softmax(t / tau, -1), torch.softmax(s / tau, -1)
    y = labels.clamp_min(0)[:, None]
    ent = -(p * p.log()).sum(-1)
    want = {"confidence": p.max(-1).values, "certainty": 1 - ent / math.log(V),
            "loss_ratio": (-q.gather(1, y).log() / (-q.gather(1, y).log() - p.gather(1, y).log()))[:, 0]}
    topk = topk_targets(t, V, temperature=tau)
    for rule, value in want.items():
        w = KDWeight(token_rule=rule)
        for teacher in (t, topk):
            got = w.token_factor(s, teacher, labels, temperature=tau)
            torch.testing.assert_close(got[labels != IGNORE_INDEX], value[labels != IGNORE_INDEX], msg=rule)
            assert ((got >= 0) & (got <= 1)).all()
    # a top-k teacher: the tail mass spread evenly for the certainty; a missing label bounded for the ratio
    small = topk_targets(t, 3, temperature=tau)
    pk = small.logprobs.exp()
    m = 1 - pk.sum(-1)
    ent = -(pk * pk.log()).sum(-1) - m * (m / (V - 3)).log()
    counted = labels != IGNORE_INDEX
    got = KDWeight(token_rule="certainty").token_factor(s, small, labels, temperature=tau)
    torch.testing.assert_close(got[counted], (1 - ent / math.log(V))[counted])
    got = KDWeight(token_rule="loss_ratio").token_factor(s, small, labels, temperature=tau)
    missing = ~(small.ids == y).any(-1) & counted
    assert missing.any()
    ce_t = -torch.minimum(m, pk.min(-1).values).log()
    ce_s = -q.gather(1, y).log()[:, 0]
    torch.testing.assert_close(got[missing], (ce_s / (ce_s + ce_t))[missing])


@pytest.mark.parametrize("rule", ["none", "confidence"])
def test_distill_loss_mixes_hard_and_soft(rule):
    hidden, head = _student()
    t = _logits(21, n=10)
    labels = torch.randint(0, V, (10,), generator=torch.Generator().manual_seed(1))
    labels[[2, 7]] = IGNORE_INDEX
    div, weight = Divergence("forward_kl", temperature=2.0), KDWeight("linear", alpha=0.6, alpha_start=0.2,
                                                                      token_rule=rule)
    out = distill_loss(hidden, head, labels, t, div, weight, step=5, total_steps=11, chunk=3)
    z, mask = head(hidden), labels != IGNORE_INDEX
    ce = F.cross_entropy(z, labels, ignore_index=IGNORE_INDEX, reduction="none")
    kd = token_divergence(z, t, div)
    alpha = 0.4 * (torch.softmax(t / 2.0, -1).max(-1).values if rule == "confidence" else torch.ones(10))
    alpha = torch.where(mask, alpha, 0.0).double()
    want = ((1 - alpha) * ce + alpha * kd)[mask].sum()
    assert out.tokens == 8
    torch.testing.assert_close(out.loss_sum, want)
    torch.testing.assert_close(out.ce_sum, ce[mask].sum())
    torch.testing.assert_close(out.kd_sum, kd[mask].sum())
    torch.testing.assert_close(out.alpha_sum.double(), alpha.sum())
    if rule == "none":
        assert out.alpha_sum.item() / out.tokens == pytest.approx(0.4)
    for g_got, g_want in zip(_grads(out.loss_sum, hidden, head), _grads(want, hidden, head), strict=True):
        torch.testing.assert_close(g_got, g_want)  # the weights are constants to the gradient


def test_distill_loss_without_recompute_is_identical():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 12)
    h = torch.randn(10, 8, requires_grad=True)
    labels = torch.randint(0, 12, (10,))
    teacher = torch.randn(10, 12)
    grads = []
    for recompute in (True, False):
        res = distill_loss(h, head, labels, teacher, chunk=4, recompute=recompute)
        (g,) = torch.autograd.grad(res.loss_sum, h)
        grads.append((res.loss_sum.detach(), g))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
