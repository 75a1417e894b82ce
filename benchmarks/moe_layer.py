"""One Llama 4 MoE layer, forward and forward+backward, three implementations side by side:

  ours   behemoth.model.moe.MoE: sorted dispatch, only the chosen experts compute (forced-balance
         routing, so every expert gets T*K/E slots; `ours_natural` is the same layer with its router's
         own top-k, and `ours_grouped_mm` / `ours_loop` the expert kernel that is not the device default);
  hf     transformers' Llama4TextMoe with identical weights, which runs every expert on every token;
  dense  behemoth.model.layers.FeedForward of hidden width K*F + F: the same active FLOPs as one
         routed top-K layer plus its shared expert, the throughput a sparse layer could hope for.

FLOPs count only useful work: 3 matmuls of 2*T*D*F per active expert slot plus the shared expert,
times 3 for forward+backward. "fwd" runs under no_grad; "fwd_bwd" runs the forward with autograd and a
backward from a fixed random output gradient to the input and every weight. Implementations are
interleaved round by round so that machine noise hits them alike; the figure is the median.

Memory (on GPUs, or with --assume-device-gb): before anything is built, each implementation's need in each mode
comes from the planner's model (`common.moe_layer_need`: every built layer's weights, gradients in fwd_bwd, and
the implementation's activations by `behemoth.plan.ffn_activation_bytes`); transformers' layer is built only when
its forward fits beside the others, and an (implementation, mode) that does not fit the device's free memory less
a margin is recorded as {"skipped": reason} instead of run.

Results go to benchmarks/results/moe_layer_<device>_<preset>.json.

    .venv/bin/python benchmarks/moe_layer.py --preset cpu            # fp32, about a minute on 2 cores
    python benchmarks/moe_layer.py --preset scout-h100                # bf16, Scout's layer, 32k tokens
    python benchmarks/moe_layer.py --preset maverick-h100             # bf16, 128 experts, forward only
    python benchmarks/moe_layer.py --d 1024 --f 2048 --experts 16 --tokens 16384 --dtype bfloat16 --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import add_fit_args, device_bytes, device_info, fit_record, moe_layer_need, say_fit, transformers_version

from behemoth.config import ModelConfig, MoEConfig
from behemoth.model.layers import FeedForward
from behemoth.model.moe import MoE, grouped_mm_supported

_H100 = dict(d=5120, f=8192, top_k=1, dtype="bfloat16", device="cuda", repeats=20, hf_repeats=5, warmup=3)
PRESETS: dict[str, dict] = {
    "cpu": dict(d=256, f=512, experts=16, top_k=1, tokens=4096, dtype="float32", device="cpu", repeats=20),
    "scout-h100": {**_H100, "experts": 16, "tokens": 32768},
    "maverick-h100": {
        **_H100,
        "experts": 128,
        "tokens": 128 * 512,
        "forward_only": True,
        "skip_hf": True,
        "note": "512 tokens per expert; transformers left out: its repeated input alone is E*T*D*2 bytes = 86 GB",
    },
}
_SHAPE_DEFAULTS = dict(d=1024, f=2048, experts=16, top_k=1, tokens=8192, dtype="float32", device="cpu")
_RUN_DEFAULTS = dict(repeats=10, hf_repeats=None, warmup=2, forward_only=False, skip_hf=False, note=None)
HF_CPU_REPEATS = 5  # transformers runs every expert on every token: seconds per step on CPU


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named configuration; explicit flags override it")
    p.add_argument("--d", type=int, help="model dim D")
    p.add_argument("--f", type=int, help="expert hidden dim F")
    p.add_argument("--experts", type=int, help="routed experts E")
    p.add_argument("--top-k", dest="top_k", type=int, help="experts per token K")
    p.add_argument("--tokens", type=int, help="tokens T in the batch")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--repeats", type=int, help="timed runs per implementation and mode (median reported)")
    p.add_argument("--hf-repeats", dest="hf_repeats", type=int, help="timed runs for transformers (slow on CPU)")
    p.add_argument("--warmup", type=int, help="untimed runs first")
    p.add_argument("--forward-only", dest="forward_only", action="store_true", default=None)
    p.add_argument("--skip-hf", dest="skip_hf", action="store_true", default=None, help="leave transformers out")
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/moe_layer_<device>_<preset>.json)")
    add_fit_args(p)
    args = p.parse_args(argv)
    base = {**_SHAPE_DEFAULTS, **_RUN_DEFAULTS, **PRESETS.get(args.preset or "", {})}
    for k, v in base.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.hf_repeats is None:
        args.hf_repeats = min(args.repeats, HF_CPU_REPEATS) if torch.device(args.device).type == "cpu" else args.repeats
    return args


def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """Our MoE, transformers' Llama4TextMoe holding the same weights (or None), a dense SwiGLU.

    Modules are made on the meta device and materialised in the target dtype, so that no fp32 copy
    of the weights (64 GB for Maverick's 128 experts) ever exists on the device.
    """
    D, Fh, E, K = args.d, args.f, args.experts, args.top_k
    torch.manual_seed(0)
    cfg = ModelConfig(dim=D, moe=MoEConfig(num_experts=E, top_k=K, expert_dim=Fh))
    with torch.device("meta"):
        ours = MoE(cfg)
        dense = FeedForward(D, K * Fh + Fh)
    ours, dense = ours.to(dtype).to_empty(device=device), dense.to(dtype).to_empty(device=device)
    with torch.no_grad():
        for p in [*ours.parameters(), *dense.parameters()]:
            p.normal_(0.0, 0.02)
        ours.tokens_per_expert.zero_()
    hf = None
    if not args.skip_hf:
        import transformers
        from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

        hf_cfg = transformers.Llama4TextConfig(
            hidden_size=D, intermediate_size=Fh, num_local_experts=E, num_experts_per_tok=K, hidden_act="silu"
        )
        with torch.device("meta"):
            hf = Llama4TextMoe(hf_cfg)
        hf = hf.to(dtype).to_empty(device=device)
        with torch.no_grad():
            hf.router.weight.copy_(ours.router.weight)
            hf.experts.gate_up_proj.copy_(ours.experts.w13)
            hf.experts.down_proj.copy_(ours.experts.w2)
            hf.shared_expert.gate_proj.weight.copy_(ours.shared_expert.w1.weight)
            hf.shared_expert.up_proj.weight.copy_(ours.shared_expert.w3.weight)
            hf.shared_expert.down_proj.weight.copy_(ours.shared_expert.w2.weight)
    return ours, hf, dense


def make_step(
    module: torch.nn.Module,
    x_BSD: torch.Tensor,
    gy_BSD: torch.Tensor,
    mode: str,
    setup: Callable[[], None] = lambda: None,
) -> tuple[Callable[[], None], Callable[[], None]]:
    """(prepare, step): prepare clears gradients and sets routing mode outside the timed region."""
    x = x_BSD.detach().requires_grad_(mode == "fwd_bwd")

    def prepare() -> None:
        setup()
        module.zero_grad(set_to_none=True)
        x.grad = None

    def step() -> None:
        if mode == "fwd":
            with torch.no_grad():
                module(x)
            return
        out = module(x)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(gy_BSD.view(out.shape))

    return prepare, step


def timed(prepare: Callable[[], None], step: Callable[[], None], device: torch.device) -> float:
    """One run of `step` in milliseconds (CUDA events on GPU)."""
    prepare()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    step()
    return (time.perf_counter() - t0) * 1e3


def family(name: str) -> str:
    """The layer an implementation runs: ours (any routing or kernel), hf or dense."""
    return "ours" if name.startswith("ours") else name


def check_memory(args: argparse.Namespace, device: torch.device) -> dict[str, dict[str, dict]]:
    """{ours, hf, dense: {mode: fit record}} by the planner's model (`common.moe_layer_need`). Transformers' layer
    counts as built (its weights held beside the others) only when its forward fits beside ours and dense; when it
    does not, every mode of it carries that forward's reason. Leaves args.skip_hf set when hf is not built."""
    dev = device_bytes(device, args.assume_device_gb)
    modes = ["fwd"] if args.forward_only else ["fwd", "fwd_bwd"]

    def check(impl: str, mode: str, resident: tuple[str, ...]) -> dict:
        need = moe_layer_need(args.d, args.f, args.experts, args.top_k, args.tokens, args.dtype, impl, mode, resident)
        return fit_record(need, dev, args.memory_margin)

    out: dict[str, dict[str, dict]] = {}
    resident = ("ours", "dense")
    if not args.skip_hf:
        hf_fwd = check("hf", "fwd", (*resident, "hf"))
        if "skipped" in hf_fwd:
            out["hf"] = {mode: hf_fwd for mode in modes}
            args.skip_hf = True
        else:
            resident = (*resident, "hf")
    for impl in resident:
        out[impl] = {mode: check(impl, mode, resident) for mode in modes}
    for impl, by_mode in out.items():
        for mode, rec in by_mode.items():
            say_fit(f"{impl} {mode}", rec)
    return out


def skipped_result(args: argparse.Namespace, device: torch.device, memory: dict) -> dict:
    """The result of a run whose own layer does not fit: every implementation and mode skipped, with the reason."""
    return {"benchmark": "moe_layer", "preset": args.preset or "custom",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device_info(device),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers_version()},
            "config": {"d": args.d, "f": args.f, "experts": args.experts, "top_k": args.top_k, "tokens": args.tokens,
                       "dtype": args.dtype, "device": str(device)},
            "skipped": memory["ours"]["fwd"]["skipped"], "memory": memory,
            "results": {impl: {mode: {"skipped": rec["skipped"]} for mode, rec in by_mode.items() if "skipped" in rec}
                        for impl, by_mode in memory.items()},
            "ratios": {}}


