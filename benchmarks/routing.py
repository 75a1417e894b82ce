"""Routing-balance ablation: each balancing method on the demo's three MoE recipes, over several seeds.

Recipes (the demo's own sizes, lengths and learning rates, `behemoth.demo`; the text ones on `TEXT_TASKS`):
    teacher   mini-behemoth, 16 experts + shared in every layer, the demo's teacher run
    student   mini-maverick, 32 experts every other layer, the demo's scratch-student run
    vision    mini-maverick-vl on the built-in visual tasks, the demo's multimodal run as the table measured it
              (lr 1e-3, no selection noise: `vision_recipe`; the demo's since is a method of it)

Per run, measured at the end: dead experts (summed over layers, last health window), worst max/mean load
over layers (each step's load, averaged over the last window), mean router entropy, mean flip rate and
selection margin (health report), routing warnings after the first 20% of steps, held-out loss and exact-match
accuracy (text: the demo's held-out problems; vision: held-out pictures, with the run's final validation
loss as its held-out loss).

Each run is one subprocess (`--jobs` at a time, the CPU threads split between them) and appends its record
to `results/routing_runs.jsonl` as it finishes; a run already there is not repeated, so an interrupted
ablation continues where it stopped. The summary (mean, sample std, min and max over seeds per method and
recipe) goes to `results/routing_cpu.json` and a plot to `results/routing_cpu.png`; `--table` prints the
README's markdown table.

    .venv/bin/python benchmarks/routing.py --jobs 2                       # every method, recipe, 3 seeds
    .venv/bin/python benchmarks/routing.py --recipes student --seeds 0,1,2 --methods sign-1e-3,proportional
    .venv/bin/python benchmarks/routing.py --table                         # the table from the results
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from grid import record, recorded, report, run_pool

RESULTS = Path(__file__).parent / "results"
RUNS_FILE = RESULTS / "routing_runs.jsonl"

METHODS: dict[str, dict] = {
    # the default: a step proportional to the load error with a gain per expert adapted to the error's sign
    # (router.bias_update=adaptive: gain 0.01 at first, 1e-3 at least, 0.05 at most)
    "adaptive": {},
    # DeepSeek-V3's sign update at its gamma (the default before), and at the demo's old 10x setting
    "sign-1e-3": {"router.bias_update": "sign", "router.bias_update_rate": 1e-3},
    "sign-1e-2": {"router.bias_update": "sign", "router.bias_update_rate": 1e-2},
    # a step proportional to the load error
    "proportional-1e-2": {"router.bias_update": "proportional", "router.bias_update_rate": 0.01},
    "proportional-5e-2": {"router.bias_update": "proportional", "router.bias_update_rate": 0.05},
    # DeepSeek-V3 in full: the sign update plus its complementary sequence-wise balance loss
    "sign-1e-3+seq-loss": {"router.bias_update": "sign", "router.bias_update_rate": 1e-3,
                           "router.seq_balance_loss_coef": 1e-4},
    # the default plus selection noise (router.selection_noise), which splits groups of identical tokens
    "adaptive+noise-0.3": {"router.selection_noise": 0.3},
    # the same at half the vision recipe's learning rate: the demo's multimodal run since (`demo.VISION_FULL`)
    "adaptive+noise-0.3+lr-5e-4": {"router.selection_noise": 0.3, "optim.lr": 5e-4},
    # the default at that learning rate, without the noise
    "adaptive+lr-5e-4": {"optim.lr": 5e-4},
    # no bias, a Switch balance loss over the micro-batch (here: the whole batch)
    "batch-loss-1e-2": {"router.bias_update_rate": 0.0, "router.balance_loss_coef": 1e-2},
}
RECIPES = ("teacher", "student", "vision")
# The text recipes on the three tasks the demo had when the table's teacher rows and `routing_student_current.jsonl`
# were measured (the demo has since dropped count), so that this benchmark reproduces them.
TEXT_TASKS = ("units", "mul", "count")


def text_recipe():
    """The demo's full text recipe on `TEXT_TASKS`."""
    from behemoth import demo

    return replace(demo.FULL, tasks=TEXT_TASKS)


def vision_recipe():
    """The demo's multimodal recipe as the table measured it: lr 1e-3, no selection noise (the demo's run is now
    the method `adaptive+noise-0.3+lr-5e-4` of it)."""
    from behemoth import demo

    return replace(demo.VISION_FULL, lr=1e-3, selection_noise=0.0)


