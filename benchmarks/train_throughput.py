"""Training throughput (tokens/s) and MFU of one full training step, side by side:

  ours        behemoth's Transformer through `behemoth.train.steps.PretrainStep` (hidden states, chunked
              cross-entropy, router z-loss and balance loss with the default `RouterSection`), then what
              `Trainer._optimizer_step` does: global grad-norm clipping, AdamW (`build_optimizer`), the
              auxiliary-loss-free routing-bias update. In bf16 runs: fp32 master weights + bf16 autocast,
              as the trainer runs on GPU;
  ours_bf16   (bf16 runs) the same with the weights, gradients and AdamW state in bf16, no autocast;
  ours_ac / ours_compile / ours_ac_compile
              (--activation-checkpointing / --compile) `ours` with `behemoth.parallel` applied;
  hf          transformers' Llama4ForCausalLM holding the same weights (bf16 weights in bf16 runs, as in
              the reference anchor), sdpa attention, its own `labels=` loss, then the same clipping and AdamW.

Both see the same token batches and predict the same targets (HF shifts `labels` itself; ours gets the
shifted labels with the last position ignored). Routing is natural for both: transformers has no
forced-balance mode, and it runs every expert on every token anyway, so its speed does not depend on
the routing; our load (max / mean tokens per expert, per MoE layer) is recorded.

tokens/s = batch x seq_len / median step time. MFU = tokens/s x ModelConfig.train_flops_per_token(seq_len)
/ peak (PaLM convention: 6 x active params + attention); the peak comes from --peak-tflops or, for bf16
on a known GPU, `behemoth.train.device.PEAK_BF16` (989 TFLOP/s on an H100 SXM, 756 PCIe, 835 NVL). On CPU,
achieved TFLOP/s only.

On CPU every implementation stays resident and steps are interleaved one by one. On GPU a 4B-parameter
model with fp32 AdamW state does not fit next to another, so implementations are built one at a time
(`--resident one`): build, warm up, time, free, in `--blocks` rounds; peak memory is per implementation.
An out-of-memory implementation is recorded as an error, not a crash.

Memory (on GPUs, or with --assume-device-gb): before anything is built, each implementation's need comes from the
planner's model (`common.train_need`: weights, gradients, AdamW state, autocast copies, activations, at the peak
of a step); one that does not fit the device's free memory less a margin is not run and its result is
{"skipped": reason} (with --resident all, every implementation is held at once and their needs add up).

Results go to benchmarks/results/train_throughput_<device>_<preset>.json.

    .venv/bin/python benchmarks/train_throughput.py --preset cpu --profile   # fp32, 3 small presets, ~3 min
    python benchmarks/train_throughput.py --preset h100                      # bench-1b, bf16, 2 x 4096
    python benchmarks/train_throughput.py --preset h100 --compile --activation-checkpointing
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from common import Need, add_fit_args, device_bytes, device_info, fit_record, say_fit, train_need, transformers_version
from torch import nn

from behemoth import build_model
from behemoth.checkpoint.convert import is_native_only, native_to_hf_key
from behemoth.config import ModelConfig, get_preset
from behemoth.config_io import to_hf_config
from behemoth.data.loader import Batch
from behemoth.model.attention import Attention
from behemoth.model.layers import FeedForward, RMSNorm
from behemoth.model.moe import GroupedExperts, MoE, Router
from behemoth.parallel import apply_activation_checkpointing, apply_compile
from behemoth.train.balance import BiasBalancer
from behemoth.train.config import OptimSection, RouterSection
from behemoth.train.device import PEAK_BF16
from behemoth.train.losses import IGNORE_INDEX
from behemoth.train.optim import build_optimizer
from behemoth.train.steps import PretrainStep, moe_layers

PRESETS: dict[str, dict] = {
    "cpu": dict(models=["mini-maverick", "mini-behemoth", "tiny"], batch=4, seq_len=256, dtype="float32",
                device="cpu", repeats=14, warmup=2, resident="all"),
    "h100": dict(models=["bench-1b"], batch=2, seq_len=4096, dtype="bfloat16", device="cuda", repeats=10,
                 warmup=3, blocks=2, resident="one"),
}
_DEFAULTS = dict(models=["tiny"], batch=4, seq_len=256, dtype="float32", device="cpu", repeats=6, warmup=2,
                 blocks=None, resident=None, peak_tflops=None)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named configuration; explicit flags override it")
    p.add_argument("--models", nargs="+", help="model presets (behemoth.config.PRESETS), one after another")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="change every model config, e.g. n_layers=2 or moe.expert_dim=512 (repeatable)")
    p.add_argument("--batch", type=int, help="sequences per step")
    p.add_argument("--seq-len", dest="seq_len", type=int, help="tokens per sequence")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="float32: fp32 everything; bfloat16: ours fp32 master + autocast (and ours_bf16), HF bf16")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--repeats", type=int, help="timed steps per implementation (median reported)")
    p.add_argument("--warmup", type=int, help="untimed steps first (after each build with --resident one)")
    p.add_argument("--blocks", type=int, help="--resident one: build/time/free rounds per implementation")
    p.add_argument("--resident", choices=["all", "one"],
                   help="all: every implementation built once, steps interleaved one by one (CPU default); "
                        "one: one implementation on the device at a time (GPU default)")
    p.add_argument("--compile", action="store_true", help="add ours_compile (behemoth.parallel.apply_compile)")
    p.add_argument("--activation-checkpointing", dest="activation_checkpointing", action="store_true",
                   help="add ours_ac (apply_activation_checkpointing); with --compile also ours_ac_compile")
    p.add_argument("--no-bf16-variant", dest="bf16_variant", action="store_false",
                   help="bf16 runs: leave out ours_bf16 (pure bf16 weights)")
    p.add_argument("--no-segment-ids", dest="segment_ids", action="store_false",
                   help="ours: pass no segment ids (the loader always passes them; one document per row here)")
    p.add_argument("--skip-hf", dest="skip_hf", action="store_true", help="leave transformers out")
    p.add_argument("--peak-tflops", dest="peak_tflops", type=float,
                   help="peak for MFU (default: bf16 peak of a known GPU; none on CPU)")
    p.add_argument("--profile", action="store_true",
                   help="afterwards, profile a few steps of `ours` per model (torch.profiler) into the JSON")
    p.add_argument("--profile-steps", dest="profile_steps", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    add_fit_args(p)
    p.add_argument("--out", type=Path,
                   help="JSON path (default benchmarks/results/train_throughput_<device>_<preset>.json)")
    p.add_argument("--no-save", dest="save", action="store_false", help="print only, write no JSON")
    args = p.parse_args(argv)
    base = {**_DEFAULTS, **PRESETS.get(args.preset or "", {})}
    for k, v in base.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    is_cuda = torch.device(args.device).type == "cuda"
    if args.resident is None:
        args.resident = "one" if is_cuda else "all"
    if args.blocks is None:
        args.blocks = 2 if args.resident == "one" else 1
    args.blocks = max(1, min(args.blocks, args.repeats))
    return args


def parse_overrides(items: list[str]) -> dict:
    """["n_layers=2", "moe.expert_dim=512"] -> {"n_layers": 2, "moe": {"expert_dim": 512}} (JSON values)."""
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--override {item!r}: expected KEY=VALUE")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if key.startswith("moe."):
            out.setdefault("moe", {})[key[4:]] = value
        else:
            out[key] = value
    return out


def peak_tflops(args: argparse.Namespace, device: torch.device) -> tuple[float | None, str | None]:
    if args.peak_tflops:
        return args.peak_tflops, "--peak-tflops"
    if device.type == "cuda" and args.dtype == "bfloat16":
        name = torch.cuda.get_device_name(device)
        for key, flops in PEAK_BF16:  # the more specific names first (PCIe and NVL cards)
            if key in name:
                return flops / 1e12, f"behemoth.train.device.PEAK_BF16 {key!r} (dense bf16)"
    return None, None


# ---- the implementations -------------------------------------------------------------------------

@dataclass
class Runner:
    """A model with its optimizer and a forward+loss+backward function that returns the loss."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    forward_backward: Callable[[Batch], float]
    moes: list[MoE] = field(default_factory=list)
    nonfinite: int = 0

    def __post_init__(self) -> None:
        self.balancer = BiasBalancer(self.moes, RouterSection())  # the trainer's routing-bias update


