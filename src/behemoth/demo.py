"""`behemoth demo`: the whole story on a CPU, measured.

1. Train the `mini-behemoth` teacher (16 experts + shared, MoE in every layer) on the built-in STEM tasks.
2. Distil the `mini-maverick` student (32 small experts, MoE every other layer) from it.
3. Train the same student from scratch on the same tokens (same data, seed, steps and batches).
4. Evaluate all three on held-out problems: loss, perplexity, KL to the teacher, exact-match accuracy.
5. With `--vision`: train `mini-maverick-vl` (mini-maverick with a small vision tower) on the built-in
   visual tasks and measure its accuracy on held-out pictures against the majority-answer baseline.
6. Write report.json and a self-contained report.html, and print the table.

The presets keep their shapes; the vocabulary is cut to the character tokenizer's size (64), since
the built-in tasks use 54 characters. Every figure is measured in this run; nothing is tuned to it.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from behemoth.checkpoint.locate import latest_checkpoint
from behemoth.checkpoint.model_dir import load_model
from behemoth.config import PRESETS
from behemoth.data.tokenizer import Tokenizer
from behemoth.data.vision_tasks import make_visual_problems
from behemoth.eval import evaluate_model
from behemoth.eval.metrics import majority_baseline, visual_task_accuracy
from behemoth.eval.report import write_html
from behemoth.train.config import build_config
from behemoth.train.run import run_training


@dataclass(frozen=True)
class Recipe:
    teacher_steps: int
    student_steps: int
    batch_size: int
    seq_len: int
    teacher_lr: float
    student_lr: float
    problems: int  # training problems generated
    eval_problems: int  # held-out problems per model
    alpha: float  # weight of the soft loss
    temperature: float


FULL = Recipe(teacher_steps=400, student_steps=320, batch_size=16, seq_len=128, teacher_lr=2e-3, student_lr=3e-3,
              problems=40000, eval_problems=105, alpha=0.7, temperature=1.0)
QUICK = Recipe(teacher_steps=60, student_steps=60, batch_size=8, seq_len=128, teacher_lr=3e-3, student_lr=4e-3,
               problems=4000, eval_problems=56, alpha=0.7, temperature=1.0)


@dataclass(frozen=True)
class VisionRecipe:
    steps: int
    batch_size: int
    seq_len: int  # one picture (16 tokens) + question + answer per row
    lr: float
    problems: int  # training pictures
    eval_problems: int  # held-out pictures


VISION_FULL = VisionRecipe(steps=1200, batch_size=32, seq_len=80, lr=1e-3, problems=6000, eval_problems=300)
VISION_QUICK = VisionRecipe(steps=60, batch_size=16, seq_len=80, lr=1e-3, problems=1000, eval_problems=60)


def _common(r: Recipe, steps: int, lr: float, out: Path) -> dict:
    return {"data.num_problems": r.problems, "data.seq_len": r.seq_len, "train.batch_size": r.batch_size,
            "train.steps": steps, "optim.lr": lr, "optim.warmup_steps": max(1, steps // 20),
            "optim.min_lr_ratio": 0.05, "model.vocab_size": 64, "log.every": max(1, steps // 10),
            "log.health_every": max(1, steps // 6), "log.eval_every": 0, "checkpoint.every": 0,
            "router.bias_update_rate": 0.01, "log.tensorboard": False, "train.out_dir": str(out)}


def _train(name: str, over: dict, mode: str, say) -> tuple[Path, dict, float]:
    cfg = build_config(updates=over)
    t0 = time.perf_counter()
    summary = run_training(cfg, mode=mode, say=lambda line: say(f"[{name}] {line}"))
    return latest_checkpoint(cfg.train.out_dir), summary, time.perf_counter() - t0


def run_demo(out_dir: str | Path, quick: bool = False, say=print, force: bool = False,
             recipe: Recipe | None = None, vision: bool = False, vision_recipe: VisionRecipe | None = None) -> dict:
    """Run the story into `out_dir` and return the report. An earlier demo there is an error, or is
    replaced with `force`. `recipe` overrides the full / quick recipes (tests use a tiny one); `vision`
    adds the multimodal student (`vision_recipe` likewise)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise ValueError(f"{out}: not empty (an earlier demo?); choose another --out or pass --force")
        if not (out / "report.json").exists() and not (out / "teacher").exists():
            raise ValueError(f"{out}: not empty and not a demo directory; refusing to delete it")
        shutil.rmtree(out)
    r = recipe or (QUICK if quick else FULL)
    t_start = time.perf_counter()
    say(f"demo ({'quick' if quick else 'full'}): teacher mini-behemoth, student mini-maverick, built-in tasks; "
        f"{r.teacher_steps} + 2 x {r.student_steps} steps of {r.batch_size} x {r.seq_len} tokens")
    runs = {}
    runs["teacher"] = _train("teacher", {**_common(r, r.teacher_steps, r.teacher_lr, out / "teacher"),
                                         "model.preset": "mini-behemoth"}, "pretrain", say)
    student = {"model.preset": "mini-maverick", "data.tokenizer": str(runs["teacher"][0] / "tokenizer.json")}
    runs["distilled"] = _train("distilled", {
        **_common(r, r.student_steps, r.student_lr, out / "student_distilled"), **student,
        "distill.teacher": str(runs["teacher"][0]), "distill.alpha": r.alpha,
        "distill.temperature": r.temperature}, "distill", say)
    runs["scratch"] = _train("scratch", {**_common(r, r.student_steps, r.student_lr, out / "student_scratch"),
                                         **student}, "pretrain", say)
    say(f"evaluating on {r.eval_problems} held-out problems ...")
    evals = {}
    for name, (ckpt, summary, seconds) in runs.items():
        teacher = str(runs["teacher"][0]) if name != "teacher" else None
        t0 = time.perf_counter()
        ev = evaluate_model(str(ckpt), teacher, problems=r.eval_problems, seq_len=r.seq_len, max_new_tokens=40)
        evals[name] = {**ev, "train_seconds": seconds, "train_tokens": summary["tokens"],
                       "tokens_per_s": summary["tokens"] / max(seconds, 1e-9)}
        say(f"  {name}: accuracy {ev['tasks']['overall']:.1%}, held-out loss {ev['heldout']['loss']:.4f} "
            f"({time.perf_counter() - t0:.0f} s)")
    acc = {k: v["tasks"]["overall"] for k, v in evals.items()}
    loss = {k: v["heldout"]["loss"] for k, v in evals.items()}
    gap = {
        "accuracy": _gap(acc["distilled"], acc["scratch"], acc["teacher"]),
        "heldout_loss": _gap(loss["distilled"], loss["scratch"], loss["teacher"]),
    }
    report = {"recipe": r.__dict__, "quick": quick, "models": evals, "gap_recovered": gap,
              "story_holds": {"teacher_ahead": acc["teacher"] > max(acc["distilled"], acc["scratch"]),
                              "distilled_ahead_of_scratch": acc["distilled"] > acc["scratch"]},
              "wall_seconds": 0.0}
    if vision:
        report["vision"] = run_vision(out / "vision", vision_recipe or (VISION_QUICK if quick else VISION_FULL), say)
    report["wall_seconds"] = time.perf_counter() - t_start
    (out / "report.json").write_text(json.dumps(report, indent=2))
    write_html(report, {name: ckpt.parent.parent for name, (ckpt, _, _) in runs.items()}, out / "report.html",
               vision_dir=out / "vision")
    for line in format_table(report).splitlines():
        say(line)
    say(f"wrote {out / 'report.json'} and {out / 'report.html'} ({report['wall_seconds'] / 60:.1f} min)")
    say(f"talk to them: behemoth chat --model {out / 'student_distilled'}   (or serve --model ...; ask e.g. 47+85=?)")
    return report


