"""The demo: teacher -> distilled student vs scratch student, report.json + report.html."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from behemoth.demo import FULL, VISION_FULL, Recipe, VisionRecipe, format_paired, format_table, recipe_config, run_demo
from behemoth.eval.metrics import format_accuracy, wilson_interval

TINY = Recipe(teacher_steps=3, student_steps=3, batch_size=2, seq_len=64, teacher_lr=3e-3, student_lr=3e-3,
              problems=200, eval_problems=7, alpha=0.7, temperature=1.0)
TINY_VISION = VisionRecipe(steps=2, batch_size=4, seq_len=80, lr=1e-3, problems=60, eval_problems=9,
                           selection_noise=0.3)


def recovered(score: dict) -> float | None:
    """(distilled - scratch) / (teacher - scratch); undefined (None) when teacher and scratch score the same."""
    t, d, s = score["teacher"], score["distilled"], score["scratch"]
    return None if t == s else (d - s) / (t - s)


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
    loss = {k: v["heldout"]["loss"] for k, v in models.items()}
    expected = {"accuracy": recovered(acc), "heldout_loss": recovered(loss)}
    assert report["gap_recovered"] == expected and saved["gap_recovered"] == expected
    assert report["story_holds"] == {"teacher_ahead": acc["teacher"] > max(acc["distilled"], acc["scratch"]),
                                     "distilled_ahead_of_scratch": acc["distilled"] > acc["scratch"]}
    shown = {k: "n/a" if v is None else f"{v:.0%}" for k, v in expected.items()}
    line = f"gap recovered by distillation: accuracy {shown['accuracy']}, held-out loss {shown['heldout_loss']}"
    assert line in lines and line in format_table(report).splitlines()
    paired = saved["distilled_vs_scratch"]  # the two students on the same problems
    right = {k: models[k]["tasks"]["correct"] for k in ("distilled", "scratch")}
    assert len(right["distilled"]) == len(right["scratch"]) == paired["n"] == models["scratch"]["tasks"]["n"]
    assert paired["difference"] == pytest.approx(acc["distilled"] - acc["scratch"])
    assert paired["a_only"] == sum(d and not s for d, s in zip(right["distilled"], right["scratch"], strict=True))
    assert format_paired(paired) in format_table(report).splitlines()
    assert f"alone was right on {paired['a_only']}, the scratch student alone on {paired['b_only']}" in (
        tmp_path / "d" / "report.html").read_text()
    html = (tmp_path / "d" / "report.html").read_text()
    assert f"accuracy: {shown['accuracy']}, heldout loss: {shown['heldout_loss']}." in html
    assert html.count("data:image/png;base64") >= 2
    assert "vision" not in report and "Learning from pictures" not in html
    drafts = saved["drafts"]  # each student as the teacher's speculative draft
    assert set(drafts) == {"distilled", "scratch"}
    for d in drafts.values():
        assert d["drafted"] > 0 and 0 <= d["accepted"] <= d["drafted"]
        assert d["acceptance"] == pytest.approx(d["accepted"] / d["drafted"])
        assert 1 <= d["tokens_per_step"] <= d["k"] + 1
        assert f"{d['acceptance']:.1%}" in html and f"{d['acceptance']:.0%} of drafts accepted" in format_table(report)
    for ev in saved["models"].values():  # every accuracy with its 95% interval, in the JSON, table and page
        assert_intervals(ev["tasks"])
    for ev in models.values():  # bits per byte beside the loss (the tasks are ASCII: one byte per token)
        h = ev["heldout"]
        assert h["bits_per_byte"] == pytest.approx(h["loss"] * h["tokens"] / h["bytes"] / math.log(2))
        assert f"{h['bits_per_byte']:.4f}" in html and f"{h['bits_per_byte']:.4f}" in format_table(report)
        shown_acc = format_accuracy(ev["tasks"]["overall"], ev["tasks"]["interval"])
        assert shown_acc in format_table(report) and shown_acc in html
    assert saved["seed"] == 0 and not (tmp_path / "d" / "seed_0").exists()  # one seed: today's layout
    for ev in models.values():  # each model's card carries the demo's evaluation, with its interval
        card = (Path(ev["model"]) / "README.md").read_text()
        lo, hi = ev["tasks"]["interval"]
        assert (f"| exact match | behemoth built-in tasks (held-out problems) | {ev['tasks']['overall']:.4f} | "
                f"[{lo:.4f}, {hi:.4f}] | {ev['tasks']['n']} | behemoth demo (seed 0) |") in card


def assert_intervals(acc: dict) -> None:
    """`interval` and `per_task_interval` are the Wilson intervals of the counts behind the shares."""
    n, per_n = acc["n"], acc["per_task_n"]
    assert set(per_n) == set(acc["per_task"]) == set(acc["per_task_interval"]) and sum(per_n.values()) == n
    assert acc["interval"] == pytest.approx(wilson_interval(round(acc["overall"] * n), n), abs=1e-12)
    for t, share in acc["per_task"].items():
        assert acc["per_task_interval"][t] == pytest.approx(wilson_interval(round(share * per_n[t]), per_n[t]),
                                                            abs=1e-12)


def table_report(acc: dict, loss: dict) -> dict:
    models = {name: {"params": 1000, "active_params": 500, "tokens_per_s": 2.0, "tasks": {"overall": acc[name]},
                     "heldout": {"loss": loss[name], "ppl": 3.0}} for name in ("teacher", "distilled", "scratch")}
    return {"models": models, "gap_recovered": {"accuracy": recovered(acc), "heldout_loss": recovered(loss)},
            "story_holds": {"teacher_ahead": acc["teacher"] > max(acc["distilled"], acc["scratch"]),
                            "distilled_ahead_of_scratch": acc["distilled"] > acc["scratch"]}}


def test_table_prints_the_gap_and_na_when_teacher_equals_scratch():
    """Both forms of the gap line, whatever a tiny training run happens to produce."""
    report = table_report(acc={"teacher": 0.8, "distilled": 0.5, "scratch": 0.2},
                          loss={"teacher": 1.0, "distilled": 1.5, "scratch": 3.0})
    assert report["gap_recovered"] == {"accuracy": pytest.approx(0.5), "heldout_loss": 0.75}
    lines = format_table(report).splitlines()
    assert "gap recovered by distillation: accuracy 50%, held-out loss 75%" in lines
    assert not any(line.startswith("note:") for line in lines)
    report = table_report(acc={"teacher": 0.0, "distilled": 0.0, "scratch": 0.0},
                          loss={"teacher": 2.0, "distilled": 2.5, "scratch": 2.0})
    assert report["gap_recovered"] == {"accuracy": None, "heldout_loss": None}
    lines = format_table(report).splitlines()
    assert "gap recovered by distillation: accuracy n/a, held-out loss n/a" in lines
    assert ("note: in this run the teacher is not ahead of both students; the distilled student is not ahead of "
            "the scratch student") in lines


def test_selection_noise_only_in_the_vision_recipe(tmp_path):
    """The multimodal run selects experts with the vision recipe's noise; the text runs with the default (none)."""
    assert recipe_config("vision", tmp_path)["router.selection_noise"] == VISION_FULL.selection_noise > 0
    assert all("router.selection_noise" not in recipe_config(run, tmp_path, FULL) for run in ("teacher", "student"))


