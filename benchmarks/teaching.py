"""Teaching a student five ways at equal FLOPs: scratch, logit, sequence-level and on-policy distillation.

The demo's teacher (mini-behemoth, 500 steps) and student (mini-maverick) on the three tasks the demo had when the
table was measured (`TASKS`: units, mul, count), seeds 0..N-1:

    scratch           the student alone, next-token loss on the tasks' training problems
    logit             logit distillation as the demo did it then (alpha 0.7, forward KL): the budget's reference
    sequence          the teacher writes solutions of training prompts (`behemoth synthesize`, temperature 1,
                      keep verified: the exact checker), the student trains on them with the prompts masked
    on_policy         distill.on_policy = 1: rollouts of `ROLLOUT_ROWS` task prompts, the student's own
                      completions graded by the teacher at every token (reverse KL)
    logit+on_policy   half the budget logit distillation, then on-policy (distill.on_policy_start)

Equal cost is equal model FLOPs, counted from the work each run did (`ModelConfig.train_flops_per_token`, the
one the trainer's MFU uses; a forward is a third of it): a trained position is the student's forward and
backward, a teacher-scored position the teacher's forward, a generated position (prefill or decode, of every row
until the batch's longest stops) one forward of the generating model. The budget is the logit run's (its
student's training and its teacher's forwards); the others get the steps that spend the same, planned from the
tasks' prompt and solution lengths, and the table reports what each actually spent. `sequence` spends
`SYNTH_SHARE` of the budget on the teacher's writing. Wall-clock seconds are measured too, per phase (on a CPU
generation costs far more time per FLOP than training: both are reported).

Each run is a subprocess appending its record to `results/teaching_runs.jsonl` (a recorded run is not repeated);
`results/teaching_cpu.json` holds the summary over seeds. Accuracy is exact match on the demo's held-out
problems with its 95% interval, held-out loss is the student's on their solutions.

    .venv/bin/python benchmarks/teaching.py --seeds 0,1,2 --jobs 2
    .venv/bin/python benchmarks/teaching.py --teachers 'out/demo/seed_{seed}/teacher' ...   # reuse teachers
    .venv/bin/python benchmarks/teaching.py --table
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

from grid import record, recorded, report, run_pool

RESULTS = Path(__file__).parent / "results"
RUNS_FILE = RESULTS / "teaching_runs.jsonl"
METHODS = ("scratch", "logit", "sequence", "on_policy", "logit+on_policy")
ROLLOUT_ROWS = 48  # prompts per on-policy step: ~2k positions, the size of a logit step's batch
ROLLOUT_TOKENS = 48  # the most tokens a rollout completion has (the tasks' solutions take 20-40)
SYNTH_SHARE = 0.5  # of the budget, what the teacher's writing costs in `sequence`
TASKS = ("units", "mul", "count")  # the tasks the table was measured on (`_demo_recipe`)
SYNTH_KEEP = "verified"  # which of its samples `sequence` trains on (rejection sampling by the exact checker)


def flops_per_position(recipe) -> dict[str, float]:
    """Model FLOPs per position: the student's training (forward and backward), a forward of each model."""
    from behemoth.config import PRESETS

    student = PRESETS["mini-maverick"].replace(vocab_size=64).train_flops_per_token(recipe.seq_len)
    teacher = PRESETS["mini-behemoth"].replace(vocab_size=64).train_flops_per_token(recipe.seq_len)
    return {"student_train": student, "student_forward": student / 3, "teacher_forward": teacher / 3}


def task_lengths(recipe) -> tuple[float, float, float]:
    """Mean prompt and solution length (characters = tokens) of the tasks' training problems, and the mean over
    rollouts of `ROLLOUT_ROWS` prompts of the longest one (what a rollout's rows are padded to)."""
    import random

    from behemoth.data.tasks import make_problems

    problems = make_problems("train", 2000, seed=0, tasks=recipe.tasks)
    prompts = [len(p.prompt) for p in problems]
    rng = random.Random(0)
    longest = sum(max(rng.choices(prompts, k=ROLLOUT_ROWS)) for _ in range(200)) / 200
    return sum(prompts) / len(prompts), sum(len(p.solution) for p in problems) / len(problems), longest


