"""What every benchmark result records about where it ran, and whether a configuration fits the device.

The fit check: before a benchmark builds anything on a GPU it states what each configuration needs by the
planner's memory model (`behemoth.plan`: `train_step_memory`, `forward_memory`, `step_peak`,
`ffn_activation_bytes`) and compares it with the device's free memory less a margin (`fits`); a configuration
that does not fit is not run and its result says why (`fit_record(...)["skipped"]`), instead of the run dying
of an out-of-memory error. GB here are 10^9 bytes, as the planner's. On a CPU nothing is checked unless a
device size is assumed (`--assume-device-gb`, to rehearse a GPU's decisions).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from behemoth.config import ModelConfig
from behemoth.machine import cpu_name
from behemoth.plan import GB, USABLE, ffn_activation_bytes, forward_memory, step_peak, train_step_memory

MARGIN = round(1 - USABLE, 6)  # share of the device's free memory left for the CUDA context, NCCL, fragmentation


def device_info(device: torch.device) -> dict:
    """The device's name and, for GPUs, capability, memory and CUDA version."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name, "capability": list(torch.cuda.get_device_capability(device)),
                "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda}
    return {"type": device.type, "name": cpu_name(), "threads": torch.get_num_threads()}


_CUDA_PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
from common import device_info
d = torch.device("cuda", 0)
free, total = torch.cuda.mem_get_info(d)
print(json.dumps({"device": device_info(d), "gpus": torch.cuda.device_count(), "free_bytes": free,
                  "total_bytes": total}))
"""


def cuda_probe() -> dict:
    """The first GPU's `device_info`, the GPU count and its free and total bytes, read in a subprocess so that
    the caller never holds GPU memory (not even a CUDA context) while the processes it starts run."""
    r = subprocess.run([sys.executable, "-c", _CUDA_PROBE, str(Path(__file__).resolve().parent)],
                       capture_output=True, text=True, timeout=300)
    if r.returncode:
        sys.exit(f"cannot read the GPU: {(r.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


# ---- fitting the device ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Need:
    """What one benchmark configuration needs on the device: `bytes` at its peak, by the planner's model, and
    the parts it is made of (bytes; not always a plain sum: see `behemoth.plan.step_peak`)."""

    what: str
    bytes: float
    parts: dict[str, float] = field(default_factory=dict)


def fits(needed_bytes: float, device_bytes: float | None, margin: float = MARGIN) -> bool:
    """True when `needed_bytes` is at most (1 - margin) of `device_bytes`; with no device figure (a CPU run
    with nothing assumed) there is nothing to check: True."""
    return device_bytes is None or needed_bytes <= (1 - margin) * device_bytes


def _gb(n: float) -> str:
    return f"{n / GB:.0f}" if n >= 10 * GB else f"{n / GB:.2g}"


def skip_reason(needed_bytes: float, device_bytes: float, margin: float = MARGIN) -> str:
    """The one line a skipped configuration records."""
    return (f"needs ~{_gb(needed_bytes)} GB by the planner's model, device has {_gb(device_bytes)} GB "
            f"({_gb((1 - margin) * device_bytes)} GB usable with a {margin:.0%} margin)")


def fit_record(need: Need, device_bytes: float | None, margin: float = MARGIN) -> dict:
    """The JSON record of one configuration's check: its need (total and parts, GB), the device's memory and the
    verdict (`fits`: None when unchecked), and `skipped` (the reason) when it does not fit."""
    rec = {"what": need.what, "needs_gb": round(need.bytes / GB, 2), "needs_bytes": int(need.bytes),
           "parts_gb": {k: round(v / GB, 3) for k, v in need.parts.items()},
           "device_gb": None if device_bytes is None else round(device_bytes / GB, 2), "margin": margin,
           "fits": None if device_bytes is None else fits(need.bytes, device_bytes, margin)}
    if rec["fits"] is False:
        rec["skipped"] = skip_reason(need.bytes, device_bytes, margin)
    return rec


def device_bytes(device: torch.device, assume_gb: float | None = None) -> float | None:
    """Memory a benchmark may fill: `assume_gb` when given; on a GPU what is free now (`torch.cuda.mem_get_info`:
    the total less the CUDA context and anything else on the device); on a CPU None (not checked)."""
    if assume_gb is not None:
        return assume_gb * GB
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return float(min(free, total))


def add_fit_args(p: argparse.ArgumentParser) -> None:
    """The fit-check flags every GPU benchmark takes."""
    p.add_argument("--assume-device-gb", dest="assume_device_gb", type=float,
                   help="check configurations against this much device memory (GB) instead of the device's free "
                        "memory; on a CPU, rehearses a GPU's skips")
    p.add_argument("--memory-margin", dest="memory_margin", type=float, default=MARGIN,
                   help=f"share of the device memory kept free by the fit check (default {MARGIN:g})")


def say_fit(name: str, rec: dict) -> None:
    """States a configuration's expected need up front (stderr)."""
    where = "unchecked (CPU)" if rec["device_gb"] is None else f"device has {rec['device_gb']:.1f} GB"
    verdict = {True: "fits", False: "SKIPPED", None: ""}[rec["fits"]]
    print(f"memory: {name}: needs ~{rec['needs_gb']:.2f} GB by the planner's model; {where} {verdict}".rstrip(),
          file=sys.stderr, flush=True)


