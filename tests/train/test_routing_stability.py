"""Routing stability: flip rate and selection margin in closed form, the `routing_unstable` warning, the
state a resume carries, the probe that leaves training alone, and the records, plot and report of a run."""

from __future__ import annotations

import json

import pytest
import torch

import behemoth
from behemoth.checkpoint.training import read_state, write_state
from behemoth.config import PRESETS
from behemoth.data.loader import Batch
from behemoth.train.config import HealthSection, build_config
from behemoth.train.health import RoutingHealth, flip_rate, selection_margin
from behemoth.train.probe import RouterProbe
from behemoth.train.run import run_training
from behemoth.train.steps import moe_layers

FAST = {"model.preset": "debug", "train.steps": 6, "train.batch_size": 4, "data.seq_len": 32,
        "data.num_problems": 300, "log.every": 1, "log.eval_every": 0, "checkpoint.every": 0,
        "log.tensorboard": False, "log.plots": False, "router.bias_update_rate": 0.01}


def one_hot_logits(experts: list[int], num_experts: int = 4, gap: float = 1.0) -> torch.Tensor:
    """Logits [T, E]: token t prefers experts[t] by `gap` over every other expert (all others at 0)."""
    logits = torch.zeros(len(experts), num_experts)
    logits[torch.arange(len(experts)), torch.tensor(experts)] = gap
    return logits


def test_flip_rate_closed_form():
    ids = torch.tensor([[0], [1], [2], [3]])
    assert flip_rate(ids, ids) == 0.0
    assert flip_rate(ids, (ids + 1) % 4) == 1.0  # every token moved
    assert flip_rate(ids, torch.tensor([[0], [1], [3], [2]])) == 0.5
    top2 = torch.tensor([[0, 1], [2, 3]])
    assert flip_rate(top2, torch.tensor([[1, 0], [3, 2]])) == 0.0  # the order within the top-k does not count
    assert flip_rate(top2, torch.tensor([[0, 2], [2, 3]])) == 0.25  # one slot of four left its expert


def test_selection_margin_closed_form():
    scores = torch.tensor([[3.0, 1.0, 0.0], [2.0, 2.5, 0.0]])
    assert selection_margin(scores, 1) == pytest.approx((2.0 + 0.5) / 2)  # best minus runner-up, per token
    assert selection_margin(scores, 2) == pytest.approx((1.0 + 2.0) / 2)  # last chosen minus best unchosen
    assert selection_margin(scores, 3) is None  # every expert chosen: no boundary


def test_report_flip_rate_and_margins_biased_and_not():
    h = RoutingHealth([1], 4, HealthSection())
    h.observe(torch.full((1, 4), 8.0), torch.ones(1))
    logits = one_hot_logits([0, 1, 2, 3], gap=1.0)
    layer = h.report(2, torch.zeros(1, 4), [logits])[0]["layers"][0]
    assert layer["flip_rate"] is None and layer["margin"] == layer["logit_margin"] == pytest.approx(1.0)
    # a bias of 1.5 on expert 0 takes every token there: all tokens but token 0 flip; the biased margin is what
    # selects (0.5 for tokens 1-3, 2.5 for token 0), the router's own preference is unchanged
    h.observe(torch.full((1, 4), 8.0), torch.ones(1))
    bias = torch.tensor([[1.5, 0.0, 0.0, 0.0]])
    layer = h.report(4, bias, [logits])[0]["layers"][0]
    assert layer["flip_rate"] == 0.75
    assert layer["margin"] == pytest.approx((2.5 + 3 * 0.5) / 4) and layer["logit_margin"] == pytest.approx(1.0)
    h.observe(torch.full((1, 4), 8.0), torch.ones(1))
    assert h.report(6, bias, [logits])[0]["layers"][0]["flip_rate"] == 0.0  # nothing moved since


def unstable_events(total_steps: int, steps: list[int], moving: list[bool]) -> list[list[str]]:
    """The warning events of reports at `steps`: each either moves every token to the next expert or not."""
    h = RoutingHealth([0], 4, HealthSection(flip_rate_warn=0.3, unstable_windows=2), total_steps=total_steps)
    experts, events = [0, 1, 2, 3], []
    for step, move in zip(steps, moving, strict=True):
        experts = [(e + 1) % 4 for e in experts] if move else experts
        h.observe(torch.full((1, 4), 8.0), torch.ones(1))
        events.append([w["event"] for w in h.report(step, torch.zeros(1, 4), [one_hot_logits(experts)])[1]])
    return events