def plan(recipe, steps_scale: float = 1.0) -> dict:
    """The budget and each method's planned work: steps (and synthesized prompts), from the logit run's cost."""
    f = flops_per_position(recipe)
    batch = recipe.batch_size * recipe.seq_len
    logit_steps = max(1, round(recipe.student_steps * steps_scale))
    budget = logit_steps * batch * (f["student_train"] + f["teacher_forward"])
    prompt, solution, longest = task_lengths(recipe)
    row = prompt + solution + 1  # + EOS
    # a rollout's rows are padded to its longest prompt plus its longest completion (a student early in training, or
    # one of 48, writes up to ROLLOUT_TOKENS), and the generator runs every row that long
    padded = longest + ROLLOUT_TOKENS
    rollout = ROLLOUT_ROWS * padded * (f["student_forward"] + f["teacher_forward"] + f["student_train"])
    synth_prompts = max(1, int(SYNTH_SHARE * budget / (row * f["teacher_forward"])))
    half = max(1, logit_steps // 2)
    warm_rollouts = max(1, round((budget - half * batch * (f["student_train"] + f["teacher_forward"])) / rollout))
    return {"budget": budget, "flops": f, "row_tokens": row, "rollout_row_positions": padded,
            "steps": {"scratch": max(1, round(budget / (batch * f["student_train"]))), "logit": logit_steps,
                      "sequence": max(1, round((1 - SYNTH_SHARE) * budget / (batch * f["student_train"]))),
                      "on_policy": max(1, round(budget / rollout)), "logit+on_policy": half + warm_rollouts},
            "warm_start": half / (half + warm_rollouts), "synth_prompts": synth_prompts}


def ensure_teacher(seed: int, work: Path, pattern: str | None, recipe) -> Path:
    """The demo's teacher of `seed`: `pattern` (with {seed}) when given, else trained into `work` once."""
    from behemoth import demo
    from behemoth.checkpoint.locate import latest_checkpoint
    from behemoth.train.config import build_config
    from behemoth.train.run import run_training

    if pattern:
        return latest_checkpoint(Path(pattern.format(seed=seed)))
    out = work / f"teacher_s{seed}"
    if not (out / "checkpoints" / "latest").is_file():
        over = {**demo.recipe_config("teacher", out, recipe), "train.seed": seed, "log.plots": False}
        run_training(build_config(updates=over), mode="pretrain", say=lambda line: None)
    return latest_checkpoint(out)


def run_one(method: str, seed: int, teacher: Path, out: Path, recipe=None, eval_problems: int | None = None,
            steps_scale: float = 1.0) -> dict:
    """Teach the student by `method` into `out`; its cost (FLOPs and seconds per phase) and quality."""
    import shutil

    recipe = recipe or _demo_recipe()
    p = plan(recipe, steps_scale)
    if out.exists():  # an unrecorded run is an interrupted one: start it again
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cost, seconds = _teach(method, seed, teacher, out, recipe, p)
    return {"method": method, "seed": seed, "teacher": str(teacher), "steps": p["steps"][method],
            "budget_flops": p["budget"], "flops": cost, "flops_total": sum(cost.values()),
            "budget_share": sum(cost.values()) / p["budget"], "seconds": seconds,
            **_quality(out / "student", teacher, recipe, eval_problems)}


def _teach(method: str, seed: int, teacher: Path, out: Path, recipe, p: dict) -> tuple[dict, dict]:
    from behemoth import demo
    from behemoth.runlog import read_metrics
    from behemoth.train.config import build_config
    from behemoth.train.run import run_training

    f, batch = p["flops"], recipe.batch_size * recipe.seq_len
    steps = p["steps"][method]
    over = {**demo.recipe_config("student", out / "student", recipe), "train.seed": seed, "train.steps": steps,
            "optim.warmup_steps": max(1, steps // 20), "data.tokenizer": str(teacher / "tokenizer.json"),
            "log.plots": False, "log.every": 1}
    cost, seconds = {}, {}
    if method == "sequence":
        data, seconds["synthesis"], cost["teacher_generation"] = _synthesize(seed, teacher, out, recipe, p)
        over.update({"data.path": str(data), "data.val_fraction": 0.02})
    elif method != "scratch":
        over.update({"distill.teacher": str(teacher), "distill.alpha": recipe.alpha,
                     "distill.temperature": recipe.temperature})
    if method in ("on_policy", "logit+on_policy"):
        over.update({"distill.on_policy": 1.0, "distill.on_policy_rows": ROLLOUT_ROWS,
                     "distill.on_policy_tokens": ROLLOUT_TOKENS,
                     "distill.on_policy_start": p["warm_start"] if method == "logit+on_policy" else 0.0})
    t0 = time.perf_counter()
    run_training(build_config(updates=over), mode="pretrain" if method in ("scratch", "sequence") else "distill",
                 say=lambda line: None)
    seconds["training_run"] = time.perf_counter() - t0
    train = [r for r in read_metrics(out / "student") if r.get("type") == "train"]
    rollouts = [r for r in train if r.get("on_policy")]
    plain = len(train) - len(rollouts)
    cost["student_training"] = plain * batch * f["student_train"]
    if method != "scratch" and method != "sequence":
        cost["teacher_scoring"] = plain * batch * f["teacher_forward"]
    if rollouts:
        positions = sum(r["rollout_positions"] for r in rollouts)
        cost["student_generation"] = sum(r["gen_positions"] for r in rollouts) * f["student_forward"]
        cost["teacher_scoring"] += positions * f["teacher_forward"]
        cost["student_training"] += positions * f["student_train"]
        for k in ("gen_s", "score_s", "train_s"):
            seconds[f"rollout_{k[:-2]}"] = sum(r[k] for r in rollouts)
    return cost, seconds


def _synthesize(seed: int, teacher: Path, out: Path, recipe, p: dict) -> tuple[Path, float, float]:
    """The teacher's verified solutions of `p["synth_prompts"]` training prompts; (directory, seconds, FLOPs)."""
    from behemoth.data.prompts import load_prompts
    from behemoth.inference.synthesize import Settings, synthesize

    settings = Settings(max_tokens=ROLLOUT_TOKENS, temperature=1.0, seed=seed, verify="task", keep=SYNTH_KEEP,
                        shard_size=512, batch_size=64)
    prompts, source = load_prompts(None, tasks=recipe.tasks, num_prompts=p["synth_prompts"], seed=seed + 1000)
    t0 = time.perf_counter()
    m = synthesize(str(teacher), out / "data", prompts, source, settings, say=lambda line: None)
    computed = m["counts"]["tokens"]["computed"]  # prefills padded, every decode slot of every step
    return out / "data", time.perf_counter() - t0, computed * p["flops"]["teacher_forward"]


def _quality(run_dir: Path, teacher: Path, recipe, eval_problems: int | None) -> dict:
    from behemoth.checkpoint.locate import latest_checkpoint
    from behemoth.eval import evaluate_model

    ckpt = latest_checkpoint(run_dir)
    problems = eval_problems or recipe.eval_problems
    ev = evaluate_model(str(ckpt), str(teacher), problems=problems, seq_len=recipe.seq_len, max_new_tokens=40,
                        tasks=recipe.tasks)
    t = ev["tasks"]
    return {"accuracy": t["overall"], "interval": t["interval"], "per_task": t["per_task"], "n": t["n"],
            "heldout_loss": solution_loss(ckpt, recipe, problems), "document_loss": ev["heldout"]["loss"],
            "teacher_kl": ev["teacher_kl"]["kl"]}


def solution_loss(ckpt: Path, recipe, problems: int) -> float:
    """The student's loss on the held-out problems' solutions given their questions (the prompts masked): what
    every method trains its student to write. (`eval`'s held-out loss covers the questions too, which a student
    trained on prompt-masked data never learnt to predict.)"""
    from behemoth.checkpoint.model_dir import load_model
    from behemoth.data.corpus import Prompted
    from behemoth.data.packing import build_in_memory
    from behemoth.data.tasks import distinct_problems
    from behemoth.data.tokenizer import Tokenizer
    from behemoth.eval.metrics import heldout_loss

    test = distinct_problems("test", problems, seed=0, tasks=recipe.tasks)
    store = build_in_memory([Prompted(p.prompt, p.solution) for p in test], Tokenizer.load(ckpt))
    return heldout_loss(load_model(ckpt), store, min(recipe.seq_len, store.num_tokens - 1), max_batches=None)["loss"]


def refresh(runs: list[dict], work: Path) -> list[dict]:
    """The recorded runs with their held-out losses measured again from their run directories (where these still
    exist): a change to how quality is summarised needs no retraining."""
    from behemoth.checkpoint.locate import latest_checkpoint

    out = []
    for r in runs:
        run_dir = work / f"{r['method']}_s{r['seed']}" / "student"
        if (run_dir / "checkpoints").is_dir():
            r = {**r, "document_loss": r.get("document_loss", r["heldout_loss"]),
                 "heldout_loss": solution_loss(latest_checkpoint(run_dir), _demo_recipe(), r["n"])}
        out.append(r)
    RUNS_FILE.write_text("".join(json.dumps(r) + "\n" for r in out))
    return out


# ---- the grid, the summary, the table ----------------------------------------------------------------

def run_grid(methods: list[str], seeds: list[int], jobs: int, work: Path, teachers: str | None) -> int:
    """Every (method, seed) not yet recorded, `jobs` subprocesses at a time; the number that failed. Teachers are
    trained first (in this process), so that no two runs make the same one."""
    done = {(r["method"], r["seed"]) for r in recorded(RUNS_FILE)}
    todo = [(m, s) for s in seeds for m in methods if (m, s) not in done]
    for s in sorted({s for _, s in todo}):
        print(f"teacher of seed {s}: {ensure_teacher(s, work, teachers, _demo_recipe())}", flush=True)
    threads = max(1, (os.cpu_count() or 1) // jobs)

    def command(key: tuple) -> list[str]:
        cmd = [sys.executable, __file__, "--one", key[0], str(key[1]), "--work", str(work), "--threads", str(threads)]
        return cmd + (["--teachers", teachers] if teachers else [])

    return run_pool(todo, command, jobs)


def summarize(runs: list[dict]) -> dict:
    """Per method: mean, sample std, min and max over seeds of quality and cost, and the mean cost breakdown."""
    from behemoth.eval.seeds import spread

    out: dict = {}
    for m in METHODS:
        rs = [r for r in runs if r["method"] == m]
        if not rs:
            continue
        cell = {"seeds": sorted(r["seed"] for r in rs), "steps": rs[0]["steps"]}
        for k in ("accuracy", "heldout_loss", "teacher_kl", "budget_share"):
            cell[k] = {f: v for f, v in spread([r[k] for r in rs]).items() if f in ("mean", "std", "min", "max")}
        cell["flops"] = {k: sum(r["flops"].get(k, 0.0) for r in rs) / len(rs)
                         for k in sorted({k for r in rs for k in r["flops"]})}
        cell["seconds"] = {k: sum(r["seconds"].get(k, 0.0) for r in rs) / len(rs)
                           for k in sorted({k for r in rs for k in r["seconds"]})}
        out[m] = cell
    return out


def table(summary: dict) -> str:
    rows = ["| method | seeds | steps | FLOPs (of budget) | wall s (of which generating) | held-out loss | "
            "exact match |", "|---|---:|---:|---:|---:|---:|---:|"]
    def pm(v: dict, fmt: str, scale: float = 1.0) -> str:  # one seed: no spread
        spread = "" if v["std"] is None else f" ± {v['std'] * scale:{fmt}}"
        return f"{v['mean'] * scale:{fmt}}{spread}"

    for m, c in summary.items():
        gen = c["seconds"].get("synthesis", 0.0) + c["seconds"].get("rollout_gen", 0.0)
        wall = c["seconds"].get("training_run", 0.0) + c["seconds"].get("synthesis", 0.0)
        rows.append(f"| {m} | {len(c['seeds'])} | {c['steps']} | {pm(c['budget_share'], '.0f', 100)}% | "
                    f"{wall:,.0f} ({gen:,.0f}) | {pm(c['heldout_loss'], '.4f')} | {pm(c['accuracy'], '.1f', 100)}% |")
    return "\n".join(rows)


def write_summary(runs: list[dict]) -> Path:
    import torch
    from common import device_info

    from behemoth.machine import machine_info

    result = {"benchmark": "teaching", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "device": device_info(torch.device("cpu")), "machine": machine_info(),
              "written_by": "python benchmarks/teaching.py " + " ".join(sys.argv[1:]),
              "each_run": "python benchmarks/teaching.py --one METHOD SEED (what the grid runs)",
              "plan": plan(_demo_recipe()), "summary": summarize(runs), "runs": runs}
    path = RESULTS / "teaching_cpu.json"
    path.write_text(json.dumps(result, indent=2))
    return path


def _demo_recipe():
    """The demo's full recipe as it was when `results/teaching_cpu.json` was measured: three tasks (units, mul,
    count) and alpha 0.7 (the demo has since dropped count and distils with alpha 1), so that this benchmark
    reproduces its table."""
    from dataclasses import replace

    from behemoth import demo

    return replace(demo.FULL, tasks=TASKS, alpha=0.7)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (the CPU threads split between them)")
    p.add_argument("--work", default="out/teaching", help="run directories (and the teachers trained here)")
    p.add_argument("--teachers", help="existing demo teachers, a path with {seed} (a run or checkpoint directory)")
    p.add_argument("--table", action="store_true", help="print the table of the recorded runs")
    p.add_argument("--refresh", action="store_true", help="measure the recorded runs' held-out losses again")
    p.add_argument("--plan", action="store_true", help="print each method's planned steps at equal FLOPs")
    p.add_argument("--one", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.plan:
        print(json.dumps(plan(_demo_recipe()), indent=2))
        return
    if args.one:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        method, seed = args.one[0], int(args.one[1])
        teacher = ensure_teacher(seed, Path(args.work), args.teachers, _demo_recipe())
        record(RUNS_FILE, run_one(method, seed, teacher, Path(args.work) / f"{method}_s{seed}"))
        return
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)} (known: {', '.join(METHODS)})")
    failed = 0 if args.table or args.refresh else run_grid(methods, [int(s) for s in args.seeds.split(",")],
                                                           args.jobs, Path(args.work), args.teachers)
    report(RUNS_FILE, write_summary, lambda runs: table(summarize(runs)), failed,
           (lambda runs: refresh(runs, Path(args.work))) if args.refresh else None)


if __name__ == "__main__":
    main()