def run(args: argparse.Namespace) -> dict:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    T, D, Fh, E, K = args.tokens, args.d, args.f, args.experts, args.top_k
    memory = check_memory(args, device)
    if "skipped" in memory["ours"]["fwd"]:
        return skipped_result(args, device, memory)
    ours, hf, dense = build(args, device, dtype)
    ours.eval()  # no tokens_per_expert bookkeeping; nothing else in the layer depends on the mode
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, T, D, device=device, dtype=dtype, generator=gen)
    gy = torch.randn(1, T, D, device=device, dtype=dtype, generator=gen)

    def routing(force_balance: bool, grouped: bool | None = None) -> Callable[[], None]:
        def setup() -> None:
            ours.router.force_balance = force_balance
            ours.experts.grouped = grouped

        return setup

    with torch.no_grad():
        counts = torch.bincount(ours.router(x.view(T, D))[1].flatten(), minlength=E).float()
    natural_load = {
        "max_over_mean": round((counts.max() / counts.mean()).item(), 3),
        "idle_experts": int((counts == 0).sum().item()),
        "counts": counts.int().tolist(),
    }

    default_grouped = ours.experts.use_grouped_mm(x.view(T, D))
    impls: dict[str, tuple[torch.nn.Module, Callable[[], None]]] = {
        "ours": (ours, routing(True)),
        "ours_natural": (ours, routing(False)),
    }
    if default_grouped:
        impls["ours_loop"] = (ours, routing(True, grouped=False))
    elif grouped_mm_supported(device, dtype):
        impls["ours_grouped_mm"] = (ours, routing(True, grouped=True))
    if hf is not None:
        impls["hf"] = (hf, lambda: None)
    impls["dense"] = (dense, lambda: None)

    check = {}
    if hf is not None:
        try:
            with torch.no_grad():
                ours.router.force_balance, ours.experts.grouped = False, None
                diff = (ours(x).view(T, D).float() - hf(x)[0].float()).abs().max().item()
            check["max_abs_diff_ours_natural_vs_hf"] = diff
        except torch.cuda.OutOfMemoryError as e:
            check["max_abs_diff_ours_natural_vs_hf"] = f"OOM: {str(e).splitlines()[0]}"
        if device.type == "cuda":
            torch.cuda.empty_cache()

    useful_fwd = 3 * 2 * T * D * Fh * (K + 1)
    flops = {
        "useful_fwd": useful_fwd,
        "useful_fwd_bwd": 3 * useful_fwd,
        "hf_executed_fwd": 3 * 2 * T * D * Fh * (E + 1),
    }
    modes = ["fwd"] if args.forward_only else ["fwd", "fwd_bwd"]
    results: dict[str, dict] = {name: {} for name in impls}
    if "hf" in memory and hf is None:  # not built: its forward does not fit beside the others
        results["hf"] = {mode: {"skipped": rec["skipped"]} for mode, rec in memory["hf"].items()}
    for mode in modes:
        steps = {name: make_step(mod, x, gy, mode, setup) for name, (mod, setup) in impls.items()}
        times: dict[str, list[float]] = {name: [] for name in impls}
        failed: dict[str, str] = {}
        skipped = {name: memory[family(name)][mode]["skipped"] for name in impls
                   if "skipped" in memory[family(name)][mode]}
        rounds = args.warmup + max(args.repeats, args.hf_repeats)
        for r in range(rounds):
            for name, (prepare, step) in steps.items():
                n = args.hf_repeats if name == "hf" else args.repeats
                w = 1 if name == "hf" and device.type == "cpu" else args.warmup
                if name in failed or name in skipped or r >= w + n:
                    continue
                track_mem = device.type == "cuda" and r == 0
                if track_mem:
                    base = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    ms = timed(prepare, step, device)
                except torch.cuda.OutOfMemoryError as e:
                    failed[name] = f"OOM: {str(e).splitlines()[0]}"
                    prepare()
                    torch.cuda.empty_cache()
                    continue
                if r >= w:
                    times[name].append(ms)
                if track_mem:  # memory the step itself needs on top of what was allocated before it
                    extra = torch.cuda.max_memory_allocated(device) - base
                    results[name].setdefault("step_peak_mem_gib", {})[mode] = round(extra / 2**30, 2)
            print(f"  {mode}: round {r + 1}/{rounds}", file=sys.stderr, end="\r", flush=True)
        print(file=sys.stderr)
        for name in impls:
            if name in skipped:
                results[name][mode] = {"skipped": skipped[name]}
                continue
            if name in failed:
                results[name][mode] = {"error": failed[name]}
                continue
            med = statistics.median(times[name])
            f = flops["useful_fwd_bwd" if mode == "fwd_bwd" else "useful_fwd"]
            results[name][mode] = {
                "median_ms": round(med, 3),
                "min_ms": round(min(times[name]), 3),
                "tflops": round(f / med / 1e9, 4),
                "times_ms": [round(t, 3) for t in times[name]],
            }

    def ratio(a: str, b: str, mode: str) -> float | None:
        ra, rb = results.get(a, {}).get(mode, {}), results.get(b, {}).get(mode, {})
        if "median_ms" not in ra or "median_ms" not in rb:
            return None
        return round(rb["median_ms"] / ra["median_ms"], 3)

    ratios = {}
    for mode in modes:
        ratios[f"ours_speedup_vs_hf_{mode}"] = ratio("ours", "hf", mode)
        ratios[f"ours_natural_speedup_vs_hf_{mode}"] = ratio("ours_natural", "hf", mode)
        ratios[f"ours_throughput_vs_dense_{mode}"] = ratio("ours", "dense", mode)
        ratios[f"ours_natural_throughput_vs_dense_{mode}"] = ratio("ours_natural", "dense", mode)
    return {
        "benchmark": "moe_layer",
        "preset": args.preset or "custom",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(device),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers_version(),
        },
        "config": {
            "d": D,
            "f": Fh,
            "experts": E,
            "top_k": K,
            "tokens": T,
            "tokens_per_expert": T * K / E,
            "dtype": args.dtype,
            "device": str(device),
            "repeats": args.repeats,
            "hf_repeats": args.hf_repeats,
            "warmup": args.warmup,
            "dense_hidden": K * Fh + Fh,
            "ours_expert_kernel": "grouped_mm" if default_grouped else "loop",
        },
        "flops": flops,
        "memory": memory,
        "natural_routing_load": natural_load,
        "check": check,
        "results": results,
        "ratios": ratios,
        "notes": [
            "ms: median over repeats; tflops: useful FLOPs (3 matmuls x 2*T*D*F per active expert slot and "
            "the shared expert, x3 for fwd_bwd) / median time; the same count for all implementations",
            "speedup_vs_hf = hf_ms / ours_ms; throughput_vs_dense = dense_ms / ours_ms (same useful FLOPs)",
            "ours = forced-balance routing (T*K/E slots per expert); ours_natural = the router's own top-k on "
            "random weights and inputs (see natural_routing_load)",
            *([args.note] if args.note else []),
            *(["transformers skipped"] if hf is None else []),
        ],
    }


