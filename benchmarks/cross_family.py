"""Distillation from a teacher of another model family and another tokenizer, side by side.

The teacher is a transformers Qwen 2 model (not Llama 4), trained here on the demo's built-in tasks with a plain
PyTorch loop, once with a byte-level BPE tokenizer trained on the tasks (its own tokenizer) and once with the
student's character tokenizer (for same-tokenizer distillation). The student is the demo's `mini-maverick` with
the character tokenizer, trained per seed:

    scratch          next-token loss alone, the same tokens, seed and steps
    same-tokenizer   distilled from the character-tokenizer teacher (the usual dense KD)
    marginal         distilled from the BPE teacher at every position: its distribution marginalised onto the
                     student's next character, given the bytes of its next token read so far
                     (distill.cross_method=aligned, distill.vocab_match=marginal)
    aligned          distilled from the BPE teacher at aligned positions, its tokens mapped by prefix
                     (distill.vocab_match=prefix: a token the student lacks counts for the character it begins with)
    hybrid           aligned (prefix) + ULD on the tokens still unshared
    aligned-exact    aligned with identical tokens only (distill.vocab_match=exact: here single characters)
    hybrid-exact     hybrid with identical tokens only
    uld              ULD alone (sorted probabilities, no token matched)

Measured per run on the demo's held-out problems: bits per byte (tokenizer-free), loss per token, exact match,
and the training step's cost (seconds per step). The gap recovered is (scratch - distilled) / (scratch - teacher)
in bits per byte, and in accuracy. Teachers are trained once (seed 0); the seeds vary the students. Results:
`results/cross_family_cpu.json`; `--table` prints the README's table.

    .venv/bin/python benchmarks/cross_family.py                 # teachers, then 5 students x 3 seeds
    .venv/bin/python benchmarks/cross_family.py --table
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).parent / "results"
OUT = RESULTS / "cross_family_cpu.json"
# the tasks and recipe the recorded results were measured on: the demo's of that time (it has since dropped `mod`
# and `count`, and distils with alpha 1)
TASKS = ("units", "mul", "count", "mod")
ALPHA = 0.7


def recipe():
    """The demo's full recipe on `TASKS` with `ALPHA` (the demo module is imported where needed, as everywhere
    here)."""
    from dataclasses import replace

    from behemoth.demo import FULL

    return replace(FULL, tasks=TASKS, alpha=ALPHA)


METHODS = ("scratch", "same-tokenizer", "marginal", "aligned", "hybrid", "aligned-exact", "hybrid-exact", "uld")
CROSS = {"marginal": ("aligned", "marginal"), "aligned": ("aligned", "prefix"), "hybrid": ("hybrid", "prefix"),
         "aligned-exact": ("aligned", "exact"), "hybrid-exact": ("hybrid", "exact"), "uld": ("uld", "prefix")}
TEACHER = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=6, num_attention_heads=6,
               num_key_value_heads=2, max_position_embeddings=256)
TEACHER_STEPS, TEACHER_LR, BATCH, SEQ = 600, 2e-3, 16, 128
STUDENT_STEPS, EVAL_PROBLEMS = 200, 200


def train_teacher(directory: Path, tok, steps: int, say) -> Path:
    """A Qwen 2 model trained with a plain loop (AdamW, linear warmup, cosine decay) on the demo's tasks."""
    import transformers

    from behemoth.data.loader import IGNORE_INDEX, DataLoader
    from behemoth.data.packing import build_in_memory
    from behemoth.data.tasks import make_problems

    if (directory / "config.json").is_file():
        return directory
    torch.manual_seed(0)
    vocab = -(-tok.vocab_size // 64) * 64  # padded to a multiple of 64, as the demo's models are
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(vocab_size=vocab, **TEACHER))
    store = build_in_memory([p.text for p in make_problems("train", recipe().problems, seed=0, tasks=TASKS)], tok)
    loader = DataLoader(store, BATCH, SEQ, shuffle=True, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=TEACHER_LR, weight_decay=0.1, betas=(0.9, 0.95))
    warm = steps // 20
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    model.train()
    t0 = time.perf_counter()
    for step, batch in zip(range(steps), loader, strict=False):
        logits = model(input_ids=batch.input_ids).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten(), ignore_index=IGNORE_INDEX)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            say(f"  teacher {directory.name}: step {step + 1}/{steps} loss {loss.item():.4f} "
                f"({time.perf_counter() - t0:.0f} s)")
    model.eval().save_pretrained(directory)
    tok.save(directory)
    return directory


