"""Speculative decoding of the demo's teacher with its students as drafts: greedy tokens/s against the teacher
alone, the drafts' acceptance rates (the distilled student's against the scratch student's: how well each agrees
with the teacher), and a check that every output equals the teacher's own.

Prompts are held-out problems of the demo's tasks, one at a time (batch 1, the latency case), greedy, up to 64
new tokens ending at the answer's newline, as `behemoth eval` decodes them; each prompt is decoded once by every
method, in turn, after one untimed warm-up of each. Twice: eager, then with compiled one-token steps (the
target alone's decode, the drafts'; the target's verify step stays eager).

    .venv/bin/python benchmarks/speculative.py --target out/demo/teacher \\
        --draft distilled=out/demo/student_distilled --draft scratch=out/demo/student_scratch

Results go to benchmarks/results/speculative_<device>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import device_info  # noqa: E402

from behemoth.checkpoint import load_model, resolve_model_dir  # noqa: E402
from behemoth.data.tasks import distinct_problems  # noqa: E402
from behemoth.data.tokenizer import Tokenizer  # noqa: E402
from behemoth.inference.generate import generate  # noqa: E402
from behemoth.inference.sampling import SamplingParams  # noqa: E402
from behemoth.inference.speculative import speculative_generate  # noqa: E402
from behemoth.machine import machine_info  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def run_mode(target, models: dict, prompts: list[list[int]], params: SamplingParams, k: int, adaptive: bool,
             compile: bool) -> dict:
    """Each method over every prompt, in turn per prompt (after one untimed warm-up each): tokens/s, speedup over
    the target alone, outputs equal to the target's, acceptance, tokens per target step."""
    def alone(ids):
        return generate(target, [ids], params, compile=compile)[0], None

    def speculative(model):
        def run(ids):
            rows, st = speculative_generate(target, model, [ids], params, k=k, adaptive=adaptive, compile=compile)
            return rows[0], st
        return run

    methods = {"target alone": alone, **{f"draft {n}": speculative(m) for n, m in models.items()}}
    for fn in methods.values():  # warm-up (and compilation)
        fn(prompts[0])
    seconds, tokens = dict.fromkeys(methods, 0.0), dict.fromkeys(methods, 0)
    outputs: dict[str, list] = {m: [] for m in methods}
    stats = {m: dict.fromkeys(("drafted", "accepted", "row_steps", "emitted", "first"), 0) for m in methods}
    for ids in prompts:
        for m, fn in methods.items():
            t0 = time.perf_counter()
            out, st = fn(ids)
            seconds[m] += time.perf_counter() - t0
            tokens[m] += len(out)
            outputs[m].append(out)
            for key in stats[m] if st is not None else ():
                stats[m][key] += getattr(st, key)
    base = tokens["target alone"] / seconds["target alone"]
    rows = {}
    for m in methods:
        s = stats[m]
        rows[m] = {"tokens": tokens[m], "seconds": seconds[m], "tokens_per_s": tokens[m] / seconds[m],
                   "speedup": tokens[m] / seconds[m] / base,
                   "outputs_equal_target": sum(a == b for a, b in zip(outputs[m], outputs["target alone"],
                                                                        strict=True)),
                   "acceptance": s["accepted"] / s["drafted"] if s["drafted"] else None,
                   "tokens_per_target_step": (s["emitted"] - s["first"]) / s["row_steps"] if s["row_steps"] else 1.0}
        print(f"  {m}: {rows[m]['tokens_per_s']:.1f} tokens/s (x{rows[m]['speedup']:.2f}), acceptance "
              f"{rows[m]['acceptance']}, {rows[m]['tokens_per_target_step']:.2f} tokens per target step, "
              f"{rows[m]['outputs_equal_target']}/{len(prompts)} outputs equal the target's", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default="out/demo/teacher")
    p.add_argument("--draft", action="append", default=[], help="NAME=DIR (repeatable)")
    p.add_argument("--tasks", default="units,mul,count")
    p.add_argument("--problems", type=int, default=60)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--adaptive", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--note", default="", help="what the models are, for the results file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    drafts = dict(d.split("=", 1) for d in args.draft) or {"distilled": "out/demo/student_distilled",
                                                          "scratch": "out/demo/student_scratch"}
    target_dir = resolve_model_dir(args.target)
    tok = Tokenizer.load(target_dir)
    target = load_model(str(target_dir), dtype=torch.float32).eval()
    models = {name: load_model(str(resolve_model_dir(d)), dtype=torch.float32).eval() for name, d in drafts.items()}
    for name, d in drafts.items():
        if Tokenizer.load(resolve_model_dir(d)).fingerprint != tok.fingerprint:
            raise SystemExit(f"--draft {name}={d}: its tokenizer differs from the target's")
    problems = distinct_problems("test", args.problems, seed=0, tasks=args.tasks)
    prompts = [tok.encode(q.prompt) for q in problems]
    params = SamplingParams(max_new_tokens=64, stop_ids=(tok.encode("\n")[-1], tok.eos_id))

    results = {}
    for mode in ("eager", "compiled"):
        print(f"{mode}:", flush=True)
        results[mode] = run_mode(target, models, prompts, params, args.k, args.adaptive, mode == "compiled")
    device = device_info(torch.device("cpu"))
    out = RESULTS / f"speculative_{device['type']}.json"
    out.write_text(json.dumps({
        "benchmark": "speculative", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "command": "python benchmarks/speculative.py " + " ".join(sys.argv[1:]), "device": device,
        "machine": machine_info(), "target": str(target_dir), "drafts": drafts, "k": args.k, "adaptive": args.adaptive,
        "problems": len(prompts), "tasks": args.tasks, "note": args.note,
        "target_active_params": target.config.num_active_params(),
        "draft_active_params": {n: m.config.num_active_params() for n, m in models.items()},
        "modes": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
