"""Training throughput on 1 process against the parallel wrappers, and the all-to-all traffic of expert
parallelism, measured in one run, on the CPU or on GPUs.

The same global batch, model and step (`PretrainStep`, global grad-norm clipping, AdamW, bias update on
global counts) in up to four configurations: one plain process, then under `torchrun --nproc-per-node N`:
FSDP over one rank (what the wrappers cost), FSDP over two ranks, and EP=2 composed with FSDP over two
ranks (the two-rank ones on a CPU, or with two GPUs or more). On a CPU the cores are shared out evenly
(threads per process = the plain process's count / N); on GPUs each process has one GPU and runs under
bf16 autocast. Tokens/s is the global batch over the median step time after warm-up. All-to-all bytes are
counted in the forward dispatch and combine of every MoE layer (rows sent to the other rank x row bytes);
the backward sends the same rows the other way, so a step moves twice that.

    .venv/bin/python benchmarks/parallel.py                 # CPU: results/parallel_cpu.json
    .venv/bin/python benchmarks/parallel.py --device cuda   # bench-1b, 8 x 2048: results/parallel_cuda.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
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
from common import device_info

import behemoth
from behemoth.data.loader import Batch
from behemoth.parallel import expert_parallel
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
    cfg = behemoth.get_preset(args.preset)
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    model = behemoth.build_model(cfg, seed=0, device=device).train()
    if ep is not None:
        model = parallelize(model, world, ep, device.type)
    step_fn = PretrainStep(model, RouterSection(), torch.bfloat16 if device.type == "cuda" else None)
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
    if ep is not None:
        out["parallel"] = f"ep={ep} + fsdp" if ep > 1 else "fsdp"
    if ep and ep > 1:
        per_rank = torch.tensor(float(statistics.mean(sent)))
        dist.all_reduce(per_rank)
        out["all_to_all_forward_bytes_per_step"] = float(per_rank)  # both ranks, dispatch + combine
        out["all_to_all_bytes_per_step"] = 2 * float(per_rank)  # + the backward, the same rows reversed
    return out


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
    p.add_argument("--worker-ep", type=int, help=argparse.SUPPRESS)  # set when started by torchrun
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--out")
    args = p.parse_args()
    gpu = args.device == "cuda"
    args.preset = args.preset or ("bench-1b" if gpu else "mini-maverick")
    args.seq_len = args.seq_len or (2048 if gpu else 256)
    expert_parallel._all_to_all = _counting_all_to_all(expert_parallel._all_to_all)
    if args.worker_ep is not None:
        info = setup_distributed(args.device)
        res = run(args, info.rank, info.world, args.worker_ep)
        if info.is_main:
            Path(args.worker_out).write_text(json.dumps(res))
        dist.barrier()  # both ranks done with every collective before the group goes
        dist.destroy_process_group()
        os._exit(0)  # skip interpreter teardown, where gloo intermittently aborts (std::terminate)
    results = [run(args, 0, 1, None)]
    print(json.dumps(results[-1]), flush=True)
    if gpu:  # give back this process's cached memory: the torchrun workers below share its GPU
        gc.collect()
        torch.cuda.empty_cache()
    threads = torch.get_num_threads()
    two = not gpu or torch.cuda.device_count() >= 2
    configs = ((1, 1), (2, 1), (2, 2)) if two else ((1, 1),)
    for nproc, ep in [(n, ep) for n, ep in configs if n <= args.max_procs]:
        with tempfile.TemporaryDirectory() as tmp:
            part = Path(tmp) / "r.json"
            env = {**os.environ, "OMP_NUM_THREADS": str(threads // nproc)}  # the same cores in every configuration
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", __file__,
                   "--device", args.device, "--preset", args.preset, "--batch", str(args.batch),
                   "--seq-len", str(args.seq_len),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--worker-ep", str(ep),
                   "--worker-out", str(part)]
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if r.returncode:
                sys.exit(r.stderr[-3000:])
            results.append(json.loads(part.read_text()))
            print(json.dumps(results[-1]), flush=True)
    base = results[0]["tokens_per_s"]
    for r in results[1:]:
        r["vs_one_process"] = r["tokens_per_s"] / base
    result = {"benchmark": f"parallel_{args.device}", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "device": device_info(torch.device(args.device)),
              "versions": {"python": platform.python_version(), "torch": torch.__version__},
              "preset": args.preset, "global_batch": args.batch, "seq_len": args.seq_len, "steps": args.steps,
              "results": results}
    out = Path(args.out or Path(__file__).parent / "results" / f"parallel_{args.device}.json")
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