def run_one(method: str, recipe: str, seed: int, out: Path, overrides: dict | None = None,
            eval_problems: int | None = None) -> dict:
    """Train one recipe with one method and seed into `out`; measure routing and quality at the end.
    `overrides` and `eval_problems` shrink the run (tests)."""
    from behemoth import demo
    from behemoth.checkpoint.locate import latest_checkpoint
    from behemoth.eval import evaluate_model
    from behemoth.runlog import read_metrics
    from behemoth.train.config import build_config
    from behemoth.train.run import run_training

    over = {**demo.recipe_config(recipe, out, text_recipe(), vision_recipe()), **METHODS[method], "train.seed": seed,
            "log.plots": False, **(overrides or {})}
    steps = over["train.steps"]
    if out.exists():  # a run not yet recorded is an interrupted one: start it again
        shutil.rmtree(out)
    if recipe == "vision":
        over["log.eval_every"] = steps  # one validation loss, at the end
    t0 = time.perf_counter()
    run_training(build_config(updates=over), mode="pretrain", say=lambda line: None)
    seconds = time.perf_counter() - t0
    ckpt = latest_checkpoint(out)
    if recipe == "vision":
        vr = vision_recipe() if eval_problems is None else replace(vision_recipe(), eval_problems=eval_problems)
        acc = demo.evaluate_vision(ckpt, vr)
        quality = {"accuracy": acc["overall"], "per_task": acc["per_task"],
                   "heldout_loss": [r for r in read_metrics(out) if r.get("type") == "eval"][-1]["val_loss"]}
    else:
        r = text_recipe()
        ev = evaluate_model(str(ckpt), None, problems=eval_problems or r.eval_problems, seq_len=r.seq_len,
                            max_new_tokens=40, tasks=r.tasks)
        quality = {"accuracy": ev["tasks"]["overall"], "per_task": ev["tasks"]["per_task"],
                   "heldout_loss": ev["heldout"]["loss"]}
    return {"method": method, "recipe": recipe, "seed": seed, "steps": steps, "train_seconds": seconds,
            "tasks": None if recipe == "vision" else list(over["data.tasks"]),
            **routing_summary(read_metrics(out), steps), **quality}


def routing_summary(records: list[dict], steps: int) -> dict:
    """`final_routing` with the warnings counted, and the dead experts and worst load at every health window."""
    from behemoth.train.health import final_routing

    end = final_routing(records, steps)
    routing = [r for r in records if r.get("type") == "routing"]
    return {**end, "late_warnings": sum(end["late_warnings"].values()), "late_warning_events": end["late_warnings"],
            "trajectory": [{"step": r["step"], "dead": sum(x["dead"] for x in r["layers"]),
                            "worst": max(x.get("step_max_over_mean", x["max_over_mean"]) for x in r["layers"])}
                           for r in routing]}


def refresh(runs: list[dict], work: Path) -> list[dict]:
    """The recorded runs with their routing figures derived again from their run directories (where these
    still exist), so that a change to how the end of a run is summarised needs no retraining."""
    from behemoth.runlog import read_metrics

    out = []
    for r in runs:
        run_dir = work / f"{r['recipe']}_{r['method']}_s{r['seed']}"
        if (run_dir / "metrics.jsonl").is_file():
            r = {**r, **routing_summary(read_metrics(run_dir), r["steps"])}
        out.append(r)
    RUNS_FILE.write_text("".join(json.dumps(r) + "\n" for r in out))
    return out


def run_grid(methods: list[str], recipes: list[str], seeds: list[int], jobs: int, work: Path,
             threads: int = 0) -> int:
    """Every (method, recipe, seed) not yet in RUNS_FILE, `jobs` subprocesses at a time with `threads` CPU
    threads each (0: the CPUs split between them); the number that failed."""
    done = {(r["method"], r["recipe"], r["seed"]) for r in recorded(RUNS_FILE)}
    todo = [(m, r, s) for r in recipes for s in seeds for m in methods if (m, r, s) not in done]
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    return run_pool(todo, lambda key: [sys.executable, __file__, "--one", *map(str, key), "--work", str(work),
                                       "--threads", str(threads)], jobs)


def summarize(runs: list[dict]) -> dict:
    """Mean, sample std, min and max over seeds of each figure, per method and recipe."""
    from behemoth.eval.seeds import spread

    keys = ("dead", "worst_max_over_mean", "router_entropy", "flip_rate", "margin", "late_warnings",
            "heldout_loss", "accuracy", "train_seconds")
    out: dict = {}
    for r in runs:
        out.setdefault(r["recipe"], {}).setdefault(r["method"], []).append(r)
    summary: dict = {}
    for recipe, by_method in out.items():
        for method, rs in by_method.items():
            cell = {"seeds": sorted(r["seed"] for r in rs)}
            for k in keys:
                vals = [r[k] for r in rs if r.get(k) is not None]
                if vals:  # the demo's spread over seeds (eval.seeds), its four figures
                    cell[k] = {f: v for f, v in spread(vals).items() if f in ("mean", "std", "min", "max")}
            summary.setdefault(recipe, {})[method] = cell
    return summary