def print_summary(res: dict) -> None:
    c = res["config"]
    print(
        f"MoE layer  D={c['d']} F={c['f']} E={c['experts']} K={c['top_k']} T={c['tokens']} {c['dtype']} "
        f"on {res['device']['name']}" + (f" (ours: {c['ours_expert_kernel']} kernel)" if "ours_expert_kernel" in c
                                         else "")
    )
    if "skipped" in res:
        print(f"skipped: {res['skipped']}")
        return
    modes = sorted(
        {m for r in res["results"].values() for m in r if m != "step_peak_mem_gib"}, key=["fwd", "fwd_bwd"].index
    )
    print(f"{'impl':18s}" + "".join(f"{m + ' ms':>14s}{'TFLOP/s':>10s}" for m in modes))
    for name, r in res["results"].items():
        row = f"{name:18s}"
        for m in modes:
            v = r.get(m, {})
            row += (
                f"{v['median_ms']:14.2f}{v['tflops']:10.3f}" if "median_ms" in v
                else f"{('skipped' if 'skipped' in v else v.get('error', '-'))[:24]:>24s}"
            )
        print(row)
    for k, v in res["ratios"].items():
        if v is not None:
            print(f"  {k}: {v}")
    if res["check"]:
        print(f"  check: {res['check']}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t0 = time.perf_counter()
    res = run(args)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    print_summary(res)
    out = (
        args.out
        or Path(__file__).parent / "results" / f"moe_layer_{torch.device(args.device).type}_{res['preset']}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}  ({res['wall_s']} s)")


if __name__ == "__main__":
    main()