@dataclass
class Impl:
    name: str
    what: str
    build: Callable[[], Runner]
    compiled: bool = False


def make_batches(cfg: ModelConfig, args: argparse.Namespace, device: torch.device) -> Callable[[int], Batch]:
    """Batch i: random tokens [B, S+1] (seeded by i); ours' labels are the next token, the last one ignored,
    so that they are exactly the targets transformers derives from labels=input_ids."""
    B, S = args.batch, args.seq_len
    positions = torch.arange(S, device=device).expand(B, S)
    segments = torch.zeros(B, S, dtype=torch.long, device=device) if args.segment_ids else None

    def batch(i: int) -> Batch:
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + i)
        tok = torch.randint(0, cfg.vocab_size, (B, S), generator=gen).to(device)
        labels = torch.cat([tok[:, 1:], torch.full((B, 1), IGNORE_INDEX, device=device)], dim=1)
        return Batch(tok, labels, positions, segments)

    return batch


def ours_impl(name: str, cfg: ModelConfig, args: argparse.Namespace, device: torch.device, *, pure_bf16: bool = False,
              ac: bool = False, compile_: bool = False) -> Impl:
    bf16 = args.dtype == "bfloat16"
    autocast = torch.bfloat16 if bf16 and not pure_bf16 else None

    def build() -> Runner:
        model = build_model(cfg, device=device, dtype=torch.bfloat16 if pure_bf16 else None, seed=args.seed)
        if ac:
            apply_activation_checkpointing(model)
        if compile_:
            apply_compile(model, device, autocast)
        model.train()
        step = PretrainStep(model, RouterSection(), autocast)
        runner = Runner(model, build_optimizer([model], OptimSection()), lambda b: 0.0, moe_layers(model))

        def forward_backward(batch: Batch) -> float:
            m = step.forward_backward(batch, 1.0)
            runner.nonfinite += int(m["nonfinite"])
            return float(m["loss"])  # a number or a 0-dim device tensor

        runner.forward_backward = forward_backward
        return runner

    weights = "bf16 weights + AdamW state" if pure_bf16 else ("fp32 master + bf16 autocast" if bf16 else "fp32")
    extras = [s for s, on in (("activation checkpointing", ac), ("torch.compile per block", compile_)) if on]
    return Impl(name, ", ".join([f"behemoth PretrainStep, {weights}", *extras]), build, compiled=compile_)