def run_vision(out: Path, r: VisionRecipe, say) -> dict:
    """Train `mini-maverick-vl` from scratch on the built-in visual tasks (count, digit, bigger); measure
    exact match on held-out pictures, next to the accuracy of always giving each task's most common
    training answer (what a model blind to the picture can reach). Sample pictures go to `out/samples`."""
    say(f"vision: mini-maverick-vl on the built-in visual tasks, {r.steps} steps of {r.batch_size} pictures")
    # the preset's own vocabulary (a new model would otherwise take the 70-token tokenizer's size)
    over = {"model.preset": "mini-maverick-vl", "model.vocab_size": PRESETS["mini-maverick-vl"].vocab_size,
            "data.images": True, "data.max_tiles": 1,
            "data.num_problems": r.problems, "data.seq_len": r.seq_len, "train.batch_size": r.batch_size,
            "train.steps": r.steps, "optim.lr": r.lr, "optim.warmup_steps": max(1, r.steps // 20),
            "log.every": max(1, r.steps // 10), "log.health_every": max(1, r.steps // 6), "log.eval_every": 0,
            "checkpoint.every": 0, "log.tensorboard": False, "train.out_dir": str(out)}
    ckpt, summary, seconds = _train("vision", over, "pretrain", say)
    model, tok = load_model(ckpt), Tokenizer.load(ckpt)
    test = make_visual_problems("test", r.eval_problems, seed=1)
    acc = visual_task_accuracy(model, tok, test, max_tiles=1, samples=6)
    base = majority_baseline([p.problem for p in make_visual_problems("train", r.problems, seed=0)],
                             [p.problem for p in test])
    (out / "samples").mkdir(exist_ok=True)
    for i, (p, s) in enumerate(zip(test, acc["samples"], strict=False)):
        p.image().save(out / "samples" / f"{i}.png")
        s["image"] = f"samples/{i}.png"
    result = {"recipe": r.__dict__, "params": model.config.num_params(),
              "active_params": model.config.num_active_params(), "train_seconds": seconds,
              "train_tokens": summary["tokens"], "tokens_per_s": summary["tokens"] / max(seconds, 1e-9),
              "accuracy": acc, "majority_baseline": base}
    say(f"  vision: accuracy {acc['overall']:.1%} on {len(test)} held-out pictures "
        f"(majority-answer baseline {base['overall']:.1%})")
    return result


def _gap(distilled: float, scratch: float, teacher: float) -> float | None:
    """(distilled - scratch) / (teacher - scratch): the share of the teacher's lead the student recovered."""
    return None if teacher == scratch else (distilled - scratch) / (teacher - scratch)


def format_table(report: dict) -> str:
    rows = [f"{'model':<11}{'params':>12}{'active':>11}{'tokens/s':>10}{'loss':>8}{'ppl':>7}{'KL':>8}{'accuracy':>10}"]
    for name, ev in report["models"].items():
        kl = f"{ev['teacher_kl']['kl']:.3f}" if "teacher_kl" in ev else "-"
        rows.append(f"{name:<11}{ev['params']:>12,}{ev['active_params']:>11,}{ev['tokens_per_s']:>10,.0f}"
                    f"{ev['heldout']['loss']:>8.4f}{ev['heldout']['ppl']:>7.3f}{kl:>8}{ev['tasks']['overall']:>10.1%}")
    g = report["gap_recovered"]
    fmt = {k: "n/a" if v is None else f"{v:.0%}" for k, v in g.items()}
    rows.append(f"gap recovered by distillation: accuracy {fmt['accuracy']}, held-out loss {fmt['heldout_loss']}")
    s = report["story_holds"]
    if not (s["teacher_ahead"] and s["distilled_ahead_of_scratch"]):
        rows.append("note: in this run " + ("the teacher is not ahead of both students; " if not s["teacher_ahead"]
                                            else "") +
                    ("the distilled student is not ahead of the scratch student" if not s["distilled_ahead_of_scratch"]
                     else ""))
    if "vision" in report:
        v = report["vision"]
        per = ", ".join(f"{t} {a:.0%} (baseline {v['majority_baseline']['per_task'][t]:.0%})"
                        for t, a in sorted(v["accuracy"]["per_task"].items()))
        rows.append(f"vision (mini-maverick-vl, {v['params']:,} params): held-out accuracy "
                    f"{v['accuracy']['overall']:.1%} vs majority-answer baseline "
                    f"{v['majority_baseline']['overall']:.1%}; {per}")
    return "\n".join(rows)