# ---- each benchmark's configurations, by the planner -------------------------------------------------


def _with(what: str, mem: dict[str, float]) -> Need:
    return Need(what, step_peak(mem), dict(mem))


def train_need(cfg: ModelConfig, batch: int, seq_len: int, dtype: str, impl: str) -> Need:
    """train_throughput.py's implementation `impl` (ours, ours_bf16, ours_ac, ours_compile, ours_ac_compile, hf):
    a whole training step with AdamW on one GPU. `ours`: fp32 master weights (bf16 autocast in bfloat16 runs);
    `ours_bf16`: bf16 everything; `hf`: transformers' Llama4ForCausalLM in the run's dtype, whose MoE layers run
    every expert on every token (the planner's model with top_k = every expert) and whose loss holds full logits."""
    bf16 = dtype == "bfloat16"
    if impl == "hf":
        every = cfg.replace(moe={"top_k": cfg.moe.num_experts}) if cfg.moe is not None else cfg
        p = "bf16" if bf16 else "fp32"
        mem = train_step_memory(every, batch, seq_len, weights=p, compute=p, logit_rows=None)
        return _with(f"transformers, {p} weights, every expert on every token", mem)
    if impl == "ours_bf16":
        return _with("bf16 weights, gradients and AdamW state",
                     train_step_memory(cfg, batch, seq_len, weights="bf16", compute="bf16"))
    ac = impl.startswith("ours_ac")
    compute = "bf16" if bf16 else "fp32"
    mem = train_step_memory(cfg, batch, seq_len, weights="fp32", compute=compute, activation_checkpointing=ac)
    return _with("fp32 master weights" + (" + bf16 autocast" if bf16 else "") + (", activation checkpointing"
                                                                                  if ac else ""), mem)


def parallel_need(cfg: ModelConfig, global_batch: int, seq_len: int, processes: int, ep: int | None,
                  activation_checkpointing: bool, device_type: str) -> Need:
    """parallel.py's configuration on one of its GPUs: the plain process (`ep` None) or FSDP over `processes`
    (EP `ep`), each with global_batch / processes sequences, fp32 master weights (bf16 autocast on GPUs)."""
    compute = "bf16" if device_type == "cuda" else "fp32"
    mem = train_step_memory(cfg, global_batch // processes, seq_len, weights="fp32", compute=compute,
                            activation_checkpointing=activation_checkpointing,
                            fsdp_gpus=None if ep is None else processes, ep=ep or 1)
    what = "one process" if ep is None else (f"FSDP over {processes}" + (f", EP {ep}" if ep > 1 else ""))
    return _with(what + (", activation checkpointing" if activation_checkpointing else ""), mem)