def hf_impl(cfg: ModelConfig, args: argparse.Namespace, device: torch.device) -> Impl:
    import transformers

    dtype = getattr(torch, args.dtype)

    def build() -> Runner:
        d = to_hf_config(cfg)
        d.pop("model_type")
        d.pop("architectures")
        hf_cfg = transformers.Llama4TextConfig(**d)
        with torch.device(device):
            hf = transformers.Llama4ForCausalLM._from_config(hf_cfg, dtype=dtype, attn_implementation="sdpa")
        src = build_model(cfg, device=device, seed=args.seed)  # our fp32 weights; cast on copy
        state = {native_to_hf_key(k): v for k, v in src.state_dict().items() if not is_native_only(k)}
        missing, unexpected = hf.load_state_dict(state, strict=False)
        allowed = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
        if set(missing) - allowed or unexpected:
            raise RuntimeError(f"weight transfer to transformers: missing {missing}, unexpected {unexpected}")
        del src, state
        hf.train()

        def forward_backward(batch: Batch) -> float:
            loss = hf(input_ids=batch.input_ids, labels=batch.input_ids, use_cache=False).loss
            value = loss.item()
            loss.backward()
            return value

        return Runner(hf, build_optimizer([hf], OptimSection()), forward_backward)

    what = f"transformers {transformers.__version__} Llama4ForCausalLM, {args.dtype} weights, sdpa, labels= loss"
    return Impl("hf", what, build)


