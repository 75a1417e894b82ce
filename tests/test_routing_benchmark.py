"""benchmarks/routing.py: one tiny run of a method and recipe gives the figures the table needs, and the
summary over seeds is the mean, sample std, min and max of the recorded runs."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = {"train.steps": 4, "train.batch_size": 2, "data.num_problems": 200, "data.seq_len": 64,
        "log.health_every": 1, "log.every": 1, "optim.warmup_steps": 1}


@pytest.fixture
def routing(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("bench_routing", BENCHMARKS / "routing.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method", ["adaptive", "batch-loss-1e-2"])
def test_one_run_measures_routing_and_quality(routing, tmp_path, method):
    rec = routing.run_one(method, "student", 3, tmp_path / "run", overrides=TINY, eval_problems=8)
    assert (rec["method"], rec["recipe"], rec["seed"], rec["steps"]) == (method, "student", 3, 4)
    assert rec["dead"] >= 0 and rec["worst_max_over_mean"] >= 1.0 and 0 < rec["router_entropy"] <= 1
    assert rec["flip_rate"] is not None and 0 <= rec["flip_rate"] <= 1 and rec["margin"] is not None
    assert 0 <= rec["accuracy"] <= 1 and rec["heldout_loss"] > 0 and len(rec["trajectory"]) == 4
    assert set(rec["per_task"]) == set(routing.TEXT_TASKS)  # the tasks the table was measured on


def test_summary_over_seeds(routing):
    runs = [{"method": "adaptive", "recipe": "student", "seed": s, "dead": d, "worst_max_over_mean": w,
             "router_entropy": 0.9, "flip_rate": None, "margin": 0.2, "late_warnings": 0, "heldout_loss": 0.5 + s,
             "accuracy": a, "train_seconds": 1.0}
            for s, d, w, a in ((0, 0, 1.5, 0.2), (1, 2, 1.9, 0.3), (2, 1, 1.6, 0.1))]
    cell = routing.summarize(runs)["student"]["adaptive"]
    assert cell["seeds"] == [0, 1, 2] and "flip_rate" not in cell  # no run had one
    assert cell["dead"] == {"mean": 1.0, "std": 1.0, "min": 0, "max": 2}
    assert cell["accuracy"]["std"] == pytest.approx(statistics.stdev([0.2, 0.3, 0.1]))
    table = routing.table(routing.summarize(runs))
    assert "| student | adaptive | 3 | 1.0 ± 1.0 | 1.67 ± 0.21 | 0.0 ± 0.0 |" in table and "20.0 ± 10.0%" in table
