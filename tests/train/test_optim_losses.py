"""Schedules, weight-decay groups and the router losses, against closed forms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from behemoth import build_model
from behemoth.train.config import OptimSection
from behemoth.train.losses import balance_loss, chunked_cross_entropy, router_entropy, router_z_loss
from behemoth.train.optim import build_optimizer, lr_at


def test_cosine_schedule():
    cfg = OptimSection(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    assert lr_at(0, 100, cfg) == pytest.approx(0.1) and lr_at(9, 100, cfg) == pytest.approx(1.0)
    assert lr_at(10, 100, cfg) == pytest.approx(1.0) and lr_at(99, 100, cfg) == pytest.approx(0.1)
    mid = 10 + (99 - 10) / 2
    assert lr_at(int(mid), 100, cfg) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * (int(mid) - 10) / 89)))


def test_wsd_schedule():
    cfg = OptimSection(lr=1.0, warmup_steps=5, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[4] == pytest.approx(1.0) and all(x == 1.0 for x in lrs[5:80])
    assert lrs[80] == pytest.approx(1 - 1 / 20) and lrs[99] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:], strict=False))


def test_weight_decay_on_matrices_only():
    model = build_model("debug")
    opt = build_optimizer([model], OptimSection(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_router_losses_closed_forms():
    logits = torch.randn(32, 8)
    torch.testing.assert_close(router_z_loss(logits), (torch.logsumexp(logits, -1) ** 2).mean())
    uniform_logits = torch.zeros(32, 8)
    ids = torch.arange(32).remainder(8)[:, None]
    assert balance_loss(uniform_logits, ids).item() == pytest.approx(1.0)
    collapsed = torch.zeros(32, 8)
    collapsed[:, 0] = 10.0
    # every slot on expert 0 (f = e_0), whose normalised sigmoid affinity is s / (s + 7 * sigmoid(0)) with
    # s = sigmoid(10): E * sum_e f_e P_e = 8 s / (s + 3.5) = 1.77771 (a softmax affinity would give 7.995)
    s = 1 / (1 + math.exp(-10))
    want = 8 * s / (s + 3.5)
    assert balance_loss(collapsed, torch.zeros(32, 1, dtype=torch.long)).item() == pytest.approx(want, rel=1e-6)
    assert router_entropy(uniform_logits).item() == pytest.approx(1.0)
    # softmax of (10, 0 x 7): p = e^10 / (e^10 + 7) on expert 0 and q = 1 / (e^10 + 7) on each other one; fp32
    # rounds p (0.99936) by ~6e-8, which moves p log p by as much: measured 5e-8 off this 1.68e-3
    p, q = math.exp(10) / (math.exp(10) + 7), 1 / (math.exp(10) + 7)
    entropy = -(p * math.log(p) + 7 * q * math.log(q)) / math.log(8)
    assert router_entropy(collapsed).item() == pytest.approx(entropy, abs=2e-7)
    assert router_entropy(collapsed * 10).item() < 1e-3


def test_sequence_wise_balance_loss_averages_per_sequence():
    """Groups [G, T, E] give the mean of each group's loss: two sequences, each collapsed on a different
    expert, are balanced as a batch (loss 1 on uniform logits) but each is not (E on one-hot slots)."""
    logits = torch.zeros(2, 16, 4)
    ids = torch.stack([torch.zeros(16, 1, dtype=torch.long), torch.ones(16, 1, dtype=torch.long)])
    per_seq = balance_loss(logits, ids)
    torch.testing.assert_close(per_seq, (balance_loss(logits[0], ids[0]) + balance_loss(logits[1], ids[1])) / 2)
    assert per_seq.item() == pytest.approx(1.0)  # uniform affinity: E * sum_e f_e / E = 1 whatever f is
    mixed = torch.randn(2, 16, 4)
    assert balance_loss(mixed.flatten(0, 1), ids.flatten(0, 1)).item() != pytest.approx(balance_loss(mixed, ids).item())


def test_chunked_cross_entropy_equals_plain():
    h = torch.randn(50, 16, requires_grad=True)
    head = torch.nn.Linear(16, 30)
    labels = torch.randint(0, 30, (50,))
    labels[3] = -100
    total, n = chunked_cross_entropy(h, head, labels, chunk=7)
    ref = F.cross_entropy(head(h), labels, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(total, ref)
    assert n == 49
    (g,) = torch.autograd.grad(total, h)
    (g_ref,) = torch.autograd.grad(ref, h)
    torch.testing.assert_close(g, g_ref)


def test_router_losses_are_weighted_by_the_labelled_share():
    """Packed text (every position labelled) adds coef * z; a batch labelled at a quarter of its positions
    adds a quarter of it, so sparse labels (image-text rows) keep the CE-to-router-loss ratio."""
    import behemoth
    from behemoth.data.loader import Batch
    from behemoth.train.config import RouterSection
    from behemoth.train.steps import PretrainStep, token_counts

    model = behemoth.build_model("debug", seed=0)
    ids = torch.randint(3, 200, (2, 16))
    labels = torch.roll(ids, -1, 1)
    sparse = labels.clone()
    sparse[:, :12] = -100
    pos = torch.arange(16).expand(2, 16)
    step = PretrainStep(model, RouterSection(z_loss_coef=0.01, balance_loss_coef=0.02))
    for lab, share in ((labels, 1.0), (sparse, 0.25)):
        batch = Batch(ids, lab, pos, torch.zeros_like(ids))
        assert token_counts(batch)[1] == share
        model(ids)
        added, m = step._router_losses(torch.tensor(0.0), step.moes, token_counts(batch)[1])
        want = share * (0.01 * float(m["z_loss"]) + 0.02 * float(m["balance_loss"]))
        assert added.item() == pytest.approx(want, rel=1e-6)