def implementations(cfg: ModelConfig, args: argparse.Namespace, device: torch.device) -> list[Impl]:
    impls = [ours_impl("ours", cfg, args, device)]
    if args.dtype == "bfloat16" and args.bf16_variant:
        impls.append(ours_impl("ours_bf16", cfg, args, device, pure_bf16=True))
    if args.activation_checkpointing:
        impls.append(ours_impl("ours_ac", cfg, args, device, ac=True))
    if args.compile:
        impls.append(ours_impl("ours_compile", cfg, args, device, compile_=True))
    if args.compile and args.activation_checkpointing:
        impls.append(ours_impl("ours_ac_compile", cfg, args, device, ac=True, compile_=True))
    if not args.skip_hf:
        impls.append(hf_impl(cfg, args, device))
    return impls


# ---- one training step ---------------------------------------------------------------------------

def train_step(runner: Runner, batch: Batch) -> float:
    """What Trainer._optimizer_step does for one micro-batch: forward+loss+backward, clip, AdamW, bias update."""
    loss = runner.forward_backward(batch)
    params = [p for p in runner.model.parameters() if p.requires_grad]
    float(torch.nn.utils.clip_grad_norm_(params, OptimSection().grad_clip))
    runner.optimizer.step()
    runner.optimizer.zero_grad(set_to_none=True)
    runner.balancer.update()
    return loss


def routing_load(runner: Runner) -> list[float] | None:
    """max / mean tokens per expert of each MoE layer in the last step; resets the counters."""
    if not runner.moes:
        return None
    counts = torch.stack([m.tokens_per_expert for m in runner.moes]).float()
    for m in runner.moes:
        m.tokens_per_expert.zero_()
    return [round(v, 3) for v in (counts.max(1).values / counts.mean(1).clamp_min(1e-9)).tolist()]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e)


@dataclass
class Record:
    times_ms: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # every step, warmup included, in order
    load: list[list[float]] = field(default_factory=list)  # per step: max/mean per MoE layer
    peak_mem_gib: float | None = None
    mem_after_build_gib: float | None = None
    build_s: list[float] = field(default_factory=list)
    error: str | None = None
    nonfinite: int = 0
    memory: dict | None = None  # the fit check (`common.fit_record`)
    skipped: str | None = None  # why it was not run: it does not fit the device


def check_memory(cfg: ModelConfig, args: argparse.Namespace, names: list[str], dev_bytes: float | None
                 ) -> dict[str, dict]:
    """Each implementation's fit check (`common.fit_record`) by the planner's model: alone on the device with
    --resident one, all of them at once with --resident all."""
    needs = {n: train_need(cfg, args.batch, args.seq_len, args.dtype, n) for n in names}
    if args.resident == "one":
        return {n: fit_record(need, dev_bytes, args.memory_margin) for n, need in needs.items()}
    whole = fit_record(Need(f"every implementation at once ({', '.join(names)})",
                            sum(need.bytes for need in needs.values())), dev_bytes, args.memory_margin)
    out = {}
    for n, need in needs.items():
        out[n] = rec = fit_record(need, dev_bytes, args.memory_margin) | {"resident_all_needs_gb": whole["needs_gb"]}
        if whole.get("skipped"):
            rec["fits"], rec["skipped"] = False, f"{whole['skipped']}, every implementation at once (--resident all)"
    return out


