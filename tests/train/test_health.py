"""Routing health: statistics and the collapse / dead-expert warnings."""

from __future__ import annotations

import torch

from behemoth.train.config import HealthSection
from behemoth.train.health import RoutingHealth


def test_balanced_layer_raises_nothing():
    h = RoutingHealth([0, 1], 4, HealthSection())
    h.observe(torch.full((2, 4), 25.0), torch.tensor([0.9, 0.9]))
    rec, warnings = h.report(10, torch.zeros(2, 4))
    assert warnings == []
    assert rec["layers"][0]["max_over_mean"] == 1.0 and rec["layers"][0]["load_entropy"] == 1.0
    assert rec["layers"][1]["dead"] == 0 and rec["layers"][1]["bias_min"] == 0.0


def test_collapse_warning():
    h = RoutingHealth([3], 4, HealthSection(collapse_share=0.5))
    h.observe(torch.tensor([[90.0, 5.0, 5.0, 0.0]]), torch.tensor([0.2]))
    rec, warnings = h.report(7, None)
    assert rec["layers"][0]["max_share"] == 0.9 and rec["layers"][0]["dead"] == 1
    assert [w["event"] for w in warnings] == ["routing_collapse"]
    assert "layer 3: expert 0 takes 90%" in warnings[0]["message"]


def test_dead_experts_must_persist():
    h = RoutingHealth([0], 4, HealthSection(collapse_share=0.9, dead_windows=3))
    events = []
    for step in range(4):
        h.observe(torch.tensor([[40.0, 30.0, 30.0, 0.0]]), torch.tensor([0.5]))
        events.append([w["event"] for w in h.report(step, None)[1]])
    assert events == [[], [], ["dead_experts"], ["dead_experts"]]
    h.observe(torch.tensor([[40.0, 30.0, 29.0, 1.0]]), torch.tensor([0.5]))
    assert h.report(5, None)[1] == []  # the expert came back: the streak resets