def test_demo_vision_part(tmp_path):
    """`--vision`: mini-maverick-vl trained on the visual tasks, its held-out accuracy beside the baseline."""
    lines = []
    report = run_demo(tmp_path / "d", recipe=TINY, vision=True, vision_recipe=TINY_VISION, say=lines.append)
    v = json.loads((tmp_path / "d" / "report.json").read_text())["vision"]
    assert v == report["vision"]
    assert v["accuracy"]["n"] == 9 and set(v["accuracy"]["per_task"]) == {"count", "digit", "bigger"}
    assert set(v["majority_baseline"]["per_task"]) == {"count", "digit", "bigger"}
    assert_intervals(v["accuracy"])
    assert_intervals(v["majority_baseline"])
    assert v["params"] == 6_324_864 and v["recipe"]["steps"] == 2
    trained = json.loads((tmp_path / "d" / "vision" / "train_config.json").read_text())
    assert trained["router"]["selection_noise"] == 0.3  # the recipe's noise reached the run
    assert (tmp_path / "d" / "vision" / v["accuracy"]["samples"][0]["image"]).is_file()
    card = (Path(v["model"]) / "README.md").read_text()
    row = f"| exact match | behemoth built-in visual tasks (held-out pictures) | {v['accuracy']['overall']:.4f} |"
    assert row in card
    html = (tmp_path / "d" / "report.html").read_text()
    assert "Learning from pictures" in html and html.count("data:image/png;base64") >= 5  # chart + pictures
    table = format_table(report)
    assert f"held-out accuracy {v['accuracy']['overall']:.1%}" in table and "majority-answer baseline" in table
    assert format_accuracy(v["majority_baseline"]["overall"], v["majority_baseline"]["interval"]) in table