def student_run(method: str, seed: int, teachers: dict[str, Path], work: Path, say) -> dict:
    """One student of the demo's recipe, trained and evaluated; its record."""
    from behemoth.checkpoint.locate import latest_checkpoint
    from behemoth.demo import recipe_config
    from behemoth.eval import evaluate_model
    from behemoth.train.config import build_config
    from behemoth.train.run import run_training

    out = work / f"{method}_seed{seed}"
    over = {**recipe_config("student", out, recipe()), "train.steps": STUDENT_STEPS, "train.seed": seed,
            "log.plots": False, "optim.warmup_steps": max(1, STUDENT_STEPS // 20)}
    mode = "pretrain"
    if method == "same-tokenizer":
        mode, over = "distill", {**over, "distill.teacher": str(teachers["chars"]), "distill.alpha": recipe().alpha}
    elif method != "scratch":
        cross, match = CROSS[method]
        mode, over = "distill", {**over, "distill.teacher": str(teachers["bpe"]), "distill.alpha": recipe().alpha,
                                 "distill.tokenizer": "own", "distill.cross_method": cross,
                                 "distill.vocab_match": match}
    t0 = time.perf_counter()
    summary = run_training(build_config(updates=over), mode=mode, say=lambda s: None)
    seconds = time.perf_counter() - t0
    ev = evaluate_model(str(latest_checkpoint(out)), problems=EVAL_PROBLEMS, seq_len=recipe().seq_len,
                        max_new_tokens=40, tasks=TASKS)
    rec = {"method": method, "seed": seed, "bits_per_byte": ev["heldout"]["bits_per_byte"],
           "loss": ev["heldout"]["loss"], "accuracy": ev["tasks"]["overall"], "interval": ev["tasks"]["interval"],
           "seconds_per_step": seconds / summary["step"], "steps": summary["step"]}
    say(f"{method} seed {seed}: {rec['bits_per_byte']:.4f} bits/byte, accuracy {rec['accuracy']:.1%}, "
        f"{rec['seconds_per_step']:.3f} s/step")
    return rec


def step_costs(teachers: dict[str, Path], rounds: int = 12, warmup: int = 2) -> dict:
    """Milliseconds per training step (forward and backward of one batch of the student recipe) of each method,
    the methods interleaved round by round in one process so that the machine's load falls on all alike;
    medians after `warmup` rounds. The student's weights are not updated (the cost does not depend on them)."""
    from behemoth import build_model, get_preset
    from behemoth.checkpoint.foreign import load_foreign
    from behemoth.data.loader import DataLoader
    from behemoth.data.packing import build_in_memory
    from behemoth.data.tasks import make_problems
    from behemoth.data.tokenizer import Tokenizer
    from behemoth.train.config import DistillSection, RouterSection
    from behemoth.train.cross_step import CrossTokenizerDistillStep
    from behemoth.train.steps import DistillStep, PretrainStep

    student_tok = Tokenizer.load(teachers["chars"])
    student = build_model(get_preset("mini-maverick").replace(vocab_size=64), seed=0).train()  # the demo's vocabulary
    batch = next(iter(DataLoader(build_in_memory([p.text for p in make_problems("train", 2000, seed=5,
                                                                                   tasks=TASKS)], student_tok),
                                 BATCH, SEQ, shuffle=True, seed=0)))
    same, cross = load_foreign(teachers["chars"]), load_foreign(teachers["bpe"])
    bpe_tok = Tokenizer.load(teachers["bpe"])
    alpha = recipe().alpha
    steps = {"scratch": PretrainStep(student, RouterSection()),
             "same-tokenizer": DistillStep(student, same, RouterSection(), DistillSection(alpha=alpha))}
    for m, (method, match) in CROSS.items():
        steps[m] = CrossTokenizerDistillStep(student, cross, bpe_tok, student_tok, RouterSection(),
                                             DistillSection(alpha=alpha, cross_method=method, vocab_match=match))
    times: dict[str, list[float]] = {m: [] for m in steps}
    for r in range(warmup + rounds):
        for m, step in steps.items():
            t0 = time.perf_counter()
            step.forward_backward(batch, 1.0)
            student.zero_grad(set_to_none=True)
            if r >= warmup:
                times[m].append((time.perf_counter() - t0) * 1e3)
    return {m: {"median_ms": statistics.median(v), "vs_scratch": statistics.median(v) / statistics.median(
        times["scratch"])} for m, v in times.items()}


def teacher_eval(teachers: dict[str, Path]) -> dict:
    from behemoth.eval import evaluate_model

    out = {}
    for name, d in teachers.items():
        ev = evaluate_model(str(d), problems=EVAL_PROBLEMS, seq_len=recipe().seq_len, max_new_tokens=40, tasks=TASKS)
        out[name] = {"bits_per_byte": ev["heldout"]["bits_per_byte"], "loss": ev["heldout"]["loss"],
                     "accuracy": ev["tasks"]["overall"], "interval": ev["tasks"]["interval"],
                     "params": ev["params"]}
    return out


def summarize(runs: list[dict], teachers: dict) -> dict:
    """Mean and spread per method; the gap recovered per seed (against that seed's scratch student)."""
    by = {m: [r for r in runs if r["method"] == m] for m in METHODS}
    scratch = {r["seed"]: r for r in by["scratch"]}
    out = {}
    for m, rs in by.items():
        if not rs:
            continue
        t = teachers["chars" if m in ("scratch", "same-tokenizer") else "bpe"]
        row = {}
        for key in ("bits_per_byte", "accuracy"):
            vals = [r[key] for r in rs]
            row[key] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                        "min": min(vals), "max": max(vals), "n": len(vals)}
        if m != "scratch":
            gaps = {"bits_per_byte": [], "accuracy": []}
            for r in rs:
                s = scratch.get(r["seed"])
                if s is None:
                    continue
                for key in gaps:
                    denom = s[key] - t[key]
                    gaps[key].append((s[key] - r[key]) / denom if denom else None)
            row["gap_recovered"] = gaps
            row["beats_scratch_bpb_every_seed"] = all(
                r["bits_per_byte"] < scratch[r["seed"]]["bits_per_byte"] for r in rs if r["seed"] in scratch)
        out[m] = row
    return out


def table(result: dict, labels: dict | None = None, teacher_labels: dict | None = None) -> str:
    """The README's table (`labels`: a method's name in it, `teacher_labels`: a teacher's)."""
    labels = labels or {}
    teacher_labels = teacher_labels or {name: f"teacher (Qwen 2, {name} tokenizer)" for name in result["teachers"]}
    t, cost = result["teachers"], result.get("step_cost", {})
    lines = ["| student | bits/byte | exact match | gap recovered, bits/byte (per seed) | gap recovered, accuracy "
             "(per seed) | step cost vs scratch |", "|---|---|---|---|---|---|"]
    for m, row in result["summary"].items():
        b, a = row["bits_per_byte"], row["accuracy"]
        gaps = row.get("gap_recovered", {})
        g_b, g_a = (", ".join(f"{g:.0%}" for g in gaps.get(k, []) if g is not None) or "-"
                    for k in ("bits_per_byte", "accuracy"))
        c = f"{cost[m]['vs_scratch']:.2f}x ({cost[m]['median_ms']:.0f} ms)" if m in cost else "-"
        lines.append(f"| {labels.get(m, m)} | {b['mean']:.4f} ± {b['std']:.4f} | {a['mean']:.1%} ± {a['std']:.1%} | "
                     f"{g_b} | {g_a} | {c} |")
    for name, v in t.items():
        lines.append(f"| {teacher_labels[name]} | {v['bits_per_byte']:.4f} | {v['accuracy']:.1%} | | | |")
    return "\n".join(lines)


def main() -> None:
    global STUDENT_STEPS, EVAL_PROBLEMS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--work", default="/tmp/behemoth_cross_family", help="teachers and runs (kept for resuming)")
    ap.add_argument("--table", action="store_true", help="print the README table from the results file")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--teacher-steps", type=int, default=TEACHER_STEPS)
    ap.add_argument("--student-steps", type=int, default=STUDENT_STEPS)
    ap.add_argument("--eval-problems", type=int, default=EVAL_PROBLEMS)
    ap.add_argument("--out", default=str(OUT), help="the results file")
    args = ap.parse_args()
    STUDENT_STEPS, EVAL_PROBLEMS = args.student_steps, args.eval_problems
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).parent))
    from common import device_info, transformers_version

    from behemoth.data.tasks import make_problems
    from behemoth.data.tokenizer import Tokenizer

    def say(line: str) -> None:
        print(line, flush=True)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    texts = [p.text for p in make_problems("train", 4000, seed=0, tasks=TASKS)]
    toks = {"bpe": Tokenizer.train(texts, vocab_size=320), "chars": None}
    from behemoth.data.tasks import ALPHABET

    toks["chars"] = Tokenizer.from_chars(ALPHABET)
    t0 = time.perf_counter()
    teachers = {name: train_teacher(work / f"teacher_{name}", tok, args.teacher_steps, say)
                for name, tok in toks.items()}
    teacher_figures = teacher_eval(teachers)
    say(f"teachers: {json.dumps(teacher_figures)}")
    runs_file = work / "runs.jsonl"
    runs = [json.loads(x) for x in runs_file.read_text().splitlines()] if runs_file.is_file() else []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for method in args.methods.split(","):
            if any(r["method"] == method and r["seed"] == seed for r in runs):
                continue
            rec = student_run(method, seed, teachers, work, say)
            runs.append(rec)
            with runs_file.open("a") as f:
                f.write(json.dumps(rec) + "\n")
    result = {"benchmark": "cross_family", "command": "benchmarks/cross_family.py " + " ".join(sys.argv[1:]),
              "date": datetime.date.today().isoformat(), "device": device_info(torch.device("cpu")),
              "torch": torch.__version__, "transformers": transformers_version(),
              "recipe": {"teacher": {**TEACHER, "steps": args.teacher_steps, "lr": TEACHER_LR, "batch": BATCH,
                                     "seq": SEQ, "family": "qwen2",
                                     "tokenizers": {k: t.vocab_size for k, t in toks.items()}},
                         "student": {"preset": "mini-maverick", "steps": STUDENT_STEPS,
                                     "eval_problems": EVAL_PROBLEMS}},
              "teachers": teacher_figures, "runs": runs, "summary": summarize(runs, teacher_figures),
              "step_cost": step_costs(teachers),
              "wall_seconds": time.perf_counter() - t0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    say(table(result))
    say(f"wrote {args.out}")


if __name__ == "__main__":
    main()
