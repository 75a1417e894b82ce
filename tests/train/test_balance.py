"""The routing-bias rules (train/balance.py) against closed forms: a starved expert gets tokens back within a
bounded number of steps, a balanced layer is left alone, the update does not depend on the batch size, and
the adaptive rule damps an oscillating load."""

from __future__ import annotations

import pytest
import torch

from behemoth.train.balance import GROW, MIN_STEP_FRACTION, BiasBalancer, adaptive_bias_step, update_expert_bias
from behemoth.train.config import RouterSection


class Layer:
    """One layer's bias and a rule's state, stepped like the trainer does."""

    def __init__(self, E: int, rule: str, rate: float, max_step: float = 0.05):
        self.rule, self.rate, self.max_step = rule, rate, max_step
        self.bias = torch.zeros(E)
        self.step, self.last = torch.full((E,), rate), torch.zeros(E)

    def update(self, counts: torch.Tensor) -> None:
        if self.rule == "adaptive":
            adaptive_bias_step(self.bias, counts, self.step, self.last, self.rate * MIN_STEP_FRACTION, self.max_step)
        else:
            update_expert_bias(self.bias, counts, self.rate, self.rule)

    def route(self, logits_TE: torch.Tensor) -> torch.Tensor:
        """Counts [E] of a top-1 router with these logits, then the update."""
        counts = torch.bincount((logits_TE + self.bias).argmax(-1), minlength=logits_TE.shape[1]).float()
        self.update(counts)
        return counts


def test_sign_rule_is_signed_and_recentred():
    layer = Layer(4, "sign", 0.01)
    layer.update(torch.tensor([10.0, 0.0, 5.0, 5.0]))
    # mean load 5: expert 0 overloaded (-), 1 underloaded (+), 2 and 3 exact (0); then re-centred
    torch.testing.assert_close(layer.bias, torch.tensor([-0.01, 0.01, 0.0, 0.0]))


def test_proportional_rule_closed_form():
    # mean load 4: errors (4 - c) / 4 = (-2, +1, 0, +0.5, +0.5), which sum to zero (no re-centring shift)
    layer = Layer(5, "proportional", 0.1)
    layer.update(torch.tensor([12.0, 0.0, 4.0, 2.0, 2.0]))
    torch.testing.assert_close(layer.bias, torch.tensor([-0.2, 0.1, 0.0, 0.05, 0.05]))


def test_adaptive_rule_grows_while_the_sign_holds_and_halves_when_it_flips():
    layer = Layer(2, "adaptive", 0.01)
    steps, biases = [], []
    for counts in ([3.0, 1.0],) * 3 + ([1.0, 3.0],) * 2:
        layer.update(torch.tensor(counts))
        steps.append(float(layer.step[0]))
        biases.append(float(layer.bias[0]))
    # the first gain is the rate (no earlier sign), then x1.5, x1.5; the flip halves it, then x1.5 again
    want = [0.01, 0.015, 0.0225, 0.01125, 0.016875]
    assert steps == pytest.approx(want)
    # expert 0's error is (2 - 3) / 2 = -0.5 three times, then +0.5 twice; expert 1 the opposite; centred
    assert biases == pytest.approx([-0.005, -0.0125, -0.02375, -0.018125, -0.0096875])
    torch.testing.assert_close(layer.bias, torch.tensor([biases[-1], -biases[-1]]))


@pytest.mark.parametrize("rule", ["adaptive", "proportional", "sign"])
def test_a_balanced_layer_is_left_alone(rule):
    layer = Layer(4, rule, 0.05)
    layer.bias = torch.tensor([0.3, -0.1, -0.2, 0.0])
    for counts in (torch.full((4,), 37.0), torch.zeros(4)):  # an even load; a step that routed nothing
        layer.update(counts)
        torch.testing.assert_close(layer.bias, torch.tensor([0.3, -0.1, -0.2, 0.0]))


@pytest.mark.parametrize("rule", ["adaptive", "proportional", "sign"])
def test_update_is_invariant_to_batch_size(rule):
    torch.manual_seed(0)
    small, large = Layer(16, rule, 0.01), Layer(16, rule, 0.01)
    for _ in range(20):
        counts = torch.randint(0, 50, (16,)).float()
        small.update(counts)
        large.update(counts * 7)  # the same load shares, 7x the tokens
    torch.testing.assert_close(small.bias, large.bias, rtol=0, atol=1e-6)


