"""benchmarks/teaching.py: the equal-FLOPs plan, and one tiny run of each new way of teaching gives the figures
the table needs, with its cost counted from the work the run did."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from behemoth import demo

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = replace(demo.FULL, teacher_steps=2, student_steps=4, batch_size=2, seq_len=64, problems=300,
               eval_problems=6)


@pytest.fixture(scope="module")
def teaching():
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("bench_teaching", BENCHMARKS / "teaching.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(BENCHMARKS))


def test_the_plan_spends_the_logit_runs_budget(teaching):
    p = teaching.plan(demo.FULL)
    f, batch = p["flops"], demo.FULL.batch_size * demo.FULL.seq_len
    assert p["steps"]["logit"] == demo.FULL.student_steps
    assert p["budget"] == pytest.approx(320 * batch * (f["student_train"] + f["teacher_forward"]))
    assert p["steps"]["scratch"] * batch * f["student_train"] == pytest.approx(p["budget"], rel=0.01)
    assert 0 < p["warm_start"] < 1 and p["synth_prompts"] > 1000


@pytest.fixture(scope="module")
def teacher(teaching, tmp_path_factory):
    return teaching.ensure_teacher(0, tmp_path_factory.mktemp("work"), None, TINY)


@pytest.mark.parametrize("method", ["sequence", "on_policy", "logit+on_policy"])
def test_one_tiny_run_per_method(teaching, teacher, tmp_path, monkeypatch, method):
    monkeypatch.setattr(teaching, "SYNTH_KEEP", "all")  # a 2-step teacher solves nothing: train on all it wrote
    monkeypatch.setattr(teaching, "ROLLOUT_ROWS", 4)
    rec = teaching.run_one(method, 0, teacher, tmp_path / method, recipe=TINY, eval_problems=6)
    assert rec["method"] == method and 0 <= rec["accuracy"] <= 1 and rec["heldout_loss"] > 0
    assert rec["flops_total"] > 0 and rec["budget_share"] > 0 and rec["seconds"]["training_run"] > 0
    if method == "sequence":
        assert rec["flops"]["teacher_generation"] > 0 and rec["seconds"]["synthesis"] > 0
    else:
        assert rec["flops"]["student_generation"] > 0 and rec["seconds"]["rollout_gen"] > 0
    summary = teaching.summarize([rec])
    assert method in teaching.table(summary)
