"""The demo: teacher -> distilled student vs scratch student, report.json + report.html."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from behemoth.demo import Recipe, VisionRecipe, format_table, run_demo

TINY = Recipe(teacher_steps=3, student_steps=3, batch_size=2, seq_len=64, teacher_lr=3e-3, student_lr=3e-3,
              problems=200, eval_problems=7, alpha=0.7, temperature=1.0)
TINY_VISION = VisionRecipe(steps=2, batch_size=4, seq_len=80, lr=1e-3, problems=60, eval_problems=9)


def test_demo_pipeline_and_report(tmp_path):
    lines = []
    report = run_demo(tmp_path / "d", recipe=TINY, say=lines.append)
    saved = json.loads((tmp_path / "d" / "report.json").read_text())
    assert saved["gap_recovered"] == report["gap_recovered"]
    models = report["models"]
    assert set(models) == {"teacher", "distilled", "scratch"}
    assert models["teacher"]["active_params"] > 3 * models["distilled"]["active_params"]
    assert models["distilled"]["params"] == models["scratch"]["params"]
    assert models["distilled"]["train_tokens"] == models["scratch"]["train_tokens"]  # the same tokens
    acc = {k: v["tasks"]["overall"] for k, v in models.items()}
    g = report["gap_recovered"]["accuracy"]
    if acc["teacher"] != acc["scratch"]:
        assert g == pytest.approx((acc["distilled"] - acc["scratch"]) / (acc["teacher"] - acc["scratch"]))
    html = (tmp_path / "d" / "report.html").read_text()
    assert "Gap recovered" in html and html.count("data:image/png;base64") >= 2
    assert any("gap recovered by distillation" in line for line in lines)
    assert "vision" not in report and "Learning from pictures" not in html


def test_demo_vision_part(tmp_path):
    """`--vision`: mini-maverick-vl trained on the visual tasks, its held-out accuracy beside the baseline."""
    lines = []
    report = run_demo(tmp_path / "d", recipe=TINY, vision=True, vision_recipe=TINY_VISION, say=lines.append)
    v = json.loads((tmp_path / "d" / "report.json").read_text())["vision"]
    assert v == report["vision"]
    assert v["accuracy"]["n"] == 9 and set(v["accuracy"]["per_task"]) == {"count", "digit", "bigger"}
    assert set(v["majority_baseline"]["per_task"]) == {"count", "digit", "bigger"}
    assert v["params"] == 6_324_864 and v["recipe"]["steps"] == 2
    assert (tmp_path / "d" / "vision" / v["accuracy"]["samples"][0]["image"]).is_file()
    html = (tmp_path / "d" / "report.html").read_text()
    assert "Learning from pictures" in html and html.count("data:image/png;base64") >= 5  # chart + pictures
    table = format_table(report)
    assert f"held-out accuracy {v['accuracy']['overall']:.1%}" in table and "majority-answer baseline" in table


def test_demo_does_not_overwrite_without_force(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="not empty"):
        run_demo(out, recipe=TINY, say=lambda s: None)
    with pytest.raises(ValueError, match="not a demo directory"):
        run_demo(out, recipe=TINY, say=lambda s: None, force=True)
    assert (out / "mine.txt").read_text() == "keep"


@pytest.mark.slow
def test_demo_quick_cli(tmp_path):
    """`behemoth demo --quick` as a user runs it (about a minute on 2 cores)."""
    r = subprocess.run([sys.executable, "-m", "behemoth", "demo", "--quick", "--out", str(tmp_path / "q")],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "108,641,793,536" in r.stdout and "gap recovered" in r.stdout
    assert (tmp_path / "q" / "report.html").is_file()