def test_unstable_warning_needs_a_high_streak_late_in_the_run():
    steps = [30, 40, 50, 60, 70, 80, 90]
    # reports at <= 50% of the 100 steps do not count (the first has no flip rate anyway), then two in a row warn
    assert unstable_events(100, steps, [True] * 7) == [[], [], [], [], ["routing_unstable"], ["routing_unstable"],
                                                       ["routing_unstable"]]
    # a quiet report breaks the streak
    assert unstable_events(100, steps, [True, True, True, True, False, True, True]) == [[], [], [], [], [], [],
                                                                                         ["routing_unstable"]]
    # churn in the first half alone never warns
    assert unstable_events(1000, steps, [True] * 7) == [[]] * 7


def test_unstable_warning_has_the_shape_of_the_others():
    h = RoutingHealth([5], 4, HealthSection(flip_rate_warn=0.3, unstable_windows=1))
    for step, experts in ((1, [0, 1, 2, 3]), (2, [1, 2, 3, 0])):
        h.observe(torch.full((1, 4), 8.0), torch.ones(1))
        _, warnings = h.report(step, None, [one_hot_logits(experts)])
    (w,) = warnings
    assert {k: w[k] for k in ("type", "event", "step", "layer", "flip_rate")} == {
        "type": "warning", "event": "routing_unstable", "step": 2, "layer": 5, "flip_rate": 1.0}
    assert "layer 5: 100% of the probe's routed slots changed expert" in w["message"]


def test_state_round_trips_through_a_checkpoint(tmp_path):
    """The last probe selection and the streaks survive `state_dict` -> training-state files -> `load_state_dict`:
    the next report is the same as the uninterrupted one's. A state from before stability loads too."""
    cfg = HealthSection(flip_rate_warn=0.3, unstable_windows=2)
    a = RoutingHealth([0, 2], 4, cfg, total_steps=10)
    for step, experts in ((3, [0, 1, 2, 3]), (6, [1, 2, 3, 0])):
        a.observe(torch.full((2, 4), 8.0), torch.ones(2))
        a.report(step, torch.zeros(2, 4), [one_hot_logits(experts)] * 2)
    write_state({"health": a.state_dict()}, tmp_path, "s")
    b = RoutingHealth([0, 2], 4, cfg, total_steps=10)
    b.load_state_dict(read_state(tmp_path, "s")["health"])
    assert b.prev_ids_LTK.dtype == torch.int16 and torch.equal(b.prev_ids_LTK, a.prev_ids_LTK)
    outs = []
    for h in (a, b):
        h.observe(torch.full((2, 4), 8.0), torch.ones(2))
        outs.append(h.report(9, torch.zeros(2, 4), [one_hot_logits([2, 3, 0, 1])] * 2))
    assert outs[0] == outs[1] and [w["event"] for w in outs[0][1]] == ["routing_unstable"] * 2
    old = {k: v for k, v in a.state_dict().items() if k not in ("probe_ids", "unstable_streak")}
    c = RoutingHealth([0, 2], 4, cfg)
    c.load_state_dict(old)
    c.observe(torch.full((2, 4), 8.0), torch.ones(2))
    assert c.report(9, None, [one_hot_logits([0, 1, 2, 3])] * 2)[0]["layers"][0]["flip_rate"] is None