def distill_need(teacher: ModelConfig, student: ModelConfig, batch: int, seq_len: int, bf16: bool,
                 hf_teacher: bool) -> Need:
    """distill_step.py: the student's forward and backward (fp32 weights, bf16 autocast with --bf16; no optimizer
    here), the frozen teacher's forward with its weights in the run's precision, and with `hf_teacher` a dense
    transformers teacher of the teacher's shape and the student's vocabulary, held in the same precision."""
    p = "bf16" if bf16 else "fp32"
    student_mem = train_step_memory(student, batch, seq_len, weights="fp32", compute=p, optimizer=False)
    parts = {f"student_{k}": v for k, v in student_mem.items()}
    total = step_peak(student_mem)
    teachers = [("teacher", teacher)]
    if hf_teacher:
        teachers.append(("hf_teacher", teacher.replace(moe=None, vocab_size=student.vocab_size)))
    for name, cfg in teachers:
        mem = forward_memory(cfg, batch, seq_len, weights=p, compute=p)
        parts |= {f"{name}_{k}": v for k, v in mem.items() if v}
        total += step_peak(mem)
    return Need(f"student step + frozen {p} teacher" + (" + transformers teacher" if hf_teacher else ""), total,
                parts)


def decode_need(cfg: ModelConfig, batch: int, prompt: int, new: int, dtype: str, hf: bool) -> Need:
    """decode.py at one batch size: the model's weights in `dtype`, the prefill of batch x prompt tokens and a KV
    cache of prompt + new tokens per row; with `hf` transformers' copy of the model and its own cache again."""
    p = "bf16" if dtype == "bfloat16" else "fp32"
    mem = forward_memory(cfg, batch, prompt, weights=p, compute=p, cache_len=prompt + new, logit_rows=batch)
    copies = 2 if hf else 1
    return Need(f"{p} weights, KV cache of {batch} x {prompt + new}" + (", ours and transformers" if hf else ""),
                copies * step_peak(mem), {k: copies * v for k, v in mem.items()})


MOE_IMPLS = ("ours", "hf", "dense")


def moe_layer_params(d: int, f: int, experts: int, top_k: int, impl: str) -> int:
    """Parameters of moe_layer.py's implementation: ours and hf hold the same MoE layer (routed experts, shared
    expert, router); dense a SwiGLU of hidden width (K + 1) x F."""
    if impl == "dense":
        return 3 * d * (top_k + 1) * f
    return experts * 3 * d * f + 3 * d * f + d * experts


def moe_layer_need(d: int, f: int, experts: int, top_k: int, tokens: int, dtype: str, impl: str, mode: str,
                   resident: tuple[str, ...] = MOE_IMPLS) -> Need:
    """moe_layer.py's `impl` (ours in any routing or kernel, hf, dense) in `mode` (fwd, fwd_bwd): the weights of
    every `resident` implementation (all are built at once) and in fwd_bwd their gradients, the input and output
    gradient [T, D] (and the input's gradient), and this implementation's activations: `ffn_activation_bytes` per
    token of its width, entered once per expert visited (ours: top-k + shared; hf: every expert + shared, as
    transformers runs them; dense: once)."""
    b = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    bwd = mode == "fwd_bwd"
    weights = b * sum(moe_layer_params(d, f, experts, top_k, i) for i in resident)
    visits = {"ours": top_k + 1, "hf": experts + 1, "dense": 1}[impl]
    width = (experts + 1) * f if impl == "hf" else (top_k + 1) * f
    parts = {"weights": float(weights), "gradients": float(weights if bwd else 0),
             "io": float((3 if bwd else 2) * tokens * d * b),
             "activations": tokens * ffn_activation_bytes(d, width, visits, b)}
    return Need(f"{impl} {mode}, {dtype}, {tokens} tokens", sum(parts.values()), parts)