def test_demo_over_two_seeds(tmp_path):
    """`--seeds 2`: the story per seed into seed_K/, the same held-out problems, and an aggregate whose
    spreads are computed from the per-seed figures; `--results` adds the machine."""
    lines = []
    report = run_demo(tmp_path / "d", recipe=TINY, seeds=2, results=tmp_path / "r.json", say=lines.append)
    saved = json.loads((tmp_path / "d" / "report.json").read_text())
    assert saved == json.loads(json.dumps(report)) and saved["seeds"] == 2
    seeds = saved["per_seed"]
    assert [r["seed"] for r in seeds] == [0, 1] and not (tmp_path / "d" / "teacher").exists()
    for k, r in enumerate(seeds):
        assert json.loads((tmp_path / "d" / f"seed_{k}" / "report.json").read_text()) == r
        assert (tmp_path / "d" / f"seed_{k}" / "report.html").is_file()
        assert (tmp_path / "d" / f"seed_{k}" / "student_distilled").is_dir()
    prompts = [[s["prompt"] for s in r["models"]["teacher"]["tasks"]["samples"]] for r in seeds]
    assert prompts[0] == prompts[1]  # the same held-out problems ...
    losses = [r["models"]["teacher"]["heldout"]["loss"] for r in seeds]
    assert losses[0] != losses[1]  # ... and different training
    agg = saved["aggregate"]
    assert agg["seeds"] == [0, 1]
    for name in ("teacher", "distilled", "scratch"):
        for key, values in (("accuracy", [r["models"][name]["tasks"]["overall"] for r in seeds]),
                            ("heldout_loss", [r["models"][name]["heldout"]["loss"] for r in seeds])):
            s = agg["models"][name][key]
            assert s["values"] == values and s["mean"] == pytest.approx(statistics.fmean(values))
            assert s["std"] == pytest.approx(statistics.stdev(values)) and (s["min"], s["max"]) == (min(values),
                                                                                                    max(values))
    assert agg["models"]["scratch"]["teacher_kl"]["values"] == [r["models"]["scratch"]["teacher_kl"]["kl"]
                                                                for r in seeds]
    for key in ("accuracy", "heldout_loss"):
        assert agg["gap_recovered"][key]["values"] == [r["gap_recovered"][key] for r in seeds]
    held = [r["story_holds"]["teacher_ahead"] and r["story_holds"]["distilled_ahead_of_scratch"] for r in seeds]
    assert agg["ordering_held"]["accuracy"] == {"per_seed": held, "every_seed": all(held)}
    assert "over 2 seeds (0, 1): mean ± sample std [min, max]" in lines
    assert any(line.startswith("[seed 1] ") for line in lines)
    html = (tmp_path / "d" / "report.html").read_text()
    assert "href='seed_0/report.html'" in html and "href='seed_1/report.html'" in html
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["aggregate"] == agg and [s["seed"] for s in results["per_seed"]] == [0, 1]
    assert {"platform", "cpu_count", "torch", "behemoth"} <= set(results["machine"]) and results["date"]
    with pytest.raises(ValueError, match="not empty"):
        run_demo(tmp_path / "d", recipe=TINY, seeds=2, say=lines.append)


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
    """`behemoth demo --quick` as a user runs it (about two minutes on 2 cores)."""
    r = subprocess.run([sys.executable, "-m", "behemoth", "demo", "--quick", "--out", str(tmp_path / "q")],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "108,641,793,536" in r.stdout and "gap recovered" in r.stdout
    assert (tmp_path / "q" / "report.html").is_file()