def _closing_steps(gap: float, rule: str, rate: float, max_step: float = 0.05) -> int:
    """Closed form for the starved-expert case below: the number of updates after which expert 0's bias has
    risen against every other expert's by more than `gap`. Expert 0's error is +1 and each of the 7 others'
    (1/8 - 1/7) / (1/8) = -1/7, so expert 0 moves up by s and the others down by s (sign) or by s / 7
    (proportional, adaptive); re-centring shifts all alike, so the gap closes by 2 s or 8 s / 7 per update.
    s is the rate, or for `adaptive` rate * 1.5^k at the k-th update (no sign ever flips), capped."""
    closed, k = 0.0, 0
    while closed <= gap + 1e-9:
        s = min(rate * GROW ** k, max_step) if rule == "adaptive" else rate
        closed += s * (2 if rule == "sign" else 8 / 7)
        k += 1
    return k


@pytest.mark.parametrize("rule,rate", [("adaptive", 1e-2), ("proportional", 0.01), ("sign", 0.01), ("sign", 1e-3)])
def test_a_starved_expert_gets_tokens_back_within_a_bounded_number_of_steps(rule, rate):
    """E = 8; expert 0's logit is -0.5 on every token; experts 1..7 take turns leading by 0.1, so each wins
    exactly T / 7 tokens and expert 0 none: its bias must close a gap of 0.6. A step routes with the bias of
    the updates before it, so expert 0 first wins tokens at the step after `_closing_steps` updates (one
    more where the sum rounds to a tie). The adaptive rule needs 13 updates; the sign rule at DeepSeek's
    1e-3, 301."""
    T, E, gap, lead = 7 * 64, 8, 0.5, 0.1
    logits = torch.zeros(T, E)
    logits[:, 0] = -gap
    logits[torch.arange(T), 1 + torch.arange(T) % 7] = lead
    layer = Layer(E, rule, rate)
    updates = 0
    while (counts := layer.route(logits))[0] == 0 and updates < 1000:
        assert torch.equal(counts[1:], torch.full((7,), T / 7.0))  # the others stay balanced meanwhile
        updates += 1
    expected = _closing_steps(gap + lead, rule, rate)
    assert expected - 1 <= updates <= expected
    assert {("adaptive", 1e-2): 13, ("sign", 1e-3): 301}.get((rule, rate), expected) == expected


def test_adaptive_rule_damps_an_oscillating_load():
    """Two experts whose loads swap every step (the oscillation a fixed large step causes): each flip halves the
    gain, so the bias settles (its movement a geometric series) and the gain reaches its floor."""
    layer = Layer(2, "adaptive", 0.04, max_step=0.05)
    biases = []
    for i in range(30):
        layer.update(torch.tensor([3.0, 1.0] if i % 2 == 0 else [1.0, 3.0]))  # errors -+0.5
        biases.append(float(layer.bias[0]))
    assert float(layer.step.max()) == pytest.approx(0.04 * MIN_STEP_FRACTION)
    # gains 0.04, 0.02, 0.01, 0.005, then the floor 0.004 (halving 0.005 gives 0.0025 < 0.004), times 0.5
    assert abs(biases[-1] - biases[-2]) == pytest.approx(0.002)
    assert max(abs(b) for b in biases) <= 0.02 + 1e-9


def test_proportional_rebalances_a_collapsed_layer_faster_than_sign():
    """One expert leads every token by about 1.0 (at least 0.4): the proportional rule spreads the load
    (max/mean <= 2) within 20 steps at rate 0.01, where the sign rule at the same rate has not begun to (its hog
    falls against the others by 2 * rate per step: 0.4 after 20 steps); the adaptive rule at 0.01 too."""
    torch.manual_seed(0)
    T, E = 1024, 16
    logits = torch.randn(T, E) * 0.1
    logits[:, 3] += 1.0
    lead_T = logits[:, 3] - torch.cat([logits[:, :3], logits[:, 4:]], 1).max(-1).values
    assert float(lead_T.min()) > 0.4
    loads = {}
    for rule, rate, n in (("proportional", 0.01, 20), ("sign", 0.01, 20), ("adaptive", 0.01, 20)):
        layer = Layer(E, rule, rate)
        for _ in range(n):
            counts = layer.route(logits)
        loads[rule] = float(counts.max() / counts.mean())
    assert loads["proportional"] <= 2.0 and loads["sign"] == E and loads["adaptive"] <= 2.0


def test_unknown_rule_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match="router.bias_update='median'"):
        update_expert_bias(torch.zeros(2), torch.ones(2), 0.1, rule="median")


