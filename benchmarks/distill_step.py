"""One online-distillation step against its parts, measured side by side in one run.

    distill  = DistillStep.forward_backward (teacher trunk + head chunks, student forward, CE + KD, backward)
    teacher  = the teacher's forward alone (hidden states + output head, no grad)
    student  = PretrainStep.forward_backward on the same batch (student forward, CE, backward)
    overhead = distill / (teacher + student) - 1: what distillation costs beyond running its parts

Steps are interleaved round by round (warmup first) and the medians compared. Results go to
benchmarks/results/distill_step_<device>.json with the device, versions and date.

    .venv/bin/python benchmarks/distill_step.py                 # CPU: mini-behemoth -> mini-maverick
    python benchmarks/distill_step.py --device cuda --batch 8 --seq-len 2048
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from common import device_info, transformers_version

from behemoth import build_model, get_preset
from behemoth.data.loader import Batch
from behemoth.train.config import DistillSection, RouterSection
from behemoth.train.steps import DistillStep, PretrainStep


def make_batch(vocab: int, batch: int, seq_len: int, device: torch.device, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len + 1), generator=g)
    pos = torch.arange(seq_len).expand(batch, seq_len)
    return Batch(ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), pos.contiguous(),
                 torch.zeros(batch, seq_len, dtype=torch.long)).to(device)


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="mini-behemoth")
    p.add_argument("--student", default="mini-maverick")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    autocast = torch.bfloat16 if args.bf16 else None
    teacher = build_model(get_preset(args.teacher), device=device).eval()
    student = build_model(get_preset(args.student), device=device, seed=1).train()
    batch = make_batch(student.config.vocab_size, args.batch, args.seq_len, device)
    distill = DistillStep(student, teacher, RouterSection(), DistillSection(), autocast)
    pretrain = PretrainStep(student, RouterSection(), autocast)

    def run_distill():
        distill.forward_backward(batch, 1.0)
        student.zero_grad(set_to_none=True)

    def run_student():
        pretrain.forward_backward(batch, 1.0)
        student.zero_grad(set_to_none=True)

    @torch.no_grad()
    def run_teacher():
        h = teacher.hidden_states(batch.input_ids, batch.positions, batch.segment_ids).flatten(0, 1)
        for s in range(0, h.shape[0], 1024):
            teacher.logits(h[s:s + 1024]).float()

    parts = {"distill": run_distill, "teacher": run_teacher, "student": run_student}
    times: dict[str, list[float]] = {k: [] for k in parts}
    for i in range(args.warmup + args.repeats):
        for name, fn in parts.items():
            t = timed(fn, device)
            if i >= args.warmup:
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    overhead = med["distill"] / (med["teacher"] + med["student"]) - 1
    tokens = args.batch * args.seq_len
    result = {
        "benchmark": "distill_step", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "device": device_info(device),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers_version()},
        "config": {**vars(args), "teacher_active": teacher.config.num_active_params(),
                   "student_active": student.config.num_active_params()},
        "median_ms": med, "times_ms": times, "tokens_per_s": {k: tokens / (v / 1e3) for k, v in med.items()},
        "overhead_vs_parts": overhead,
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"distill_step_{device.type}.json")
    out.write_text(json.dumps(result, indent=2))
    for k, v in med.items():
        print(f"{k:<8} {v:8.1f} ms  ({tokens / (v / 1e3):,.0f} tokens/s)")
    print(f"distill / (teacher + student) - 1 = {overhead:+.1%}  (target: < +10%)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