def test_probe_reads_the_routers_and_records_nothing():
    """The probe's logits are those a training forward gives; `tokens_per_expert`, `last_router_logits` and the
    training mode are left as they were."""
    model = behemoth.build_model(PRESETS["debug"], seed=0).train()
    moes = moe_layers(model)
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = Batch(ids, ids, torch.arange(16).expand(2, 16), torch.zeros(2, 16, dtype=torch.long))
    model.hidden_states(ids, **batch.model_inputs)
    want = [m.last_router_logits.detach().reshape(-1, m.num_experts) for m in moes]
    counts = [m.tokens_per_expert.clone() for m in moes]
    last = [m.last_router_logits for m in moes]
    got = RouterProbe(batch, torch.device("cpu")).router_logits(model, moes)
    assert model.training and all(not m.router._forward_hooks for m in moes)
    for m, g, w, c, lg in zip(moes, got, want, counts, last, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
        assert torch.equal(m.tokens_per_expert, c) and m.last_router_logits is lg


def run(tmp_path, name, lines=None, **over):
    out = tmp_path / name
    args = {**FAST, "train.out_dir": str(out), **over}
    run_training(build_config(None, [f"--{k}={v}" for k, v in args.items()]),
                 say=lines.append if lines is not None else lambda s: None)
    return out, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_run_logs_stability_warns_and_trains_as_without_it(tmp_path):
    """Health at every step (stability probed each time, a threshold every window exceeds) against health only
    at the end: the same losses and weights, bit for bit; the probed run's records, screen lines and warnings."""
    from safetensors.torch import load_file

    lines: list[str] = []
    a, rec_a = run(tmp_path, "probed", lines, **{"log.health_every": 1, "health.flip_rate_warn": 0.0,
                                                  "health.unstable_windows": 2, "log.plots": True})
    b, rec_b = run(tmp_path, "quiet", **{"log.health_every": 100})
    assert [r["loss"] for r in rec_a if r["type"] == "train"] == [r["loss"] for r in rec_b if r["type"] == "train"]
    wa, wb = (load_file(str(d / "checkpoints" / "step_0000006" / "model.safetensors")) for d in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    routing = [r for r in rec_a if r["type"] == "routing"]
    assert [r["step"] for r in routing] == list(range(1, 7))
    for r in routing:
        for layer in r["layers"]:
            assert (layer["flip_rate"] is None) == (r["step"] == 1)
            assert layer["margin"] > 0 and layer["logit_margin"] > 0
            assert layer["flip_rate"] is None or 0 <= layer["flip_rate"] <= 1
    warned = [(r["step"], r["layer"]) for r in rec_a if r.get("event") == "routing_unstable"]
    layers = [layer["layer"] for layer in routing[0]["layers"]]
    # steps 1-3 are the first half of the 6 steps: streaks start at step 4, the second report in a row warns
    assert warned == [(s, layer) for s in (5, 6) for layer in layers]
    screen = [line for line in lines if line.startswith("  routing @")]
    assert "flip rate n/a, margin " in screen[0] and "flip rate " in screen[1] and "%, margin 0." in screen[1]
    assert sum("WARNING routing_unstable" in line for line in lines) == len(warned)
    assert (a / "routing_stability.png").is_file()


def test_report_table_reads_the_last_routing_record(tmp_path):
    from behemoth.eval.report import _stability_table

    run_dir = tmp_path / "student"
    run_dir.mkdir()
    layers = [{"layer": 1, "dead": 1, "max_over_mean": 1.5, "flip_rate": 0.1, "margin": 0.2, "router_entropy": 0.9},
              {"layer": 3, "dead": 0, "max_over_mean": 2.5, "flip_rate": 0.3, "margin": 0.4, "router_entropy": 0.8}]
    recs = [{"type": "routing", "step": 5, "layers": [{**x, "flip_rate": None} for x in layers]},
            {"type": "warning", "event": "routing_unstable", "step": 10, "layer": 3},
            {"type": "routing", "step": 10, "layers": layers}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    table = _stability_table({"student": run_dir, "no-moe": tmp_path})
    assert "<tr><td>student</td><td>10</td><td>20.0%</td><td>0.300</td><td>1</td><td>2.50</td><td>1</td></tr>" in table
    assert "no-moe" not in table and _stability_table({"no-moe": tmp_path}) == ""


def test_final_routing_skips_a_stub_window():
    """A run of 320 steps reporting every 53 reports again at 320, over 2 steps: its end is the window at 318."""
    from behemoth.train.health import final_routing

    def rec(step, dead, load):
        return {"type": "routing", "step": step, "layers": [{"dead": dead, "max_over_mean": load,
                                                             "step_max_over_mean": load, "router_entropy": 0.9}]}

    records = [rec(212, 2, 1.7), rec(265, 1, 1.5), rec(318, 0, 1.4), rec(320, 3, 2.9),
               {"type": "warning", "event": "dead_experts", "step": 320}]
    end = final_routing(records, 320)
    assert (end["step"], end["dead"], end["worst_max_over_mean"]) == (318, 0, 1.4)
    assert end["late_warnings"] == {"dead_experts": 1}
    assert final_routing(records[:3], 320)["step"] == 318  # a full last window is the end