def write_summary(runs: list[dict]) -> Path:
    import torch
    from common import device_info

    from behemoth.machine import machine_info

    result = {"benchmark": "routing", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "device": device_info(torch.device("cpu")), "machine": machine_info(),
              "written_by": "python benchmarks/routing.py " + " ".join(sys.argv[1:]),
              "each_run": "python benchmarks/routing.py --one METHOD RECIPE SEED (what the grid runs)",
              "methods": METHODS, "summary": summarize(runs), "runs": runs}
    path = RESULTS / "routing_cpu.json"
    path.write_text(json.dumps(result, indent=2))
    plot(result["summary"], RESULTS / "routing_cpu.png")
    return path


def plot(summary: dict, path: Path) -> None:
    """Per recipe: worst max/mean load against accuracy, one point per method (error bars: seed std)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return
    recipes = [r for r in RECIPES if r in summary]
    fig, axes = plt.subplots(1, len(recipes), figsize=(5 * len(recipes), 4), squeeze=False)
    for ax, recipe in zip(axes[0], recipes, strict=True):
        for method, cell in summary[recipe].items():
            load, acc = cell["worst_max_over_mean"], cell["accuracy"]
            ax.errorbar(load["mean"], acc["mean"] * 100, xerr=load["std"] or 0, yerr=(acc["std"] or 0) * 100, fmt="o",
                        capsize=3, label=f"{method} (dead {cell['dead']['mean']:.1f})")
        ax.axvline(2.0, color="gray", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_xticks([1, 1.5, 2, 3, 5, 10, 20, 50])
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("worst max/mean expert load at the end (log)")
        ax.set_ylabel("held-out exact match (%)")
        ax.set_title(recipe)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(summary: dict) -> str:
    rows = ["| recipe | method | seeds | dead experts | worst max/mean | warnings after 20% | router entropy | "
            "flip rate | held-out loss | accuracy |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def f(cell: dict, key: str, fmt: str, scale: float = 1.0) -> str:
        if key not in cell:
            return "–"
        c = cell[key]
        return f"{c['mean'] * scale:{fmt}}" + ("" if c["std"] is None else f" ± {c['std'] * scale:{fmt}}")

    for recipe in RECIPES:
        for method, cell in summary.get(recipe, {}).items():
            rows.append(f"| {recipe} | {method} | {len(cell['seeds'])} | {f(cell, 'dead', '.1f')} | "
                        f"{f(cell, 'worst_max_over_mean', '.2f')} | {f(cell, 'late_warnings', '.1f')} | "
                        f"{f(cell, 'router_entropy', '.3f')} | "
                        f"{f(cell, 'flip_rate', '.3f')} | {f(cell, 'heldout_loss', '.4f')} | "
                        f"{f(cell, 'accuracy', '.1f', 100)}% |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (CPU threads are split between them)")
    p.add_argument("--work", default="out/routing_ablation", help="run directories (deleted runs are fine)")
    p.add_argument("--table", action="store_true", help="print the markdown table of the recorded runs")
    p.add_argument("--refresh", action="store_true",
                   help="derive the recorded runs' routing figures again from their run directories in --work")
    p.add_argument("--one", nargs=3, metavar=("METHOD", "RECIPE", "SEED"), help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help="CPU threads per run (default: the CPUs split between runs)")
    args = p.parse_args()
    if args.one:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        method, recipe, seed = args.one[0], args.one[1], int(args.one[2])
        record(RUNS_FILE, run_one(method, recipe, seed, Path(args.work) / f"{recipe}_{method}_s{seed}"))
        return
    methods, recipes = args.methods.split(","), args.recipes.split(",")
    unknown = [m for m in methods if m not in METHODS] + [r for r in recipes if r not in RECIPES]
    if unknown:
        p.error(f"unknown method or recipe: {', '.join(unknown)} (methods: {', '.join(METHODS)}; "
                f"recipes: {', '.join(RECIPES)})")
    seeds = [int(s) for s in args.seeds.split(",")]
    failed = 0 if args.table or args.refresh else run_grid(methods, recipes, seeds, args.jobs, Path(args.work),
                                                           args.threads)
    report(RUNS_FILE, write_summary, lambda runs: table(summarize(runs)), failed,
           (lambda runs: refresh(runs, Path(args.work))) if args.refresh else None)


if __name__ == "__main__":
    main()