def test_balancer_state_round_trips(tmp_path):
    """A resumed run continues the adaptive rule's step sizes: two balancers, one restored from the other's
    state halfway, end with the same biases."""
    from behemoth import build_model
    from behemoth.train.steps import moe_layers

    def run(model, balancer, counts_list):
        for counts in counts_list:
            for m in moe_layers(model):
                m.tokens_per_expert.copy_(counts[: m.num_experts])
            balancer.update()

    torch.manual_seed(0)
    counts_list = [torch.randint(0, 9, (64,)).float() for _ in range(12)]
    a, b = build_model("debug"), build_model("debug")
    bal_a, bal_b = BiasBalancer(moe_layers(a), RouterSection()), BiasBalancer(moe_layers(b), RouterSection())
    run(a, bal_a, counts_list)
    run(b, bal_b, counts_list[:6])
    state = bal_b.state_dict()
    b2 = build_model("debug")
    b2.load_state_dict(b.state_dict())
    bal_b2 = BiasBalancer(moe_layers(b2), RouterSection())
    bal_b2.load_state_dict(state)
    run(b2, bal_b2, counts_list[6:])
    for ma, mb in zip(moe_layers(a), moe_layers(b2), strict=True):
        assert torch.equal(ma.router.expert_bias, mb.router.expert_bias)
    assert any(not torch.all(s == 0.01) for s in bal_a.state_dict()["step"])  # the gains did move


def test_a_resumed_run_says_when_its_balancing_changes():
    from behemoth.train.config import build_config
    from behemoth.train.models import balancing_change

    now = build_config()
    before = {"router": {"bias_update_rate": 0.001}}  # a run saved before `router.bias_update` existed: sign
    assert "bias_update=sign at rate 0.001" in balancing_change(before, now)
    assert "continues with adaptive at 0.01" in balancing_change(before, now)
    assert balancing_change({"router": {"bias_update": "adaptive", "bias_update_rate": None}}, now) is None
    assert balancing_change(before, build_config(None, ["--router.bias_update=sign"])) is None
    # selection noise: a run saved before it existed had none
    noisy = build_config(updates={"router.selection_noise": 0.3})
    saved = {"router": {"bias_update": "adaptive", "bias_update_rate": None}}
    assert "router.selection_noise=0; this run continues with 0.3" in balancing_change(saved, noisy)
    saved["router"]["selection_noise"] = 0.3
    assert balancing_change(saved, noisy) is None


def test_selection_noise_splits_identical_tokens_in_training_only():
    """Identical tokens have identical logits: without noise every one goes to the same expert, whatever the
    biases; with it the group splits among the experts near the top, and the biases then even the loads out. Eval
    mode selects deterministically; the scores stay the unbiased logits' sigmoid."""
    from behemoth.model.moe import Router

    torch.manual_seed(0)
    router = Router(16, 8, 1)
    torch.nn.init.normal_(router.weight, std=0.02)
    x = torch.randn(1, 16).expand(4000, 16)
    _, ids, _ = router(x)
    assert ids.unique().numel() == 1  # one expert takes the whole group
    router.selection_noise = 0.3
    router.eval()
    assert torch.equal(router(x)[1], ids)  # no noise outside training
    router.train()

    def balanced(noise: float) -> float:
        """Max/mean load of one step after 200 balancer updates at this noise."""
        router.expert_bias.zero_()
        balancer = BiasBalancer([_layer(router)], RouterSection(selection_noise=noise))
        assert router.selection_noise == noise
        for _ in range(200):
            scores, ids, logits = router(x)
            assert torch.allclose(scores, torch.sigmoid(logits.gather(-1, ids)))
            balancer.moes[0].tokens_per_expert.copy_(torch.bincount(ids.flatten(), minlength=8).float())
            balancer.update()
        counts = torch.bincount(router(x)[1].flatten(), minlength=8).float()
        return float(counts.max() / counts.mean())

    assert balanced(0.0) == 8.0  # the biases only move the whole group from expert to expert
    assert balanced(0.3) < 1.3  # the noise splits it; the biases even the expected loads out


def _layer(router):
    """A stand-in MoE layer for the balancer: its router and routed counts."""
    layer = torch.nn.Module()
    layer.router = router
    layer.register_buffer("tokens_per_expert", torch.zeros(router.num_experts))
    return layer


def test_selection_noise_is_off_by_default_and_checked():
    from behemoth.train.config import build_config

    assert build_config(updates={"data.images": True}).router.selection_noise == 0.0
    with pytest.raises(ValueError, match="router.selection_noise"):
        build_config(updates={"router.selection_noise": -1.0}).validate()
