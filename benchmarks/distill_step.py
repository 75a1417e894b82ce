"""One online-distillation step against its parts, measured side by side in one run.

    distill  = DistillStep.forward_backward (teacher trunk + head chunks, student forward, CE + KD, backward)
    teacher  = the teacher's forward alone (hidden states + output head, no grad), as DistillStep runs it
    student  = PretrainStep.forward_backward on the same batch (student forward, CE, backward)
    overhead = distill / (teacher + student) - 1: what distillation costs beyond running its parts

Steps are interleaved round by round (warmup first) and the medians compared. With `--hf-teacher FAMILY` the
same is measured once more with a transformers teacher of that family (`checkpoint.foreign.ForeignTeacher`) of
the native teacher's width, depth and heads, dense, with the student's vocabulary: `hf_distill` and
`hf_teacher`, and its own overhead.

Precision: with `--bf16` the student runs under bf16 autocast (fp32 master weights) and both teachers are held in
bf16 and run under the same autocast, as training holds a frozen teacher (`train.teachers.teacher_dtype`, auto: the
run's autocast dtype), in the distillation step and timed alone alike; `config.teacher_dtype` records it. Memory
(on GPUs, or with --assume-device-gb): the run's need comes from the planner's model first (`common.distill_need`);
when the transformers teacher does not fit beside the rest it is left out, and when the rest does not fit the run
is recorded as skipped, with the reason, instead of failing. Results go to
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
from common import add_fit_args, device_bytes, device_info, distill_need, fit_record, say_fit, transformers_version

from behemoth import build_model, get_preset
from behemoth.data.loader import Batch
from behemoth.train.config import DistillSection, RouterSection
from behemoth.train.steps import DistillStep, PretrainStep, autocast_context, teacher_hidden
from behemoth.train.teachers import teacher_dtype


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
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast for the student (fp32 master weights), teachers held in bf16 (GPU)")
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--hf-teacher", default=None, help="also a transformers teacher of this family (e.g. qwen2)")
    p.add_argument("--skip-hf", action="store_true", help="no transformers teacher (transformers not installed)")
    p.add_argument("--out", default=None)
    add_fit_args(p)
    args = p.parse_args()
    if args.skip_hf:
        args.hf_teacher = None
    device = torch.device(args.device)
    autocast = torch.bfloat16 if args.bf16 else None
    t_dtype = teacher_dtype("auto", autocast)  # what training holds a frozen teacher in
    out = Path(args.out or Path(__file__).parent / "results" / f"distill_step_{device.type}.json")
    memory = check_memory(args, device)
    if "skipped" in memory:
        out.write_text(json.dumps({**header(args, device, t_dtype), "skipped": memory["skipped"], "memory": memory},
                                  indent=2))
        print(f"skipped: {memory['skipped']}\nwrote {out}")
        return
    if memory.get("hf_teacher_skipped"):
        args.hf_teacher = None
    teacher = build_model(get_preset(args.teacher), device=device, dtype=t_dtype).eval()
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
        h = teacher_hidden(teacher, batch, autocast)  # what DistillStep runs: the trunk under the run's autocast
        with autocast_context(device, autocast):
            for s in range(0, h.shape[0], 1024):
                teacher.logits(h[s:s + 1024]).float()

    parts = {"distill": run_distill, "teacher": run_teacher, "student": run_student}
    if args.hf_teacher:
        hf = hf_teacher(args.hf_teacher, teacher.config, student.config.vocab_size, device, t_dtype)
        hf_distill = DistillStep(student, hf, RouterSection(), DistillSection(), autocast)

        def run_hf_distill():
            hf_distill.forward_backward(batch, 1.0)
            student.zero_grad(set_to_none=True)

        @torch.no_grad()
        def run_hf_teacher():
            h = teacher_hidden(hf, batch, autocast)
            with autocast_context(device, autocast):
                for s in range(0, h.shape[0], 1024):
                    hf.logits(h[s:s + 1024]).float()

        parts.update(hf_distill=run_hf_distill, hf_teacher=run_hf_teacher)
    times: dict[str, list[float]] = {k: [] for k in parts}
    for i in range(args.warmup + args.repeats):
        for name, fn in parts.items():
            t = timed(fn, device)
            if i >= args.warmup:
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    overhead = med["distill"] / (med["teacher"] + med["student"]) - 1
    hf_overhead = med["hf_distill"] / (med["hf_teacher"] + med["student"]) - 1 if args.hf_teacher else None
    tokens = args.batch * args.seq_len
    result = {
        **header(args, device, t_dtype),
        "median_ms": med, "times_ms": times, "tokens_per_s": {k: tokens / (v / 1e3) for k, v in med.items()},
        "overhead_vs_parts": overhead, "hf_overhead_vs_parts": hf_overhead, "memory": memory,
    }
    out.write_text(json.dumps(result, indent=2))
    for k, v in med.items():
        print(f"{k:<8} {v:8.1f} ms  ({tokens / (v / 1e3):,.0f} tokens/s)")
    print(f"distill / (teacher + student) - 1 = {overhead:+.1%}  (target: < +10%)")
    if hf_overhead is not None:
        print(f"transformers {args.hf_teacher} teacher: hf_distill / (hf_teacher + student) - 1 = {hf_overhead:+.1%}")
    print(f"wrote {out}")


def header(args: argparse.Namespace, device: torch.device, t_dtype: torch.dtype) -> dict:
    """What every result of this script starts with: where and how it ran, in which precisions."""
    teacher, student = get_preset(args.teacher), get_preset(args.student)
    return {
        "benchmark": "distill_step", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "device": device_info(device),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers_version()},
        "config": {**vars(args), "teacher_active": teacher.num_active_params(),
                   "student_active": student.num_active_params(),
                   "student_precision": "fp32 master weights + bf16 autocast" if args.bf16 else "fp32",
                   "teacher_dtype": str(t_dtype).removeprefix("torch."),
                   "teacher_autocast": "bfloat16" if args.bf16 else None},
    }


def check_memory(args: argparse.Namespace, device: torch.device) -> dict:
    """The run's fit check (`common.fit_record`) by the planner's model, with the transformers teacher; when only
    that one does not fit, the check without it, marked `hf_teacher_skipped` (its reason)."""
    teacher, student = get_preset(args.teacher), get_preset(args.student)
    dev = device_bytes(device, args.assume_device_gb)
    need = distill_need(teacher, student, args.batch, args.seq_len, args.bf16, bool(args.hf_teacher))
    rec = fit_record(need, dev, args.memory_margin)
    if "skipped" in rec and args.hf_teacher:
        alone = fit_record(distill_need(teacher, student, args.batch, args.seq_len, args.bf16, False), dev,
                           args.memory_margin)
        if "skipped" not in alone:
            rec = {**alone, "hf_teacher_skipped": rec["skipped"]}
    say_fit("distill step", rec)
    return rec


def hf_teacher(family: str, like, vocab: int, device: torch.device, dtype: torch.dtype):
    """A random transformers causal LM of `family` with the width, depth and heads of native config `like`
    (a dense feed-forward of its ffn width), frozen, wrapped as distillation uses it, its weights in `dtype`."""
    import transformers

    from behemoth.checkpoint.foreign import ForeignTeacher

    cfg = transformers.AutoConfig.for_model(family, vocab_size=vocab, hidden_size=like.dim,
                                            num_hidden_layers=like.n_layers, num_attention_heads=like.n_heads,
                                            num_key_value_heads=like.n_kv_heads, intermediate_size=like.ffn_dim,
                                            head_dim=like.head_dim, max_position_embeddings=8192)
    torch.manual_seed(2)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=dtype)
    return ForeignTeacher(model, f"random {family}")


if __name__ == "__main__":
    main()
