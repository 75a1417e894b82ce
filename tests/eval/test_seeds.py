"""The demo over seeds: spreads computed from the per-seed values, the gap's spread with undefined seeds,
the story's order checked in every seed, the table, and the results file with its machine."""

from __future__ import annotations

import json
import statistics

import pytest

from behemoth.eval.seeds import aggregate, format_aggregate, spread, write_results


def seed_report(seed: int, acc: dict, loss: dict, gap: dict, vision: float | None = None) -> dict:
    models = {n: {"tasks": {"overall": acc[n], "interval": [acc[n] - 0.1, acc[n] + 0.1], "n": 10},
                  "heldout": {"loss": loss[n]}} for n in ("teacher", "distilled", "scratch")}
    for n in ("distilled", "scratch"):
        models[n]["teacher_kl"] = {"kl": loss[n] - loss["teacher"]}
    r = {"seed": seed, "models": models, "gap_recovered": gap, "wall_seconds": 1.0,
         "story_holds": {"teacher_ahead": True, "distilled_ahead_of_scratch": acc["distilled"] > acc["scratch"]}}
    if vision is not None:
        r["vision"] = {"accuracy": {"overall": vision, "n": 9}, "majority_baseline": {"overall": 0.3, "n": 9}}
    return r


REPORTS = [seed_report(0, {"teacher": 0.8, "distilled": 0.5, "scratch": 0.2}, {"teacher": 1.0, "distilled": 1.5,
                                                                                 "scratch": 3.0},
                       {"accuracy": 0.5, "heldout_loss": 0.75}, vision=0.6),
           seed_report(1, {"teacher": 0.7, "distilled": 0.2, "scratch": 0.3}, {"teacher": 1.1, "distilled": 1.4,
                                                                                 "scratch": 2.0},
                       {"accuracy": -0.25, "heldout_loss": 0.7}, vision=0.4),
           seed_report(2, {"teacher": 0.4, "distilled": 0.4, "scratch": 0.4}, {"teacher": 0.9, "distilled": 1.2,
                                                                                 "scratch": 1.8},
                       {"accuracy": None, "heldout_loss": 0.6}, vision=0.5)]


def test_spread_is_mean_sample_std_min_max():
    s = spread([0.5, None, -0.25])
    assert s == {"values": [0.5, None, -0.25], "mean": 0.125, "std": statistics.stdev([0.5, -0.25]),
                 "min": -0.25, "max": 0.5, "undefined": 1}
    assert spread([0.3])["std"] is None and spread([None])["mean"] is None


def test_aggregate_over_seeds():
    agg = aggregate(REPORTS)
    assert agg["seeds"] == [0, 1, 2]
    t = agg["models"]["teacher"]["accuracy"]
    assert t["values"] == [0.8, 0.7, 0.4] and t["mean"] == pytest.approx(statistics.fmean([0.8, 0.7, 0.4]))
    assert t["std"] == pytest.approx(statistics.stdev([0.8, 0.7, 0.4])) and (t["min"], t["max"]) == (0.4, 0.8)
    assert agg["models"]["scratch"]["heldout_loss"]["mean"] == pytest.approx(6.8 / 3)
    assert "teacher_kl" not in agg["models"]["teacher"]
    assert agg["models"]["distilled"]["teacher_kl"]["values"] == pytest.approx([0.5, 0.3, 0.3])
    g = agg["gap_recovered"]["accuracy"]
    assert g["undefined"] == 1 and g["min"] == -0.25 and g["mean"] == pytest.approx(0.125)
    assert agg["ordering_held"]["accuracy"] == {"per_seed": [True, False, False], "every_seed": False}
    assert agg["ordering_held"]["heldout_loss"] == {"per_seed": [True, True, True], "every_seed": True}
    assert agg["vision"]["accuracy"]["mean"] == pytest.approx(0.5)
    table = format_aggregate(agg)
    assert "over 3 seeds (0, 1, 2)" in table
    assert "gap recovered, accuracy: per seed 50%, -25%, n/a; mean 12% ± 53%, min -25%" in table
    assert "by accuracy in 1 of 3 seeds; by held-out loss in 3 of 3 seeds" in table
    assert "vision held-out accuracy (%): 50.0 ± 10.0 [40.0, 60.0]" in table


def test_results_file_records_the_machine(tmp_path):
    path = write_results(tmp_path / "r" / "demo.json", REPORTS, aggregate(REPORTS), {"quick": True, "seeds": 3})
    saved = json.loads(path.read_text())
    assert {"platform", "cpu_count", "torch", "behemoth", "python"} <= set(saved["machine"])
    assert saved["date"] and saved["seeds"] == 3 and saved["aggregate"] == json.loads(json.dumps(aggregate(REPORTS)))
    first = saved["per_seed"][0]
    assert first["seed"] == 0 and first["models"]["teacher"] == {"accuracy": 0.8, "interval": pytest.approx([0.7, 0.9]),
                                                                 "n": 10, "heldout_loss": 1.0}
    assert first["vision"]["accuracy"] == 0.6


def test_the_paired_comparison_over_seeds():
    """Each seed's students compared problem by problem: the difference's spread, the p-values, and in how many
    seeds the distilled student is ahead at p < 0.05 (ahead and significant, not merely significant)."""
    pairs = [{"difference": 0.07, "p_value": 0.0025}, {"difference": 0.02, "p_value": 0.3},
             {"difference": -0.06, "p_value": 0.01}]
    reports = [{**r, "distilled_vs_scratch": p} for r, p in zip(REPORTS, pairs, strict=True)]
    agg = aggregate(reports)["distilled_vs_scratch"]
    assert agg["difference"]["mean"] == pytest.approx(0.01) and agg["p_values"] == [0.0025, 0.3, 0.01]
    assert agg["ahead_at_5_percent"] == 1
    assert ("distilled vs scratch on the same problems: 1.0 ± 6.6 [-6.0, 7.0] points; ahead at McNemar p < 0.05 in "
            "1 of 3 seeds (p = 0.0025, 0.3, 0.01)") in format_aggregate(aggregate(reports))
    assert "distilled_vs_scratch" not in aggregate(REPORTS)  # older reports have none
