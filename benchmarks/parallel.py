"""Training throughput on 1 process against the parallel wrappers, and the all-to-all traffic of expert
parallelism, measured in one run, on the CPU or on GPUs.

The same global batch, model and step (`PretrainStep`, global grad-norm clipping, AdamW, bias update on
global counts) in up to four configurations: one plain process, then under `torchrun --nproc-per-node N`:
FSDP over one rank (what the wrappers cost), FSDP over two ranks, and EP=2 composed with FSDP over two
ranks (the two-rank ones on a CPU, or with two GPUs or more). Every configuration runs in its own processes,
one after another, and this process never touches the GPU (it reads it from a subprocess), so no two
configurations hold GPU memory at once. On a CPU the cores are shared out evenly (threads per process = this
process's count / N); on GPUs each process has one GPU and runs under bf16 autocast (FSDP gathering the blocks
in bf16). Tokens/s is the global batch over the median step time after warm-up. All-to-all bytes are
counted in the forward dispatch and combine of every MoE layer (rows sent to the other rank x row bytes);
the backward sends the same rows the other way, so a step moves twice that.

Memory (on GPUs, or with --assume-device-gb): before anything runs, each configuration's need per GPU comes from
the planner's model (`common.parallel_need`); with `--activation-checkpointing auto` (the default) every
configuration checkpoints activations (`behemoth.parallel.apply_activation_checkpointing`) when one of them fits
only that way, so that all are measured alike (bench-1b at 8 x 2048 on an 80 GB GPU), and a configuration that
does not fit even so is recorded as skipped, with the reason. Each result records `activation_checkpointing`
and its `memory` check.

    .venv/bin/python benchmarks/parallel.py                 # CPU: results/parallel_cpu.json
    .venv/bin/python benchmarks/parallel.py --device cuda   # bench-1b, 8 x 2048: results/parallel_cuda.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from common import GB, MARGIN, add_fit_args, cuda_probe, device_info, fit_record, fits, parallel_need, say_fit

import behemoth
from behemoth.data.loader import Batch
from behemoth.parallel import apply_activation_checkpointing, expert_parallel
from behemoth.parallel.distributed import all_reduce_counts, clip_grad_norm, parallelize, setup_distributed
from behemoth.train.balance import BiasBalancer
from behemoth.train.config import OptimSection, RouterSection
from behemoth.train.optim import build_optimizer
from behemoth.train.steps import PretrainStep, moe_layers

SENT = {"bytes": 0}


def _counting_all_to_all(real):
    def wrapped(x, out_splits, in_splits, group):
        me = dist.get_rank(group)
        SENT["bytes"] += sum(n for r, n in enumerate(in_splits) if r != me) * x[0].numel() * x.element_size()
        return real(x, out_splits, in_splits, group)
    return wrapped


def run(args, rank: int, world: int, ep: int | None) -> dict:
    """One configuration's timed steps in this process (rank `rank` of `world`; `ep` None: the plain process)."""
    cfg = behemoth.get_preset(args.preset)
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    autocast = torch.bfloat16 if device.type == "cuda" else None
    ac = args.activation_checkpointing == "on"
    model = behemoth.build_model(cfg, seed=0, device=device).train()
    if ep is not None:
        model = parallelize(model, world, ep, device.type, activation_checkpointing=ac, compute_dtype=autocast)
    elif ac:
        apply_activation_checkpointing(model)
    step_fn = PretrainStep(model, RouterSection(), autocast)
    opt = build_optimizer([model], OptimSection(lr=1e-3))
    moes = moe_layers(model)
    balancer = BiasBalancer(moes, RouterSection())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=g)
    rows = ids[rank * args.batch // world:(rank + 1) * args.batch // world]
    n, S = len(rows), args.seq_len
    batch = Batch(rows[:, :-1], rows[:, 1:], torch.arange(S).expand(n, S),
                  torch.zeros(n, S, dtype=torch.long)).to(device)
    times, sent = [], []
    for i in range(args.warmup + args.steps):
        SENT["bytes"] = 0
        t0 = time.perf_counter()
        step_fn.forward_backward(batch, 1.0)
        clip_grad_norm([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        all_reduce_counts(moes)
        balancer.update()
        for m in moes:
            m.tokens_per_expert.zero_()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if dist.is_initialized():
            dist.barrier()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            sent.append(SENT["bytes"])
    step_s = statistics.median(times)
    out = {"processes": world, "threads_per_process": torch.get_num_threads(), "median_step_s": step_s,
           "tokens_per_s": args.batch * args.seq_len / step_s}
    if device.type == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if ep and ep > 1:
        per_rank = torch.tensor(float(statistics.mean(sent)))
        dist.all_reduce(per_rank)
        out["all_to_all_forward_bytes_per_step"] = float(per_rank)  # both ranks, dispatch + combine
        out["all_to_all_bytes_per_step"] = 2 * float(per_rank)  # + the backward, the same rows reversed
    return out


def configurations(device_type: str, gpus: int, max_procs: int) -> list[tuple[int, int | None]]:
    """(processes, ep) of each configuration in order; ep None is the plain process. The two-process ones need
    two GPUs (any CPU runs them)."""
    two = device_type == "cpu" or gpus >= 2
    torchrun = ((1, 1), (2, 1), (2, 2)) if two else ((1, 1),)
    return [(1, None), *((n, ep) for n, ep in torchrun if n <= max_procs)]


def label(ep: int | None) -> str | None:
    """The `parallel` entry of a configuration's result (None: the plain process)."""
    return None if ep is None else (f"ep={ep} + fsdp" if ep > 1 else "fsdp")


def plan_runs(cfg, batch: int, seq_len: int, configs: list[tuple[int, int | None]], device_type: str,
              device_bytes: float | None, checkpointing: str = "auto", margin: float = MARGIN) -> list[dict]:
    """Each configuration with its activation checkpointing and its memory check (`common.fit_record`, with
    `skipped` when it does not fit). `checkpointing` on / off for all; auto: on for all when that makes some
    configuration fit that does not fit without it, so that every configuration is measured alike."""
    def need(n, ep, ac):
        return parallel_need(cfg, batch, seq_len, n, ep, ac, device_type)

    if checkpointing == "auto":
        ac = any(not fits(need(n, ep, False).bytes, device_bytes, margin) and fits(need(n, ep, True).bytes,
                                                                                     device_bytes, margin)
                 for n, ep in configs)
    else:
        ac = checkpointing == "on"
    return [{"processes": n, "ep": ep, "activation_checkpointing": ac,
             "memory": fit_record(need(n, ep, ac), device_bytes, margin)} for n, ep in configs]


def launch(args, plan: dict, threads: int) -> dict:
    """One configuration in its own processes (this script as a worker, under torchrun for the parallel ones);
    its result, or {"error": ...} when it failed."""
    n, ep = plan["processes"], plan["ep"]
    with tempfile.TemporaryDirectory() as tmp:
        part = Path(tmp) / "r.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // n))}  # the same cores in every configuration
        flags = [__file__, "--device", args.device, "--preset", args.preset, "--batch", str(args.batch),
                 "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup),
                 "--activation-checkpointing", "on" if plan["activation_checkpointing"] else "off",
                 "--worker-out", str(part)]
        if ep is None:
            cmd = [sys.executable, *flags]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *flags,
                   "--worker-ep", str(ep)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode or not part.exists():
            print(r.stderr[-3000:], file=sys.stderr)
            lines = [ln.strip() for ln in r.stderr.splitlines() if "Error" in ln and "ChildFailedError" not in ln]
            return {"error": f"exit {r.returncode}: " + (lines[0] if lines else r.stderr.strip()[-300:])[:300]}
        return json.loads(part.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--preset", help="default: mini-maverick on the CPU, bench-1b on GPUs")
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--seq-len", type=int, help="default: 256 on the CPU, 2048 on GPUs")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--max-procs", type=int, default=2,
                   help="only the torchrun configurations with at most this many processes (1: what one GPU holds)")
    p.add_argument("--activation-checkpointing", choices=["auto", "on", "off"], default="auto",
                   help="auto: on for every configuration when one of them fits the device only with it")
    add_fit_args(p)
    p.add_argument("--worker-ep", type=int, help=argparse.SUPPRESS)  # set for the torchrun workers
    p.add_argument("--worker-out", help=argparse.SUPPRESS)  # set for every worker
    p.add_argument("--out")
    args = p.parse_args()
    gpu = args.device == "cuda"
    args.preset = args.preset or ("bench-1b" if gpu else "mini-maverick")
    args.seq_len = args.seq_len or (2048 if gpu else 256)
    if args.worker_out is not None:
        worker(args)
    cfg = behemoth.get_preset(args.preset)
    threads = torch.get_num_threads()
    if gpu:
        probe = cuda_probe()
        info, gpus = probe["device"], probe["gpus"]
        free = float(min(probe["free_bytes"], probe["total_bytes"]))
    else:
        info, gpus, free = device_info(torch.device("cpu")), 0, None
    dev_bytes = args.assume_device_gb * GB if args.assume_device_gb is not None else free
    plans = plan_runs(cfg, args.batch, args.seq_len, configurations(args.device, gpus, args.max_procs), args.device,
                      dev_bytes, args.activation_checkpointing, args.memory_margin)
    results = []
    for plan in plans:
        name = label(plan["ep"]) or "one process"
        say_fit(f"{name} x{plan['processes']}", plan["memory"])
        head = {"processes": plan["processes"], "activation_checkpointing": plan["activation_checkpointing"]}
        if plan["ep"] is not None:
            head["parallel"] = label(plan["ep"])
        if "skipped" in plan["memory"]:
            res = {"skipped": plan["memory"]["skipped"]}
        else:
            res = launch(args, plan, threads)
        results.append({**head, **res, "memory": plan["memory"]})
        print(json.dumps(results[-1]), flush=True)
    base = results[0].get("tokens_per_s")
    for r in results[1:]:
        if base and "tokens_per_s" in r:
            r["vs_one_process"] = r["tokens_per_s"] / base
    result = {"benchmark": f"parallel_{args.device}", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "device": info, "versions": {"python": platform.python_version(), "torch": torch.__version__},
              "preset": args.preset, "global_batch": args.batch, "seq_len": args.seq_len, "steps": args.steps,
              "activation_checkpointing": {
                  "setting": args.activation_checkpointing,
                  "used_by": [f"{r.get('parallel', 'one process')} x{r['processes']}" for r in results
                              if r["activation_checkpointing"]]},
              "memory_check": {"device_gb": None if dev_bytes is None else round(dev_bytes / GB, 2),
                               "assumed": args.assume_device_gb is not None, "margin": args.memory_margin},
              "results": results}
    out = Path(args.out or Path(__file__).parent / "results" / f"parallel_{args.device}.json")
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    failed = [i for i, r in enumerate(results) if "error" in r]
    if failed:
        sys.exit(f"configuration(s) {failed} failed: {results[failed[0]]['error']}")


def worker(args) -> None:
    """This process is one configuration's worker: the plain process, or a torchrun rank (`--worker-ep`)."""
    expert_parallel._all_to_all = _counting_all_to_all(expert_parallel._all_to_all)
    if args.worker_ep is None:
        Path(args.worker_out).write_text(json.dumps(run(args, 0, 1, None)))
        sys.exit(0)
    info = setup_distributed(args.device)
    res = run(args, info.rank, info.world, args.worker_ep)
    if info.is_main:
        Path(args.worker_out).write_text(json.dumps(res))
    dist.barrier()  # both ranks done with every collective before the group goes
    dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown, where gloo intermittently aborts (std::terminate)


if __name__ == "__main__":
    main()