def run_model(cfg: ModelConfig, args: argparse.Namespace, device: torch.device) -> tuple[dict[str, Record], dict]:
    impls = implementations(cfg, args, device)
    batch = make_batches(cfg, args, device)
    recs = {i.name: Record() for i in impls}
    checks = check_memory(cfg, args, [i.name for i in impls], device_bytes(device, args.assume_device_gb))
    for name, check in checks.items():
        say_fit(name, check)
        recs[name].memory, recs[name].skipped = check, check.get("skipped")
    impls = [i for i in impls if recs[i.name].skipped is None]
    runners: dict[str, Runner | None] = {}
    crashed: list[str] = []

    def build(impl: Impl) -> None:
        rec = recs[impl.name]
        if device.type == "cuda":
            torch.cuda.empty_cache()
        t0 = time.perf_counter()
        runners[impl.name] = impl.build()
        sync(device)
        rec.build_s.append(round(time.perf_counter() - t0, 2))
        if device.type == "cuda":
            rec.mem_after_build_gib = round(torch.cuda.memory_allocated(device) / 2**30, 2)
            torch.cuda.reset_peak_memory_stats(device)

    def release(impl: Impl) -> None:
        runner = runners.pop(impl.name, None)
        if runner is not None:
            recs[impl.name].nonfinite += runner.nonfinite
        del runner
        if impl.compiled:
            torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def step(impl: Impl, i: int, timed: bool) -> None:
        rec, runner = recs[impl.name], runners[impl.name]
        b = batch(i)
        sync(device)
        t0 = time.perf_counter()
        loss = train_step(runner, b)
        sync(device)
        ms = (time.perf_counter() - t0) * 1e3
        rec.losses.append(round(loss, 5))
        load = routing_load(runner)
        if timed:
            rec.times_ms.append(round(ms, 3))
            if load is not None:
                rec.load.append(load)
        if device.type == "cuda":
            peak = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            rec.peak_mem_gib = max(rec.peak_mem_gib or 0.0, peak)

    def guarded(impl: Impl, fn: Callable[[], None]) -> bool:
        """Run fn; on failure record the error, free the implementation and return False."""
        try:
            fn()
            return True
        except Exception as e:  # noqa: BLE001 - recorded, the benchmark goes on
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            recs[impl.name].error = ("OOM: " if is_oom(e) else "") + msg
            if not is_oom(e):
                crashed.append(impl.name)
                traceback.print_exc()
            print(f"  {impl.name}: {recs[impl.name].error}", file=sys.stderr)
        release(impl)
        return False

    if args.resident == "all":
        live = [i for i in impls if guarded(i, lambda i=i: build(i))]
        rounds = args.warmup + args.repeats
        for r in range(rounds):
            for impl in list(live):
                if not guarded(impl, lambda impl=impl, r=r: step(impl, r, r >= args.warmup)):
                    live.remove(impl)
            print(f"  round {r + 1}/{rounds}", file=sys.stderr, end="\r", flush=True)
        for impl in live:
            release(impl)
    else:
        per_block = [args.repeats // args.blocks + (b < args.repeats % args.blocks) for b in range(args.blocks)]
        done = dict.fromkeys(recs, 0)
        for b, n in enumerate(per_block):
            for impl in impls:
                if recs[impl.name].error:
                    continue

                def block(impl: Impl = impl, n: int = n) -> None:
                    build(impl)
                    for r in range(args.warmup + n):
                        step(impl, done[impl.name], r >= args.warmup)
                        done[impl.name] += 1

                if guarded(impl, block):
                    release(impl)
                print(f"  block {b + 1}/{args.blocks} {impl.name} done", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return recs, {"crashed": crashed}


# ---- profile --------------------------------------------------------------------------------------

def _module_labels(model: nn.Module) -> dict[nn.Module, str]:
    labels: dict[nn.Module, str] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, Attention):
            labels[mod] = "attention"
        elif isinstance(mod, MoE):
            labels[mod] = "moe"
        elif isinstance(mod, Router):
            labels[mod] = "moe.router"
        elif isinstance(mod, GroupedExperts):
            labels[mod] = "moe.experts"
        elif isinstance(mod, FeedForward):
            labels[mod] = "moe.shared_expert" if name.endswith("shared_expert") else "dense_ffn"
        elif isinstance(mod, RMSNorm) and not name.endswith("qk_norm"):
            labels[mod] = "norm"
        elif name in ("output", "tok_embeddings"):
            labels[mod] = "output_head" if name == "output" else "embedding"
    return labels


def _add_ranges(model: nn.Module) -> list:
    """record_function ranges around module forwards: `fwd.<label>`, or `recompute.<label>` inside backward
    (checkpointed chunked cross-entropy, activation checkpointing)."""
    handles = []
    for mod, label in _module_labels(model).items():
        stack: list = []

        def pre(m, a, _label=label, _stack=stack):
            in_bwd = torch._C._current_graph_task_id() != -1
            rf = torch.autograd.profiler.record_function(("recompute." if in_bwd else "fwd.") + _label)
            rf.__enter__()
            _stack.append(rf)

        def post(m, a, o, _stack=stack):
            _stack.pop().__exit__(None, None, None)

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    return handles


def profile_ours(cfg: ModelConfig, args: argparse.Namespace, device: torch.device) -> dict:
    """Where the time of one `ours` step goes: phases, forward by module, top ops by self time."""
    from torch.profiler import ProfilerActivity, profile, record_function

    impl = ours_impl("ours", cfg, args, device)
    runner = impl.build()
    batch = make_batches(cfg, args, device)
    train_step(runner, batch(0))  # warm
    routing_load(runner)
    handles = _add_ranges(runner.model)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    n = args.profile_steps
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for i in range(n):
            with record_function("bench.step"):
                b = batch(1 + i)
                with record_function("bench.forward_backward"):
                    loss = runner.forward_backward(b)
                params = [p for p in runner.model.parameters() if p.requires_grad]
                with record_function("bench.clip_grad_norm"):
                    float(torch.nn.utils.clip_grad_norm_(params, OptimSection().grad_clip))
                with record_function("bench.optimizer"):
                    runner.optimizer.step()
                    runner.optimizer.zero_grad(set_to_none=True)
                with record_function("bench.expert_bias"):
                    runner.balancer.update()
            routing_load(runner)
            sync(device)
    wall_ms = (time.perf_counter() - t0) * 1e3 / n
    for h in handles:
        h.remove()
    del runner, loss
    gc.collect()

    cuda = device.type == "cuda"
    avg = prof.key_averages()

    def incl(name_pred: Callable[[str], bool]) -> float:
        key = "device_time_total" if cuda else "cpu_time_total"
        return sum(getattr(e, key, 0.0) for e in avg if name_pred(e.key)) / 1e3 / n

    step_ms = incl(lambda k: k == "bench.step")
    fb_ms = incl(lambda k: k == "bench.forward_backward")
    bwd_ms = incl(lambda k: k.startswith("autograd::engine::evaluate_function"))
    phases = {
        "forward_and_loss": fb_ms - bwd_ms,
        "backward": bwd_ms,
        "clip_grad_norm": incl(lambda k: k == "bench.clip_grad_norm"),
        "optimizer_adamw": incl(lambda k: k == "bench.optimizer"),
        "expert_bias_update": incl(lambda k: k == "bench.expert_bias"),
    }
    modules = sorted({e.key for e in avg if e.key.startswith(("fwd.", "recompute."))})
    by_module = {k: incl(lambda x, k=k: x == k) for k in modules}
    top_level = [k for k in by_module if k.startswith("fwd.") and k.count(".") == 1]
    by_module["fwd.<outside modules: loss, masks, rope, router losses>"] = phases["forward_and_loss"] - sum(
        by_module[k] for k in top_level)
    self_key = "self_device_time_total" if cuda else "self_cpu_time_total"
    ops = [e for e in avg if not e.key.startswith(("bench.", "fwd.", "recompute.", "autograd::engine", "Optimizer."))
           and not e.key.startswith("ProfilerStep")]
    ops.sort(key=lambda e: getattr(e, self_key, 0.0), reverse=True)
    total_self = sum(getattr(e, self_key, 0.0) for e in ops) / 1e3 / n
    top = [{"op": e.key, "self_ms": round(getattr(e, self_key) / 1e3 / n, 2),
            "pct_of_step": round(100 * getattr(e, self_key) / 1e3 / n / step_ms, 1), "calls": e.count // n}
           for e in ops[:20]]
    r2 = lambda d: {k: round(v, 2) for k, v in d.items()}  # noqa: E731
    return {
        "impl": "ours",
        "steps": n,
        "timer": "CUDA kernel time" if cuda else "CPU time",
        "step_ms_under_profiler": round(step_ms, 2),
        "wall_ms_per_step_under_profiler": round(wall_ms, 2),
        "phases_ms": r2(phases),
        "modules_ms": r2(by_module),
        "ops_self_ms_total": round(total_self, 2),
        "top_ops_by_self_time": top,
    }


# ---- results ------------------------------------------------------------------------------------

def summarise(cfg: ModelConfig, recs: dict[str, Record], args: argparse.Namespace, peak: float | None) -> dict:
    tokens = args.batch * args.seq_len
    fpt = cfg.train_flops_per_token(args.seq_len)
    out: dict[str, dict] = {}
    for name, rec in recs.items():
        r: dict = {}
        if rec.skipped:
            r["skipped"] = rec.skipped
        if rec.error:
            r["error"] = rec.error
        if rec.times_ms:
            med = statistics.median(rec.times_ms)
            tflops = tokens * fpt / (med / 1e3) / 1e12
            r.update(median_ms=round(med, 2), min_ms=round(min(rec.times_ms), 2),
                     tokens_per_s=round(tokens / (med / 1e3), 1), tflops=round(tflops, 4),
                     mfu=round(tflops / peak, 4) if peak else None, times_ms=rec.times_ms)
        r.update(peak_mem_gib=rec.peak_mem_gib, mem_after_build_gib=rec.mem_after_build_gib, build_s=rec.build_s,
                 losses=rec.losses, memory=rec.memory)
        if rec.nonfinite:
            r["nonfinite_steps"] = rec.nonfinite
        if rec.load:
            per_step = [statistics.mean(x) for x in rec.load]
            r["routing_load"] = {
                "what": "max / mean tokens per expert, per MoE layer (1 = perfectly balanced); timed steps",
                "mean_over_layers_per_step": [round(v, 3) for v in per_step],
                "median_mean_over_layers": round(statistics.median(per_step), 3),
                "worst_layer_max": max(max(x) for x in rec.load),
                "first_timed_step_per_layer": rec.load[0],
                "last_timed_step_per_layer": rec.load[-1],
            }
        out[name] = r
    return out


def model_entry(name: str, cfg: ModelConfig, overrides: dict, args: argparse.Namespace) -> dict:
    m = cfg.moe
    return {
        "preset": name,
        "overrides": overrides or None,
        "total_params": cfg.num_params(),
        "active_params": cfg.num_active_params(),
        "train_flops_per_token": cfg.train_flops_per_token(args.seq_len),
        "dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size, "ffn_dim": cfg.ffn_dim,
        "moe_layers": len(cfg.moe_layers), "num_experts": m.num_experts if m else 0,
        "top_k": m.top_k if m else 0, "expert_dim": m.expert_dim if m else 0,
        "attention_chunk_size": cfg.attention_chunk_size,
    }


def run(args: argparse.Namespace) -> tuple[dict, bool]:
    device = torch.device(args.device)
    overrides = parse_overrides(args.override)
    peak, peak_src = peak_tflops(args, device)
    models, results, ratios, profiles, checks = {}, {}, {}, {}, {}
    crashed = False
    for name in args.models:
        cfg = get_preset(name).replace(**overrides) if overrides else get_preset(name)
        models[name] = model_entry(name, cfg, overrides, args)
        print(f"{name}: {cfg.num_active_params() / 1e6:.1f}M active / {cfg.num_params() / 1e6:.1f}M params, "
              f"batch {args.batch} x {args.seq_len}, {args.dtype} on {device}", file=sys.stderr)
        recs, info = run_model(cfg, args, device)
        crashed |= bool(info["crashed"])
        results[name] = summarise(cfg, recs, args, peak)
        hf = results[name].get("hf", {})
        ratios[name] = {f"{k}_vs_hf_tokens_per_s": round(v["tokens_per_s"] / hf["tokens_per_s"], 3)
                        for k, v in results[name].items() if k != "hf" and "tokens_per_s" in v and "tokens_per_s" in hf}
        first = {k: v["losses"][0] for k, v in results[name].items() if v.get("losses")}
        if "hf" in first:
            checks[name] = {"first_step_loss": first,
                            "max_abs_diff_vs_hf": round(max(abs(v - first["hf"]) for v in first.values()), 5)}
        if args.profile and "skipped" not in results[name]["ours"]:
            print(f"{name}: profiling ours for {args.profile_steps} steps", file=sys.stderr)
            profiles[name] = profile_ours(cfg, args, device)
    res = {
        "benchmark": "train_throughput",
        "preset": args.preset or "custom",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(device),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers_version()},
        "config": {
            "batch": args.batch, "seq_len": args.seq_len, "tokens_per_step": args.batch * args.seq_len,
            "dtype": args.dtype, "device": str(device), "repeats": args.repeats, "warmup": args.warmup,
            "resident": args.resident, "blocks": args.blocks if args.resident == "one" else None,
            "segment_ids": args.segment_ids, "seed": args.seed, "peak_tflops": peak, "peak_source": peak_src,
            "assume_device_gb": args.assume_device_gb, "memory_margin": args.memory_margin,
            "optim": vars(OptimSection()), "router": vars(RouterSection()),
        },
        "models": models,
        "implementations": {i.name: i.what for i in implementations(get_preset(args.models[0]), args, device)},
        "results": results,
        "ratios": ratios,
        "check": checks,
        "notes": [
            "one step = forward + loss + backward + global grad-norm clip (1.0) + AdamW + routing-bias update "
            "(ours); transformers: forward with labels= + backward + the same clip and AdamW",
            "tokens_per_s = batch x seq_len / median step; tflops = tokens_per_s x train_flops_per_token "
            "(6 x active params + 12 x L x H x Q x window, the same count for every implementation); "
            "mfu = tflops / peak_tflops, null without a peak (CPU)",
            "natural routing for both: transformers has no forced-balance mode and runs every expert on every "
            "token; our load is in routing_load",
            "weights are trained between repeats (lr 1e-3); every implementation sees the same batches in the "
            "same order; losses lists every step, warmup included; check compares the first step's loss",
            "ours gets segment ids (all one document per row), as the loader always passes them" if args.segment_ids
            else "ours gets no segment ids (--no-segment-ids)",
            ("peak_mem_gib = torch.cuda.max_memory_allocated over the steps with only this implementation on "
             "the device" if args.resident == "one" else
             "peak_mem_gib (CUDA only) includes the other resident implementations"),
        ],
    }
    if profiles:
        res["profile"] = profiles
    return res, crashed


def print_summary(res: dict) -> None:
    c = res["config"]
    print(f"training step, batch {c['batch']} x {c['seq_len']}, {c['dtype']} on {res['device']['name']}")
    print(f"{'model':14s}{'impl':17s}{'ms':>10s}{'tokens/s':>11s}{'TFLOP/s':>9s}{'MFU':>7s}{'mem GiB':>9s}"
          f"{'vs hf':>7s}{'load':>7s}")
    for model, rs in res["results"].items():
        for name, r in rs.items():
            if "median_ms" not in r:
                why = f"skipped: {r['skipped']}" if "skipped" in r else r.get("error", "-")
                print(f"{model:14s}{name:17s}  {why}")
                continue
            ratio = res["ratios"][model].get(f"{name}_vs_hf_tokens_per_s")
            load = r.get("routing_load", {}).get("median_mean_over_layers")
            print(f"{model:14s}{name:17s}{r['median_ms']:10.1f}{r['tokens_per_s']:11.0f}{r['tflops']:9.3f}"
                  f"{'' if r['mfu'] is None else format(r['mfu'], '.1%'):>7s}"
                  f"{'' if r['peak_mem_gib'] is None else r['peak_mem_gib']:>9}"
                  f"{'' if ratio is None else ratio:>7}{'' if load is None else load:>7}")
    for model, ch in res["check"].items():
        print(f"  {model}: first-step loss {ch['first_step_loss']}")
    for model, p in res.get("profile", {}).items():
        print(f"  profile {model} (ours, {p['timer']}, ms/step under profiler: {p['step_ms_under_profiler']}):")
        print("    phases  " + ", ".join(f"{k} {v}" for k, v in p["phases_ms"].items()))
        print("    modules " + ", ".join(f"{k} {v}" for k, v in p["modules_ms"].items()))
        for op in p["top_ops_by_self_time"][:10]:
            print(f"    {op['op']:44s}{op['self_ms']:9.2f} ms {op['pct_of_step']:5.1f}%  x{op['calls']}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t0 = time.perf_counter()
    res, crashed = run(args)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    print_summary(res)
    if args.save:
        out = args.out or (Path(__file__).parent / "results"
                           / f"train_throughput_{torch.device(args.device).type}_{res['preset']}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {out}  ({res['wall_s']} s)")
    if crashed:
        sys.exit("some implementation failed with an error other than out-of-memory (traceback above)")


if __name__ == "__main__":
    main()
